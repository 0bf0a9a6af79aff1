"""Building blocks of the server's ``twisted.application`` service tree.

A running server is an :class:`OrderedServices`: named child services
started in the order they were added and stopped one at a time in the
reverse order. Stopping always completes: each child's stop runs whatever
became of the others (a failure is logged, not raised) and each wait is
bounded, by the child's own limit or by a step's time, and never past the
whole stop's deadline.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

logger = logging.getLogger(__name__)

# How long a stop waits for each child that sets no limit of its own.
STOP_STEP_SECONDS = 5.0


class Outcome:
    """How something that happens once (a start, a stop) ended, for any
    number of waiters, whether they come before or after the end."""

    def __init__(self) -> None:
        self._ended = False
        self._failure: Failure | None = None
        self._waiters: list[defer.Deferred[None]] = []

    @property
    def ended(self) -> bool:
        return self._ended

    def wait(self) -> defer.Deferred[None]:
        if not self._ended:
            waiter: defer.Deferred[None] = defer.Deferred()
            self._waiters.append(waiter)
            return waiter
        if self._failure is not None:
            return defer.fail(self._failure)
        return defer.succeed(None)

    def end(self, result: object) -> None:
        """End with ``result``: a Failure, or anything else for success."""
        if self._ended:
            return
        self._ended = True
        if isinstance(result, Failure):
            self._failure = result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if self._failure is not None:
                waiter.errback(self._failure)
            else:
                waiter.callback(None)


class StepService(Service):
    """A child service made of what to do at start and at stop, either
    optional: ``stop`` may return an awaitable, waited for at most
    ``stop_seconds`` (a step's time when None)."""

    def __init__(
        self,
        name: str,
        *,
        start: Callable[[], object] | None = None,
        stop: Callable[[], object] | None = None,
        stop_seconds: float | Callable[[], float] | None = None,
    ) -> None:
        self.name = name
        self._start = start
        self._stop = stop
        self.stop_seconds = stop_seconds

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self._start is not None:
            self._start()

    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._stop is None:
            return None
        result = self._stop()
        if isinstance(result, defer.Deferred) or inspect.iscoroutine(result):
            return defer.ensureDeferred(result)
        return None


class OrderedServices(MultiService):
    """Children started in order and stopped in reverse, one at a time,
    each within its bounded wait (see the module's docstring)."""

    def __init__(self, clock: IReactorTime, stop_budget_seconds: float) -> None:
        # Twisted's MultiService has no annotations here.
        super().__init__()  # type: ignore[no-untyped-call]
        self._clock = clock
        # The whole stop ends by this long after it begins, a step more at most.
        self.stop_budget_seconds = stop_budget_seconds
        self._stopping = False
        self.stopped = Outcome()

    def add(self, service: IService) -> None:
        """Add a child; it starts at once if this service is running."""
        # Twisted's MultiService.addService has no annotations.
        self.addService(service)  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]

    def stopService(self) -> defer.Deferred[None]:
        """Stop every child; a second call waits for the first."""
        if not self._stopping:
            self._stopping = True
            Service.stopService(self)
            defer.ensureDeferred(self._stop_children()).addBoth(self.stopped.end)
        return self.stopped.wait()

    async def _stop_children(self) -> None:
        await self.before_stopping_children()
        deadline = self._clock.seconds() + self.stop_budget_seconds + STOP_STEP_SECONDS
        for service in reversed(list(self)):
            if not service.running:
                continue
            limit = getattr(service, "stop_seconds", None)
            if callable(limit):
                limit = limit()
            if limit is None:
                limit = max(0.1, min(STOP_STEP_SECONDS, deadline - self._clock.seconds()))
            await self._stop_child(service.name or repr(service), service.stopService, limit)
        self.all_stopped()

    async def before_stopping_children(self) -> None:
        """What to finish before the children stop (a start still under way)."""

    def all_stopped(self) -> None:
        """Called once every child has stopped (or given up)."""

    async def _stop_child(
        self, name: str, stop: Callable[[], Awaitable[object] | object], seconds: float
    ) -> None:
        try:
            result: Any = stop()
            if isinstance(result, defer.Deferred) or inspect.iscoroutine(result):
                waiting: defer.Deferred[object] = defer.ensureDeferred(result)
                waiting.addTimeout(seconds, self._clock)
                await waiting
        except defer.TimeoutError:
            logger.warning("stopping: %s did not finish within %.1fs; going on", name, seconds)
        except Exception:
            logger.exception("stopping: %s failed; going on", name)
