"""Which addresses a host name stands for, and whether we may contact them.

Every address a name resolves to is checked, inside the resolver, against
the configured ranges: if any of them is blocked the name is refused
outright, as Synapse does, so a peer (or its DNS) that mixes a public
address with one of the operator's own cannot get a connection to the
latter by making the former fail.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IHostResolution, IResolutionReceiver
from zope.interface import implementer

from mediarepo.outbound.errors import BlockedAddressError, OutboundRequestError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Looks a host name up: every address it has (IPv4 and IPv6), as strings.
NameResolver = Callable[[str], Awaitable[Sequence[str]]]

# NAT64's well-known prefix (RFC 6052): the last 32 bits are an IPv4 address.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_UNSPECIFIED = (ipaddress.ip_network("0.0.0.0/32"), ipaddress.ip_network("::/128"))


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries, if it is one of the forms that
    reach an IPv4 host: IPv4-mapped (``::ffff:a.b.c.d``), 6to4
    (``2002:aabb:ccdd::``), NAT64 (``64:ff9b::a.b.c.d``) or the deprecated
    IPv4-compatible (``::a.b.c.d``, but not ``::`` or ``::1``)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if int(address) >> 32 == 0 and int(address) > 1:
        return ipaddress.IPv4Address(int(address))
    return None


def _parse_address(address: str) -> IPAddress:
    # getaddrinfo gives link-local IPv6 addresses with their zone ("%eth0"),
    # which says which interface, not which host.
    return ipaddress.ip_address(address.partition("%")[0])


def is_ip_literal(host: str) -> bool:
    try:
        _parse_address(host)
    except ValueError:
        return False
    return True


class IPRangeFilter:
    """Whether an address may be contacted: not in ``blacklist`` unless in
    ``whitelist``. ``0.0.0.0`` and ``::`` are always blocked, and an IPv4
    address dressed as IPv6 (see :func:`embedded_ipv4`) is judged as IPv4
    too, so no spelling of a blocked IPv4 address gets through."""

    def __init__(self, blacklist: Iterable[str], whitelist: Iterable[str]) -> None:
        self._blocked: list[IPNetwork] = [ipaddress.ip_network(r, strict=False) for r in blacklist]
        self._blocked += _UNSPECIFIED
        self._allowed: list[IPNetwork] = [ipaddress.ip_network(r, strict=False) for r in whitelist]

    def allows(self, address: str) -> bool:
        ip = _parse_address(address)
        candidates: list[IPAddress] = [ip]
        if isinstance(ip, ipaddress.IPv6Address):
            embedded = embedded_ipv4(ip)
            if embedded is not None:
                candidates.append(embedded)

        def within(networks: list[IPNetwork]) -> bool:
            return any(c in net for net in networks for c in candidates if c.version == net.version)

        return within(self._allowed) or not within(self._blocked)


@implementer(IResolutionReceiver)
class _AddressCollector:
    """Gathers what the reactor's ``IHostnameResolver`` finds."""

    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.done: defer.Deferred[list[str]] = defer.Deferred()

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        host = str(address.host)
        if host not in self.addresses:
            self.addresses.append(host)

    def resolutionComplete(self) -> None:
        if not self.done.called:
            self.done.callback(self.addresses)


class ReactorNameResolver:
    """Every address of a name, IPv4 and IPv6, from the reactor's
    ``nameResolver`` (getaddrinfo in a thread), in the order it gives them;
    :class:`OutboundRequestError` if the lookup takes over ``timeout``."""

    def __init__(self, reactor: Any, timeout: float) -> None:
        self._reactor = reactor
        self._timeout = timeout

    async def __call__(self, host: str) -> Sequence[str]:
        collector = _AddressCollector()
        self._reactor.nameResolver.resolveHostName(collector, host, 0)
        # The lookup thread cannot be stopped; we only stop waiting for it.
        collector.done.addTimeout(self._timeout, self._reactor)
        try:
            return await collector.done
        except defer.TimeoutError as e:
            raise OutboundRequestError(f"looking up {host} took over {self._timeout:g} s") from e


class AddressResolver:
    """The addresses of a host that we may connect to: all of them, or
    :class:`BlockedAddressError` if any is blocked (an IP literal is
    checked as it is)."""

    def __init__(self, ip_filter: IPRangeFilter, name_resolver: NameResolver) -> None:
        self._filter = ip_filter
        self._name_resolver = name_resolver

    async def resolve(self, host: str) -> list[str]:
        if is_ip_literal(host):
            addresses = [host]
        else:
            try:
                addresses = list(await self._name_resolver(host))
            except OutboundRequestError:
                raise
            except Exception as e:
                raise OutboundRequestError(f"cannot resolve {host}: {e}") from e
            if not addresses:
                raise OutboundRequestError(f"{host} has no address")
        try:
            blocked = [a for a in addresses if not self._filter.allows(a)]
        except ValueError as e:
            raise OutboundRequestError(f"{host} resolves to a non-address: {e}") from e
        if blocked:
            raise BlockedAddressError(f"{host} resolves to a blocked address ({blocked[0]})")
        return addresses
