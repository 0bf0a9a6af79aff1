"""PostgreSQL ``LISTEN``: announcements from other processes sharing the database.

One dedicated connection listens; its socket is watched by the reactor, so
waiting costs no thread and no pooled connection. A lost connection is
re-opened after a pause; announcements missed meanwhile are covered by
the callers' polling.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorFDSet, IReactorTime, IReadDescriptor
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from zope.interface import implementer

logger = logging.getLogger(__name__)

RECONNECT_SECONDS = 5.0


@implementer(IReadDescriptor)
class PostgresListener:
    def __init__(
        self,
        connect_args: Mapping[str, Any],
        channel: str,
        on_payload: Callable[[str], None],
        reactor: Any,
    ) -> None:
        self._connect_args = dict(connect_args)
        self._channel = channel
        self._on_payload = on_payload
        self._reactor: IReactorFDSet = reactor
        self._clock: IReactorTime = reactor
        self._conn: Any = None
        self._retry: IDelayedCall | None = None
        self._stopped = False

    async def start(self) -> None:
        try:
            self._conn = await deferToThread(self._connect)
        except Exception as e:
            logger.warning("cannot LISTEN on %s: %s; retrying", self._channel, e)
            self._schedule_reconnect()
            return
        if self._stopped:
            self._conn.close()
            self._conn = None
            return
        self._reactor.addReader(self)

    def _connect(self) -> Any:
        import psycopg2
        import psycopg2.extensions

        conn = psycopg2.connect(**self._connect_args)
        conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
        with conn.cursor() as cursor:
            # The channel is ours, a fixed identifier; LISTEN takes no parameters.
            cursor.execute(f"LISTEN {self._channel}")
        return conn

    def _schedule_reconnect(self) -> None:
        if not self._stopped:
            self._retry = self._clock.callLater(
                RECONNECT_SECONDS, lambda: defer.ensureDeferred(self.start())
            )

    def stop(self) -> None:
        self._stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            self._reactor.removeReader(self)
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None

    # -- IReadDescriptor ---------------------------------------------------------

    def fileno(self) -> int:
        return int(self._conn.fileno()) if self._conn is not None else -1

    def doRead(self) -> None:
        try:
            self._conn.poll()
        except Exception as e:
            logger.warning("LISTEN connection lost: %s; reconnecting", e)
            self._drop()
            self._schedule_reconnect()
            return
        while self._conn.notifies:
            notification = self._conn.notifies.pop(0)
            try:
                self._on_payload(notification.payload)
            except Exception:
                logger.exception("handling a notification failed")

    def connectionLost(self, reason: Failure) -> None:
        self._drop()
        self._schedule_reconnect()

    def logPrefix(self) -> str:
        return "postgres-listen"
