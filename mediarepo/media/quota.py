"""Per-user upload quotas (``media_upload_limits``): bytes per time window."""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from mediarepo.config import UploadLimit
from mediarepo.errors import Codes, MatrixError
from mediarepo.storage.media import MediaStore


class UploadQuota:
    def __init__(
        self, limits: tuple[UploadLimit, ...], media_store: MediaStore, clock: IReactorTime
    ) -> None:
        self._limits = limits
        self._media_store = media_store
        self._clock = clock

    @property
    def enabled(self) -> bool:
        return bool(self._limits)

    async def check(self, user_id: str, length: int) -> None:
        """Refuse ``length`` more bytes from ``user_id`` if they would exceed
        a limit: 400 ``M_RESOURCE_LIMIT_EXCEEDED``, as Synapse answers."""
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
                raise MatrixError(400, Codes.RESOURCE_LIMIT_EXCEEDED, "Media upload limit exceeded")
