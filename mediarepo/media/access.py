"""When media was last read (``last_access_ts``), which retention judges by.

Reads only note the time in memory; a periodic flush writes them all in one
transaction (Synapse flushes every minute too), so serving media costs no
database write. A clean shutdown flushes what is pending.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter
from twisted.internet.interfaces import IReactorTime

from mediarepo.errors import DatabaseUnavailableError
from mediarepo.storage.media_rows import MediaRows

logger = logging.getLogger(__name__)

FLUSH_INTERVAL_SECONDS = 60.0

access_times_written = Counter(
    "mediarepo_access_times_written_total", "last_access_ts values written", ["kind"]
)


class AccessTracker:
    def __init__(self, media_store: MediaRows, clock: IReactorTime) -> None:
        self._media_store = media_store
        self._clock = clock
        self._local: dict[str, int] = {}
        self._remote: dict[tuple[str, str], int] = {}

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def read_local(self, media_id: str) -> None:
        self._local[media_id] = self._now_ms()

    def read_remote(self, origin: str, media_id: str) -> None:
        self._remote[(origin, media_id)] = self._now_ms()

    @property
    def pending(self) -> int:
        return len(self._local) + len(self._remote)

    async def flush(self) -> None:
        """Write the times noted since the last flush."""
        local, self._local = self._local, {}
        remote, self._remote = self._remote, {}
        if not local and not remote:
            return
        try:
            await self._media_store.update_access_times(local, remote)
        except Exception as e:
            # Keep them for the next flush, unless newer reads replaced them.
            for media_id, ts in local.items():
                self._local.setdefault(media_id, ts)
            for key, ts in remote.items():
                self._remote.setdefault(key, ts)
            if isinstance(e, DatabaseUnavailableError):
                # Said once where the database was found unreachable.
                logger.warning("writing access times failed; will retry: %s", e)
            else:
                logger.exception("writing access times failed; will retry")
            return
        access_times_written.labels("local").inc(len(local))
        access_times_written.labels("remote").inc(len(remote))
