"""Making thumbnails: decoding on the thumbnail thread pool within the
pixel budget, storing their files and recording their rows; the configured
sizes of new media in the background (resumed after a crash), one size on
demand. Which sizes there are is :mod:`mediarepo.media.thumbnail_sizes`;
which thumbnail answers a request is :mod:`mediarepo.media.thumbnail_serving`.

Rows and files are Synapse's (same tables, same paths), so a Synapse sharing
the database and media store serves what we make; nothing is ever upscaled
(see "Thumbnail sizes" in the README). Pillow itself is only in
:mod:`mediarepo.media.thumbnailer`, run here on the thumbnail thread pool.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import attrs
from prometheus_client import Counter, Histogram
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from mediarepo.config import OPTIONAL_THUMBNAIL_FORMATS, ThumbnailSize
from mediarepo.errors import InsufficientStorageError, NotFoundError
from mediarepo.media.allocator import return_freed_memory
from mediarepo.media.cache import ExpiringCache
from mediarepo.media.events import MediaEvent, emit
from mediarepo.media.pending_thumbnails import PendingThumbnailWork
from mediarepo.media.pixel_budget import PixelBudget
from mediarepo.media.provider_chain import ProviderChain
from mediarepo.media.source_formats import ANIMATED_THUMBNAIL_TYPE, is_video, source_family
from mediarepo.media.thumbnail_sizes import (
    SourceSize,
    ThumbnailSpec,
    pregeneration_specs,
    thumbnail_output_type,
)
from mediarepo.media.thumbnail_sources import (
    LocalThumbnailSource,
    RemoteThumbnailSource,
    ThumbnailSource,
)
from mediarepo.media.thumbnailer import ImageTooLargeError, Thumbnailer, ThumbnailError
from mediarepo.media.video import VideoThumbnailer
from mediarepo.sharing import SharedWork
from mediarepo.storage.media_rows import MediaRows
from mediarepo.storage.pending_thumbnail_rows import LOCAL_ORIGIN, PendingThumbnails
from mediarepo.values import ThumbnailInfo

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


@attrs.frozen
class Rendered:
    spec: ThumbnailSpec
    data: bytes


def _render(thumbnailer: Thumbnailer, spec: ThumbnailSpec, width: int, height: int) -> bytes:
    animated = spec.type == ANIMATED_THUMBNAIL_TYPE
    if spec.method == "crop":
        return thumbnailer.crop(width, height, spec.type, animated)
    return thumbnailer.scale(width, height, spec.type, animated)


class ThumbnailMaker:
    """Makes and records thumbnails of local and cached remote media: the
    configured sizes in the background for new media, one size on demand."""

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
        self.dynamic = dynamic
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
        return self.output_type(media_type) is not None and not self.dynamic

    def output_type(self, media_type: str | None) -> str | None:
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
        if self.output_type(source.media_type) is None:
            return None
        try:
            size = await self.source_size(source)
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
        output_type = self.output_type(source.media_type)
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

    async def source_size(self, source: ThumbnailSource) -> SourceSize:
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

    async def wait_for_pregeneration(self, source: ThumbnailSource) -> None:
        """Wait for the configured sizes of ``source`` if they are being made."""
        await self._pregenerating.wait(source.key)

    async def make(self, source: ThumbnailSource, spec: ThumbnailSpec) -> ThumbnailInfo:
        """Make, store and record ``spec`` now, once however many ask at the same time."""
        key = (source.key, spec.width, spec.height, spec.type, spec.method)
        return await self._generating.run(key, lambda: self._generate(source, spec))

    async def regenerate(self, source: ThumbnailSource, info: ThumbnailInfo) -> None:
        """Make again a thumbnail whose row outlived its file."""
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
