"""Quarantine and protection flags on Synapse's media tables.

Quarantine follows the content, as Synapse's does: quarantining one media
quarantines every local and cached remote media with the same SHA-256, so a
re-upload of the same bytes under a new ID is caught too. Protected local
media (``safe_from_quarantine``) is never quarantined. Each changed row is
recorded in ``quarantined_media_changes`` where the database has that table
(see :class:`~mediarepo.storage.schema.QuarantineRecords`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs
from twisted.internet.interfaces import IReactorTime

from mediarepo.storage.database import (
    Database,
    Transaction,
    rows_for_each_batch,
)
from mediarepo.storage.notifications import announce_changed_txn
from mediarepo.storage.schema import QuarantineRecords

# Who quarantined media whose bytes were already quarantined when it arrived.
QUARANTINED_BY_SYSTEM = "system"

# Synapse's background updates building the sha256 indexes.
_HASH_INDEX_UPDATES = ("local_media_repository_sha256_idx", "remote_media_cache_sha256_idx")
_HASH_INDEX_RECHECK_SECONDS = 600.0


@attrs.frozen
class QuarantineChange:
    """A row of ``quarantined_media_changes``; ``origin`` is None for local media."""

    stream_id: int
    origin: str | None
    media_id: str
    quarantined: bool


@attrs.frozen
class QuarantineResult:
    """The rows a quarantine or un-quarantine changed."""

    local: frozenset[str]
    remote: frozenset[tuple[str, str]]

    @property
    def count(self) -> int:
        return len(self.local) + len(self.remote)


class QuarantineRows:
    def __init__(
        self,
        database: Database,
        records: QuarantineRecords,
        instance_name: str,
        clock: IReactorTime,
        *,
        synapse_owned: bool,
    ) -> None:
        self._db = database
        self._records = records
        self._instance_name = instance_name
        self._clock = clock
        # Synapse builds its sha256 indexes in the background; until they
        # exist, a hash lookup would scan both tables, so (like Synapse) none
        # is made. Our own schema has the indexes from the start.
        self._hash_indexes_ready = not synapse_owned
        self._hash_indexes_checked_at = -_HASH_INDEX_RECHECK_SECONDS

    @property
    def records(self) -> QuarantineRecords:
        return self._records

    async def set_quarantined(
        self,
        local_ids: Sequence[str],
        remote_keys: Sequence[tuple[str, str]],
        quarantined_by: str | None,
    ) -> QuarantineResult:
        """Quarantine (``quarantined_by`` set) or release (None) the given
        media and every media sharing a SHA-256 with one of them."""

        def txn(t: Transaction) -> QuarantineResult:
            quarantining = quarantined_by is not None
            not_protected = " AND NOT safe_from_quarantine" if quarantining else ""
            hashed = rows_for_each_batch(
                t,
                "SELECT sha256 FROM local_media_repository WHERE sha256 IS NOT NULL"
                f"{not_protected} AND media_id IN ({{ids}})",
                local_ids,
            )
            hashes = {row[0] for row in hashed}
            for origin, media_id in remote_keys:
                t.execute(
                    "SELECT sha256 FROM remote_media_cache WHERE sha256 IS NOT NULL"
                    " AND media_origin = ? AND media_id = ?",
                    (origin, media_id),
                )
                hashes.update(row[0] for row in t.fetchall())

            local: set[str] = set()
            remote: set[tuple[str, str]] = set()
            for sha256 in sorted(hashes):
                t.execute(
                    "UPDATE local_media_repository SET quarantined_by = ?"
                    f" WHERE sha256 = ?{not_protected} RETURNING media_id",
                    (quarantined_by, sha256),
                )
                local.update(row[0] for row in t.fetchall())
                t.execute(
                    "UPDATE remote_media_cache SET quarantined_by = ? WHERE sha256 = ?"
                    " RETURNING media_origin, media_id",
                    (quarantined_by, sha256),
                )
                remote.update((row[0], row[1]) for row in t.fetchall())
            # Media without a hash (stored before hashes were kept) goes by ID.
            updated = rows_for_each_batch(
                t,
                "UPDATE local_media_repository SET quarantined_by = ?"
                f" WHERE media_id IN ({{ids}}){not_protected} RETURNING media_id",
                local_ids,
                before=[quarantined_by],
            )
            local.update(row[0] for row in updated)
            for origin, media_id in remote_keys:
                t.execute(
                    "UPDATE remote_media_cache SET quarantined_by = ?"
                    " WHERE media_origin = ? AND media_id = ? RETURNING media_origin, media_id",
                    (quarantined_by, origin, media_id),
                )
                remote.update((row[0], row[1]) for row in t.fetchall())

            self._record_changes(t, local, remote, quarantining)
            announce_changed_txn(t, local, remote)
            return QuarantineResult(frozenset(local), frozenset(remote))

        return await self._db.run_interaction("quarantine_media", txn)

    async def unquarantined_media_of_user(self, user_id: str) -> list[str]:
        rows = await self._db.run_query(
            "get_local_media_ids_by_user",
            "SELECT media_id FROM local_media_repository"
            " WHERE user_id = ? AND quarantined_by IS NULL",
            (user_id,),
        )
        return [row[0] for row in rows]

    async def is_hash_quarantined(self, sha256: str) -> bool:
        """Whether any local or cached remote media with these bytes is
        quarantined (always False while Synapse still builds its indexes)."""
        if not await self.hash_lookups_possible():
            return False
        rows = await self._db.run_query(
            "get_is_hash_quarantined", HASH_QUARANTINED_SQL, (sha256, sha256)
        )
        return bool(rows)

    async def hash_lookups_possible(self) -> bool:
        """Whether hashes may be looked up (see the constructor)."""
        if self._hash_indexes_ready:
            return True
        now = self._clock.seconds()
        if now - self._hash_indexes_checked_at < _HASH_INDEX_RECHECK_SECONDS:
            return False
        self._hash_indexes_checked_at = now
        rows = await self._db.run_query(
            "get_is_hash_quarantined_ready",
            "SELECT 1 FROM background_updates WHERE update_name IN (?, ?)",
            _HASH_INDEX_UPDATES,
        )
        self._hash_indexes_ready = not rows
        return self._hash_indexes_ready

    async def set_protected(self, media_id: str, protected: bool) -> bool:
        """Set ``safe_from_quarantine``; ``False`` if there is no such local media."""
        changed = await self._db.run_update(
            "mark_local_media_as_safe",
            "UPDATE local_media_repository SET safe_from_quarantine = ? WHERE media_id = ?",
            (protected, media_id),
        )
        return changed > 0

    async def changes_since(self, after: int, limit: int) -> tuple[list[QuarantineChange], int]:
        """Recorded changes with stream IDs above ``after``, oldest first, and
        the highest stream ID allocated so far."""

        def txn(t: Transaction) -> tuple[list[QuarantineChange], int]:
            t.execute("SELECT COALESCE(MAX(stream_id), 0) FROM quarantined_media_changes")
            row = t.fetchone()
            highest = int(row[0]) if row else 0
            if self._records is QuarantineRecords.SEQUENCE:
                t.execute("SELECT last_value, is_called FROM quarantined_media_id_seq")
                seq = t.fetchone()
                if seq is not None and seq[1]:
                    highest = max(highest, int(seq[0]))
            t.execute(
                "SELECT stream_id, origin, media_id, quarantined FROM quarantined_media_changes"
                " WHERE stream_id > ? ORDER BY stream_id LIMIT ?",
                (after, limit),
            )
            changes = [QuarantineChange(int(r[0]), r[1], r[2], bool(r[3])) for r in t.fetchall()]
            return changes, highest

        return await self._db.run_interaction("get_quarantined_media_changes", txn)

    def _record_changes(
        self,
        t: Transaction,
        local: Iterable[str],
        remote: Iterable[tuple[str, str]],
        quarantined: bool,
    ) -> None:
        items: list[tuple[str | None, str]] = [(None, media_id) for media_id in sorted(local)]
        items.extend(sorted(remote))
        if not items or self._records is QuarantineRecords.NONE:
            return
        if self._records is QuarantineRecords.SEQUENCE:
            next_id = "nextval('quarantined_media_id_seq')"
            t.execute_batch(
                "INSERT INTO quarantined_media_changes"
                " (stream_id, instance_name, origin, media_id, quarantined)"
                f" VALUES ({next_id}, ?, ?, ?, ?)",
                [
                    (self._instance_name, origin, media_id, quarantined)
                    for origin, media_id in items
                ],
            )
            return
        if self._records is QuarantineRecords.NEXT_MAX:
            t.execute("SELECT COALESCE(MAX(stream_id), 0) FROM quarantined_media_changes")
            row = t.fetchone()
            first = (int(row[0]) if row else 0) + 1
            t.execute_batch(
                "INSERT INTO quarantined_media_changes"
                " (stream_id, instance_name, origin, media_id, quarantined) VALUES (?, ?, ?, ?, ?)",
                [
                    (first + i, self._instance_name, origin, media_id, quarantined)
                    for i, (origin, media_id) in enumerate(items)
                ],
            )
            return
        raise AssertionError(f"quarantine changes cannot be recorded here ({self._records})")


# A row if any local or cached remote media with these bytes (the SHA-256,
# given twice) is quarantined.
HASH_QUARANTINED_SQL = (
    "SELECT 1 FROM local_media_repository WHERE sha256 = ? AND quarantined_by IS NOT NULL"
    " UNION ALL SELECT 1 FROM remote_media_cache"
    " WHERE sha256 = ? AND quarantined_by IS NOT NULL LIMIT 1"
)
