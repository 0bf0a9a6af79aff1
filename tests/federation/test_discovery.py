"""Server discovery, against fake well-known and SRV answers and a fake clock."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Coroutine
from email.utils import formatdate
from typing import Any, TypeVar

from treq.testing import RequestTraversalAgent
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.names import client as dns_client
from twisted.names import dns, error
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.util import Redirect

from mediarepo.federation.discovery import (
    WELL_KNOWN_FAILURE_CACHE_SECONDS,
    WELL_KNOWN_MAX_BYTES,
    WELL_KNOWN_MAX_CACHE_SECONDS,
    WELL_KNOWN_MIN_CACHE_SECONDS,
    WELL_KNOWN_RETRY_SECONDS,
    FederationTarget,
    ServerResolver,
    SrvRecord,
    WellKnownResponse,
    make_well_known_fetcher,
    order_srv_records,
    split_server_name,
    well_known_cache_seconds,
)
from mediarepo.outbound import PeerStalledError
from tests.outbound.servers import in_memory_client

T = TypeVar("T")

HOUR = 3600.0
NOW = 1_700_000_000.0


def delegating(server: object, **headers: str) -> WellKnownResponse:
    return 200, dict(headers), json.dumps({"m.server": server}).encode()


class FakeWellKnown:
    """Answers by host; an exception instance is raised; records the asks."""

    def __init__(self) -> None:
        self.answers: dict[str, WellKnownResponse | Exception | defer.Deferred[Any]] = {}
        self.asked: list[str] = []

    async def __call__(self, host: str) -> WellKnownResponse:
        self.asked.append(host)
        answer = self.answers.get(host, (404, {}, b""))
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, defer.Deferred):
            result: WellKnownResponse = await answer
            return result
        return answer


class FakeSrv:
    def __init__(self) -> None:
        self.records: dict[str, list[SrvRecord] | Exception] = {}
        self.asked: list[str] = []

    async def __call__(self, name: str) -> list[SrvRecord]:
        self.asked.append(name)
        records = self.records.get(name, [])
        if isinstance(records, Exception):
            raise records
        return records


class ResolverTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.well_known = FakeWellKnown()
        self.srv = FakeSrv()
        self.resolver = ServerResolver(
            self.clock,
            http_get_well_known=self.well_known,
            srv_lookup=self.srv,
            clock=self.clock,
            rng=random.Random(0),
        )

    def run_async(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.successResultOf(defer.ensureDeferred(coroutine))

    def resolve(self, server_name: str) -> list[FederationTarget]:
        return self.run_async(self.resolver.resolve(server_name))


class DirectTests(ResolverTestCase):
    def assertDirect(self, server_name: str, host: str, port: int) -> None:
        self.assertEqual(self.resolve(server_name), [FederationTarget(host, port, server_name)])
        self.assertEqual(self.well_known.asked, [])
        self.assertEqual(self.srv.asked, [])

    def test_ipv4(self) -> None:
        self.assertDirect("192.0.2.1", "192.0.2.1", 8448)
        self.assertDirect("192.0.2.1:8000", "192.0.2.1", 8000)

    def test_ipv6(self) -> None:
        self.assertDirect("[2001:db8::1]", "2001:db8::1", 8448)
        self.assertDirect("[::1]:443", "::1", 443)

    def test_hostname_with_port(self) -> None:
        self.assertDirect("example.com:8443", "example.com", 8443)
        self.assertDirect("localhost:8448", "localhost", 8448)

    def test_invalid_server_names(self) -> None:
        for name in ("", "exa mple.com", "example.com:0", "example.com:", "::1", "[::1", "a/b"):
            resolving = defer.ensureDeferred(self.resolver.resolve(name))
            self.failureResultOf(resolving, ValueError)

    def test_split_server_name(self) -> None:
        self.assertEqual(split_server_name("example.com"), ("example.com", None))
        self.assertEqual(split_server_name("example.com:1"), ("example.com", 1))
        self.assertEqual(split_server_name("[::1]"), ("::1", None))
        self.assertEqual(split_server_name("[::1]:80"), ("::1", 80))
        self.assertEqual(split_server_name("1.2.3.4:5"), ("1.2.3.4", 5))


class WellKnownTests(ResolverTestCase):
    def test_delegation_with_port(self) -> None:
        self.well_known.answers["example.com"] = delegating("matrix.example.com:443")
        self.assertEqual(
            self.resolve("example.com"),
            [FederationTarget("matrix.example.com", 443, "matrix.example.com:443")],
        )
        self.assertEqual(self.well_known.asked, ["example.com"])
        self.assertEqual(self.srv.asked, [])

    def test_delegation_to_ip_literal(self) -> None:
        self.well_known.answers["example.com"] = delegating("[2001:db8::5]")
        self.assertEqual(
            self.resolve("example.com"), [FederationTarget("2001:db8::5", 8448, "[2001:db8::5]")]
        )
        self.well_known.answers["example.org"] = delegating("192.0.2.7:8000")
        self.assertEqual(
            self.resolve("example.org"), [FederationTarget("192.0.2.7", 8000, "192.0.2.7:8000")]
        )
        self.assertEqual(self.srv.asked, [])

    def test_delegation_then_srv(self) -> None:
        self.well_known.answers["example.com"] = delegating("matrix.example.com")
        self.srv.records["_matrix-fed._tcp.matrix.example.com"] = [(0, 0, 8443, "host1.example.")]
        self.assertEqual(
            self.resolve("example.com"),
            # The Host header is the delegated name, not the SRV target.
            [FederationTarget("host1.example", 8443, "matrix.example.com")],
        )
        self.assertEqual(self.srv.asked, ["_matrix-fed._tcp.matrix.example.com"])

    def test_delegation_without_srv(self) -> None:
        self.well_known.answers["example.com"] = delegating("matrix.example.com")
        self.assertEqual(
            self.resolve("example.com"),
            [FederationTarget("matrix.example.com", 8448, "matrix.example.com")],
        )
        self.assertEqual(
            self.srv.asked,
            ["_matrix-fed._tcp.matrix.example.com", "_matrix._tcp.matrix.example.com"],
        )

    def test_no_well_known(self) -> None:
        self.assertEqual(
            self.resolve("example.com"), [FederationTarget("example.com", 8448, "example.com")]
        )
        self.assertEqual(self.well_known.asked, ["example.com"])
        self.assertEqual(
            self.srv.asked, ["_matrix-fed._tcp.example.com", "_matrix._tcp.example.com"]
        )

    def test_invalid_m_server(self) -> None:
        bad_answers: list[WellKnownResponse] = [
            delegating("not a server name"),
            delegating("example.com:99999"),
            delegating(""),
            delegating(42),
            delegating(None),
            delegating(["matrix.example.com"]),
            (200, {}, b"{}"),
            (200, {}, b'{"m.server": "matrix.example.com"'),
            (200, {}, b'["matrix.example.com"]'),
            (200, {}, b"\xff\xfe"),
            (
                200,
                {},
                json.dumps({"m.server": "a.example", "pad": "x" * WELL_KNOWN_MAX_BYTES}).encode(),
            ),
            (301, {}, json.dumps({"m.server": "matrix.example.com"}).encode()),
            (500, {}, json.dumps({"m.server": "matrix.example.com"}).encode()),
        ]
        for index, answer in enumerate(bad_answers):
            name = f"host{index}.example"
            self.well_known.answers[name] = answer
            self.assertEqual(
                self.resolve(name), [FederationTarget(name, 8448, name)], repr(answer)[:100]
            )
            self.assertEqual(
                self.srv.asked[-2:], [f"_matrix-fed._tcp.{name}", f"_matrix._tcp.{name}"]
            )

    def test_fetch_errors(self) -> None:
        self.well_known.answers["example.com"] = ConnectionRefusedError("refused")
        self.assertEqual(self.resolve("example.com")[0].host_header, "example.com")

    def test_cached_by_max_age(self) -> None:
        self.well_known.answers["example.com"] = delegating(
            "matrix.example.com:443", **{"cache-control": "public, max-age=7200"}
        )
        self.resolve("example.com")
        self.clock.advance(7199)
        self.resolve("example.com")
        self.assertEqual(len(self.well_known.asked), 1)
        self.clock.advance(2)
        self.resolve("example.com")
        self.assertEqual(len(self.well_known.asked), 2)

    def test_default_cache_is_a_day(self) -> None:
        self.well_known.answers["example.com"] = delegating("matrix.example.com:443")
        self.resolve("example.com")
        self.clock.advance(24 * HOUR - 1)
        self.resolve("example.com")
        self.assertEqual(len(self.well_known.asked), 1)
        self.clock.advance(2)
        self.resolve("example.com")
        self.assertEqual(len(self.well_known.asked), 2)

    def test_cache_clamped(self) -> None:
        self.well_known.answers["short.example"] = delegating(
            "m.example:443", **{"cache-control": "max-age=10"}
        )
        self.well_known.answers["long.example"] = delegating(
            "m.example:443", **{"cache-control": "max-age=999999999"}
        )
        self.resolve("short.example")
        self.resolve("long.example")
        self.clock.advance(WELL_KNOWN_MIN_CACHE_SECONDS - 1)
        self.resolve("short.example")
        self.assertEqual(self.well_known.asked, ["short.example", "long.example"])
        self.clock.advance(2)
        self.resolve("short.example")
        self.assertEqual(self.well_known.asked.count("short.example"), 2)
        self.clock.advance(WELL_KNOWN_MAX_CACHE_SECONDS - WELL_KNOWN_MIN_CACHE_SECONDS - 2)
        self.resolve("long.example")
        self.assertEqual(self.well_known.asked.count("long.example"), 1)
        self.clock.advance(2)
        self.resolve("long.example")
        self.assertEqual(self.well_known.asked.count("long.example"), 2)

    def test_changed_delegation_seen_after_expiry(self) -> None:
        self.well_known.answers["example.com"] = delegating("old.example:443")
        self.assertEqual(self.resolve("example.com")[0].host, "old.example")
        self.well_known.answers["example.com"] = delegating("new.example:443")
        self.assertEqual(self.resolve("example.com")[0].host, "old.example")
        self.clock.advance(24 * HOUR + 1)
        self.assertEqual(self.resolve("example.com")[0].host, "new.example")

    def test_failure_cached_an_hour(self) -> None:
        self.resolve("example.com")
        self.well_known.answers["example.com"] = delegating("matrix.example.com:443")
        self.clock.advance(WELL_KNOWN_FAILURE_CACHE_SECONDS - 1)
        self.assertEqual(self.resolve("example.com")[0].host, "example.com")
        self.assertEqual(len(self.well_known.asked), 1)
        self.clock.advance(2)
        self.assertEqual(self.resolve("example.com")[0].host, "matrix.example.com")
        self.assertEqual(len(self.well_known.asked), 2)

    def test_exception_cached_an_hour(self) -> None:
        self.well_known.answers["example.com"] = TimeoutError()
        self.resolve("example.com")
        self.clock.advance(WELL_KNOWN_FAILURE_CACHE_SECONDS - 1)
        self.resolve("example.com")
        self.assertEqual(len(self.well_known.asked), 1)
        self.clock.advance(2)
        self.resolve("example.com")
        self.assertEqual(len(self.well_known.asked), 2)

    def test_transient_failure_keeps_last_delegation(self) -> None:
        self.well_known.answers["example.com"] = delegating(
            "matrix.example.com:443", **{"cache-control": "max-age=600"}
        )
        self.resolve("example.com")
        self.clock.advance(601)
        self.well_known.answers["example.com"] = ConnectionRefusedError()
        self.assertEqual(self.resolve("example.com")[0].host, "matrix.example.com")
        self.well_known.answers["example.com"] = (503, {}, b"")
        self.clock.advance(WELL_KNOWN_RETRY_SECONDS - 1)
        self.resolve("example.com")
        self.assertEqual(len(self.well_known.asked), 2)
        self.clock.advance(2)
        self.assertEqual(self.resolve("example.com")[0].host, "matrix.example.com")
        self.assertEqual(len(self.well_known.asked), 3)

    def test_definite_failure_ends_delegation(self) -> None:
        self.well_known.answers["example.com"] = delegating("matrix.example.com:443")
        self.resolve("example.com")
        self.clock.advance(24 * HOUR + 1)
        self.well_known.answers["example.com"] = (404, {}, b"")
        self.assertEqual(self.resolve("example.com")[0].host, "example.com")

    def test_concurrent_resolves_share_one_fetch(self) -> None:
        answer: defer.Deferred[WellKnownResponse] = defer.Deferred()
        self.well_known.answers["example.com"] = answer
        first = defer.ensureDeferred(self.resolver.resolve("example.com"))
        second = defer.ensureDeferred(self.resolver.resolve("example.com"))
        self.assertNoResult(first)
        answer.callback(delegating("matrix.example.com:443"))
        expected = [FederationTarget("matrix.example.com", 443, "matrix.example.com:443")]
        self.assertEqual(self.successResultOf(first), expected)
        self.assertEqual(self.successResultOf(second), expected)
        self.assertEqual(self.well_known.asked, ["example.com"])

    def test_host_header_keeps_the_name_as_written(self) -> None:
        self.assertEqual(
            self.resolve("Example.COM")[0], FederationTarget("Example.COM", 8448, "Example.COM")
        )
        self.resolve("example.com")
        self.assertEqual(self.well_known.asked, ["example.com"])


class CacheLifetimeTests(unittest.TestCase):
    def test_max_age(self) -> None:
        self.assertEqual(well_known_cache_seconds({"cache-control": "max-age=3600"}, NOW), 3600)
        self.assertEqual(
            well_known_cache_seconds(
                {"cache-control": 'public, MAX-AGE="7200", must-revalidate'}, NOW
            ),
            7200,
        )

    def test_max_age_wins_over_expires(self) -> None:
        headers = {"cache-control": "max-age=3600", "expires": formatdate(NOW + 7200, usegmt=True)}
        self.assertEqual(well_known_cache_seconds(headers, NOW), 3600)

    def test_expires(self) -> None:
        self.assertEqual(
            well_known_cache_seconds({"expires": formatdate(NOW + 7200, usegmt=True)}, NOW), 7200
        )
        # Relative to the answer's Date when it has one.
        headers = {
            "date": formatdate(NOW - 1000, usegmt=True),
            "expires": formatdate(NOW + 2 * HOUR - 1000, usegmt=True),
        }
        self.assertEqual(well_known_cache_seconds(headers, NOW), 2 * HOUR)

    def test_bounds(self) -> None:
        self.assertEqual(
            well_known_cache_seconds({"cache-control": "max-age=0"}, NOW),
            WELL_KNOWN_MIN_CACHE_SECONDS,
        )
        self.assertEqual(
            well_known_cache_seconds({"expires": formatdate(NOW + 10**7, usegmt=True)}, NOW),
            WELL_KNOWN_MAX_CACHE_SECONDS,
        )
        self.assertEqual(
            well_known_cache_seconds({"expires": "0"}, NOW), WELL_KNOWN_MIN_CACHE_SECONDS
        )
        self.assertEqual(
            well_known_cache_seconds({"expires": formatdate(NOW - 50, usegmt=True)}, NOW),
            WELL_KNOWN_MIN_CACHE_SECONDS,
        )
        self.assertEqual(
            well_known_cache_seconds({"cache-control": "no-store, max-age=9999"}, NOW),
            WELL_KNOWN_MIN_CACHE_SECONDS,
        )

    def test_default(self) -> None:
        self.assertEqual(well_known_cache_seconds({}, NOW), 24 * HOUR)
        self.assertEqual(
            well_known_cache_seconds({"cache-control": "max-age=soon"}, NOW), 24 * HOUR
        )
        self.assertEqual(well_known_cache_seconds({"cache-control": "public"}, NOW), 24 * HOUR)


class SrvTests(ResolverTestCase):
    def test_matrix_fed_first(self) -> None:
        self.srv.records["_matrix-fed._tcp.example.com"] = [(10, 0, 8448, "fed.example.com")]
        self.srv.records["_matrix._tcp.example.com"] = [(10, 0, 8448, "legacy.example.com")]
        self.assertEqual(
            self.resolve("example.com"), [FederationTarget("fed.example.com", 8448, "example.com")]
        )
        self.assertEqual(self.srv.asked, ["_matrix-fed._tcp.example.com"])

    def test_deprecated_matrix_service(self) -> None:
        self.srv.records["_matrix._tcp.example.com"] = [(10, 0, 443, "legacy.example.com.")]
        self.assertEqual(
            self.resolve("example.com"),
            [FederationTarget("legacy.example.com", 443, "example.com")],
        )

    def test_priority_order(self) -> None:
        self.srv.records["_matrix-fed._tcp.example.com"] = [
            (20, 0, 4, "d.example."),
            (10, 5, 3, "c.example."),
            (0, 5, 1, "a.example."),
            (0, 5, 2, "b.example."),
        ]
        for _ in range(20):
            self.clock.advance(1)
            hosts = [t.host for t in self.resolve("example.com")]
            self.assertEqual(sorted(hosts[:2]), ["a.example", "b.example"])
            self.assertEqual(hosts[2:], ["c.example", "d.example"])
        self.assertEqual(len(self.srv.asked), 1)

    def test_weighted_shuffle(self) -> None:
        records: list[SrvRecord] = [(0, 90, 1, "heavy"), (0, 10, 2, "light"), (0, 0, 3, "zero")]
        rng = random.Random(42)
        firsts = Counter(order_srv_records(records, rng)[0][3] for _ in range(2000))
        self.assertGreater(firsts["heavy"], 1600)
        self.assertGreater(firsts["light"], 100)
        self.assertLess(firsts["zero"], 50)
        for _ in range(100):
            self.assertEqual(len(order_srv_records(records, rng)), 3)

    def test_all_zero_weights(self) -> None:
        records: list[SrvRecord] = [(0, 0, 1, "a"), (0, 0, 2, "b"), (1, 0, 3, "c")]
        seen = {
            tuple(r[3] for r in order_srv_records(records, random.Random(i))) for i in range(50)
        }
        self.assertEqual(seen, {("a", "b", "c"), ("b", "a", "c")})

    def test_no_service_target(self) -> None:
        # "." means "not offered here": the next service is looked up.
        self.srv.records["_matrix-fed._tcp.example.com"] = [(0, 0, 8448, ".")]
        self.srv.records["_matrix._tcp.example.com"] = [(0, 0, 8448, "legacy.example.com")]
        self.assertEqual(self.resolve("example.com")[0].host, "legacy.example.com")

    def test_cached_an_hour(self) -> None:
        self.srv.records["_matrix-fed._tcp.example.com"] = [(0, 0, 8448, "a.example")]
        self.resolve("example.com")
        self.srv.records["_matrix-fed._tcp.example.com"] = [(0, 0, 8448, "b.example")]
        self.clock.advance(HOUR - 1)
        self.assertEqual(self.resolve("example.com")[0].host, "a.example")
        self.clock.advance(2)
        self.assertEqual(self.resolve("example.com")[0].host, "b.example")
        self.assertEqual(len(self.srv.asked), 2)

    def test_no_records_cached(self) -> None:
        self.resolve("example.com")
        self.resolve("example.com")
        self.assertEqual(len(self.srv.asked), 2)

    def test_lookup_error(self) -> None:
        self.srv.records["_matrix-fed._tcp.example.com"] = error.DNSServerError()
        self.assertEqual(self.resolve("example.com")[0].host, "example.com")
        # Not cached: asked again next time.
        self.srv.records["_matrix-fed._tcp.example.com"] = [(0, 0, 8448, "a.example")]
        self.assertEqual(self.resolve("example.com")[0].host, "a.example")

    def test_lookup_error_uses_last_answer(self) -> None:
        self.srv.records["_matrix-fed._tcp.example.com"] = [(0, 0, 8448, "a.example")]
        self.resolve("example.com")
        self.clock.advance(HOUR + 1)
        self.srv.records["_matrix-fed._tcp.example.com"] = error.DNSServerError()
        self.assertEqual(self.resolve("example.com")[0].host, "a.example")

    def test_bad_ports_dropped(self) -> None:
        self.srv.records["_matrix-fed._tcp.example.com"] = [(0, 0, 0, "a.example")]
        self.assertEqual(
            self.resolve("example.com")[0], FederationTarget("example.com", 8448, "example.com")
        )


class FakeDnsResolver:
    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def lookupService(self, name: str, timeout: Any = None) -> defer.Deferred[Any]:
        self.asked.append(name)
        answer = self.answers.get(name)
        if answer is None:
            return defer.fail(error.DNSNameError(name))
        return defer.succeed((answer, [], []))


def srv_answer(name: str, ttl: int, priority: int, port: int, target: str) -> dns.RRHeader:
    return dns.RRHeader(
        name, dns.SRV, dns.IN, ttl, dns.Record_SRV(priority, 0, port, target, ttl=ttl)
    )


class DnsSrvTests(unittest.TestCase):
    """The default lookup, through twisted.names."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.dns = FakeDnsResolver({})
        self.patch(dns_client, "getResolver", lambda: self.dns)
        self.resolver = ServerResolver(
            self.clock, http_get_well_known=FakeWellKnown(), clock=self.clock
        )

    def resolve(self, name: str) -> list[FederationTarget]:
        return self.successResultOf(defer.ensureDeferred(self.resolver.resolve(name)))

    def test_records_and_ttl(self) -> None:
        name = "_matrix-fed._tcp.example.com"
        self.dns.answers[name] = [
            srv_answer(name, 600, 10, 8449, "b.example.com"),
            dns.RRHeader(name, dns.CNAME, dns.IN, 30, dns.Record_CNAME("x.example.com")),
            srv_answer(name, 300, 0, 8448, "a.example.com"),
        ]
        self.assertEqual(
            self.resolve("example.com"),
            [
                FederationTarget("a.example.com", 8448, "example.com"),
                FederationTarget("b.example.com", 8449, "example.com"),
            ],
        )
        # Cached for the smallest TTL.
        self.clock.advance(299)
        self.resolve("example.com")
        self.assertEqual(self.dns.asked, [name])
        self.clock.advance(2)
        self.resolve("example.com")
        self.assertEqual(self.dns.asked, [name, name])

    def test_nxdomain(self) -> None:
        self.assertEqual(
            self.resolve("example.com"), [FederationTarget("example.com", 8448, "example.com")]
        )
        self.assertEqual(
            self.dns.asked, ["_matrix-fed._tcp.example.com", "_matrix._tcp.example.com"]
        )

    def test_tiny_ttl_has_a_floor(self) -> None:
        name = "_matrix-fed._tcp.example.com"
        self.dns.answers[name] = [srv_answer(name, 0, 0, 8448, "a.example.com")]
        self.resolve("example.com")
        self.clock.advance(59)
        self.resolve("example.com")
        self.assertEqual(self.dns.asked, [name])


class WellKnownResource(Resource):
    isLeaf = True

    def __init__(self, body: bytes, headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__()
        self.body = body
        self.headers = headers or {}
        self.paths: list[bytes] = []

    def render_GET(self, request: Any) -> bytes:
        self.paths.append(request.path)
        for name, value in self.headers.items():
            request.setHeader(name, value)
        return self.body


class HangingResource(Resource):
    isLeaf = True

    def __init__(self, start: bytes | None = None) -> None:
        super().__init__()
        self.start = start
        self.requests: list[Any] = []

    def render_GET(self, request: Any) -> Any:
        self.requests.append(request)
        if self.start is not None:
            request.write(self.start)
        return NOT_DONE_YET


class DefaultFetcherTests(unittest.TestCase):
    """The fetcher over an outbound client, in memory."""

    def setUp(self) -> None:
        self.clock = Clock()

    def fetcher(self, resource: Resource, **settings: Any) -> tuple[Any, RequestTraversalAgent]:
        client, agent = in_memory_client(self.clock, resource, **settings)
        return make_well_known_fetcher(self.clock, client), agent

    def fetch(self, resource: Resource, host: str = "example.com") -> defer.Deferred[Any]:
        fetcher, agent = self.fetcher(resource)
        result = defer.ensureDeferred(fetcher(host))
        agent.flush()
        return result

    def test_fetch(self) -> None:
        resource = WellKnownResource(
            b'{"m.server": "matrix.example.com:443"}', {b"Cache-Control": b"max-age=60"}
        )
        status, headers, body = self.successResultOf(self.fetch(resource))
        self.assertEqual(status, 200)
        self.assertEqual(headers["cache-control"], "max-age=60")
        self.assertEqual(json.loads(body), {"m.server": "matrix.example.com:443"})
        self.assertEqual(resource.paths, [b"/.well-known/matrix/server"])

    def test_follows_redirects(self) -> None:
        root = Resource()
        target = WellKnownResource(b'{"m.server": "m.example.com:443"}')
        well_known = Resource()
        matrix = Resource()
        root.putChild(b".well-known", well_known)
        well_known.putChild(b"matrix", matrix)
        matrix.putChild(b"server", Redirect(b"https://example.com/elsewhere"))
        root.putChild(b"elsewhere", target)
        fetcher, agent = self.fetcher(root)
        result = defer.ensureDeferred(fetcher("example.com"))
        for _ in range(5):
            agent.flush()
        status, _, body = self.successResultOf(result)
        self.assertEqual((status, body), (200, b'{"m.server": "m.example.com:443"}'))

    def test_body_limit(self) -> None:
        resource = WellKnownResource(b" " * (WELL_KNOWN_MAX_BYTES + 1))
        self.failureResultOf(self.fetch(resource))
        resource = WellKnownResource(b" " * WELL_KNOWN_MAX_BYTES)
        self.assertEqual(len(self.successResultOf(self.fetch(resource))[2]), WELL_KNOWN_MAX_BYTES)

    def test_timeout(self) -> None:
        result = self.fetch(HangingResource())
        self.assertNoResult(result)
        self.clock.advance(10)
        # Cancelled while waiting for the answer.
        self.failureResultOf(result, defer.TimeoutError)

    def test_body_timeout(self) -> None:
        resource = HangingResource(b'{"m.server": ')
        result = self.fetch(resource)
        self.assertNoResult(result)
        self.clock.advance(10)
        self.failureResultOf(result, defer.TimeoutError)

    def test_stalled_body_is_given_up_after_the_idle_timeout(self) -> None:
        fetcher, agent = self.fetcher(HangingResource(b'{"m.server": '), idle_timeout=2.0)
        result = defer.ensureDeferred(fetcher("example.com"))
        agent.flush()
        self.clock.advance(1.9)
        self.assertNoResult(result)
        self.clock.advance(0.1)
        # Before the fetch's own 10 s limit.
        self.failureResultOf(result, PeerStalledError)
