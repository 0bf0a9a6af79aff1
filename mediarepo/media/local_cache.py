"""A bounded local store (``media_store_max_size``): with an object store
holding the truth, the local disk keeps only what was read lately.

Each run adds up the store (hard-linked copies of deduplicated media once)
and, over the budget, removes the files read least recently until the store
is a tenth under it. A file goes only once a provider that keeps such files
confirms it holds one of the same size; it comes back on its next read.
Reads keep access times fresh (see ``FileResponder.open``).

A run starts as soon as writes take the store past the budget: the size
counted by the last run plus the bytes written since (by this process;
other workers' writes are seen at the next count) is kept up to date, and
a run is also started when a provider takes a copy while the store is over
(files only become evictable then). Runs never overlap, and one starts at
most every ``MIN_SECONDS_BETWEEN_RUNS`` when writes keep coming. The
housekeeping timer runs it too, counting other processes' writes.
"""

from __future__ import annotations

import heapq
import logging
import os
from collections.abc import Iterator, Sequence

import attrs
from prometheus_client import Counter, Gauge
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from mediarepo.media.provider_chain import ProviderSlot
from mediarepo.media.providers.local import LocalFiles

logger = logging.getLogger(__name__)

evicted_files = Counter("mediarepo_local_cache_evicted_files_total", "Local files evicted")
local_store_bytes = Gauge("mediarepo_local_store_bytes", "Bytes in the local media store")

# The directories whose files may be evicted (never staging, never URL previews).
_EVICTABLE = ("local_content", "local_thumbnails", "remote_content", "remote_thumbnail")
# Candidates considered per round, least recently read first.
_ROUND = 2000
# Eviction stops this far under the budget, so it does not run on every write.
_LOW_WATER = 0.9
# Runs started by writes are at least this far apart (each counts the store).
MIN_SECONDS_BETWEEN_RUNS = 1.0
# How often a store stuck over its limit (nothing copied to a provider yet) is logged.
STUCK_WARNING_INTERVAL_SECONDS = 600.0


@attrs.frozen
class _File:
    atime: float
    relative_path: str
    size: int
    # Whether removing this name frees the bytes (no other hard link).
    last_link: bool


def _walk(base: str) -> Iterator[tuple[str, os.stat_result]]:
    for top in _EVICTABLE:
        for directory, _subdirs, names in os.walk(os.path.join(base, top)):
            for name in names:
                path = os.path.join(directory, name)
                try:
                    yield os.path.relpath(path, base), os.stat(path)
                except FileNotFoundError:
                    continue


def _store_size(base: str) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    for _, stat in _walk(base):
        inode = (stat.st_dev, stat.st_ino)
        if inode not in seen:
            seen.add(inode)
            total += stat.st_size
    return total


def _least_recently_read(base: str, count: int) -> list[_File]:
    files = (
        _File(stat.st_atime, relative, stat.st_size, stat.st_nlink == 1)
        for relative, stat in _walk(base)
    )
    return heapq.nsmallest(count, files, key=lambda f: f.atime)


class LocalCacheEviction:
    def __init__(
        self,
        local: LocalFiles,
        slots: Sequence[ProviderSlot],
        max_size: int,
        clock: IReactorTime,
    ) -> None:
        self._local = local
        self._slots = list(slots)
        self._max_size = max_size
        self._clock = clock
        # Bytes in the store as last counted plus those written since; None
        # until the first count.
        self.estimate: int | None = None
        self._lock = defer.DeferredLock()
        self._pending: IDelayedCall | None = None
        self._last_run = -MIN_SECONDS_BETWEEN_RUNS
        self._last_stuck_warning = -STUCK_WARNING_INTERVAL_SECONDS
        # Bytes written since the running count began (not all in it).
        self._written_since_count = 0
        # The latest run started by writes (tests wait for it).
        self.triggered_run: defer.Deferred[int] | None = None

    def note_written(self, length: int) -> None:
        """``length`` bytes were just added to the local store."""
        self._written_since_count += length
        if self.estimate is not None:
            self.estimate += length
            if self.estimate <= self._max_size:
                return
        self._run_soon()

    def note_copied(self) -> None:
        """A provider took a copy of a file: over the budget, it may go now."""
        if self.estimate is not None and self.estimate > self._max_size:
            self._run_soon()

    def _run_soon(self) -> None:
        if self._pending is not None:
            return  # the run already scheduled counts this write too
        wait = max(0.0, self._last_run + MIN_SECONDS_BETWEEN_RUNS - self._clock.seconds())
        self._pending = self._clock.callLater(wait, self._start)

    def _start(self) -> None:
        self._pending = None
        self._last_run = self._clock.seconds()
        self.triggered_run = defer.ensureDeferred(self._triggered_run())

    async def _triggered_run(self) -> int:
        try:
            return await self.run()
        except Exception:
            logger.exception("evicting from the local media store failed")
            return 0

    def stop(self) -> None:
        """Cancel a run that is scheduled but not started (at shutdown)."""
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None

    async def run(self) -> int:
        """Evict until under the budget; returns how many files went. Runs
        wait for each other."""
        evicted: int = await self._lock.run(lambda: defer.ensureDeferred(self._evict()))
        return evicted

    async def _evict(self) -> int:
        base = self._local.paths.base
        self._written_since_count = 0
        total = await self._local.in_pool(_store_size, base)
        local_store_bytes.set(total)
        self.estimate = total + self._written_since_count
        if total <= self._max_size:
            return 0
        target = int(self._max_size * _LOW_WATER)
        evicted = 0
        while total > target:
            candidates = await self._local.in_pool(_least_recently_read, base, _ROUND)
            progress = False
            for candidate in candidates:
                if total <= target:
                    break
                if not await self._kept_elsewhere(candidate):
                    continue
                await self._local.delete(candidate.relative_path)
                evicted += 1
                progress = True
                if candidate.last_link:
                    total -= candidate.size
            if not progress:
                # Runs follow writes: say it once in a while, not every run.
                now = self._clock.seconds()
                level = logging.DEBUG
                if (
                    total > self._max_size
                    and now - self._last_stuck_warning >= STUCK_WARNING_INTERVAL_SECONDS
                ):
                    self._last_stuck_warning = now
                    level = logging.WARNING
                logger.log(
                    level,
                    "the local media store holds %d bytes, over media_store_max_size (%d),"
                    " but no more files are safely in a storage provider yet",
                    total,
                    self._max_size,
                )
                break
        evicted_files.inc(evicted)
        local_store_bytes.set(total)
        self.estimate = total + self._written_since_count
        logger.info("evicted %d files from the local media store (%d bytes left)", evicted, total)
        return evicted

    async def _kept_elsewhere(self, candidate: _File) -> bool:
        for slot in self._slots:
            if not slot.wants(candidate.relative_path):
                continue
            try:
                if await slot.provider.exists(candidate.relative_path, candidate.size):
                    return True
            except Exception as e:
                logger.warning("cannot check %s at %s: %s", candidate.relative_path,
                               slot.provider.name, e)  # fmt: skip
        return False
