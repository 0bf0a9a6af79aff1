"""The well-known lookup of a server name obeys ``ip_range_blacklist`` like
every other request to a peer: a name whose address is blocked is never
contacted, not even for its delegation file."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from signedjson.key import generate_signing_key
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial import unittest

from mediarepo.config import parse_config
from mediarepo.federation.client import FederationClient


async def _localhost(host: str) -> Sequence[str]:
    return ["127.0.0.1"] if host == "localhost" else []


class WellKnownAddressFilterTest(unittest.TestCase):
    def client(self, **settings: Any) -> tuple[FederationClient, MemoryReactorClock]:
        reactor = MemoryReactorClock()
        config = parse_config({"server_name": "us.test", **settings}, "/tmp", environ={})
        client = FederationClient(
            reactor,
            "us.test",
            generate_signing_key("a"),
            config.federation,
            name_resolver=_localhost,
        )
        self.addCleanup(lambda: defer.ensureDeferred(client.close()))
        return client, reactor

    def test_blocked_address_is_not_asked(self) -> None:
        client, reactor = self.client()  # Synapse's default blacklist: loopback included
        for name in ("localhost", "127.0.0.1"):
            looking = defer.ensureDeferred(client._resolver.delegation(name))
            self.assertIsNone(self.successResultOf(looking))
        self.assertEqual(reactor.tcpClients, [])

    def test_allowed_address_is_asked(self) -> None:
        client, reactor = self.client(ip_range_whitelist=["127.0.0.0/8"])
        looking = defer.ensureDeferred(client._resolver.delegation("localhost"))
        [(address, port, factory, _, _)] = reactor.tcpClients
        self.assertEqual((address, port), ("127.0.0.1", 443))
        # Nobody listens on 443 here.
        factory.clientConnectionFailed(reactor.connectors[0], Failure(ConnectionRefusedError()))
        self.assertIsNone(self.successResultOf(looking))
