"""The database pool and schema, on SQLite and on PostgreSQL."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable

import psycopg2
from twisted.internet import reactor
from twisted.trial import unittest

from mediarepo.config import parse_config
from mediarepo.storage.database import Database, Transaction
from mediarepo.storage.schema import SCHEMA_VERSION, SchemaError, prepare_database
from tests.utils import POSTGRES_DSN, database_section, on_both_databases


class DatabaseFixture:
    """A fresh database (and no server) per test."""

    engine = "sqlite3"

    def setUp(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="mediarepo-db-")
        self.addCleanup(shutil.rmtree, self.workdir, True)  # type: ignore[attr-defined]
        cleanups: list[Callable[[], None]] = []
        section = database_section(self.engine, self.workdir, cleanups)
        for cleanup in cleanups:
            self.addCleanup(cleanup)  # type: ignore[attr-defined]
        self.config = parse_config({"server_name": "db.test", "database": section}, self.workdir)
        self.database = self.open()

    def open(self) -> Database:
        database = Database(self.config.database, reactor)
        self.addCleanup(database.close)  # type: ignore[attr-defined]
        return database


@on_both_databases
class DatabaseTests(DatabaseFixture):
    async def test_schema_created_once_and_versioned(self) -> None:
        first = await prepare_database(self.database)
        self.assertFalse(first.synapse_owned)  # type: ignore[attr-defined]
        # A second start (or a second server) finds everything in place.
        again = await prepare_database(self.open())
        self.assertEqual(again.version, SCHEMA_VERSION)  # type: ignore[attr-defined]
        rows = await self.database.run_query("t", "SELECT version FROM mediarepo_schema_version")
        self.assertEqual(rows, [(SCHEMA_VERSION,)])  # type: ignore[attr-defined]

    async def test_newer_schema_refused(self) -> None:
        await prepare_database(self.database)
        await self.database.run_query(
            "t", "UPDATE mediarepo_schema_version SET version = ?", (SCHEMA_VERSION + 1,)
        )
        with self.assertRaises(SchemaError):  # type: ignore[attr-defined]
            await prepare_database(self.database)

    async def test_synapse_owned_database_left_alone(self) -> None:
        # A database with Synapse's schema_version table but an unfinished schema.
        await self.database.run_query("t", "CREATE TABLE schema_version (version INTEGER)")
        with self.assertRaises(SchemaError):  # type: ignore[attr-defined]
            await prepare_database(self.database)
        # Nothing of Synapse's was created on its behalf.
        rows = await self.database.run_query(
            "t", self.database.engine.table_exists_sql(), ("local_media_repository",)
        )
        self.assertEqual(rows, [])  # type: ignore[attr-defined]

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
        self.assertIn("media_length IS NULL", definition)  # type: ignore[attr-defined]
        # Idempotent: a second start keeps the one index.
        await prepare_database(self.open())
        self.assertEqual(  # type: ignore[attr-defined]
            await self.index_definition("mediarepo_pending_media"), definition
        )

    async def test_interaction_commits_or_rolls_back(self) -> None:
        await prepare_database(self.database)

        def insert(txn: Transaction, fail: bool) -> None:
            txn.execute(
                "INSERT INTO local_media_repository (media_id, created_ts) VALUES (?, ?)",
                ("abcdefgh" if fail else "ijklmnop", 1),
            )
            if fail:
                raise ValueError("rolled back")

        await self.database.run_interaction("t", insert, False)
        with self.assertRaises(ValueError):  # type: ignore[attr-defined]
            await self.database.run_interaction("t", insert, True)
        rows = await self.database.run_query("t", "SELECT media_id FROM local_media_repository")
        self.assertEqual(rows, [("ijklmnop",)])  # type: ignore[attr-defined]

    async def test_statements_commit_one_by_one(self) -> None:
        """``run_statements`` keeps what ran before a failure (files may
        depend on it), unlike a transaction."""
        await prepare_database(self.database)

        def insert_then_fail(txn: Transaction) -> None:
            txn.execute(
                "INSERT INTO local_media_repository (media_id, created_ts) VALUES (?, ?)",
                ("qrstuvwx", 1),
            )
            raise ValueError("after the insert")

        with self.assertRaises(ValueError):  # type: ignore[attr-defined]
            await self.database.run_statements("t", insert_then_fail)
        rows = await self.database.run_query("t", "SELECT media_id FROM local_media_repository")
        self.assertEqual(rows, [("qrstuvwx",)])  # type: ignore[attr-defined]


class PostgresIndexTests(DatabaseFixture, unittest.TestCase):
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
        await prepare_database(self.database)

        def run(txn: Transaction) -> tuple[list[object], list[object]]:
            for _ in range(2):
                txn.execute(
                    "SELECT COUNT(*) FROM local_media_repository WHERE media_id = ?", ("x",)
                )
                txn.fetchall()
            # A parameter PostgreSQL cannot type: run as it is, unprepared.
            txn.execute("SELECT ?", ("as is",))
            plain = txn.fetchall()
            txn.execute("SELECT statement FROM pg_prepared_statements")
            return plain, [row[0] for row in txn.fetchall()]

        plain, prepared = await self.database.run_statements("t", run)
        self.assertEqual(plain, [("as is",)])
        ours = [str(p) for p in prepared if "local_media_repository" in str(p)]
        self.assertEqual(len(ours), 1)  # prepared once, executed twice
        self.assertTrue(
            ours[0].endswith("AS SELECT COUNT(*) FROM local_media_repository WHERE media_id = $1")
        )

        def in_transaction(txn: Transaction) -> int:
            # Inside a transaction nothing new is prepared.
            txn.execute("SELECT COUNT(*) FROM local_media_repository WHERE sha256 = ?", ("y",))
            txn.execute(
                "SELECT COUNT(*) FROM pg_prepared_statements WHERE statement LIKE ?", ("%sha256%",)
            )
            row = txn.fetchone()
            assert row is not None
            return int(row[0])

        self.assertEqual(await self.database.run_interaction("t", in_transaction), 0)

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


class ReconnectTests(DatabaseFixture, unittest.TestCase):
    """PostgreSQL connections cut under the pool (a restart, a proxy) are
    replaced and the interaction runs again. (An SQLite file has no
    connection to cut.)"""

    engine = "psycopg2"

    async def test_reconnect_after_backends_terminated(self) -> None:
        await prepare_database(self.database)
        before = await self.database.run_query("t", "SELECT pg_backend_pid()")
        self.terminate_backends()
        after = await self.database.run_query("t", "SELECT pg_backend_pid()")
        self.assertNotEqual(before, after)  # type: ignore[attr-defined]
        rows = await self.database.run_query("t", "SELECT COUNT(*) FROM local_media_repository")
        self.assertEqual(rows, [(0,)])  # type: ignore[attr-defined]
        # adbapi logs the failed rollback on the dead connection.
        self.flushLoggedErrors()  # type: ignore[attr-defined]

    def terminate_backends(self) -> None:
        """Cut every connection to the test database, as a restart would."""
        conn = psycopg2.connect(dbname="postgres", **POSTGRES_DSN)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (self.config.database.args["dbname"],),
            )
        conn.close()

    async def test_statements_retried_only_if_lost_at_the_first(self) -> None:
        """A lost connection found at the first statement runs the function
        again; found later, the error is raised (what ran may not repeat)."""
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
        self.assertEqual(await self.database.run_statements("t", lookup), 0)
        # Again on another connection (more than once if that one was cut too).
        self.assertGreaterEqual(len(calls), 2)  # type: ignore[attr-defined]

        def two_steps(txn: Transaction) -> None:
            calls.append("two")
            txn.execute("SELECT 1")
            txn.fetchall()
            self.terminate_backends()
            txn.execute("SELECT 2")

        calls.clear()
        with self.assertRaises(psycopg2.Error):  # type: ignore[attr-defined]
            await self.database.run_statements("t", two_steps)
        self.assertEqual(calls, ["two"])  # type: ignore[attr-defined]
        self.flushLoggedErrors()  # type: ignore[attr-defined]
