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
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorFDSet, IReactorTime, IReadDescriptor
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from zope.interface import implementer

from mediarepo.errors import one_line
from mediarepo.storage.database import Transaction

logger = logging.getLogger(__name__)

# The pause before the first reconnection attempt, doubled after each
# failure up to the cap, and back to the first after a success.
RECONNECT_FIRST_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 5.0


# The channel on which deleted and (un)quarantined media are announced, so
# that other processes drop what they cached of them. A payload names one
# media, "ORIGIN/MEDIA_ID" ("" for local media), or is "*": everything.
CHANGED_CHANNEL = "mediarepo_media_changed"
ALL_MEDIA_CHANGED = "*"
# Above this many media in one change, one "*" instead of a payload each.
_MAX_CHANGED_PAYLOADS = 100


def announce_changed_txn(
    t: Transaction, local_ids: Collection[str], remote_keys: Collection[tuple[str, str]] = ()
) -> None:
    """Tell other processes on a PostgreSQL database that these media were
    deleted or their quarantine changed (delivered when ``t`` commits)."""
    if t.engine.name != "psycopg2" or not (local_ids or remote_keys):
        return
    if len(local_ids) + len(remote_keys) > _MAX_CHANGED_PAYLOADS:
        payloads = [ALL_MEDIA_CHANGED]
    else:
        payloads = [f"/{media_id}" for media_id in local_ids]
        payloads += [f"{origin}/{media_id}" for origin, media_id in remote_keys]
    for payload in payloads:
        t.execute("SELECT pg_notify(?, ?)", (CHANGED_CHANNEL, payload))


@implementer(IReadDescriptor)
class PostgresListener:
    """``LISTEN`` on some channels; each notification's payload is given to
    its channel's handler, on the reactor thread."""

    def __init__(
        self,
        connect_args: Mapping[str, Any],
        handlers: Mapping[str, Callable[[str], None]],
        reactor: Any,
        connect: Callable[[Mapping[str, Any]], Any] | None = None,
        in_thread: Callable[[Callable[[], Any]], Awaitable[Any]] | None = None,
    ) -> None:
        """``connect`` opens a psycopg2 connection from the arguments, in
        autocommit mode; ``in_thread`` runs a blocking call off the reactor
        thread (by default, in the reactor's thread pool). Tests give
        their own."""
        self._connect_args = dict(connect_args)
        # By channel: who is given its payloads.
        self.handlers = dict(handlers)
        # For the logs.
        self._channel = ", ".join(self.handlers)
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
                for channel in self.handlers:
                    # Our own fixed identifiers; LISTEN takes no parameters.
                    cursor.execute(f"LISTEN {channel}")
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
            handler = self.handlers.get(notification.channel)
            if handler is None:
                continue
            try:
                handler(notification.payload)
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
