"""Closing a site's connections at shutdown, on a test clock: answers already
written reach their clients, and a client that does not take its answer is cut
after CLOSE_FLUSH_SECONDS."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from twisted.web.resource import Resource

from mediarepo.http.site import CLOSE_FLUSH_SECONDS, MediaChannel, MediaSite


class RecordingTransport(StringTransport):
    """A connection that closes when told to (flushing first) only if
    ``reads`` (the client takes what was written)."""

    def __init__(self, reads: bool) -> None:
        super().__init__()
        self.reads = reads
        self.aborted = False
        self.protocol: MediaChannel | None = None

    def loseConnection(self) -> None:
        super().loseConnection()
        if self.reads:
            self._lost()

    def abortConnection(self) -> None:
        self.aborted = True
        self._lost()

    def _lost(self) -> None:
        if self.protocol is not None:
            protocol, self.protocol = self.protocol, None
            protocol.connectionLost()


class CloseConnectionsTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.site = MediaSite(
            Resource(),
            self.clock,
            max_upload_size=1024,
            x_forwarded=False,
            abandon_upload=lambda sink: None,
        )

    def connect(self, reads: bool) -> RecordingTransport:
        transport = RecordingTransport(reads)
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
        assert isinstance(channel, MediaChannel)
        transport.protocol = channel
        channel.makeConnection(transport)
        return transport

    def test_answers_are_flushed_not_cut(self) -> None:
        first, second = self.connect(reads=True), self.connect(reads=True)
        closing = ensureDeferred(self.site.close_connections())
        self.assertTrue(closing.called)
        self.assertEqual((first.aborted, second.aborted), (False, False))
        self.assertEqual(self.site.channels, set())

    def test_a_client_that_does_not_read_is_cut_after_the_bound(self) -> None:
        reading, stuck = self.connect(reads=True), self.connect(reads=False)
        closing = ensureDeferred(self.site.close_connections())
        self.assertFalse(reading.aborted)
        self.clock.advance(CLOSE_FLUSH_SECONDS - 0.1)
        self.assertFalse(closing.called)
        self.assertFalse(stuck.aborted)
        self.clock.advance(0.2)
        self.assertTrue(closing.called)
        self.assertTrue(stuck.aborted)
        self.assertEqual(self.site.channels, set())

    def test_nothing_open_returns_at_once(self) -> None:
        self.assertTrue(ensureDeferred(self.site.close_connections()).called)
