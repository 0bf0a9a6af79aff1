"""The Twisted ``Site`` and ``Request`` of a listener.

:class:`MediaRequest` decides where a request body goes as soon as the
headers are in: the body of a route that takes a streamed body (an upload)
is accepted or refused from the headers, then streams into an
:class:`UploadSink` (see ``http/upload_body.py``); any other body is kept
small. A body over its limit, by ``Content-Length`` or while streaming, or
an upload refused, is answered at once and never stored.

The request line is read off the channel as Twisted parses it
(:meth:`MediaChannel.lineReceived`), as Twisted tells a request its line
only once the body is in.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, cast, runtime_checkable
from urllib.parse import unquote_to_bytes

from prometheus_client import Counter, Histogram
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from mediarepo.errors import Codes, MatrixError
from mediarepo.http.headers import CORS_HEADERS, JSON_CACHE_CONTROL, reason_phrase
from mediarepo.http.upload_body import AcceptedUpload, StreamedUpload, uploads_rejected
from mediarepo.media.upload_sink import UploadSink

logger = logging.getLogger("mediarepo.access")

requests_total = Counter(
    "mediarepo_http_requests_total",
    "HTTP requests answered",
    ["endpoint", "method", "code"],
)
response_seconds = Histogram(
    "mediarepo_http_response_seconds",
    "Time from the end of the request headers to the end of the response",
    ["endpoint"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
# Bodies of requests other than uploads are small JSON documents.
NON_UPLOAD_BODY_LIMIT = 1024 * 1024
# After an early 413 the rest of the body is read and dropped for a while so
# the client sees the answer rather than a reset; then the connection goes.
_REJECTED_BODY_DISCARD_LIMIT = 64 * 1024 * 1024
_REJECTED_BODY_LINGER_SECONDS = 5.0

_TOKEN_IN_QUERY = re.compile(rb"(access_token=)[^&]*")

# While a large upload body arrives its connection reads up to this much at
# a time instead of SOCKET_READ_BYTES: a 20 MiB body then passes through the
# HTTP parser, this request and the upload's queue in about 20 pieces rather
# than 80. Other requests keep the smaller reads (each read allocates its
# full size first).
LARGE_BODY_READ_BYTES = 1024 * 1024


@runtime_checkable
class TakesStreamedBody(Protocol):
    """A leaf resource whose routes may take a streamed body (``http/server.py``'s
    ``Router``): asked from the request line and the headers, before the body."""

    @property
    def streamed_body_methods(self) -> frozenset[bytes]:
        """The methods of its routes that take a streamed body."""
        ...

    def upload_acceptor(
        self, request: MediaRequest, depth: int
    ) -> Callable[[], Coroutine[Any, Any, AcceptedUpload]] | None:
        """How to accept the body of ``request``, if its route takes a
        streamed body; ``depth`` path segments led to this resource."""
        ...


class _Transport(Protocol):
    """What is used of a connected channel's TCP transport, which Twisted
    types as a bare ``ITransport`` (no producer or half-close methods)."""

    def write(self, data: bytes) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def loseConnection(self) -> None: ...
    def loseWriteConnection(self) -> None: ...
    def abortConnection(self) -> None: ...


class _RefusedBody:
    """A body answered before it was read: what still arrives is dropped,
    up to a limit, until the linger runs out and the connection goes."""

    def __init__(self, transport: _Transport, reactor: IReactorTime) -> None:
        self._transport = transport
        self._discarded = 0
        self._linger = reactor.callLater(_REJECTED_BODY_LINGER_SECONDS, transport.abortConnection)

    def discard(self, length: int) -> None:
        self._discarded += length
        if self._discarded > _REJECTED_BODY_DISCARD_LIMIT:
            self._transport.abortConnection()

    def stop_lingering(self) -> None:
        if self._linger.active():
            self._linger.cancel()


class MediaRequest(Request):
    site: MediaSite

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Twisted sets `site` only when processing starts; the body arrives before.
        self.site = cast(MediaChannel, self.channel).site
        self.endpoint = "unknown"
        self.disconnected = False
        # The body of an upload route, from its headers on.
        self.streamed_upload: StreamedUpload | None = None
        # The Content-Length of the request, when it had one.
        self.declared_length: int | None = None
        self._body_limit = NON_UPLOAD_BODY_LIMIT
        self._body_received = 0
        self._refused: _RefusedBody | None = None
        # The connection's read size before a large body enlarged it.
        self._default_read_size: int | None = None
        self._start = time.monotonic()

    # -- receiving the body -------------------------------------------------

    def request_line_received(self, method: bytes, uri: bytes) -> None:
        """The request line, known (unlike in Twisted) before the headers
        and the body, for the checks made before the body is read."""
        self.method = method
        self.uri = uri
        self.path, _, query = uri.partition(b"?")
        # Twisted parses the query only once the body is in; the checks made
        # before accepting the body (the access token) need it now.
        self.args = http.parse_qs(query, keep_blank_values=True)

    def gotLength(self, length: int | None) -> None:
        self.declared_length = length
        accept = self.site.upload_acceptor(self)
        self._body_limit = self.site.max_upload_size if accept else NON_UPLOAD_BODY_LIMIT
        if length is not None and length > self._body_limit:
            self.content = io.BytesIO()
            self._reject_body(accept is not None, "content_length")
            return
        if accept is None:
            super().gotLength(length)
            return
        self.content = io.BytesIO()
        if length is not None and length >= LARGE_BODY_READ_BYTES:
            self._set_read_size(LARGE_BODY_READ_BYTES)
        self.streamed_upload = StreamedUpload(
            accept(), self._transport, self.site.abandon_upload, self._refuse_upload
        )

    def _set_read_size(self, size: int) -> None:
        """Read the connection ``size`` bytes at a time (plain TCP only: the
        TLS wrapper has no such setting), remembering the size it had."""
        transport = self.channel.transport
        current = getattr(transport, "bufferSize", None)
        if isinstance(current, int):
            if self._default_read_size is None:
                self._default_read_size = current
            transport.bufferSize = size  # type: ignore[union-attr]

    def _restore_read_size(self) -> None:
        if self._default_read_size is not None and self.channel is not None:
            self._set_read_size(self._default_read_size)
            self._default_read_size = None

    @property
    def _transport(self) -> _Transport:
        return cast(_Transport, self.channel.transport)

    def _refuse_upload(self, error: MatrixError) -> None:
        self._refuse_early(error, f"upload refused ({error.errcode})")

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused is not None:
            self._refused.discard(len(data))
            return
        self._body_received += len(data)
        if self._body_received > self._body_limit:
            self._reject_body(self.streamed_upload is not None, "stream")
        elif self.streamed_upload is not None:
            self.streamed_upload.write(data)
        else:
            super().handleContentChunk(data)

    def _reject_body(self, is_upload: bool, reason: str) -> None:
        """Answer 413 now, before the body is read, and drop the connection."""
        if is_upload:
            uploads_rejected.labels("too_large").inc()
        message = (
            "Upload request body is too large"
            if is_upload
            else f"Request content is too large (>{self._body_limit})"
        )
        self._refuse_early(
            MatrixError(413, Codes.TOO_LARGE, message),
            f"refused a body over {self._body_limit} bytes ({reason})",
        )

    def _refuse_early(self, error: MatrixError, log_message: str) -> None:
        """Answer ``error`` before the body is read, and drop the connection
        once the client has had time to read the answer."""
        if self.streamed_upload is not None:
            self.streamed_upload.abandon()
        # No "100 Continue" for a body we refuse.
        self.requestHeaders.removeHeader(b"Expect")
        body = json.dumps(error.to_json()).encode()
        head = [b"HTTP/1.1 %d %s" % (error.code, reason_phrase(error.code))]
        head += [f"{k}: {v}".encode() for k, v in CORS_HEADERS.items()]
        head += [f"{k}: {v}".encode() for k, v in error.headers.items()]
        head += [
            b"Content-Type: application/json",
            b"Cache-Control: " + JSON_CACHE_CONTROL.encode(),
            b"Content-Length: %d" % len(body),
            b"Connection: close",
        ]
        transport = self._transport
        transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        requests_total.labels(
            self.endpoint, self.method.decode("ascii", "replace"), str(error.code)
        ).inc()
        logger.info("%s - %s", self.client_ip(), log_message)
        # Half-close: the client reads our answer and EOF, while what it still
        # sends is read and dropped until the linger runs out.
        if hasattr(transport, "loseWriteConnection"):
            transport.loseWriteConnection()
        self._refused = _RefusedBody(transport, self.site.reactor)
        # Reading was paused while the upload was being accepted.
        transport.resumeProducing()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        # The next request on this connection starts with the default again.
        self._restore_read_size()
        if self._refused is not None:
            self._transport.loseConnection()
            return
        if self.streamed_upload is not None:
            self.streamed_upload.body_complete(
                lambda: super(MediaRequest, self).requestReceived(command, path, version)
            )
            return
        super().requestReceived(command, path, version)

    def connectionLost(self, reason: Failure) -> None:
        self.disconnected = True
        if self._refused is not None:
            self._refused.stop_lingering()
        if self.streamed_upload is not None:
            # Nobody took the body (it never arrived whole): roll it back.
            self.streamed_upload.abandon()
        super().connectionLost(reason)

    # -- answering ----------------------------------------------------------

    def process(self) -> None:
        self._start = time.monotonic()
        self.notifyFinish().addBoth(self._finished)
        for name, value in CORS_HEADERS.items():
            self.setHeader(name, value)
        if self.method == b"OPTIONS":
            # CORS pre-flight, for any path, without running endpoint logic.
            self.endpoint = "options"
            self.setResponseCode(204)
            self.setHeader(b"Content-Length", b"0")
            self.finish()
            return
        super().process()

    def _finished(self, result: object) -> None:
        duration = time.monotonic() - self._start
        requests_total.labels(
            self.endpoint, self.method.decode("ascii", "replace"), str(self.code)
        ).inc()
        response_seconds.labels(self.endpoint).observe(duration)
        logger.info(
            "%s - %.3fsec %d %s %s (%d bytes)%s",
            self.client_ip(),
            duration,
            self.code,
            self.method.decode("ascii", "replace"),
            self.redacted_uri(),
            self.sentLength,
            " [client went away]" if isinstance(result, Failure) else "",
        )

    def redacted_uri(self) -> str:
        return _TOKEN_IN_QUERY.sub(rb"\1<redacted>", self.uri).decode("ascii", "replace")

    def getClientAddress(self) -> IAddress:
        address: IAddress = super().getClientAddress()
        if self.site.x_forwarded:
            forwarded = self.requestHeaders.getRawHeaders(b"X-Forwarded-For")
            if forwarded:
                host = forwarded[0].split(b",")[0].strip().decode("ascii", "replace")
                address_type = IPv6Address if ":" in host else IPv4Address
                return cast(IAddress, address_type("TCP", host, 0))
        return address

    def client_ip(self) -> str:
        address = self.getClientAddress()
        return str(getattr(address, "host", "-"))


SOCKET_READ_BYTES = 256 * 1024

# At shutdown, how long clients get to take the answers already written
# before their connections are cut.
CLOSE_FLUSH_SECONDS = 2.0


class MediaChannel(http.HTTPChannel):
    """An HTTP/1.1 connection that its site knows about, so that a shutdown
    can close the connections still open."""

    site: MediaSite
    _host: IAddress | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.channels.add(self)
        # Larger reads for upload bodies (one system call and one trip
        # through the HTTP parser per 256 KiB, not per 64 KiB).
        if self.transport is not None and hasattr(self.transport, "bufferSize"):
            self.transport.bufferSize = SOCKET_READ_BYTES

    def lineReceived(self, line: bytes) -> None:
        requests = len(self.requests)
        super().lineReceived(line)
        if len(self.requests) > requests:
            # That was a request line: tell its request now (Twisted keeps it
            # to itself until the body is in).
            parts = line.split()
            if len(parts) == 3:
                cast(MediaRequest, self.requests[-1]).request_line_received(parts[0], parts[1])

    def getHost(self) -> IAddress:
        # Asked by every request; the local address of a connection does
        # not change, so one getsockname() call is enough.
        if self._host is None:
            self._host = cast(IAddress, super().getHost())
        return self._host

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.site.channel_closed(self)
        super().connectionLost(reason)


def _streamed_body_methods(resource: IResource) -> frozenset[bytes]:
    """The methods that routes anywhere under ``resource`` take a streamed body with."""
    if isinstance(resource, TakesStreamedBody):
        return resource.streamed_body_methods
    children: dict[bytes, IResource] = getattr(resource, "children", {})
    methods: frozenset[bytes] = frozenset()
    for child in children.values():
        methods |= _streamed_body_methods(child)
    return methods


class MediaSite(Site):
    """One listener's site; finds, from the request line, the requests whose
    route takes a streamed body."""

    requestFactory = MediaRequest
    # Plain HTTP/1.1 (the reverse proxy in front speaks it); Twisted's
    # annotation names only its HTTP/2-negotiating default.
    protocol = MediaChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: IResource,
        reactor: IReactorTime,
        *,
        max_upload_size: int,
        x_forwarded: bool,
        abandon_upload: Callable[[UploadSink], object],
    ) -> None:
        super().__init__(resource, reactor=reactor, timeout=60)
        self.reactor = reactor
        self.max_upload_size = max_upload_size
        self.x_forwarded = x_forwarded
        self.abandon_upload = abandon_upload
        self.noisy = False
        self.channels: set[MediaChannel] = set()
        # Fired when the last connection closes, while a shutdown waits for it.
        self._all_closed: defer.Deferred[None] | None = None
        # Only requests with these methods can go to a route that takes a
        # streamed body: the others (downloads) are not looked up twice.
        self._streamed_body_methods = _streamed_body_methods(resource)

    def upload_acceptor(
        self, request: MediaRequest
    ) -> Callable[[], Coroutine[Any, Any, AcceptedUpload]] | None:
        """How to accept the body of ``request``, if its route takes a
        streamed body: the resource tree walked as Twisted will walk it."""
        if request.method not in self._streamed_body_methods:
            return None
        resource = self.resource
        segments = request.path[1:].split(b"/")
        depth = 0
        while depth < len(segments) and not resource.isLeaf:
            resource = resource.getChildWithDefault(unquote_to_bytes(segments[depth]), request)
            depth += 1
        if isinstance(resource, TakesStreamedBody):
            return resource.upload_acceptor(request, depth)
        return None

    async def close_connections(self) -> None:
        """Close every connection still open (at shutdown, once uploads are
        settled). What was answered is sent first: an upload answered just
        now must reach its client. A connection whose client has not taken
        its answer within ``CLOSE_FLUSH_SECONDS`` is cut."""
        if not self.channels:
            return
        self._all_closed = defer.Deferred()
        self._all_closed.addTimeout(CLOSE_FLUSH_SECONDS, self.reactor)
        for channel in list(self.channels):
            cast(_Transport, channel.transport).loseConnection()
        try:
            await self._all_closed
        except defer.TimeoutError:
            pass
        finally:
            self._all_closed = None
        for channel in list(self.channels):
            cast(_Transport, channel.transport).abortConnection()

    def channel_closed(self, channel: MediaChannel) -> None:
        self.channels.discard(channel)
        if not self.channels and self._all_closed is not None and not self._all_closed.called:
            self._all_closed.callback(None)

    def log(self, request: http.Request) -> None:
        # MediaRequest logs itself, with the access token redacted.
        pass
