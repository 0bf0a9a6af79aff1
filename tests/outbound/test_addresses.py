"""Which addresses may be contacted, and the resolver that refuses a name
if any of its addresses is blocked."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.trial import unittest

from mediarepo.outbound.addresses import (
    AddressResolver,
    IPRangeFilter,
    ReactorNameResolver,
)
from mediarepo.outbound.errors import BlockedAddressError, OutboundRequestError

# Synapse's default ip_range_blacklist.
DEFAULT_BLACKLIST = (
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "192.0.0.0/24",
    "169.254.0.0/16",
    "192.88.99.0/24",
    "198.18.0.0/15",
    "192.0.2.0/24",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "::1/128",
    "fe80::/10",
    "fc00::/7",
    "2001:db8::/32",
    "ff00::/8",
    "fec0::/10",
)


def names(mapping: dict[str, Sequence[str]]) -> Any:
    """A name resolver answering from ``mapping`` (unknown names fail)."""

    async def resolve(host: str) -> Sequence[str]:
        if host not in mapping:
            raise LookupError(f"no such name {host}")
        return mapping[host]

    return resolve


class IPRangeFilterTests(unittest.TestCase):
    def test_every_spelling_of_a_blocked_ipv4_address(self) -> None:
        f = IPRangeFilter(DEFAULT_BLACKLIST, [])
        table = {
            # address: allowed
            "8.8.8.8": True,
            "10.1.2.3": False,
            "127.0.0.1": False,
            "::ffff:10.1.2.3": False,  # IPv4-mapped
            "::ffff:8.8.8.8": True,
            "2002:a01:203::1": False,  # 6to4 of 10.1.2.3
            "2002:808:808::1": True,  # 6to4 of 8.8.8.8
            "64:ff9b::10.1.2.3": False,  # NAT64
            "64:ff9b::7f00:1": False,  # NAT64 of 127.0.0.1
            "64:ff9b::8.8.8.8": True,
            "::10.1.2.3": False,  # IPv4-compatible
            "::8.8.8.8": True,
            "::1": False,
            "fe80::1%eth0": False,  # link-local, with its zone
            "2001:4860:4860::8888": True,
        }
        for address, allowed in table.items():
            self.assertEqual(f.allows(address), allowed, address)

    def test_unspecified_addresses_are_always_blocked(self) -> None:
        f = IPRangeFilter([], ["0.0.0.0/0", "::/0"])
        # A whitelist entry covering them still lets them through, as in
        # Synapse: the whitelist is the operator's explicit word.
        self.assertTrue(f.allows("0.0.0.0"))
        bare = IPRangeFilter([], [])
        self.assertFalse(bare.allows("0.0.0.0"))
        self.assertFalse(bare.allows("::"))
        self.assertFalse(bare.allows("::ffff:0.0.0.0"))
        self.assertTrue(bare.allows("10.0.0.1"))

    def test_whitelist_overrides_blacklist(self) -> None:
        f = IPRangeFilter(["10.0.0.0/8"], ["10.1.0.0/16"])
        self.assertTrue(f.allows("10.1.2.3"))
        self.assertTrue(f.allows("::ffff:10.1.2.3"))
        self.assertFalse(f.allows("10.2.0.1"))


class AddressResolverTests(unittest.TestCase):
    def resolver(self, mapping: dict[str, Sequence[str]]) -> AddressResolver:
        return AddressResolver(IPRangeFilter(["10.0.0.0/8"], []), names(mapping))

    async def test_every_address_is_returned(self) -> None:
        resolver = self.resolver({"dual.test": ["2001:db8::1", "192.0.2.1"]})
        self.assertEqual(await resolver.resolve("dual.test"), ["2001:db8::1", "192.0.2.1"])

    async def test_one_blocked_address_refuses_the_name(self) -> None:
        resolver = self.resolver({"mixed.test": ["127.0.0.1", "10.0.0.1"]})
        with self.assertRaises(BlockedAddressError):
            await resolver.resolve("mixed.test")

    async def test_ip_literals_are_checked_directly(self) -> None:
        resolver = self.resolver({})
        self.assertEqual(await resolver.resolve("192.0.2.7"), ["192.0.2.7"])
        with self.assertRaises(BlockedAddressError):
            await resolver.resolve("10.9.9.9")
        with self.assertRaises(BlockedAddressError):
            await resolver.resolve("::ffff:10.9.9.9")

    async def test_failed_and_empty_lookups(self) -> None:
        resolver = self.resolver({"empty.test": [], "junk.test": ["not an address"]})
        for name in ("unknown.test", "empty.test", "junk.test"):
            with self.assertRaises(OutboundRequestError) as caught:
                await resolver.resolve(name)
            self.assertNotIsInstance(caught.exception, BlockedAddressError)


class _FakeHostnameResolver:
    """An ``IHostnameResolver`` that answers when told to."""

    def __init__(self) -> None:
        self.pending: list[tuple[Any, str]] = []

    def resolveHostName(self, receiver: Any, hostName: str, portNumber: int = 0) -> Any:
        receiver.resolutionBegan(None)
        self.pending.append((receiver, hostName))
        return receiver


class _Reactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.nameResolver = _FakeHostnameResolver()


class ReactorNameResolverTests(unittest.TestCase):
    def test_collects_ipv4_and_ipv6_answers(self) -> None:
        reactor = _Reactor()
        looking = defer.ensureDeferred(ReactorNameResolver(reactor, 5)("dual.test"))
        [(receiver, host)] = reactor.nameResolver.pending
        self.assertEqual(host, "dual.test")
        receiver.addressResolved(IPv6Address("TCP", "2001:db8::5", 0))
        receiver.addressResolved(IPv4Address("TCP", "192.0.2.5", 0))
        receiver.addressResolved(IPv4Address("TCP", "192.0.2.5", 0))
        receiver.resolutionComplete()
        self.assertEqual(self.successResultOf(looking), ["2001:db8::5", "192.0.2.5"])

    def test_a_slow_lookup_times_out(self) -> None:
        reactor = _Reactor()
        looking = defer.ensureDeferred(ReactorNameResolver(reactor, 5)("slow.test"))
        reactor.advance(4.9)
        self.assertNoResult(looking)
        reactor.advance(0.2)
        self.failureResultOf(looking, OutboundRequestError)
        # A late answer is ignored.
        [(receiver, _)] = reactor.nameResolver.pending
        receiver.resolutionComplete()
