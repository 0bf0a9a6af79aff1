"""Forward proxies, as Synapse reads them from ``http_proxy``,
``https_proxy`` and ``no_proxy``.

A plain ``http`` URL goes to the HTTP proxy as an absolute-URI request; an
``https`` one goes through a ``CONNECT`` tunnel of the HTTPS proxy, with TLS
to the target inside it. The proxy resolves the target: neither the proxy's
address nor the target's is checked against the IP ranges (as in
Synapse), which is the operator's to police on the proxy.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

from mediarepo.outbound.errors import OutboundRequestError

# Synapse's default when a proxy URL has no port.
DEFAULT_PROXY_PORT = 1080
# The proxy's answer to CONNECT: its status line and headers.
MAX_CONNECT_RESPONSE_BYTES = 16 * 1024
_STATUS_LINE = re.compile(rb"\AHTTP/1\.[01] (\d{3})(?: [^\r\n]*)?\r\n")


@attrs.frozen
class ProxyAddress:
    """Where a proxy listens, and the ``Proxy-Authorization`` it wants."""

    secure: bool  # TLS to the proxy itself (an https:// proxy URL)
    host: str
    port: int
    authorization: bytes | None

    @classmethod
    def parse(cls, url: str) -> ProxyAddress:
        """``[scheme://][user:password@]host[:port]``; :class:`ValueError`
        unless the scheme is http or https and there is a host."""
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"proxy {url!r}: only http and https proxies are supported")
        try:
            port = parts.port or DEFAULT_PROXY_PORT
        except ValueError as e:
            raise ValueError(f"proxy {url!r}: {e}") from e
        if not parts.hostname:
            raise ValueError(f"proxy {url!r} has no host")
        authorization = None
        if parts.username and parts.password:
            credentials = f"{unquote(parts.username)}:{unquote(parts.password)}".encode()
            authorization = b"Basic " + base64.b64encode(credentials)
        return cls(parts.scheme == "https", parts.hostname, port, authorization)


def _proxy_url(value: str | None) -> str | None:
    if value is not None:
        ProxyAddress.parse(value)
    return value


@attrs.frozen
class ProxySettings:
    """The proxies outbound requests go through, and the hosts that bypass
    them (``no_proxy``: names, domain suffixes, ``*`` for all)."""

    http_proxy: str | None = attrs.field(default=None, converter=_proxy_url)
    https_proxy: str | None = attrs.field(default=None, converter=_proxy_url)
    no_proxy: tuple[str, ...] = ()

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> ProxySettings | None:
        """The settings the environment gives, lowercase names first (as
        curl and Python read them); ``None`` without any proxy."""

        def variable(name: str) -> str | None:
            return environ.get(name) or environ.get(name.upper()) or None

        http_proxy = variable("http_proxy")
        # Under CGI, HTTP_PROXY is a request header anyone can send.
        if "REQUEST_METHOD" in environ and not environ.get("http_proxy"):
            http_proxy = None
        https_proxy = variable("https_proxy")
        if http_proxy is None and https_proxy is None:
            return None
        no_proxy = variable("no_proxy") or ""
        return cls(
            http_proxy=http_proxy,
            https_proxy=https_proxy,
            no_proxy=tuple(h.strip() for h in no_proxy.split(",") if h.strip()),
        )

    def proxy_for(self, scheme: str, host: str) -> ProxyAddress | None:
        """The proxy a request to ``host`` over ``scheme`` goes through, if any."""
        url = self.https_proxy if scheme == "https" else self.http_proxy
        if url is None:
            return None
        if self.bypasses(host):
            return None
        return ProxyAddress.parse(url)

    def bypasses(self, host: str) -> bool:
        """Whether ``no_proxy`` names ``host``: ``*``, the name itself, a
        domain it is in (``example.org`` and ``.example.org`` alike), or
        an address range (``10.0.0.0/8``) holding it."""
        host = host.lower().rstrip(".")
        for entry in self.no_proxy:
            entry = entry.lower().strip().lstrip(".").rstrip(".")
            if entry == "*" or host == entry or host.endswith("." + entry):
                return True
            try:
                if ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
        return False


class _TunnelProtocol(protocol.Protocol):
    """Asks the proxy for a tunnel; once it answers 200, hands the
    connection to the protocol the caller wanted (and from then on only
    relays to it)."""

    def __init__(self, factory: _TunnelFactory) -> None:
        self._factory = factory
        self._buffer = b""
        self._tunnelled: IProtocol | None = None

    def connectionMade(self) -> None:
        target = self._factory.target
        lines = [b"CONNECT " + target + b" HTTP/1.1", b"Host: " + target]
        if self._factory.authorization is not None:
            lines.append(b"Proxy-Authorization: " + self._factory.authorization)
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self._tunnelled is not None:
            self._tunnelled.dataReceived(data)
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end == -1:
            if len(self._buffer) > MAX_CONNECT_RESPONSE_BYTES:
                self._refuse("the proxy's answer to CONNECT is too long")
            return
        head, rest = self._buffer[: end + 4], self._buffer[end + 4 :]
        self._buffer = b""
        status = _STATUS_LINE.match(head)
        if status is None or status.group(1) != b"200":
            line = head.split(b"\r\n", 1)[0][:100].decode("ascii", "replace")
            self._refuse(f"the proxy refused the tunnel: {line!r}")
            return
        assert self.transport is not None
        tunnelled = self._factory.wrapped.buildProtocol(self.transport.getPeer())
        if tunnelled is None:
            self._refuse("no protocol for the tunnel")
            return
        self._tunnelled = tunnelled
        tunnelled.makeConnection(self.transport)
        self._factory.connected(tunnelled)
        if rest:
            tunnelled.dataReceived(rest)

    def _refuse(self, message: str) -> None:
        self._factory.failed(OutboundRequestError(message))
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self._tunnelled is not None:
            self._tunnelled.connectionLost(reason)
        else:
            self._factory.failed(
                OutboundRequestError(f"the proxy closed the connection: {reason.getErrorMessage()}")
            )


class _TunnelFactory(protocol.ClientFactory):
    def __init__(
        self, wrapped: IProtocolFactory, target: bytes, authorization: bytes | None
    ) -> None:
        self.wrapped = wrapped
        self.target = target
        self.authorization = authorization
        self.done: defer.Deferred[IProtocol] = defer.Deferred()

    def buildProtocol(self, addr: Any) -> _TunnelProtocol:
        return _TunnelProtocol(self)

    def connected(self, tunnelled: IProtocol) -> None:
        if not self.done.called:
            self.done.callback(tunnelled)

    def failed(self, error: Exception) -> None:
        if not self.done.called:
            self.done.errback(error)


@implementer(IStreamClientEndpoint)
class TunnelEndpoint:
    """Connects to ``host``:``port`` through a ``CONNECT`` tunnel of the
    proxy that ``proxy`` reaches."""

    def __init__(
        self, proxy: IStreamClientEndpoint, host: str, port: int, authorization: bytes | None
    ) -> None:
        self._proxy = proxy
        bracketed = f"[{host}]" if ":" in host else host
        self._target = f"{bracketed}:{port}".encode("idna")
        self._authorization = authorization

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        tunnel = _TunnelFactory(protocolFactory, self._target, self._authorization)
        connecting = self._proxy.connect(tunnel)
        proxy_protocol: list[IProtocol] = []

        def cancel(_: object) -> None:
            if not connecting.called:
                connecting.cancel()
            for connected in proxy_protocol:
                transport = getattr(connected, "transport", None)
                if transport is not None:
                    transport.abortConnection()

        done: defer.Deferred[IProtocol] = defer.Deferred(cancel)

        def proxy_connected(connected: IProtocol) -> None:
            proxy_protocol.append(connected)

        def tunnel_up(tunnelled: IProtocol) -> None:
            if done.called:  # cancelled meanwhile
                cancel(None)
            else:
                done.callback(tunnelled)

        def tunnel_failed(failure: Failure) -> None:
            if not done.called:
                done.errback(failure)

        connecting.addCallbacks(proxy_connected, tunnel_failed)
        tunnel.done.addCallbacks(tunnel_up, tunnel_failed)
        return done
