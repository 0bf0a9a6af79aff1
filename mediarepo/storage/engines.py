"""What differs between the database engines: SQLite and PostgreSQL through
psycopg2 (placeholders, prepared statements, transactions in autocommit,
how a lost connection is recognised)."""

from __future__ import annotations

import abc
import logging
import re
import sqlite3
import weakref
from typing import Any

logger = logging.getLogger(__name__)

# Statements prepared on one PostgreSQL connection at most (the hot ones come
# first; statements built with varying text stop being prepared at the cap).
_MAX_PREPARED_PER_CONNECTION = 200

# The savepoint a statement is prepared in inside a transaction.
_PREPARE_SAVEPOINT = "mediarepo_prepare"

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

# SQLSTATEs saying the server ended the session (class 08: connection
# exception; 57P01-57P03: shut down by an administrator, a crash, or not
# accepting connections yet).
_SESSION_ENDED_CODES = ("57P01", "57P02", "57P03")


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

    def execute_batch(self, cursor: Any, sql: str, args: list[tuple[Any, ...]]) -> None:
        """Run ``sql`` once for each parameter tuple of ``args``."""
        cursor.executemany(self.convert(sql), args)

    # Whether a transaction's BEGIN may share the round trip of its first
    # statement ("BEGIN; SELECT ...").
    begin_with_statement = False

    def execute(
        self,
        cursor: Any,
        sql: str,
        args: tuple[Any, ...],
        *,
        begin: str | None = None,
        in_transaction: bool = False,
    ) -> None:
        """Run ``sql``, its parameters marked ``?``, after ``begin`` if
        given (the statement opening a transaction)."""
        if begin is not None and (
            not self.begin_with_statement or self._will_prepare(cursor, sql, args)
        ):
            # Alone: a statement is prepared inside the transaction it opens.
            cursor.execute(begin)
            begin = None
        text = self._statement(cursor, sql, args, in_transaction)
        cursor.execute(text if begin is None else f"{begin}; {text}", args)

    def _will_prepare(self, cursor: Any, sql: str, args: tuple[Any, ...]) -> bool:
        """Whether :meth:`_statement` is about to prepare ``sql`` first."""
        return False

    def _statement(self, cursor: Any, sql: str, args: tuple[Any, ...], in_transaction: bool) -> str:
        """The text sent to run ``sql`` with ``args`` on this cursor's connection."""
        return self.convert(sql)

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


class PostgresEngine(Engine):
    name = "psycopg2"
    # psycopg2 otherwise wraps even a lone SELECT in BEGIN ... COMMIT: three
    # round trips instead of one, on every hot-path query.
    autocommit = True
    begin_sql = "BEGIN ISOLATION LEVEL READ COMMITTED"
    begin_with_statement = True

    def __init__(self) -> None:
        import psycopg2

        self.module = psycopg2
        # Per connection: the statements prepared on it, by SQL text.
        self._prepared: weakref.WeakKeyDictionary[Any, dict[str, str | None]] = (
            weakref.WeakKeyDictionary()
        )

    def convert(self, sql: str) -> str:
        return sql.replace("?", "%s")

    # Statements sent together in one round trip by execute_batch.
    BATCH_PAGE = 250

    def execute_batch(self, cursor: Any, sql: str, args: list[tuple[Any, ...]]) -> None:
        """psycopg2's executemany sends one statement per round trip: a purge
        of 500 media spent most of its time waiting on 1,500 of them. Here
        ``BATCH_PAGE`` statements go in each."""
        import psycopg2.extras

        psycopg2.extras.execute_batch(cursor, self.convert(sql), args, page_size=self.BATCH_PAGE)

    def _will_prepare(self, cursor: Any, sql: str, args: tuple[Any, ...]) -> bool:
        prepared = self._prepared.setdefault(cursor.connection, {})
        return bool(args) and sql not in prepared and len(prepared) < _MAX_PREPARED_PER_CONNECTION

    def _statement(self, cursor: Any, sql: str, args: tuple[Any, ...], in_transaction: bool) -> str:
        """Statements are prepared once per connection and then EXECUTEd:
        PostgreSQL then skips parsing and planning, most of the cost of a
        small query (a third, measured, for the upload's content lookup)."""
        prepared = self._prepared.setdefault(cursor.connection, {})
        if self._will_prepare(cursor, sql, args):
            self._prepare(cursor, sql, prepared, in_transaction)
        name = prepared.get(sql) if args else None
        if name is None:
            return self.convert(sql)
        marks = ", ".join("%s" for _ in args)
        return f"EXECUTE {name}({marks})"

    def _prepare(
        self, cursor: Any, sql: str, prepared: dict[str, str | None], in_transaction: bool
    ) -> None:
        """Prepare ``sql`` on this cursor's connection under a new name, or
        note that it cannot be (the server could not tell a parameter's
        type). Inside a transaction the PREPARE runs in a savepoint, so that
        its failure does not abort the transaction. (A prepared statement
        belongs to the session: a rolled back transaction keeps it.)"""
        name = f"mediarepo_{len(prepared)}"
        numbered = iter(range(1, sql.count("?") + 1))
        text = re.sub(r"\?", lambda _: f"${next(numbered)}", sql)
        statement = f"PREPARE {name} AS {text}"
        if in_transaction:
            # On its own: a statement the server cannot even parse (EXPLAIN
            # cannot be prepared) fails the whole string it came in, and the
            # savepoint must exist for the rollback below.
            cursor.execute(f"SAVEPOINT {_PREPARE_SAVEPOINT}")
            statement = f"{statement}; RELEASE SAVEPOINT {_PREPARE_SAVEPOINT}"
        try:
            cursor.execute(statement)
        except self.module.ProgrammingError as e:
            logger.debug("not preparing %r: %s", sql, e)
            if in_transaction:
                cursor.execute(f"ROLLBACK TO SAVEPOINT {_PREPARE_SAVEPOINT}")
            prepared[sql] = None
            return
        prepared[sql] = name

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


def create_engine(name: str) -> Engine:
    if name == "sqlite3":
        return Sqlite3Engine()
    if name == "psycopg2":
        return PostgresEngine()
    raise ValueError(f"unknown database engine {name!r}")
