"""Deletions queued for a storage provider many at once (a purge's batch):
what each would do queued alone, in one transaction, on SQLite and on
PostgreSQL."""

from __future__ import annotations

from typing import Any

from mediarepo.storage.provider_task_rows import ProviderOperation, ProviderTask, ProviderTaskRows
from mediarepo.storage.schema import prepare_database
from tests.utils import DatabaseTestCase

STORE, DELETE = ProviderOperation.STORE, ProviderOperation.DELETE
DELETE_DIRECTORY = ProviderOperation.DELETE_DIRECTORY


class ProviderDeletionTests(DatabaseTestCase):
    async def set_up(self) -> None:
        await super().set_up()
        await prepare_database(self.database)
        self.rows = ProviderTaskRows(self.database)

    async def queued(self) -> set[tuple[str, str, str, int]]:
        rows = await self.database.run_query(
            "t",
            "SELECT provider, relative_path, operation, next_attempt_ts"
            " FROM mediarepo_provider_tasks",
        )
        return {(r[0], r[1], r[2], r[3]) for r in rows}

    async def test_deletions_cancel_copies_and_are_queued_together(self) -> None:
        for provider, path in (
            ("s3", "local_content/ab/cd/gone"),
            ("s3", "local_thumbnails/ab/cd/gone/32-32-image-png-crop"),
            ("s3", "local_content/ab/cd/kept"),
            ("s3", "local_thumbnails/ab/cd/gone2/x"),
            ("other", "local_content/ab/cd/gone"),
        ):
            await self.rows.add(ProviderTask(provider, path, STORE, 0), 5)
        # Already queued: stays as it is.
        await self.rows.add(ProviderTask("s3", "local_content/ab/cd/old", DELETE, 0), 5)
        transactions: list[str] = []
        run_interaction = self.database.run_interaction

        async def counting(desc: str, func: Any, *args: Any, **kwargs: Any) -> Any:
            transactions.append(desc)
            return await run_interaction(desc, func, *args, **kwargs)

        self.patch(self.database, "run_interaction", counting)

        await self.rows.add_deletions(
            "s3",
            ["local_content/ab/cd/gone", "local_content/ab/cd/old"],
            ["local_thumbnails/ab/cd/gone", "local_thumbnails/ab/cd/gone2/"],
            9,
        )

        self.assertEqual(len(transactions), 1)
        self.assertEqual(
            await self.queued(),
            {
                ("s3", "local_content/ab/cd/kept", "store", 5),
                ("other", "local_content/ab/cd/gone", "store", 5),
                ("s3", "local_content/ab/cd/old", "delete", 5),
                ("s3", "local_content/ab/cd/gone", "delete", 9),
                ("s3", "local_thumbnails/ab/cd/gone", "delete_directory", 9),
                ("s3", "local_thumbnails/ab/cd/gone2/", "delete_directory", 9),
            },
        )


class ProviderDeletionPostgresTests(ProviderDeletionTests):
    engine = "psycopg2"
