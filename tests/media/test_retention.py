"""Retention purges exactly the stale media, in bounded batches."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

from twisted.application.internet import TimerService

from mediarepo.media import lifecycle
from mediarepo.media.paths import local_media_path, local_thumbnail_dir
from mediarepo.media.providers.local import DELETE_JOBS, LocalFiles
from tests import images
from tests.utils import ServerTestCase

DAY_MS = 24 * 3600 * 1000
T = TypeVar("T")


class RetentionTests(ServerTestCase):
    extra_config = {
        "media_retention": {"local_media_lifetime": "30d", "remote_media_lifetime": "7d"},
        "media_housekeeping_interval": "2h",
    }

    async def sql(self, statement: str, *args: object) -> list[tuple[object, ...]]:
        assert self.server.database is not None
        return await self.server.database.run_query("t", statement, args)

    def test_housekeeping_interval_from_config(self) -> None:
        housekeeping = self.server.namedServices["housekeeping"]
        assert isinstance(housekeeping, TimerService)
        self.assertEqual(housekeeping.step, 2 * 3600)

    async def test_purges_exactly_the_stale_media(self) -> None:
        token = await self.register()
        stale = await self.upload(token, images.png(40, 40), "image/png")
        read_lately = await self.upload(token, b"read lately")
        quarantined = await self.upload(token, b"quarantined")
        protected = await self.upload(token, b"protected")
        fresh = await self.upload(token, b"fresh")
        now = 1_000 * DAY_MS
        old = now - 40 * DAY_MS
        for media_id in (stale, read_lately, quarantined, protected):
            await self.sql(
                "UPDATE local_media_repository SET created_ts = ? WHERE media_id = ?", old, media_id
            )
        await self.sql(
            "UPDATE local_media_repository SET created_ts = ? WHERE media_id = ?", now, fresh
        )
        await self.sql(
            "UPDATE local_media_repository SET last_access_ts = ? WHERE media_id = ?",
            now - DAY_MS, read_lately,
        )  # fmt: skip
        await self.sql(
            "UPDATE local_media_repository SET quarantined_by = ? WHERE media_id = ?",
            "@admin:x", quarantined,
        )  # fmt: skip
        await self.sql(
            "UPDATE local_media_repository SET safe_from_quarantine = ? WHERE media_id = ?",
            True, protected,
        )  # fmt: skip
        # Remote: one stale entry, one read lately.
        for origin_id, accessed in (("stalermt", now - 8 * DAY_MS), ("recentrm", now - DAY_MS)):
            await self.sql(
                "INSERT INTO remote_media_cache (media_origin, media_id, media_type, created_ts,"
                " media_length, filesystem_id, last_access_ts) VALUES (?, ?, ?, ?, ?, ?, ?)",
                "other.example", origin_id, "text/plain", 0, 1, origin_id + "fsid", accessed,
            )  # fmt: skip
        thumbnails = os.path.join(self.media_store, local_thumbnail_dir(stale))
        self.assertTrue(os.path.isdir(thumbnails))
        self.assertEqual(await self.server.parts.retention.apply(now), (1, 1))
        left = {r[0] for r in await self.sql("SELECT media_id FROM local_media_repository")}
        self.assertEqual(left, {read_lately, quarantined, protected, fresh})
        self.assertFalse(os.path.exists(os.path.join(self.media_store, local_media_path(stale))))
        self.assertFalse(os.path.exists(thumbnails))
        # The directories the purge emptied went too (local_content/ab/cd,
        # local_thumbnails/ab/cd), the top-level ones stay.
        for top in ("local_content", "local_thumbnails"):
            self.assertFalse(
                os.path.exists(os.path.join(self.media_store, top, stale[:2], stale[2:4]))
            )
            self.assertTrue(os.path.isdir(os.path.join(self.media_store, top)))
        rows = await self.sql(
            "SELECT COUNT(*) FROM local_media_repository_thumbnails WHERE media_id = ?", stale
        )
        self.assertEqual(rows[0][0], 0)
        remote = {r[0] for r in await self.sql("SELECT media_id FROM remote_media_cache")}
        self.assertEqual(remote, {"recentrm"})

    async def test_large_purge_in_batches(self) -> None:
        # Above notifications' one payload per media (on PostgreSQL), so that
        # only the purge's own file work reaches the pool.
        self.patch(lifecycle, "PURGE_BATCH", 250)
        token = await self.register()
        media_id = await self.upload(token, b"template")
        rows = [(f"bulk{i:08d}xxxxxxxxxxxx", 5, i) for i in range(2499)]
        assert self.server.database is not None
        await self.server.database.run_interaction(
            "t",
            lambda t: t.execute_batch(
                "INSERT INTO local_media_repository (media_id, media_length, created_ts,"
                " media_type) VALUES (?, ?, ?, 'text/plain')",
                rows,
            ),
        )
        jobs: list[object] = []
        in_pool = LocalFiles.in_pool

        async def counting(store: LocalFiles, func: Callable[..., T], *args: object) -> T:
            jobs.append(func)
            return await in_pool(store, func, *args)

        self.patch(LocalFiles, "in_pool", counting)
        local, _ = await self.server.parts.retention.apply(int(time.time() * 1000) + 100 * DAY_MS)
        self.assertEqual(local, 2500)
        # The files of each batch in a few jobs of the I/O pool, not jobs
        # per media (no URL-preview download among them to look for).
        self.assertEqual(len(jobs), 10 * DELETE_JOBS)
        left = await self.sql("SELECT COUNT(*) FROM local_media_repository")
        self.assertEqual(left[0][0], 0)
        self.assertFalse(os.path.exists(os.path.join(self.media_store, local_media_path(media_id))))
        self.assertEqual(os.listdir(os.path.join(self.media_store, "local_content")), [])


class RetentionPostgresTests(RetentionTests):
    engine = "psycopg2"
