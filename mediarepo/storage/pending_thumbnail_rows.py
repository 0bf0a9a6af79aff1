"""Thumbnails owed to stored media (``mediarepo_pending_thumbnails``)."""

from __future__ import annotations

import attrs

from mediarepo.storage.database import Database, Transaction

# The origin recorded for local media.
LOCAL_ORIGIN = ""


@attrs.frozen
class PendingThumbnails:
    """Media whose pre-generated thumbnails may not have been made."""

    media_origin: str  # LOCAL_ORIGIN for local media
    media_id: str
    instance_name: str  # the process that owns the work
    lease_until_ts: int
    attempts: int  # how many times the work was taken over


def record_pending_thumbnails_txn(t: Transaction, owed: PendingThumbnails) -> None:
    """Note the work in the transaction that writes the media's row: the
    two are committed together (a note about media that turns out not to
    exist is dropped when resumed)."""
    t.execute(
        "INSERT INTO mediarepo_pending_thumbnails (media_origin, media_id, instance_name,"
        " lease_until_ts, attempts) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (media_origin, media_id) DO UPDATE SET"
        " instance_name = EXCLUDED.instance_name, lease_until_ts = EXCLUDED.lease_until_ts,"
        " attempts = EXCLUDED.attempts",
        (owed.media_origin, owed.media_id, owed.instance_name, owed.lease_until_ts,
         owed.attempts),
    )  # fmt: skip


class PendingThumbnailRows:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def owners(self) -> list[str]:
        """Every process that owns some of the work."""
        rows = await self._db.run_query(
            "get_pending_thumbnail_owners",
            "SELECT DISTINCT instance_name FROM mediarepo_pending_thumbnails",
        )
        return [row[0] for row in rows]

    async def takeable(
        self, owners: list[str], lease_before: int, limit: int
    ) -> list[PendingThumbnails]:
        """Up to ``limit`` items owned by one of ``owners`` or whose lease
        ended before ``lease_before``."""
        marks = ", ".join("?" for _ in owners) or "NULL"
        rows = await self._db.run_query(
            "get_takeable_pending_thumbnails",
            "SELECT media_origin, media_id, instance_name, lease_until_ts, attempts"
            " FROM mediarepo_pending_thumbnails"
            f" WHERE instance_name IN ({marks}) OR lease_until_ts < ?"
            " ORDER BY lease_until_ts LIMIT ?",
            (*owners, lease_before, limit),
        )
        return [PendingThumbnails(r[0], r[1], r[2], int(r[3]), int(r[4])) for r in rows]

    async def claim(self, item: PendingThumbnails, instance_name: str, lease_until_ts: int) -> bool:
        """Take ``item`` over as read; ``False`` if another process (or the
        owner, finishing) changed it first."""
        changed = await self._db.run_update(
            "claim_pending_thumbnails",
            "UPDATE mediarepo_pending_thumbnails SET instance_name = ?, lease_until_ts = ?,"
            " attempts = attempts + 1 WHERE media_origin = ? AND media_id = ?"
            " AND instance_name = ? AND lease_until_ts = ?",
            (instance_name, lease_until_ts, item.media_origin, item.media_id,
             item.instance_name, item.lease_until_ts),
        )  # fmt: skip
        return changed == 1

    async def remove(self, media_origin: str, media_id: str) -> None:
        await self._db.run_update(
            "remove_pending_thumbnails",
            "DELETE FROM mediarepo_pending_thumbnails WHERE media_origin = ? AND media_id = ?",
            (media_origin, media_id),
        )

    async def count(self) -> int:
        rows = await self._db.run_query(
            "count_pending_thumbnails", "SELECT COUNT(*) FROM mediarepo_pending_thumbnails"
        )
        return int(rows[0][0])
