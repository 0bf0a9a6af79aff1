"""Uploads and downloads over real loopback HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import os
import time

from twisted.internet import defer
from twisted.internet.threads import deferToThread

from mediarepo.http.site import LARGE_BODY_READ_BYTES, SOCKET_READ_BYTES, MediaRequest
from mediarepo.media.paths import local_media_path
from tests.utils import SERVER_NAME, Response, ServerTestCase, port_number, raw_exchange

DOWNLOAD = f"/_matrix/client/v1/media/download/{SERVER_NAME}"
LEGACY_DOWNLOAD = f"/_matrix/media/v3/download/{SERVER_NAME}"


class UploadDownloadTests(ServerTestCase):
    async def _round_trip(self, data: bytes) -> None:
        token = await self.register()
        media_id = await self.upload(token, data, "application/octet-stream", "blob.bin")
        response = await self.request("GET", f"{DOWNLOAD}/{media_id}", token=token)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.body, data)
        self.assertEqual(response.header("Content-Length"), str(len(data)))
        # Stored at Synapse's path, with Synapse's row.
        path = os.path.join(self.media_store, local_media_path(media_id))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), data)
        assert self.server.repository is not None
        media = await self.server.repository._media_store.get_local_media(media_id)
        assert media is not None
        self.assertEqual(media.media_length, len(data))
        self.assertEqual(media.sha256, hashlib.sha256(data).hexdigest())
        self.assertEqual(media.user_id, f"@alice:{SERVER_NAME}")
        self.assertEqual(media.upload_name, "blob.bin")
        self.assertTrue(media.authenticated)
        self.assertEqual(len(media_id), 24)
        self.assertTrue(media_id.isalpha())
        # Nothing left in staging.
        self.assertEqual(os.listdir(os.path.join(self.media_store, ".mediarepo_tmp")), [])

    async def test_empty_body(self) -> None:
        await self._round_trip(b"")

    async def test_small_body(self) -> None:
        await self._round_trip(b"hello world")

    async def test_multi_megabyte_body(self) -> None:
        await self._round_trip(os.urandom(12 * 1024 * 1024 + 17))

    async def test_large_body_read_in_large_pieces(self) -> None:
        # A large body is read LARGE_BODY_READ_BYTES at a time; the
        # connection gets its default back for whatever comes next.
        sizes: list[tuple[int, int]] = []
        set_read_size = MediaRequest._set_read_size

        def read_size(request: MediaRequest) -> int:
            # A plain TCP transport's, which Twisted types as an ITransport.
            assert request.channel is not None
            size = getattr(request.channel.transport, "bufferSize", None)
            assert isinstance(size, int), size
            return size

        def recording(request: MediaRequest, size: int) -> None:
            before = read_size(request)
            set_read_size(request, size)
            sizes.append((before, read_size(request)))

        self.patch(MediaRequest, "_set_read_size", recording)
        await self._round_trip(os.urandom(LARGE_BODY_READ_BYTES - 1))
        self.assertEqual(sizes, [])
        await self._round_trip(os.urandom(3 * LARGE_BODY_READ_BYTES))
        default = SOCKET_READ_BYTES
        self.assertEqual(
            sizes, [(default, LARGE_BODY_READ_BYTES), (LARGE_BODY_READ_BYTES, default)]
        )

    async def test_upload_response_and_legacy_paths(self) -> None:
        token = await self.register()
        for version in ("r0", "v3", "v1"):
            response = await self.request(
                "POST", f"/_matrix/media/{version}/upload", token=token, body=b"x"
            )
            self.assertEqual(response.code, 200)
            self.assertEqual(set(response.json()), {"content_uri"})
            self.assertEqual(response.header("Content-Type"), "application/json")

    async def test_concurrent_uploads(self) -> None:
        token = await self.register()
        bodies = [os.urandom(200_000 + i) for i in range(20)]
        ids = await defer.gatherResults(
            [defer.ensureDeferred(self.upload(token, body)) for body in bodies]
        )
        self.assertEqual(len(set(ids)), 20)
        for media_id, body in zip(ids, bodies, strict=True):
            response = await self.request("GET", f"{DOWNLOAD}/{media_id}", token=token)
            self.assertEqual(response.body, body)

    async def test_head(self) -> None:
        token = await self.register()
        media_id = await self.upload(token, b"0123456789", "text/plain")
        response = await self.request("HEAD", f"{DOWNLOAD}/{media_id}", token=token)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.body, b"")
        self.assertEqual(response.header("Content-Length"), "10")
        self.assertEqual(response.header("Content-Type"), "text/plain; charset=UTF-8")


class UploadDownloadPostgresTests(UploadDownloadTests):
    engine = "psycopg2"


class HeaderTests(ServerTestCase):
    async def _headers(
        self, content_type: str | None, filename: str | None, suffix: str = ""
    ) -> Response:
        token = await self.register()
        media_id = await self.upload(token, b"data", content_type, filename)
        response = await self.request("GET", f"{DOWNLOAD}/{media_id}{suffix}", token=token)
        self.assertEqual(response.code, 200)
        return response

    async def test_text_gets_charset_and_inline(self) -> None:
        r = await self._headers("text/plain", "notes.txt")
        self.assertEqual(r.header("Content-Type"), "text/plain; charset=UTF-8")
        self.assertEqual(r.header("Content-Disposition"), "inline; filename=notes.txt")

    async def test_type_with_parameters_is_left_alone(self) -> None:
        r = await self._headers("Text/Plain; charset=utf-16", None)
        self.assertEqual(r.header("Content-Type"), "Text/Plain; charset=utf-16")
        self.assertEqual(r.header("Content-Disposition"), "inline")

    async def test_html_and_svg_are_attachments(self) -> None:
        for content_type in ("text/html", "image/svg+xml"):
            r = await self._headers(content_type, "x")
            self.assertEqual(r.header("Content-Disposition"), "attachment; filename=x")

    async def test_non_ascii_filename(self) -> None:
        r = await self._headers("image/png", "caf\u00e9 ü.png")
        self.assertEqual(
            r.header("Content-Disposition"), "inline; filename*=utf-8''caf%C3%A9%20%C3%BC.png"
        )

    async def test_filename_from_path_wins(self) -> None:
        r = await self._headers("image/png", "stored.png", "/asked%20for.png")
        self.assertEqual(
            r.header("Content-Disposition"), "inline; filename*=utf-8''asked%20for.png"
        )

    async def test_no_content_type_defaults(self) -> None:
        r = await self._headers(None, None)
        self.assertEqual(r.header("Content-Type"), "application/octet-stream")
        self.assertEqual(r.header("Content-Disposition"), "attachment")

    async def test_security_and_cache_headers(self) -> None:
        r = await self._headers("image/jpeg", None)
        self.assertIn("sandbox", r.header("Content-Security-Policy") or "")
        self.assertEqual(r.header("X-Content-Security-Policy"), "sandbox;")
        self.assertEqual(r.header("Referrer-Policy"), "no-referrer")
        self.assertEqual(r.header("Cross-Origin-Resource-Policy"), "cross-origin")
        self.assertEqual(r.header("Access-Control-Allow-Origin"), "*")
        self.assertEqual(
            r.header("Cache-Control"), "public,max-age=86400,s-maxage=0,proxy-revalidate"
        )
        self.assertEqual(r.header("ETag"), "1")
        self.assertEqual(r.header("X-Robots-Tag"), "noindex, nofollow, noarchive, noimageindex")
        self.assertEqual(r.header("Accept-Ranges"), "bytes")

    async def test_if_none_match(self) -> None:
        token = await self.register()
        media_id = await self.upload(token, b"data")
        r = await self.request(
            "GET", f"{DOWNLOAD}/{media_id}", token=token, headers={"If-None-Match": "1"}
        )
        self.assertEqual(r.code, 304)
        self.assertEqual(r.body, b"")

    async def test_download_errors_carry_csp(self) -> None:
        r = await self.request("GET", f"{LEGACY_DOWNLOAD}/nosuchmediaidhere")
        self.assertEqual(r.code, 404)
        self.assertEqual(r.json()["errcode"], "M_NOT_FOUND")
        self.assertIn("sandbox", r.header("Content-Security-Policy") or "")

    async def test_options(self) -> None:
        r = await self.request("OPTIONS", "/_matrix/media/v3/upload")
        self.assertEqual(r.code, 204)
        self.assertEqual(r.header("Access-Control-Allow-Origin"), "*")
        self.assertIn("Authorization", r.header("Access-Control-Allow-Headers") or "")


class HeaderPostgresTests(HeaderTests):
    engine = "psycopg2"


class RangeTests(ServerTestCase):
    async def set_up(self) -> None:
        await super().set_up()
        self.token = await self.register()
        self.data = os.urandom(1_000_000)
        self.media_id = await self.upload(self.token, self.data, "video/mp4")

    async def _get(self, range_header: str, **extra: str) -> Response:
        headers = {"Range": range_header, **extra}
        return await self.request(
            "GET", f"{DOWNLOAD}/{self.media_id}", token=self.token, headers=headers
        )

    async def test_closed_range(self) -> None:
        r = await self._get("bytes=100-299")
        self.assertEqual(r.code, 206)
        self.assertEqual(r.body, self.data[100:300])
        self.assertEqual(r.header("Content-Range"), "bytes 100-299/1000000")
        self.assertEqual(r.header("Content-Length"), "200")

    async def test_open_and_suffix_ranges(self) -> None:
        r = await self._get("bytes=999000-")
        self.assertEqual((r.code, r.body), (206, self.data[999000:]))
        r = await self._get("bytes=-10")
        self.assertEqual((r.code, r.body), (206, self.data[-10:]))
        r = await self._get("bytes=999990-2000000")
        self.assertEqual(r.body, self.data[999990:])

    async def test_large_ranges_and_small_files(self) -> None:
        # Long enough to go out with sendfile, from an offset.
        r = await self._get("bytes=300000-")
        self.assertEqual((r.code, r.body), (206, self.data[300000:]))
        r = await self._get("bytes=1-999998")
        self.assertEqual((r.code, r.body), (206, self.data[1:999999]))
        # A small file is served from memory, ranges too.
        small = os.urandom(5000)
        media_id = await self.upload(self.token, small)
        for header, expected in (("bytes=10-19", small[10:20]), ("bytes=-7", small[-7:])):
            r = await self.request(
                "GET", f"{DOWNLOAD}/{media_id}", token=self.token, headers={"Range": header}
            )
            self.assertEqual((r.code, r.body), (206, expected), header)
        r = await self.request("GET", f"{DOWNLOAD}/{media_id}", token=self.token)
        self.assertEqual(r.body, small)

    async def test_unsatisfiable(self) -> None:
        r = await self._get("bytes=1000000-")
        self.assertEqual(r.code, 416)
        self.assertEqual(r.header("Content-Range"), "bytes */1000000")
        # Longer than int() reads (4300 digits): was a 500.
        r = await self._get("bytes=" + "9" * 5000 + "-")
        self.assertEqual((r.code, r.json()["errcode"]), (416, "M_INVALID_PARAM"))
        r = await self._get("bytes=-" + "9" * 5000)
        self.assertEqual((r.code, r.body), (206, self.data))

    async def test_ignored_ranges(self) -> None:
        for header in ("bytes=0-1,5-6", "items=0-5", "bytes=9-3"):
            r = await self._get(header)
            self.assertEqual((r.code, len(r.body)), (200, 1_000_000), header)
        r = await self._get("bytes=0-9", **{"If-Range": '"other"'})
        self.assertEqual(r.code, 200)


class RangePostgresTests(RangeTests):
    engine = "psycopg2"


class LimitTests(ServerTestCase):
    extra_config = {"max_upload_size": "1M"}

    def _raw_upload(self, head: bytes, body_chunks: list[bytes]) -> bytes:
        return raw_exchange(port_number(self.server.ports[0]), head, body_chunks)

    async def test_content_length_over_limit(self) -> None:
        token = await self.register()
        head = (
            b"POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\n"
            b"Content-Length: 5000000\r\nExpect: 100-continue\r\n\r\n"
        )
        answer = await deferToThread(self._raw_upload, head, [])
        self.assertTrue(answer.startswith(b"HTTP/1.1 413"), answer[:200])
        self.assertNotIn(b"100 Continue", answer)
        self.assertIn(b'"errcode": "M_TOO_LARGE"', answer)
        self.assertEqual(os.listdir(os.path.join(self.media_store, ".mediarepo_tmp")), [])

    async def test_content_length_over_limit_via_client(self) -> None:
        token = await self.register()
        r = await self.request(
            "POST", "/_matrix/media/v3/upload", token=token, body=b"x" * (1024 * 1024 + 1)
        )
        self.assertEqual(r.code, 413)
        self.assertEqual(r.json()["errcode"], "M_TOO_LARGE")

    async def test_chunked_body_over_limit(self) -> None:
        token = await self.register()
        head = (
            b"POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"%x\r\n" % 65536 + b"y" * 65536 + b"\r\n"
        answer = await deferToThread(self._raw_upload, head, [chunk] * 20)
        self.assertTrue(answer.startswith(b"HTTP/1.1 413"), answer[:200])
        self.assertFalse(os.listdir(os.path.join(self.media_store, "local_content"))
                         if os.path.exists(os.path.join(self.media_store, "local_content"))
                         else [])  # fmt: skip

    async def test_chunked_body_within_limit(self) -> None:
        token = await self.register()
        head = (
            b"POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        body = [b"5\r\nhello\r\n", b"6\r\n world\r\n", b"0\r\n\r\n"]
        answer = await deferToThread(self._raw_upload, head, body)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer[:300])
        media_id = answer.split(b"mxc://test.example/")[1][:24].decode()
        r = await self.request("GET", f"{DOWNLOAD}/{media_id}", token=token)
        self.assertEqual(r.body, b"hello world")

    async def test_config(self) -> None:
        token = await self.register()
        for path in ("/_matrix/media/v3/config", "/_matrix/client/v1/media/config"):
            r = await self.request("GET", path, token=token)
            self.assertEqual((r.code, r.json()), (200, {"m.upload.size": 1024 * 1024}))


class LimitPostgresTests(LimitTests):
    engine = "psycopg2"


class AuthTests(ServerTestCase):
    async def test_missing_and_unknown_tokens(self) -> None:
        r = await self.request("POST", "/_matrix/media/v3/upload", body=b"x")
        self.assertEqual((r.code, r.json()["errcode"]), (401, "M_MISSING_TOKEN"))
        r = await self.request("POST", "/_matrix/media/v3/upload", body=b"x", token="nope")
        self.assertEqual((r.code, r.json()["errcode"]), (401, "M_UNKNOWN_TOKEN"))
        self.assertIs(r.json()["soft_logout"], False)
        r = await self.request(
            "GET", f"{DOWNLOAD}/abcdefghijkl", headers={"Authorization": "Basic abc"}
        )
        self.assertEqual((r.code, r.json()["errcode"]), (401, "M_MISSING_TOKEN"))
        # Nothing was stored by the refused uploads.
        self.assertFalse(os.path.exists(os.path.join(self.media_store, "local_content")))
        self.assertEqual(os.listdir(os.path.join(self.media_store, ".mediarepo_tmp")), [])

    async def test_query_parameter_token(self) -> None:
        token = await self.register()
        r = await self.request("GET", f"/_matrix/media/v3/config?access_token={token}")
        self.assertEqual(r.code, 200)
        r = await self.request("GET", f"/_matrix/media/v3/config?access_token={token}", token=token)
        self.assertEqual((r.code, r.json()["errcode"]), (401, "M_MISSING_TOKEN"))

    async def _set_user(self, sql: str, *args: object) -> None:
        assert self.server.database is not None
        await self.server.database.run_query("test", sql, args)

    async def test_expired_token(self) -> None:
        token = await self.register()
        await self._set_user(
            "UPDATE access_tokens SET valid_until_ms = ? WHERE token = ?", 1000, token
        )
        r = await self.request("GET", "/_matrix/media/v3/config", token=token)
        self.assertEqual((r.code, r.json()["errcode"]), (401, "M_UNKNOWN_TOKEN"))
        self.assertIs(r.json()["soft_logout"], True)

    async def test_locked_and_deactivated_users(self) -> None:
        token = await self.register("bob")
        await self._set_user(
            "UPDATE users SET locked = ? WHERE name = ?", True, f"@bob:{SERVER_NAME}"
        )
        r = await self.request("GET", "/_matrix/media/v3/config", token=token)
        self.assertEqual((r.code, r.json()["errcode"]), (401, "M_USER_LOCKED"))
        token = await self.register("carol")
        await self._set_user(
            "UPDATE users SET deactivated = 1 WHERE name = ?", f"@carol:{SERVER_NAME}"
        )
        r = await self.request("GET", "/_matrix/media/v3/config", token=token)
        self.assertEqual((r.code, r.json()["errcode"]), (401, "M_UNKNOWN_TOKEN"))

    async def test_suspended_users(self) -> None:
        """A suspended account adds no media (403 M_USER_SUSPENDED: uploads,
        /create and content for a reservation made before the suspension)
        and still reads media and the config."""
        alice = await self.register("alice")
        theirs = await self.upload(alice, b"alice's")
        bob = await self.register("bob")
        assert self.server.database is not None
        reserved = await self.server.database.run_query(
            "test",
            "INSERT INTO local_media_repository (media_id, created_ts, user_id)"
            " VALUES ('bobsreservation', ?, ?)",
            (int(time.time() * 1000), f"@bob:{SERVER_NAME}"),
        )
        self.assertEqual(reserved, [])
        await self._set_user(
            "UPDATE users SET suspended = ? WHERE name = ?", True, f"@bob:{SERVER_NAME}"
        )
        refused = (403, "M_USER_SUSPENDED")
        r = await self.request("POST", "/_matrix/media/v3/upload", body=b"x" * 1000, token=bob)
        self.assertEqual((r.code, r.json()["errcode"]), refused)
        r = await self.request("POST", "/_matrix/media/v1/create", token=bob)
        self.assertEqual((r.code, r.json()["errcode"]), refused)
        r = await self.request(
            "PUT", f"/_matrix/media/v3/upload/{SERVER_NAME}/bobsreservation", body=b"x", token=bob
        )
        self.assertEqual((r.code, r.json()["errcode"]), refused)
        rows = await self.server.database.run_query(
            "test",
            "SELECT media_id, media_length FROM local_media_repository WHERE user_id = ?",
            (f"@bob:{SERVER_NAME}",),
        )
        self.assertEqual(rows, [("bobsreservation", None)])
        self.assertEqual(os.listdir(os.path.join(self.media_store, ".mediarepo_tmp")), [])
        r = await self.request("GET", f"{DOWNLOAD}/{theirs}", token=bob)
        self.assertEqual((r.code, r.body), (200, b"alice's"))
        r = await self.request("GET", "/_matrix/client/v1/media/config", token=bob)
        self.assertEqual(r.code, 200)

    async def test_guests(self) -> None:
        token = await self.register("guest")
        await self._set_user(
            "UPDATE users SET is_guest = 1 WHERE name = ?", f"@guest:{SERVER_NAME}"
        )
        r = await self.request("POST", "/_matrix/media/v3/upload", body=b"x", token=token)
        self.assertEqual((r.code, r.json()["errcode"]), (403, "M_GUEST_ACCESS_FORBIDDEN"))
        alice = await self.register()
        media_id = await self.upload(alice, b"shared")
        r = await self.request("GET", f"{DOWNLOAD}/{media_id}", token=token)
        self.assertEqual((r.code, r.body), (200, b"shared"))

    async def test_token_marked_used(self) -> None:
        token = await self.register()
        await self.request("GET", "/_matrix/media/v3/config", token=token)
        assert self.server.database is not None
        rows = await self.server.database.run_query(
            "t", "SELECT used FROM access_tokens WHERE token = ?", (token,)
        )
        self.assertTrue(rows[0][0])


class AuthPostgresTests(AuthTests):
    engine = "psycopg2"


class AuthenticatedMediaTests(ServerTestCase):
    async def test_legacy_path_refuses_authenticated_media(self) -> None:
        token = await self.register()
        media_id = await self.upload(token, b"secret")
        r = await self.request("GET", f"{LEGACY_DOWNLOAD}/{media_id}")
        self.assertEqual((r.code, r.json()["errcode"]), (404, "M_NOT_FOUND"))
        r = await self.request("GET", f"{DOWNLOAD}/{media_id}")
        self.assertEqual(r.code, 401)

    async def test_unauthenticated_media_on_legacy_path(self) -> None:
        await self.server.stop()
        await self.start_server(enable_authenticated_media=False)
        token = await self.register()
        media_id = await self.upload(token, b"public")
        for version in ("r0", "v3", "v1"):
            r = await self.request(
                "GET", f"/_matrix/media/{version}/download/{SERVER_NAME}/{media_id}/x.txt"
            )
            self.assertEqual((r.code, r.body), (200, b"public"))


class AuthenticatedMediaPostgresTests(AuthenticatedMediaTests):
    engine = "psycopg2"


class BadRequestTests(ServerTestCase):
    async def test_paths(self) -> None:
        token = await self.register()
        cases = [
            ("GET", "/_matrix/unknown", 404, "M_UNRECOGNIZED"),
            ("GET", "/_matrix/media/v3/nothing", 404, "M_UNRECOGNIZED"),
            ("GET", "/", 404, "M_UNRECOGNIZED"),
            ("DELETE", "/_matrix/media/v3/upload", 405, "M_UNRECOGNIZED"),
            ("GET", "/_matrix/media/v3/upload", 405, "M_UNRECOGNIZED"),
            ("GET", f"{DOWNLOAD}/..%2F..%2Fetc%2Fpasswd", 404, "M_NOT_FOUND"),
            ("GET", f"{DOWNLOAD}/abc", 404, "M_NOT_FOUND"),
            ("GET", f"{DOWNLOAD}/{'a' * 300}", 404, "M_NOT_FOUND"),
            ("GET", f"{DOWNLOAD}/ab%00cdefgh", 400, "M_INVALID_PARAM"),
            (
                "GET",
                "/_matrix/client/v1/media/download/bad%20server/abcdefgh",
                400,
                "M_INVALID_PARAM",
            ),
            ("GET", "/_matrix/client/v1/media/download/..%2F../abcdefgh", 400, "M_INVALID_PARAM"),
            # Ports in other scripts' digits: U+00B2 was a 500, U+0661 a valid port 1.
            ("GET", "/_matrix/media/v3/download/a:%C2%B2/abcdefgh", 400, "M_INVALID_PARAM"),
            ("GET", "/_matrix/media/v3/download/a:%D9%A1/abcdefgh", 400, "M_INVALID_PARAM"),
            # A remote server that cannot be reached (nothing listens on port 1).
            ("GET", "/_matrix/client/v1/media/download/127.0.0.1:1/abcdefgh", 502, "M_UNKNOWN"),
            ("GET", f"{DOWNLOAD}/abcdefgh?timeout_ms=x", 400, "M_INVALID_PARAM"),
            ("GET", f"{DOWNLOAD}/%ff%fe", 400, "M_INVALID_PARAM"),
        ]
        for method, path, code, errcode in cases:
            r = await self.request(method, path, token=token)
            self.assertEqual((r.code, r.json()["errcode"]), (code, errcode), path)
            if code == 405:
                # RFC 9110 §15.5.6: a 405 names the methods the path takes.
                self.assertEqual(r.header("Allow"), "OPTIONS, POST", path)

    async def test_bad_filename_parameter(self) -> None:
        token = await self.register()
        r = await self.request(
            "POST", "/_matrix/media/v3/upload?filename=%ff", token=token, body=b"x"
        )
        self.assertEqual((r.code, r.json()["errcode"]), (400, "M_UNKNOWN"))

    async def test_metrics(self) -> None:
        token = await self.register()
        await self.upload(token, b"counted")
        r = await self.request("GET", "/_synapse/metrics")
        self.assertEqual(r.code, 200)
        text = r.body.decode()
        self.assertIn(
            'mediarepo_http_requests_total{code="200",endpoint="upload",method="POST"}', text
        )
        self.assertIn("mediarepo_media_bytes_uploaded_total", text)
        self.assertIn("mediarepo_db_transaction_seconds", text)


class BadRequestPostgresTests(BadRequestTests):
    engine = "psycopg2"
