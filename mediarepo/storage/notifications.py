"""PostgreSQL ``LISTEN``: announcements from other processes sharing the database.

One dedicated connection listens; its socket is watched by the reactor, so
waiting costs no thread and no pooled connection. A lost connection (a
failed poll, the reactor seeing the socket fail, a failed connect) is
opened again after a pause that doubles with each failure up to a cap;
announcements missed meanwhile are covered by the callers' polling.

The reactor watches a duplicate of the connection's descriptor, owned
here and closed only after it is unregistered: when the connection is
lost, libpq closes its own descriptor at once (inside ``poll``), and an
epoll reactor cannot unregister a closed number (it forgets half its
bookkeeping and never again reads a later connection given that number).
Removal never asks the dead connection for its number either.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorFDSet, IReactorTime, IReadDescriptor
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from zope.interface import implementer

from mediarepo.storage.database import one_line

logger = logging.getLogger(__name__)

# The pause before the first reconnection attempt, doubled after each
# failure up to the cap, and back to the first after a success.
RECONNECT_FIRST_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 5.0


@implementer(IReadDescriptor)
class PostgresListener:
    """``LISTEN`` on one channel; ``on_payload`` is called with each
    notification's payload, on the reactor thread."""

    def __init__(
        self,
        connect_args: Mapping[str, Any],
        channel: str,
        on_payload: Callable[[str], None],
        reactor: Any,
        connect: Callable[[Mapping[str, Any]], Any] | None = None,
        in_thread: Callable[[Callable[[], Any]], Awaitable[Any]] | None = None,
    ) -> None:
        """``connect`` opens a psycopg2 connection from the arguments, in
        autocommit mode; ``in_thread`` runs a blocking call off the reactor
        thread (by default, in the reactor's thread pool). Tests give
        their own."""
        self._connect_args = dict(connect_args)
        self._channel = channel
        self._on_payload = on_payload
        self._reactor: IReactorFDSet = reactor
        self._clock: IReactorTime = reactor
        self._open = connect if connect is not None else _psycopg2_connect
        self._in_thread = in_thread or (
            lambda f: deferToThreadPool(reactor, reactor.getThreadPool(), f)
        )
        # Any: a psycopg2 connection.
        self._conn: Any = None
        # Our duplicate of the connection's descriptor, while registered.
        self._fd: int | None = None
        self._retry: IDelayedCall | None = None
        self._connecting = False
        self._delay = RECONNECT_FIRST_SECONDS
        self._stopped = False

    @property
    def listening(self) -> bool:
        return self._fd is not None

    async def start(self) -> None:
        """Connect and LISTEN; on failure, keep trying in the background."""
        self._retry = None
        if self._stopped or self._connecting or self._conn is not None:
            return
        self._connecting = True
        try:
            conn = await self._in_thread(self._connect)
        except Exception as e:
            logger.warning(
                "cannot LISTEN on %s: %s; trying again in %.1fs",
                self._channel, one_line(e), self._delay,
            )  # fmt: skip
            self._schedule_reconnect()
            return
        finally:
            self._connecting = False
        if self._stopped:
            _close_quietly(conn)
            return
        try:
            fd = os.dup(conn.fileno())
        except Exception as e:
            logger.warning("LISTEN connection unusable: %s", e)
            _close_quietly(conn)
            self._schedule_reconnect()
            return
        self._conn = conn
        self._fd = fd
        self._reactor.addReader(self)
        self._delay = RECONNECT_FIRST_SECONDS
        logger.info("listening for notifications on %s", self._channel)

    def _connect(self) -> Any:
        conn = self._open(self._connect_args)
        try:
            with conn.cursor() as cursor:
                # The channel is ours, a fixed identifier; LISTEN takes no parameters.
                cursor.execute(f"LISTEN {self._channel}")
        except BaseException:
            _close_quietly(conn)
            raise
        return conn

    def _schedule_reconnect(self) -> None:
        if self._stopped or self._retry is not None:
            return
        delay = self._delay
        self._delay = min(self._delay * 2, RECONNECT_MAX_SECONDS)
        self._retry = self._clock.callLater(delay, lambda: defer.ensureDeferred(self.start()))

    def stop(self) -> None:
        """Stop listening and never reconnect. Never raises, whatever state
        the connection is in; a connection still being opened is closed as
        soon as it is."""
        self._stopped = True
        retry, self._retry = self._retry, None
        if retry is not None and retry.active():
            with contextlib.suppress(Exception):
                retry.cancel()
        self._drop()

    def _drop(self) -> None:
        """Forget the connection: unregister its descriptor, then close it."""
        if self._fd is not None:
            try:
                # Only if the reactor still has us: it removes a reader
                # itself before telling it its connection is lost, and the
                # number may belong to someone else by now.
                if self in self._reactor.getReaders():
                    self._reactor.removeReader(self)
            except Exception:
                logger.exception("removing the LISTEN descriptor failed")
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        conn, self._conn = self._conn, None
        if conn is not None:
            _close_quietly(conn)

    def _lost(self, why: object) -> None:
        if self._conn is None and self._fd is None:
            return
        self._drop()
        if not self._stopped:
            logger.warning(
                "LISTEN connection lost: %s; reconnecting in %.1fs", one_line(why), self._delay
            )
            self._schedule_reconnect()

    # -- IReadDescriptor ---------------------------------------------------------

    def fileno(self) -> int:
        return self._fd if self._fd is not None else -1

    def doRead(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            conn.poll()
            if conn.closed:
                raise ConnectionError("connection closed")
        except Exception as e:
            self._lost(e)
            return
        while conn.notifies:
            notification = conn.notifies.pop(0)
            try:
                self._on_payload(notification.payload)
            except Exception:
                logger.exception("handling a notification failed")

    def connectionLost(self, reason: Failure) -> None:
        self._lost(reason.getErrorMessage())

    def logPrefix(self) -> str:
        return "postgres-listen"


def _psycopg2_connect(args: Mapping[str, Any]) -> Any:
    import psycopg2

    conn = psycopg2.connect(**args)
    conn.autocommit = True
    return conn


def _close_quietly(conn: Any) -> None:
    with contextlib.suppress(Exception):
        conn.close()
