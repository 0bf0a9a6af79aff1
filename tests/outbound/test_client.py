"""The outbound client against real servers on loopback: every address of
a name, the next one when one refuses, names and redirects into blocked
ranges refused before any connection, bounded and stalled bodies, and
forward proxies."""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer, reactor, ssl, task
from twisted.trial import unittest
from twisted.web.http_headers import Headers

from mediarepo.outbound import (
    BlockedAddressError,
    BodyTooLargeError,
    IPRangeFilter,
    OutboundClient,
    OutboundRequestError,
    OutboundSettings,
    PeerStalledError,
    ProxySettings,
    TLSPolicy,
)
from tests.outbound.servers import CountingSite, ForwardProxy, Recorder, listen
from tests.outbound.test_addresses import names
from tests.tls import TestCA

ALLOW_ALL = IPRangeFilter([], [])


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def _tls_for_localhost() -> tuple[Any, TLSPolicy]:
    """A server's TLS context for ``localhost``, and a client policy trusting it."""
    ca = TestCA(tempfile.mkdtemp())
    cert, key = ca.issue("localhost")
    with open(cert, "rb") as c, open(key, "rb") as k:
        context = ssl.PrivateCertificate.loadPEM(c.read() + k.read()).options()
    return context, TLSPolicy.from_ca_files((ca.ca_path,))


class ClientCase(unittest.TestCase):
    def setUp(self) -> None:
        self.recorder = Recorder()
        self.site = CountingSite(self.recorder)

    def client(
        self,
        ip_filter: IPRangeFilter = ALLOW_ALL,
        mapping: dict[str, Sequence[str]] | None = None,
        **settings: Any,
    ) -> OutboundClient:
        client = OutboundClient(
            reactor,
            OutboundSettings(ip_filter=ip_filter, **settings),
            name_resolver=names(mapping or {}),
        )

        async def close() -> None:
            # An answer whose body the test gave up on may still be being
            # parsed (the test ran inside its dataReceived): let it finish
            # and return its connection to the pool, then close them all.
            await task.deferLater(reactor, 0, lambda: None)
            await client.close()

        self.addCleanup(lambda: defer.ensureDeferred(close()))
        return client

    async def fetch_text(self, client: OutboundClient, url: str) -> tuple[int, bytes]:
        response = await client.get(url)
        return response.code, await client.read_limited_body(response, 1024)


class AddressTests(ClientCase):
    async def test_ipv6_loopback(self) -> None:
        if not _ipv6_loopback():
            raise unittest.SkipTest("no IPv6 loopback here")
        port = listen(self, self.site, "::1")
        client = self.client(mapping={"six.test": ["::1"]})
        self.assertEqual(
            await self.fetch_text(client, f"http://six.test:{port}/hello"), (200, b"hello")
        )
        self.assertEqual(
            await self.fetch_text(client, f"http://[::1]:{port}/hello"), (200, b"hello")
        )

    async def test_next_address_when_one_refuses(self) -> None:
        port = listen(self, self.site, "127.0.0.1")
        # Nothing listens on the first two (IPv6 and another loopback address).
        client = self.client(mapping={"two.test": ["::1", "127.0.0.2", "127.0.0.1"]})
        response = await client.get(f"http://two.test:{port}/hello")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.url, f"http://two.test:{port}/hello")
        self.assertEqual(await client.read_limited_body(response, 100), b"hello")
        self.assertEqual(self.recorder.requests[0][1][b"host"], f"two.test:{port}".encode())

    async def test_no_address_accepts(self) -> None:
        port = listen(self, self.site, "127.0.0.1")
        client = self.client(mapping={"none.test": ["127.0.0.2", "127.0.0.3"]})
        with self.assertRaises(OutboundRequestError) as caught:
            await client.get(f"http://none.test:{port}/hello")
        self.assertIn("127.0.0.3", str(caught.exception))

    async def test_one_blocked_address_refuses_without_connecting(self) -> None:
        port = listen(self, self.site, "127.0.0.1")
        client = self.client(
            IPRangeFilter(["10.0.0.0/8"], []), mapping={"mixed.test": ["127.0.0.1", "10.0.0.1"]}
        )
        with self.assertRaises(BlockedAddressError):
            await client.get(f"http://mixed.test:{port}/hello")
        self.assertEqual(self.site.connections, 0)

    async def test_connect_to_and_tls_name(self) -> None:
        context, trust = _tls_for_localhost()
        port = listen(self, self.site, "127.0.0.1", context)
        client = self.client(tls=trust)
        # The URL names the server; the connection goes where SRV said,
        # and the certificate is checked against the name given.
        response = await client.request(
            b"GET",
            "https://server.test/hello",
            headers=Headers({b"Host": [b"server.test"]}),
            connect_to=("127.0.0.1", port),
            tls_name="localhost",
        )
        self.assertEqual(await client.read_limited_body(response, 100), b"hello")
        self.assertEqual(self.recorder.requests[0][1][b"host"], b"server.test")
        # Checked against another name, the certificate fails.
        with self.assertRaises(OutboundRequestError):
            await client.request(
                b"GET", "https://server.test/hello", connect_to=("127.0.0.1", port)
            )

    async def test_unusable_urls(self) -> None:
        client = self.client()
        for url in (
            "ftp://example.test/",
            "file:///etc/passwd",
            "http:///nohost",
            "http://example.test:99999/",
            "http://[::1/",
            "http://example.test/a b",
            "http://example.test/\r\nX-Injected: 1",
        ):
            with self.assertRaises(OutboundRequestError):
                await client.get(url)


class RedirectTests(ClientCase):
    async def test_redirects_are_followed(self) -> None:
        port = listen(self, self.site, "127.0.0.1")
        client = self.client()
        target = f"http://127.0.0.1:{port}/hello"
        response = await client.get(f"http://127.0.0.1:{port}/redirect?to={target}")
        self.assertEqual((response.code, response.url), (200, target))
        self.assertEqual(await client.read_limited_body(response, 100), b"hello")

    async def test_redirect_into_a_blocked_range_is_not_contacted(self) -> None:
        port = listen(self, self.site, "127.0.0.1")
        inside = CountingSite(Recorder())
        inside_port = listen(self, inside, "127.0.0.2")
        client = self.client(
            IPRangeFilter(["127.0.0.0/8"], ["127.0.0.1/32"]),
            mapping={"inside.test": ["127.0.0.2"]},
        )
        for target in (f"http://127.0.0.2:{inside_port}/", f"http://inside.test:{inside_port}/"):
            with self.assertRaises(BlockedAddressError):
                await client.get(f"http://127.0.0.1:{port}/redirect?to={target}")
        self.assertEqual(inside.connections, 0)
        self.assertEqual(len(self.recorder.requests), 2)

    async def test_redirect_loops_end(self) -> None:
        port = listen(self, self.site, "127.0.0.1")
        client = self.client()
        with self.assertRaises(OutboundRequestError):
            await client.get(f"http://127.0.0.1:{port}/loop", max_redirects=3)
        self.assertEqual(len(self.recorder.requests), 4)

    async def test_redirect_to_another_scheme_is_refused(self) -> None:
        port = listen(self, self.site, "127.0.0.1")
        client = self.client()
        with self.assertRaises(OutboundRequestError):
            await client.get(f"http://127.0.0.1:{port}/redirect?to=file:///etc/passwd")


class BodyTests(ClientCase):
    async def test_declared_body_over_the_limit(self) -> None:
        port = listen(self, self.site, "127.0.0.1")
        client = self.client()
        response = await client.get(f"http://127.0.0.1:{port}/big?n=5000")
        self.assertEqual(response.length, 5000)
        with self.assertRaises(BodyTooLargeError):
            await client.read_limited_body(response, 4096)

    async def test_undeclared_body_over_the_limit(self) -> None:
        port = listen(self, self.site, "127.0.0.1")
        client = self.client()
        response = await client.get(f"http://127.0.0.1:{port}/chunked?n=500000")
        self.assertIsNone(response.length)
        with self.assertRaises(BodyTooLargeError):
            await client.read_limited_body(response, 4096)
        # Within the limit it arrives whole.
        response = await client.get(f"http://127.0.0.1:{port}/chunked?n=4096")
        self.assertEqual(len(await client.read_limited_body(response, 4096)), 4096)

    async def test_stalled_body_is_cut(self) -> None:
        port = listen(self, self.site, "127.0.0.1")
        client = self.client(idle_timeout=0.2)
        response = await client.get(f"http://127.0.0.1:{port}/stall")
        received: list[bytes] = []
        with self.assertRaises(PeerStalledError):
            await client.read_body(response, received.append)
        self.assertEqual(b"".join(received), b"start")
        # The server sees its connection go.
        [request] = self.recorder.hanging
        await request.notifyFinish().addErrback(lambda _: None)
        self.assertEqual(len(self.recorder.lost), 1)

    async def test_no_answer_within_the_response_timeout(self) -> None:
        port = listen(self, self.site, "127.0.0.1")
        client = self.client(response_timeout=0.2)
        with self.assertRaises(OutboundRequestError):
            await client.get(f"http://127.0.0.1:{port}/silent")

    async def test_error_body_prefix_and_dropped_body(self) -> None:
        port = listen(self, self.site, "127.0.0.1")
        client = self.client()
        response = await client.get(f"http://127.0.0.1:{port}/error")
        self.assertEqual(response.code, 500)
        prefix = await client.read_body_prefix(response, 24)
        self.assertEqual(prefix, b'{"errcode": "M_UNKNOWN"}')
        response = await client.get(f"http://127.0.0.1:{port}/big?n=100000")
        client.drop_body(response)
        # The client goes on working on a fresh connection.
        self.assertEqual(
            await self.fetch_text(client, f"http://127.0.0.1:{port}/hello"), (200, b"hello")
        )


class ProxyTests(ClientCase):
    def proxy(self, upstream_port: int | None = None) -> tuple[ForwardProxy, int]:
        proxy = ForwardProxy(upstream_port)
        return proxy, listen(self, proxy, "127.0.0.1")

    async def test_https_through_a_connect_tunnel(self) -> None:
        context, trust = _tls_for_localhost()
        port = listen(self, self.site, "127.0.0.1", context)
        proxy, proxy_port = self.proxy()
        client = self.client(
            # The target is resolved by the proxy, not checked here (as in Synapse).
            IPRangeFilter(["127.0.0.0/8"], []),
            tls=trust,
            proxy=ProxySettings(https_proxy=f"http://user:secret@127.0.0.1:{proxy_port}"),
        )
        self.assertEqual(
            await self.fetch_text(client, f"https://localhost:{port}/hello"), (200, b"hello")
        )
        [head] = proxy.requests
        self.assertTrue(head.startswith(f"CONNECT localhost:{port} HTTP/1.1\r\n".encode()))
        # user:secret
        self.assertIn(b"Proxy-Authorization: Basic dXNlcjpzZWNyZXQ=", head)

    async def test_http_through_the_proxy(self) -> None:
        port = listen(self, self.site, "127.0.0.1")
        proxy, proxy_port = self.proxy(upstream_port=port)
        client = self.client(
            IPRangeFilter(["127.0.0.0/8"], []),
            proxy=ProxySettings(http_proxy=f"127.0.0.1:{proxy_port}"),
        )
        url = f"http://far.test:{port}/hello?x=1"
        self.assertEqual(await self.fetch_text(client, url), (200, b"hello"))
        self.assertEqual(self.recorder.requests[0][0], url.encode())
        self.assertEqual(len(proxy.requests), 1)

    async def test_no_proxy_hosts_go_direct_and_are_checked(self) -> None:
        port = listen(self, self.site, "127.0.0.1")
        proxy, proxy_port = self.proxy(upstream_port=port)
        client = self.client(
            IPRangeFilter(["127.0.0.0/8"], []),
            mapping={"local.test": ["127.0.0.1"]},
            proxy=ProxySettings(
                http_proxy=f"http://127.0.0.1:{proxy_port}", no_proxy=("example.org", "local.test")
            ),
        )
        with self.assertRaises(BlockedAddressError):
            await client.get(f"http://local.test:{port}/hello")
        self.assertEqual((proxy.requests, self.site.connections), ([], 0))

    async def test_proxy_refusing_the_tunnel(self) -> None:
        proxy, proxy_port = self.proxy()
        proxy.refuse = True
        client = self.client(proxy=ProxySettings(https_proxy=f"http://127.0.0.1:{proxy_port}"))
        with self.assertRaises(OutboundRequestError) as caught:
            await client.get("https://localhost:1/hello")
        self.assertIn("403", str(caught.exception))


class ProxySettingsTests(unittest.TestCase):
    def test_from_environment(self) -> None:
        self.assertIsNone(ProxySettings.from_environment({"no_proxy": "x"}))
        settings = ProxySettings.from_environment(
            {
                "HTTPS_PROXY": "http://upper:3128",
                "https_proxy": "http://lower:3128",
                "HTTP_PROXY": "proxy",
                "no_proxy": "a.test, .b.test,,",
            }
        )
        self.assertEqual(
            settings,
            ProxySettings(
                http_proxy="proxy",
                https_proxy="http://lower:3128",
                no_proxy=("a.test", ".b.test"),
            ),
        )
        assert settings is not None
        proxy = settings.proxy_for("https", "example.org")
        assert proxy is not None
        self.assertEqual((proxy.host, proxy.port, proxy.secure), ("lower", 3128, False))
        default_port = settings.proxy_for("http", "example.org")
        assert default_port is not None
        self.assertEqual(default_port.port, 1080)
        self.assertIsNone(settings.proxy_for("https", "a.test"))
        self.assertIsNone(settings.proxy_for("https", "c.b.test"))

    def test_no_proxy_entries(self) -> None:
        settings = ProxySettings(
            https_proxy="proxy:3128", no_proxy=(".example.org", "10.0.0.0/8", "host.test")
        )
        for host, bypassed in {
            "example.org": True,
            "www.example.org": True,
            "badexample.org": False,
            "10.1.2.3": True,
            "11.1.2.3": False,
            "HOST.test.": True,
            "other.test": False,
        }.items():
            self.assertEqual(settings.bypasses(host), bypassed, host)
        self.assertTrue(ProxySettings(https_proxy="p", no_proxy=("*",)).bypasses("any.test"))

    def test_cgi_http_proxy_header_is_ignored(self) -> None:
        environ = {"REQUEST_METHOD": "GET", "HTTP_PROXY": "evil:1", "https_proxy": "good:1"}
        settings = ProxySettings.from_environment(environ)
        assert settings is not None
        self.assertIsNone(settings.http_proxy)

    def test_bad_proxies_are_refused(self) -> None:
        for url in ("socks5://proxy:1080", "http://", "http://proxy:notaport"):
            with self.assertRaises(ValueError):
                ProxySettings(https_proxy=url)


class CancelTests(ClientCase):
    async def test_cancelled_request_leaves_nothing_running(self) -> None:
        port = listen(self, self.site, "127.0.0.1")
        client = self.client()
        requesting = defer.ensureDeferred(client.get(f"http://127.0.0.1:{port}/silent"))
        await self.recorder.first_hang
        requesting.cancel()
        with self.assertRaises(defer.CancelledError):
            await requesting
