"""The one HTTP client for everything we fetch from other hosts.

One :class:`OutboundClient` per purpose (federation, URL previews), each
with its own :class:`OutboundSettings`: the IP ranges its targets are
checked against, its TLS trust, timeouts and proxy. It resolves every
address of a host and refuses the host if any is blocked, tries the next
address when one does not accept, owns the connection pool, gives up on an
answer whose headers take longer than the response timeout, and reads
bodies with an idle timeout, a minimum rate and a size bound.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Hashable
from io import BytesIO
from typing import Any, cast
from urllib.parse import SplitResult, urljoin, urlsplit

import attrs
from hyperlink import DecodedURL
from twisted.internet import defer, ssl
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    ProxyAgent,
    RequestTransmissionFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IResponse
from zope.interface import implementer

from mediarepo.outbound.addresses import (
    AddressResolver,
    IPRangeFilter,
    NameResolver,
    ReactorNameResolver,
)
from mediarepo.outbound.bodies import (
    DEFAULT_IDLE_TIMEOUT_SECONDS,
    MIN_TRANSFER_RATE,
    FlowControl,
    drop_body,
    read_body,
    read_body_prefix,
    read_limited_body,
)
from mediarepo.outbound.endpoints import AddressesEndpoint, cuttable
from mediarepo.outbound.errors import OutboundRequestError
from mediarepo.outbound.proxy import ProxyAddress, ProxySettings, TunnelEndpoint

logger = logging.getLogger(__name__)

REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
# Headers that are for the first host only, not for one it redirects to.
_ORIGIN_HEADERS = (b"Host", b"Authorization", b"Cookie", b"Proxy-Authorization")


@attrs.frozen
class TLSPolicy:
    """How the certificates of the hosts we contact are checked: against
    ``trust_root`` (the system's authorities when ``None``), or not at all
    when ``verify`` is false."""

    verify: bool = True
    trust_root: Any = None

    @classmethod
    def from_ca_files(cls, paths: tuple[str, ...], *, verify: bool = True) -> TLSPolicy:
        """Trusting only the authorities in ``paths`` (PEM), or the system's
        if there are none."""
        if not verify or not paths:
            return cls(verify=verify)
        certificates = []
        for path in paths:
            with open(path, "rb") as f:
                certificates.append(ssl.Certificate.loadPEM(f.read()))
        return cls(trust_root=ssl.trustRootFromCertificates(certificates))

    def options_for(self, name: str) -> Any:
        """The client TLS options for a host that must prove to be ``name``."""
        if not self.verify:
            return ssl.CertificateOptions(verify=False)
        if self.trust_root is None:
            return ssl.optionsForClientTLS(name)
        return ssl.optionsForClientTLS(name, trustRoot=self.trust_root)


@attrs.frozen
class OutboundSettings:
    """Everything one purpose's client needs to know."""

    ip_filter: IPRangeFilter
    user_agent: bytes = b"mediarepo"
    # Per address tried, and for the name lookup.
    connect_timeout: float = 10.0
    # Until the answer's headers have arrived.
    response_timeout: float = 60.0
    # Without a byte of a body.
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_SECONDS
    # Bytes a second a body must average over each rate window.
    min_transfer_rate: int = MIN_TRANSFER_RATE
    tls: TLSPolicy = TLSPolicy()
    proxy: ProxySettings | None = None


@attrs.frozen
class OutboundResponse:
    """An answer whose body is still to be read (through the client's
    ``read_*`` methods, or dropped with ``drop_body``)."""

    code: int
    headers: Headers
    # The URL that answered, after any redirects.
    url: str
    # The answer's length if it declared one.
    length: int | None
    raw: IResponse = attrs.field(repr=False)


@implementer(IAgentEndpointFactory)
class _FixedEndpoint:
    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        return self._endpoint


def _uri_bytes(url: str) -> bytes:
    """``url`` as sent: ASCII as it is, or with its host IDNA-encoded and
    the rest percent-encoded (:class:`ValueError` if that fails)."""
    if url.isascii():
        return url.encode("ascii")
    try:
        return str(DecodedURL.from_text(url).to_uri().to_text()).encode("ascii")
    except Exception as e:  # hyperlink and idna raise many kinds
        raise ValueError(f"cannot encode {url!r}: {e}") from e


def _was_cancelled(error: Exception) -> bool:
    """Whether a request failed because it was cancelled (which Twisted's
    client reports as a failure to get or send it)."""
    reasons = getattr(error, "reasons", None)
    if not isinstance(error, (ResponseNeverReceived, RequestTransmissionFailed)) or not reasons:
        return False
    return any(reason.check(defer.CancelledError) for reason in reasons)


class _TargetPool:
    """The client's one pool, seen by one request's agent: connections are
    pooled per URL *and* per place connected to and name checked, so that a
    connection made for one SRV target or TLS name never serves another."""

    def __init__(self, pool: HTTPConnectionPool, target: Hashable) -> None:
        self._pool = pool
        self._target = target

    @property
    def persistent(self) -> bool:
        return bool(self._pool.persistent)

    def getConnection(self, key: Hashable, endpoint: IStreamClientEndpoint) -> Any:
        return self._pool.getConnection((key, self._target), endpoint)


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


# Names whose TLS options a client keeps; past it the cache starts again.
_TLS_OPTIONS_KEPT = 1024


class OutboundClient:
    def __init__(
        self,
        reactor: Any,
        settings: OutboundSettings,
        *,
        name_resolver: NameResolver | None = None,
        agent: IAgent | None = None,
    ) -> None:
        """``agent``, for tests only, takes every request instead of the
        connections this client makes (an in-memory server of the test's
        own): names are then neither resolved nor checked, and no proxy
        or TLS applies."""
        self._reactor = reactor
        self.settings = settings
        self._given_agent = agent
        self._resolver = AddressResolver(
            settings.ip_filter,
            name_resolver or ReactorNameResolver(reactor, settings.connect_timeout),
        )
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 5
        self._pool.cachedConnectionTimeout = 60
        self._proxy_endpoints: dict[ProxyAddress, IStreamClientEndpoint] = {}
        self._proxy_agents: dict[ProxyAddress, IAgent] = {}
        self._tls_options: dict[tuple[TLSPolicy, str], Any] = {}

    # ------------------------------------------------------------ requests

    async def request(
        self,
        method: bytes,
        url: str,
        *,
        headers: Headers | None = None,
        json_body: object | None = None,
        connect_to: tuple[str, int] | None = None,
        tls_name: str | None = None,
    ) -> OutboundResponse:
        """One request, redirects not followed. ``connect_to`` is the host
        and port to connect to instead of the URL's (federation's SRV
        target); ``tls_name`` the name the certificate must carry instead
        of the URL's host. :class:`OutboundRequestError` (or
        :class:`BlockedAddressError`) if no answer came."""
        try:
            requesting = self._send(method, url, headers, json_body, connect_to, tls_name)
        except ValueError as e:  # the URL cannot be requested as it is
            raise OutboundRequestError(f"cannot fetch {url!r}: {e}") from e
        timeout = self.settings.response_timeout

        def timed_out(result: object, timeout: float) -> Failure:
            return Failure(OutboundRequestError(f"no answer from {url} within {timeout:g} s"))

        requesting.addTimeout(timeout, self._reactor, onTimeoutCancel=timed_out)
        try:
            response: IResponse = await requesting
        except (OutboundRequestError, defer.CancelledError):
            raise
        except Exception as e:  # connection and TLS errors of every kind
            if _was_cancelled(e):
                raise defer.CancelledError() from e
            raise OutboundRequestError(f"{method.decode('ascii')} {url} failed: {e}") from e
        length = response.length if isinstance(response.length, int) else None
        return OutboundResponse(response.code, response.headers, url, length, response)

    async def get(
        self, url: str, *, headers: Headers | None = None, max_redirects: int = 5
    ) -> OutboundResponse:
        """``GET`` ``url``, following redirects (each hop's host resolved
        and checked like the first; a redirect's body is never read)."""
        for _ in range(max_redirects + 1):
            response = await self.request(b"GET", url, headers=headers)
            location = response.headers.getRawHeaders(b"Location")
            if response.code not in REDIRECT_CODES or not location:
                return response
            self.drop_body(response)
            next_url = urljoin(url, location[0].decode("ascii", "replace"))
            if headers is not None and urlsplit(next_url)[:2] != urlsplit(url)[:2]:
                headers = headers.copy()
                for name in _ORIGIN_HEADERS:
                    headers.removeHeader(name)
            url = next_url
        raise OutboundRequestError(f"more than {max_redirects} redirects")

    def _send(
        self,
        method: bytes,
        url: str,
        headers: Headers | None,
        json_body: object | None,
        connect_to: tuple[str, int] | None,
        tls_name: str | None,
    ) -> defer.Deferred[IResponse]:
        """Send the request (:class:`ValueError` if ``url`` is unusable)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not an http(s) URL")
        sent = Headers() if headers is None else headers.copy()
        sent.setRawHeaders(b"User-Agent", [self.settings.user_agent])
        if not sent.hasHeader(b"Host"):
            sent.setRawHeaders(b"Host", [parts.netloc.rpartition("@")[2].encode("idna")])
        agent = self._given_agent or self._agent(parts, connect_to, tls_name, sent)
        body = None
        if json_body is not None:
            sent.setRawHeaders(b"Content-Type", [b"application/json"])
            body = FileBodyProducer(BytesIO(json.dumps(json_body).encode("utf-8")))
        requesting: defer.Deferred[IResponse] = agent.request(method, _uri_bytes(url), sent, body)
        return requesting

    def _agent(
        self,
        parts: SplitResult,
        connect_to: tuple[str, int] | None,
        tls_name: str | None,
        headers: Headers,
    ) -> IAgent:
        assert parts.hostname is not None
        secure = parts.scheme == "https"
        host, port = connect_to or (parts.hostname, parts.port or _default_port(parts.scheme))
        proxy = (
            self.settings.proxy.proxy_for(parts.scheme, host)
            if self.settings.proxy is not None
            else None
        )
        if proxy is not None and not secure:
            # The proxy gets the whole URL and makes the request itself.
            if proxy.authorization is not None:
                headers.setRawHeaders(b"Proxy-Authorization", [proxy.authorization])
            return self._proxy_agent(proxy)
        endpoint: IStreamClientEndpoint
        if proxy is not None:
            endpoint = TunnelEndpoint(self._proxy_endpoint(proxy), host, port, proxy.authorization)
        else:
            endpoint = AddressesEndpoint(
                self._reactor, self._resolver, host, port, self.settings.connect_timeout
            )
        if secure:
            endpoint = wrapClientTLS(self._tls_options_for(tls_name or parts.hostname), endpoint)
        pool = _TargetPool(self._pool, (host, port, tls_name, proxy))
        agent: IAgent = Agent.usingEndpointFactory(
            self._reactor, _FixedEndpoint(cuttable(endpoint)), pool=cast(HTTPConnectionPool, pool)
        )
        return agent

    def _tls_options_for(self, name: str) -> Any:
        """The TLS options for a host that must prove to be ``name``, made
        once per name: making them builds an OpenSSL context (0.3-0.6 ms of
        CPU), which every request paid before."""
        key = (self.settings.tls, name)
        options = self._tls_options.get(key)
        if options is None:
            if len(self._tls_options) >= _TLS_OPTIONS_KEPT:
                self._tls_options.clear()
            options = self._tls_options[key] = self.settings.tls.options_for(name)
        return options

    def _proxy_endpoint(self, proxy: ProxyAddress) -> IStreamClientEndpoint:
        """The proxy's address is not checked against the IP ranges: it is
        the operator's own choice (as in Synapse)."""
        endpoint = self._proxy_endpoints.get(proxy)
        if endpoint is None:
            endpoint = HostnameEndpoint(
                self._reactor, proxy.host, proxy.port, timeout=self.settings.connect_timeout
            )
            if proxy.secure:
                endpoint = wrapClientTLS(ssl.optionsForClientTLS(proxy.host), endpoint)
            self._proxy_endpoints[proxy] = endpoint
        return endpoint

    def _proxy_agent(self, proxy: ProxyAddress) -> IAgent:
        # One per proxy: its pooled connections are keyed on the endpoint.
        agent = self._proxy_agents.get(proxy)
        if agent is None:
            endpoint = cuttable(self._proxy_endpoint(proxy))
            agent = cast(IAgent, ProxyAgent(endpoint, self._reactor, self._pool))
            self._proxy_agents[proxy] = agent
        return agent

    # ------------------------------------------------------------ bodies

    async def read_body(
        self,
        response: OutboundResponse,
        on_data: Callable[[bytes], None],
        *,
        flow_control: FlowControl | None = None,
    ) -> None:
        """Feed the body to ``on_data`` as it arrives; :class:`BodyReadError`
        if it stalls, trickles or breaks (or what ``on_data`` raised).
        ``flow_control`` is handed a pause and a resume for the connection
        (for a consumer that falls behind)."""
        await read_body(
            response.raw,
            on_data,
            self._reactor,
            self.settings.idle_timeout,
            min_rate=self.settings.min_transfer_rate,
            flow_control=flow_control,
        )

    async def read_limited_body(self, response: OutboundResponse, limit: int) -> bytes:
        """The whole body, at most ``limit`` bytes (:class:`BodyTooLargeError`
        without reading on)."""
        return await read_limited_body(
            response.raw,
            limit,
            self._reactor,
            self.settings.idle_timeout,
            min_rate=self.settings.min_transfer_rate,
        )

    async def read_body_prefix(self, response: OutboundResponse, limit: int) -> bytes:
        """The first ``limit`` bytes of the body (an error answer, read for
        its message); what arrived is kept if the body breaks or stalls."""
        return await read_body_prefix(
            response.raw,
            limit,
            self._reactor,
            self.settings.idle_timeout,
            min_rate=self.settings.min_transfer_rate,
        )

    def drop_body(self, response: OutboundResponse) -> None:
        """Do not read the body (it could be of any size): cut it."""
        drop_body(response.raw)

    async def close(self) -> None:
        """Close the pooled connections."""
        await self._pool.closeCachedConnections()
