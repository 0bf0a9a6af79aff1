"""Local uploads: the media IDs they get, the bodies they stage, the
quota they are held to, and their recording by the storage layer.

The upload resource (``http/upload.py``) and the site's rollback of a
refused body call it directly; the periodic sweeps call it too.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from mediarepo.config import Config
from mediarepo.errors import Codes, MatrixError, NotFoundError
from mediarepo.media.events import MediaEvent, emit
from mediarepo.media.locks import HeldLock, WorkerLocks
from mediarepo.media.paths import is_valid_media_id, local_media_path, random_media_id
from mediarepo.media.pending import ContentArrivals
from mediarepo.media.provider_chain import ProviderChain
from mediarepo.media.quota import QuotaHold, UploadQuota, quota_exceeded
from mediarepo.media.ratelimit import Ratelimiter, limit_exceeded
from mediarepo.media.staging import FileExistsInStoreError
from mediarepo.media.thumbnail_sources import LocalThumbnailSource
from mediarepo.media.thumbnails import ThumbnailMaker
from mediarepo.media.upload_sink import UploadSink, WrittenUpload
from mediarepo.storage.media_rows import MediaRows
from mediarepo.storage.pending_thumbnail_rows import LOCAL_ORIGIN
from mediarepo.storage.quarantine_rows import QuarantineRows
from mediarepo.storage.upload_rows import (
    KnownContent,
    NewUpload,
    ReservationGoneError,
    StoredUpload,
    UploadOverQuotaError,
    UploadRows,
)
from mediarepo.values import LocalMedia, Requester

logger = logging.getLogger(__name__)

bytes_uploaded = Counter("mediarepo_media_bytes_uploaded_total", "Bytes of media stored by uploads")

# How long a staging file may sit untouched before it counts as abandoned.
STAGING_MAX_AGE_SECONDS = 3600.0
# How many expired reservations one sweep transaction removes.
_RESERVATION_SWEEP_BATCH = 500
# The lock Synapse takes (with the media ID as key) while content is put
# into a reservation.
UPLOAD_LOCK_NAME = "upload_media"


class LocalUploads:
    def __init__(
        self,
        config: Config,
        storage: ProviderChain,
        media_store: MediaRows,
        uploads: UploadRows,
        thumbnails: ThumbnailMaker,
        locks: WorkerLocks,
        quarantine: QuarantineRows,
        arrivals: ContentArrivals,
        clock: IReactorTime,
    ) -> None:
        self.config = config
        self.server_name = config.server_name
        self.storage = storage
        self._media_store = media_store
        self._uploads = uploads
        self.thumbnails = thumbnails
        self._locks = locks
        self._quarantine = quarantine
        self.arrivals = arrivals
        self.clock = clock
        self._create_limiter = Ratelimiter(config.rc_media_create, clock)
        self.quota = UploadQuota(config.media_upload_limits, media_store, clock)
        # Uploads into reservations, with the lock each holds.
        self._reserved_uploads: dict[UploadSink, HeldLock] = {}
        # Uploads whose declared length is held against their user's quota.
        self._quota_holds: dict[UploadSink, QuotaHold] = {}

    def _now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    def mxc(self, media_id: str) -> str:
        return f"mxc://{self.server_name}/{media_id}"

    async def begin_upload(
        self, uploader: Requester | None = None, declared_length: int | None = None
    ) -> UploadSink:
        """Reserve a media ID and a staging file for a new upload body; with
        the uploader and the body's declared length known (and quotas on),
        the length is checked against, and held in, their quota first."""
        hold = await self._hold_quota(uploader, declared_length)
        try:
            sink = self.storage.begin_upload(random_media_id())
        except BaseException:
            if hold is not None:
                hold.release()
            raise
        if hold is not None:
            self._quota_holds[sink] = hold
        return sink

    async def _hold_quota(
        self, uploader: Requester | None, declared_length: int | None
    ) -> QuotaHold | None:
        if uploader is None or declared_length is None or not self.quota.enabled:
            return None
        return await self.quota.hold(uploader.user_id, declared_length)

    def abandon_upload(self, sink: UploadSink) -> defer.Deferred[None]:
        """Roll an upload back; the Deferred fires once its staging file is
        gone (a request refused after its body arrived answers only then)."""
        removed = sink.abort()
        self.storage.end_upload(sink)
        self._release_reservation_lock(sink)
        self._release_quota(sink)
        return removed

    def _release_quota(self, sink: UploadSink) -> None:
        hold = self._quota_holds.pop(sink, None)
        if hold is not None:
            hold.release()

    def _release_reservation_lock(self, sink: UploadSink) -> None:
        lock = self._reserved_uploads.pop(sink, None)
        if lock is not None:
            defer.ensureDeferred(lock.release()).addErrback(
                lambda f: logger.warning("releasing the upload lock failed: %s", f.value)
            )

    async def create_media_id(self, requester: Requester) -> tuple[str, int]:
        """Reserve a media ID for content ``requester`` uploads later;
        returns its mxc URI and when it expires unused (ms)."""
        self._create_limiter.check(requester.user_id)
        now = self._now_ms()
        expiry = self.config.unused_expiration_time_ms
        media_id = random_media_id()
        reserved = await self._media_store.reserve_local_media(
            media_id,
            requester.user_id,
            now,
            self.config.enable_authenticated_media,
            max_pending=self.config.max_pending_media_uploads,
            pending_after=now - expiry,
        )
        if not reserved:
            _, oldest = await self._media_store.count_pending_media(requester.user_id, now - expiry)
            raise limit_exceeded((oldest or now) + expiry - now)
        return self.mxc(media_id), now + expiry

    async def begin_reserved_upload(
        self,
        requester: Requester,
        server_name: str,
        media_id: str,
        declared_length: int | None = None,
    ) -> UploadSink:
        """Accept the content of a reservation, checked (in Synapse's order,
        the quota last) before any of it is read. The upload lock is held
        until the upload is completed or abandoned."""
        if server_name != self.server_name:
            raise NotFoundError("Non-local server name specified")
        if not is_valid_media_id(media_id) or len(media_id) < 5:
            raise NotFoundError("Unknown media ID")
        lock, media = await self._locks.try_lock_then(
            UPLOAD_LOCK_NAME,
            media_id,
            lambda claim: self._uploads.take_reservation_lock(claim, media_id),
        )
        if lock is None:
            raise MatrixError(409, Codes.CANNOT_OVERWRITE_MEDIA, "Media ID cannot be overwritten")
        try:
            if media is None:
                raise NotFoundError("Unknown media ID")
            if media.user_id != requester.user_id:
                raise MatrixError(
                    403, Codes.FORBIDDEN, "Only the creator of the media ID can upload to it"
                )
            if not media.is_pending:
                raise MatrixError(409, Codes.CANNOT_OVERWRITE_MEDIA, "Media ID already has content")
            if self.reservation_expired(media):
                raise NotFoundError("Media ID has expired")
            hold = await self._hold_quota(requester, declared_length)
        except BaseException:
            await lock.release()
            raise
        sink = self.storage.begin_upload(media_id)
        self._reserved_uploads[sink] = lock
        if hold is not None:
            self._quota_holds[sink] = hold
        return sink

    def reservation_expired(self, media: LocalMedia) -> bool:
        """Whether a reservation without content has expired."""
        return media.created_ts < self._now_ms() - self.config.unused_expiration_time_ms

    async def sweep_expired_reservations(self) -> int:
        """Delete reservations that expired without content (Synapse keeps
        them for ever); rows with content are never touched."""
        before = self._now_ms() - self.config.unused_expiration_time_ms
        removed = 0
        while True:
            batch = await self._media_store.delete_expired_reservations(
                before, _RESERVATION_SWEEP_BATCH
            )
            removed += len(batch)
            if len(batch) < _RESERVATION_SWEEP_BATCH:
                break
        if removed:
            logger.info("removed %d expired media reservations", removed)
        return removed

    async def complete_upload(
        self,
        sink: UploadSink,
        requester: Requester,
        media_type: str,
        upload_name: str | None,
    ) -> str:
        """Store a fully received body as local media, new or the content of
        a reservation; returns its mxc URI.

        The storage layer records it in one transaction with our file
        placement step inside (see ``storage/upload_rows.py`` for the order
        that makes it crash-safe). Storage providers that keep copies get
        the file between placing it and recording it, in a second trip.
        """
        relative_path = local_media_path(sink.media_id)
        # An upload into a reservation holds its lock until the row has the content.
        reservation_lock = self._reserved_uploads.get(sink)
        placed = False
        try:
            # A full disk fails the upload with 507 (logged once, not per request).
            with self.storage.full.converting("upload"):
                written = await sink.finish()
            upload = await self._new_upload(sink.media_id, written, requester, media_type,
                                            upload_name, reservation_lock)  # fmt: skip

            def place(known: KnownContent) -> bool:
                nonlocal placed
                same_as = [local_media_path(m) for m in known.copies if m != sink.media_id]
                # A reservation's row has no content (checked under its lock):
                # a file already there was left by an upload that crashed.
                shared = self.storage.place_upload(
                    written, relative_path, same_as, replace_orphan=reservation_lock is not None
                )
                placed = True
                return shared

            def remove_staged() -> None:
                self.storage.remove_staged(written)

            providers_first = self.storage.providers_want(relative_path)
            with self.storage.full.converting("upload"):
                if providers_first:
                    stored = await self._uploads.place(upload, place)
                else:
                    stored = await self._uploads.store(upload, place, remove_staged)
            if providers_first:
                await self.storage.to_providers(
                    relative_path, self.storage.local_file(relative_path)
                )
                await self._uploads.record(upload, stored, remove_staged)
        except BaseException as e:
            if placed:
                await self.storage.delete(relative_path)
            await self.abandon_upload(sink)
            refusal = _upload_refusal(e, reserved=reservation_lock is not None)
            if refusal is None:
                raise
            raise refusal from e
        self._uploaded(sink, stored, requester, reservation_lock)
        return self.mxc(sink.media_id)

    async def _new_upload(
        self,
        media_id: str,
        written: WrittenUpload,
        requester: Requester,
        media_type: str,
        upload_name: str | None,
        reservation_lock: HeldLock | None,
    ) -> NewUpload:
        """What the storage layer records for an upload."""
        # The quota is checked by the database with the row, per user
        # one at a time (see media/quota.py).
        windows = self.quota.windows() if self.quota.enabled else ()
        media = LocalMedia(
            media_id=media_id,
            media_type=media_type,
            media_length=written.length,
            created_ts=self._now_ms(),
            upload_name=upload_name,
            user_id=requester.user_id,
            quarantined_by=None,
            url_cache=None,
            last_access_ts=None,
            safe_from_quarantine=False,
            authenticated=self.config.enable_authenticated_media,
            sha256=written.sha256,
        )
        return NewUpload(
            media,
            windows,
            check_quarantine=await self._quarantine.hash_lookups_possible(),
            reservation_lock=reservation_lock.token if reservation_lock is not None else None,
            thumbnails_owed=(
                self.thumbnails.pending.owed(LOCAL_ORIGIN, media_id)
                if self.thumbnails.pregenerates(media_type)
                else None
            ),
        )

    def _uploaded(
        self,
        sink: UploadSink,
        stored: StoredUpload,
        requester: Requester,
        reservation_lock: HeldLock | None,
    ) -> None:
        """What follows a recorded upload: the sink, quota and lock let go,
        waiting downloads woken, thumbnails scheduled, events."""
        media = stored.media
        quarantined = media.quarantined_by is not None
        self.storage.end_upload(sink)
        self._release_quota(sink)
        if reservation_lock is not None:
            del self._reserved_uploads[sink]
            # Released in the transaction that recorded the content.
            reservation_lock.forget()
            self.arrivals.announce(sink.media_id)
        if not quarantined:
            self.thumbnails.schedule_pregeneration(
                LocalThumbnailSource(media, self._media_store, self.thumbnails.local_rows)
            )
        length = media.media_length or 0
        bytes_uploaded.inc(length)
        emit(
            MediaEvent.UPLOADED,
            media_id=sink.media_id,
            length=length,
            media_type=media.media_type,
            sha256=media.sha256,
            user_id=requester.user_id,
            quarantined=quarantined,
        )
        if stored.shared:
            emit(MediaEvent.DEDUPLICATED, media_id=sink.media_id, sha256=media.sha256)

    async def sweep_staging(self) -> int:
        """Remove what crashed uploads left behind; see ``UploadStaging.sweep``."""
        return await self.storage.sweep_staging(
            STAGING_MAX_AGE_SECONDS, self._media_store.media_ids_with_content
        )


def _upload_refusal(error: BaseException, *, reserved: bool) -> MatrixError | None:
    """The Matrix error a refusal of the storage layer answers; ``None``
    for other errors (raised as they are)."""
    if isinstance(error, UploadOverQuotaError):
        return quota_exceeded()
    if isinstance(error, ReservationGoneError):
        return NotFoundError("Media ID has expired")
    if isinstance(error, FileExistsInStoreError):
        if reserved:
            return MatrixError(409, Codes.CANNOT_OVERWRITE_MEDIA, "Media ID already has content")
        # 24 random letters colliding with an existing file.
        return MatrixError(500, Codes.UNKNOWN, "Media ID collision; retry")
    return None
