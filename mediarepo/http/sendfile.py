"""Large files on plain TCP connections go out with ``sendfile(2)``: the
kernel copies them from the page cache to the socket, and no byte passes
through Python (nginx serves static files the same way).

The headers go through Twisted as usual; once the transport's own buffer is
empty, a writer of ours, registered with the reactor for a duplicate of the
socket's descriptor, sends the file a piece at a time whenever the socket can
take more. TLS connections, and anything not a file on local disk, keep the
threaded producer (``mediarepo.media.responder``).

One thing is read off Twisted that it does not publish: how much of the
headers still waits in the transport's buffer (``dataBuffer``, ``offset``
and the private ``_tempDataLen`` of ``FileDescriptor``). It cannot be
avoided: sendfile must not write before those bytes are out, and Twisted
only tells a *paused* producer that its buffer drained (the HTTP channel is
already the transport's producer, and a few hundred bytes of headers never
pause it). :func:`can_sendfile` checks that the attributes are there, so a
Twisted without them serves the file with the threaded producer instead.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, tcp
from twisted.internet.interfaces import IWriteDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from mediarepo.http.site import MediaRequest
from mediarepo.media.responder import FileResponder, Responder

# Below this a file is sent the usual way (the set-up costs more than it saves).
SENDFILE_MIN_BYTES = 256 * 1024
# At most this much per system call, so other connections get their turn.
_PIECE = 4 * 1024 * 1024


def can_sendfile(request: MediaRequest, responder: Responder, length: int) -> bool:
    transport = getattr(request.channel, "transport", None)
    return (
        length >= SENDFILE_MIN_BYTES
        and isinstance(responder, FileResponder)
        and isinstance(transport, tcp.Server)
        and hasattr(os, "sendfile")
        # The buffer the headers wait in (twisted.internet.abstract.FileDescriptor).
        and all(hasattr(transport, a) for a in ("dataBuffer", "offset", "_tempDataLen"))
    )


async def send_file(
    request: MediaRequest, responder: FileResponder, start: int, length: int
) -> None:
    """Write the headers, then ``length`` bytes from ``start`` with sendfile;
    raises ConnectionError if the client goes away."""
    request.write(b"")  # the status line and headers, into the transport's buffer
    channel: Any = request.channel
    writer = _SendfileWriter(channel, request, responder.fileno(), start, length)
    await writer.run()


@implementer(IWriteDescriptor)
class _SendfileWriter:
    def __init__(
        self, channel: Any, request: MediaRequest, in_fd: int, start: int, length: int
    ) -> None:
        self._channel = channel
        self._transport: Any = channel.transport
        self._reactor: Any = self._transport.reactor
        self._request = request
        self._in = in_fd
        self._offset = start
        self._remaining = length
        self._out = os.dup(self._transport.fileno())
        self._done: defer.Deferred[None] = defer.Deferred()

    def fileno(self) -> int:
        return self._out

    def logPrefix(self) -> str:
        return "sendfile"

    async def run(self) -> None:
        self._reactor.addWriter(self)
        await self._done

    def _transport_busy(self) -> bool:
        t = self._transport
        return bool(len(t.dataBuffer) - t.offset or t._tempDataLen)

    def doWrite(self) -> None:
        if self._done.called:
            return
        if self._transport_busy():
            return  # the headers first; Twisted is flushing them
        try:
            sent = os.sendfile(self._out, self._in, self._offset, min(self._remaining, _PIECE))
        except BlockingIOError:
            return
        except OSError as e:
            self._finish(ConnectionError(f"sendfile: {e}"))
            return
        if sent == 0:
            self._finish(OSError("the file ended before its recorded length"))
            return
        self._offset += sent
        self._remaining -= sent
        self._request.sentLength += sent
        self._channel.resetTimeout()
        if self._remaining <= 0:
            self._finish(None)

    def connectionLost(self, reason: Failure) -> None:
        self._finish(ConnectionError("the client went away"))

    def _finish(self, error: BaseException | None) -> None:
        if self._done.called:
            return
        # Out of the reactor before the duplicate closes: epoll would keep
        # reporting a closed descriptor that still shares the socket.
        self._reactor.removeWriter(self)
        os.close(self._out)
        if error is None:
            self._done.callback(None)
        else:
            self._done.errback(error)
