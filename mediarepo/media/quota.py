"""Per-user upload quotas (``media_upload_limits``): bytes per time window.

Two checks keep a user within the quota when uploads run side by side:

* before a body is read, its declared length is *held* for the user: it is
  refused if what they stored plus what they are still sending here would
  pass a limit, and counted against their next uploads until it ends;
* when an upload is recorded, the database checks the quota in the same
  step as the insert, serialised per user across processes
  (``storage.upload_rows``, in the transaction recording it): that check is the one that
  holds, whatever the other process or a body without a length did.

A refusal is Synapse's: 400 ``M_RESOURCE_LIMIT_EXCEEDED``.
"""

from __future__ import annotations

from collections import defaultdict

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from mediarepo.config import UploadLimit
from mediarepo.errors import Codes, MatrixError
from mediarepo.storage.media_rows import MediaRows
from mediarepo.storage.upload_rows import UploadWindow


def quota_exceeded() -> MatrixError:
    return MatrixError(400, Codes.RESOURCE_LIMIT_EXCEEDED, "Media upload limit exceeded")


@attrs.define(eq=False)
class QuotaHold:
    """Bytes of an upload under way, counted against its user's quota
    until :meth:`release`."""

    _quota: UploadQuota
    user_id: str
    length: int
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._quota._drop(self)


class UploadQuota:
    def __init__(
        self, limits: tuple[UploadLimit, ...], media_store: MediaRows, clock: IReactorTime
    ) -> None:
        self._limits = limits
        self._media_store = media_store
        self._clock = clock
        # Bytes of each user's uploads under way in this process.
        self._held: defaultdict[str, int] = defaultdict(int)
        # One check at a time per user, so that two see each other's hold.
        self._checking: dict[str, defer.DeferredLock] = {}

    @property
    def enabled(self) -> bool:
        return bool(self._limits)

    def held_bytes(self, user_id: str) -> int:
        """Bytes of ``user_id``'s uploads under way here."""
        return self._held.get(user_id, 0)

    def windows(self) -> tuple[UploadWindow, ...]:
        """The limits as of now, for the database's check at insert time."""
        now = int(self._clock.seconds() * 1000)
        return tuple(
            UploadWindow(now - limit.time_period_ms, limit.max_size) for limit in self._limits
        )

    async def hold(self, user_id: str, length: int) -> QuotaHold:
        """Hold ``length`` bytes for an upload by ``user_id`` that is about
        to be read, or refuse it if they would pass a limit, counting the
        user's other uploads still under way here."""
        lock = self._checking.setdefault(user_id, defer.DeferredLock())
        await lock.acquire()
        try:
            await self._check(user_id, self._held[user_id] + length)
            self._held[user_id] += length
        finally:
            lock.release()
            if not lock.locked and self._checking.get(user_id) is lock:
                del self._checking[user_id]
        return QuotaHold(self, user_id, length)

    def _drop(self, hold: QuotaHold) -> None:
        left = self._held[hold.user_id] - hold.length
        if left > 0:
            self._held[hold.user_id] = left
        else:
            del self._held[hold.user_id]

    async def _check(self, user_id: str, length: int) -> None:
        now = int(self._clock.seconds() * 1000)
        # Limits run longest period first; a shorter window holds at most
        # what the longer one did, so it is queried only when that could matter.
        sent: int | None = None
        for limit in self._limits:
            if sent is None or sent + length > limit.max_size:
                sent = await self._media_store.bytes_uploaded_since(
                    user_id, now - limit.time_period_ms
                )
            if sent + length > limit.max_size:
                raise quota_exceeded()
