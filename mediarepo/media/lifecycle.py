"""The media's life after upload: the periodic jobs, and retention.

:func:`periodic_jobs` gives every periodic job as a named ``TimerService``
for the server's service tree: the access times noted in memory are written
by every instance; the housekeeping (staging and reservation sweeps, owed
thumbnails, retention, local cache eviction) and the polling of queued
storage provider tasks run only on the instance that runs background jobs,
and so does the URL-cache expiry (:class:`UrlCacheExpiry`) when URL previews
are on.

Retention: media nobody has read for ``media_retention``'s lifetimes goes.

Local media is judged by ``last_access_ts`` (or, never read, by
``created_ts``); quarantined and protected media and reservations are
never purged. Cached remote media is judged by
``last_access_ts`` and simply fetched again if asked for later. Work is done
in bounded batches, yielding between them, and every deletion is logged.
:class:`MediaPurger` does the deleting, for the admin API too.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import attrs
from twisted.application.internet import TimerService
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime

from mediarepo.media.access import AccessTracker
from mediarepo.media.events import MediaEvent, emit
from mediarepo.media.paths import (
    local_media_path,
    local_thumbnail_dir,
    remote_media_path,
    remote_thumbnail_dir,
    url_cache_path,
    url_cache_thumbnail_dir,
)
from mediarepo.media.provider_chain import ProviderChain
from mediarepo.storage.media_admin_rows import LocalPurgeFilter, MediaAdminRows
from mediarepo.storage.media_rows import MediaRows
from mediarepo.storage.url_cache import UrlCacheStore

logger = logging.getLogger(__name__)


PURGE_BATCH = 500
# How often queued storage provider tasks (copies, deletions) are looked at.
PROVIDER_TASKS_INTERVAL_SECONDS = 10.0


class MediaPurger:
    """Deletes media everywhere it lives: rows, files, thumbnails, caches.

    Rows go before files, so a crash midway leaves at worst an unreferenced
    file, never a row without its file.
    """

    def __init__(
        self,
        storage: ProviderChain,
        media_store: MediaRows,
        admin_store: MediaAdminRows,
        forget_local: Callable[[str], None],
        clock: IReactorTime,
    ) -> None:
        self._storage = storage
        self._media_store = media_store
        self._admin_store = admin_store
        self._forget_local = forget_local
        self._clock = clock

    async def delete_local(self, media_ids: list[str], reason: str) -> None:
        url_cache_ids = await self._media_store.delete_local_media(media_ids)
        for media_id in media_ids:
            self._forget_local(media_id)
        # The files of the whole batch in one go (see delete_many).
        await self._storage.delete_many(
            [local_media_path(m) for m in media_ids], [local_thumbnail_dir(m) for m in media_ids]
        )
        # URL-preview downloads keep their bytes under url_cache/ instead,
        # in the local store only. Only theirs are looked for: trying every
        # media's url_cache paths, one directory at a time, took two thirds
        # of a purge's time (docs/performance.rst).
        if url_cache_ids:
            files, directories = _url_cache_paths(sorted(url_cache_ids))
            await self._storage.delete_local(files, directories)
        for media_id in media_ids:
            emit(MediaEvent.PURGED, media_id=media_id, origin=None, reason=reason)

    async def delete_remote(self, entries: list[tuple[str, str, str]], reason: str) -> None:
        """Delete cached remote media given as (origin, media ID, filesystem ID)."""
        await self._media_store.delete_remote_media([(o, m) for o, m, _ in entries])
        await self._storage.delete_many(
            [remote_media_path(o, f) for o, _, f in entries],
            [remote_thumbnail_dir(o, f) for o, _, f in entries],
        )
        for origin, media_id, _ in entries:
            emit(MediaEvent.PURGED, media_id=media_id, origin=origin, reason=reason)

    async def delete_old_local(self, purge: LocalPurgeFilter, reason: str) -> list[str]:
        """Delete, in bounded batches, every local media ``purge`` takes."""
        deleted: list[str] = []
        while True:
            media_ids = await self._admin_store.old_local_media(purge, PURGE_BATCH)
            if not media_ids:
                return deleted
            await self.delete_local(media_ids, reason)
            deleted.extend(media_ids)
            await task.deferLater(self._clock, 0, lambda: None)

    async def delete_old_remote(self, before_ts: int, reason: str) -> int:
        """Delete, in bounded batches, cached remote media not read since
        ``before_ts`` (quarantined media stays: it is evidence)."""
        deleted = 0
        while True:
            entries = await self._media_store.remote_media_unread_since(before_ts, PURGE_BATCH)
            if not entries:
                return deleted
            await self.delete_remote(entries, reason)
            deleted += len(entries)
            await task.deferLater(self._clock, 0, lambda: None)


class Retention:
    """Applies ``media_retention``: see the module's docstring."""

    def __init__(
        self,
        purger: MediaPurger,
        access: AccessTracker,
        clock: IReactorTime,
        *,
        local_lifetime_ms: int | None,
        remote_lifetime_ms: int | None,
    ) -> None:
        self._purger = purger
        self._access = access
        self._clock = clock
        self._local_lifetime = local_lifetime_ms
        self._remote_lifetime = remote_lifetime_ms

    @property
    def enabled(self) -> bool:
        return self._local_lifetime is not None or self._remote_lifetime is not None

    async def apply(self, now_ms: int | None = None) -> tuple[int, int]:
        """Purge what is past its lifetime; returns (local, remote) counts."""
        if now_ms is None:
            now_ms = int(self._clock.seconds() * 1000)
        # Reads noted in memory count as reads.
        await self._access.flush()
        local = remote = 0
        if self._local_lifetime is not None:
            purge = LocalPurgeFilter(before_ts=now_ms - self._local_lifetime)
            local = len(await self._purger.delete_old_local(purge, "retention"))
        if self._remote_lifetime is not None:
            remote = await self._purger.delete_old_remote(
                now_ms - self._remote_lifetime, "retention"
            )
        if local or remote:
            logger.info("retention purged %d local and %d remote media", local, remote)
        return local, remote


# How often expired URL previews are removed, and how many per query.
URL_CACHE_EXPIRY_INTERVAL_SECONDS = 10.0
URL_CACHE_EXPIRY_BATCH = 500
# How long the pages and images URL previews downloaded are kept.
URL_CACHE_MEDIA_LIFETIME_MS = 2 * 24 * 3600 * 1000


class UrlCacheExpiry:
    """Synapse's URL-cache expiry: the body of an expired preview goes with
    its row at once; the downloads (pages, images, their thumbnails) and
    their rows two days after they were made. URL-cache files live only in
    the local store."""

    def __init__(
        self,
        url_cache: UrlCacheStore,
        storage: ProviderChain,
        forget_local: Callable[[str], None],
        clock: IReactorTime,
    ) -> None:
        self._url_cache = url_cache
        self._storage = storage
        self._forget_local = forget_local
        self._clock = clock

    async def run(self) -> tuple[int, int]:
        """One pass; returns how many previews and downloads were removed."""
        now = int(self._clock.seconds() * 1000)
        # Rows before files, as in MediaPurger: a crash leaves files, never rows without them.
        expired = await self._url_cache.expired_previews(now, URL_CACHE_EXPIRY_BATCH)
        await self._url_cache.delete_previews(expired)
        if expired:
            bodies, _ = _url_cache_paths(expired)
            await self._storage.delete_local(bodies)
        old = await self._url_cache.downloads_before(
            now - URL_CACHE_MEDIA_LIFETIME_MS, URL_CACHE_EXPIRY_BATCH
        )
        await self._url_cache.delete_downloads(old)
        for media_id in old:
            self._forget_local(media_id)
        if old:
            files, directories = _url_cache_paths(old)
            await self._storage.delete_local(files, directories)
        for media_id in old:
            emit(MediaEvent.PURGED, media_id=media_id, origin=None, reason="url_cache_expiry")
        if expired or old:
            logger.info(
                "URL preview cache: %d previews expired, %d downloads removed",
                len(expired), len(old),
            )  # fmt: skip
        return len(expired), len(old)


def _url_cache_paths(media_ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """The files and thumbnail directories of URL-preview downloads (IDs of
    no url_cache shape have none)."""
    files: list[str] = []
    directories: list[str] = []
    for media_id in media_ids:
        with contextlib.suppress(ValueError):
            files.append(url_cache_path(media_id))
            directories.append(url_cache_thumbnail_dir(media_id))
    return files, directories


class Housekeeping:
    """One run of the periodic clean-up: each sweep in turn, whatever
    became of the ones before it."""

    def __init__(self, sweeps: Sequence[Callable[[], Awaitable[object]]]) -> None:
        self._sweeps = list(sweeps)

    async def run(self) -> None:
        for sweep in self._sweeps:
            try:
                await sweep()
            except Exception:
                logger.exception("%s failed", getattr(sweep, "__name__", sweep))


def _timer(
    name: str,
    seconds: float,
    job: Callable[[], Coroutine[Any, Any, object] | None],
    clock: IReactorTime,
) -> TimerService:
    def run() -> defer.Deferred[object] | None:
        result = job()
        return None if result is None else defer.ensureDeferred(result)

    timer = TimerService(seconds, run)
    timer.clock = clock
    timer.setName(name)
    return timer


@attrs.frozen
class PeriodicJobs:
    """The periodic jobs of one instance, as named timers (each runs once
    when started, then at its interval)."""

    # Every instance writes the access times it noted.
    access_time_flushes: TimerService
    # Housekeeping, provider task polling and URL-cache expiry, where this
    # instance runs them.
    background: list[TimerService]


def periodic_jobs(
    clock: IReactorTime,
    *,
    flush_access_times: Callable[[], Coroutine[Any, Any, None]],
    flush_interval_seconds: float,
    housekeeping: Housekeeping | None,
    housekeeping_interval_seconds: float,
    run_provider_tasks: Callable[[], None] | None,
    url_cache_expiry: UrlCacheExpiry | None = None,
) -> PeriodicJobs:
    """``housekeeping``, ``run_provider_tasks`` and ``url_cache_expiry``
    are None where this instance does not run them (the last also when URL
    previews are off)."""
    background = []
    if housekeeping is not None:
        background.append(
            _timer("housekeeping", housekeeping_interval_seconds, housekeeping.run, clock)
        )
    if run_provider_tasks is not None:
        background.append(
            _timer(
                "provider task polling",
                PROVIDER_TASKS_INTERVAL_SECONDS,
                run_provider_tasks,
                clock,
            )
        )
    if url_cache_expiry is not None:
        # A failed pass is logged, not the end of its timer.
        background.append(
            _timer(
                "URL cache expiry",
                URL_CACHE_EXPIRY_INTERVAL_SECONDS,
                Housekeeping([url_cache_expiry.run]).run,
                clock,
            )
        )
    return PeriodicJobs(
        _timer("access-time flushes", flush_interval_seconds, flush_access_times, clock),
        background,
    )
