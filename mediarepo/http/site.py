"""The Twisted ``Site`` and ``Request`` of a listener.

:class:`MediaRequest` decides where a request body goes as soon as the
headers are in: an upload body streams into an :class:`UploadSink` in the
media store (written and hashed off the reactor), any other body is kept
small. A body over its limit, by ``Content-Length`` or while streaming, is
answered with 413 at once and never stored.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, cast

import attrs
from prometheus_client import Counter, Histogram
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from mediarepo.errors import Codes, MatrixError
from mediarepo.http.headers import CORS_HEADERS, JSON_CACHE_CONTROL, reason_phrase
from mediarepo.media.upload_sink import UploadSink
from mediarepo.values import Requester

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
uploads_rejected = Counter(
    "mediarepo_uploads_rejected_total", "Uploads refused before being stored", ["reason"]
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


@attrs.frozen
class UploadTarget:
    """Where an upload's body goes, read off the request line: new media,
    or the content of a reserved media ID (``PUT .../upload/{server}/{id}``),
    its path segments as received (decoded by the handler, which can refuse them)."""

    server_name: str | None = None
    media_id: str | None = None


class _Transport(Protocol):
    """What is used of a connected channel's TCP transport, which Twisted
    types as a bare ``ITransport`` (no producer or half-close methods)."""

    def write(self, data: bytes) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def loseConnection(self) -> None: ...
    def loseWriteConnection(self) -> None: ...
    def abortConnection(self) -> None: ...


class MediaRequest(Request):
    site: MediaSite

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Twisted sets `site` only when processing starts; the body arrives before.
        self.site = self.channel.site  # type: ignore[attr-defined]
        self.upload: UploadSink | None = None
        # Who sent an upload, when it was authenticated before its body.
        self.requester: Requester | None = None
        self.endpoint = "unknown"
        self.disconnected = False
        self._body_limit = NON_UPLOAD_BODY_LIMIT
        self._body_received = 0
        self._body_rejected = False
        self._body_complete = False
        self._discarded = 0
        self._linger: IDelayedCall | None = None
        self._start = time.monotonic()
        # While an upload is being checked before its body is accepted:
        self._upload_starting: defer.Deferred[UploadSink] | None = None
        self._early_chunks: list[bytes] = []
        self._received_request: tuple[bytes, bytes, bytes] | None = None
        self._upload_error: MatrixError | None = None
        # The Content-Length of the request, when it had one.
        self.declared_length: int | None = None
        # The connection's read size before a large body enlarged it.
        self._default_read_size: int | None = None

    # -- receiving the body -------------------------------------------------

    def gotLength(self, length: int | None) -> None:
        channel = self.channel
        command = getattr(channel, "_command", b"")
        path = getattr(channel, "_path", b"")
        target = self.site.upload_target(command, path)
        is_upload = target is not None
        self.declared_length = length
        self._body_limit = self.site.max_upload_size if is_upload else NON_UPLOAD_BODY_LIMIT
        if length is not None and length > self._body_limit:
            self.content = io.BytesIO()
            self._reject_body(is_upload, "content_length")
            return
        if target is None:
            super().gotLength(length)
            return
        self.content = io.BytesIO()
        if length is not None and length >= LARGE_BODY_READ_BYTES:
            self._set_read_size(LARGE_BODY_READ_BYTES)
        # Twisted parses the query only once the body is in; the checks made
        # before accepting the body (the access token) need it now.
        self.args = http.parse_qs(path.partition(b"?")[2], keep_blank_values=True)
        starting: defer.Deferred[UploadSink] = defer.ensureDeferred(
            self.site.begin_upload(self, target)
        )
        if not starting.called:
            # Read no body until the upload is accepted.
            cast(_Transport, channel.transport).pauseProducing()
            self._upload_starting = starting
        starting.addCallbacks(self._upload_accepted, self._upload_refused)

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

    def _upload_accepted(self, sink: UploadSink) -> None:
        self._upload_starting = None
        if self.disconnected:
            self.site.abandon_upload(sink)
            return
        self.upload = sink
        sink.set_flow_control(cast(_Transport, self.channel.transport).pauseProducing,
                              self._resume_body)  # fmt: skip
        for chunk in self._early_chunks:
            sink.write(chunk)
        self._early_chunks = []
        self._resume_body()
        self._process_received_request()

    def _upload_refused(self, failure: Failure) -> None:
        self._upload_starting = None
        error = failure.value
        if not isinstance(error, MatrixError):
            logger.error("checking an upload failed", exc_info=failure.getTracebackObject())
            error = MatrixError(500, Codes.UNKNOWN, "Internal server error")
        self._early_chunks = []
        if self.disconnected:
            return
        if self._received_request is not None or self._body_complete:
            # The body is in already (it was empty): answer the usual way;
            # the handler raises this error when it asks for the upload.
            self._upload_error = error
            self._process_received_request()
        else:
            uploads_rejected.labels(error.errcode).inc()
            self._refuse_early(error, "upload", f"upload refused ({error.errcode})")

    def _process_received_request(self) -> None:
        received, self._received_request = self._received_request, None
        if received is not None:
            super().requestReceived(*received)

    def _resume_body(self) -> None:
        # Once the whole body is in, the channel pauses the transport itself
        # until the response is done; resuming it then would break that.
        if self.channel is not None and not self._body_complete:
            cast(_Transport, self.channel.transport).resumeProducing()

    def handleContentChunk(self, data: bytes) -> None:
        if self._body_rejected:
            self._discarded += len(data)
            if self._discarded > _REJECTED_BODY_DISCARD_LIMIT:
                cast(_Transport, self.channel.transport).abortConnection()
            return
        self._body_received += len(data)
        if self._body_received > self._body_limit:
            self._reject_body(self.upload is not None, "stream")
            return
        if self.upload is not None:
            self.upload.write(data)
        elif self._upload_starting is not None:
            # What arrived with the headers, before the transport paused.
            self._early_chunks.append(data)
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
            "upload" if is_upload else "unknown",
            f"refused a body over {self._body_limit} bytes ({reason})",
        )

    def _refuse_early(self, error: MatrixError, endpoint: str, log_message: str) -> None:
        """Answer ``error`` before the body is read, and drop the connection
        once the client has had time to read the answer."""
        self._body_rejected = True
        if self.upload is not None:
            self.site.abandon_upload(self.upload)
            self.upload = None
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
        transport = cast(_Transport, self.channel.transport)
        transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        requests_total.labels(
            endpoint, self.method.decode("ascii", "replace"), str(error.code)
        ).inc()
        logger.info("%s - %s", self.client_ip(), log_message)
        # Half-close: the client reads our answer and EOF, while what it still
        # sends is read and dropped until the linger runs out.
        if hasattr(transport, "loseWriteConnection"):
            transport.loseWriteConnection()
        self._linger = self.site.reactor.callLater(
            _REJECTED_BODY_LINGER_SECONDS, transport.abortConnection
        )

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._body_complete = True
        # The next request on this connection starts with the default again.
        self._restore_read_size()
        if self._body_rejected:
            cast(_Transport, self.channel.transport).loseConnection()
            return
        if self._upload_starting is not None:
            # Processed once the upload is accepted or refused.
            self._received_request = (command, path, version)
            return
        super().requestReceived(command, path, version)

    def connectionLost(self, reason: Failure) -> None:
        self.disconnected = True
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        if self.upload is not None:
            # Nobody took the body (it never arrived whole): roll it back.
            self.site.abandon_upload(self.upload)
            self.upload = None
        super().connectionLost(reason)

    def take_upload(self) -> UploadSink:
        """Hand the received body over to the caller, who must finish or abandon it."""
        if self._upload_error is not None:
            raise self._upload_error
        upload = self.upload
        if upload is None:
            raise MatrixError(400, Codes.UNKNOWN, "Request has no upload body")
        self.upload = None
        return upload

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

    def getHost(self) -> IAddress:
        # Asked by every request; the local address of a connection does
        # not change, so one getsockname() call is enough.
        if self._host is None:
            self._host = cast(IAddress, super().getHost())
        return self._host

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.site.channels.discard(self)
        super().connectionLost(reason)


class MediaSite(Site):
    """One listener's site; knows which requests are uploads."""

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
        upload_target: Callable[[bytes, bytes], UploadTarget | None],
        begin_upload: Callable[[MediaRequest, UploadTarget], Coroutine[Any, Any, UploadSink]],
        abandon_upload: Callable[[UploadSink], object],
    ) -> None:
        super().__init__(resource, reactor=reactor, timeout=60)
        self.reactor = reactor
        self.max_upload_size = max_upload_size
        self.x_forwarded = x_forwarded
        self.upload_target = upload_target
        self.begin_upload = begin_upload
        self.abandon_upload = abandon_upload
        self.noisy = False
        self.channels: set[MediaChannel] = set()

    def close_connections(self) -> None:
        """Cut every connection still open (at shutdown, once uploads are settled)."""
        for channel in list(self.channels):
            cast(_Transport, channel.transport).abortConnection()

    def log(self, request: http.Request) -> None:
        # MediaRequest logs itself, with the access token redacted.
        pass
