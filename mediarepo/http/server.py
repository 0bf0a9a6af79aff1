"""Routing within a resource, JSON answers, and the one place errors become responses."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any
from urllib.parse import unquote_to_bytes

import attrs
from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from mediarepo.errors import Codes, MatrixError
from mediarepo.http.headers import reason_phrase, set_json_headers
from mediarepo.http.site import MediaRequest
from mediarepo.http.upload_body import AcceptedUpload

logger = logging.getLogger(__name__)

Handler = Callable[[MediaRequest, dict[str, str]], Awaitable[None]]

# One path segment in a route pattern (it may be empty: the handler refuses that).
PATH_SEGMENT = r"[^/]*"


@attrs.frozen
class StreamedBody:
    """What a route that takes a streamed body (an upload) does: ``accept``
    runs from the request line and headers, before any byte of the body is
    read (authentication, limits), and says where the body goes; ``store``
    runs once the whole body is in."""

    accept: Callable[[MediaRequest, dict[str, str]], Awaitable[AcceptedUpload]]
    store: Callable[[MediaRequest, dict[str, str], AcceptedUpload], Awaitable[None]]


@attrs.frozen
class Route:
    """``pattern`` matches the raw (still percent-encoded) rest of the path;
    named groups reach the handler decoded."""

    name: str
    methods: frozenset[bytes]
    pattern: re.Pattern[str]
    handler: Handler | StreamedBody


def route(name: str, methods: Sequence[str], pattern: str, handler: Handler) -> Route:
    return Route(name, frozenset(m.encode() for m in methods), re.compile(pattern), handler)


def upload_route(
    name: str,
    methods: Sequence[str],
    pattern: str,
    accept: Callable[[MediaRequest, dict[str, str]], Awaitable[AcceptedUpload]],
    store: Callable[[MediaRequest, dict[str, str], AcceptedUpload], Awaitable[None]],
) -> Route:
    """A route that takes a streamed body: see :class:`StreamedBody`."""
    return Route(
        name,
        frozenset(m.encode() for m in methods),
        re.compile(pattern),
        StreamedBody(accept, store),
    )


def respond_json(request: MediaRequest, code: int, body: Any) -> None:
    if request.disconnected or request.finished:
        return
    data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    respond_encoded_json(request, code, data)


def respond_encoded_json(request: MediaRequest, code: int, data: bytes) -> None:
    """Answer with JSON already encoded (a URL preview kept as its text)."""
    if request.disconnected or request.finished:
        return
    request.setResponseCode(code, reason_phrase(code))
    set_json_headers(request, len(data))
    request.write(data)
    request.finish()


def respond_error(request: MediaRequest, error: MatrixError) -> None:
    if request.disconnected or request.finished:
        return
    if request.startedWriting:
        # Part of a body is out; a JSON error can't follow it. Cut the
        # connection so the client sees a truncated response, not a wrong one.
        logger.warning("error after the response began: %s", error)
        request.channel.transport.abortConnection()  # type: ignore[union-attr]
        return
    for name, value in error.headers.items():
        request.setHeader(name, value)
    respond_json(request, error.code, error.to_json())


# -- text from a request -------------------------------------------------------
# Every piece of text a request carries towards the database (path segments,
# query parameters, headers) is read through these: PostgreSQL cannot store a
# NUL character, and nothing but UTF-8 is text.


def is_storable_text(text: str) -> bool:
    """Whether ``text`` (already decoded) can be a query parameter of the database."""
    return "\x00" not in text


def request_text(raw: bytes, what: str, errcode: str = Codes.INVALID_PARAM) -> str:
    """``raw`` as text, or a 400: it must be UTF-8 without a NUL character.
    ``what`` names it in the error; ``errcode`` is the one for bad UTF-8
    (Synapse's, where it has one)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MatrixError(400, errcode, f"{what} is not valid UTF-8") from e
    if not is_storable_text(text):
        raise MatrixError(400, Codes.INVALID_PARAM, f"{what} contains a NUL character")
    return text


def path_segment_text(raw: str, what: str) -> str:
    """A path segment as received (percent-encoded, and possibly holding
    raw bytes kept as surrogates by :func:`raw_path_text`), decoded."""
    return request_text(unquote_to_bytes(raw.encode("ascii", "surrogateescape")), what)


def raw_path_text(raw: bytes) -> str:
    """Raw path bytes as a ``str`` to match route patterns against, every
    byte kept (non-ASCII ones as surrogates) for :func:`path_segment_text`."""
    return raw.decode("ascii", "surrogateescape")


def unrecognized(request: MediaRequest, code: int = 404) -> None:
    respond_error(request, MatrixError(code, Codes.UNRECOGNIZED, "Unrecognized request"))


def method_not_allowed(methods: set[bytes]) -> MatrixError:
    # HEAD goes wherever GET does; OPTIONS is answered for every path (CORS).
    allowed = {m.decode("ascii") for m in methods} | {"OPTIONS"}
    if "GET" in allowed:
        allowed.add("HEAD")
    return MatrixError(
        405,
        Codes.UNRECOGNIZED,
        "Unrecognized request",
        headers={"Allow": ", ".join(sorted(allowed))},
    )


def _path_params(match: re.Match[str]) -> dict[str, str]:
    # An optional group that did not take part is absent; one that matched
    # nothing is "" (and the handler refuses it).
    return {
        k: path_segment_text(v, f"Path parameter {k!r}")
        for k, v in match.groupdict().items()
        if v is not None
    }


class Router(Resource):
    """A leaf resource dispatching the rest of the path to handlers.

    No match is 404 ``M_UNRECOGNIZED``; a match with another method is 405,
    with the ``Allow`` header RFC 9110 requires. HEAD is served by the GET
    handler (Twisted drops the body). The same table says, from the request
    line, which requests have a streamed body (:meth:`upload_acceptor`).
    """

    isLeaf = True

    def __init__(self, routes: Sequence[Route]) -> None:
        super().__init__()
        self._routes = list(routes)
        self._streamed_body_methods = frozenset(
            method
            for candidate in self._routes
            if isinstance(candidate.handler, StreamedBody)
            for method in candidate.methods
        )

    @property
    def streamed_body_methods(self) -> frozenset[bytes]:
        return self._streamed_body_methods

    @property
    def routes(self) -> list[Route]:
        return list(self._routes)

    def _find(
        self, method: bytes, path: bytes, depth: int
    ) -> tuple[Route, re.Match[str]] | set[bytes]:
        """The route ``path`` goes to below ``depth`` segments, or the
        methods it would have allowed (none: no route at all)."""
        raw_rest = raw_path_text(b"/".join(path.split(b"/")[depth + 1 :]))
        allowed: set[bytes] = set()
        for candidate in self._routes:
            match = candidate.pattern.fullmatch(raw_rest)
            if match is None:
                continue
            if method not in candidate.methods:
                allowed |= candidate.methods
                continue
            return candidate, match
        return allowed

    def upload_acceptor(
        self, request: MediaRequest, depth: int
    ) -> Callable[[], Coroutine[Any, Any, AcceptedUpload]] | None:
        found = self._find(request.method, request.path, depth)
        if isinstance(found, set):
            return None
        candidate, match = found
        if not isinstance(candidate.handler, StreamedBody):
            return None
        request.endpoint = candidate.name
        accept = candidate.handler.accept
        return lambda: self._accept(accept, request, match)

    @staticmethod
    async def _accept(
        accept: Callable[[MediaRequest, dict[str, str]], Awaitable[AcceptedUpload]],
        request: MediaRequest,
        match: re.Match[str],
    ) -> AcceptedUpload:
        return await accept(request, _path_params(match))

    def render(self, request: MediaRequest) -> Any:
        assert request.prepath is not None  # set by Site.getResourceFor before render
        method = b"GET" if request.method == b"HEAD" else request.method
        found = self._find(method, request.path, len(request.prepath))
        if isinstance(found, set):
            if found:
                respond_error(request, method_not_allowed(found))
            else:
                unrecognized(request)
            return NOT_DONE_YET
        candidate, match = found
        request.endpoint = candidate.name
        try:
            params = _path_params(match)
        except MatrixError as e:
            respond_error(request, e)
            return NOT_DONE_YET
        defer.ensureDeferred(self._run(candidate.handler, request, params))
        return NOT_DONE_YET

    async def _run(
        self, handler: Handler | StreamedBody, request: MediaRequest, params: dict[str, str]
    ) -> None:
        try:
            if isinstance(handler, StreamedBody):
                await handler.store(request, params, _take_upload(request))
            else:
                await handler(request, params)
        except MatrixError as e:
            respond_error(request, e)
        except Exception:
            logger.exception("error handling %s %s", request.method, request.redacted_uri())
            respond_error(request, MatrixError(500, Codes.UNKNOWN, "Internal server error"))
        if not request.finished and not request.disconnected:
            logger.error("handler for %s left the request open", request.redacted_uri())
            request.finish()


def _take_upload(request: MediaRequest) -> AcceptedUpload:
    if request.streamed_upload is None:
        raise MatrixError(400, Codes.UNKNOWN, "Request has no upload body")
    return request.streamed_upload.take()


class UnrecognizedResource(Resource):
    """Any path under an unknown segment: 404 ``M_UNRECOGNIZED``."""

    isLeaf = True

    def render(self, request: MediaRequest) -> Any:
        unrecognized(request)
        return NOT_DONE_YET


class Directory(Resource):
    """An inner node of the tree; unknown children are JSON 404s."""

    def getChild(self, path: bytes, request: Any) -> Resource:
        return UnrecognizedResource()

    def render(self, request: MediaRequest) -> Any:
        unrecognized(request)
        return NOT_DONE_YET


# -- query parameters ---------------------------------------------------------


def query_string(request: MediaRequest, name: str) -> str | None:
    values: list[bytes] | None = request.args.get(name.encode())
    if not values:
        return None
    return request_text(values[0], f"Query parameter {name!r}")


def query_int(request: MediaRequest, name: str, default: int | None = None) -> int:
    value = query_string(request, name)
    if value is None:
        if default is None:
            raise MatrixError(400, Codes.MISSING_PARAM, f"Missing integer query parameter {name!r}")
        return default
    if not re.fullmatch(r"-?[0-9]{1,18}", value):
        raise MatrixError(400, Codes.INVALID_PARAM, f"Query parameter {name!r} must be an integer")
    number = int(value)
    if number < 0:
        raise MatrixError(
            400, Codes.INVALID_PARAM, f"Query parameter {name!r} must be a positive integer."
        )
    return number


def query_bool(request: MediaRequest, name: str, default: bool) -> bool:
    value = query_string(request, name)
    if value is None:
        return default
    if value == "true":
        return True
    if value == "false":
        return False
    raise MatrixError(
        400,
        Codes.INVALID_PARAM,
        f"Boolean query parameter {name!r} must be one of ['true', 'false']",
    )
