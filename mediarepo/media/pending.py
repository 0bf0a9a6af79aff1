"""Waiting for the content of a reserved media ID (``/create`` then ``PUT``).

A download of a reservation without content waits for the upload. The wait
holds no thread and no database connection: it is a Deferred, fired when
the content lands in this process, when another process announces it
(PostgreSQL ``NOTIFY``), or after a poll interval, whichever comes first,
so that uploads landing where no announcement reaches us (a Synapse media
worker, SQLite) are still seen.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

# How often a waiting download looks at the database again.
POLL_SECONDS = 0.5


class ContentArrivals:
    def __init__(self, clock: IReactorTime, poll_seconds: float = POLL_SECONDS) -> None:
        self._clock = clock
        self.poll_seconds = poll_seconds
        self._waiting: dict[str, set[defer.Deferred[None]]] = {}

    def announce(self, media_id: str) -> None:
        """The content of ``media_id`` has landed: wake its waiters."""
        for waiter in self._waiting.pop(media_id, set()):
            if not waiter.called:
                waiter.callback(None)

    def waiting(self, media_id: str) -> int:
        """How many downloads wait for the content of ``media_id``."""
        return len(self._waiting.get(media_id, ()))

    async def wait(self, media_id: str, seconds: float) -> None:
        """Return when ``media_id``'s content is announced or ``seconds`` pass."""
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiting.setdefault(media_id, set()).add(waiter)
        timer = self._clock.callLater(seconds, waiter.callback, None)
        try:
            await waiter
        finally:
            if timer.active():
                timer.cancel()
            waiters = self._waiting.get(media_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiting[media_id]
