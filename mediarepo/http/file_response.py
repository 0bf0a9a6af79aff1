"""Writing a stored file as an HTTP response: conditional requests, byte ranges, HEAD."""

from __future__ import annotations

import logging
import re

import attrs

from mediarepo.errors import Codes, MatrixError
from mediarepo.federation.multipart import (
    multipart_content_type,
    multipart_head,
    multipart_redirect,
    multipart_tail,
    new_boundary,
)
from mediarepo.http.headers import (
    JSON_CACHE_CONTROL,
    MEDIA_CACHE_CONTROL,
    MEDIA_ETAG,
    content_disposition,
    response_content_type,
    set_media_headers,
    thumbnail_content_disposition,
)
from mediarepo.http.sendfile import can_sendfile, send_file
from mediarepo.http.server import respond_error
from mediarepo.http.site import MediaRequest
from mediarepo.media.provider_chain import StoredFile
from mediarepo.media.repository import MediaRepository
from mediarepo.media.responder import FileResponder, Responder, bytes_served

logger = logging.getLogger(__name__)

# RFC 9110's DIGIT and OWS are ASCII; Python's \d and \s are not.
_SINGLE_RANGE = re.compile(r"\Abytes=[ \t]*([0-9]*)[ \t]*-[ \t]*([0-9]*)[ \t]*\Z")
# Past any file's size, and short enough for int() (which refuses over 4300 digits).
_BEYOND_ANY_FILE = 10**18


@attrs.frozen
class ByteRange:
    start: int
    length: int


class UnsatisfiableRange(Exception):
    pass


def _position(digits: str) -> int:
    """A byte position from the header; any too long to be an offset in a
    file counts as one past every file."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else _BEYOND_ANY_FILE


def _order(digits: str) -> tuple[int, str]:
    """Sorts as the numbers do, however long."""
    digits = digits.lstrip("0")
    return len(digits), digits


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The one byte range a ``Range`` header asks for, or ``None`` for the
    whole file. Malformed and multi-range headers are ignored, as RFC 9110
    allows; a range starting past the end raises :class:`UnsatisfiableRange`."""
    if header is None:
        return None
    match = _SINGLE_RANGE.match(header)
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if not first and not last:
        return None
    if not first:
        suffix = _position(last)
        if suffix == 0 or size == 0:
            raise UnsatisfiableRange()
        suffix = min(suffix, size)
        return ByteRange(size - suffix, suffix)
    start = _position(first)
    if last and _order(last) < _order(first):
        return None
    if start >= size:
        raise UnsatisfiableRange()
    end = _position(last) if last else size - 1
    end = min(end, size - 1)
    return ByteRange(start, end - start + 1)


def _header(request: MediaRequest, name: bytes) -> str | None:
    value = request.getHeader(name)
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _answered_not_modified(request: MediaRequest) -> bool:
    """Answer 304 if the client has the file already (media never changes)."""
    if _header(request, b"If-None-Match") != MEDIA_ETAG:
        return False
    request.setResponseCode(304)
    request.setHeader("Cache-Control", MEDIA_CACHE_CONTROL)
    request.setHeader("ETag", MEDIA_ETAG)
    request.finish()
    return True


async def _stream(request: MediaRequest, responder: Responder, start: int, length: int) -> bool:
    """Write ``length`` bytes of ``responder`` from ``start``; whether the
    response can go on (the client is still there and every byte went)."""
    if request.disconnected or request.channel is None:
        return False
    if length:
        try:
            if can_sendfile(request, responder, length):
                assert isinstance(responder, FileResponder)
                await send_file(request, responder, start, length)
            else:
                await responder.write_to_consumer(request, start, length)
            bytes_served.inc(length)
        except ConnectionError:
            # The client went away (the transport stopped the producer
            # before the request hears of the lost connection).
            request.disconnected = True
            return False
        except OSError:
            logger.exception("reading media failed mid-response")
            if request.channel is not None:
                request.channel.transport.abortConnection()  # type: ignore[union-attr]
            return False
    return not request.disconnected


async def respond_with_responder(
    request: MediaRequest,
    responder: Responder,
    media_type: str | None,
    filename: str | None,
    *,
    thumbnail: bool = False,
) -> None:
    """Stream ``responder`` as the response, then close it (a client that
    has the file already was answered before it was opened)."""
    try:
        size = responder.size
        range_header = _header(request, b"Range")
        if_range = _header(request, b"If-Range")
        if if_range is not None and if_range != MEDIA_ETAG:
            range_header = None
        try:
            byte_range = parse_range(range_header, size)
        except UnsatisfiableRange:
            request.setHeader("Content-Range", f"bytes */{size}")
            respond_error(
                request,
                MatrixError(416, Codes.INVALID_PARAM, "Requested range is not satisfiable"),
            )
            return

        start, length = (0, size) if byte_range is None else (byte_range.start, byte_range.length)
        set_media_headers(request, media_type, filename, length, thumbnail=thumbnail)
        if byte_range is not None:
            request.setResponseCode(206)
            request.setHeader("Content-Range", f"bytes {start}-{start + length - 1}/{size}")
        if request.method == b"HEAD" or length == 0:
            request.finish()
            return
        if await _stream(request, responder, start, length):
            request.finish()
    finally:
        responder.close()


async def respond_with_multipart(
    request: MediaRequest, responder: Responder, media_type: str | None, disposition: str
) -> None:
    """Stream ``responder`` as the file part of a federation ``multipart/mixed``
    answer (a JSON metadata part first), then close it."""
    try:
        if _answered_not_modified(request):
            return
        boundary = new_boundary()
        head = multipart_head(boundary, media_type or "application/octet-stream", disposition)
        tail = multipart_tail(boundary)
        request.setHeader("Content-Type", multipart_content_type(boundary))
        request.setHeader("Content-Length", str(len(head) + responder.size + len(tail)))
        request.setHeader("Cache-Control", MEDIA_CACHE_CONTROL)
        request.setHeader("ETag", MEDIA_ETAG)
        if request.method == b"HEAD":
            request.finish()
            return
        request.write(head)
        if await _stream(request, responder, 0, responder.size):
            request.write(tail)
            request.finish()
    finally:
        responder.close()


async def redirect_location(
    repository: MediaRepository,
    file: StoredFile,
    media_type: str | None,
    disposition: str,
) -> str | None:
    """Where the client may be sent for ``file``, with the Content-Type our
    own answer would carry and ``disposition``; ``None`` if the bytes are
    to come from here."""
    return await repository.redirect_url(file, response_content_type(media_type), disposition)


async def respond_with_file_or_redirect(
    request: MediaRequest,
    repository: MediaRepository,
    file: StoredFile,
    media_type: str | None,
    filename: str | None,
    *,
    allow_redirect: bool,
    thumbnail: bool = False,
) -> None:
    """A 307 to a provider's copy of the file where the client allows it and
    the provider offers it; otherwise the bytes (see :func:`respond_with_responder`).
    The Location serves the headers our own answer would have. The file is
    opened only to serve its bytes: a redirect reads nothing."""
    if _answered_not_modified(request):
        return
    if allow_redirect:
        disposition = (
            thumbnail_content_disposition(media_type)
            if thumbnail
            else content_disposition(media_type, filename)
        )
        url = await redirect_location(repository, file, media_type, disposition)
        if url is not None:
            request.setResponseCode(307)
            request.setHeader("Location", url)
            # The URL may expire: the redirect itself is not to be kept.
            request.setHeader("Cache-Control", JSON_CACHE_CONTROL)
            request.setHeader("Content-Length", "0")
            request.finish()
            return
    responder = await file.open()
    await respond_with_responder(request, responder, media_type, filename, thumbnail=thumbnail)


def respond_with_multipart_redirect(request: MediaRequest, location: str) -> None:
    """A federation ``multipart/mixed`` answer whose file part is only a
    ``Location`` (which the spec says is not to be cached)."""
    boundary = new_boundary()
    body = multipart_redirect(boundary, location)
    request.setHeader("Content-Type", multipart_content_type(boundary))
    request.setHeader("Content-Length", str(len(body)))
    request.setHeader("Cache-Control", JSON_CACHE_CONTROL)
    if request.method != b"HEAD":
        request.write(body)
    request.finish()
