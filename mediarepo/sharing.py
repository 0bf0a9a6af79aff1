"""One run of a piece of work at a time per key, its result shared by every
caller who asked while it ran (a thumbnail being generated, a remote file
being fetched)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SharedWork(Generic[K, V]):
    def __init__(self) -> None:
        self._running: dict[K, list[defer.Deferred[V]]] = {}

    async def run(self, key: K, work: Callable[[], Awaitable[V]]) -> V:
        """``work()``'s result; if work for ``key`` is already running, that
        run's result (or its exception) instead of a second run."""
        waiters = self._running.get(key)
        if waiters is not None:
            waiter: defer.Deferred[V] = defer.Deferred()
            waiters.append(waiter)
            return await waiter
        self._running[key] = []
        try:
            result = await work()
        except BaseException:
            failure = Failure()
            for waiter in self._running.pop(key):
                waiter.errback(failure)
            raise
        for waiter in self._running.pop(key):
            waiter.callback(result)
        return result

    async def wait_all(self) -> None:
        """Return once every run started so far has ended."""
        for key in list(self._running):
            await self.wait(key)

    async def wait(self, key: K) -> None:
        """Return once the work running for ``key`` (if any) has ended,
        whatever its outcome."""
        waiters = self._running.get(key)
        if waiters is None:
            return
        waiter: defer.Deferred[V] = defer.Deferred()
        waiters.append(waiter)
        try:
            await waiter
        except Exception:
            pass
