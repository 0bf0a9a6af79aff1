"""The client's timeouts on a test clock, over treq's in-memory agent: the
answer's headers within the response timeout, a body's bytes within the
idle timeout, and cancellation by the caller."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from mediarepo.outbound import OutboundRequestError, PeerStalledError
from tests.outbound.servers import Recorder, in_memory_client


class TimeoutTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def test_no_headers_within_the_response_timeout(self) -> None:
        client, agent = in_memory_client(self.clock, Recorder(), response_timeout=30)
        requesting = defer.ensureDeferred(client.get("https://peer.test/silent"))
        agent.flush()
        self.clock.advance(29.9)
        self.assertNoResult(requesting)
        self.clock.advance(0.1)
        failure = self.failureResultOf(requesting, OutboundRequestError)
        self.assertIn("within 30 s", str(failure.value))

    def test_body_idle_timeout(self) -> None:
        client, agent = in_memory_client(self.clock, Recorder(), idle_timeout=5)
        requesting = defer.ensureDeferred(client.get("https://peer.test/stall"))
        agent.flush()
        response = self.successResultOf(requesting)
        received: list[bytes] = []
        reading = defer.ensureDeferred(client.read_body(response, received.append))
        agent.flush()
        self.clock.advance(4.9)
        self.assertNoResult(reading)
        self.clock.advance(0.1)
        self.failureResultOf(reading, PeerStalledError)
        self.assertEqual(received, [b"start"])

    def test_cancelled_by_the_caller(self) -> None:
        client, agent = in_memory_client(self.clock, Recorder())
        requesting = defer.ensureDeferred(client.get("https://peer.test/silent"))
        agent.flush()
        requesting.cancel()
        self.failureResultOf(requesting, defer.CancelledError)
        # No timer is left behind.
        self.assertEqual(self.clock.getDelayedCalls(), [])
