"""Media whose thumbnails are made: where its bytes and its thumbnails'
files live (Synapse's paths), and where its thumbnail rows are read and
recorded. Local media (uploads and URL-preview downloads) and cached
remote media differ in all three."""

from __future__ import annotations

import abc

from mediarepo.media.cache import ExpiringCache
from mediarepo.media.paths import (
    local_media_path,
    local_thumbnail_path,
    remote_media_path,
    remote_thumbnail_path,
    url_cache_path,
    url_cache_thumbnail_path,
)
from mediarepo.media.thumbnail_sizes import ThumbnailSpec
from mediarepo.storage.media_rows import MediaRows
from mediarepo.storage.pending_thumbnail_rows import LOCAL_ORIGIN
from mediarepo.values import LocalMedia, RemoteMedia, ThumbnailInfo


class ThumbnailSource(abc.ABC):
    """Media whose thumbnails are made: where its bytes and thumbnails live
    and where its thumbnails are recorded (local and remote media differ)."""

    # Names the media in logs and keys the work done on it.
    key: str
    # The media, as events name it (origin None for local media).
    media_id: str
    origin: str | None
    # (origin, media ID) in mediarepo_pending_thumbnails.
    pending_key: tuple[str, str]
    media_type: str | None
    content_path: str

    @abc.abstractmethod
    def thumbnail_path(self, spec: ThumbnailSpec | ThumbnailInfo) -> str: ...

    @abc.abstractmethod
    async def rows(self) -> list[ThumbnailInfo]: ...

    @abc.abstractmethod
    async def record(self, info: ThumbnailInfo) -> bool:
        """Record a thumbnail made; False if the media is gone meanwhile."""


class LocalThumbnailSource(ThumbnailSource):
    def __init__(
        self,
        media: LocalMedia,
        media_store: MediaRows,
        row_cache: ExpiringCache[str, list[ThumbnailInfo]] | None = None,
    ) -> None:
        self._media = media
        self._media_store = media_store
        self._row_cache = row_cache
        self.key = media.media_id
        self.media_id = media.media_id
        self.origin = None
        self.pending_key = (LOCAL_ORIGIN, media.media_id)
        self.media_type = media.media_type
        # A URL preview's download keeps its file and thumbnails apart.
        self._url_cache = media.url_cache is not None
        self.content_path = (url_cache_path if self._url_cache else local_media_path)(
            media.media_id
        )

    def thumbnail_path(self, spec: ThumbnailSpec | ThumbnailInfo) -> str:
        path = url_cache_thumbnail_path if self._url_cache else local_thumbnail_path
        return path(self._media.media_id, spec.width, spec.height, spec.type, spec.method)

    async def rows(self) -> list[ThumbnailInfo]:
        media_id = self._media.media_id
        cached = self._row_cache.get(media_id) if self._row_cache is not None else None
        if cached is not None:
            return cached
        rows = await self._media_store.get_local_thumbnails(media_id)
        if self._row_cache is not None:
            self._row_cache.put(media_id, rows)
        return rows

    async def record(self, info: ThumbnailInfo) -> bool:
        recorded = await self._media_store.store_local_thumbnail(self._media.media_id, info)
        if self._row_cache is not None:
            self._row_cache.forget(self._media.media_id)
        return recorded


class RemoteThumbnailSource(ThumbnailSource):
    """Remote media, thumbnailed here from the cached original as Synapse does."""

    def __init__(self, media: RemoteMedia, media_store: MediaRows) -> None:
        self._media = media
        self._media_store = media_store
        self.key = f"{media.media_origin}/{media.media_id}"
        self.media_id = media.media_id
        self.origin = media.media_origin
        self.pending_key = (media.media_origin, media.media_id)
        self.media_type = media.media_type
        self.content_path = remote_media_path(media.media_origin, media.filesystem_id)

    def thumbnail_path(self, spec: ThumbnailSpec | ThumbnailInfo) -> str:
        media = self._media
        return remote_thumbnail_path(
            media.media_origin, media.filesystem_id, spec.width, spec.height, spec.type,
            spec.method,
        )  # fmt: skip

    async def rows(self) -> list[ThumbnailInfo]:
        return await self._media_store.get_remote_thumbnails(
            self._media.media_origin, self._media.media_id
        )

    async def record(self, info: ThumbnailInfo) -> bool:
        media = self._media
        return await self._media_store.store_remote_thumbnail(
            media.media_origin, media.media_id, media.filesystem_id, info
        )
