"""A clean stop while uploads are still arriving: they finish within the
grace period, or are rolled back after it."""

from __future__ import annotations

import os
import socket

from twisted.internet import reactor, task
from twisted.internet.threads import deferToThread

from tests.utils import SERVER_NAME, ServerTestMixin, on_both_databases, read_until_closed

BODY = os.urandom(2_000_000)


@on_both_databases
class ShutdownTests(ServerTestMixin):
    async def _start_upload(self) -> socket.socket:
        token = await self.register()
        port = self.server.ports[0].getHost().port
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.addCleanup(sock.close)  # type: ignore[attr-defined]
        head = (
            b"POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\n"
            b"Content-Length: %d\r\n\r\n" % len(BODY)
        )
        await deferToThread(sock.sendall, head + BODY[:1_000_000])
        await task.deferLater(reactor, 0.2, lambda: None)
        return sock

    def _staged(self) -> list[str]:
        return os.listdir(os.path.join(self.media_store, ".mediarepo_tmp"))

    async def test_upload_in_flight_finishes(self) -> None:
        sock = await self._start_upload()
        stopping = self.server.stop_deferred()
        await task.deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(stopping.called)  # type: ignore[attr-defined]
        await deferToThread(sock.sendall, BODY[1_000_000:])
        answer = await deferToThread(read_until_closed, sock)
        await stopping
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer[:300])  # type: ignore[attr-defined]
        media_id = answer.split(f"mxc://{SERVER_NAME}/".encode())[1][:24].decode()
        # A new server on the same database and store serves it.
        await self.start_server()
        token = await self.register("bob")
        response = await self.request(
            "GET", f"/_matrix/client/v1/media/download/{SERVER_NAME}/{media_id}", token=token
        )
        self.assertEqual((response.code, response.body), (200, BODY))  # type: ignore[attr-defined]

    async def test_upload_past_grace_is_rolled_back(self) -> None:
        self.server.shutdown_grace_seconds = 0.5
        sock = await self._start_upload()
        self.assertEqual(len(self._staged()), 1)  # type: ignore[attr-defined]
        await self.server.stop()
        answer = await deferToThread(read_until_closed, sock)
        self.assertNotIn(b"200", answer[:12])  # type: ignore[attr-defined]
        self.assertEqual(self._staged(), [])  # type: ignore[attr-defined]
        self.assertFalse(  # type: ignore[attr-defined]
            os.path.exists(os.path.join(self.media_store, "local_content"))
        )
