"""Recording an upload (storage/upload_rows.py): one transaction with the
caller's file placement inside it, rolled back as a whole when refused."""

from __future__ import annotations

from typing import Any

import attrs

from mediarepo.storage.lock_rows import LockClaim, LockToken
from mediarepo.storage.pending_thumbnail_rows import PendingThumbnails
from mediarepo.storage.schema import prepare_database
from mediarepo.storage.upload_rows import (
    KnownContent,
    NewUpload,
    ReservationGoneError,
    UploadOverQuotaError,
    UploadRows,
    UploadWindow,
)
from mediarepo.values import LocalMedia
from tests.utils import DatabaseTestCase

USER = "@alice:db.test"


def _media(media_id: str, length: int = 10, sha256: str = "ab" * 32) -> LocalMedia:
    return LocalMedia(
        media_id=media_id,
        media_type="text/plain",
        media_length=length,
        created_ts=1000,
        upload_name=None,
        user_id=USER,
        quarantined_by=None,
        url_cache=None,
        last_access_ts=None,
        safe_from_quarantine=False,
        authenticated=True,
        sha256=sha256,
    )


def _owed(media_id: str) -> PendingThumbnails:
    return PendingThumbnails("", media_id, "test@host-1", 5000, attempts=0)


class UploadStoreTests(DatabaseTestCase):
    async def _ready(self) -> UploadRows:
        await prepare_database(self.database)
        return UploadRows(self.database)

    async def _rows(self, sql: str) -> list[tuple[Any, ...]]:
        return await self.database.run_query("t", sql)

    async def test_stored_with_its_note_then_after_commit(self) -> None:
        uploads = await self._ready()
        steps: list[str] = []

        def place(known: KnownContent) -> bool:
            steps.append(f"place {known.copies}")
            return False

        first = NewUpload(_media("aaaaaaaaaa"), thumbnails_owed=_owed("aaaaaaaaaa"))
        stored = await uploads.store(first, place, lambda: steps.append("after"))
        self.assertEqual(stored.media, first.media)
        # The same bytes again: the placement is told where they are.
        await uploads.store(NewUpload(_media("bbbbbbbbbb")), place, lambda: steps.append("after"))
        self.assertEqual(steps, ["place []", "after", "place ['aaaaaaaaaa']", "after"])
        self.assertEqual(
            await self._rows("SELECT media_id FROM mediarepo_pending_thumbnails"),
            [("aaaaaaaaaa",)],
        )

    async def test_refused_over_quota_rolls_back_everything(self) -> None:
        uploads = await self._ready()
        placed: list[str] = []
        after: list[str] = []

        def place(known: KnownContent) -> bool:
            placed.append("placed")
            return False

        upload = NewUpload(
            _media("cccccccccc", length=100),
            windows=(UploadWindow(since_ts=0, max_bytes=50),),
            thumbnails_owed=_owed("cccccccccc"),
        )
        with self.assertRaises(UploadOverQuotaError):
            await uploads.store(upload, place, lambda: after.append("after"))
        # The file was placed (the caller removes it); nothing was recorded.
        self.assertEqual((placed, after), (["placed"], []))
        self.assertEqual(await self._rows("SELECT media_id FROM local_media_repository"), [])
        self.assertEqual(await self._rows("SELECT media_id FROM mediarepo_pending_thumbnails"), [])

    async def test_reservation_filled_and_its_lock_released_together(self) -> None:
        uploads = await self._ready()
        await self.database.run_update(
            "t",
            "INSERT INTO local_media_repository (media_id, created_ts, user_id) VALUES (?, ?, ?)",
            ("dddddddddd", 1000, USER),
        )
        lock = LockToken("upload_media", "dddddddddd", "token")
        claim = LockClaim(lock, "test@host-1", 1000, lambda _: False)
        self.assertEqual(
            await uploads.take_reservation_lock(claim, "dddddddddd"),
            (True, attrs.evolve(_media("dddddddddd"), media_type=None, media_length=None,
                                sha256=None, authenticated=False)),
        )  # fmt: skip
        # Held: another process's claim is refused and reads nothing.
        other = LockClaim(attrs.evolve(lock, token="other"), "test@host-2", 1000, lambda _: False)
        self.assertEqual(await uploads.take_reservation_lock(other, "dddddddddd"), (False, None))
        upload = NewUpload(_media("dddddddddd"), reservation_lock=lock)
        await uploads.store(upload, lambda known: False, lambda: None)
        self.assertEqual(
            await self._rows("SELECT media_length FROM local_media_repository"), [(10,)]
        )
        self.assertEqual(await self._rows("SELECT token FROM worker_locks"), [])

    async def test_reservation_gone_rolls_back(self) -> None:
        uploads = await self._ready()
        lock = LockToken("upload_media", "eeeeeeeeee", "token")
        await self.database.run_update(
            "t",
            "INSERT INTO worker_locks (lock_name, lock_key, instance_name, token,"
            " last_renewed_ts) VALUES (?, ?, ?, ?, ?)",
            (lock.name, lock.key, "test@host-1", lock.token, 1000),
        )
        upload = NewUpload(
            _media("eeeeeeeeee"), reservation_lock=lock, thumbnails_owed=_owed("eeeeeeeeee")
        )
        with self.assertRaises(ReservationGoneError):
            await uploads.store(upload, lambda known: False, lambda: None)
        # The lock is still held (released by its holder), the note not written.
        self.assertEqual(await self._rows("SELECT token FROM worker_locks"), [("token",)])
        self.assertEqual(await self._rows("SELECT media_id FROM mediarepo_pending_thumbnails"), [])


class UploadStorePostgresTests(UploadStoreTests):
    engine = "psycopg2"
