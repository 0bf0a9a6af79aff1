"""Reading a peer's body: the idle timeout counts from the last byte, the
rate floor catches trickling, and our own pauses count against neither.
All on a fake clock and transport (giving up stops the transport's
producing: on the client's connections that aborts them, see
test_client)."""

from __future__ import annotations

from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.client import ResponseDone
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from mediarepo.outbound.bodies import BodyReader, read_body_prefix
from mediarepo.outbound.errors import BodyReadError, PeerStalledError

IDLE = 20.0


class BodyReaderTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.received: list[bytes] = []
        self.reader = BodyReader(self.received.append, self.clock, IDLE)
        self.transport = StringTransport()
        self.reader.makeConnection(self.transport)

    def test_idle_counts_from_the_last_byte(self) -> None:
        # Bytes every 15 s for two minutes: never 20 s without one.
        for _ in range(8):
            self.clock.advance(15)
            self.reader.dataReceived(b"x" * 30_000)
        self.assertNoResult(self.reader.done)
        self.clock.advance(IDLE - 0.001)
        self.assertNoResult(self.reader.done)
        self.clock.advance(0.002)
        self.failureResultOf(self.reader.done, PeerStalledError)
        # The connection is cut.
        self.assertEqual(self.transport.producerState, "stopped")

    def test_a_peer_stalling_at_once_is_given_up_on(self) -> None:
        self.clock.advance(IDLE)
        self.failureResultOf(self.reader.done, PeerStalledError)

    def test_whole_body(self) -> None:
        self.reader.dataReceived(b"abc")
        self.clock.advance(5)
        self.reader.dataReceived(b"def")
        self.reader.connectionLost(Failure(ResponseDone()))
        self.successResultOf(self.reader.done)
        self.assertEqual(b"".join(self.received), b"abcdef")
        # No timer is left behind.
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connection_lost_midway(self) -> None:
        self.reader.dataReceived(b"abc")
        self.reader.connectionLost(Failure(ConnectionError("reset")))
        self.failureResultOf(self.reader.done, BodyReadError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_trickling_peer_is_cut_at_the_rate_window(self) -> None:
        # A byte every 10 s is never idle for 20 s, but far below 1 KiB/s.
        for _ in range(5):
            self.clock.advance(10)
            self.reader.dataReceived(b"x")
        self.assertNoResult(self.reader.done)
        self.clock.advance(10)
        failure = self.failureResultOf(self.reader.done, PeerStalledError)
        self.assertIn("too slow", str(failure.value))

    def test_our_pauses_are_not_the_peers_fault(self) -> None:
        self.reader.dataReceived(b"x" * 100_000)
        self.reader.pause()
        self.assertEqual(self.transport.producerState, "paused")
        # Our disk takes five minutes to catch up.
        self.clock.advance(300)
        self.assertNoResult(self.reader.done)
        self.reader.resume()
        self.assertEqual(self.transport.producerState, "producing")
        # From the resumption the peer is timed again.
        self.clock.advance(IDLE - 1)
        self.assertNoResult(self.reader.done)
        self.clock.advance(1)
        self.failureResultOf(self.reader.done, PeerStalledError)

    def test_consumer_error_fails_the_body(self) -> None:
        def refuse(data: bytes) -> None:
            raise ValueError("too large")

        clock = Clock()
        reader = BodyReader(refuse, clock, IDLE)
        reader.makeConnection(StringTransport())
        reader.dataReceived(b"x")
        self.failureResultOf(reader.done, ValueError)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_cancelling_cuts_the_connection(self) -> None:
        self.reader.done.cancel()
        self.failureResultOf(self.reader.done, defer.CancelledError)
        self.assertEqual(self.transport.producerState, "stopped")
        self.assertEqual(self.clock.getDelayedCalls(), [])


class _Stalling(Resource):
    """Sends the start of a body, then nothing."""

    isLeaf = True

    def __init__(self, start: bytes) -> None:
        super().__init__()
        self.start = start

    def render_GET(self, request: Any) -> Any:
        request.write(self.start)
        return NOT_DONE_YET


class StalledSmallBodiesTests(unittest.TestCase):
    """Error answers get the idle timeout too."""

    def setUp(self) -> None:
        self.clock = Clock()

    def test_error_answer_keeps_what_arrived(self) -> None:
        agent = RequestTraversalAgent(_Stalling(b'{"errcode": "M_UNKNOWN"'))
        response = self.successResultOf(agent.request(b"GET", b"https://example.com/x"))
        body = defer.ensureDeferred(read_body_prefix(response, 1024, self.clock, 2.0))
        agent.flush()
        self.assertNoResult(body)
        self.clock.advance(2.0)
        self.assertEqual(self.successResultOf(body), b'{"errcode": "M_UNKNOWN"')
