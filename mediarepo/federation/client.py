"""Outbound federation requests: resolve the server name, connect over TLS
checked against that name, sign the request with our key.

Every connection goes to an address first checked against
``ip_range_blacklist`` (less ``ip_range_whitelist``), so a peer (or its DNS)
cannot point us at the operator's own network.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urljoin, urlsplit

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
from mediarepo.federation.backoff import DestinationAttempt, DestinationBackoff
from mediarepo.federation.bodies import (
    drop_body,
    read_body,
    read_body_prefix,
    read_limited_body,
)
from mediarepo.federation.discovery import (
    FederationTarget,
    ServerResolver,
    make_well_known_fetcher,
)
from mediarepo.federation.signing import sign_request

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 10.0
# Until the response's headers arrive.
RESPONSE_TIMEOUT_SECONDS = 60.0
USER_AGENT = b"mediarepo"
# Redirects followed when fetching a URL a peer pointed us at.
MAX_REDIRECTS = 5
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
# Peers whose TLS settings are kept; past it the cache starts again.
_TLS_OPTIONS_CACHED = 1024


class FederationRequestError(Exception):
    """No usable answer from a peer: unreachable, refused or blocked."""


class BlockedAddressError(FederationRequestError):
    pass


class NotRetryingDestination(FederationRequestError):
    """The server failed lately and is being left alone (its backoff in
    ``destinations`` runs until ``retry_at_ms``)."""

    def __init__(self, destination: str, retry_at_ms: int) -> None:
        super().__init__(f"not retrying {destination} until {retry_at_ms}")
        self.destination = destination
        self.retry_at_ms = retry_at_ms


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
    """Connects to one chosen address, with TLS for the peer's name (or,
    for a plain ``http`` URL a peer sent us to, without)."""

    def __init__(self, reactor: Any, address: str, port: int, tls: Any) -> None:
        self._reactor = reactor
        self._address = address
        self._port = port
        self._tls = tls

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        tcp = HostnameEndpoint(
            self._reactor, self._address, self._port, timeout=CONNECT_TIMEOUT_SECONDS
        )
        return tcp if self._tls is None else wrapClientTLS(self._tls, tcp)


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
        backoff: DestinationBackoff | None = None,
    ) -> None:
        self._reactor = reactor
        self.server_name = server_name
        self._signing_key = signing_key
        self._config = config
        self._backoff = backoff
        # Seconds without a byte of a peer's answer's body before giving up.
        self.idle_timeout = config.idle_timeout_ms / 1000
        # Well-known lookups go through get_url: the same address filter and
        # TLS settings as every other request to a peer.
        self._resolver = resolver or ServerResolver(
            reactor,
            http_get_well_known=make_well_known_fetcher(
                reactor, get_url=self.get_url, idle_timeout=self.idle_timeout
            ),
        )
        self._filter = IPRangeFilter(config.ip_range_blacklist, config.ip_range_whitelist)
        self._trust = tls_trust(config) if config.verify_certificates else None
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 5
        self._pool.cachedConnectionTimeout = 60
        self._tls_by_name: dict[str, Any] = {}

    def _tls_options(self, name: str) -> Any:
        """The TLS settings for connections to ``name``, made once per name:
        making them builds an OpenSSL context (0.3-0.6 ms of CPU), which
        every request paid before."""
        options = self._tls_by_name.get(name)
        if options is None:
            if len(self._tls_by_name) >= _TLS_OPTIONS_CACHED:
                self._tls_by_name.clear()
            if self._trust is None:
                options = ssl.CertificateOptions(verify=False)
            else:
                options = ssl.optionsForClientTLS(name, trustRoot=self._trust)
            self._tls_by_name[name] = options
        return options

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

    async def get(
        self, destination: str, path: str, *, signed: bool = True, ignore_backoff: bool = False
    ) -> IResponse:
        """``GET`` ``path`` (with its query) from ``destination``; the
        response with its body still to be read."""
        return await self.request(
            b"GET", destination, path, signed=signed, ignore_backoff=ignore_backoff
        )

    async def request(
        self,
        method: bytes,
        destination: str,
        path: str,
        *,
        signed: bool = True,
        json_body: object | None = None,
        ignore_backoff: bool = False,
    ) -> IResponse:
        """The response of ``destination`` (its body still to be read), or
        :class:`FederationRequestError`; :class:`NotRetryingDestination` at
        once while the server is backed off, unless ``ignore_backoff``
        (which also keeps a failure from lengthening the backoff)."""
        attempt: DestinationAttempt | None = None
        if self._backoff is not None:
            attempt = await self._backoff.attempt(destination, ignore_backoff=ignore_backoff)
            retry_at = attempt.retry_at_ms()
            if retry_at is not None and retry_at > self._backoff.now_ms():
                raise NotRetryingDestination(destination, retry_at)
        try:
            response = await self._request_any_target(method, destination, path, signed, json_body)
        except FederationRequestError as e:
            if attempt is not None:
                await attempt.failed(str(e))
            raise
        if attempt is not None:
            await attempt.answered(response.code)
        return response

    async def _request_any_target(
        self,
        method: bytes,
        destination: str,
        path: str,
        signed: bool,
        json_body: object | None,
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
        headers = Headers({b"Host": [target.host_header.encode()]})
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
        return await self._send(
            method,
            f"https://{target.host_header}{path}",
            address,
            target.port,
            self._tls_options(_tls_name(target.host_header)),
            headers,
            json_body,
        )

    async def _send(
        self,
        method: bytes,
        url: str,
        address: str,
        port: int,
        tls: Any,
        headers: Headers,
        json_body: object | None = None,
    ) -> IResponse:
        """One request to ``address``:``port`` (with ``tls`` unless ``None``)."""
        agent = Agent.usingEndpointFactory(
            self._reactor, _TargetEndpoint(self._reactor, address, port, tls), pool=self._pool
        )
        headers.setRawHeaders(b"User-Agent", [USER_AGENT])
        kwargs: dict[str, Any] = {"headers": headers, "agent": agent, "unbuffered": True}
        if json_body is not None:
            kwargs["json"] = json_body
        deferred = treq.request(method.decode(), url, **kwargs)
        deferred.addTimeout(RESPONSE_TIMEOUT_SECONDS, self._reactor)
        response: IResponse = await deferred
        return response

    async def get_url(self, url: str) -> IResponse:
        """An unsigned ``GET`` of a URL a peer sent us to (a media CDN),
        following redirects; every hop's address is checked like a peer's."""
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise FederationRequestError(f"cannot fetch {url!r}")
            secure = parts.scheme == "https"
            port = parts.port or (443 if secure else 80)
            host_header = parts.netloc.rpartition("@")[2]
            address = (await self._addresses(parts.hostname))[0]
            tls = self._tls_options(parts.hostname) if secure else None
            try:
                response = await self._send(
                    b"GET", url, address, port, tls, Headers({b"Host": [host_header.encode()]})
                )
            except (defer.TimeoutError, ConnectionError) as e:
                raise FederationRequestError(f"cannot fetch {url}: {e}") from e
            except Exception as e:  # connection and TLS errors of every kind
                raise FederationRequestError(f"cannot fetch {url}: {e}") from e
            location = response.headers.getRawHeaders(b"Location")
            if response.code not in _REDIRECT_CODES or not location:
                return response
            # A redirect's body is not read (it could be of any size).
            drop_body(response)
            url = urljoin(url, location[0].decode("ascii", "replace"))
        raise FederationRequestError("too many redirects")

    async def read_body(self, response: IResponse, on_data: Callable[[bytes], None]) -> None:
        """Read a peer's body into ``on_data``, giving up (with
        :class:`~mediarepo.federation.bodies.BodyReadError`) on a peer idle
        for ``federation_idle_timeout``."""
        await read_body(response, on_data, self._reactor, self.idle_timeout)

    async def read_limited_body(self, response: IResponse, limit: int) -> bytes:
        """A peer's whole body, of at most ``limit`` bytes, likewise."""
        return await read_limited_body(response, limit, self._reactor, self.idle_timeout)

    async def read_error_body(self, response: IResponse, limit: int = 64 * 1024) -> bytes:
        """The start of an error answer's body, for its message."""
        return await read_body_prefix(response, limit, self._reactor, self.idle_timeout)

    def close(self) -> defer.Deferred[None]:
        closing: defer.Deferred[None] = self._pool.closeCachedConnections()
        return closing
