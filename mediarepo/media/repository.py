"""MediaRepository: the coordinator the HTTP resources call.

It knows the rules (who may see what, when media counts as uploaded) and
delegates bytes to :class:`MediaStorage` and rows to the storage layer.
"""

from __future__ import annotations

import logging

import attrs
from prometheus_client import Counter
from twisted.internet import task
from twisted.internet.interfaces import IReactorTime

from mediarepo.config import Config
from mediarepo.errors import Codes, MatrixError, NotFoundError
from mediarepo.media.paths import (
    is_valid_media_id,
    local_media_path,
    random_media_id,
    url_cache_path,
)
from mediarepo.media.providers.local import FileExistsInStoreError
from mediarepo.media.responder import Responder
from mediarepo.media.storage import MediaStorage
from mediarepo.media.thumbnails import ThumbnailProvider, ThumbnailRequest, ThumbnailResponse
from mediarepo.media.upload_sink import UploadSink
from mediarepo.storage.media import MediaStore
from mediarepo.values import LocalMedia, Requester

logger = logging.getLogger(__name__)

uploads_completed = Counter("mediarepo_uploads_total", "Uploads stored")
bytes_uploaded = Counter("mediarepo_media_bytes_uploaded_total", "Bytes of media stored by uploads")

# How long a staging file may sit untouched before it counts as abandoned.
STAGING_MAX_AGE_SECONDS = 3600.0
# Synapse polls a pending upload this often while a download waits for it.
_PENDING_POLL_SECONDS = 0.5
# Pending uploads expire this long after creation (Synapse's unused_expiration_time).
_UNUSED_EXPIRATION_MS = 24 * 60 * 60 * 1000


@attrs.frozen
class MediaDownload:
    media: LocalMedia
    responder: Responder


class MediaRepository:
    def __init__(
        self,
        config: Config,
        storage: MediaStorage,
        media_store: MediaStore,
        thumbnails: ThumbnailProvider,
        clock: IReactorTime,
    ) -> None:
        self.config = config
        self.server_name = config.server_name
        self.storage = storage
        self.thumbnails = thumbnails
        self._media_store = media_store
        self._clock = clock

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def mxc(self, media_id: str) -> str:
        return f"mxc://{self.server_name}/{media_id}"

    def begin_upload(self) -> UploadSink:
        """Reserve a media ID and a staging file for a new upload body."""
        return self.storage.begin_upload(random_media_id())

    def abandon_upload(self, sink: UploadSink) -> None:
        sink.abort()
        self.storage.end_upload(sink)

    async def complete_upload(
        self,
        sink: UploadSink,
        requester: Requester,
        media_type: str,
        upload_name: str | None,
    ) -> str:
        """Store a fully received body as new local media; returns its mxc URI.

        Order matters for crash safety: the file is fsynced and linked into
        place before the row exists, and the staging name is removed only
        after the row exists (see ``LocalMediaStore``).
        """
        relative_path = local_media_path(sink.media_id)
        published = False
        try:
            written = await sink.finish()
            await self.storage.publish(written, relative_path)
            published = True
            media = LocalMedia(
                media_id=sink.media_id,
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
            await self._media_store.store_local_media(media)
        except BaseException as e:
            if published:
                await self.storage.delete(relative_path)
            self.abandon_upload(sink)
            if isinstance(e, FileExistsInStoreError):
                # 24 random letters colliding with an existing file.
                raise MatrixError(500, Codes.UNKNOWN, "Media ID collision; retry") from e
            raise
        await self.storage.local.discard_staged(written.temp_path)
        self.storage.end_upload(sink)
        self.thumbnails.schedule_pregeneration(media)
        uploads_completed.inc()
        bytes_uploaded.inc(written.length)
        logger.info(
            "stored upload %s (%d bytes, %s) for %s",
            sink.media_id,
            written.length,
            media_type,
            requester.user_id,
        )
        return self.mxc(sink.media_id)

    async def _visible_local_media(
        self, media_id: str, *, allow_authenticated: bool, timeout_ms: int
    ) -> LocalMedia:
        """The row of local media the request may see, or a 404.

        A pending async upload is waited for up to ``timeout_ms``.
        """
        if not is_valid_media_id(media_id) or len(media_id) < 5:
            raise NotFoundError()
        deadline = self._now_ms() + timeout_ms
        while True:
            media = await self._media_store.get_local_media(media_id)
            if media is None or media.quarantined_by is not None:
                raise NotFoundError()
            if not media.is_pending:
                break
            if media.created_ts < self._now_ms() - _UNUSED_EXPIRATION_MS:
                raise NotFoundError()
            if self._now_ms() >= deadline:
                raise MatrixError(504, Codes.NOT_YET_UPLOADED, "Media has not been uploaded yet")
            await task.deferLater(self._clock, _PENDING_POLL_SECONDS, lambda: None)

        if (
            not allow_authenticated
            and self.config.enable_authenticated_media
            and media.authenticated
        ):
            raise NotFoundError()
        return media

    async def get_local_media(
        self, media_id: str, *, allow_authenticated: bool, timeout_ms: int
    ) -> MediaDownload:
        """The row and the bytes of local media, checked for visibility."""
        media = await self._visible_local_media(
            media_id, allow_authenticated=allow_authenticated, timeout_ms=timeout_ms
        )
        path = url_cache_path(media_id) if media.url_cache else local_media_path(media_id)
        responder = await self.storage.fetch(path)
        if responder is None:
            logger.warning("media %s has a row but no file in any provider", media_id)
            raise NotFoundError()
        return MediaDownload(media=media, responder=responder)

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
        return await self.thumbnails.local_thumbnail(media, request)

    async def sweep_staging(self) -> int:
        """Remove what crashed uploads left behind; see ``LocalMediaStore.sweep_staging``."""
        return await self.storage.local.sweep_staging(
            STAGING_MAX_AGE_SECONDS,
            self.storage.staging_paths_in_use,
            self._media_store.local_media_exist,
        )
