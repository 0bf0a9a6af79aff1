"""The rules behind Synapse's media admin API: what may be quarantined,
protected, listed and deleted, with Synapse's errors for each refusal."""

from __future__ import annotations

import logging
from collections.abc import Callable

from mediarepo.errors import Codes, MatrixError, NotFoundError
from mediarepo.media.lifecycle import MediaPurger
from mediarepo.storage.media_admin_rows import (
    LocalPurgeFilter,
    MediaAdminRows,
    UsageQuery,
    UserMediaOrder,
    UserUsage,
)
from mediarepo.storage.media_rows import MediaRows
from mediarepo.storage.quarantine_rows import QuarantineChange, QuarantineResult, QuarantineRows
from mediarepo.storage.schema import QuarantineRecords
from mediarepo.values import LocalMedia, RemoteMedia

logger = logging.getLogger(__name__)

# Timestamps below this are taken for seconds where milliseconds were meant.
_EARLIEST_PLAUSIBLE_TS = 30_000_000_000
QUARANTINE_CHANGES_PAGE = 100


def check_timestamp_ms(name: str, value: int) -> None:
    if value < _EARLIEST_PLAUSIBLE_TS:
        raise MatrixError(
            400,
            Codes.INVALID_PARAM,
            f"Query parameter {name} must be a timestamp in milliseconds; the value given"
            " is from the year 1970, probably seconds",
        )


class MediaAdmin:
    def __init__(
        self,
        server_name: str,
        media_store: MediaRows,
        admin_store: MediaAdminRows,
        quarantine_store: QuarantineRows,
        purger: MediaPurger,
        forget_local: Callable[[str], None],
    ) -> None:
        self.server_name = server_name
        self._media_store = media_store
        self._admin_store = admin_store
        self._quarantine = quarantine_store
        self._purger = purger
        self._forget_local = forget_local

    def is_local(self, server_name: str) -> bool:
        return server_name == self.server_name

    async def media(self, server_name: str, media_id: str) -> LocalMedia | RemoteMedia:
        """The row of local or cached remote media (nothing is fetched)."""
        media: LocalMedia | RemoteMedia | None
        if self.is_local(server_name):
            media = await self._media_store.get_local_media(media_id)
        else:
            media = await self._media_store.get_remote_media(server_name, media_id)
        if media is None:
            raise NotFoundError("Unknown media")
        return media

    # -- quarantine and protection ---------------------------------------------

    async def set_quarantined(
        self, server_name: str, media_id: str, quarantined_by: str | None
    ) -> int:
        """Quarantine (or release) a media and every media with its bytes."""
        if self.is_local(server_name):
            result = await self.change_quarantine([media_id], [], quarantined_by)
        else:
            result = await self.change_quarantine([], [(server_name, media_id)], quarantined_by)
        return result.count

    async def quarantine_user_media(self, user_id: str, quarantined_by: str) -> int:
        media_ids = await self._quarantine.unquarantined_media_of_user(user_id)
        result = await self.change_quarantine(media_ids, [], quarantined_by)
        return result.count

    async def change_quarantine(
        self,
        local_ids: list[str],
        remote_keys: list[tuple[str, str]],
        quarantined_by: str | None,
    ) -> QuarantineResult:
        if self._quarantine.records is QuarantineRecords.THROUGH_SYNAPSE:
            raise MatrixError(
                400,
                Codes.UNKNOWN,
                "This server shares Synapse's SQLite database, where only Synapse may record"
                " quarantine changes: quarantine media through Synapse's admin API",
            )
        result = await self._quarantine.set_quarantined(local_ids, remote_keys, quarantined_by)
        for media_id in result.local:
            self._forget_local(media_id)
        action = "quarantined" if quarantined_by is not None else "released from quarantine"
        logger.info(
            "%s %d local and %d remote media (asked: %s)",
            action,
            len(result.local),
            len(result.remote),
            ", ".join(local_ids + [f"{o}/{m}" for o, m in remote_keys]) or "none",
        )
        return result

    async def set_protected(self, media_id: str, protected: bool) -> None:
        if not await self._quarantine.set_protected(media_id, protected):
            raise MatrixError(404, Codes.UNKNOWN, "No row found (local_media_repository)")
        self._forget_local(media_id)

    async def quarantine_changes(self, after: int) -> tuple[list[QuarantineChange], int]:
        """A page of recorded quarantine changes after stream ID ``after``,
        and the position to ask from next."""
        if self._quarantine.records is QuarantineRecords.NONE:
            # A Synapse database from before the table: nothing is recorded.
            return [], 0
        changes, highest = await self._quarantine.changes_since(after, QUARANTINE_CHANGES_PAGE)
        if after > highest:
            raise MatrixError(
                400, Codes.INVALID_PARAM, "Query parameter from is beyond the current position"
            )
        next_batch = changes[-1].stream_id if changes else highest
        return changes, next_batch

    # -- deletion --------------------------------------------------------------

    async def delete_media(self, server_name: str, media_id: str) -> list[str]:
        """Delete one local media, quarantined or protected as it may be."""
        if not self.is_local(server_name):
            raise MatrixError(400, Codes.UNKNOWN, "Can only delete local media")
        if await self._media_store.get_local_media(media_id) is None:
            raise NotFoundError("Unknown media")
        await self._purger.delete_local([media_id], "admin request")
        return [media_id]

    async def delete_old_local_media(
        self, before_ts: int, size_gt: int, keep_profiles: bool
    ) -> list[str]:
        check_timestamp_ms("before_ts", before_ts)
        purge = LocalPurgeFilter(before_ts=before_ts, size_gt=size_gt, keep_profiles=keep_profiles)
        return await self._purger.delete_old_local(purge, "admin request")

    async def purge_remote_cache(self, before_ts: int) -> int:
        check_timestamp_ms("before_ts", before_ts)
        return await self._purger.delete_old_remote(before_ts, "admin request")

    # -- users -----------------------------------------------------------------

    async def user_media(
        self, user_id: str, start: int, limit: int, order_by: UserMediaOrder, descending: bool
    ) -> tuple[list[LocalMedia], int]:
        await self._check_local_user(user_id)
        return await self._admin_store.user_media(user_id, start, limit, order_by, descending)

    async def delete_user_media(
        self, user_id: str, start: int, limit: int, order_by: UserMediaOrder, descending: bool
    ) -> list[str]:
        """Delete the page of ``user_id``'s media that :meth:`user_media` lists."""
        media, _ = await self.user_media(user_id, start, limit, order_by, descending)
        media_ids = [m.media_id for m in media]
        if media_ids:
            await self._purger.delete_local(media_ids, "admin request")
        return media_ids

    async def usage_by_user(self, query: UsageQuery) -> tuple[list[UserUsage], int]:
        return await self._admin_store.usage_by_user(query)

    async def _check_local_user(self, user_id: str) -> None:
        if not user_id.endswith(":" + self.server_name):
            raise MatrixError(400, Codes.UNKNOWN, "Can only look up local users")
        if not await self._admin_store.user_exists(user_id):
            raise NotFoundError("Unknown user")
