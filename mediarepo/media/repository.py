"""MediaRepository: the coordinator the HTTP resources call.

It knows the rules for reading media (who may see what, when media counts
as uploaded) and delegates bytes to :class:`ProviderChain`, rows to the
storage layer, thumbnail requests to :class:`ThumbnailServing` and other
servers' media to :class:`RemoteMediaCache`. Uploads are not its work: the
upload resource calls :class:`LocalUploads` itself.
"""

from __future__ import annotations

import logging

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from mediarepo.config import Config
from mediarepo.errors import Codes, MatrixError, NotFoundError
from mediarepo.media.access import AccessTracker
from mediarepo.media.cache import ExpiringCache
from mediarepo.media.events import MediaEvent, emit
from mediarepo.media.paths import (
    is_valid_media_id,
    local_media_path,
    local_thumbnail_dir,
    remote_media_path,
    url_cache_path,
)
from mediarepo.media.pending import ContentArrivals
from mediarepo.media.provider_chain import ProviderChain, StoredFile
from mediarepo.media.remote import RemoteAccess, RemoteMediaCache
from mediarepo.media.thumbnail_serving import ThumbnailResponse, ThumbnailServing
from mediarepo.media.thumbnail_sizes import ThumbnailRequest
from mediarepo.media.thumbnail_sources import LocalThumbnailSource, RemoteThumbnailSource
from mediarepo.media.thumbnails import METADATA_CACHE_SECONDS, ThumbnailMaker
from mediarepo.media.uploads import LocalUploads
from mediarepo.storage.media_rows import MediaRows
from mediarepo.storage.notifications import ALL_MEDIA_CHANGED
from mediarepo.values import LocalMedia

logger = logging.getLogger(__name__)


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
        storage: ProviderChain,
        media_store: MediaRows,
        uploads: LocalUploads,
        thumbnails: ThumbnailMaker,
        remote: RemoteMediaCache,
        arrivals: ContentArrivals,
        clock: IReactorTime,
    ) -> None:
        self.config = config
        self.server_name = config.server_name
        self.storage = storage
        # Which reservations have expired.
        self._uploads = uploads
        self.thumbnails = thumbnails
        self._thumbnail_serving = ThumbnailServing(thumbnails, storage)
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
        self.clock = clock

    def _now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

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
        await self.storage.delete_local(
            [local_media_path(media_id)], [local_thumbnail_dir(media_id)]
        )

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
            if self._uploads.reservation_expired(media):
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
        :meth:`ProviderChain.redirect_url`."""
        return await self.storage.redirect_url(file, content_type, content_disposition)

    async def get_remote_thumbnail(
        self, origin: str, media_id: str, request: ThumbnailRequest, access: RemoteAccess
    ) -> ThumbnailResponse:
        """A thumbnail of another server's media, made here from the cached
        original (remote servers are never asked for thumbnails)."""
        media = await self.remote.get(origin, media_id, access)
        self.access.read_remote(origin, media_id)
        source = RemoteThumbnailSource(media, self._media_store)
        return await self._thumbnail_serving.thumbnail(source, request)

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
        return await self._thumbnail_serving.thumbnail(
            LocalThumbnailSource(media, self._media_store, self.thumbnails.local_rows), request
        )

    async def resume_thumbnails(self) -> None:
        """Resume thumbnail pre-generation that crashed processes (or lapsed
        leases) left; see :class:`PendingThumbnailWork`."""
        self.thumbnails.resume_pending()
