"""A test clock for code that also waits on real work.

The media layer's unit tests run its timers on a :class:`task.Clock` while
the database and file work stay real (threads, the reactor). A test cannot
know when such code has got past its real work and is waiting on the
clock; :meth:`WatchedClock.waiting` tells it, so that it advances the clock
then, and only then.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.interfaces import IDelayedCall

# How long a test waits for the code to start waiting on the clock before
# failing (the code went elsewhere: the test is wrong, or the code is).
_WAITING_TIMEOUT_SECONDS = 10.0


class WatchedClock(task.Clock):
    """A :class:`task.Clock` that says when a call is scheduled on it."""

    def __init__(self) -> None:
        super().__init__()
        self._watchers: list[tuple[float, defer.Deferred[IDelayedCall]]] = []

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kw: object
    ) -> IDelayedCall:
        call = super().callLater(delay, callable, *args, **kw)
        for watcher in list(self._watchers):
            seconds, waiting = watcher
            if self._due_in(call, seconds):
                self._watchers.remove(watcher)
                # Told once the code's step is over: it has scheduled the
                # call but not yet begun waiting for it.
                reactor.callLater(0, waiting.callback, call)
        return call

    def waiting(self, seconds: float) -> defer.Deferred[IDelayedCall]:
        """Fires once a call is due ``seconds`` from now: at once if one is
        already scheduled, else when the code schedules it."""
        for call in self.getDelayedCalls():
            if self._due_in(call, seconds):
                return defer.succeed(call)
        waiting: defer.Deferred[IDelayedCall] = defer.Deferred()
        self._watchers.append((seconds, waiting))
        return waiting.addTimeout(_WAITING_TIMEOUT_SECONDS, reactor)

    def _due_in(self, call: IDelayedCall, seconds: float) -> bool:
        # Within what a float keeps of a fraction next to today's epoch seconds.
        return call.active() and abs(call.getTime() - self.seconds() - seconds) < 1e-6
