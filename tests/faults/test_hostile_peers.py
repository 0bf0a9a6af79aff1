"""Peers that fail us, over real TLS on loopback: one that stops sending in
the middle of a file, and one that is down.

Our server A (in this process, as in tests/integration/test_federation.py)
fetches from a fake peer (tests/integration/test_federation_hostile.py)
or from a port that takes connections and drops them at once, counting
them. A's idle timeout is configured short (0.2 s) so the stall is seen
quickly; backoff intervals are moved through A's ``destinations`` rows, as
another process sharing the database (Synapse) would see them. How long a
stall or a trickle is borne, and that a slow but steady peer is not cut,
is tests/media/test_remote_fetch.py's, on a test clock.
"""

from __future__ import annotations

import os
import time
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.interfaces import IReactorSSL, ITCPTransport
from twisted.web import server

from mediarepo.assembly import server_tls_options
from mediarepo.federation.multipart import (
    multipart_content_type,
    multipart_head,
    multipart_tail,
    new_boundary,
)
from tests.integration.test_federation import FederationTestCase, Peer
from tests.integration.test_federation_hostile import FakePeer, _TrackingSite
from tests.processes import free_port
from tests.utils import Response

IDLE_TIMEOUT = 0.2
# Time allowed beyond the idle timeout for the answer to come back.
MARGIN = 1.5
MIN_RETRY_MS = 10 * 60 * 1000
DATA = os.urandom(256 * 1024)


class StallingPeer(FakePeer):
    """Serves ``half-*`` media whole, or (while ``stalling``) sends half of
    it and then nothing."""

    stalling = True

    def render_GET(self, request: Any) -> Any:
        path = request.path.decode()
        if not path.startswith("/_matrix/federation/v1/media/download/"):
            return super().render_GET(request)
        self.requests.append(path)
        boundary = new_boundary()
        body = (
            multipart_head(boundary, "application/octet-stream", "attachment")
            + DATA
            + multipart_tail(boundary)
        )
        request.setHeader("Content-Type", multipart_content_type(boundary))
        media_id = path.rsplit("/", 1)[1]
        if media_id.startswith("half-"):
            request.setHeader("Content-Length", str(len(body)))
            if not self.stalling:
                return body
            request.write(body[: len(body) // 2])
            return server.NOT_DONE_YET
        return super().render_GET(request)


class _DroppingFactory(protocol.ServerFactory):
    """A server that is down in the way a crashed process behind a live
    port is: every connection is taken and reset at once. Counts them."""

    def __init__(self) -> None:
        self.connections = 0

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        self.connections += 1
        factory = self

        class Drop(protocol.Protocol):
            def connectionMade(self) -> None:
                ITCPTransport(self.transport).abortConnection()

        drop = Drop()
        drop.factory = factory
        return drop


class HostilePeerTestCase(FederationTestCase):
    async def start_peer(self, label: str, **overrides: Any) -> Peer:
        if label.startswith("a"):
            # In milliseconds.
            overrides = {"federation_idle_timeout": int(IDLE_TIMEOUT * 1000), **overrides}
        return await super().start_peer(label, **overrides)

    async def set_up(self) -> None:
        await super().set_up()
        self.fake_port = free_port()
        self.fake_name = f"127.0.0.1:{self.fake_port}"
        self.fake = StallingPeer(self.fake_name, os.path.join(self.workdir, "fake.signing.key"))

    def serve_fake_peer(self) -> Any:
        cert, key = self.ca.issue("fake")
        site = _TrackingSite(self.fake)
        listening = IReactorSSL(reactor).listenSSL(
            self.fake_port, site, server_tls_options(cert, key), interface="127.0.0.1"
        )
        self.addCleanup(listening.stopListening)
        # Connections our server gave up on may still be closing: cut them.
        self.addCleanup(site.abort_all)
        return listening

    async def fetch(self, media_id: str, origin: str | None = None) -> tuple[Response, float]:
        """A client's download of remote media through A, and its duration (s)."""
        started = time.monotonic()
        r = await self.http(
            "GET",
            f"{self.a.client_url}/_matrix/client/v1/media/download/"
            f"{origin or self.fake_name}/{media_id}",
            token=self.token,
        )
        return r, time.monotonic() - started

    def files_under(self, *parts: str) -> list[str]:
        top = os.path.join(self.a.server.config.media_store_path, *parts)
        return [f for _, _, names in os.walk(top) for f in names]

    async def backoff_row(self, destination: str) -> Any:
        assert self.a.server.database is not None
        rows = await self.a.server.database.run_query(
            "t",
            "SELECT failure_ts, retry_last_ts, retry_interval FROM destinations"
            " WHERE destination = ?",
            (destination,),
        )
        return rows[0] if rows else None

    async def end_interval(self, destination: str) -> None:
        """Let the backoff of ``destination`` run out (as if its interval passed)."""
        assert self.a.server.database is not None
        await self.a.server.database.run_query(
            "t",
            "UPDATE destinations SET retry_last_ts = retry_last_ts - retry_interval - 1"
            " WHERE destination = ?",
            (destination,),
        )

    def assert_failed_to_fetch(self, r: Response) -> None:
        self.assertEqual(
            (r.code, r.json()),
            (502, {"errcode": "M_UNKNOWN", "error": "Failed to fetch remote media"}),
        )


class StalledPeerTests(HostilePeerTestCase):
    async def test_peer_stalling_midway_is_given_up_on_and_retried(self) -> None:
        self.serve_fake_peer()
        # Three clients wait on the one fetch; each gets the error.
        results = await defer.gatherResults(
            [defer.ensureDeferred(self.fetch("half-aaaaaaaaaaaa")) for _ in range(3)]
        )
        for r, elapsed in results:
            self.assert_failed_to_fetch(r)
            self.assertLess(elapsed, IDLE_TIMEOUT + MARGIN)
        # Half the file arrived at once, then nothing: the wait is the idle timeout.
        self.assertGreaterEqual(max(e for _, e in results), IDLE_TIMEOUT)
        self.assertEqual(len(self.fake.requests), 1)
        # Nothing of the half file is left, in the cache or in staging.
        self.assertEqual(self.files_under("remote_content"), [])
        self.assertEqual(self.files_under(".mediarepo_tmp"), [])
        assert self.a.server.database is not None
        rows = await self.a.server.database.run_query("t", "SELECT * FROM remote_media_cache")
        self.assertEqual(rows, [])
        # The peer answered (it is up): no backoff, so the next request
        # tries again and, the peer now sending it all, gets the file.
        self.assertIsNone(await self.backoff_row(self.fake_name))
        self.fake.stalling = False
        r, _ = await self.fetch("half-aaaaaaaaaaaa")
        self.assertEqual((r.code, r.body == DATA), (200, True))
        self.assertEqual(len(self.fake.requests), 2)
        self.assertEqual(len(self.files_under("remote_content")), 1)
        self.assertEqual(self.files_under(".mediarepo_tmp"), [])


class StalledPeerPostgresTests(StalledPeerTests):
    engine = "psycopg2"


class DownPeerTests(HostilePeerTestCase):
    async def test_down_peer_is_backed_off_then_tried_again(self) -> None:
        dropping = _DroppingFactory()
        port = reactor.listenTCP(self.fake_port, dropping, interface="127.0.0.1")
        # First request: it connects, fails at once, and the peer is backed off.
        before_ms = int(time.time() * 1000)
        r, first = await self.fetch("down-aaaaaaaaaaaa")
        self.assert_failed_to_fetch(r)
        self.assertLess(first, 1.0)
        self.assertEqual(dropping.connections, 1)
        failure_ts, retry_last_ts, interval = await self.backoff_row(self.fake_name)
        # Synapse's units: milliseconds since the epoch, and Synapse's 10 minutes.
        self.assertTrue(before_ms <= retry_last_ts <= int(time.time() * 1000))
        self.assertEqual((failure_ts, interval), (retry_last_ts, MIN_RETRY_MS))
        # Next requests, for any media of it: answered at once, nothing sent.
        durations = []
        for i in range(5):
            r, elapsed = await self.fetch(f"down-bbbbbbbbbbb{i}")
            self.assert_failed_to_fetch(r)
            durations.append(elapsed)
        self.assertEqual(dropping.connections, 1)
        self.assertLess(max(durations), 0.5)
        # The interval passes: tried again, still down, backed off longer
        # (x2 with Synapse's 0.8-1.4 jitter), counted from the first failure.
        await self.end_interval(self.fake_name)
        r, _ = await self.fetch("down-aaaaaaaaaaaa")
        self.assert_failed_to_fetch(r)
        self.assertEqual(dropping.connections, 2)
        failure_again, _, longer = await self.backoff_row(self.fake_name)
        self.assertEqual(failure_again, failure_ts)
        self.assertTrue(1.6 * MIN_RETRY_MS <= longer <= 2.8 * MIN_RETRY_MS, longer)
        r, _ = await self.fetch("down-aaaaaaaaaaaa")
        self.assertEqual(dropping.connections, 2)
        # It comes back; once the interval passes, the next request fetches
        # and the backoff is cleared.
        await defer.maybeDeferred(port.stopListening)
        self.serve_fake_peer()
        self.fake.stalling = False
        r, _ = await self.fetch("half-aaaaaaaaaaaa")
        self.assert_failed_to_fetch(r)
        self.assertEqual(self.fake.requests, [])
        await self.end_interval(self.fake_name)
        r, _ = await self.fetch("half-aaaaaaaaaaaa")
        self.assertEqual((r.code, r.body == DATA), (200, True))
        self.assertEqual(await self.backoff_row(self.fake_name), (None, 0, 0))

    async def test_refused_connections_fail_fast_and_back_off(self) -> None:
        # Nothing listens at all.
        nobody = f"127.0.0.1:{free_port()}"
        r, first = await self.fetch("gone-aaaaaaaaaaaa", origin=nobody)
        self.assert_failed_to_fetch(r)
        self.assertLess(first, 1.0)
        self.assertEqual((await self.backoff_row(nobody))[2], MIN_RETRY_MS)
        r, again = await self.fetch("gone-bbbbbbbbbbbb", origin=nobody)
        self.assert_failed_to_fetch(r)
        self.assertLess(again, 0.5)

    async def test_a_peer_that_contacts_us_is_no_longer_backed_off(self) -> None:
        media_id = await self.upload_to(self.b, self.b_token, b"from b", "text/plain")
        a_media = [
            await self.upload_to(self.a, self.token, f"from a {i}".encode(), "text/plain")
            for i in range(2)
        ]
        # B has fetched from A before: A knows B's key, so what follows
        # involves no key fetch (which would end the backoff by itself).
        r = await self.download_via_b(a_media[0])
        self.assertEqual((r.code, r.body), (200, b"from a 0"))
        # A backed B off for a day (say Synapse did, on the shared database).
        assert self.a.server.database is not None
        now_ms = int(time.time() * 1000)
        await self.a.server.database.run_query(
            "t",
            "INSERT INTO destinations (destination, failure_ts, retry_last_ts, retry_interval)"
            " VALUES (?, ?, ?, ?)",
            (self.b.name, now_ms, now_ms, 24 * 3600 * 1000),
        )
        r, _ = await self.fetch(media_id, origin=self.b.name)
        self.assert_failed_to_fetch(r)
        # A request signed by B, which A verifies: B is up.
        r = await self.download_via_b(a_media[1])
        self.assertEqual((r.code, r.body), (200, b"from a 1"))
        self.assertEqual(await self.backoff_row(self.b.name), (None, 0, 0))
        r, _ = await self.fetch(media_id, origin=self.b.name)
        self.assertEqual((r.code, r.body), (200, b"from b"))

    async def download_via_b(self, media_id: str) -> Response:
        return await self.http(
            "GET",
            f"{self.b.client_url}/_matrix/client/v1/media/download/{self.a.name}/{media_id}",
            token=self.b_token,
        )


class DownPeerPostgresTests(DownPeerTests):
    engine = "psycopg2"
