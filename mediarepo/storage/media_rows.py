"""Queries on Synapse's media tables."""

from __future__ import annotations

from typing import Any

from mediarepo.storage.database import (
    Database,
    Row,
    Transaction,
    rows_for_each_batch,
)
from mediarepo.storage.lock_rows import LockClaim, commit_unflushed_txn, take_lock_txn
from mediarepo.storage.notifications import announce_changed_txn
from mediarepo.storage.pending_thumbnail_rows import (
    PendingThumbnails,
    record_pending_thumbnails_txn,
)
from mediarepo.values import LocalMedia, RemoteMedia, ThumbnailInfo

# The PostgreSQL NOTIFY channel on which completed async uploads are announced.
CONTENT_CHANNEL = "mediarepo_media_content"

# A user's reservations made after a time and still waiting for content
# (parameters: the user ID, the time); the partial index
# mediarepo_pending_media serves it.
_PENDING_OF_USER = (
    "FROM local_media_repository WHERE user_id = ? AND created_ts > ? AND media_length IS NULL"
)

LOCAL_MEDIA_COLUMNS = (
    "media_id, media_type, media_length, created_ts, upload_name, user_id,"
    " quarantined_by, url_cache, last_access_ts, safe_from_quarantine, authenticated, sha256"
)


def local_media_from_row(row: Row) -> LocalMedia:
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


_REMOTE_MEDIA_SQL = (
    "SELECT media_type, created_ts, upload_name, media_length, filesystem_id,"
    " last_access_ts, quarantined_by, authenticated, sha256 FROM remote_media_cache"
    " WHERE media_origin = ? AND media_id = ?"
)


def _remote_media_from_rows(origin: str, media_id: str, rows: list[Row]) -> RemoteMedia | None:
    if not rows:
        return None
    r = rows[0]
    return RemoteMedia(
        media_origin=origin,
        media_id=media_id,
        media_type=r[0],
        created_ts=r[1] or 0,
        upload_name=r[2],
        media_length=r[3] or 0,
        filesystem_id=r[4],
        last_access_ts=r[5],
        quarantined_by=r[6],
        authenticated=bool(r[7]),
        sha256=r[8],
    )


def get_local_media_txn(t: Transaction, media_id: str) -> LocalMedia | None:
    t.execute(
        f"SELECT {LOCAL_MEDIA_COLUMNS} FROM local_media_repository WHERE media_id = ?",
        (media_id,),
    )
    row = t.fetchone()
    return local_media_from_row(row) if row is not None else None


def remote_content_key(origin: str, media_id: str) -> str:
    """How the arrival of cached remote media is announced (local media IDs
    never hold a "/")."""
    return f"{origin}/{media_id}"


def announce_content_txn(t: Transaction, media_id: str) -> None:
    """Tell other processes on a PostgreSQL database (waiting downloads)
    that a reservation has its content, or (a :func:`remote_content_key`)
    that remote media is cached."""
    if t.engine.name == "psycopg2":
        t.execute("SELECT pg_notify(?, ?)", (CONTENT_CHANNEL, media_id))


class _AlreadyRecorded(Exception):
    """Rolls back the recording of media that another process recorded first."""


class MediaRows:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def get_local_media(self, media_id: str) -> LocalMedia | None:
        rows = await self._db.run_query(
            "get_local_media",
            f"SELECT {LOCAL_MEDIA_COLUMNS} FROM local_media_repository WHERE media_id = ?",
            (media_id,),
        )
        return local_media_from_row(rows[0]) if rows else None

    async def media_ids_with_content(self, media_ids: list[str]) -> set[str]:
        """Which of ``media_ids`` have a row with content (not a reservation
        still waiting for it)."""

        def txn(t: Transaction) -> set[str]:
            rows = rows_for_each_batch(
                t,
                "SELECT media_id FROM local_media_repository"
                " WHERE media_length IS NOT NULL AND media_id IN ({ids})",
                media_ids,
            )
            return {row[0] for row in rows}

        return await self._db.run_interaction("media_ids_with_content", txn)

    async def get_local_thumbnails(self, media_id: str) -> list[ThumbnailInfo]:
        rows = await self._db.run_query(
            "get_local_media_thumbnails",
            "SELECT thumbnail_width, thumbnail_height, thumbnail_type, thumbnail_method,"
            " thumbnail_length FROM local_media_repository_thumbnails WHERE media_id = ?",
            (media_id,),
        )
        return [ThumbnailInfo(row[0], row[1], row[2], row[3], row[4] or 0) for row in rows]

    async def store_local_thumbnail(self, media_id: str, thumbnail: ThumbnailInfo) -> bool:
        """Record a thumbnail of media still stored; a row already there for
        the same size, type and method (another worker's, or an older file)
        gets the new length. False, and nothing recorded, if the media is
        gone (deleted while its thumbnail was being made)."""
        return await self._store_thumbnail(
            "store_local_thumbnail",
            "local_media_repository_thumbnails (media_id, thumbnail_width, thumbnail_height,"
            " thumbnail_type, thumbnail_method, thumbnail_length)",
            "(media_id, thumbnail_width, thumbnail_height, thumbnail_type, thumbnail_method)",
            "local_media_repository WHERE media_id = ?",
            (media_id,),
            (media_id, thumbnail.width, thumbnail.height, thumbnail.type, thumbnail.method,
             thumbnail.length),
        )  # fmt: skip

    async def _store_thumbnail(
        self,
        desc: str,
        table_and_columns: str,
        conflict_columns: str,
        media_row: str,
        media_key: tuple[Any, ...],
        values: tuple[Any, ...],
    ) -> bool:
        """Insert (or update) a thumbnail row only while its media row exists.

        On PostgreSQL the media row is share-locked while the thumbnail is
        recorded: a deletion running at the same moment either finds the
        thumbnail row and deletes it with the media, or has deleted the media
        first and the thumbnail is not recorded. (SQLite has one writer.)"""
        lock = " FOR SHARE" if self._db.engine.name == "psycopg2" else ""
        value_marks = ", ".join("?" * len(values))

        def txn(t: Transaction) -> bool:
            t.execute(f"SELECT 1 FROM {media_row}{lock}", media_key)
            if t.fetchone() is None:
                return False
            t.execute(
                f"INSERT INTO {table_and_columns} VALUES ({value_marks})"
                f" ON CONFLICT {conflict_columns}"
                " DO UPDATE SET thumbnail_length = EXCLUDED.thumbnail_length",
                values,
            )
            return True

        return await self._db.run_interaction(desc, txn)

    # -- async uploads: reservations without content ---------------------------

    async def reserve_local_media(
        self,
        media_id: str,
        user_id: str,
        created_ts: int,
        authenticated: bool,
        *,
        max_pending: int,
        pending_after: int,
    ) -> bool:
        """Record a media ID with no content yet, as Synapse's ``/create``
        does, unless ``user_id`` already has ``max_pending`` reservations made
        after ``pending_after`` waiting for content (then ``False``). One
        statement: this is on every ``/create``'s path."""
        changed = await self._db.run_update(
            "store_local_media_id",
            "INSERT INTO local_media_repository (media_id, created_ts, user_id, authenticated)"
            f" SELECT ?, ?, ?, ? WHERE (SELECT COUNT(*) {_PENDING_OF_USER}) < ?",
            (media_id, created_ts, user_id, authenticated, user_id, pending_after, max_pending),
        )
        return changed == 1

    async def count_pending_media(self, user_id: str, created_after: int) -> tuple[int, int | None]:
        """How many reservations of ``user_id`` made after ``created_after``
        still wait for content, and when the oldest of them was made."""
        rows = await self._db.run_query(
            "get_pending_media",
            f"SELECT COUNT(*), MIN(created_ts) {_PENDING_OF_USER}",
            (user_id, created_after),
        )
        return int(rows[0][0]), rows[0][1]

    async def bytes_uploaded_since(self, user_id: str, since_ts: int) -> int:
        """Bytes of local media ``user_id`` stored after ``since_ts`` (URL
        previews they caused included, reservations counting nothing)."""
        rows = await self._db.run_query(
            "get_media_uploaded_size_for_user",
            "SELECT COALESCE(SUM(media_length), 0) FROM local_media_repository"
            " WHERE user_id = ? AND created_ts > ?",
            (user_id, since_ts),
        )
        return int(rows[0][0])

    async def delete_expired_reservations(self, created_before: int, limit: int) -> list[str]:
        """Remove up to ``limit`` reservations made before ``created_before``
        that never got content; returns their media IDs."""

        def txn(t: Transaction) -> list[str]:
            t.execute(
                "SELECT media_id FROM local_media_repository"
                " WHERE media_length IS NULL AND created_ts < ? LIMIT ?",
                (created_before, limit),
            )
            media_ids = [row[0] for row in t.fetchall()]
            t.execute_batch(
                "DELETE FROM local_media_repository WHERE media_id = ? AND media_length IS NULL",
                [(media_id,) for media_id in media_ids],
            )
            return media_ids

        return await self._db.run_interaction("delete_expired_reservations", txn)

    async def update_access_times(
        self, local: dict[str, int], remote: dict[tuple[str, str], int]
    ) -> None:
        """Set ``last_access_ts`` of many media in one transaction, never
        back: processes flush their batches in any order, and an older batch
        must not undo a newer read (retention would then purge media read
        moments ago).

        Rows are updated in key order: workers flushing at the same time
        then take their row locks in the same order and cannot deadlock."""
        not_newer = " AND (last_access_ts IS NULL OR last_access_ts < ?)"

        def txn(t: Transaction) -> None:
            if local:
                t.execute_batch(
                    "UPDATE local_media_repository SET last_access_ts = ? WHERE media_id = ?"
                    + not_newer,
                    [(local[media_id], media_id, local[media_id]) for media_id in sorted(local)],
                )
            if remote:
                t.execute_batch(
                    "UPDATE remote_media_cache SET last_access_ts = ?"
                    " WHERE media_origin = ? AND media_id = ?" + not_newer,
                    [(remote[key], *key, remote[key]) for key in sorted(remote)],
                )

        await self._db.run_interaction("update_cached_last_access_time", txn)

    # -- retention ----------------------------------------------------------------

    async def remote_media_unread_since(
        self, before_ts: int, limit: int
    ) -> list[tuple[str, str, str]]:
        """(origin, media ID, filesystem ID) of cached remote media not read
        since ``before_ts``, quarantined media aside."""
        rows = await self._db.run_query(
            "get_remote_media_ids_to_purge",
            "SELECT media_origin, media_id, filesystem_id FROM remote_media_cache"
            " WHERE last_access_ts < ? AND quarantined_by IS NULL ORDER BY last_access_ts LIMIT ?",
            (before_ts, limit),
        )
        return [(r[0], r[1], r[2]) for r in rows]

    async def delete_local_media(self, media_ids: list[str]) -> set[str]:
        """Forget local media and their thumbnails (the files are the
        caller's); returns those of them that were URL-preview downloads,
        whose files are under ``url_cache/``."""

        def txn(t: Transaction) -> set[str]:
            deleted = rows_for_each_batch(
                t,
                "DELETE FROM local_media_repository WHERE media_id IN ({ids})"
                " RETURNING media_id, url_cache",
                media_ids,
            )
            url_cache = {row[0] for row in deleted if row[1] is not None}
            announce_changed_txn(t, media_ids)
            args = [(media_id,) for media_id in media_ids]
            t.execute_batch(
                "DELETE FROM local_media_repository_thumbnails WHERE media_id = ?", args
            )
            t.execute_batch("DELETE FROM local_media_repository_url_cache WHERE media_id = ?", args)
            return url_cache

        return await self._db.run_interaction("delete_local_media", txn)

    async def delete_remote_media(self, keys: list[tuple[str, str]]) -> None:
        """Forget cached remote media and their thumbnails."""

        def txn(t: Transaction) -> None:
            t.execute_batch(
                "DELETE FROM remote_media_cache WHERE media_origin = ? AND media_id = ?", keys
            )
            t.execute_batch(
                "DELETE FROM remote_media_cache_thumbnails WHERE media_origin = ? AND media_id = ?",
                keys,
            )
            announce_changed_txn(t, (), keys)

        await self._db.run_interaction("delete_remote_media", txn)

    # -- remote media cache -----------------------------------------------------

    async def get_remote_media(self, origin: str, media_id: str) -> RemoteMedia | None:
        rows = await self._db.run_query(
            "get_cached_remote_media", _REMOTE_MEDIA_SQL, (origin, media_id)
        )
        return _remote_media_from_rows(origin, media_id, rows)

    async def take_download_lock(
        self, claim: LockClaim, origin: str, media_id: str
    ) -> tuple[bool, RemoteMedia | None]:
        """Take the lock of a remote media's download and read its cached row,
        in one transaction: whether the lock was taken, and the row (which
        may have landed since the caller last looked)."""

        def take(t: Transaction) -> tuple[bool, RemoteMedia | None]:
            commit_unflushed_txn(t)
            if not take_lock_txn(t, claim):
                return False, None
            t.execute(_REMOTE_MEDIA_SQL, (origin, media_id))
            return True, _remote_media_from_rows(origin, media_id, t.fetchall())

        return await self._db.run_interaction("take_download_lock", take)

    async def store_remote_media(
        self, media: RemoteMedia, thumbnails_owed: PendingThumbnails | None = None
    ) -> bool:
        """Record a download, with the thumbnails owed to it if given, in one
        transaction; ``False``, and nothing recorded, if another download of
        the same media (here or in another process) was recorded first."""

        def store(t: Transaction) -> None:
            if thumbnails_owed is not None:
                record_pending_thumbnails_txn(t, thumbnails_owed)
            t.execute(
                "INSERT INTO remote_media_cache (media_origin, media_id, media_type,"
                " created_ts, upload_name, media_length, filesystem_id, last_access_ts,"
                " quarantined_by, authenticated, sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (media_origin, media_id) DO NOTHING",
                (media.media_origin, media.media_id, media.media_type, media.created_ts,
                 media.upload_name, media.media_length, media.filesystem_id,
                 media.last_access_ts, media.quarantined_by, media.authenticated, media.sha256),
            )  # fmt: skip
            if t.rowcount != 1:
                # Rolled back: the note of owed thumbnails stays the first download's.
                raise _AlreadyRecorded()
            # Processes waiting for this download elsewhere look again now.
            announce_content_txn(t, remote_content_key(media.media_origin, media.media_id))

        try:
            await self._db.run_interaction("store_cached_remote_media", store)
        except _AlreadyRecorded:
            return False
        return True

    async def get_remote_thumbnails(self, origin: str, media_id: str) -> list[ThumbnailInfo]:
        rows = await self._db.run_query(
            "get_remote_media_thumbnails",
            "SELECT thumbnail_width, thumbnail_height, thumbnail_type, thumbnail_method,"
            " thumbnail_length FROM remote_media_cache_thumbnails"
            " WHERE media_origin = ? AND media_id = ?",
            (origin, media_id),
        )
        return [ThumbnailInfo(row[0], row[1], row[2], row[3], row[4] or 0) for row in rows]

    async def store_remote_thumbnail(
        self, origin: str, media_id: str, filesystem_id: str, thumbnail: ThumbnailInfo
    ) -> bool:
        """As :meth:`store_local_thumbnail`, for cached remote media."""
        return await self._store_thumbnail(
            "store_remote_media_thumbnail",
            "remote_media_cache_thumbnails (media_origin, media_id, thumbnail_width,"
            " thumbnail_height, thumbnail_type, thumbnail_method, thumbnail_length,"
            " filesystem_id)",
            "(media_origin, media_id, thumbnail_width, thumbnail_height, thumbnail_type,"
            " thumbnail_method)",
            "remote_media_cache WHERE media_origin = ? AND media_id = ?",
            (origin, media_id),
            (origin, media_id, thumbnail.width, thumbnail.height, thumbnail.type,
             thumbnail.method, thumbnail.length, filesystem_id),
        )  # fmt: skip
