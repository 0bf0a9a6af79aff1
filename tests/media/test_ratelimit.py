"""Rate limiters, on a controlled clock."""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial import unittest

from mediarepo.config_federation import FederationRateLimit
from mediarepo.config_reader import RateLimit
from mediarepo.errors import MatrixError
from mediarepo.media.ratelimit import OriginLimiter, Ratelimiter


class RatelimiterTests(unittest.TestCase):
    def test_burst_then_drain(self) -> None:
        clock = task.Clock()
        limiter = Ratelimiter(RateLimit(per_second=2, burst_count=3), clock)
        for _ in range(3):
            limiter.check("alice")
        with self.assertRaises(MatrixError) as raised:
            limiter.check("alice")
        self.assertEqual(raised.exception.code, 429)
        self.assertEqual(raised.exception.extra["retry_after_ms"], 500)
        limiter.check("bob")  # a bucket of its own
        clock.advance(0.5)
        limiter.check("alice")

    def test_room_and_charge(self) -> None:
        clock = task.Clock()
        limiter = Ratelimiter(RateLimit(per_second=100, burst_count=1000), clock)
        limiter.require_room("ip", 1000)
        limiter.charge("ip", 5000)  # may overshoot once
        with self.assertRaises(MatrixError):
            limiter.require_room("ip", 1)
        clock.advance(41)
        limiter.require_room("ip", 1)


class OriginLimiterTests(unittest.TestCase):
    def test_concurrency_queue_and_rejection(self) -> None:
        clock = task.Clock()
        limit = FederationRateLimit(sleep_limit=100, reject_limit=5, concurrent=2)
        limiter = OriginLimiter(limit, clock)
        release: list[defer.Deferred[None]] = []
        running = []

        async def request(name: str) -> None:
            async with limiter.slot("peer.example"):
                running.append(name)
                gate: defer.Deferred[None] = defer.Deferred()
                release.append(gate)
                await gate

        started = [defer.ensureDeferred(request(str(i))) for i in range(5)]
        self.assertEqual(running, ["0", "1"])  # two at once, three queued
        rejected = defer.ensureDeferred(request("late"))
        self.failureResultOf(rejected, MatrixError)
        # Another origin is not held up.
        other = defer.ensureDeferred(self._other(limiter))
        self.assertIsNone(self.successResultOf(other))
        release.pop(0).callback(None)
        self.assertEqual(running, ["0", "1", "2"])
        while release:
            release.pop(0).callback(None)
        for d in started:
            self.successResultOf(d)
        self.assertEqual(running, ["0", "1", "2", "3", "4"])

    async def _other(self, limiter: OriginLimiter) -> None:
        async with limiter.slot("other.example"):
            pass

    def test_sleeps_past_the_sleep_limit(self) -> None:
        clock = task.Clock()
        limiter = OriginLimiter(FederationRateLimit(sleep_limit=2, sleep_delay_ms=500), clock)

        async def request() -> None:
            async with limiter.slot("peer.example"):
                pass

        self.successResultOf(defer.ensureDeferred(request()))
        self.successResultOf(defer.ensureDeferred(request()))
        third = defer.ensureDeferred(request())
        self.assertNoResult(third)
        clock.advance(0.5)
        self.successResultOf(third)
