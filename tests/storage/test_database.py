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


class ReconnectTests(DatabaseFixture, unittest.TestCase):
    """PostgreSQL connections cut under the pool (a restart, a proxy) are
    replaced and the interaction runs again. (An SQLite file has no
    connection to cut.)"""

    engine = "psycopg2"

    async def test_reconnect_after_backends_terminated(self) -> None:
        await prepare_database(self.database)
        before = await self.database.run_query("t", "SELECT pg_backend_pid()")
        conn = psycopg2.connect(dbname="postgres", **POSTGRES_DSN)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (self.config.database.args["dbname"],),
            )
        conn.close()
        after = await self.database.run_query("t", "SELECT pg_backend_pid()")
        self.assertNotEqual(before, after)  # type: ignore[attr-defined]
        rows = await self.database.run_query("t", "SELECT COUNT(*) FROM local_media_repository")
        self.assertEqual(rows, [(0,)])  # type: ignore[attr-defined]
        # adbapi logs the failed rollback on the dead connection.
        self.flushLoggedErrors()  # type: ignore[attr-defined]
