"""The database pool: SQLite or PostgreSQL through ``twisted.enterprise.adbapi``.

Queries are written once, with ``?`` placeholders; :class:`Transaction` converts
them for psycopg2. Every database call runs on the pool's threads, so the
reactor never waits on a socket or a disk.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import re
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

from prometheus_client import Gauge, Histogram
from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorCore
from twisted.internet.threads import deferToThreadPool

from mediarepo.config import DatabaseConfig
from mediarepo.errors import DatabaseUnavailableError, one_line

logger = logging.getLogger(__name__)

P = ParamSpec("P")
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

# Statements prepared on one PostgreSQL connection at most (the hot ones come
# first; statements built with varying text stop being prepared at the cap).
_MAX_PREPARED_PER_CONNECTION = 200

# How many times an interaction is retried after its connection was lost.
_RECONNECT_RETRIES = 2

# psycopg2 connection arguments given unless the config names them. A
# connect to an unreachable server (a firewall dropping packets) otherwise
# waits for the kernel's TCP timeout, minutes, holding a pool thread and
# the request; keepalives find a connection whose server vanished while it
# was idle (the values of Synapse's sample config).
POSTGRES_CONNECT_DEFAULTS: dict[str, Any] = {
    "connect_timeout": 2,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}

# While the database is unreachable, a connection is tried after this
# pause, doubled after each failure up to the cap; requests are refused at
# once meanwhile.
PROBE_FIRST_SECONDS = 0.2
PROBE_MAX_SECONDS = 1.0

# SQLSTATEs saying the server ended the session (class 08: connection
# exception; 57P01-57P03: shut down by an administrator, a crash, or not
# accepting connections yet).
_SESSION_ENDED_CODES = ("57P01", "57P02", "57P03")


class _ConnectFailed(Exception):
    """A new connection to the server could not be opened."""


class Transaction:
    """A cursor whose statements mark their parameters with ``?`` on every
    engine.

    Given ``commit`` (see ``Database.run_statements``), every statement is
    committed as soon as it has run."""

    def __init__(
        self,
        cursor: Any,
        engine: Engine,
        *,
        commit: Callable[[], None] | None = None,
        in_transaction: bool = False,
    ) -> None:
        self._cursor = cursor
        self.engine = engine
        self._commit = commit
        self.statements_run = 0
        # Only outside a transaction may statements be prepared: a PREPARE
        # that fails inside one would abort it.
        self._may_prepare = not in_transaction

    def execute(self, sql: str, args: Sequence[Any] = ()) -> None:
        self.engine.execute(self._cursor, sql, tuple(args), may_prepare=self._may_prepare)
        self.statements_run += 1
        if self._commit is not None:
            self._commit()

    def execute_batch(self, sql: str, args: Iterable[Sequence[Any]]) -> None:
        self._cursor.executemany(self.engine.convert(sql), [tuple(a) for a in args])

    def fetchone(self) -> Row | None:
        row = self._cursor.fetchone()
        return tuple(row) if row is not None else None

    def fetchall(self) -> list[Row]:
        return [tuple(row) for row in self._cursor.fetchall()]

    @property
    def rowcount(self) -> int:
        return int(self._cursor.rowcount)


class Engine(abc.ABC):
    """What differs between SQLite and PostgreSQL."""

    name: str
    module: Any
    # Whether connections commit every statement by themselves, so that a
    # lone statement costs one round trip and transactions are opened with
    # an explicit BEGIN (see ``Database.run_interaction``).
    autocommit = False
    begin_sql = "BEGIN"

    def convert(self, sql: str) -> str:
        return sql

    @abc.abstractmethod
    def wait_for_commits(self, cursor: Any, wait: bool) -> None:
        """Whether commits on this connection wait until the database has
        made them durable (they always do unless told otherwise)."""

    def execute(self, cursor: Any, sql: str, args: tuple[Any, ...], *, may_prepare: bool) -> None:
        """Run ``sql``, its parameters marked ``?``. ``may_prepare`` says it
        runs outside a transaction, where preparing it cannot abort one."""
        cursor.execute(self.convert(sql), args)

    @abc.abstractmethod
    def on_new_connection(self, conn: Any) -> None: ...

    def is_connection_lost(self, error: BaseException) -> bool:
        """Whether ``error`` says the connection is gone (rather than that a
        statement failed)."""
        return False

    # Whether the database is a server that may go away (then connections
    # are checked, and an unreachable server is refused fast).
    remote = False

    def connect_args(self, args: dict[str, Any]) -> dict[str, Any]:
        return args

    @abc.abstractmethod
    def table_exists_sql(self) -> str:
        """A query of one ``?`` parameter, the table name, with a row if it exists."""


class Sqlite3Engine(Engine):
    name = "sqlite3"
    module = sqlite3

    def on_new_connection(self, conn: Any) -> None:
        # WAL lets Synapse-style readers run beside the single writer.
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA busy_timeout = 10000")

    def table_exists_sql(self) -> str:
        return "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"

    def wait_for_commits(self, cursor: Any, wait: bool) -> None:
        # In WAL mode with synchronous = NORMAL a commit never waits for
        # the disk (the WAL is synced at checkpoints): nothing to change.
        return None


class PostgresEngine(Engine):
    name = "psycopg2"
    # psycopg2 otherwise wraps even a lone SELECT in BEGIN ... COMMIT: three
    # round trips instead of one, on every hot-path query.
    autocommit = True
    begin_sql = "BEGIN ISOLATION LEVEL READ COMMITTED"

    def __init__(self) -> None:
        import psycopg2

        self.module = psycopg2
        # Per connection: the statements prepared on it, by SQL text.
        self._prepared: weakref.WeakKeyDictionary[Any, dict[str, str | None]] = (
            weakref.WeakKeyDictionary()
        )

    def convert(self, sql: str) -> str:
        return sql.replace("?", "%s")

    def wait_for_commits(self, cursor: Any, wait: bool) -> None:
        # DEFAULT is what the server and the connection's options say.
        cursor.execute(f"SET synchronous_commit TO {'DEFAULT' if wait else 'OFF'}")

    def execute(self, cursor: Any, sql: str, args: tuple[Any, ...], *, may_prepare: bool) -> None:
        """Statements run outside transactions are prepared once per
        connection and then EXECUTEd: PostgreSQL then skips parsing and
        planning, most of the cost of a small query (a third, measured, for
        the upload's content lookup)."""
        name = self._prepared_name(cursor, sql) if may_prepare and args else None
        if name is None:
            cursor.execute(self.convert(sql), args)
        else:
            marks = ", ".join("%s" for _ in args)
            cursor.execute(f"EXECUTE {name}({marks})", args)

    def _prepared_name(self, cursor: Any, sql: str) -> str | None:
        """The name ``sql`` is prepared under on this cursor's connection,
        preparing it if need be; ``None`` if it cannot be (the server could
        not tell a parameter's type) or the connection has enough already."""
        prepared = self._prepared.setdefault(cursor.connection, {})
        if sql in prepared:
            return prepared[sql]
        if len(prepared) >= _MAX_PREPARED_PER_CONNECTION:
            return None
        name = f"mediarepo_{len(prepared)}"
        numbered = iter(range(1, sql.count("?") + 1))
        text = re.sub(r"\?", lambda _: f"${next(numbered)}", sql)
        try:
            cursor.execute(f"PREPARE {name} AS {text}")
        except self.module.ProgrammingError as e:
            logger.debug("not preparing %r: %s", sql, e)
            prepared[sql] = None
            return None
        prepared[sql] = name
        return name

    remote = True

    def connect_args(self, args: dict[str, Any]) -> dict[str, Any]:
        return {**POSTGRES_CONNECT_DEFAULTS, **args}

    def on_new_connection(self, conn: Any) -> None:
        conn.set_session(autocommit=True)

    def is_connection_lost(self, error: BaseException) -> bool:
        module = self.module
        if isinstance(error, module.InterfaceError):
            # "connection already closed", "cursor already closed"
            return True
        if not isinstance(error, module.OperationalError):
            return False
        cursor = getattr(error, "cursor", None)
        if cursor is not None and cursor.connection.closed:
            return True
        # A statement's failure carries the server's SQLSTATE; without
        # one, libpq itself failed: the socket, the connection.
        code = error.pgcode
        return code is None or code.startswith("08") or code in _SESSION_ENDED_CODES

    def table_exists_sql(self) -> str:
        return (
            "SELECT 1 FROM information_schema.tables"
            " WHERE table_schema = current_schema() AND table_name = ?"
        )


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


def create_engine(name: str) -> Engine:
    if name == "sqlite3":
        return Sqlite3Engine()
    if name == "psycopg2":
        return PostgresEngine()
    raise ValueError(f"unknown database engine {name!r}")


class Database:
    """One connection pool. ``run_interaction`` runs a function in a
    transaction; ``run_query`` and ``run_update`` run one statement;
    ``run_statements`` runs a function whose statements commit one by one,
    with other blocking work between them, in one trip to the pool."""

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
        func: Callable[Concatenate[Transaction, P], R],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> R:
        """Run ``func(txn, *args, **kwargs)`` in one transaction on a pool thread.

        The transaction commits when ``func`` returns and rolls back when it
        raises. If the connection was lost (PostgreSQL restarted, a proxy cut
        it), the pool reconnects and the transaction is run again.
        """

        def interaction(conn: Any) -> R:
            cursor = conn.cursor()
            txn = Transaction(cursor, self.engine, in_transaction=True)
            if not self.engine.autocommit:
                # The driver opens the transaction; the pool commits or rolls back.
                return func(txn, *args, **kwargs)
            cursor.execute(self.engine.begin_sql)
            try:
                result = func(txn, *args, **kwargs)
            except BaseException:
                with contextlib.suppress(Exception):
                    cursor.execute("ROLLBACK")
                raise
            cursor.execute("COMMIT")
            return result

        return await self._run("transaction", desc, interaction)

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

    async def run_statements(
        self, desc: str, func: Callable[[Transaction], R], *, durable: bool = True
    ) -> R:
        """Run ``func(txn)`` on a pool thread, each of its statements
        committed on its own as it runs, for work that puts other blocking
        steps (files made durable) between statements in one trip to the
        pool: a trip costs more than the statements themselves.

        Nothing is rolled back when ``func`` raises: what it committed
        stays. ``func`` is run again on a fresh connection only if the
        connection was found lost at its first statement, so that must come
        before any of its other work.

        ``durable=False`` is for rows only processes that are running care
        about (locks): on PostgreSQL their commits do not wait for the
        write-ahead log to reach the disk (each such wait was a disk flush
        in the request's path). They are seen by every other connection at
        once all the same; only a crash of PostgreSQL itself may lose the
        last ones, in commit order.
        """
        started: list[Transaction] = []

        def statements(conn: Any) -> R:
            commit = None if self.engine.autocommit else conn.commit
            cursor = conn.cursor()
            txn = Transaction(cursor, self.engine, commit=commit)
            started.append(txn)
            if durable:
                return func(txn)
            self.engine.wait_for_commits(cursor, False)
            try:
                return func(txn)
            finally:
                try:
                    self.engine.wait_for_commits(cursor, True)
                except Exception:
                    # Never hand on a connection whose commits don't wait:
                    # the pool opens a new one.
                    conn.close()
                    raise

        def may_retry() -> bool:
            return started[-1].statements_run == 0 if started else True

        return await self._run("statements", desc, statements, may_retry)

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
