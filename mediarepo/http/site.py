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
from collections.abc import Callable
from typing import Any, Protocol, cast

from prometheus_client import Counter, Histogram
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from mediarepo.errors import Codes, MatrixError
from mediarepo.http.headers import CORS_HEADERS, JSON_CACHE_CONTROL
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
        self.endpoint = "unknown"
        self.disconnected = False
        self._body_limit = NON_UPLOAD_BODY_LIMIT
        self._body_received = 0
        self._body_rejected = False
        self._body_complete = False
        self._discarded = 0
        self._linger: IDelayedCall | None = None
        self._start = time.monotonic()

    # -- receiving the body -------------------------------------------------

    def gotLength(self, length: int | None) -> None:
        channel = self.channel
        command = getattr(channel, "_command", b"")
        path = getattr(channel, "_path", b"")
        is_upload = self.site.is_upload_request(command, path)
        self._body_limit = self.site.max_upload_size if is_upload else NON_UPLOAD_BODY_LIMIT
        if length is not None and length > self._body_limit:
            self.content = io.BytesIO()
            self._reject_body(is_upload, "content_length")
            return
        if is_upload and self.site.begin_upload is not None:
            self.content = io.BytesIO()
            self.upload = self.site.begin_upload()
            transport = cast(_Transport, channel.transport)
            self.upload.set_flow_control(transport.pauseProducing, self._resume_body)
        else:
            super().gotLength(length)

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
        else:
            super().handleContentChunk(data)

    def _reject_body(self, is_upload: bool, reason: str) -> None:
        """Answer 413 now, before the body is read, and drop the connection."""
        self._body_rejected = True
        if is_upload:
            uploads_rejected.labels("too_large").inc()
        if self.upload is not None:
            self.site.abandon_upload(self.upload)
            self.upload = None
        # No "100 Continue" for a body we refuse.
        self.requestHeaders.removeHeader(b"Expect")
        message = (
            "Upload request body is too large"
            if is_upload
            else f"Request content is too large (>{self._body_limit})"
        )
        body = json.dumps({"errcode": Codes.TOO_LARGE, "error": message}).encode()
        head = [b"HTTP/1.1 413 Request Entity Too Large"]
        head += [f"{k}: {v}".encode() for k, v in CORS_HEADERS.items()]
        head += [
            b"Content-Type: application/json",
            b"Cache-Control: " + JSON_CACHE_CONTROL.encode(),
            b"Content-Length: %d" % len(body),
            b"Connection: close",
        ]
        transport = cast(_Transport, self.channel.transport)
        transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        requests_total.labels("upload" if is_upload else "unknown", "-", "413").inc()
        logger.info(
            "%s - refused a body over %d bytes (%s)", self._client_ip(), self._body_limit, reason
        )
        # Half-close: the client reads our answer and EOF, while what it still
        # sends is read and dropped until the linger runs out.
        if hasattr(transport, "loseWriteConnection"):
            transport.loseWriteConnection()
        self._linger = self.site.reactor.callLater(
            _REJECTED_BODY_LINGER_SECONDS, transport.abortConnection
        )

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._body_complete = True
        if self._body_rejected:
            cast(_Transport, self.channel.transport).loseConnection()
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
            self._client_ip(),
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

    def _client_ip(self) -> str:
        address = self.getClientAddress()
        return str(getattr(address, "host", "-"))


class MediaChannel(http.HTTPChannel):
    """An HTTP/1.1 connection that its site knows about, so that a shutdown
    can close the connections still open."""

    site: MediaSite

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.channels.add(self)

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
        is_upload_request: Callable[[bytes, bytes], bool],
        begin_upload: Callable[[], UploadSink] | None,
        abandon_upload: Callable[[UploadSink], None],
    ) -> None:
        super().__init__(resource, reactor=reactor, timeout=60)
        self.reactor = reactor
        self.max_upload_size = max_upload_size
        self.x_forwarded = x_forwarded
        self.is_upload_request = is_upload_request
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
