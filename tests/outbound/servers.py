"""Small loopback servers for the outbound client's tests: a web server
that records what reaches it, and a forward proxy (CONNECT tunnels and
absolute-URI requests)."""

from __future__ import annotations

from typing import Any, cast

from treq.testing import RequestTraversalAgent
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import (
    IListeningPort,
    IPushProducer,
    IReactorSSL,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, ServerFactory
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from mediarepo.outbound import IPRangeFilter, OutboundClient, OutboundSettings
from tests.utils import port_number


class Recorder(Resource):
    """Answers every path (absolute-URI requests too), recording each
    request's URI and headers.

    ``/hello``: ``hello``; ``/redirect?to=URL``: a 302 there; ``/big?n=N``:
    N bytes with a Content-Length, ``/chunked?n=N`` without; ``/stall``: a
    few bytes, then nothing; ``/silent``: no answer at all; ``/error``: a
    500 with a long body."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[bytes, dict[bytes, bytes]]] = []
        # Requests left hanging, and whether their connection has gone.
        self.hanging: list[Any] = []
        self.lost: list[Any] = []
        self.first_hang: defer.Deferred[None] = defer.Deferred()

    def render_GET(self, request: Any) -> Any:
        headers = {k.lower(): v[0] for k, v in request.requestHeaders.getAllRawHeaders()}
        self.requests.append((request.uri, headers))
        path = request.path.rsplit(b"/", 1)[-1]
        if path == b"hello":
            return b"hello"
        if path == b"loop":
            request.redirect(b"/loop")
            return b"again"
        if path == b"redirect":
            request.redirect(request.args[b"to"][0])
            return b"moved"
        if path in (b"big", b"chunked"):
            size = int(request.args[b"n"][0])
            if path == b"big":
                request.setHeader(b"Content-Length", str(size).encode())
            request.write(b"x" * size)
            request.finish()
            return NOT_DONE_YET
        if path in (b"stall", b"silent"):
            if path == b"stall":
                request.write(b"start")
            self.hanging.append(request)
            if not self.first_hang.called:
                self.first_hang.callback(None)
            request.notifyFinish().addErrback(self.lost.append)
            return NOT_DONE_YET
        if path == b"error":
            request.setResponseCode(500)
            return b'{"errcode": "M_UNKNOWN"}' + b" " * 100_000
        request.setResponseCode(404)
        return b"no such thing"


class CountingSite(Site):
    """A site that counts the connections made to it."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.connections = 0

    def buildProtocol(self, addr: Any) -> Any:
        self.connections += 1
        return super().buildProtocol(addr)


class _Tracked(ProtocolWrapper):
    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        super().connectionLost(reason)
        assert isinstance(self.factory, _Tracking)
        for waiting in self.factory.waiting.pop(self, []):
            waiting.callback(None)


class _Tracking(WrappingFactory):
    """Keeps the live connections, to close them when the test ends."""

    protocol = _Tracked

    def __init__(self, wrapped: Factory[Any]) -> None:
        super().__init__(wrapped)
        self.waiting: dict[Any, list[defer.Deferred[None]]] = {}

    async def close(self) -> None:
        closing = []
        for connection in list(self.protocols):
            lost: defer.Deferred[None] = defer.Deferred()
            self.waiting.setdefault(connection, []).append(lost)
            closing.append(lost)
            ITCPTransport(connection.transport).abortConnection()
        await defer.gatherResults(closing)


def listen(
    case: unittest.TestCase,
    factory: Factory[Any],
    interface: str = "127.0.0.1",
    context: Any = None,
) -> int:
    """Serve ``factory`` on a free port of ``interface`` until the test
    ends (then its connections are cut too)."""
    tracking = _Tracking(factory)
    port: IListeningPort
    # Twisted types a listening factory as a ServerFactory; a WrappingFactory
    # (a ClientFactory) serves as well.
    serving = cast(ServerFactory[Any], tracking)
    if context is None:
        port = reactor.listenTCP(0, serving, interface=interface)
    else:
        port = IReactorSSL(reactor).listenSSL(0, serving, context, interface=interface)
    case.addCleanup(lambda: defer.ensureDeferred(tracking.close()))
    case.addCleanup(port.stopListening)
    return port_number(port)


class _Relay(protocol.Protocol):
    def __init__(self, peer: protocol.Protocol) -> None:
        self.peer = peer

    def dataReceived(self, data: bytes) -> None:
        assert self.peer.transport is not None
        self.peer.transport.write(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.peer.transport is not None:
            self.peer.transport.loseConnection()


class _ProxyConnection(protocol.Protocol):
    def __init__(self, proxy: ForwardProxy) -> None:
        self.proxy = proxy
        self.buffer = b""
        self.upstream: _Relay | None = None

    def dataReceived(self, data: bytes) -> None:
        if self.upstream is not None:
            assert self.upstream.transport is not None
            self.upstream.transport.write(data)
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        head = self.buffer.split(b"\r\n\r\n", 1)[0]
        self.proxy.requests.append(head)
        request_line = head.split(b"\r\n", 1)[0]
        assert self.transport is not None
        if self.proxy.refuse:
            self.transport.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            self.transport.loseConnection()
            return
        if request_line.startswith(b"CONNECT "):
            host, _, port = request_line.split(b" ")[1].rpartition(b":")
            self.buffer = b""
            self._connect(host.decode(), int(port), b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            # An absolute-URI request: passed whole to the one upstream.
            assert self.proxy.upstream_port is not None
            self._connect("127.0.0.1", self.proxy.upstream_port, b"")

    def _connect(self, host: str, port: int, answer: bytes) -> None:
        # Every target name is taken to be this machine.
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        IPushProducer(self.transport).pauseProducing()
        relay = _Relay(self)

        def connected(_: Any) -> None:
            self.upstream = relay
            assert self.transport is not None
            self.transport.write(answer)
            if self.buffer:
                assert relay.transport is not None
                relay.transport.write(self.buffer)
                self.buffer = b""
            IPushProducer(self.transport).resumeProducing()

        def failed(_: Failure) -> None:
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
            self.transport.loseConnection()

        connecting = endpoint.connect(protocol.Factory.forProtocol(lambda: relay))
        connecting.addCallbacks(connected, failed)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.loseConnection()


class ForwardProxy(protocol.Factory):
    """Records each request head it receives; tunnels CONNECTs and relays
    other requests to ``upstream_port``; refuses everything if ``refuse``."""

    def __init__(self, upstream_port: int | None = None) -> None:
        self.upstream_port = upstream_port
        self.requests: list[bytes] = []
        self.refuse = False

    def buildProtocol(self, addr: Any) -> _ProxyConnection:
        return _ProxyConnection(self)


def in_memory_client(
    clock: Any, resource: Resource, **settings: Any
) -> tuple[OutboundClient, RequestTraversalAgent]:
    """An outbound client on ``clock`` whose requests all reach
    ``resource`` in memory (treq's traversal agent; call its ``flush`` to
    move bytes), for unit tests of what is built on the client. Address
    resolution and filtering are bypassed: test_client covers them."""
    agent = RequestTraversalAgent(resource)
    client = OutboundClient(
        clock, OutboundSettings(ip_filter=IPRangeFilter([], []), **settings), agent=agent
    )
    return client, agent
