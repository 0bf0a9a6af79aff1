"""An upload recorded: the statements that store a new file's row (or
fill a reservation), the file's placement on disk and the thumbnails owed
to it, in one transaction.

Order matters for crash safety (see docs/reliability.rst): the content is
looked up, then the file is made durable and linked into place by the
caller's step, inside the transaction and before the row exists; the row
and the note of owed thumbnails are committed together; only then is the
staging name removed (``after_commit``). A crash before the commit leaves
a linked file without a row and its staging name, which the staging sweep
removes; a crash after it loses nothing.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import attrs

from mediarepo.storage.database import Database, Transaction
from mediarepo.storage.lock_rows import (
    LockClaim,
    LockToken,
    commit_unflushed_txn,
    release_lock_txn,
    take_lock_txn,
)
from mediarepo.storage.media_rows import announce_content_txn, get_local_media_txn
from mediarepo.storage.pending_thumbnail_rows import (
    PendingThumbnails,
    record_pending_thumbnails_txn,
)
from mediarepo.storage.quarantine_rows import HASH_QUARANTINED_SQL, QUARANTINED_BY_SYSTEM
from mediarepo.values import LocalMedia


class UploadOverQuotaError(Exception):
    """The upload does not fit its user's quota; nothing was recorded."""


class ReservationGoneError(Exception):
    """The reservation being filled expired (and was swept) while its
    content arrived; nothing was recorded."""


@attrs.frozen
class UploadWindow:
    """A quota as the database checks it: at most ``max_bytes`` of a user's
    local media created after ``since_ts`` (ms)."""

    since_ts: int
    max_bytes: int


# The class of PostgreSQL advisory locks (two-key form) serialising one
# user's quota-checked inserts; the second key is the user's hash.
_QUOTA_LOCK_CLASS = 0x6D717561


def _fits_windows_sql(
    user_id: str | None, length: int, windows: Sequence[UploadWindow]
) -> tuple[str, tuple[object, ...]]:
    """A condition (and its parameters) that ``length`` more bytes of
    ``user_id`` fit in every window. Reservations count nothing."""
    sql = " AND ".join(
        "(SELECT COALESCE(SUM(media_length), 0) FROM local_media_repository"
        " WHERE user_id = ? AND created_ts > ?) + ? <= ?"
        for _ in windows
    )
    args: tuple[object, ...] = ()
    for window in windows:
        args += (user_id, window.since_ts, length, window.max_bytes)
    return sql, args


def _serialise_quota_txn(t: Transaction, user_id: str) -> None:
    """Make the quota check and the row it admits one step per user across
    every process on the database, until the transaction ends.

    PostgreSQL: a transaction advisory lock (released by the commit, so the
    next holder's check sees this row). SQLite: nothing to do; the
    quota-checked statements are single writing statements, which SQLite
    runs one at a time under its write lock."""
    if t.engine.name != "psycopg2":
        return
    # The lock's second key is an int4.
    key = zlib.crc32(user_id.encode("utf-8")) - 2**31
    t.execute("SELECT pg_advisory_xact_lock(?, ?)", (_QUOTA_LOCK_CLASS, key))


@attrs.frozen
class KnownContent:
    """What the database knows of some bytes, found by their SHA-256."""

    # Local media holding them (not URL previews, not quarantined), at most five.
    copies: list[str]
    # Whether any media (local or cached remote) with them is quarantined.
    quarantined: bool


# -- the statements of an upload, run together in one trip to the pool ----------
# (see LocalUploads.complete_upload): a trip costs more than a statement.


def known_content_txn(
    t: Transaction, sha256: str, length: int, *, check_quarantine: bool
) -> KnownContent:
    """What is known of these bytes, in one statement; quarantine is only
    looked up if asked."""
    sql = (
        "SELECT media_id FROM (SELECT media_id FROM local_media_repository"
        " WHERE sha256 = ? AND media_length = ? AND url_cache IS NULL"
        " AND quarantined_by IS NULL LIMIT 5) AS copies"
    )
    args: tuple[object, ...] = (sha256, length)
    if check_quarantine:
        # A row with a NULL media ID says "quarantined".
        sql += f" UNION ALL SELECT NULL FROM ({HASH_QUARANTINED_SQL}) AS quarantined"
        args += (sha256, sha256)
    t.execute(sql, args)
    rows = t.fetchall()
    copies = [row[0] for row in rows if row[0] is not None]
    return KnownContent(copies, quarantined=len(copies) < len(rows))


def store_local_media_txn(
    t: Transaction, media: LocalMedia, windows: Sequence[UploadWindow] = ()
) -> bool:
    """Insert a finished upload's row, as Synapse's ``store_local_media``
    does; with quota ``windows``, only if its length fits them all (else
    ``False``; run it after :func:`_serialise_quota_txn`)."""
    columns = (
        "INSERT INTO local_media_repository (media_id, media_type, created_ts,"
        " upload_name, media_length, user_id, url_cache, authenticated, sha256,"
        " quarantined_by)"
    )
    values = (media.media_id, media.media_type, media.created_ts, media.upload_name,
              media.media_length, media.user_id, media.url_cache, media.authenticated,
              media.sha256, media.quarantined_by)  # fmt: skip
    if not windows:
        t.execute(f"{columns} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values)
        return True
    fits, fits_args = _fits_windows_sql(media.user_id, media.media_length or 0, windows)
    t.execute(f"{columns} SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ? WHERE {fits}", (*values, *fits_args))
    return t.rowcount == 1


def _fill_reserved_media_txn(
    t: Transaction, media: LocalMedia, windows: Sequence[UploadWindow] = ()
) -> bool:
    """Give a reservation its content; ``False`` if it had content already
    (or is gone), or, with quota ``windows``, if the length does not fit
    them (see :func:`store_local_media_txn`)."""
    fits, fits_args = _fits_windows_sql(media.user_id, media.media_length or 0, windows)
    t.execute(
        "UPDATE local_media_repository SET media_type = ?, upload_name = ?,"
        " media_length = ?, url_cache = NULL, sha256 = ?,"
        " quarantined_by = COALESCE(?, quarantined_by)"
        " WHERE media_id = ? AND media_length IS NULL" + (f" AND {fits}" if fits else ""),
        (media.media_type, media.upload_name, media.media_length, media.sha256,
         media.quarantined_by, media.media_id, *fits_args),
    )  # fmt: skip
    return t.rowcount == 1


def _is_pending_txn(t: Transaction, media_id: str) -> bool:
    """Whether ``media_id`` is a reservation still waiting for content."""
    t.execute(
        "SELECT 1 FROM local_media_repository WHERE media_id = ? AND media_length IS NULL",
        (media_id,),
    )
    return t.fetchone() is not None


@attrs.frozen
class NewUpload:
    """What recording an upload needs."""

    # The row to write; its ``quarantined_by`` is decided by the content
    # lookup (bytes quarantined elsewhere are stored quarantined, as
    # Synapse does).
    media: LocalMedia
    # The user's quota, checked in the statement writing the row (none: no quota).
    windows: tuple[UploadWindow, ...] = ()
    # Whether the quarantine of the bytes may be looked up at all.
    check_quarantine: bool = False
    # Filling a reservation held under this lock, released with the row;
    # ``None``: a new media ID.
    reservation_lock: LockToken | None = None
    # Written with the row, unless the bytes turn out quarantined (no
    # thumbnails are made of those).
    thumbnails_owed: PendingThumbnails | None = None


@attrs.frozen
class StoredUpload:
    media: LocalMedia  # the row as recorded
    shared: bool  # whether the placement linked bytes already stored


# The file-placement step: given what is known of the content, make the
# file durable and link it into place (blocking; it runs on the pool
# thread, inside the transaction); returns whether it shared the bytes of
# a copy already stored.
PlaceFile = Callable[[KnownContent], bool]


class UploadRows:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def take_reservation_lock(
        self, claim: LockClaim, media_id: str
    ) -> tuple[bool, LocalMedia | None]:
        """Take the lock guarding a reservation's content and read its row,
        in one transaction: whether the lock was taken, and the row (if the
        lock was taken and the row exists)."""

        def take(t: Transaction) -> tuple[bool, LocalMedia | None]:
            commit_unflushed_txn(t)
            if not take_lock_txn(t, claim):
                return False, None
            return True, get_local_media_txn(t, media_id)

        return await self._db.run_interaction("try_acquire_lock", take)

    async def store(
        self, upload: NewUpload, place: PlaceFile, after_commit: Callable[[], None]
    ) -> StoredUpload:
        """Look the content up, place the file, write the rows, commit, then
        ``after_commit`` (removing the staging name), in one trip to the pool.
        Raises :class:`UploadOverQuotaError` or :class:`ReservationGoneError`
        (rolled back; the placed file is the caller's to remove)."""

        def txn(t: Transaction) -> StoredUpload:
            stored = _look_up_and_place_txn(t, upload, place)
            _record_txn(t, upload, stored.media)
            return stored

        return await self._db.run_interaction(
            "store_upload", txn, after_commit=lambda _: after_commit()
        )

    async def place(self, upload: NewUpload, place: PlaceFile) -> StoredUpload:
        """The first half of :meth:`store`, writing nothing: for storage
        providers that must have the file before the row exists."""
        return await self._db.run_interaction(
            "store_upload", lambda t: _look_up_and_place_txn(t, upload, place)
        )

    async def record(
        self, upload: NewUpload, placed: StoredUpload, after_commit: Callable[[], None]
    ) -> None:
        """The second half of :meth:`store`, for a file :meth:`place` placed."""
        await self._db.run_interaction(
            "record_upload",
            lambda t: _record_txn(t, upload, placed.media),
            after_commit=lambda _: after_commit(),
        )


def _look_up_and_place_txn(t: Transaction, upload: NewUpload, place: PlaceFile) -> StoredUpload:
    media = upload.media
    known = known_content_txn(
        t, media.sha256 or "", media.media_length or 0, check_quarantine=upload.check_quarantine
    )
    # Files linked into place are not undone by a rollback: the placement
    # is not repeated on a new connection, and the caller removes the file.
    t.outside_effects = True
    shared = place(known)
    quarantined_by = QUARANTINED_BY_SYSTEM if known.quarantined else None
    return StoredUpload(attrs.evolve(media, quarantined_by=quarantined_by), shared)


def _record_txn(t: Transaction, upload: NewUpload, media: LocalMedia) -> None:
    if upload.thumbnails_owed is not None and media.quarantined_by is None:
        record_pending_thumbnails_txn(t, upload.thumbnails_owed)
    if upload.windows:
        _serialise_quota_txn(t, media.user_id or "")
    lock = upload.reservation_lock
    if lock is None:
        if not store_local_media_txn(t, media, upload.windows):
            raise UploadOverQuotaError()
    elif _fill_reserved_media_txn(t, media, upload.windows):
        announce_content_txn(t, media.media_id)
        release_lock_txn(t, lock)
    elif upload.windows and _is_pending_txn(t, media.media_id):
        raise UploadOverQuotaError()
    else:
        # Swept as expired while the body arrived.
        raise ReservationGoneError()
