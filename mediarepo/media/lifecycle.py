"""Retention: media nobody has read for ``media_retention``'s lifetimes goes.

Local media is judged by ``last_access_ts`` (or, never read, by
``created_ts``); quarantined and protected media, URL previews and
reservations are never purged. Cached remote media is judged by
``last_access_ts`` and simply fetched again if asked for later. Rows go
before files, so a crash midway leaves at worst an unreferenced file, never
a row without its file. Work is done in bounded batches, yielding between
them, and every deletion is logged.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter
from twisted.internet import task
from twisted.internet.interfaces import IReactorTime

from mediarepo.media.access import AccessTracker
from mediarepo.media.paths import (
    local_media_path,
    local_thumbnail_dir,
    remote_media_path,
    remote_thumbnail_dir,
)
from mediarepo.media.storage import MediaStorage
from mediarepo.storage.media import MediaStore

logger = logging.getLogger(__name__)

media_purged = Counter("mediarepo_media_purged_total", "Media deleted by retention", ["kind"])

PURGE_BATCH = 500


class Retention:
    def __init__(
        self,
        storage: MediaStorage,
        media_store: MediaStore,
        access: AccessTracker,
        clock: IReactorTime,
        *,
        local_lifetime_ms: int | None,
        remote_lifetime_ms: int | None,
    ) -> None:
        self._storage = storage
        self._media_store = media_store
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
            local = await self._purge_local(now_ms - self._local_lifetime)
        if self._remote_lifetime is not None:
            remote = await self._purge_remote(now_ms - self._remote_lifetime)
        if local or remote:
            logger.info("retention purged %d local and %d remote media", local, remote)
        return local, remote

    async def _purge_local(self, before_ts: int) -> int:
        purged = 0
        while True:
            media_ids = await self._media_store.local_media_unread_since(before_ts, PURGE_BATCH)
            if not media_ids:
                return purged
            await self._media_store.delete_local_media(media_ids)
            for media_id in media_ids:
                await self._storage.delete(local_media_path(media_id))
                await self._storage.delete_directory(local_thumbnail_dir(media_id))
                logger.info("retention: deleted local media %s", media_id)
            media_purged.labels("local").inc(len(media_ids))
            purged += len(media_ids)
            await task.deferLater(self._clock, 0, lambda: None)

    async def _purge_remote(self, before_ts: int) -> int:
        purged = 0
        while True:
            entries = await self._media_store.remote_media_unread_since(before_ts, PURGE_BATCH)
            if not entries:
                return purged
            await self._media_store.delete_remote_media([(o, m) for o, m, _ in entries])
            for origin, media_id, filesystem_id in entries:
                await self._storage.delete(remote_media_path(origin, filesystem_id))
                await self._storage.delete_directory(remote_thumbnail_dir(origin, filesystem_id))
                logger.info("retention: deleted cached media %s/%s", origin, media_id)
            media_purged.labels("remote").inc(len(entries))
            purged += len(entries)
            await task.deferLater(self._clock, 0, lambda: None)
