"""Queries on Synapse's URL-preview cache tables, on SQLite and PostgreSQL."""

from __future__ import annotations

from mediarepo.storage.schema import prepare_database
from mediarepo.storage.url_cache import CachedPreview, UrlCacheStore
from tests.utils import DatabaseTestCase


def preview(url: str, download_ts: int, media_id: str, expires_ts: int = 10_000) -> CachedPreview:
    return CachedPreview(url, 200, None, expires_ts, f'{{"n":"{media_id}"}}', media_id, download_ts)


class UrlCacheStoreTests(DatabaseTestCase):
    async def set_up(self) -> None:
        await super().set_up()
        await prepare_database(self.database)
        self.store = UrlCacheStore(self.database)

    async def test_lookup_by_time(self) -> None:
        for download_ts, media_id in ((100, "a"), (200, "b"), (300, "c")):
            await self.store.store_preview(preview("https://x/", download_ts, media_id))
        await self.store.store_preview(preview("https://other/", 250, "z"))
        found = [await self.store.get_preview("https://x/", ts) for ts in (250, 300, 50)]
        # The newest at or before the time, else the oldest after it.
        self.assertEqual([p.media_id if p else None for p in found], ["b", "c", "a"])
        self.assertIsNone(await self.store.get_preview("https://none/", 1000))
        cached = await self.store.get_preview("https://x/", 150)
        self.assertEqual(cached, preview("https://x/", 100, "a"))

    async def test_expired_previews_and_old_downloads(self) -> None:
        for expires_ts, media_id in ((500, "late"), (100, "early"), (900, "fresh")):
            await self.store.store_preview(preview("https://x/", 1, media_id, expires_ts))
        expired = await self.store.expired_previews(600, 500)
        self.assertEqual(expired, ["early", "late"])
        await self.store.delete_previews(expired)
        self.assertEqual(await self.store.expired_previews(10_000, 500), ["fresh"])
        for media_id, created_ts, url_cache in (("old", 10, "https://x/"), ("new", 5000, "https://x/"),
                                                ("upload", 1, None)):  # fmt: skip
            await self.database.run_update(
                "t",
                "INSERT INTO local_media_repository (media_id, media_type, created_ts,"
                " media_length, url_cache) VALUES (?, 'text/html', ?, 1, ?)",
                (media_id, created_ts, url_cache),
            )
            await self.database.run_update(
                "t",
                "INSERT INTO local_media_repository_thumbnails (media_id, thumbnail_width)"
                " VALUES (?, 1)",
                (media_id,),
            )
        old = await self.store.downloads_before(1000, 500)
        self.assertEqual(old, ["old"])
        await self.store.delete_downloads(old)
        rows = await self.database.run_query(
            "t", "SELECT media_id FROM local_media_repository ORDER BY media_id"
        )
        self.assertEqual([r[0] for r in rows], ["new", "upload"])
        thumbnails = await self.database.run_query(
            "t", "SELECT media_id FROM local_media_repository_thumbnails ORDER BY media_id"
        )
        self.assertEqual([r[0] for r in thumbnails], ["new", "upload"])


class UrlCacheStorePostgresTests(UrlCacheStoreTests):
    engine = "psycopg2"
