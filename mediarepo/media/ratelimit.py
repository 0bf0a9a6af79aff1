"""Per-key rate limits configured like Synapse's ``rc_*`` sections: a bucket
of ``burst_count`` actions that drains at ``per_second``."""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime

from mediarepo.config_federation import FederationRateLimit
from mediarepo.config_reader import RateLimit
from mediarepo.errors import Codes, MatrixError


class Ratelimiter:
    def __init__(self, limit: RateLimit, clock: IReactorTime, max_keys: int = 100_000) -> None:
        self._limit = limit
        self._clock = clock
        self._max_keys = max_keys
        # key -> (actions in the bucket, when it was last drained)
        self._buckets: dict[str, tuple[float, float]] = {}

    def _level(self, key: str, now: float) -> float:
        """How full ``key``'s bucket is now, after draining."""
        actions, since = self._buckets.get(key, (0.0, now))
        return max(0.0, actions - (now - since) * self._limit.per_second)

    def check(self, key: str, amount: int = 1) -> None:
        """Count ``amount`` actions for ``key``, or raise 429 ``M_LIMIT_EXCEEDED``
        with the time until they would fit."""
        now = self._clock.seconds()
        actions = self._level(key, now)
        if actions + amount > self._limit.burst_count:
            wait = (actions + amount - self._limit.burst_count) / max(self._limit.per_second, 1e-9)
            raise limit_exceeded(math.ceil(wait * 1000))
        self._store(key, actions + amount, now)

    def require_room(self, key: str, amount: int) -> None:
        """Raise 429 unless ``amount`` more would fit in ``key``'s bucket,
        counting nothing (for work whose size is known only afterwards)."""
        if self._level(key, self._clock.seconds()) + amount > self._limit.burst_count:
            raise MatrixError(429, Codes.LIMIT_EXCEEDED, "Requested file size exceeds ratelimits")

    def charge(self, key: str, amount: int) -> None:
        """Count ``amount`` done, even past the burst (the next request waits)."""
        now = self._clock.seconds()
        self._store(key, self._level(key, now) + amount, now)

    def _store(self, key: str, actions: float, now: float) -> None:
        if len(self._buckets) >= self._max_keys and key not in self._buckets:
            self._forget_drained(now)
        self._buckets[key] = (actions, now)

    def _forget_drained(self, now: float) -> None:
        per_second = self._limit.per_second
        self._buckets = {
            k: (a, t) for k, (a, t) in self._buckets.items() if a - (now - t) * per_second > 0
        }


def limit_exceeded(retry_after_ms: int) -> MatrixError:
    """429 with the retry hint in the body and, rounded up to seconds, the header."""
    retry_after_ms = max(retry_after_ms, 0)
    return MatrixError(
        429,
        Codes.LIMIT_EXCEEDED,
        "Too Many Requests",
        extra={"retry_after_ms": retry_after_ms},
        headers={"Retry-After": str(math.ceil(retry_after_ms / 1000))},
    )


_MAX_TRACKED_ORIGINS = 10_000


class OriginLimiter:
    """Keeps one peer from taking the whole server, as Synapse's
    ``rc_federation`` does."""

    def __init__(self, limit: FederationRateLimit, clock: IReactorTime) -> None:
        self._limit = limit
        self._clock = clock
        self._recent: dict[str, list[float]] = {}
        self._running: dict[str, int] = {}
        self._waiting: dict[str, list[defer.Deferred[None]]] = {}

    @contextlib.asynccontextmanager
    async def slot(self, origin: str) -> AsyncIterator[None]:
        limit = self._limit
        now = self._clock.seconds()
        window = limit.window_size_ms / 1000
        recent = [t for t in self._recent.get(origin, []) if now - t < window]
        recent.append(now)
        if len(self._recent) > _MAX_TRACKED_ORIGINS:
            self._recent = {o: ts for o, ts in self._recent.items() if now - ts[-1] < window}
        self._recent[origin] = recent
        waiting = self._waiting.setdefault(origin, [])
        if len(recent) > limit.reject_limit:
            raise MatrixError(429, Codes.LIMIT_EXCEEDED, "Too many requests")
        if len(recent) > limit.sleep_limit:
            await task.deferLater(self._clock, limit.sleep_delay_ms / 1000, lambda: None)
        if self._running.get(origin, 0) >= limit.concurrent:
            turn: defer.Deferred[None] = defer.Deferred()
            waiting.append(turn)
            await turn
        self._running[origin] = self._running.get(origin, 0) + 1
        try:
            yield
        finally:
            self._running[origin] -= 1
            if waiting:
                waiting.pop(0).callback(None)
            elif not self._running[origin]:
                del self._running[origin]
                self._waiting.pop(origin, None)
