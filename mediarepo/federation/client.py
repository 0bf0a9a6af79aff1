"""Outbound federation requests: resolve the server name, connect over TLS
checked against that name, sign the request with our key.

Every connection goes to an address first checked against
``ip_range_blacklist`` (less ``ip_range_whitelist``), so a peer (or its DNS)
cannot point us at the operator's own network.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from typing import Any

import treq
from twisted.internet import defer, ssl
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

from mediarepo.config import FederationConfig
from mediarepo.federation.discovery import FederationTarget, ServerResolver
from mediarepo.federation.signing import sign_request

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 10.0
# Until the response's headers arrive.
RESPONSE_TIMEOUT_SECONDS = 60.0
USER_AGENT = b"mediarepo"


class FederationRequestError(Exception):
    """No usable answer from a peer: unreachable, refused or blocked."""


class BlockedAddressError(FederationRequestError):
    pass


class IPRangeFilter:
    """Whether an address may be contacted."""

    def __init__(self, blacklist: Iterable[str], whitelist: Iterable[str]) -> None:
        self._blocked = [ipaddress.ip_network(r, strict=False) for r in blacklist]
        # Never the unspecified addresses, whatever the configuration says.
        self._blocked += [ipaddress.ip_network("0.0.0.0/32"), ipaddress.ip_network("::/128")]
        self._allowed = [ipaddress.ip_network(r, strict=False) for r in whitelist]

    def allows(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        candidates = [ip]
        if isinstance(ip, ipaddress.IPv6Address):
            # An IPv4 address dressed as IPv6 is judged as IPv4.
            for embedded in (ip.ipv4_mapped, ip.sixtofour):
                if embedded is not None:
                    candidates.append(embedded)

        def within(networks: list[Any]) -> bool:
            return any(c in net for net in networks for c in candidates if c.version == net.version)

        return within(self._allowed) or not within(self._blocked)


def tls_trust(config: FederationConfig) -> Any:
    """The certificate authorities peers' certificates are checked against."""
    if not config.custom_ca_list:
        return ssl.platformTrust()
    certificates = []
    for path in config.custom_ca_list:
        with open(path, "rb") as f:
            certificates.append(ssl.Certificate.loadPEM(f.read()))
    return ssl.trustRootFromCertificates(certificates)


@implementer(IAgentEndpointFactory)
class _TargetEndpoint:
    """Connects to one chosen address, with TLS for the peer's name."""

    def __init__(self, reactor: Any, address: str, port: int, tls: Any) -> None:
        self._reactor = reactor
        self._address = address
        self._port = port
        self._tls = tls

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        tcp = HostnameEndpoint(
            self._reactor, self._address, self._port, timeout=CONNECT_TIMEOUT_SECONDS
        )
        return wrapClientTLS(self._tls, tcp)


def _tls_name(host_header: str) -> str:
    """The name a certificate must carry: the server name without its port."""
    if host_header.startswith("["):
        return host_header[1 : host_header.index("]")]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


class FederationClient:
    def __init__(
        self,
        reactor: Any,
        server_name: str,
        signing_key: Any,
        config: FederationConfig,
        resolver: ServerResolver | None = None,
    ) -> None:
        self._reactor = reactor
        self.server_name = server_name
        self._signing_key = signing_key
        self._config = config
        self._resolver = resolver or ServerResolver(reactor)
        self._filter = IPRangeFilter(config.ip_range_blacklist, config.ip_range_whitelist)
        self._trust = tls_trust(config) if config.verify_certificates else None
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 5
        self._pool.cachedConnectionTimeout = 60

    def _tls_options(self, name: str) -> Any:
        if self._trust is None:
            return ssl.CertificateOptions(verify=False)
        return ssl.optionsForClientTLS(name, trustRoot=self._trust)

    async def _addresses(self, host: str) -> list[str]:
        """The host's addresses that may be contacted."""
        try:
            ipaddress.ip_address(host)
            addresses = [host]
        except ValueError:
            try:
                addresses = [await self._reactor.resolve(host)]
            except DNSLookupError as e:
                raise FederationRequestError(f"cannot resolve {host}: {e}") from e
        allowed = [a for a in addresses if self._filter.allows(a)]
        if not allowed:
            raise BlockedAddressError(f"{host} resolves to a blocked address")
        return allowed

    async def get(self, destination: str, path: str, *, signed: bool = True) -> IResponse:
        """``GET`` ``path`` (with its query) from ``destination``; the
        response with its body still to be read."""
        return await self.request(b"GET", destination, path, signed=signed)

    async def request(
        self,
        method: bytes,
        destination: str,
        path: str,
        *,
        signed: bool = True,
        json_body: object | None = None,
    ) -> IResponse:
        try:
            targets: list[FederationTarget] = await self._resolver.resolve(destination)
        except ValueError as e:
            raise FederationRequestError(f"{destination!r} is not a server name") from e
        last_error: Exception | None = None
        for target in targets:
            try:
                addresses = await self._addresses(target.host)
            except FederationRequestError as e:
                last_error = e
                continue
            for address in addresses:
                try:
                    return await self._request_once(
                        method, destination, target, address, path, signed, json_body
                    )
                except (FederationRequestError, defer.TimeoutError, ConnectionError) as e:
                    last_error = e
                except Exception as e:  # connection and TLS errors of every kind
                    logger.info("request to %s (%s) failed: %s", destination, address, e)
                    last_error = e
        raise FederationRequestError(f"cannot reach {destination}: {last_error}")

    async def _request_once(
        self,
        method: bytes,
        destination: str,
        target: FederationTarget,
        address: str,
        path: str,
        signed: bool,
        json_body: object | None,
    ) -> IResponse:
        agent = Agent.usingEndpointFactory(
            self._reactor,
            _TargetEndpoint(
                self._reactor,
                address,
                target.port,
                self._tls_options(_tls_name(target.host_header)),
            ),
            pool=self._pool,
        )
        headers = Headers({b"User-Agent": [USER_AGENT], b"Host": [target.host_header.encode()]})
        if signed:
            for value in sign_request(
                self._signing_key,
                self.server_name,
                destination,
                method.decode(),
                path,
                json_body,
            ):
                headers.addRawHeader(b"Authorization", value.encode())
        kwargs: dict[str, Any] = {"headers": headers, "agent": agent, "unbuffered": True}
        if json_body is not None:
            kwargs["json"] = json_body
        deferred = treq.request(method.decode(), f"https://{target.host_header}{path}", **kwargs)
        deferred.addTimeout(RESPONSE_TIMEOUT_SECONDS, self._reactor)
        response: IResponse = await deferred
        return response

    def close(self) -> defer.Deferred[None]:
        closing: defer.Deferred[None] = self._pool.closeCachedConnections()
        return closing
