"""The well-known lookup of a server name obeys ``ip_range_blacklist`` like
every other request to a peer: a name whose address is blocked is never
contacted, not even for its delegation file."""

from __future__ import annotations

from typing import Any

from signedjson.key import generate_signing_key
from twisted.internet import reactor
from twisted.trial import unittest

from mediarepo.config import parse_config
from mediarepo.federation.client import FederationClient


def _client(**settings: Any) -> FederationClient:
    config = parse_config({"server_name": "us.test", **settings}, "/tmp")
    return FederationClient(reactor, "us.test", generate_signing_key("a"), config.federation)


class WellKnownAddressFilterTest(unittest.TestCase):
    def recorded_sends(self, client: FederationClient, error: Exception) -> list[tuple[Any, ...]]:
        """The requests ``client`` sends from now on, each failing with ``error``."""
        self.addCleanup(client.close)
        sent: list[tuple[Any, ...]] = []

        async def send(*args: Any) -> Any:
            sent.append(args)
            raise error

        self.patch(client, "_send", send)
        return sent

    async def test_blocked_address_is_not_asked(self) -> None:
        client = _client()  # Synapse's default blacklist: loopback included
        sent = self.recorded_sends(client, AssertionError("a blocked address was contacted"))
        self.assertIsNone(await client._resolver.delegation("localhost"))
        self.assertIsNone(await client._resolver.delegation("127.0.0.1"))
        self.assertEqual(sent, [])

    async def test_allowed_address_is_asked(self) -> None:
        client = _client(ip_range_whitelist=["127.0.0.0/8"])
        sent = self.recorded_sends(client, ConnectionRefusedError("nobody listens on 443 here"))
        self.assertIsNone(await client._resolver.delegation("localhost"))
        self.assertEqual(len(sent), 1)
        method, url, address, port = sent[0][:4]
        self.assertEqual(
            (method, url, address, port),
            (b"GET", "https://localhost/.well-known/matrix/server", "127.0.0.1", 443),
        )
