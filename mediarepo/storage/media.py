"""Queries on Synapse's media tables."""

from __future__ import annotations

from mediarepo.storage.database import Database, Row, Transaction
from mediarepo.values import LocalMedia, ThumbnailInfo

_LOCAL_MEDIA_COLUMNS = (
    "media_id, media_type, media_length, created_ts, upload_name, user_id,"
    " quarantined_by, url_cache, last_access_ts, safe_from_quarantine, authenticated, sha256"
)


def _local_media_from_row(row: Row) -> LocalMedia:
    return LocalMedia(
        media_id=row[0],
        media_type=row[1],
        media_length=row[2],
        created_ts=row[3] or 0,
        upload_name=row[4],
        user_id=row[5],
        quarantined_by=row[6],
        url_cache=row[7],
        last_access_ts=row[8],
        safe_from_quarantine=bool(row[9]),
        authenticated=bool(row[10]),
        sha256=row[11],
    )


class MediaStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def store_local_media(self, media: LocalMedia) -> None:
        """Insert a finished upload's row, as Synapse's ``store_local_media`` does."""
        await self._db.run_query(
            "store_local_media",
            "INSERT INTO local_media_repository (media_id, media_type, created_ts,"
            " upload_name, media_length, user_id, url_cache, authenticated, sha256,"
            " quarantined_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                media.media_id,
                media.media_type,
                media.created_ts,
                media.upload_name,
                media.media_length,
                media.user_id,
                media.url_cache,
                media.authenticated,
                media.sha256,
                media.quarantined_by,
            ),
        )

    async def get_local_media(self, media_id: str) -> LocalMedia | None:
        rows = await self._db.run_query(
            "get_local_media",
            f"SELECT {_LOCAL_MEDIA_COLUMNS} FROM local_media_repository WHERE media_id = ?",
            (media_id,),
        )
        return _local_media_from_row(rows[0]) if rows else None

    async def local_media_exist(self, media_ids: list[str]) -> set[str]:
        """Which of ``media_ids`` have a row."""

        def txn(t: Transaction) -> set[str]:
            found: set[str] = set()
            for start in range(0, len(media_ids), 100):
                batch = media_ids[start : start + 100]
                marks = ", ".join("?" for _ in batch)
                t.execute(
                    f"SELECT media_id FROM local_media_repository WHERE media_id IN ({marks})",
                    batch,
                )
                found.update(row[0] for row in t.fetchall())
            return found

        return await self._db.run_interaction("local_media_exist", txn)

    async def get_local_thumbnails(self, media_id: str) -> list[ThumbnailInfo]:
        rows = await self._db.run_query(
            "get_local_media_thumbnails",
            "SELECT thumbnail_width, thumbnail_height, thumbnail_type, thumbnail_method,"
            " thumbnail_length FROM local_media_repository_thumbnails WHERE media_id = ?",
            (media_id,),
        )
        return [ThumbnailInfo(row[0], row[1], row[2], row[3], row[4] or 0) for row in rows]

    async def store_local_thumbnail(self, media_id: str, thumbnail: ThumbnailInfo) -> None:
        """Record a thumbnail; a row already there for the same size, type and
        method (another worker's, or an older file) gets the new length."""
        await self._db.run_query(
            "store_local_thumbnail",
            "INSERT INTO local_media_repository_thumbnails (media_id, thumbnail_width,"
            " thumbnail_height, thumbnail_type, thumbnail_method, thumbnail_length)"
            " VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (media_id, thumbnail_width, thumbnail_height, thumbnail_type,"
            " thumbnail_method) DO UPDATE SET thumbnail_length = EXCLUDED.thumbnail_length",
            (
                media_id,
                thumbnail.width,
                thumbnail.height,
                thumbnail.type,
                thumbnail.method,
                thumbnail.length,
            ),
        )
