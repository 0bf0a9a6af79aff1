"""Pre-generated thumbnails that a crash cannot lose.

An upload is answered before its thumbnails are made (and a remote file is
served before its are). So that a crash in between loses nothing, the work
is noted in the database in the transaction that writes the media's row, by
the process that will do it, and the note is deleted once the thumbnails
are written. What a dead process left is resumed: at start by every
process, and by the periodic sweep. An item is taken over when its owner
is known to have exited (a process of this machine) or its lease ran out;
the takeover is one conditional update, so one process resumes it. An item
taken over ``MAX_TAKEOVERS`` times (media that kills the process making
its thumbnails, say) is given up with a warning instead of crash-looping.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from prometheus_client import Counter
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from mediarepo.media.locks import instance_is_dead
from mediarepo.storage.pending_thumbnail_rows import PendingThumbnailRows, PendingThumbnails

logger = logging.getLogger(__name__)

thumbnails_resumed = Counter(
    "mediarepo_thumbnails_resumed_total",
    "Media whose unfinished thumbnail pre-generation was taken over from another process",
    ["result"],
)

# How long the process that notes the work has to finish it before another
# may take it over (when it cannot be known to have exited).
LEASE_SECONDS = 600.0
MAX_TAKEOVERS = 3
# Items resumed at once (the thumbnail pool bounds the decoding itself).
_BATCH = 10


class PendingThumbnailWork:
    def __init__(self, store: PendingThumbnailRows, instance_name: str, clock: IReactorTime):
        self.store = store
        self.instance_name = instance_name
        self._clock = clock
        self._running: defer.Deferred[int] | None = None
        self._run_again = False
        self._stopping = False

    def _lease_until(self) -> int:
        return int((self._clock.seconds() + LEASE_SECONDS) * 1000)

    def owed(self, media_origin: str, media_id: str) -> PendingThumbnails:
        """The note of work owed to new media, as this process's: the
        storage layer writes it in the transaction that writes the media's
        row."""
        return PendingThumbnails(media_origin, media_id, self.instance_name,
                                 self._lease_until(), attempts=0)  # fmt: skip

    async def done(self, media_origin: str, media_id: str) -> None:
        await self.store.remove(media_origin, media_id)

    def resume_soon(self, run_one: Callable[[PendingThumbnails], Awaitable[None]]) -> None:
        """Resume what other processes left, in the background; if a run is
        under way, once more after it."""
        if self._stopping:
            return
        if self._running is not None:
            self._run_again = True
            return
        self._run_again = False
        self._running = defer.ensureDeferred(self.resume(run_one))

        def finished(result: object) -> object:
            self._running = None
            if self._run_again:
                self.resume_soon(run_one)
            return result

        self._running.addBoth(finished)
        self._running.addErrback(
            lambda f: logger.error("resuming thumbnail pre-generation failed: %s", f.value)
        )

    async def wait_idle(self) -> None:
        """Wait for a run under way (tests, shutdown)."""
        while self._running is not None:
            await self._running

    async def stop(self) -> None:
        """Take nothing more over, and wait for what was taken (shutdown)."""
        self._stopping = True
        await self.wait_idle()

    async def resume(self, run_one: Callable[[PendingThumbnails], Awaitable[None]]) -> int:
        """Take over and do what exited processes and lapsed leases left;
        returns how many media were done."""
        now_ms = int(self._clock.seconds() * 1000)
        owners = await self.store.owners()
        dead = [o for o in owners if o != self.instance_name and instance_is_dead(o)]
        resumed = 0
        while not self._stopping:
            items = await self.store.takeable(dead, now_ms, _BATCH)
            taken: list[PendingThumbnails] = []
            progress = False
            for item in items:
                if item.attempts >= MAX_TAKEOVERS:
                    logger.warning(
                        "giving up the thumbnails of %s after %d takeovers",
                        _name(item), item.attempts,
                    )  # fmt: skip
                    await self.store.remove(item.media_origin, item.media_id)
                    thumbnails_resumed.labels("given_up").inc()
                    progress = True
                elif await self.store.claim(item, self.instance_name, self._lease_until()):
                    taken.append(item)
            if not taken and not progress:
                break
            outcomes = await defer.DeferredList(
                [defer.ensureDeferred(self._resume_one(run_one, item)) for item in taken]
            )
            resumed += sum(1 for ok, done in outcomes if ok and done)
        if resumed:
            logger.info("resumed the thumbnail pre-generation of %d media", resumed)
        return resumed

    async def _resume_one(
        self, run_one: Callable[[PendingThumbnails], Awaitable[None]], item: PendingThumbnails
    ) -> bool:
        logger.info("resuming the thumbnails of %s, left by %s", _name(item), item.instance_name)
        try:
            await run_one(item)
        except Exception:
            # The item stays, with our lease: a later sweep tries again.
            logger.exception("resuming the thumbnails of %s failed", _name(item))
            thumbnails_resumed.labels("failed").inc()
            return False
        thumbnails_resumed.labels("done").inc()
        return True


def _name(item: PendingThumbnails) -> str:
    return f"{item.media_origin}/{item.media_id}" if item.media_origin else item.media_id
