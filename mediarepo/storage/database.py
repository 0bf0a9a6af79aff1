"""The database pool: SQLite or PostgreSQL through ``twisted.enterprise.adbapi``.

Queries are written once, with ``?`` placeholders; :class:`Transaction` converts
them for psycopg2. Every database call runs on the pool's threads, so the
reactor never waits on a socket or a disk.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from prometheus_client import Gauge, Histogram
from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorCore
from twisted.internet.threads import deferToThreadPool

from mediarepo.config import DatabaseConfig
from mediarepo.errors import DatabaseUnavailableError, one_line
from mediarepo.storage.engines import Engine, create_engine

logger = logging.getLogger(__name__)

R = TypeVar("R")

Row = tuple[Any, ...]

transaction_seconds = Histogram(
    "mediarepo_db_transaction_seconds",
    "Time spent in database transactions, including waiting for a connection",
    ["desc"],
)
transactions_in_flight = Gauge(
    "mediarepo_db_transactions_in_flight",
    "Database transactions started and not yet finished",
)
pool_connections_max = Gauge(
    "mediarepo_db_pool_connections_max", "The most connections the database pool may open"
)
database_unavailable = Gauge(
    "mediarepo_db_unavailable",
    "1 while the database cannot be reached and requests are refused with 503",
)

# How many times an interaction is retried after its connection was lost.
_RECONNECT_RETRIES = 2

# While the database is unreachable, a connection is tried after this
# pause, doubled after each failure up to the cap; requests are refused at
# once meanwhile.
PROBE_FIRST_SECONDS = 0.2
PROBE_MAX_SECONDS = 1.0


class _ConnectFailed(Exception):
    """A new connection to the server could not be opened."""


# Values of an ``IN (...)`` list sent at once: bounded statements, a few
# round trips for a purge's batch.
IN_LIST_SIZE = 100


def in_list_batches(values: Sequence[str]) -> Iterable[list[str]]:
    """``values`` in lists of at most ``IN_LIST_SIZE``."""
    for start in range(0, len(values), IN_LIST_SIZE):
        yield list(values[start : start + IN_LIST_SIZE])


def placeholders(values: Sequence[object]) -> str:
    """``?, ?, ...``: one per value, for an ``IN (...)`` list."""
    return ", ".join("?" for _ in values)


def rows_for_each_batch(
    t: Transaction, sql: str, ids: Sequence[str], before: Sequence[object] = ()
) -> list[Row]:
    """Run ``sql`` once per batch of ``ids`` (``{ids}`` in it stands for the
    batch's ``?, ?, ...``), with ``before`` as its first parameters; every
    row the batches returned."""
    rows: list[Row] = []
    for batch in in_list_batches(ids):
        t.execute(sql.format(ids=placeholders(batch)), [*before, *batch])
        rows.extend(t.fetchall())
    return rows


class Transaction:
    """A cursor whose statements mark their parameters with ``?`` on every
    engine.

    Given ``begin`` (an explicit transaction on a connection in autocommit),
    that statement is sent with the first statement, in its round trip."""

    def __init__(self, cursor: Any, engine: Engine, *, begin: str | None = None) -> None:
        self._cursor = cursor
        self.engine = engine
        self._begin = begin
        self.in_transaction = begin is not None
        # Whether work outside the database (files linked into place) was
        # done inside the transaction: then it is not run again on a new
        # connection when the first one turns out lost.
        self.outside_effects = False

    @property
    def begun(self) -> bool:
        """Whether an explicit transaction was opened on the server."""
        return self.in_transaction and self._begin is None

    def _take_begin(self) -> str | None:
        begin, self._begin = self._begin, None
        return begin

    def execute(self, sql: str, args: Sequence[Any] = ()) -> None:
        self.engine.execute(
            self._cursor,
            sql,
            tuple(args),
            begin=self._take_begin(),
            in_transaction=self.in_transaction,
        )

    def execute_batch(self, sql: str, args: Iterable[Sequence[Any]]) -> None:
        begin = self._take_begin()
        if begin is not None:
            self._cursor.execute(begin)
        self.engine.execute_batch(self._cursor, sql, [tuple(a) for a in args])

    def fetchone(self) -> Row | None:
        row = self._cursor.fetchone()
        return tuple(row) if row is not None else None

    def fetchall(self) -> list[Row]:
        return [tuple(row) for row in self._cursor.fetchall()]

    @property
    def rowcount(self) -> int:
        return int(self._cursor.rowcount)


class _Connection(adbapi.Connection):
    """A pooled connection that, once lost, is dropped instead of rolled
    back (which could only fail, and be logged with a traceback, twice)."""

    def rollback(self) -> None:
        conn: Any = self._connection
        if conn is not None and conn.closed:
            self._pool.disconnect(conn)
            return
        super().rollback()  # type: ignore[no-untyped-call]


class _Pool(adbapi.ConnectionPool):
    """adbapi's pool, for a server that may go away: a thread's connection
    opened before the server was last found unreachable, or seen closed, is
    replaced before use; no connection is tried while the server is known
    unreachable; a failed connect is told apart from a failed statement."""

    connectionFactory = _Connection

    def __init__(self, database: Database, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._database = database
        # The database's outage count when each thread's connection was opened.
        self._opened_in: dict[int, int] = {}

    def connect(self) -> Any:
        database = self._database
        if database.unavailable_since is not None:
            raise DatabaseUnavailableError("unreachable")
        tid: int = self.threadID()  # type: ignore[no-untyped-call]
        conn: Any = self.connections.get(tid)
        # psycopg2 says closed (nonzero) once it has seen the socket fail.
        if conn is not None and (self._opened_in.get(tid) != database.outages or conn.closed):
            self.disconnect(conn)  # type: ignore[no-untyped-call]
        fresh = tid not in self.connections
        try:
            conn = super().connect()  # type: ignore[no-untyped-call]
        except Exception as e:
            # Marked here, on the pool's thread, so that calls queued behind
            # this one are refused at once rather than each trying again.
            database.mark_unreachable(e)
            raise _ConnectFailed(e) from e
        if fresh:
            self._opened_in[tid] = database.outages
        return conn


class Database:
    """One connection pool. ``run_interaction`` runs a function in a
    transaction (with other blocking work inside it if need be, in one trip
    to the pool); ``run_query`` and ``run_update`` run one statement alone,
    outside any transaction (what ``CREATE INDEX CONCURRENTLY`` needs)."""

    def __init__(self, config: DatabaseConfig, reactor: IReactorCore | None = None) -> None:
        self.engine = create_engine(config.engine)
        kwargs: dict[str, Any] = dict(config.args)
        cp_min, cp_max = config.cp_min, config.cp_max
        if self.engine.name == "sqlite3":
            # One connection: SQLite allows one writer, and a pool of one
            # serialises transactions instead of failing them as "locked".
            kwargs["check_same_thread"] = False
            kwargs.setdefault("timeout", 10)
            cp_min = cp_max = 1
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self._reactor = reactor
        kwargs = self.engine.connect_args(kwargs)
        self.connect_args: dict[str, Any] = dict(kwargs)
        # Set (a monotonic time) while the server cannot be reached.
        self.unavailable_since: float | None = None
        # How many times the server was found unreachable.
        self.outages = 0
        self._marking = threading.Lock()
        self._probe: IDelayedCall | None = None
        # Whether a probe is scheduled or running.
        self._probing = False
        self._probe_delay = PROBE_FIRST_SECONDS
        self._closed = False
        pool_class: Any = _Pool if self.engine.remote else adbapi.ConnectionPool
        pool_args: tuple[Any, ...] = (self,) if self.engine.remote else ()
        self._pool = pool_class(
            *pool_args,
            config.engine,
            cp_min=cp_min,
            cp_max=cp_max,
            cp_reconnect=True,
            cp_noisy=False,
            cp_openfun=self.engine.on_new_connection,
            cp_reactor=reactor,
            **kwargs,
        )
        pool_connections_max.set(cp_max)

    @property
    def threadpool_size(self) -> int:
        return int(self._pool.max)

    async def run_interaction(
        self,
        desc: str,
        func: Callable[[Transaction], R],
        *,
        after_commit: Callable[[R], None] | None = None,
    ) -> R:
        """Run ``func(txn)`` in one transaction on a pool thread, then
        ``after_commit(result)`` on the same thread once it is committed.

        The transaction commits when ``func`` returns and rolls back when it
        raises. If the connection was lost (PostgreSQL restarted, a proxy cut
        it), the pool reconnects and the transaction is run again, unless
        ``func`` did work outside the database (``txn.outside_effects``),
        which cannot be undone; then :class:`DatabaseUnavailableError` is
        raised.
        """
        started: list[Transaction] = []

        def interaction(conn: Any) -> R:
            cursor = conn.cursor()
            begin = self.engine.begin_sql if self.engine.autocommit else None
            txn = Transaction(cursor, self.engine, begin=begin)
            started.append(txn)
            try:
                result = func(txn)
            except BaseException:
                if txn.begun:
                    with contextlib.suppress(Exception):
                        cursor.execute("ROLLBACK")
                # Without autocommit the driver opened the transaction and
                # the pool rolls it back.
                raise
            if txn.begun:
                cursor.execute("COMMIT")
            elif not self.engine.autocommit:
                conn.commit()
            if after_commit is not None:
                after_commit(result)
            return result

        def may_retry() -> bool:
            return not (started and started[-1].outside_effects)

        return await self._run("transaction", desc, interaction, may_retry)

    async def run_query(self, desc: str, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        """Run one statement and return its rows (empty for statements
        without rows). A statement is atomic by itself: on PostgreSQL it is
        sent alone, without a BEGIN and a COMMIT around it."""

        def query(conn: Any) -> list[Row]:
            cursor = conn.cursor()
            txn = Transaction(cursor, self.engine)
            txn.execute(sql, args)
            if cursor.description is None:
                return []
            return txn.fetchall()

        return await self._run("statement", desc, query)

    async def run_update(self, desc: str, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one statement that changes rows, on its own like
        ``run_query``; returns how many rows it changed."""

        def update(conn: Any) -> int:
            cursor = conn.cursor()
            Transaction(cursor, self.engine).execute(sql, args)
            return int(cursor.rowcount)

        return await self._run("statement", desc, update)

    async def _run(
        self,
        kind: str,
        desc: str,
        interaction: Callable[[Any], R],
        may_retry: Callable[[], bool] = lambda: True,
    ) -> R:
        """Run ``interaction(connection)`` on a pool thread (the pool commits
        after it or rolls back), again on a fresh connection if the first
        one turned out to be lost."""
        if self.unavailable_since is not None:
            raise DatabaseUnavailableError("unreachable")
        start = time.monotonic()
        transactions_in_flight.inc()
        try:
            attempt = 0
            while True:
                try:
                    result: R = await self._pool.runWithConnection(interaction)
                    return result
                except _ConnectFailed as e:
                    self._ensure_probe()
                    raise DatabaseUnavailableError(e.__cause__) from e.__cause__
                except Exception as e:
                    if not self.engine.is_connection_lost(e):
                        raise
                    if attempt >= _RECONNECT_RETRIES or not may_retry():
                        raise DatabaseUnavailableError(e) from e
                    attempt += 1
                    logger.warning(
                        "database connection lost during %s %s; retrying: %s",
                        kind, desc, one_line(e),
                    )  # fmt: skip
        finally:
            transactions_in_flight.dec()
            transaction_seconds.labels(desc).observe(time.monotonic() - start)

    def mark_unreachable(self, cause: object) -> None:
        """A connection could not be opened: from now on refuse calls at
        once, until a probe connects again. Called on any thread."""
        with self._marking:
            if self.unavailable_since is not None or self._closed:
                return
            self.unavailable_since = time.monotonic()
            self.outages += 1
        database_unavailable.set(1)
        logger.warning(
            "database unreachable (%s); refusing requests until it answers", one_line(cause)
        )

    def _ensure_probe(self) -> None:
        """While unreachable, keep one probe scheduled or running."""
        if self.unavailable_since is None or self._closed or self._probing:
            return
        self._probing = True
        self._probe_delay = PROBE_FIRST_SECONDS
        self._schedule_probe()

    def _schedule_probe(self) -> None:
        delay = self._probe_delay
        self._probe_delay = min(delay * 2, PROBE_MAX_SECONDS)
        self._probe = self._reactor.callLater(  # type: ignore[attr-defined]
            delay, lambda: defer.ensureDeferred(self._run_probe())
        )

    async def _run_probe(self) -> None:
        """Open a connection of our own, outside the pool's bookkeeping."""
        self._probe = None
        if self._closed:
            return
        try:
            await deferToThreadPool(self._reactor, self._pool.threadpool, self._try_connect)  # type: ignore[arg-type]
        except Exception as e:
            if not self._closed:
                logger.debug("database still unreachable: %s", one_line(e))
                self._schedule_probe()
            return
        self._probing = False
        with self._marking:
            since, self.unavailable_since = self.unavailable_since, None
        if since is not None:
            logger.info("database reachable again after %.1fs", time.monotonic() - since)
        database_unavailable.set(0)

    def _try_connect(self) -> None:
        conn = self.engine.module.connect(**self._pool.connkw)
        try:
            conn.cursor().execute("SELECT 1")
        finally:
            conn.close()

    def close(self) -> None:
        """Close every connection; waits for running transactions to finish
        (each bounded by the connection's timeouts)."""
        self._closed = True
        probe, self._probe = self._probe, None
        if probe is not None and probe.active():
            probe.cancel()
        self._pool.close()
