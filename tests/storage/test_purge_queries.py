"""The queries of purges by age: the oldest media first, found through the
indexes made for them (mediarepo_local_media_created,
mediarepo_remote_media_last_access), on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mediarepo.storage.database import Row
from mediarepo.storage.media_admin_rows import LocalPurgeFilter, MediaAdminRows
from mediarepo.storage.media_rows import MediaRows
from mediarepo.storage.schema import prepare_database
from tests.storage.plans import query_plan
from tests.utils import DatabaseTestCase

BEFORE = 1_000_000


class PurgeQueryTests(DatabaseTestCase):
    async def set_up(self) -> None:
        await super().set_up()
        state = await prepare_database(self.database)
        self.admin_store = MediaAdminRows(
            self.database, "db.test", state.avatar_columns, state.has_profiles
        )
        self.media_store = MediaRows(self.database)
        local = [
            # (media ID, created, last read, length)
            ("oldunread", BEFORE - 50, None, 10),
            ("oldread", BEFORE - 90, BEFORE - 10, 10),
            ("oldreadlately", BEFORE - 80, BEFORE + 10, 10),
            ("newunread", BEFORE + 5, None, 10),
            ("oldpending", BEFORE - 70, None, None),
        ]
        for media_id, created, read, length in local:
            await self.database.run_query(
                "t",
                "INSERT INTO local_media_repository (media_id, created_ts, last_access_ts,"
                " media_length, user_id) VALUES (?, ?, ?, ?, ?)",
                (media_id, created, read, length, "@u:db.test"),
            )
        for media_id, read in (("stale", BEFORE - 5), ("staler", BEFORE - 9), ("read", BEFORE)):
            await self.database.run_query(
                "t",
                "INSERT INTO remote_media_cache (media_origin, media_id, filesystem_id,"
                " created_ts, last_access_ts) VALUES (?, ?, ?, ?, ?)",
                ("remote.test", media_id, "fs" + media_id, read - 100, read),
            )

    def capture_queries(self) -> list[tuple[str, tuple[object, ...]]]:
        """The statements of run_query from now on, run as before."""
        captured: list[tuple[str, tuple[object, ...]]] = []
        run_query = self.database.run_query

        async def capturing(desc: str, sql: str, args: Sequence[Any] = ()) -> list[Row]:
            captured.append((sql, tuple(args)))
            return await run_query(desc, sql, args)

        self.patch(self.database, "run_query", capturing)
        return captured

    async def test_old_local_media_oldest_first_through_the_index(self) -> None:
        captured = self.capture_queries()
        found = await self.admin_store.old_local_media(LocalPurgeFilter(before_ts=BEFORE), 10)
        # Read lately, new, and reservations stay.
        self.assertEqual(found, ["oldread", "oldunread"])
        self.assertEqual(
            await self.admin_store.old_local_media(LocalPurgeFilter(before_ts=BEFORE), 1),
            ["oldread"],
        )
        sql, args = captured[0]
        self.assertIn("mediarepo_local_media_created", await query_plan(self.database, sql, args))

    async def test_remote_media_least_recently_read_first_through_the_index(self) -> None:
        captured = self.capture_queries()
        found = await self.media_store.remote_media_unread_since(BEFORE, 10)
        self.assertEqual(
            found, [("remote.test", "staler", "fsstaler"), ("remote.test", "stale", "fsstale")]
        )
        sql, args = captured[0]
        self.assertIn(
            "mediarepo_remote_media_last_access", await query_plan(self.database, sql, args)
        )


class PurgeQueryPostgresTests(PurgeQueryTests):
    engine = "psycopg2"
