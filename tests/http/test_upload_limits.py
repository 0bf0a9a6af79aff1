"""Per-user upload quotas (``media_upload_limits``), refused before any byte
is stored."""

from __future__ import annotations

import os
import socket

from twisted.internet import defer
from twisted.internet.threads import deferToThread

from tests.utils import SERVER_NAME, ServerTestCase, next_return, port_number, raw_exchange

HOUR_MS = 3600 * 1000


class UploadLimitTests(ServerTestCase):
    extra_config = {
        "media_upload_limits": [
            {"time_period": "1h", "max_size": 1000},
            {"time_period": "1d", "max_size": 1500},
        ]
    }

    async def post(self, token: str, size: int) -> tuple[int, dict[str, str]]:
        r = await self.request(
            "POST", "/_matrix/media/v3/upload", token=token, body=os.urandom(size)
        )
        return r.code, r.json()

    def stored_files(self) -> int:
        found = 0
        for _, _, files in os.walk(os.path.join(self.media_store, "local_content")):
            found += len(files)
        return found

    def assert_nothing_staged(self) -> None:
        self.assertEqual(os.listdir(os.path.join(self.media_store, ".mediarepo_tmp")), [])

    async def test_limits_per_window(self) -> None:
        alice = await self.register("alice")
        bob = await self.register("bob")
        self.assertEqual((await self.post(alice, 600))[0], 200)
        self.assertEqual((await self.post(alice, 300))[0], 200)
        code, body = await self.post(alice, 200)
        self.assertEqual(
            (code, body),
            (400, {"errcode": "M_RESOURCE_LIMIT_EXCEEDED", "error": "Media upload limit exceeded"}),
        )
        self.assertEqual(self.stored_files(), 2)
        self.assert_nothing_staged()
        # Another user has their own quota.
        self.assertEqual((await self.post(bob, 1000))[0], 200)
        # Two hours on, the hourly window is empty; the daily one is not.
        assert self.server.database is not None
        await self.server.database.run_query(
            "t",
            "UPDATE local_media_repository SET created_ts = created_ts - ? WHERE user_id = ?",
            (2 * HOUR_MS, f"@alice:{SERVER_NAME}"),
        )
        self.assertEqual((await self.post(alice, 500))[0], 200)
        code, _ = await self.post(alice, 200)
        self.assertEqual(code, 400)

    async def test_body_without_length_checked_before_storing(self) -> None:
        alice = await self.register("alice")
        self.assertEqual((await self.post(alice, 900))[0], 200)
        chunk = os.urandom(300)
        head = (
            b"POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer " + alice.encode() + b"\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        body = [b"%x\r\n" % len(chunk) + chunk + b"\r\n", b"0\r\n\r\n"]
        answer = await deferToThread(raw_exchange, port_number(self.server.ports[0]), head, body)
        self.assertTrue(answer.startswith(b"HTTP/1.1 400"), answer[:300])
        self.assertIn(b"M_RESOURCE_LIMIT_EXCEEDED", answer)
        self.assertEqual(self.stored_files(), 1)
        self.assert_nothing_staged()

    async def test_concurrent_uploads_count_each_other(self) -> None:
        alice = await self.register("alice")
        answers = await defer.gatherResults(
            [defer.ensureDeferred(self.post(alice, 600)) for _ in range(3)]
        )
        codes = sorted(code for code, _ in answers)
        self.assertEqual(codes, [200, 400, 400])
        self.assertEqual(self.stored_files(), 1)
        self.assert_nothing_staged()

    async def test_length_held_while_the_body_streams(self) -> None:
        alice = await self.register("alice")
        quota = self.server.uploads.quota
        port = port_number(self.server.ports[0])
        sock = socket.create_connection(("127.0.0.1", port))
        self.addCleanup(sock.close)
        begun = next_return(self, self.server.uploads, "begin_upload")
        # What the site calls when a client leaves before its whole body.
        abandoned = next_return(self, self.server.parts.sites[0], "abandon_upload")
        sock.sendall(
            b"POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + alice.encode() + b"\r\n"
            b"Content-Length: 900\r\n\r\n" + os.urandom(400)
        )
        await begun
        self.assertEqual(quota.held_bytes(f"@alice:{SERVER_NAME}"), 900)
        # Nothing is stored yet, but the 900 bytes under way count.
        code, body = await self.post(alice, 200)
        self.assertEqual((code, body["errcode"]), (400, "M_RESOURCE_LIMIT_EXCEEDED"))
        # The client goes away: what it held is free again.
        self.assertFalse(abandoned.called)
        sock.close()
        await abandoned
        self.assertEqual(quota.held_bytes(f"@alice:{SERVER_NAME}"), 0)
        self.assertEqual((await self.post(alice, 900))[0], 200)
        self.assert_nothing_staged()

    async def test_put_into_a_reservation(self) -> None:
        alice = await self.register("alice")
        r = await self.request("POST", "/_matrix/media/v1/create", token=alice)
        media_id = r.json()["content_uri"].rsplit("/", 1)[1]
        r = await self.request(
            "PUT", f"/_matrix/media/v3/upload/{SERVER_NAME}/{media_id}",
            token=alice, body=os.urandom(1200),
        )  # fmt: skip
        self.assertEqual((r.code, r.json()["errcode"]), (400, "M_RESOURCE_LIMIT_EXCEEDED"))
        # Without a Content-Length, the database refuses it when it is recorded.
        chunk = os.urandom(1200)
        head = (
            f"PUT /_matrix/media/v3/upload/{SERVER_NAME}/{media_id} HTTP/1.1\r\n".encode()
            + b"Host: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n"
            + b"Authorization: Bearer "
            + alice.encode()
            + b"\r\n\r\n"
        )
        body = [b"%x\r\n" % len(chunk) + chunk + b"\r\n", b"0\r\n\r\n"]
        answer = await deferToThread(raw_exchange, port_number(self.server.ports[0]), head, body)
        self.assertTrue(answer.startswith(b"HTTP/1.1 400"), answer[:300])
        self.assertIn(b"M_RESOURCE_LIMIT_EXCEEDED", answer)
        self.assertEqual(self.stored_files(), 0)
        r = await self.request(
            "PUT", f"/_matrix/media/v3/upload/{SERVER_NAME}/{media_id}",
            token=alice, body=os.urandom(800),
        )  # fmt: skip
        self.assertEqual(r.code, 200, r.body)
        self.assertEqual(self.stored_files(), 1)
        self.assert_nothing_staged()


class UploadLimitPostgresTests(UploadLimitTests):
    engine = "psycopg2"
