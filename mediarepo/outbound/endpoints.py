"""The connections outbound requests travel on.

:class:`AddressesEndpoint` connects to a host by trying each of its
addresses in turn (IPv6 and IPv4, as the resolver orders them) until one
accepts; the resolver has already refused the host if any address is
blocked. :func:`cuttable` wraps any endpoint so that the connection it
makes aborts when the body being read from it is stopped (see
:mod:`mediarepo.outbound.bodies`), using only public Twisted interfaces.
"""

from __future__ import annotations

import logging
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import implementer

from mediarepo.outbound.addresses import AddressResolver
from mediarepo.outbound.errors import OutboundRequestError

logger = logging.getLogger(__name__)


class _CuttableConnection(ProtocolWrapper):
    """The transport an HTTP connection sees. A response body's transport
    passes ``stopProducing`` (the reader giving up on the body) on to it:
    here that aborts the connection, rather than closing it politely and
    waiting on a peer we no longer trust to answer."""

    def stopProducing(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]


class _CuttableFactory(WrappingFactory):
    protocol = _CuttableConnection


@implementer(IStreamClientEndpoint)
class _CuttableEndpoint:
    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        wrapping = _CuttableFactory(protocolFactory)  # type: ignore[no-untyped-call]
        connecting = self._endpoint.connect(wrapping)

        def unwrap(connection: IProtocol) -> IProtocol:
            assert isinstance(connection, _CuttableConnection)
            wrapped: IProtocol = connection.wrappedProtocol
            return wrapped

        return connecting.addCallback(unwrap)


def cuttable(endpoint: IStreamClientEndpoint) -> IStreamClientEndpoint:
    """``endpoint``, its connections aborted when a body on them is stopped."""
    return _CuttableEndpoint(endpoint)


@implementer(IStreamClientEndpoint)
class AddressesEndpoint:
    """Connects to ``host``:``port``: resolves it (every address checked),
    then tries each address for ``timeout`` seconds until one accepts."""

    def __init__(
        self, reactor: Any, resolver: AddressResolver, host: str, port: int, timeout: float
    ) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self._host = host
        self._port = port
        self._timeout = timeout

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        return defer.Deferred.fromCoroutine(self._connect(protocolFactory))

    def _address_endpoint(self, address: str) -> IStreamClientEndpoint:
        if ":" in address:
            return TCP6ClientEndpoint(self._reactor, address, self._port, timeout=self._timeout)
        return TCP4ClientEndpoint(self._reactor, address, self._port, timeout=self._timeout)

    async def _connect(self, protocolFactory: IProtocolFactory) -> IProtocol:
        addresses = await self._resolver.resolve(self._host)
        failures: list[str] = []
        for address in addresses:
            try:
                connection: IProtocol = await self._address_endpoint(address).connect(
                    protocolFactory
                )
                return connection
            except defer.CancelledError:
                raise
            except Exception as e:
                logger.info(
                    "cannot connect to %s (%s) port %d: %s", self._host, address, self._port, e
                )
                failures.append(f"{address}: {e}")
        raise OutboundRequestError(
            f"cannot connect to {self._host} port {self._port} ({'; '.join(failures)})"
        )
