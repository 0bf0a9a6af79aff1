"""The admin listing of a user's media (MediaAdminRows.user_media): the
order, ties, pages and count, and by creation time the page's keys read from
mediarepo_local_media_user_created alone, on SQLite and on PostgreSQL."""

from __future__ import annotations

from mediarepo.storage.media_admin_rows import (
    MediaAdminRows,
    UserMediaOrder,
    user_media_page_sql,
)
from mediarepo.storage.schema import prepare_database
from tests.storage.plans import query_plan
from tests.utils import DatabaseTestCase

USER = "@u:db.test"
# (media ID, created, length): three made at the same millisecond, so that
# the order of ties (media ID ascending in both directions) shows.
MEDIA = [
    ("m5", 500, 30),
    ("m1", 100, 10),
    ("tie_c", 300, 50),
    ("tie_a", 300, 20),
    ("m4", 400, 40),
    ("tie_b", 300, 60),
]
NEWEST_FIRST = ["m5", "m4", "tie_a", "tie_b", "tie_c", "m1"]
OLDEST_FIRST = ["m1", "tie_a", "tie_b", "tie_c", "m4", "m5"]


class UserMediaQueryTests(DatabaseTestCase):
    async def set_up(self) -> None:
        await super().set_up()
        state = await prepare_database(self.database)
        self.rows = MediaAdminRows(
            self.database, "db.test", state.avatar_columns, state.has_profiles
        )
        others = [(f"other{i}", 300, 1, "@other:db.test") for i in range(3)]
        for media_id, created, length, user in [(*m, USER) for m in MEDIA] + others:
            await self.database.run_query(
                "t",
                "INSERT INTO local_media_repository (media_id, media_type, created_ts,"
                " media_length, user_id, upload_name) VALUES (?, 'image/png', ?, ?, ?, ?)",
                (media_id, created, length, user, "name-" + media_id),
            )

    async def listed(
        self, order: UserMediaOrder, descending: bool, start: int = 0, limit: int = 100
    ) -> tuple[list[str], int]:
        media, total = await self.rows.user_media(USER, start, limit, order, descending)
        return [m.media_id for m in media], total

    async def test_by_creation_time_ties_by_media_id_ascending(self) -> None:
        newest = await self.listed(UserMediaOrder.CREATED_TS, True)
        self.assertEqual(newest, (NEWEST_FIRST, 6))
        oldest = await self.listed(UserMediaOrder.CREATED_TS, False)
        self.assertEqual(oldest, (OLDEST_FIRST, 6))

    async def test_pages_split_the_order_and_each_counts_all(self) -> None:
        for descending, expected in ((True, NEWEST_FIRST), (False, OLDEST_FIRST)):
            pages = [
                await self.listed(UserMediaOrder.CREATED_TS, descending, start, 2)
                for start in (0, 2, 4, 6)
            ]
            # Page boundaries fall inside the run of equal times.
            self.assertEqual(
                pages,
                [(expected[0:2], 6), (expected[2:4], 6), (expected[4:6], 6), ([], 6)],
            )
        self.assertEqual(
            await self.listed(UserMediaOrder.CREATED_TS, True, 3, 2), (NEWEST_FIRST[3:5], 6)
        )

    async def test_other_orders_unchanged(self) -> None:
        by_size = await self.listed(UserMediaOrder.MEDIA_LENGTH, True)
        self.assertEqual(by_size, (["tie_b", "tie_c", "m4", "m5", "tie_a", "m1"], 6))
        by_name = await self.listed(UserMediaOrder.UPLOAD_NAME, False, 1, 3)
        self.assertEqual(by_name, (["m4", "m5", "tie_a"], 6))
        media, total = await self.rows.user_media(
            "@nobody:db.test", 0, 10, UserMediaOrder.CREATED_TS, True
        )
        self.assertEqual((media, total), ([], 0))

    async def test_page_keys_by_creation_time_come_from_the_index_alone(self) -> None:
        postgres = self.database.engine.name == "psycopg2"
        for descending in (True, False):
            sql = user_media_page_sql(UserMediaOrder.CREATED_TS, descending)
            plan = await query_plan(
                self.database, sql, (USER, 100, 90), index_only_on="local_media_repository"
            )
            if postgres:
                backward = "" if descending else " Backward"
                wanted = f"Index Only Scan{backward} using mediarepo_local_media_user_created "
            else:
                wanted = "COVERING INDEX mediarepo_local_media_user_created "
            self.assertIn(wanted, plan)
            if postgres and descending:
                # The index's own order: no sort of the keys before the page.
                self.assertNotIn("Incremental Sort", plan)


class UserMediaQueryPostgresTests(UserMediaQueryTests):
    engine = "psycopg2"
