"""Reading the body of an answer without letting the other side hold us.

Every body we read from another host (media, keys, a well-known file, a
web page) goes through :class:`BodyReader`. It gives up on a peer that sends
nothing for the idle timeout, counted from the last byte received, and on
one that trickles: less than ``min_rate`` bytes a second over a window.
Time during which *we* paused the connection (our disk is behind) counts
against neither. Giving up cuts the connection: the reader calls its
transport's ``stopProducing``, which on connections that
:mod:`mediarepo.outbound.endpoints` made aborts them at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse

from mediarepo.outbound.errors import BodyReadError, BodyTooLargeError, PeerStalledError

# Synapse has no such setting; ours, ``federation_idle_timeout``.
DEFAULT_IDLE_TIMEOUT_SECONDS = 20.0
# A body must average at least MIN_TRANSFER_RATE bytes a second over each
# window of RATE_WINDOW_SECONDS. There is no cap on the total time, so a
# large file on a slow but working link still arrives, while a peer that
# trickles a byte now and then cannot hold a request for ever.
RATE_WINDOW_SECONDS = 60.0
MIN_TRANSFER_RATE = 1024

# Pauses and resumes a body's connection (our side is behind).
FlowControl = Callable[[Callable[[], None], Callable[[], None]], None]


def _cut_connection(transport: Any) -> None:
    """Stop the body: ``stopProducing`` on the body's transport reaches the
    connection, which :mod:`~mediarepo.outbound.endpoints` makes abort
    rather than wait on a peer we have given up on."""
    transport.stopProducing()


class BodyReader(protocol.Protocol):
    """Feeds a response body to ``on_data``; ``done`` fires once it has all
    arrived, or fails with :class:`BodyReadError` (or what ``on_data``
    raised). Cancelling ``done`` cuts the connection."""

    def __init__(
        self,
        on_data: Callable[[bytes], None],
        clock: Any,
        idle_timeout: float,
        *,
        min_rate: int | None = None,
        rate_window: float | None = None,
    ) -> None:
        self._on_data = on_data
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._min_rate = MIN_TRANSFER_RATE if min_rate is None else min_rate
        self._rate_window = RATE_WINDOW_SECONDS if rate_window is None else rate_window
        self.done: defer.Deferred[None] = defer.Deferred(lambda _: self._cut())
        self._idle: IDelayedCall | None = None
        self._rate_check: IDelayedCall | None = None
        self._received_in_window = 0
        self._paused = False

    # ------------------------------------------------------------ timers

    def _start_timers(self) -> None:
        self._received_in_window = 0
        self._idle = self._clock.callLater(self._idle_timeout, self._stalled)
        self._rate_check = self._clock.callLater(self._rate_window, self._check_rate)

    def _stop_timers(self) -> None:
        for call in (self._idle, self._rate_check):
            if call is not None and call.active():
                call.cancel()
        self._idle = self._rate_check = None

    def _stalled(self) -> None:
        self._idle = None
        self.fail(PeerStalledError(f"nothing received for {self._idle_timeout:g} s"))

    def _check_rate(self) -> None:
        self._rate_check = None
        if self._received_in_window < self._min_rate * self._rate_window:
            self.fail(
                PeerStalledError(
                    f"{self._received_in_window} bytes in {self._rate_window:g} s: too slow"
                )
            )
            return
        self._received_in_window = 0
        self._rate_check = self._clock.callLater(self._rate_window, self._check_rate)

    # ------------------------------------------------------------ flow control

    def pause(self) -> None:
        """Stop reading (our side is behind); the peer is not timed meanwhile."""
        self._set_paused(True)

    def resume(self) -> None:
        self._set_paused(False)

    def _set_paused(self, paused: bool) -> None:
        if paused == self._paused or self.done.called:
            return
        self._paused = paused
        if paused:
            self._stop_timers()
        else:
            self._start_timers()
        transport: Any = self.transport
        if transport is not None:
            (transport.pauseProducing if paused else transport.resumeProducing)()

    # ------------------------------------------------------------ protocol

    def connectionMade(self) -> None:
        if self._paused:
            # Paused before the body started: nothing timed until resumed.
            transport: Any = self.transport
            transport.pauseProducing()
            return
        self._start_timers()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._received_in_window += len(data)
        if self._idle is not None:
            self._idle.reset(self._idle_timeout)
        try:
            self._on_data(data)
        except Exception as e:
            self.fail(e)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._stop_timers()
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(BodyReadError(f"connection lost: {reason.getErrorMessage()}"))

    def fail(self, error: Exception) -> None:
        """Give up on the body with ``error``, cutting the connection."""
        self._stop_timers()
        if not self.done.called:
            self.done.errback(error)
        self._cut()

    def _cut(self) -> None:
        self._stop_timers()
        if self.transport is not None:
            _cut_connection(self.transport)


async def read_body(
    response: IResponse,
    on_data: Callable[[bytes], None],
    clock: Any,
    idle_timeout: float,
    *,
    min_rate: int | None = None,
    flow_control: FlowControl | None = None,
) -> None:
    """Read ``response``'s whole body into ``on_data`` (see
    :class:`BodyReader`); ``flow_control``, if given, is handed the
    reader's pause and resume."""
    reader = BodyReader(on_data, clock, idle_timeout, min_rate=min_rate)
    if flow_control is not None:
        flow_control(reader.pause, reader.resume)
    response.deliverBody(reader)
    await reader.done


class _DroppedBody(protocol.Protocol):
    """Receives a body by cutting its connection."""

    def connectionMade(self) -> None:
        _cut_connection(self.transport)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        pass


def drop_body(response: IResponse) -> None:
    """Do not read ``response``'s body (it could be of any size): cut it."""
    response.deliverBody(_DroppedBody())


async def read_limited_body(
    response: IResponse,
    limit: int,
    clock: Any,
    idle_timeout: float,
    *,
    min_rate: int | None = None,
) -> bytes:
    """``response``'s whole body, at most ``limit`` bytes (more:
    :class:`BodyTooLargeError`, without reading on)."""
    if isinstance(response.length, int) and response.length > limit:
        drop_body(response)
        raise BodyTooLargeError(f"over {limit} bytes")
    chunks: list[bytes] = []
    received = 0

    def collect(data: bytes) -> None:
        nonlocal received
        received += len(data)
        if received > limit:
            raise BodyTooLargeError(f"over {limit} bytes")
        chunks.append(data)

    await read_body(response, collect, clock, idle_timeout, min_rate=min_rate)
    return b"".join(chunks)


class _Enough(Exception):
    pass


async def read_body_prefix(
    response: IResponse,
    limit: int,
    clock: Any,
    idle_timeout: float,
    *,
    min_rate: int | None = None,
) -> bytes:
    """The first ``limit`` bytes of ``response``'s body (an error answer,
    read for its message): the connection is cut after them, and what
    arrived is kept if the body breaks or stalls."""
    chunks: list[bytes] = []
    size = 0

    def collect(data: bytes) -> None:
        nonlocal size
        chunks.append(data[: limit - size])
        size += len(chunks[-1])
        if size >= limit:
            raise _Enough()

    try:
        await read_body(response, collect, clock, idle_timeout, min_rate=min_rate)
    except (BodyReadError, _Enough):
        pass
    return b"".join(chunks)
