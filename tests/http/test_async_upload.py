"""Async uploads (Matrix 1.7): ``POST /_matrix/media/v1/create`` then
``PUT /_matrix/media/v3/upload/{serverName}/{mediaId}``, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread

from mediarepo.app import media_server
from tests.utils import SERVER_NAME, ServerTestCase, port_number, raw_exchange, until

CREATE = "/_matrix/media/v1/create"
DOWNLOAD = f"/_matrix/client/v1/media/download/{SERVER_NAME}"


def put_path(media_id: str, server_name: str = SERVER_NAME, query: str = "") -> str:
    return f"/_matrix/media/v3/upload/{server_name}/{media_id}{query}"


class AsyncUploadTestCase(ServerTestCase):
    async def set_up(self) -> None:
        await super().set_up()
        self.token = await self.register()

    async def create(self, token: str | None = None) -> Any:
        return await self.request("POST", CREATE, token=token or self.token)

    async def reserve(self, token: str | None = None) -> str:
        r = await self.create(token)
        assert r.code == 200, (r.code, r.body)
        return str(r.json()["content_uri"].rsplit("/", 1)[1])

    async def put(self, media_id: str, data: bytes, token: str | None = None, **kwargs: Any) -> Any:
        headers = kwargs.pop("headers", {"Content-Type": "text/plain"})
        return await self.request(
            "PUT",
            put_path(media_id, **kwargs),
            token=token or self.token,
            body=data,
            headers=headers,
        )

    async def sql(self, statement: str, *args: object) -> list[tuple[Any, ...]]:
        assert self.server.database is not None
        return await self.server.database.run_query("test", statement, args)


class AsyncUploadTests(AsyncUploadTestCase):
    async def test_whole_flow(self) -> None:
        before = int(time.time() * 1000)
        r = await self.create()
        self.assertEqual(r.code, 200)
        body = r.json()
        self.assertTrue(body["content_uri"].startswith(f"mxc://{SERVER_NAME}/"))
        day = 24 * 3600 * 1000
        self.assertTrue(before + day <= body["unused_expires_at"] <= before + day + 60_000)
        media_id = body["content_uri"].rsplit("/", 1)[1]
        # Recorded as Synapse records a reservation.
        rows = await self.sql(
            "SELECT media_length, media_type, user_id, created_ts FROM local_media_repository"
            " WHERE media_id = ?",
            media_id,
        )
        self.assertEqual(rows[0][:3], (None, None, f"@alice:{SERVER_NAME}"))
        created_ts = rows[0][3]

        data = os.urandom(300_000)
        r = await self.put(
            media_id, data, query="?filename=notes.bin",
            headers={"Content-Type": "application/x-test"},
        )  # fmt: skip
        self.assertEqual((r.code, r.json()), (200, {}))
        r = await self.request("GET", f"{DOWNLOAD}/{media_id}", token=self.token)
        self.assertEqual((r.code, r.body), (200, data))
        self.assertEqual(r.header("Content-Type"), "application/x-test")
        self.assertEqual(r.header("Content-Disposition"), "attachment; filename=notes.bin")
        rows = await self.sql(
            "SELECT media_length, sha256, created_ts, upload_name FROM local_media_repository"
            " WHERE media_id = ?",
            media_id,
        )
        self.assertEqual(
            rows[0], (len(data), hashlib.sha256(data).hexdigest(), created_ts, "notes.bin")
        )
        # The upload lock is gone again.
        self.assertEqual(await self.sql("SELECT * FROM worker_locks"), [])

    async def test_errors(self) -> None:
        media_id = await self.reserve()
        bob = await self.register("bob")
        cases = [
            (await self.put(media_id, b"x", token=bob), 403, "M_FORBIDDEN"),
            (await self.put("unknownmediaidxx", b"x"), 404, "M_NOT_FOUND"),
            (await self.put(media_id, b"x", server_name="other.example"), 404, "M_NOT_FOUND"),
            (await self.put(media_id, b"x", token="badtoken"), 401, "M_UNKNOWN_TOKEN"),
        ]
        for r, code, errcode in cases:
            self.assertEqual((r.code, r.json()["errcode"]), (code, errcode), r.body)
        self.assertEqual((await self.put(media_id, b"first")).code, 200)
        r = await self.put(media_id, b"second")
        self.assertEqual((r.code, r.json()["errcode"]), (409, "M_CANNOT_OVERWRITE_MEDIA"))
        # Checked before the body: no body and no Content-Type still gets 409.
        r = await self.request("PUT", put_path(media_id), token=self.token, headers={})
        self.assertEqual((r.code, r.json()["errcode"]), (409, "M_CANNOT_OVERWRITE_MEDIA"))
        r = await self.request("GET", f"{DOWNLOAD}/{media_id}", token=self.token)
        self.assertEqual(r.body, b"first")
        # Expired reservations are gone for uploads and downloads.
        expired = await self.reserve()
        await self.sql(
            "UPDATE local_media_repository SET created_ts = ? WHERE media_id = ?", 1000, expired
        )
        r = await self.put(expired, b"late")
        self.assertEqual((r.code, r.json()["errcode"]), (404, "M_NOT_FOUND"))
        r = await self.request("GET", f"{DOWNLOAD}/{expired}", token=self.token)
        self.assertEqual(r.code, 404)
        # Each endpoint exists only under its own version.
        r = await self.request("POST", "/_matrix/media/v3/create", token=self.token)
        self.assertEqual((r.code, r.json()["errcode"]), (404, "M_UNRECOGNIZED"))
        r = await self.request(
            "PUT", f"/_matrix/media/r0/upload/{SERVER_NAME}/{media_id}", token=self.token
        )
        self.assertEqual((r.code, r.json()["errcode"]), (404, "M_UNRECOGNIZED"))
        r = await self.request("POST", CREATE)
        self.assertEqual((r.code, r.json()["errcode"]), (401, "M_MISSING_TOKEN"))

    async def test_refused_before_the_body_is_read(self) -> None:
        media_id = await self.reserve()
        self.assertEqual((await self.put(media_id, b"done")).code, 200)
        port = port_number(self.server.ports[0])
        # Headers promising 50 MB, and not one byte of it sent: the answer comes anyway.
        head = (
            f"PUT {put_path(media_id)} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {self.token}\r\nContent-Length: 50000000\r\n\r\n"
        ).encode()
        answer = await deferToThread(raw_exchange, port, head)
        self.assertTrue(answer.startswith(b"HTTP/1.1 409"), answer[:200])
        self.assertIn(b"M_CANNOT_OVERWRITE_MEDIA", answer)

    async def test_pending_limit_and_recovery(self) -> None:
        await self.server.stop()
        await self.start_server(max_pending_media_uploads=2)
        ids = [await self.reserve(), await self.reserve()]
        r = await self.create()
        self.assertEqual((r.code, r.json()["errcode"]), (429, "M_LIMIT_EXCEEDED"))
        self.assertGreater(r.json()["retry_after_ms"], 23 * 3600 * 1000)
        self.assertIsNotNone(r.header("Retry-After"))
        # Another user has a limit of their own.
        self.assertEqual((await self.create(await self.register("bob"))).code, 200)
        # A finished upload frees its place; so does an expired reservation.
        await self.put(ids[0], b"content")
        self.assertEqual((await self.create()).code, 200)
        await self.sql(
            "UPDATE local_media_repository SET created_ts = ? WHERE media_id = ?", 1000, ids[1]
        )
        self.assertEqual((await self.create()).code, 200)

    async def test_create_rate_limit(self) -> None:
        await self.server.stop()
        await self.start_server(rc_media_create={"per_second": 0.01, "burst_count": 2})
        await self.reserve()
        await self.reserve()
        r = await self.create()
        self.assertEqual((r.code, r.json()["errcode"]), (429, "M_LIMIT_EXCEEDED"))
        self.assertGreater(r.json()["retry_after_ms"], 0)
        self.assertEqual(r.header("Retry-After"), str(-(-r.json()["retry_after_ms"] // 1000)))

    async def test_download_waits_for_the_upload(self) -> None:
        media_id = await self.reserve()
        started = time.monotonic()
        waiting = defer.ensureDeferred(
            self.request("GET", f"{DOWNLOAD}/{media_id}?timeout_ms=20000", token=self.token)
        )
        arrivals = self.server.repository.arrivals
        await until(lambda: arrivals.waiting(media_id) == 1, "the download waits")
        self.assertFalse(waiting.called)
        self.assertEqual((await self.put(media_id, b"arrived")).code, 200)
        r = await waiting
        self.assertEqual((r.code, r.body), (200, b"arrived"))
        self.assertLess(time.monotonic() - started, 5)

    async def test_download_times_out(self) -> None:
        media_id = await self.reserve()
        started = time.monotonic()
        # The wait itself: tests/media/test_repository_timing.py, on a test clock.
        r = await self.request("GET", f"{DOWNLOAD}/{media_id}?timeout_ms=50", token=self.token)
        self.assertEqual((r.code, r.json()["errcode"]), (504, "M_NOT_YET_UPLOADED"))
        self.assertGreaterEqual(time.monotonic() - started, 0.05)
        r = await self.request(
            "GET", f"/_matrix/client/v1/media/thumbnail/{SERVER_NAME}/{media_id}"
            "?width=32&height=32&timeout_ms=50", token=self.token,
        )  # fmt: skip
        self.assertEqual((r.code, r.json()["errcode"]), (504, "M_NOT_YET_UPLOADED"))

    async def test_concurrent_puts(self) -> None:
        media_id = await self.reserve()
        bodies = [os.urandom(2_000_000), os.urandom(2_000_000)]
        responses = await defer.gatherResults(
            [defer.ensureDeferred(self.put(media_id, body)) for body in bodies]
        )
        codes = sorted(r.code for r in responses)
        self.assertEqual(codes, [200, 409])
        winner = bodies[[r.code for r in responses].index(200)]
        r = await self.request("GET", f"{DOWNLOAD}/{media_id}", token=self.token)
        self.assertEqual(r.body, winner)

    async def test_expired_reservations_swept(self) -> None:
        kept = await self.reserve()
        filled = await self.reserve()
        await self.put(filled, b"content")
        old = await self.reserve()
        await self.sql(
            "UPDATE local_media_repository SET created_ts = ? WHERE media_id IN (?, ?)",
            1000, old, filled,
        )  # fmt: skip
        assert self.server.repository is not None
        self.assertEqual(await self.server.uploads.sweep_expired_reservations(), 1)
        rows = await self.sql("SELECT media_id FROM local_media_repository")
        self.assertEqual(sorted(r[0] for r in rows), sorted([kept, filled]))


class AsyncUploadPostgresTests(AsyncUploadTests):
    engine = "psycopg2"


class TwoServersOnePostgresTests(AsyncUploadTestCase):
    """Two servers (as two media workers would be) on one PostgreSQL database
    and media store: the upload lock and the wake-up cross between them."""

    engine = "psycopg2"

    async def set_up(self) -> None:
        await super().set_up()
        self.first = self.server
        self.second = media_server(self.make_config(), reactor)
        await self.second.start()
        self.addCleanup(self.second.stopService)
        self.second_url = f"http://127.0.0.1:{port_number(self.second.ports[0])}"

    async def on_second(self, method: str, path: str, **kwargs: Any) -> Any:
        return await self.request(method, path, base_url=self.second_url, **kwargs)

    async def test_waiter_wakes_when_the_other_server_uploads(self) -> None:
        # Polling so slow that only the NOTIFY from the first server can wake
        # the second one within the test.
        assert self.second.repository is not None
        self.second.repository.arrivals.poll_seconds = 60
        media_id = await self.reserve()
        waiting = defer.ensureDeferred(
            self.on_second("GET", f"{DOWNLOAD}/{media_id}?timeout_ms=20000", token=self.token)
        )
        arrivals = self.second.repository.arrivals
        await until(lambda: arrivals.waiting(media_id) == 1, "the download waits")
        self.assertEqual((await self.put(media_id, b"from the first")).code, 200)
        r = await waiting.addTimeout(10, reactor)
        self.assertEqual((r.code, r.body), (200, b"from the first"))

    async def test_puts_on_both_servers_exclude_each_other(self) -> None:
        for _ in range(3):
            media_id = await self.reserve()
            bodies = [os.urandom(1_000_000), os.urandom(1_000_000)]
            path = put_path(media_id)
            headers = {"Content-Type": "application/octet-stream"}
            responses = await defer.gatherResults(
                [
                    defer.ensureDeferred(
                        self.request("PUT", path, token=self.token, body=bodies[0],
                                     headers=headers)
                    ),
                    defer.ensureDeferred(
                        self.on_second("PUT", path, token=self.token, body=bodies[1],
                                       headers=headers)
                    ),
                ]
            )  # fmt: skip
            codes = [r.code for r in responses]
            self.assertEqual(sorted(codes), [200, 409], [r.body for r in responses])
            r = await self.request("GET", f"{DOWNLOAD}/{media_id}", token=self.token)
            self.assertEqual(r.body, bodies[codes.index(200)])
