"""Every upload (``POST`` and the ``PUT`` of an async upload) is authenticated
from its headers, before any byte of its body is read: a client without a
valid token, or a suspended one, cannot make the server write anything, and
a body over the limit by its ``Content-Length`` is refused before it is read."""

from __future__ import annotations

import os
import socket
import threading

from twisted.internet.threads import deferToThread

from tests.utils import SERVER_NAME, ServerTestCase, port_number, read_until_closed

# A body well over what the server reads at once, under max_upload_size.
BODY_BYTES = 50 * 1024 * 1024
_PIECE = os.urandom(1024 * 1024)


class _StagingWatch:
    """Looks at the staging directory, over and over, from a thread, and
    keeps every name it ever saw there."""

    def __init__(self, directory: str) -> None:
        self._directory = directory
        self.seen: set[str] = set()
        self.looks = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.is_set():
            self.seen.update(os.listdir(self._directory))
            self.looks += 1

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def _exchange(port: int, head: bytes, body_bytes: int) -> bytes:
    """Send ``head`` and a body of ``body_bytes`` while reading the answer
    (blocking: run it in a thread); returns all the server said."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)

        def send_body() -> None:
            try:
                for _ in range(body_bytes // len(_PIECE)):
                    sock.sendall(_PIECE)
            except OSError:
                pass  # the server may close first: what it said is what matters

        sender = threading.Thread(target=send_body, daemon=True)
        sender.start()
        answer = read_until_closed(sock)
        sender.join(30)
        return answer


class UploadAuthenticatedFirstTests(ServerTestCase):
    extra_config = {"max_upload_size": "100M"}

    def staging(self) -> str:
        return os.path.join(self.media_store, ".mediarepo_tmp")

    async def refused(self, head: bytes, body_bytes: int = BODY_BYTES) -> bytes:
        """Send ``head`` and a body; the answer, checked to have left no
        staging file at any moment and no media."""
        watch = _StagingWatch(self.staging())
        try:
            port = port_number(self.server.ports[0])
            answer = await deferToThread(_exchange, port, head, body_bytes)
        finally:
            watch.stop()
        self.assertGreater(watch.looks, 0)
        self.assertEqual(watch.seen, set())
        self.assertEqual(self.server.repository.storage.uploads_in_progress, 0)
        self.assertFalse(os.path.exists(os.path.join(self.media_store, "local_content")))
        return answer

    def post_head(self, authorization: bytes | None, length: int = BODY_BYTES) -> bytes:
        head = b"POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: x\r\n"
        if authorization is not None:
            head += b"Authorization: " + authorization + b"\r\n"
        return head + b"Content-Length: %d\r\n\r\n" % length

    def assert_answer(self, answer: bytes, status: bytes, errcode: bytes) -> None:
        self.assertTrue(answer.startswith(b"HTTP/1.1 " + status), answer[:300])
        self.assertIn(b'"errcode": "' + errcode + b'"', answer)

    async def test_post_without_a_token(self) -> None:
        answer = await self.refused(self.post_head(None))
        self.assert_answer(answer, b"401", b"M_MISSING_TOKEN")

    async def test_post_with_an_unknown_token(self) -> None:
        # Looked up in the database (not cached): the body waits unread.
        answer = await self.refused(self.post_head(b"Bearer syt_bm9ib2R5_unknown_0abcde"))
        self.assert_answer(answer, b"401", b"M_UNKNOWN_TOKEN")

    async def test_post_by_a_suspended_user(self) -> None:
        token = await self.register("bob")
        await self.server.database.run_query(
            "test", "UPDATE users SET suspended = ? WHERE name = ?", (True, f"@bob:{SERVER_NAME}")
        )
        answer = await self.refused(self.post_head(b"Bearer " + token.encode()))
        self.assert_answer(answer, b"403", b"M_USER_SUSPENDED")

    async def test_post_over_the_limit_by_its_length(self) -> None:
        token = await self.register("alice")
        head = self.post_head(b"Bearer " + token.encode(), length=101 * 1024 * 1024)
        answer = await self.refused(head)
        self.assert_answer(answer, b"413", b"M_TOO_LARGE")

    async def test_put_without_a_token(self) -> None:
        token = await self.register("alice")
        r = await self.request("POST", "/_matrix/media/v1/create", token=token)
        media_id = r.json()["content_uri"].rsplit("/", 1)[1]
        head = (
            f"PUT /_matrix/media/v3/upload/{SERVER_NAME}/{media_id} HTTP/1.1\r\n".encode()
            + b"Host: x\r\nContent-Length: %d\r\n\r\n" % BODY_BYTES
        )
        answer = await self.refused(head)
        self.assert_answer(answer, b"401", b"M_MISSING_TOKEN")
        # The reservation is still there to be filled.
        r = await self.request(
            "PUT", f"/_matrix/media/v3/upload/{SERVER_NAME}/{media_id}", token=token, body=b"x"
        )
        self.assertEqual(r.code, 200, r.body)

    async def test_accepted_upload_after_refusals(self) -> None:
        """The same connection handling stays right for a good upload."""
        await self.refused(self.post_head(None))
        token = await self.register("alice")
        r = await self.request(
            "POST", "/_matrix/media/v3/upload", token=token, body=os.urandom(3 * 1024 * 1024)
        )
        self.assertEqual(r.code, 200, r.body)


class UploadAuthenticatedFirstPostgresTests(UploadAuthenticatedFirstTests):
    engine = "psycopg2"
