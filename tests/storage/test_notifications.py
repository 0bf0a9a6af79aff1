"""PostgresListener: LISTEN survives any loss of its connection.

On a clock and a reactor that tracks descriptors as epoll does (removal
asks the reader for its number and fails for a closed one), with
connections on real sockets that close their descriptor when they break,
as libpq does: a descriptor is registered while listening and removed
after every loss without asking the dead connection; reconnection backs
off 0.5 s, 1 s, 2 s, 4 s, then every 5 s, and starts again from 0.5 s
after a success; ``stop`` never raises and
leaves nothing registered or scheduled in any state. Then with a real
PostgreSQL connection that the test terminates from another session.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

import psycopg2
from twisted.internet import defer, reactor, task
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial import unittest

from mediarepo.storage.notifications import PostgresListener
from tests.utils import postgres_params

CHANNEL = "test_channel"


class FdReactor(MemoryReactorClock):
    """Readers by descriptor number, asked for it on removal, as epoll does."""

    def __init__(self) -> None:
        super().__init__()
        self.fds: dict[int, Any] = {}

    def addReader(self, reader: Any) -> None:
        fd = reader.fileno()
        assert fd not in self.fds, f"descriptor {fd} registered twice"
        self.fds[fd] = reader
        super().addReader(reader)

    def removeReader(self, reader: Any) -> None:
        fd = reader.fileno()
        if fd in self.fds:
            os.fstat(fd)  # epoll cannot unregister a closed descriptor either
            del self.fds[fd]
        super().removeReader(reader)


class Notify:
    def __init__(self, payload: str, channel: str = CHANNEL) -> None:
        self.payload = payload
        self.channel = channel


class FakeCursor:
    def __init__(self, conn: FakeConnection) -> None:
        self.conn = conn

    def __enter__(self) -> FakeCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def execute(self, sql: str) -> None:
        self.conn.executed.append(sql)


class FakeConnection:
    """A psycopg2 connection as far as the listener uses one, on a real
    socket: once closed (or broken), ``fileno`` raises as psycopg2's does,
    and a broken one has closed its socket, as libpq does."""

    def __init__(self) -> None:
        self.sock, self.peer = socket.socketpair()
        self.fd = self.sock.fileno()
        self.closed = 0
        self.notifies: list[Notify] = []
        self.executed: list[str] = []
        self.close_error: Exception | None = None

    def cursor(self) -> FakeCursor:
        return FakeCursor(self)

    def fileno(self) -> int:
        if self.closed:
            raise psycopg2.InterfaceError("connection already closed")
        return self.fd

    def poll(self) -> None:
        if self.closed:
            raise psycopg2.OperationalError("server closed the connection unexpectedly")

    def break_(self) -> None:
        """The server went away and libpq noticed: the socket is closed."""
        self.closed = 2
        self.sock.close()

    def close(self) -> None:
        self.closed = self.closed or 1
        self.sock.close()
        if self.close_error is not None:
            raise self.close_error


class Connector:
    """Hands out connections with fresh descriptor numbers, or fails."""

    def __init__(self) -> None:
        self.opened: list[FakeConnection] = []
        self.failing = False

    def __call__(self, args: Mapping[str, Any]) -> FakeConnection:
        if self.failing:
            raise psycopg2.OperationalError("connection refused")
        conn = FakeConnection()
        self.opened.append(conn)
        return conn

    def close_all(self) -> None:
        for conn in self.opened:
            conn.sock.close()
            conn.peer.close()


class ListenerUnitTests(unittest.TestCase):
    def setUp(self) -> None:
        self.reactor = FdReactor()
        self.connector = Connector()
        self.addCleanup(self.connector.close_all)
        self.payloads: list[str] = []
        # The blocking connect, run at once (or held, for "still connecting").
        self.held: defer.Deferred[Any] | None = None
        self.hold = False
        self.listener = self.make()

    def make(self) -> PostgresListener:
        def in_thread(f: Callable[[], Any]) -> defer.Deferred[Any]:
            if self.hold:
                self.held = defer.Deferred()
                self.held.addCallback(lambda _: f())
                return self.held
            return defer.maybeDeferred(f)

        return PostgresListener(
            {}, {CHANNEL: self.payloads.append}, self.reactor, self.connector, in_thread
        )

    def start(self) -> None:
        self.successResultOf(defer.ensureDeferred(self.listener.start()))

    def lose_by_poll(self) -> FakeConnection:
        """The server goes away: the socket reads EOF, poll fails, and
        psycopg2 has closed its socket (fileno now raises)."""
        conn = self.connector.opened[-1]
        conn.break_()
        self.listener.doRead()
        return conn

    def assert_nothing_registered(self) -> None:
        self.assertEqual(self.reactor.fds, {})
        self.assertEqual(self.reactor.getReaders(), [])

    def test_listens_and_delivers(self) -> None:
        self.start()
        conn = self.connector.opened[0]
        self.assertEqual(conn.executed, [f"LISTEN {CHANNEL}"])
        self.assertEqual(list(self.reactor.fds.values()), [self.listener])
        conn.notifies += [Notify("a"), Notify("b")]
        self.listener.doRead()
        self.assertEqual(self.payloads, ["a", "b"])

    def test_each_channel_to_its_handler(self) -> None:
        other: list[str] = []
        listener = PostgresListener(
            {}, {CHANNEL: self.payloads.append, "other": other.append}, self.reactor,
            self.connector, defer.maybeDeferred,
        )  # fmt: skip
        self.addCleanup(listener.stop)
        self.successResultOf(defer.ensureDeferred(listener.start()))
        conn = self.connector.opened[0]
        self.assertEqual(conn.executed, [f"LISTEN {CHANNEL}", "LISTEN other"])
        conn.notifies += [Notify("a"), Notify("b", "other"), Notify("c", "unknown")]
        listener.doRead()
        self.assertEqual((self.payloads, other), (["a"], ["b"]))

    def test_payload_handler_failure_is_contained(self) -> None:
        self.payloads_seen: list[str] = []

        def explode(payload: str) -> None:
            self.payloads_seen.append(payload)
            raise RuntimeError("boom")

        listener = PostgresListener(
            {}, {CHANNEL: explode}, self.reactor, self.connector, defer.maybeDeferred
        )
        self.addCleanup(listener.stop)
        self.successResultOf(defer.ensureDeferred(listener.start()))
        self.connector.opened[0].notifies += [Notify("a"), Notify("b")]
        with self.assertLogs("mediarepo.storage.notifications", "ERROR") as logs:
            listener.doRead()
        self.assertEqual(len(logs.records), 2)
        self.assertEqual(self.payloads_seen, ["a", "b"])
        self.assertTrue(listener.listening)

    def test_lost_poll_unregisters_without_asking_the_dead_connection(self) -> None:
        self.start()
        watched = self.listener.fileno()
        self.lose_by_poll()
        self.assert_nothing_registered()
        self.assertFalse(self.listener.listening)
        # Ours is closed after unregistering: the next socket may get its
        # number, and is registered and read.
        with socket.socket() as sock:
            os.dup2(sock.fileno(), watched)
        self.addCleanup(os.close, watched)
        other = _Other(watched)
        self.reactor.addReader(other)
        self.reactor.advance(0.5)
        self.assertEqual(len(self.connector.opened), 2)
        self.assertTrue(self.listener.listening)
        self.assertEqual(self.reactor.fds, {watched: other, self.listener.fileno(): self.listener})

    def test_reactor_reported_loss_does_not_remove_a_reused_number(self) -> None:
        """The reactor removes a failed reader before telling it; by then
        the number may be someone else's, which must stay registered."""
        self.start()
        watched = self.listener.fileno()
        self.connector.opened[0].break_()
        self.reactor.removeReader(self.listener)
        other = _Other(watched)
        self.reactor.addReader(other)
        self.listener.connectionLost(Failure(ConnectionError("socket error")))
        self.assertEqual(self.reactor.fds, {watched: other})
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.assertFalse(self.listener.listening)

    def test_backoff_schedule(self) -> None:
        self.start()
        self.connector.failing = True
        self.lose_by_poll()
        attempts: list[float] = []
        real_connect = self.connector.__call__

        def counting(args: Mapping[str, Any]) -> FakeConnection:
            attempts.append(self.reactor.seconds())
            return real_connect(args)

        self.listener._open = counting
        while len(attempts) < 7:
            self.reactor.advance(0.25)
        gaps = [round(b - a, 2) for a, b in zip([0.0, *attempts], attempts, strict=False)]
        self.assertEqual(gaps, [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0])
        self.assert_nothing_registered()
        self.flushLoggedErrors()
        # A success resets the pause: the next loss is retried after 0.5 s.
        self.connector.failing = False
        self.reactor.advance(5.0)
        self.assertTrue(self.listener.listening)
        lost_at = self.reactor.seconds()
        self.lose_by_poll()
        self.assertEqual([c.getTime() - lost_at for c in self.reactor.getDelayedCalls()], [0.5])

    def test_failed_first_connect_retries(self) -> None:
        self.connector.failing = True
        self.start()
        self.assertFalse(self.listener.listening)
        self.connector.failing = False
        self.reactor.advance(0.5)
        self.assertTrue(self.listener.listening)

    def test_failed_listen_closes_the_connection(self) -> None:
        def broken_cursor(args: Mapping[str, Any]) -> FakeConnection:
            conn = self.connector(args)
            self.patch(conn, "cursor", _raise)
            return conn

        self.listener._open = broken_cursor
        self.start()
        self.assertEqual(self.connector.opened[0].closed, 1)
        self.assert_nothing_registered()
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)

    def assert_stopped_cleanly(self) -> None:
        self.listener.stop()
        self.listener.stop()  # again: still fine
        self.assert_nothing_registered()
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        for conn in self.connector.opened:
            self.assertTrue(conn.closed)
        # Nothing comes back later.
        self.reactor.advance(60)
        self.assert_nothing_registered()
        self.assertTrue(all(conn.closed for conn in self.connector.opened))

    def test_stop_never_started(self) -> None:
        self.assert_stopped_cleanly()

    def test_stop_while_listening(self) -> None:
        self.start()
        self.assert_stopped_cleanly()

    def test_stop_while_listening_and_close_fails(self) -> None:
        self.start()
        self.connector.opened[0].close_error = psycopg2.InterfaceError("already closed")
        self.assert_stopped_cleanly()

    def test_stop_after_connection_broke_unnoticed(self) -> None:
        """The bug this guards: the connection broke (fileno raises) but no
        read noticed yet; stop must still unregister and not raise."""
        self.start()
        self.connector.opened[0].break_()
        self.assert_stopped_cleanly()

    def test_stop_while_waiting_to_reconnect(self) -> None:
        self.start()
        self.lose_by_poll()
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.assert_stopped_cleanly()

    def test_stop_while_connecting(self) -> None:
        self.hold = True
        started = defer.ensureDeferred(self.listener.start())
        self.assertIsNotNone(self.held)
        self.listener.stop()
        assert self.held is not None
        self.held.callback(None)  # the connect finishes after the stop
        self.successResultOf(started)
        self.assertEqual(len(self.connector.opened), 1)
        self.assert_stopped_cleanly()

    def test_stop_while_connect_is_failing(self) -> None:
        self.hold = True
        self.connector.failing = True
        started = defer.ensureDeferred(self.listener.start())
        self.listener.stop()
        assert self.held is not None
        self.held.callback(None)
        self.successResultOf(started)
        self.assert_stopped_cleanly()


class _Other:
    """Another connection's reader."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


def _raise() -> Any:
    raise psycopg2.OperationalError("cannot LISTEN")


class ListenerPostgresTests(unittest.TestCase):
    """A real connection, terminated from another session."""

    timeout = 30

    def setUp(self) -> None:
        self.channel = f"test_{secrets.token_hex(4)}"
        self.application = f"mediarepo-listen-{secrets.token_hex(4)}"
        self.payloads: list[str] = []
        self.arrived: defer.Deferred[None] | None = None

        def on_payload(payload: str) -> None:
            self.payloads.append(payload)
            if self.arrived is not None and not self.arrived.called:
                self.arrived.callback(None)

        args = {
            **postgres_params(),
            "dbname": "postgres",
            "application_name": self.application,
            "connect_timeout": 2,
        }
        self.listener = PostgresListener(args, {self.channel: on_payload}, reactor)
        self.addCleanup(self.listener.stop)

    def admin(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        conn = psycopg2.connect(dbname="postgres", **postgres_params())
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    async def until(self, condition: Callable[[], bool], what: str, seconds: float = 10) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting until {what}")
            await task.deferLater(reactor, 0.05, lambda: None)

    async def notified(self, payload: str) -> None:
        """NOTIFY until the listener has the payload (it may be reconnecting)."""
        deadline = time.monotonic() + 10
        while payload not in self.payloads:
            self.assertLess(time.monotonic(), deadline, f"{payload!r} never arrived")
            self.arrived = defer.Deferred()
            self.arrived.addTimeout(0.2, reactor, onTimeoutCancel=lambda *_: None)
            self.admin("SELECT pg_notify(%s, %s)", (self.channel, payload))
            await self.arrived
        self.arrived = None

    def listener_fds(self) -> list[int]:
        # The reactor's own table by descriptor number (private): a stale
        # entry left under an old number is what these tests look for.
        selectables = reactor._selectables  # type: ignore[attr-defined]
        return [fd for fd, r in selectables.items() if r is self.listener]

    async def test_terminated_backend_is_replaced(self) -> None:
        await self.listener.start()
        self.assertTrue(self.listener.listening)
        await self.notified("before")
        first_fds = self.listener_fds()
        self.assertEqual(len(first_fds), 1)

        for round_ in range(2):
            pids = self.admin(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s",
                (self.application,),
            )
            self.assertEqual(len(pids), 1)
            await self.until(lambda: not self.listener.listening, "the loss is noticed")
            self.assertNotIn(self.listener, reactor.getReaders())
            self.assertEqual(self.listener_fds(), [])
            await self.until(lambda: self.listener.listening, "LISTEN is back")
            self.assertEqual(len(self.listener_fds()), 1)
            await self.notified(f"after {round_}")
        self.flushLoggedErrors()

        self.listener.stop()
        self.assertNotIn(self.listener, reactor.getReaders())
        await self.until(
            lambda: (
                not self.admin(
                    "SELECT 1 FROM pg_stat_activity WHERE application_name = %s",
                    (self.application,),
                )
            ),
            "the connection is closed",
        )

    async def test_stop_after_unnoticed_termination(self) -> None:
        """Terminated while the reactor was busy: stop still cleans up."""
        await self.listener.start()
        self.admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (self.application,),
        )
        self.listener.stop()
        self.assertNotIn(self.listener, reactor.getReaders())
        self.assertEqual(self.listener_fds(), [])
