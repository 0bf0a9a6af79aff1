"""The database pool and schema, on SQLite and on PostgreSQL."""

from __future__ import annotations

import shutil
import tempfile
import time

import attrs
import psycopg2
import psycopg2.errors
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mediarepo.config import parse_config
from mediarepo.errors import DatabaseUnavailableError
from mediarepo.storage.database import Database, Transaction
from mediarepo.storage.engines import PostgresEngine
from mediarepo.storage.lock_rows import LockClaim, LockToken
from mediarepo.storage.media_rows import MediaRows
from mediarepo.storage.schema import SCHEMA_VERSION, SchemaError, prepare_database
from tests.tcp_proxy import TcpProxy
from tests.utils import (
    DatabaseTestCase,
    create_postgres_database,
    drop_postgres_database,
    postgres_params,
)


class DatabaseTests(DatabaseTestCase):
    async def test_schema_created_once_and_versioned(self) -> None:
        first = await prepare_database(self.database)
        self.assertFalse(first.synapse_owned)
        # A second start (or a second server) finds everything in place.
        again = await prepare_database(self.open())
        self.assertEqual(again.version, SCHEMA_VERSION)
        rows = await self.database.run_query("t", "SELECT version FROM mediarepo_schema_version")
        self.assertEqual(rows, [(SCHEMA_VERSION,)])

    async def test_newer_schema_refused(self) -> None:
        await prepare_database(self.database)
        await self.database.run_query(
            "t", "UPDATE mediarepo_schema_version SET version = ?", (SCHEMA_VERSION + 1,)
        )
        with self.assertRaises(SchemaError):
            await prepare_database(self.database)

    async def test_synapse_owned_database_left_alone(self) -> None:
        # A database with Synapse's schema_version table but an unfinished schema.
        await self.database.run_query("t", "CREATE TABLE schema_version (version INTEGER)")
        with self.assertRaises(SchemaError):
            await prepare_database(self.database)
        # Nothing of Synapse's was created on its behalf.
        rows = await self.database.run_query(
            "t", self.database.engine.table_exists_sql(), ("local_media_repository",)
        )
        self.assertEqual(rows, [])

    async def index_definition(self, name: str) -> str | None:
        if self.database.engine.name == "psycopg2":
            sql = "SELECT indexdef FROM pg_indexes WHERE indexname = ?"
        else:
            sql = "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?"
        rows = await self.database.run_query("t", sql, (name,))
        return str(rows[0][0]) if rows else None

    async def test_pending_reservations_have_their_own_index(self) -> None:
        await prepare_database(self.database)
        definition = await self.index_definition("mediarepo_pending_media")
        assert definition is not None
        self.assertIn("media_length IS NULL", definition)
        # Idempotent: a second start keeps the one index.
        await prepare_database(self.open())
        self.assertEqual(await self.index_definition("mediarepo_pending_media"), definition)

    async def test_interaction_commits_or_rolls_back(self) -> None:
        await prepare_database(self.database)
        after: list[str] = []

        def insert(txn: Transaction, media_id: str, fail: bool) -> str:
            txn.execute(
                "INSERT INTO local_media_repository (media_id, created_ts) VALUES (?, ?)",
                (media_id, 1),
            )
            if fail:
                raise ValueError("rolled back")
            return media_id

        await self.database.run_interaction(
            "t", lambda t: insert(t, "ijklmnop", False), after_commit=after.append
        )
        with self.assertRaises(ValueError):
            await self.database.run_interaction(
                "t", lambda t: insert(t, "abcdefgh", True), after_commit=after.append
            )
        rows = await self.database.run_query("t", "SELECT media_id FROM local_media_repository")
        self.assertEqual(rows, [("ijklmnop",)])
        # Run once committed, and only then.
        self.assertEqual(after, ["ijklmnop"])

    async def test_batch_runs_every_statement(self) -> None:
        """More statements than PostgreSQL's batch page: each one runs."""
        await prepare_database(self.database)
        count = 2 * PostgresEngine.BATCH_PAGE + 7

        def insert(txn: Transaction) -> None:
            txn.execute_batch(
                "INSERT INTO local_media_repository (media_id, created_ts) VALUES (?, ?)",
                [(f"batch{i:04d}", i) for i in range(count)],
            )
            txn.execute_batch(
                "DELETE FROM local_media_repository WHERE media_id = ?",
                [(f"batch{i:04d}",) for i in range(0, count, 2)],
            )

        await self.database.run_interaction("t", insert)
        rows = await self.database.run_query(
            "t", "SELECT media_id FROM local_media_repository ORDER BY media_id"
        )
        self.assertEqual(rows, [(f"batch{i:04d}",) for i in range(1, count, 2)])

    async def test_after_commit_sees_the_transaction_committed(self) -> None:
        """``after_commit`` runs once the rows are visible to everyone (a
        staging file is removed only when its media is recorded)."""
        await prepare_database(self.database)
        seen: list[object] = []

        def insert(txn: Transaction) -> None:
            txn.execute(
                "INSERT INTO local_media_repository (media_id, created_ts) VALUES (?, ?)",
                ("qrstuvwx", 1),
            )

        def look(_: None) -> None:
            # Another connection, from this pool thread (blocking is fine here).
            conn = self.database.engine.module.connect(**self.database.connect_args)
            try:
                cursor = conn.cursor()
                cursor.execute("SELECT media_id FROM local_media_repository")
                seen.append([tuple(row) for row in cursor.fetchall()])
            finally:
                conn.close()

        await self.database.run_interaction("t", insert, after_commit=look)
        self.assertEqual(seen, [[("qrstuvwx",)]])


class DatabasePostgresTests(DatabaseTests):
    engine = "psycopg2"


class _RolledBack(Exception):
    """Ends a test transaction with what it read."""


class PostgresIndexTests(DatabaseTestCase):
    engine = "psycopg2"

    async def test_invalid_index_is_built_again(self) -> None:
        """A CREATE INDEX CONCURRENTLY that died half way leaves an invalid
        index behind; the next start replaces it."""
        await prepare_database(self.database)
        validity = (
            "SELECT i.indisvalid FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid"
            " WHERE c.relname = 'mediarepo_pending_media'"
        )
        await self.database.run_query(
            "t",
            "UPDATE pg_index SET indisvalid = false WHERE indexrelid ="
            " 'mediarepo_pending_media'::regclass",
        )
        self.assertEqual(await self.database.run_query("t", validity), [(False,)])
        await prepare_database(self.open())
        self.assertEqual(await self.database.run_query("t", validity), [(True,)])

    async def test_statements_prepared_once_per_connection(self) -> None:
        # One connection, so that every call below shares its session.
        database = Database(attrs.evolve(self.config.database, cp_min=1, cp_max=1), reactor)
        self.addCleanup(database.close)
        await prepare_database(database)
        count_sql = "SELECT COUNT(*) FROM local_media_repository WHERE media_id = ?"

        def prepared_statements(txn: Transaction) -> list[str]:
            txn.execute("SELECT statement FROM pg_prepared_statements")
            return [str(row[0]) for row in txn.fetchall()]

        for _ in range(2):
            await database.run_query("t", count_sql, ("x",))
        ours = [
            p
            for p in await database.run_interaction("t", prepared_statements)
            if "local_media_repository WHERE media_id" in p
        ]
        self.assertEqual(len(ours), 1)  # prepared once, executed twice
        self.assertTrue(
            ours[0].endswith("AS SELECT COUNT(*) FROM local_media_repository WHERE media_id = $1")
        )

        def in_transaction(txn: Transaction) -> None:
            # Prepared in a savepoint: a parameter PostgreSQL cannot type
            # is run as it is, and the transaction goes on.
            txn.execute("SELECT ?", ("as is",))
            plain = txn.fetchone()
            for _ in range(2):
                txn.execute("SELECT COUNT(*) FROM local_media_repository WHERE sha256 = ?", ("y",))
            count = txn.fetchone()
            raise _RolledBack(plain, count)

        with self.assertRaises(_RolledBack) as caught:
            await database.run_interaction("t", in_transaction)
        self.assertEqual(caught.exception.args, (("as is",), (0,)))
        # A prepared statement belongs to the session: a rollback keeps it,
        # and it is executed again, not prepared again.
        after = await database.run_interaction("t", prepared_statements)
        self.assertEqual(len([p for p in after if "WHERE sha256 = $1" in p]), 1)
        rows = await database.run_query(
            "t", "SELECT COUNT(*) FROM local_media_repository WHERE sha256 = ?", ("y",)
        )
        self.assertEqual(rows, [(0,)])

    async def test_lone_statements_run_outside_transactions(self) -> None:
        """On PostgreSQL a lone statement is not wrapped in BEGIN/COMMIT (one
        round trip), while an interaction is one transaction."""
        await prepare_database(self.database)
        rows = await self.database.run_query("t", "SELECT now() = statement_timestamp()")
        self.assertEqual(rows, [(True,)])

        def two_statements(txn: Transaction) -> tuple[object, object]:
            txn.execute("SELECT txid_current()")
            first = txn.fetchone()
            txn.execute("SELECT txid_current()")
            second = txn.fetchone()
            return first, second

        first, second = await self.database.run_interaction("t", two_statements)
        self.assertEqual(first, second)


class ReconnectTests(DatabaseTestCase):
    """PostgreSQL connections cut under the pool (a restart, a proxy) are
    replaced and the interaction runs again. (An SQLite file has no
    connection to cut.)"""

    engine = "psycopg2"

    async def test_reconnect_after_backends_terminated(self) -> None:
        await prepare_database(self.database)
        before = await self.database.run_query("t", "SELECT pg_backend_pid()")
        self.terminate_backends()
        after = await self.database.run_query("t", "SELECT pg_backend_pid()")
        self.assertNotEqual(before, after)
        rows = await self.database.run_query("t", "SELECT COUNT(*) FROM local_media_repository")
        self.assertEqual(rows, [(0,)])
        # adbapi logs the failed rollback on the dead connection.
        self.flushLoggedErrors()

    def terminate_backends(self) -> None:
        """Cut every connection to the test database, as a restart would."""
        conn = psycopg2.connect(dbname="postgres", **postgres_params())
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (self.config.database.args["dbname"],),
            )
        conn.close()

    async def test_retried_unless_work_outside_the_database_was_done(self) -> None:
        """A transaction whose connection turns out lost is run again on a
        new one; not if it did work outside the database (files linked into
        place), which a rollback cannot undo."""
        await prepare_database(self.database)
        await self.database.run_query("t", "SELECT 1")  # the pool's connection exists
        calls: list[str] = []

        def lookup(txn: Transaction) -> int:
            calls.append("lookup")
            txn.execute("SELECT COUNT(*) FROM local_media_repository")
            row = txn.fetchone()
            assert row is not None
            return int(row[0])

        self.terminate_backends()
        self.assertEqual(await self.database.run_interaction("t", lookup), 0)
        # Again on another connection (more than once if that one was cut too).
        self.assertGreaterEqual(len(calls), 2)

        def with_outside_work(txn: Transaction) -> None:
            calls.append("outside")
            txn.execute("SELECT 1")
            txn.fetchall()
            txn.outside_effects = True
            self.terminate_backends()
            txn.execute("SELECT 2")

        calls.clear()
        with self.assertRaises(DatabaseUnavailableError):
            await self.database.run_interaction("t", with_outside_work)
        self.assertEqual(calls, ["outside"])
        self.flushLoggedErrors()

    async def test_statement_errors_are_not_connection_loss(self) -> None:
        """A statement the server cancels is that statement's failure: not
        retried, and the database stays available."""

        def slow(txn: Transaction) -> None:
            txn.execute("SET LOCAL statement_timeout = 1")
            txn.execute("SELECT pg_sleep(0.5)")

        calls = []

        def counted(txn: Transaction) -> None:
            calls.append(1)
            slow(txn)

        with self.assertRaises(psycopg2.errors.QueryCanceled):
            await self.database.run_interaction("t", counted)
        self.assertEqual(len(calls), 1)
        self.assertIsNone(self.database.unavailable_since)
        self.assertEqual(await self.database.run_query("t", "SELECT 1"), [(1,)])


class OutageTests(unittest.TestCase):
    """PostgreSQL behind a proxy the test cuts: while it cannot be reached,
    calls fail at once with DatabaseUnavailableError (503) instead of each
    waiting for a connection; a probe with backoff finds it again, and the
    connections cut meanwhile are replaced."""

    timeout = 60

    def setUp(self) -> None:
        workdir = tempfile.mkdtemp(prefix="mediarepo-db-")
        self.addCleanup(shutil.rmtree, workdir, True)
        name = create_postgres_database()
        self.addCleanup(drop_postgres_database, name)
        self.proxy = TcpProxy(postgres_params()["host"], postgres_params()["port"])
        self.addCleanup(self.proxy.close)
        args = {**postgres_params(), "host": "127.0.0.1", "port": self.proxy.port, "dbname": name}
        section = {"name": "psycopg2", "args": {**args, "cp_min": 1, "cp_max": 3}}
        config = parse_config({"server_name": "db.test", "database": section}, workdir)
        self.database = Database(config.database, reactor)
        self.addCleanup(self.database.close)

    async def queries(self, count: int) -> tuple[list[object], float]:
        """``count`` concurrent queries: their results or errors, and how
        long the slowest took."""
        started = time.monotonic()

        async def outcome() -> object:
            try:
                return await self.database.run_query("t", "SELECT 1")
            except Exception as e:
                return e

        results = await defer.gatherResults([defer.ensureDeferred(outcome()) for _ in range(count)])
        return list(results), time.monotonic() - started

    async def assert_refused_at_once(self) -> None:
        outcomes, took = await self.queries(20)
        for outcome in outcomes:
            self.assertIsInstance(outcome, DatabaseUnavailableError)
        self.assertLess(took, 0.1)

    async def until_available(self, within: float) -> float:
        started = time.monotonic()
        while True:
            try:
                await self.database.run_query("t", "SELECT 1")
                return time.monotonic() - started
            except DatabaseUnavailableError:
                self.assertLess(time.monotonic() - started, within, "never came back")
                await task.deferLater(reactor, 0.05, lambda: None)

    async def assert_all_connections_work(self) -> None:
        outcomes, _ = await self.queries(12)
        self.assertEqual(outcomes, [[(1,)]] * 12)

    async def test_refused(self) -> None:
        await self.assert_all_connections_work()
        self.proxy.cut("refuse")
        outcomes, took = await self.queries(10)
        for outcome in outcomes:
            self.assertIsInstance(outcome, DatabaseUnavailableError)
            assert isinstance(outcome, DatabaseUnavailableError)
            self.assertEqual((outcome.code, outcome.errcode), (503, "M_UNKNOWN"))
        self.assertLess(took, 1.0)
        self.assertIsNotNone(self.database.unavailable_since)
        attempts = self.proxy.accepted
        await self.assert_refused_at_once()
        # Probes back off (0.2 s, 0.4 s, 0.8 s, then every 1 s): a few
        # connection attempts in two seconds, not one per call.
        await task.deferLater(reactor, 2.0, lambda: None)
        self.assertIn(self.proxy.accepted - attempts, range(2, 5))
        self.proxy.restore()
        self.assertLess(await self.until_available(3.0), 1.5)
        self.assertIsNone(self.database.unavailable_since)
        await self.assert_all_connections_work()

    async def test_blackholed(self) -> None:
        """Connects that hang end at connect_timeout (2 s by default)."""
        await self.assert_all_connections_work()
        self.proxy.cut("blackhole")
        outcomes, took = await self.queries(10)
        for outcome in outcomes:
            self.assertIsInstance(outcome, DatabaseUnavailableError)
        self.assertLess(took, 3.0)
        await self.assert_refused_at_once()
        self.proxy.restore()
        self.assertLess(await self.until_available(4.0), 2.5)
        await self.assert_all_connections_work()


class LockCommitTests(DatabaseTestCase):
    """A lock's commit does not wait for PostgreSQL's disk; the setting ends
    with the lock's own transaction."""

    engine = "psycopg2"
    # One connection, so that the query below uses the lock's.
    database_args = {"cp_min": 1, "cp_max": 1}

    async def test_setting_ends_with_the_lock_transaction(self) -> None:
        await prepare_database(self.database)
        claim = LockClaim(LockToken("n", "k", "t"), "main", 1, lambda _: False)
        taken = await MediaRows(self.database).take_download_lock(claim, "other.example", "m")
        self.assertEqual(taken, (True, None))
        rows = await self.database.run_query("t", "SHOW synchronous_commit")
        self.assertEqual(rows, [("on",)])
        held = await self.database.run_query("t", "SELECT token FROM worker_locks")
        self.assertEqual(held, [("t",)])
