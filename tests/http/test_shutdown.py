"""A clean stop while uploads are still arriving: they finish within the
grace period, or are rolled back after it. A step of stopping that fails
or hangs does not keep the others from running (ports closed, database
and thread pools stopped), and a stop after the database connections were
cut completes and leaves no descriptor registered."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any
from unittest import SkipTest

import psycopg2
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from mediarepo import services
from mediarepo.storage.notifications import PostgresListener
from tests.utils import (
    SERVER_NAME,
    ServerTestCase,
    port_number,
    postgres_params,
    read_until_closed,
    until,
)

BODY = os.urandom(2_000_000)


class ShutdownTests(ServerTestCase):
    async def _start_upload(self) -> socket.socket:
        token = await self.register()
        port = port_number(self.server.ports[0])
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.addCleanup(sock.close)
        head = (
            b"POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\n"
            b"Content-Length: %d\r\n\r\n" % len(BODY)
        )
        await deferToThread(sock.sendall, head + BODY[:1_000_000])
        storage = self.server.repository.storage
        await until(
            lambda: storage.uploads_in_progress == 1 and len(self._staged()) == 1,
            "the upload is being stored",
        )
        return sock

    def _staged(self) -> list[str]:
        return os.listdir(os.path.join(self.media_store, ".mediarepo_tmp"))

    async def test_upload_in_flight_finishes(self) -> None:
        sock = await self._start_upload()
        stopping = self.server.stopService()
        children = self.server.namedServices
        # The stop waits at its uploads step, with the rest still to come.
        await until(lambda: not children["uploads"].running, "the stop waits for uploads")
        self.assertTrue(children["client connections"].running)
        self.assertFalse(stopping.called)
        await deferToThread(sock.sendall, BODY[1_000_000:])
        answer = await deferToThread(read_until_closed, sock)
        await stopping
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer[:300])
        media_id = answer.split(f"mxc://{SERVER_NAME}/".encode())[1][:24].decode()
        # A new server on the same database and store serves it.
        await self.start_server()
        token = await self.register("bob")
        response = await self.request(
            "GET", f"/_matrix/client/v1/media/download/{SERVER_NAME}/{media_id}", token=token
        )
        self.assertEqual((response.code, response.body), (200, BODY))

    async def test_upload_past_grace_is_rolled_back(self) -> None:
        self.server.shutdown_grace_seconds = 0.5
        sock = await self._start_upload()
        self.assertEqual(len(self._staged()), 1)
        await self.server.stop()
        answer = await deferToThread(read_until_closed, sock)
        self.assertNotIn(b"200", answer[:12])
        self.assertEqual(self._staged(), [])
        self.assertFalse(os.path.exists(os.path.join(self.media_store, "local_content")))

    async def test_failing_and_stuck_steps_do_not_skip_the_rest(self) -> None:
        self.patch(services, "STOP_STEP_SECONDS", 0.2)
        server = self.server

        def fails() -> None:
            raise RuntimeError("closing failed")

        # Stopping these children fails, or never ends (background work
        # that never settles).
        server.namedServices["federation client"].stopService = fails
        for stuck in ("thumbnails", "provider tasks"):
            server.namedServices[stuck].stopService = defer.Deferred
        port = port_number(server.ports[0])
        started = time.monotonic()
        with self.assertLogs("mediarepo.services", "WARNING") as logs:
            await server.stop()
        self.assertLess(time.monotonic() - started, 2.0)
        text = "\n".join(logs.output)
        self.assertIn("stopping: federation client failed", text)
        self.assertIn("stopping: thumbnails did not finish", text)
        self.assertIn("stopping: provider tasks did not finish", text)
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        # Every child stopped, the ones after the failing and stuck ones too
        # (those three, whose stop was replaced, alone still say they run).
        still_running = [s.name for s in server if s.running]
        self.assertEqual(still_running, ["provider tasks", "thumbnails", "federation client"])
        self.assertFalse(server.parts.media_io.started)
        self.assertFalse(server.parts.thumbnail_pool.started)

    async def test_stop_after_database_connections_cut(self) -> None:
        """The LISTEN connection and the pool's, cut under the server (a
        PostgreSQL restart): the server still stops, promptly, leaving no
        descriptor registered."""
        if self.engine != "psycopg2":
            raise SkipTest("SQLite has no connection to cut")
        listener = self.server.parts.notifications
        assert listener is not None
        self.assertTrue(listener.listening)
        noticed = loss_noticed(self, listener)
        conn = psycopg2.connect(dbname="postgres", **postgres_params())
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (self.database_config["args"]["dbname"],),
            )
        conn.close()
        await noticed
        self.assertFalse(listener.listening)
        started = time.monotonic()
        await self.server.stop()
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertNotIn(listener, reactor.getReaders())
        self.assertFalse(self.server.namedServices["database"].running)
        # Stopped, so nothing reconnects afterwards: a stop cancels the
        # reconnection the loss scheduled (ListenerUnitTests, on a clock).
        self.assertFalse(self.server.namedServices["LISTEN"].running)


class ShutdownPostgresTests(ShutdownTests):
    engine = "psycopg2"


def loss_noticed(case: unittest.TestCase, listener: PostgresListener) -> defer.Deferred[None]:
    """Fires once the reactor has told ``listener`` that its connection is
    gone (a read that fails, or the loss itself)."""
    noticed: defer.Deferred[None] = defer.Deferred()

    def telling(method: Callable[..., None]) -> Callable[..., None]:
        def told(*args: Any) -> None:
            method(*args)
            if not listener.listening and not noticed.called:
                noticed.callback(None)

        return told

    for name in ("doRead", "connectionLost"):
        case.patch(listener, name, telling(getattr(listener, name)))
    return noticed.addTimeout(10, reactor)
