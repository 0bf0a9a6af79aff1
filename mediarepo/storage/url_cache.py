"""Queries on Synapse's URL-preview cache: ``local_media_repository_url_cache``
(one row per preview made; no unique key, as in Synapse) and the
``local_media_repository`` rows of the pages and images previews downloaded
(``url_cache`` set), with their thumbnails."""

from __future__ import annotations

import attrs

from mediarepo.storage.database import Database, Transaction
from mediarepo.storage.notifications import announce_changed_txn


@attrs.frozen
class CachedPreview:
    """A row of ``local_media_repository_url_cache``."""

    url: str
    response_code: int
    etag: str | None
    expires_ts: int
    og: str
    media_id: str
    download_ts: int


_COLUMNS = "url, response_code, etag, expires_ts, og, media_id, download_ts"


class UrlCacheStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def get_preview(self, url: str, ts: int) -> CachedPreview | None:
        """The preview of ``url`` as of ``ts``: the newest made at or before
        it, else the oldest made after it (Synapse's lookup)."""

        def txn(t: Transaction) -> CachedPreview | None:
            t.execute(
                f"SELECT {_COLUMNS} FROM local_media_repository_url_cache"
                " WHERE url = ? AND download_ts <= ? ORDER BY download_ts DESC LIMIT 1",
                (url, ts),
            )
            row = t.fetchone()
            if row is None:
                t.execute(
                    f"SELECT {_COLUMNS} FROM local_media_repository_url_cache"
                    " WHERE url = ? AND download_ts > ? ORDER BY download_ts ASC LIMIT 1",
                    (url, ts),
                )
                row = t.fetchone()
            if row is None:
                return None
            og = row[4]
            if isinstance(og, bytes | memoryview):
                og = bytes(og).decode("utf-8")
            return CachedPreview(
                url=row[0],
                response_code=row[1] or 0,
                etag=row[2],
                expires_ts=row[3] or 0,
                og=og or "{}",
                media_id=row[5],
                download_ts=row[6] or 0,
            )

        return await self._db.run_interaction("get_url_cache", txn)

    async def store_preview(self, preview: CachedPreview) -> None:
        await self._db.run_update(
            "store_url_cache",
            f"INSERT INTO local_media_repository_url_cache ({_COLUMNS})"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (preview.url, preview.response_code, preview.etag, preview.expires_ts, preview.og,
             preview.media_id, preview.download_ts),
        )  # fmt: skip

    async def expired_previews(self, now_ms: int, limit: int) -> list[str]:
        """Media IDs of previews expired by ``now_ms``, soonest expired first."""
        rows = await self._db.run_query(
            "get_expired_url_cache",
            "SELECT media_id FROM local_media_repository_url_cache"
            " WHERE expires_ts < ? ORDER BY expires_ts ASC LIMIT ?",
            (now_ms, limit),
        )
        return [row[0] for row in rows]

    async def delete_previews(self, media_ids: list[str]) -> None:
        if not media_ids:
            return
        await self._db.run_interaction(
            "delete_url_cache",
            lambda t: t.execute_batch(
                "DELETE FROM local_media_repository_url_cache WHERE media_id = ?",
                [(media_id,) for media_id in media_ids],
            ),
        )

    async def downloads_before(self, before_ts: int, limit: int) -> list[str]:
        """Media IDs of pages and images previews downloaded before ``before_ts``."""
        rows = await self._db.run_query(
            "get_url_cache_media_before",
            "SELECT media_id FROM local_media_repository"
            " WHERE created_ts < ? AND url_cache IS NOT NULL ORDER BY created_ts ASC LIMIT ?",
            (before_ts, limit),
        )
        return [row[0] for row in rows]

    async def delete_downloads(self, media_ids: list[str]) -> None:
        """Forget downloads of previews and their thumbnails (files are the caller's)."""
        if not media_ids:
            return

        def txn(t: Transaction) -> None:
            args = [(media_id,) for media_id in media_ids]
            t.execute_batch("DELETE FROM local_media_repository WHERE media_id = ?", args)
            t.execute_batch(
                "DELETE FROM local_media_repository_thumbnails WHERE media_id = ?", args
            )
            announce_changed_txn(t, media_ids)

        await self._db.run_interaction("delete_url_cache_media", txn)
