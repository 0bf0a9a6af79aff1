"""A web site of the tests' own on loopback, serving the pages URL previews
are tested against, and counting who asked for what."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, cast

from twisted.internet import defer, reactor, task
from twisted.internet.interfaces import IListeningPort, ITCPTransport
from twisted.internet.protocol import ServerFactory
from twisted.protocols.policies import WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from tests.images import jpeg, png
from tests.utils import port_number

OG_PAGE = b"""<!DOCTYPE html>
<html><head>
<title>Not this title</title>
<meta property="og:title" content="The OG title">
<meta property="og:description" content="What the page is about">
<meta property="og:image" content="/image.png">
<meta property="og:type" content="article">
</head><body><p>Body text</p></body></html>"""

PLAIN_PAGE = b"""<html><head><title>Plain page</title>
<meta name="description" content="A page without Open Graph tags"></head>
<body><h1>Heading</h1><img src="/small.jpg" width="200" height="100"></body></html>"""

CP1251_PAGE = (
    '<html><head><meta http-equiv="Content-Type" content="text/html; charset=windows-1251">'
    "<title>Заголовок страницы</title></head><body><p>Текст</p></body></html>"
).encode("cp1251")

OEMBED_PAGE = b"""<html><head><title>Page title</title>
<link rel="alternate" type="application/json+oembed" href="/oembed.json"></head>
<body><p>Some text</p></body></html>"""


def oembed_answer(title: str) -> bytes:
    return json.dumps(
        {
            "version": "1.0",
            "type": "video",
            "title": title,
            "author_name": "An Author",
            "provider_name": "Test Provider",
            "thumbnail_url": "/small.jpg",
            "cache_age": 7200,
            "width": 640,
            "height": 360,
            "html": "<iframe src='/player'></iframe>",
        }
    ).encode()


class PreviewSite(Resource):
    """Pages by path; ``hits`` counts requests per path and ``headers`` keeps
    each request's headers."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.hits: Counter[str] = Counter()
        self.headers: dict[str, dict[bytes, list[bytes]]] = {}
        self.image = png(640, 480)
        self.small = jpeg(200, 100)
        # Where /redirect sends the client.
        self.redirect_to = ""
        self.big_size = 100_000
        self.slow_seconds = 0.5
        self._stalled: list[Request] = []

    def _send(self, request: Request, body: bytes, content_type: bytes) -> bytes:
        request.setHeader(b"Content-Type", content_type)
        return body

    def render_GET(self, request: Request) -> Any:
        path = request.path.decode()
        self.hits[path] += 1
        self.headers[path] = {k: list(v) for k, v in request.requestHeaders.getAllRawHeaders()}
        pages = {
            "/og.html": (OG_PAGE, b"text/html; charset=utf-8"),
            "/plain.html": (PLAIN_PAGE, b"text/html"),
            "/cp1251.html": (CP1251_PAGE, b"text/html"),
            "/oembed-page.html": (OEMBED_PAGE, b"text/html"),
            "/image.png": (self.image, b"image/png"),
            "/small.jpg": (self.small, b"image/jpeg"),
            "/video/1": (b"<html><title>not read</title></html>", b"text/html"),
            "/oembed.json": (oembed_answer("Discovered"), b"application/json"),
            "/provider": (oembed_answer("From the provider"), b"application/json"),
            "/big.html": (b"<html><body>" + b"x" * self.big_size, b"text/html"),
            "/video.mp4": (b"\x00\x00\x00\x18ftypmp42", b"video/mp4"),
        }
        if path in pages:
            body, content_type = pages[path]
            if path == "/image.png":
                request.setHeader(b"Content-Disposition", b'inline; filename="picture.png"')
            return self._send(request, body, content_type)
        if path == "/redirect":
            request.redirect(self.redirect_to.encode())
            return b""
        if path == "/slow.html":
            request.setHeader(b"Content-Type", b"text/html")

            def finish() -> None:
                request.write(b"<html><head><title>Slow</title></head></html>")
                request.finish()

            task.deferLater(reactor, self.slow_seconds, finish)
            return NOT_DONE_YET
        if path == "/stall.html":
            request.setHeader(b"Content-Type", b"text/html")
            request.setHeader(b"Content-Length", b"100000")
            request.write(b"<html><head><title>Never finished")
            self._stalled.append(request)
            return NOT_DONE_YET
        request.setResponseCode(404)
        return self._send(request, b"<html>missing</html>", b"text/html")

    def close_stalled(self) -> None:
        for request in self._stalled:
            if request.channel is not None and request.channel.transport is not None:
                request.channel.transport.loseConnection()
        self._stalled = []


async def serve(site: PreviewSite, interface: str = "127.0.0.1") -> tuple[int, Any]:
    """Serve ``site`` on a free port of ``interface``; returns the port and
    what stops it, every connection cut (a pooled client connection would
    otherwise outlive the test)."""
    tracking = WrappingFactory(Site(site, timeout=None))
    # Twisted types a listening factory as a ServerFactory; a WrappingFactory
    # (a ClientFactory) serves as well.
    serving = cast(ServerFactory[Any], tracking)
    port: IListeningPort = reactor.listenTCP(0, serving, interface=interface)

    async def stop() -> None:
        site.close_stalled()
        await defer.maybeDeferred(port.stopListening)
        for connection in list(tracking.protocols):
            ITCPTransport(connection.transport).abortConnection()
        # Let both ends see the connections go.
        await task.deferLater(reactor, 0.05, lambda: None)

    return port_number(port), stop
