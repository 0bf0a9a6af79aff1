"""MediaRepository: the coordinator the HTTP resources call.

It knows the rules (who may see what, when media counts as uploaded) and
delegates bytes to :class:`MediaStorage` and rows to the storage layer.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import attrs
from prometheus_client import Counter
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from mediarepo.config import Config
from mediarepo.errors import Codes, MatrixError, NotFoundError
from mediarepo.media.access import AccessTracker
from mediarepo.media.cache import ExpiringCache
from mediarepo.media.events import MediaEvent, emit
from mediarepo.media.locks import HeldLock, WorkerLocks
from mediarepo.media.paths import (
    is_valid_media_id,
    local_media_path,
    local_thumbnail_dir,
    random_media_id,
    remote_media_path,
    url_cache_path,
)
from mediarepo.media.pending import ContentArrivals
from mediarepo.media.providers.local import FileExistsInStoreError
from mediarepo.media.quota import QuotaHold, UploadQuota, quota_exceeded
from mediarepo.media.ratelimit import Ratelimiter, limit_exceeded
from mediarepo.media.remote import RemoteAccess, RemoteMediaCache
from mediarepo.media.storage import MediaStorage, StoredFile
from mediarepo.media.thumbnail_sizes import ThumbnailRequest
from mediarepo.media.thumbnails import (
    METADATA_CACHE_SECONDS,
    LocalThumbnailSource,
    RemoteThumbnailSource,
    ThumbnailProvider,
    ThumbnailResponse,
)
from mediarepo.media.upload_sink import UploadSink
from mediarepo.storage.database import Transaction
from mediarepo.storage.media import (
    MediaStore,
    announce_content_txn,
    fill_reserved_media_txn,
    get_local_media_txn,
    is_pending_txn,
    known_content_txn,
    quota_serialised_txn,
    store_local_media_txn,
)
from mediarepo.storage.notifications import ALL_MEDIA_CHANGED
from mediarepo.storage.pending_thumbnails import LOCAL_ORIGIN
from mediarepo.storage.quarantine import QUARANTINED_BY_SYSTEM, QuarantineStore
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


@attrs.frozen
class MediaDownload:
    """Media's bytes (not yet opened), with what the response headers are made from."""

    media_type: str | None
    upload_name: str | None
    file: StoredFile


class MediaRepository:
    def __init__(
        self,
        config: Config,
        storage: MediaStorage,
        media_store: MediaStore,
        thumbnails: ThumbnailProvider,
        remote: RemoteMediaCache,
        locks: WorkerLocks,
        quarantine: QuarantineStore,
        arrivals: ContentArrivals,
        clock: IReactorTime,
    ) -> None:
        self.config = config
        self._quarantine = quarantine
        self.server_name = config.server_name
        self.storage = storage
        self.thumbnails = thumbnails
        self.remote = remote
        # Content landing here or announced by other processes: async
        # uploads, and remote media (see RemoteMediaCache).
        self.arrivals = arrivals
        self.access = AccessTracker(media_store, clock)
        # Rows of local media with content, read on every download.
        self._media_rows: ExpiringCache[str, LocalMedia] = ExpiringCache(
            clock, METADATA_CACHE_SECONDS
        )
        self._media_store = media_store
        self._locks = locks
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

    def forget_local(self, media_id: str) -> None:
        """Drop what is cached of a local media whose rows changed here."""
        self._media_rows.forget(media_id)
        self.thumbnails.local_rows.forget(media_id)

    def media_changed_elsewhere(self, payload: str) -> None:
        """Another process deleted media or changed their quarantine (a
        notification's payload: "ORIGIN/MEDIA_ID", or "*" for any): what is
        cached here of them must not be served a moment longer. Only local
        media have rows cached."""
        if payload == ALL_MEDIA_CHANGED:
            self._media_rows.clear()
            self.thumbnails.local_rows.clear()
            return
        origin, _, media_id = payload.rpartition("/")
        if not origin:
            self.forget_local(media_id)
            if is_valid_media_id(media_id):
                defer.ensureDeferred(self._drop_local_copy_if_deleted(media_id)).addErrback(
                    lambda f: logger.warning("removing a deleted media's copy failed: %s", f.value)
                )

    async def _drop_local_copy_if_deleted(self, media_id: str) -> None:
        """Local media deleted through another instance: this host's copy
        and thumbnails go too (that instance removed its own, and the
        providers' through their queue). Quarantined media keeps them. Of
        remote media deleted elsewhere the path is gone with the row: the
        local cache's eviction removes those."""
        if await self._media_store.get_local_media(media_id) is not None:
            return
        await self.storage.local.delete(local_media_path(media_id))
        await self.storage.local.delete_directory(local_thumbnail_dir(media_id))

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
            UPLOAD_LOCK_NAME, media_id, lambda t: get_local_media_txn(t, media_id)
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
            if self._reservation_expired(media):
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

    def _reservation_expired(self, media: LocalMedia) -> bool:
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

        Order matters for crash safety: the file is fsynced and linked into
        place (and given to the providers that keep copies) before the row
        has it, and the staging name is removed only after (see
        ``LocalMediaStore``). Without such providers all of it, queries and
        files, is one trip to a database pool thread: on a busy server each
        trip to a pool costs more than the work done there.
        """
        relative_path = local_media_path(sink.media_id)
        # An upload into a reservation holds its lock until the row has the content.
        reservation_lock = self._reserved_uploads.get(sink)
        reserved = reservation_lock is not None
        local = self.storage.local
        providers_first = self.storage.providers_want(relative_path)
        placed = False
        try:
            # A full disk fails the upload with 507 (logged once, not per request).
            with self.storage.local.full.converting("upload"):
                written = await sink.finish()
            # The quota is checked by the database with the row, per user
            # one at a time (see media/quota.py).
            windows = self.quota.windows() if self.quota.enabled else ()
            check_quarantine = await self._quarantine.hash_lookups_possible()
            created_ts = self._now_ms()

            def place(t: Transaction) -> tuple[LocalMedia, bool]:
                nonlocal placed
                known = known_content_txn(
                    t, written.sha256, written.length, check_quarantine=check_quarantine
                )
                same_as = [local_media_path(m) for m in known.copies if m != sink.media_id]
                # A reservation's row has no content (checked under its lock):
                # a file already there was left by an upload that crashed.
                _, shared = local.place_upload(
                    written, relative_path, same_as, replace_orphan=reserved
                )
                placed = True
                media = LocalMedia(
                    media_id=sink.media_id,
                    media_type=media_type,
                    media_length=written.length,
                    created_ts=created_ts,
                    upload_name=upload_name,
                    user_id=requester.user_id,
                    # Bytes quarantined elsewhere are stored quarantined, as Synapse does.
                    quarantined_by=QUARANTINED_BY_SYSTEM if known.quarantined else None,
                    url_cache=None,
                    last_access_ts=None,
                    safe_from_quarantine=False,
                    authenticated=self.config.enable_authenticated_media,
                    sha256=written.sha256,
                )
                if not providers_first:
                    record(t, media)
                return media, shared

            def record(t: Transaction, media: LocalMedia) -> None:
                if media.quarantined_by is None and self.thumbnails.pregenerates(media_type):
                    # First: a crash after the row must not lose the thumbnails.
                    self.thumbnails.pending.record_txn(t, LOCAL_ORIGIN, media.media_id)
                with quota_serialised_txn(t, requester.user_id) if windows else nullcontext():
                    if reservation_lock is None:
                        if not store_local_media_txn(t, media, windows):
                            raise quota_exceeded()
                    elif fill_reserved_media_txn(t, media, windows):
                        announce_content_txn(t, media.media_id)
                        reservation_lock.release_txn(t)
                    elif windows and is_pending_txn(t, media.media_id):
                        raise quota_exceeded()
                    else:
                        # Swept as expired while the body arrived.
                        raise NotFoundError("Media ID has expired")
                local.remove_staged(written.temp_path)

            with self.storage.local.full.converting("upload"):
                media, shared = await self._media_store.run_statements("store_upload", place)
            if providers_first:
                await self.storage.to_providers(relative_path, local.paths.absolute(relative_path))
                await self._media_store.run_statements("record_upload", lambda t: record(t, media))
        except BaseException as e:
            if placed:
                await self.storage.delete(relative_path)
            await self.abandon_upload(sink)
            if isinstance(e, FileExistsInStoreError):
                if reserved:
                    raise MatrixError(
                        409, Codes.CANNOT_OVERWRITE_MEDIA, "Media ID already has content"
                    ) from e
                # 24 random letters colliding with an existing file.
                raise MatrixError(500, Codes.UNKNOWN, "Media ID collision; retry") from e
            raise
        quarantined = media.quarantined_by is not None
        self.storage.end_upload(sink)
        self._release_quota(sink)
        if reservation_lock is not None:
            del self._reserved_uploads[sink]
            reservation_lock.forget()
            self.arrivals.announce(sink.media_id)
        if not quarantined:
            self.thumbnails.schedule_pregeneration(
                LocalThumbnailSource(media, self._media_store, self.thumbnails.local_rows)
            )
        bytes_uploaded.inc(written.length)
        emit(
            MediaEvent.UPLOADED,
            media_id=sink.media_id,
            length=written.length,
            media_type=media_type,
            sha256=written.sha256,
            user_id=requester.user_id,
            quarantined=quarantined,
        )
        if shared:
            emit(MediaEvent.DEDUPLICATED, media_id=sink.media_id, sha256=written.sha256)
        return self.mxc(sink.media_id)

    async def _visible_local_media(
        self,
        media_id: str,
        *,
        allow_authenticated: bool,
        timeout_ms: int,
        bypass_quarantine: bool = False,
    ) -> LocalMedia:
        """The row of local media the request may see, or a 404.

        A pending async upload is waited for up to ``timeout_ms``.
        """
        if not is_valid_media_id(media_id) or len(media_id) < 5:
            raise NotFoundError()
        deadline = self._now_ms() + timeout_ms
        while True:
            cached = self._media_rows.get(media_id)
            media = cached or await self._media_store.get_local_media(media_id)
            if media is None:
                raise NotFoundError()
            if media.quarantined_by is not None and not bypass_quarantine:
                raise NotFoundError()
            if not media.is_pending:
                # Only a row just read: kept again on every read, a row read
                # all the time would never expire, and a change missed by
                # the announcements would never be seen.
                if cached is None:
                    self._media_rows.put(media_id, media)
                break
            if self._reservation_expired(media):
                raise NotFoundError()
            now = self._now_ms()
            if now >= deadline:
                raise MatrixError(504, Codes.NOT_YET_UPLOADED, "Media has not been uploaded yet")
            await self.arrivals.wait(
                media_id, min(self.arrivals.poll_seconds, (deadline - now) / 1000)
            )

        if (
            not allow_authenticated
            and self.config.enable_authenticated_media
            and media.authenticated
        ):
            raise NotFoundError()
        return media

    async def get_local_media(
        self,
        media_id: str,
        *,
        allow_authenticated: bool,
        timeout_ms: int,
        bypass_quarantine: bool = False,
    ) -> MediaDownload:
        """The row and the bytes of local media, checked for visibility."""
        media = await self._visible_local_media(
            media_id,
            allow_authenticated=allow_authenticated,
            timeout_ms=timeout_ms,
            bypass_quarantine=bypass_quarantine,
        )
        self.access.read_local(media_id)
        emit(MediaEvent.RETRIEVED, media_id=media_id, origin=None)
        path = url_cache_path(media_id) if media.url_cache else local_media_path(media_id)
        assert media.media_length is not None  # a pending upload was waited for
        return MediaDownload(
            media.media_type, media.upload_name, self.storage.stored_file(path, media.media_length)
        )

    async def get_remote_media(
        self, origin: str, media_id: str, access: RemoteAccess
    ) -> MediaDownload:
        """Another server's media, from the cache, fetched into it first if
        need be (and allowed)."""
        media = await self.remote.get(origin, media_id, access)
        self.access.read_remote(origin, media_id)
        emit(MediaEvent.RETRIEVED, media_id=media_id, origin=origin)
        path = remote_media_path(origin, media.filesystem_id)
        return MediaDownload(
            media.media_type, media.upload_name, self.storage.stored_file(path, media.media_length)
        )

    async def redirect_url(
        self, file: StoredFile, content_type: str, content_disposition: str
    ) -> str | None:
        """Where a client that allows redirects may fetch ``file`` (of media
        already found visible), with these headers; see
        :meth:`MediaStorage.redirect_url`."""
        return await self.storage.redirect_url(file, content_type, content_disposition)

    async def get_remote_thumbnail(
        self, origin: str, media_id: str, request: ThumbnailRequest, access: RemoteAccess
    ) -> ThumbnailResponse:
        """A thumbnail of another server's media, made here from the cached
        original (remote servers are never asked for thumbnails)."""
        media = await self.remote.get(origin, media_id, access)
        self.access.read_remote(origin, media_id)
        source = RemoteThumbnailSource(media, self._media_store)
        return await self.thumbnails.thumbnail(source, request)

    async def get_local_thumbnail(
        self,
        media_id: str,
        request: ThumbnailRequest,
        *,
        allow_authenticated: bool,
        timeout_ms: int,
    ) -> ThumbnailResponse:
        media = await self._visible_local_media(
            media_id, allow_authenticated=allow_authenticated, timeout_ms=timeout_ms
        )
        self.access.read_local(media_id)
        return await self.thumbnails.thumbnail(
            LocalThumbnailSource(media, self._media_store, self.thumbnails.local_rows), request
        )

    async def resume_thumbnails(self) -> None:
        """Resume thumbnail pre-generation that crashed processes (or lapsed
        leases) left; see :class:`PendingThumbnailWork`."""
        self.thumbnails.resume_pending()

    async def sweep_staging(self) -> int:
        """Remove what crashed uploads left behind; see ``LocalMediaStore.sweep_staging``."""
        return await self.storage.local.sweep_staging(
            STAGING_MAX_AGE_SECONDS,
            self.storage.staging_paths_in_use,
            self._media_store.media_ids_with_content,
        )
