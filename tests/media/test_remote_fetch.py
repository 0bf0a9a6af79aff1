"""Fetching other servers' media (RemoteMediaCache) on a test clock, from
an in-memory peer whose answers each test decides: one download however
many ask, the size limit, a peer's refusals and broken answers as Matrix
errors, peers that stall or trickle, the download rate limit and the
destination backoff, and a download another process is making."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer, reactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mediarepo.errors import MatrixError, NotFoundError
from mediarepo.federation.multipart import (
    multipart_content_type,
    multipart_head,
    multipart_tail,
    new_boundary,
)
from mediarepo.media.locks import WorkerLocks
from mediarepo.media.paths import remote_media_path
from mediarepo.media.remote import OTHER_DOWNLOAD_WAIT_SECONDS, RemoteAccess
from mediarepo.outbound.bodies import RATE_WINDOW_SECONDS
from mediarepo.storage.lock_rows import LOCK_TIMEOUT_MS, LockRows
from mediarepo.storage.media_rows import remote_content_key
from mediarepo.values import RemoteMedia
from tests.media.media_layer import MediaLayerTestCase

ORIGIN = "peer.test:8448"
ACCESS = RemoteAccess(
    allow_fetch=True, allow_authenticated=True, requester_ip="10.1.2.3", timeout_ms=20_000
)
LIMIT = 100 * 1024
# The worker lock a download holds (media/remote.py).
DOWNLOAD_LOCK = "mediarepo_remote_download"

Answer = Callable[[Request], bytes]


class Peer(Resource):
    """Every other server. A media ID given an answer in ``answers`` gets
    it; any other request is held open, for the test to answer (the
    test's :meth:`next_held` fires with it)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.answers: dict[str, Answer] = {}
        self.paths: list[str] = []
        self._waiting: list[defer.Deferred[Request]] = []

    def render_GET(self, request: Request) -> Any:
        path = request.path.decode()
        self.paths.append(path)
        answer = self.answers.get(path.rsplit("/", 1)[1])
        if answer is not None:
            return answer(request)
        for waiting in self._waiting:
            # Once the request is on its way: the fetch awaits its answer.
            reactor.callLater(0, waiting.callback, request)
        self._waiting = []
        return NOT_DONE_YET

    def next_held(self) -> defer.Deferred[Request]:
        waiting: defer.Deferred[Request] = defer.Deferred()
        self._waiting.append(waiting)
        return waiting.addTimeout(10, reactor)


def multipart(request: Request, data: bytes) -> tuple[bytes, bytes]:
    """A federation media answer of ``data``, its Content-Type set: the
    head of its body, and the rest (the file and the closing boundary)."""
    boundary = new_boundary()
    request.setHeader(b"Content-Type", multipart_content_type(boundary).encode())
    head = multipart_head(boundary, "image/png", "inline; filename=peer.png")
    return head, data + multipart_tail(boundary)


def whole(data: bytes) -> Answer:
    def answer(request: Request) -> bytes:
        head, rest = multipart(request, data)
        return head + rest

    return answer


def refusal(code: int, body: bytes) -> Answer:
    def answer(request: Request) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json")
        return body

    return answer


class RemoteFetchTests(MediaLayerTestCase):
    extra_config = {"max_upload_size": f"{LIMIT // 1024}K"}

    def peer(self) -> Resource:
        self.fake_peer = Peer()
        return self.fake_peer

    def get(self, media_id: str, origin: str = ORIGIN) -> defer.Deferred[RemoteMedia]:
        return defer.ensureDeferred(self.remote.get(origin, media_id, ACCESS))

    async def error_of(self, media_id: str, origin: str = ORIGIN) -> tuple[int, str, str]:
        with self.assertRaises(MatrixError) as raised:
            await self.get(media_id, origin)
        error = raised.exception
        return error.code, error.errcode, error.message

    async def held(
        self, media_id: str, fetches: int = 1
    ) -> tuple[list[defer.Deferred[RemoteMedia]], Request]:
        """Fetches of ``media_id`` started, and the one request they made of
        the peer, held for the test to answer. Each fetch has looked in the
        cache by then, and so waits for the first one's download (one that
        looked only after that download failed would start another)."""
        looked = self.cache_lookups(fetches)
        held = self.fake_peer.next_held()
        fetching = [self.get(media_id) for _ in range(fetches)]
        await looked
        return fetching, await held

    def cache_lookups(self, count: int) -> defer.Deferred[None]:
        """Fires once ``count`` more lookups of cached remote media are done."""
        done: defer.Deferred[None] = defer.Deferred()
        lookup = self.media_rows.get_remote_media
        seen = 0

        async def looking(origin: str, media_id: str) -> RemoteMedia | None:
            nonlocal seen
            media = await lookup(origin, media_id)
            seen += 1
            if seen == count:
                done.callback(None)
            return media

        self.patch(self.media_rows, "get_remote_media", looking)
        return done.addTimeout(10, reactor)

    def answer(self, request: Request, *parts: bytes, finish: bool = True) -> None:
        """Write to a held request (and move the bytes)."""
        for part in parts:
            request.write(part)
        if finish:
            request.finish()
        self.peer_agent.flush()

    async def cached_rows(self) -> list[tuple[Any, ...]]:
        return await self.database.run_query("t", "SELECT media_id FROM remote_media_cache")

    async def assert_nothing_kept(self) -> None:
        self.assertEqual(self.files_under("remote_content"), [])
        self.assertEqual(self.files_under(".mediarepo_tmp"), [])
        self.assertEqual(await self.cached_rows(), [])

    @property
    def idle_timeout(self) -> float:
        return self.config.federation.idle_timeout_ms / 1000

    async def test_concurrent_requests_share_one_download(self) -> None:
        data = os.urandom(50_000)
        fetches, request = await self.held("sharedaaaaaaaaaa", 5)
        self.answer(request, *multipart(request, data))
        media = await defer.gatherResults(fetches)
        self.assertEqual({(m.media_id, m.media_length, m.media_type) for m in media},
                         {("sharedaaaaaaaaaa", len(data), "image/png")})  # fmt: skip
        self.assertEqual(media[0].upload_name, "peer.png")
        self.assertEqual(len(self.fake_peer.paths), 1)
        path = self.storage.local_file(remote_media_path(ORIGIN, media[0].filesystem_id))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), data)
        # Cached: asked again, the peer is not.
        self.assertEqual((await self.get("sharedaaaaaaaaaa")).sha256, media[0].sha256)
        self.assertEqual(len(self.fake_peer.paths), 1)
        self.assertEqual(self.files_under(".mediarepo_tmp"), [])

    async def test_declared_length_over_the_limit(self) -> None:
        [fetching], request = await self.held("declaredaaaaaaaa")
        head, _ = multipart(request, b"")
        request.setHeader(b"Content-Length", str(LIMIT + 65 * 1024).encode())
        self.answer(request, head, finish=False)
        with self.assertRaises(MatrixError) as raised:
            await fetching
        self.assertEqual((raised.exception.code, raised.exception.errcode), (502, "M_TOO_LARGE"))
        await self.assert_nothing_kept()

    async def test_streamed_past_the_limit(self) -> None:
        self.fake_peer.answers["streamedaaaaaaaa"] = whole(os.urandom(LIMIT + 1))
        self.fake_peer.answers["justfitsaaaaaaaa"] = whole(os.urandom(LIMIT))
        self.assertEqual(
            await self.error_of("streamedaaaaaaaa"),
            (502, "M_TOO_LARGE", f"Requested file is too large > {LIMIT} bytes"),
        )
        await self.assert_nothing_kept()
        self.assertEqual((await self.get("justfitsaaaaaaaa")).media_length, LIMIT)

    async def test_refusals_and_broken_answers(self) -> None:
        def not_multipart(request: Request) -> bytes:
            request.setHeader(b"Content-Type", b"text/plain")
            return b"plain text"

        def cut_short(request: Request) -> bytes:
            head, _ = multipart(request, b"")
            return head + b"and no closing boundary"

        not_here = json.dumps({"errcode": "M_NOT_FOUND", "error": "Not here"}).encode()
        failed = (502, "M_UNKNOWN", "Failed to fetch remote media")
        not_multipart_error = (
            502,
            "M_UNKNOWN",
            "Remote response is malformed: expected Content-Type of multipart/mixed"
            " with a boundary present.",
        )
        # An empty message: any saying the answer is malformed.
        cases: dict[str, tuple[Answer, tuple[int, str, str]]] = {
            "notherexaaaaaaaa": (refusal(404, not_here), (404, "M_NOT_FOUND", "Not here")),
            "forbiddenaaaaaaa": (refusal(403, b"{}"), failed),
            "servererroraaaaa": (refusal(500, b"oops"), failed),
            "notmultipartaaaa": (not_multipart, not_multipart_error),
            "cutshortaaaaaaaa": (cut_short, (502, "M_UNKNOWN", "")),
        }
        for index, (media_id, (answer, expected)) in enumerate(cases.items()):
            self.fake_peer.answers[media_id] = answer
            # A server of its own for each: a 500 backs its server off.
            code, errcode, message = await self.error_of(media_id, f"peer{index}.test:8448")
            if expected[2]:
                self.assertEqual((code, errcode, message), expected, media_id)
            else:
                self.assertEqual((code, errcode), expected[:2], media_id)
                self.assertTrue(message.startswith("Remote response is malformed: "), message)
            await self.assert_nothing_kept()

    async def test_an_older_peer_answers_on_the_legacy_endpoint(self) -> None:
        def older(request: Request) -> bytes:
            if request.path.startswith(b"/_matrix/federation/"):
                return refusal(404, b'{"errcode": "M_UNRECOGNIZED"}')(request)
            request.setHeader(b"Content-Type", b"text/plain")
            request.setHeader(b"Content-Disposition", b"inline; filename*=utf-8''old%20peer.txt")
            return b"from an old peer"

        self.fake_peer.answers["olderaaaaaaaaaaa"] = older
        media = await self.get("olderaaaaaaaaaaa")
        self.assertEqual((media.media_type, media.upload_name), ("text/plain", "old peer.txt"))
        self.assertEqual(
            self.fake_peer.paths,
            [
                "/_matrix/federation/v1/media/download/olderaaaaaaaaaaa",
                "/_matrix/media/v3/download/peer.test%3A8448/olderaaaaaaaaaaa",
            ],
        )

    async def test_peer_stalling_midway_fails_every_waiter(self) -> None:
        data = os.urandom(60_000)
        fetches, request = await self.held("stallingaaaaaaaa", 3)
        head, rest = multipart(request, data)
        request.setHeader(b"Content-Length", str(len(head + rest)).encode())
        self.answer(request, head, rest[: len(rest) // 2], finish=False)
        # Given up on the idle timeout after the last byte, not before.
        await self.clock.waiting(self.idle_timeout)
        self.clock.advance(self.idle_timeout - 0.001)
        for fetching in fetches:
            self.assertNoResult(fetching)
        self.clock.advance(0.001)
        for fetching in fetches:
            with self.assertRaises(MatrixError) as raised:
                await fetching
            self.assertEqual((raised.exception.code, raised.exception.message),
                             (502, "Failed to fetch remote media"))  # fmt: skip
        await self.assert_nothing_kept()
        # It answered: not backed off, so the next request asks again.
        self.fake_peer.answers["stallingaaaaaaaa"] = whole(data)
        self.assertEqual((await self.get("stallingaaaaaaaa")).media_length, len(data))
        self.assertEqual(len(self.fake_peer.paths), 2)

    async def test_slow_but_steady_peer_is_not_cut(self) -> None:
        """Pieces each just inside the idle timeout, at well over the
        minimum rate: four times the idle timeout in all."""
        data = os.urandom(96_000)
        [fetching], request = await self.held("steadyaaaaaaaaaa")
        head, rest = multipart(request, data)
        self.answer(request, head, finish=False)
        await self.clock.waiting(self.idle_timeout)
        pieces = [rest[i : i + len(rest) // 4 + 1] for i in range(0, len(rest), len(rest) // 4 + 1)]
        for piece in pieces:
            self.clock.advance(self.idle_timeout - 0.001)
            self.answer(request, piece, finish=False)
        self.answer(request)
        media = await fetching
        self.assertEqual(media.media_length, len(data))

    async def test_trickling_peer_is_cut_at_the_rate_window(self) -> None:
        """Never idle, but under the minimum rate."""
        [fetching], request = await self.held("tricklingaaaaaaa")
        head, _ = multipart(request, b"")
        self.answer(request, head, finish=False)
        await self.clock.waiting(RATE_WINDOW_SECONDS)
        for _ in range(int(RATE_WINDOW_SECONDS / 10) - 1):
            self.clock.advance(10)
            self.answer(request, b"drip" * 100, finish=False)
            self.assertNoResult(fetching)
        self.clock.advance(10)
        with self.assertRaises(MatrixError) as raised:
            await fetching
        self.assertEqual(raised.exception.code, 502)
        await self.assert_nothing_kept()

    async def test_failing_peer_is_backed_off_until_its_interval_ends(self) -> None:
        self.fake_peer.answers["failingaaaaaaaaa"] = refusal(503, b"")
        self.fake_peer.answers["laterfineaaaaaaa"] = whole(b"fine")
        self.assertEqual((await self.error_of("failingaaaaaaaaa"))[0], 502)
        # Any media of it: refused here, without asking.
        interval = self.config.federation.destination_min_retry_interval_ms / 1000
        self.clock.advance(interval - 0.001)
        self.assertEqual((await self.error_of("laterfineaaaaaaa"))[0], 502)
        self.assertEqual(len(self.fake_peer.paths), 1)
        self.clock.advance(0.001)
        self.assertEqual((await self.get("laterfineaaaaaaa")).media_length, 4)
        self.assertEqual(len(self.fake_peer.paths), 2)


class RemoteFetchPostgresTests(RemoteFetchTests):
    engine = "psycopg2"


class DownloadRateTests(MediaLayerTestCase):
    # Room for one 1 MiB headroom check beside 600 KB, draining at 1000 bytes/s.
    extra_config = {
        "remote_media_download_burst_count": "1500K",
        "remote_media_download_per_second": 1000,
    }

    def peer(self) -> Resource:
        peer = Peer()
        peer.answers["firstaaaaaaaaaaa"] = whole(os.urandom(600_000))
        peer.answers["secondaaaaaaaaaa"] = whole(b"second")
        peer.answers["thirdaaaaaaaaaaa"] = whole(b"third")
        return peer

    def get(self, media_id: str, access: RemoteAccess = ACCESS) -> defer.Deferred[RemoteMedia]:
        return defer.ensureDeferred(self.remote.get(ORIGIN, media_id, access))

    async def test_bucket_drains_on_the_clock(self) -> None:
        await self.get("firstaaaaaaaaaaa")
        # 600,000 in the bucket; 1 MiB of headroom fits below 1500K once
        # it is down to 487,424, 112,576 bytes (112.576 s) later.
        self.clock.advance(112.5)
        with self.assertRaises(MatrixError) as raised:
            await self.get("secondaaaaaaaaaa")
        self.assertEqual((raised.exception.code, raised.exception.errcode),
                         (429, "M_LIMIT_EXCEEDED"))  # fmt: skip
        # What is cached is served whatever the bucket says.
        self.assertEqual((await self.get("firstaaaaaaaaaaa")).media_length, 600_000)
        # Each requester's address has a bucket of its own.
        elsewhere = attrs.evolve(ACCESS, requester_ip="10.9.9.9")
        self.assertEqual((await self.get("thirdaaaaaaaaaaa", elsewhere)).media_length, 5)
        self.clock.advance(0.1)
        self.assertEqual((await self.get("secondaaaaaaaaaa")).media_length, 6)


class DownloadRatePostgresTests(DownloadRateTests):
    engine = "psycopg2"


class OtherProcessDownloadTests(MediaLayerTestCase):
    """Another process sharing the database (a worker, another host)
    holds the download's lock."""

    def peer(self) -> Resource:
        self.fake_peer = Peer()
        self.fake_peer.answers["sharedaaaaaaaaaa"] = whole(b"fetched here")
        return self.fake_peer

    async def set_up(self) -> None:
        await super().set_up()
        self.other = WorkerLocks(LockRows(self.database), self.clock, "other")
        # As the other process's fetch takes it.
        lock, _ = await self.other.try_lock_then(
            DOWNLOAD_LOCK,
            remote_content_key(ORIGIN, "sharedaaaaaaaaaa"),
            lambda claim: self.media_rows.take_download_lock(claim, ORIGIN, "sharedaaaaaaaaaa"),
        )
        assert lock is not None
        self.other_lock = lock
        self.addCleanup(lock.forget)
        self.fetching = defer.ensureDeferred(self.remote.get(ORIGIN, "sharedaaaaaaaaaa", ACCESS))
        # Refused the lock, it waits for the other's copy, looking again each second.
        await self.clock.waiting(1.0)

    async def other_downloaded(self) -> None:
        """The other process's download lands: its file, then its row."""
        path = self.storage.local_file(remote_media_path(ORIGIN, "otherfsidaaaaaaaaaaaaaaa"))
        os.makedirs(os.path.dirname(path))
        with open(path, "wb") as f:
            f.write(b"fetched there")
        now = int(self.clock.seconds() * 1000)
        await self.media_rows.store_remote_media(
            RemoteMedia(ORIGIN, "sharedaaaaaaaaaa", "text/plain", now, None, 13,
                        "otherfsidaaaaaaaaaaaaaaa", now, None, True, None)
        )  # fmt: skip
        await self.other_lock.release()

    async def test_served_the_other_process_copy(self) -> None:
        await self.other_downloaded()
        self.assertNoResult(self.fetching)
        # Its announcement (PostgreSQL), or the next look, finds the row.
        self.arrivals.announce(remote_content_key(ORIGIN, "sharedaaaaaaaaaa"))
        media = await self.fetching
        self.assertEqual(media.filesystem_id, "otherfsidaaaaaaaaaaaaaaa")
        self.assertEqual(self.fake_peer.paths, [])

    async def test_gives_up_past_the_wait(self) -> None:
        # The other process lives but never finishes: it renews its lock
        # every 30 s (here, by hand: its timer would renew in the background,
        # and a renewal ending after the clock moved on skips one).
        self.other_lock.forget()
        deadline = self.clock.seconds() + OTHER_DOWNLOAD_WAIT_SECONDS
        while deadline - self.clock.seconds() > 30:
            await self.clock.waiting(1.0)
            self.clock.advance(30)
            await self.other.store.renew(self.other_lock.token, self.other.now_ms())
        await self.clock.waiting(1.0)
        self.clock.advance(deadline - self.clock.seconds() - 0.001)
        await self.clock.waiting(1.0)
        self.assertNoResult(self.fetching)
        # The next look is past it.
        self.clock.advance(1.0)
        with self.assertRaises(MatrixError) as raised:
            await self.fetching
        self.assertEqual(raised.exception.code, 502)
        self.assertEqual(self.fake_peer.paths, [])

    async def test_takes_over_from_a_process_that_died(self) -> None:
        self.other_lock.forget()  # it stops renewing: it died
        self.clock.advance(LOCK_TIMEOUT_MS / 1000 + 1)
        media = await self.fetching
        self.assertEqual(media.media_length, len(b"fetched here"))
        self.assertEqual(len(self.fake_peer.paths), 1)


class OtherProcessDownloadPostgresTests(OtherProcessDownloadTests):
    engine = "psycopg2"


class NotFetchedTests(MediaLayerTestCase):
    async def test_unfetchable_is_not_found_without_asking(self) -> None:
        refused = RemoteAccess(False, True, "10.1.2.3", 20_000)
        with self.assertRaises(NotFoundError):
            await self.remote.get(ORIGIN, "anyaaaaaaaaaaaaa", refused)
