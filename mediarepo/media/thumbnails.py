"""Thumbnails: making, storing, recording and serving them (which sizes,
and which stored one answers a request, is :mod:`mediarepo.media.thumbnail_sizes`).

Rows and files are Synapse's (same tables, same paths), so a Synapse sharing
the database and media store serves what we make. Where Synapse breaks the
Matrix spec we follow the spec (see "Thumbnail sizes" in the README): nothing
is ever upscaled, and a request is answered with the smallest stored
thumbnail that covers it, or with one made for it from the original. Pillow
itself is only in :mod:`mediarepo.media.thumbnailer`, run here on the
thumbnail thread pool.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import attrs
from prometheus_client import Counter, Histogram
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from mediarepo.config import OPTIONAL_THUMBNAIL_FORMATS, ThumbnailSize
from mediarepo.errors import Codes, InsufficientStorageError, MatrixError, NotFoundError
from mediarepo.media.allocator import return_freed_memory
from mediarepo.media.cache import ExpiringCache
from mediarepo.media.events import MediaEvent, emit
from mediarepo.media.paths import (
    local_media_path,
    local_thumbnail_path,
    remote_media_path,
    remote_thumbnail_path,
    url_cache_path,
    url_cache_thumbnail_path,
)
from mediarepo.media.pending_thumbnails import PendingThumbnailWork
from mediarepo.media.pixel_budget import PixelBudget
from mediarepo.media.provider_chain import ProviderChain, StoredFile
from mediarepo.media.responder import Responder
from mediarepo.media.source_formats import ANIMATED_THUMBNAIL_TYPE, is_video, source_family
from mediarepo.media.thumbnail_sizes import (
    SourceSize,
    ThumbnailRequest,
    ThumbnailSpec,
    closest_thumbnail,
    on_demand_spec,
    pregeneration_specs,
    select_thumbnail,
    thumbnail_output_type,
)
from mediarepo.media.thumbnailer import ImageTooLargeError, Thumbnailer, ThumbnailError
from mediarepo.media.video import VideoThumbnailer
from mediarepo.sharing import SharedWork
from mediarepo.storage.media_rows import MediaRows
from mediarepo.storage.pending_thumbnail_rows import LOCAL_ORIGIN, PendingThumbnails
from mediarepo.values import LocalMedia, RemoteMedia, ThumbnailInfo

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# How long rows read on the request path are reused (see media.cache).
METADATA_CACHE_SECONDS = 5.0
# How long, and for how many media, originals' sizes are remembered.
SOURCE_SIZE_CACHE_SECONDS = 3600.0
SOURCE_SIZE_CACHE_ENTRIES = 10_000
# Work decoding at least this many pixels gives freed memory back after it.
RELEASE_MEMORY_ABOVE_PIXELS = 4 * 1024 * 1024

# "source" is the source's family (jpeg, png, gif, webp, heic, avif, bmp,
# tiff, video): a few fixed values.
thumbnails_generated = Counter(
    "mediarepo_thumbnails_generated_total", "Thumbnails made", ["reason", "source"]
)
thumbnail_failures = Counter(
    "mediarepo_thumbnail_failures_total",
    "Sources that could not be thumbnailed",
    ["reason", "source"],
)
thumbnail_seconds = Histogram(
    "mediarepo_thumbnail_render_seconds",
    "Time spent decoding per source (decode, resize and encode of every size made)",
    ["reason", "source"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

_NO_THUMBNAILS_MESSAGE = (
    "Cannot find any thumbnails for the requested media ({path}). This might mean the media"
    " is not a supported_media_format=(image/jpeg, image/jpg, image/webp, image/gif,"
    " image/png) or that thumbnailing failed for some other reason."
    " (Dynamic thumbnails are disabled on this server.)"
)


@attrs.frozen
class Rendered:
    spec: ThumbnailSpec
    data: bytes


@attrs.frozen
class ThumbnailResponse:
    file: StoredFile
    media_type: str


def _render(thumbnailer: Thumbnailer, spec: ThumbnailSpec, width: int, height: int) -> bytes:
    animated = spec.type == ANIMATED_THUMBNAIL_TYPE
    if spec.method == "crop":
        return thumbnailer.crop(width, height, spec.type, animated)
    return thumbnailer.scale(width, height, spec.type, animated)


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


class ThumbnailProvider:
    """Makes, records and finds thumbnails of local and cached remote media."""

    def __init__(
        self,
        storage: ProviderChain,
        media_store: MediaRows,
        threadpool: ThreadPool,
        reactor: Any,  # its clock and its threads
        *,
        sizes: Sequence[ThumbnailSize],
        max_image_pixels: int,
        dynamic: bool,
        pixel_budget: int,
        pending: PendingThumbnailWork,
        # The optional source formats (OPTIONAL_THUMBNAIL_FORMATS) thumbnailed;
        # None: all of them.
        formats: Iterable[str] | None = None,
    ) -> None:
        self._formats = None if formats is None else frozenset(formats)
        self._storage = storage
        # Pre-generation not yet done, recorded so that a crash resumes it.
        self.pending = pending
        self.media_store = media_store
        self._threadpool = threadpool
        self._reactor = reactor
        self._sizes = tuple(sizes)
        self._max_image_pixels = max_image_pixels
        self._dynamic = dynamic
        self.pixel_budget = PixelBudget(pixel_budget)
        self._pregenerating: SharedWork[str, list[ThumbnailInfo]] = SharedWork()
        self._generating: SharedWork[tuple[str, int, int, str, str], ThumbnailInfo] = SharedWork()
        # Thumbnail rows of local media, read on every thumbnail request.
        self.local_rows: ExpiringCache[str, list[ThumbnailInfo]] = ExpiringCache(
            reactor, METADATA_CACHE_SECONDS
        )
        # Originals' sizes, read from their headers when no stored thumbnail
        # covers a request (media never changes under its ID).
        self._source_sizes: ExpiringCache[str, SourceSize] = ExpiringCache(
            reactor, SOURCE_SIZE_CACHE_SECONDS, max_entries=SOURCE_SIZE_CACHE_ENTRIES
        )

    # -- in the thread pool ---------------------------------------------------

    def _open(self, path: str, media_type: str, *, header_only: bool = False) -> Thumbnailer:
        if is_video(media_type):
            # A video's displayed size (its rotation) is known once its frame is.
            return VideoThumbnailer(
                path, media_type, self._max_image_pixels, decode_now=not header_only
            )
        return Thumbnailer(path, media_type, self._max_image_pixels)

    def _measure(self, path: str, media_type: str, measure: Callable[[Thumbnailer], int]) -> int:
        with self._open(path, media_type, header_only=True) as thumbnailer:
            return measure(thumbnailer)

    def _pregeneration_pixels(self, thumbnailer: Thumbnailer, output_type: str) -> int:
        specs = pregeneration_specs(
            thumbnailer.width, thumbnailer.height, output_type, self._sizes, thumbnailer.is_animated
        )
        if not specs:
            return 0
        return thumbnailer.pixels_to_decode(
            max(s.width for s in specs), max(s.height for s in specs)
        )

    @staticmethod
    def _render_then_release(pixels: int, render: Callable[..., _T], *args: object) -> _T:
        try:
            return render(*args)
        finally:
            if pixels >= RELEASE_MEMORY_ABOVE_PIXELS:
                return_freed_memory()

    def _render_pregenerated(self, path: str, media_type: str, output_type: str) -> list[Rendered]:
        with self._open(path, media_type) as thumbnailer:
            specs = pregeneration_specs(
                thumbnailer.width,
                thumbnailer.height,
                output_type,
                self._sizes,
                thumbnailer.is_animated,
            )
            if specs:
                # One decode, at the size the largest thumbnail needs.
                thumbnailer.prepare(max(s.width for s in specs), max(s.height for s in specs))
            return [Rendered(s, _render(thumbnailer, s, s.width, s.height)) for s in specs]

    def _probe(self, path: str, media_type: str) -> SourceSize:
        with self._open(path, media_type) as thumbnailer:
            return SourceSize(thumbnailer.width, thumbnailer.height, thumbnailer.is_animated)

    def _render_exact(self, path: str, media_type: str, spec: ThumbnailSpec) -> Rendered:
        with self._open(path, media_type) as thumbnailer:
            return Rendered(spec, _render(thumbnailer, spec, spec.width, spec.height))

    # -- on the reactor -------------------------------------------------------

    async def _in_pool(self, label: str, source: str, func: Callable[..., _T], *args: object) -> _T:
        with thumbnail_seconds.labels(label, source).time():
            result: _T = await deferToThreadPool(self._reactor, self._threadpool, func, *args)
            return result

    async def _in_pool_within_budget(
        self,
        label: str,
        measure: Callable[[Thumbnailer], int],
        render: Callable[..., _T],
        path: str,
        media_type: str,
        *args: object,
    ) -> _T:
        """``render(path, media_type, *args)`` on the pool once the pixels
        it decodes (``measure`` of the source's header, read on the pool
        first) fit the pixel budget; see ``mediarepo.media.pixel_budget``."""
        pixels = await deferToThreadPool(
            self._reactor, self._threadpool, self._measure, path, media_type, measure
        )
        async with self.pixel_budget.reserved_for(pixels):
            return await self._in_pool(
                label, _family(media_type), self._render_then_release, pixels, render, path,
                media_type, *args,
            )  # fmt: skip

    async def _source_file(self, source: ThumbnailSource) -> str:
        path = await self._storage.local_copy(source.content_path)
        if path is None:
            raise NotFoundError()
        return path

    async def _store(
        self, source: ThumbnailSource, rendered: Rendered, reason: str
    ) -> ThumbnailInfo:
        path = source.thumbnail_path(rendered.spec)
        await self._storage.store_file(path, rendered.data)
        info = rendered.spec.info(len(rendered.data))
        if not await source.record(info):
            # The media was deleted while its thumbnail was made: no row,
            # so the file must go too.
            await self._storage.delete(path)
            raise NotFoundError()
        family = _family(source.media_type)
        thumbnails_generated.labels(reason, family).inc()
        emit(
            MediaEvent.THUMBNAIL_GENERATED,
            media_id=source.media_id,
            origin=source.origin,
            width=info.width,
            height=info.height,
            method=info.method,
            thumbnail_type=info.type,
            length=info.length,
            reason=reason,
            source_type=family,
        )
        return info

    async def settle(self) -> None:
        """Wait for thumbnail work under way (at shutdown, before the pools close)."""
        await self.pending.stop()
        await self._pregenerating.wait_all()
        await self._generating.wait_all()

    def pregenerates(self, media_type: str | None) -> bool:
        """Whether new media of this type gets thumbnails made in the
        background (then that work is recorded with its row: see
        :class:`PendingThumbnailWork`)."""
        return self._output_type(media_type) is not None and not self._dynamic

    def _output_type(self, media_type: str | None) -> str | None:
        """:func:`thumbnail_output_type`, for the formats this server thumbnails."""
        family = source_family(media_type)
        if self._formats is not None and family in OPTIONAL_THUMBNAIL_FORMATS:
            if family not in self._formats:
                return None
        return thumbnail_output_type(media_type)

    def schedule_pregeneration(self, source: ThumbnailSource) -> None:
        """Start making ``thumbnail_sizes`` for new media, in the background;
        a thumbnail request arriving meanwhile waits for it. The work must
        have been recorded with the media's row."""
        if not self.pregenerates(source.media_type):
            return

        async def pregenerate() -> list[ThumbnailInfo]:
            try:
                return await self._pregenerate_recorded(source)
            except NotFoundError:
                # Deleted meanwhile; its owed record is dropped when resumed.
                return []
            except InsufficientStorageError:
                # Logged (once) where the disk was found full; left recorded,
                # so it is tried again once its lease runs out.
                return []
            except Exception:
                # Left recorded: taken over once its lease runs out.
                logger.exception("pre-generating thumbnails of %s failed", source.key)
                return []

        # Registered before this returns, so that a thumbnail request coming
        # right after the upload's answer finds it running and waits.
        defer.ensureDeferred(self._pregenerating.run(source.key, pregenerate))

    async def thumbnail_now(self, source: ThumbnailSource) -> SourceSize | None:
        """Make the configured sizes of new media now, whatever
        ``dynamic_thumbnails`` says (as Synapse does for the images URL
        previews download), and return the original's size; ``None`` if it
        cannot be thumbnailed."""
        if self._output_type(source.media_type) is None:
            return None
        try:
            size = await self._source_size(source)
        except ThumbnailError:
            return None
        await self._pregenerating.run(source.key, lambda: self._pregenerate(source))
        return size

    def resume_pending(self) -> None:
        """Resume, in the background, the pre-generation other processes
        recorded and did not finish (they crashed)."""
        self.pending.resume_soon(self._resume)

    async def _resume(self, item: PendingThumbnails) -> None:
        source: ThumbnailSource | None = None
        if item.media_origin == LOCAL_ORIGIN:
            local = await self.media_store.get_local_media(item.media_id)
            if local is not None and not local.is_pending and local.quarantined_by is None:
                source = LocalThumbnailSource(local, self.media_store, self.local_rows)
        else:
            remote = await self.media_store.get_remote_media(item.media_origin, item.media_id)
            if remote is not None and remote.quarantined_by is None:
                source = RemoteThumbnailSource(remote, self.media_store)
        if source is None or not self.pregenerates(source.media_type):
            # The media never got its row (the crash came first), or went since.
            await self.pending.done(item.media_origin, item.media_id)
            return
        await self._pregenerating.run(source.key, lambda: self._pregenerate_recorded(source))

    async def _pregenerate_recorded(self, source: ThumbnailSource) -> list[ThumbnailInfo]:
        """:meth:`_pregenerate`, then the record of the work deleted."""
        made = await self._pregenerate(source)
        await self.pending.done(*source.pending_key)
        return made

    async def _pregenerate(self, source: ThumbnailSource) -> list[ThumbnailInfo]:
        """Make and record the configured sizes; nothing (and a log line) if
        the media cannot be thumbnailed."""
        output_type = self._output_type(source.media_type)
        if output_type is None or source.media_type is None:
            return []
        path = await self._source_file(source)
        try:
            rendered = await self._in_pool_within_budget(
                "pregenerate",
                lambda t: self._pregeneration_pixels(t, output_type),
                self._render_pregenerated,
                path,
                source.media_type,
                output_type,
            )
        except ThumbnailError as e:
            thumbnail_failures.labels(_failure_reason(e), _family(source.media_type)).inc()
            logger.info("not thumbnailing %s: %s", source.key, e)
            return []
        return [await self._store(source, r, "pregenerate") for r in rendered]

    async def thumbnail(
        self, source: ThumbnailSource, request: ThumbnailRequest
    ) -> ThumbnailResponse:
        """The thumbnail answering ``request`` for ``source``: the smallest
        stored one covering it, else one made for it (whatever
        ``dynamic_thumbnails`` says), else the closest stored one."""
        static_type = self._output_type(source.media_type)
        await self._pregenerating.wait(source.key)
        rows = await source.rows()
        chosen = select_thumbnail(
            rows, request.width, request.height, request.method, request.animated, static_type
        )
        if chosen is None:
            chosen = await self._on_demand(source, request, rows, static_type)
        path = source.thumbnail_path(chosen)

        async def open_thumbnail() -> Responder:
            responder = await self._storage.fetch(path)
            if responder is None:
                # The row outlived its file: make it again with the row's parameters.
                logger.info("a thumbnail of %s is missing; regenerating", source.key)
                await self._regenerate(source, chosen)
                responder = await self._storage.fetch(path)
                if responder is None:
                    raise NotFoundError()
            return responder

        return ThumbnailResponse(StoredFile(path, chosen.length, open_thumbnail), chosen.type)

    async def _on_demand(
        self,
        source: ThumbnailSource,
        request: ThumbnailRequest,
        rows: list[ThumbnailInfo],
        static_type: str | None,
    ) -> ThumbnailInfo:
        """The row answering a request no stored thumbnail covers: the one of
        exactly the right size if it exists (the original's own size, when
        the original is smaller than asked), else one made now, once however
        many ask at the same time. When none can be made, the closest stored
        one, or the error Synapse gives."""
        try:
            if static_type is None:
                raise ThumbnailError(f"cannot thumbnail media of type {source.media_type!r}")
            size = await self._source_size(source)
            spec = on_demand_spec(size, static_type, request)
            for row in rows:
                if (row.width, row.height, row.type, row.method) == (
                    spec.width, spec.height, spec.type, spec.method,
                ):  # fmt: skip
                    return row
            key = (source.key, spec.width, spec.height, spec.type, spec.method)
            return await self._generating.run(key, lambda: self._generate(source, spec))
        except (ThumbnailError, NotFoundError) as e:
            closest = closest_thumbnail(
                rows, request.width, request.height, request.method, request.animated,
                static_type,
            )  # fmt: skip
            if closest is not None:
                return closest
            if isinstance(e, ImageTooLargeError):
                raise MatrixError(
                    413, Codes.TOO_LARGE, "The image is too large to thumbnail"
                ) from e
            if isinstance(e, NotFoundError):
                raise
            if self._dynamic:
                raise MatrixError(400, Codes.UNKNOWN, "Failed to generate thumbnail.") from e
            raise MatrixError(
                400, Codes.UNKNOWN, _NO_THUMBNAILS_MESSAGE.format(path=request.path)
            ) from e

    async def _source_size(self, source: ThumbnailSource) -> SourceSize:
        """The original's size, from its header (read on the pool), remembered."""
        size = self._source_sizes.get(source.key)
        if size is None:
            path = await self._source_file(source)
            try:
                size = await deferToThreadPool(
                    self._reactor, self._threadpool, self._probe, path, source.media_type or ""
                )
            except ThumbnailError as e:
                thumbnail_failures.labels(_failure_reason(e), _family(source.media_type)).inc()
                logger.info("cannot thumbnail %s: %s", source.key, e)
                raise
            self._source_sizes.put(source.key, size)
        return size

    async def _regenerate(self, source: ThumbnailSource, info: ThumbnailInfo) -> None:
        spec = ThumbnailSpec(info.width, info.height, info.type, info.method)
        try:
            await self._generate(source, spec, "regenerate")
        except ThumbnailError as e:
            logger.warning("cannot regenerate a thumbnail of %s: %s", source.key, e)
            raise NotFoundError() from e

    async def _generate(
        self, source: ThumbnailSource, spec: ThumbnailSpec, reason: str = "dynamic"
    ) -> ThumbnailInfo:
        """Make ``spec`` from the original, store its file and record its row."""
        path = await self._source_file(source)
        try:
            rendered = await self._in_pool_within_budget(
                reason,
                lambda t: t.pixels_to_decode(spec.width, spec.height),
                self._render_exact,
                path,
                source.media_type or "",
                spec,
            )
        except ThumbnailError as e:
            thumbnail_failures.labels(_failure_reason(e), _family(source.media_type)).inc()
            logger.info("cannot thumbnail %s: %s", source.key, e)
            raise
        return await self._store(source, rendered, reason)


def _family(media_type: str | None) -> str:
    return source_family(media_type) or "other"


def _failure_reason(error: ThumbnailError) -> str:
    return "too_large" if isinstance(error, ImageTooLargeError) else "unreadable"
