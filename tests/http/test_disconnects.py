"""Clients that go away early: before the file starts, or in the middle of it."""

from __future__ import annotations

import logging
import os
import socket

from twisted.internet.threads import deferToThread

from tests.utils import SERVER_NAME, LogRecords, ServerTestCase, port_number, until


class DisconnectTests(ServerTestCase):
    def _get_and_leave(self, port: int, path: str, token: str, read: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
            )
            received = 0
            while received < read:
                data = sock.recv(65536)
                if not data:
                    break
                received += len(data)
            # Closing with data unread makes the kernel send a reset.
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )

    async def test_early_and_midway_disconnects(self) -> None:
        errors = LogRecords(logging.ERROR)
        logging.getLogger("mediarepo").addHandler(errors)
        self.addCleanup(logging.getLogger("mediarepo").removeHandler, errors)
        token = await self.register()
        data = os.urandom(20 * 1024 * 1024)
        media_id = await self.upload(token, data)
        path = f"/_matrix/client/v1/media/download/{SERVER_NAME}/{media_id}"
        port = port_number(self.server.ports[0])
        for read in (0, 1000, 0, 5_000_000):
            await deferToThread(self._get_and_leave, port, path, token, read)
        # Every connection's end handled by the server (nothing logged meanwhile).
        sites = self.server.parts.sites
        await until(lambda: not any(site.channels for site in sites), "the connections are gone")
        r = await self.request("GET", path, token=token)
        self.assertEqual((r.code, len(r.body)), (200, len(data)))
        self.assertEqual([r.getMessage() for r in errors.records], [])


class DisconnectPostgresTests(DisconnectTests):
    engine = "psycopg2"
