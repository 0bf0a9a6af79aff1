"""Leaving failing servers alone for a while, as Synapse does, in Synapse's
``destinations`` table (so a server Synapse gave up on is left alone by us
too, and the other way round).

A request that cannot reach a server, or that it answers with 5xx, 401 or
429, starts a backoff of ``destination_min_retry_interval`` or, if one was
running, multiplies it by ``destination_retry_multiplier`` (jittered by
0.8-1.4), up to ``destination_max_retry_interval``. Until
``retry_last_ts + retry_interval`` the server is not contacted. A success
ends the backoff; other answers (404 and the like) leave it as it is.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import attrs

from mediarepo.config_federation import FederationConfig
from mediarepo.storage.destination_rows import DestinationRows, RetryTimings

logger = logging.getLogger(__name__)

# Synapse's jitter on each lengthening of a backoff.
JITTER = (0.8, 1.4)


@attrs.frozen
class BackoffPolicy:
    min_interval_ms: int
    multiplier: float
    max_interval_ms: int

    @classmethod
    def from_config(cls, config: FederationConfig) -> BackoffPolicy:
        return cls(
            config.destination_min_retry_interval_ms,
            config.destination_retry_multiplier,
            config.destination_max_retry_interval_ms,
        )

    def next_interval(self, current_ms: int, rng: random.Random) -> int:
        """The backoff after one more failure, ``current_ms`` being the one
        that ran (0: none)."""
        if not current_ms:
            return self.min_interval_ms
        lengthened = int(current_ms * self.multiplier * rng.uniform(*JITTER))
        return min(lengthened, self.max_interval_ms)


def answer_counts_as_failure(code: int) -> bool:
    """Whether an HTTP answer says the server is not really there (Synapse's
    rule: 5xx, and 401 and 429, which say it won't take our requests)."""
    return code >= 500 or code in (401, 429)


class DestinationAttempt:
    """One request to a server, with what the table said of it beforehand."""

    def __init__(
        self,
        backoff: DestinationBackoff,
        destination: str,
        timings: RetryTimings | None,
        ignore_backoff: bool,
    ) -> None:
        self._backoff = backoff
        self.destination = destination
        self.timings = timings
        self._ignore_backoff = ignore_backoff

    def retry_at_ms(self) -> int | None:
        """When the server may be tried again, if it is being left alone."""
        if self.timings is None or self._ignore_backoff:
            return None
        return self.timings.retry_last_ts + self.timings.retry_interval

    async def answered(self, code: int) -> None:
        if 200 <= code < 300:
            await self.succeeded()
        elif answer_counts_as_failure(code):
            await self.failed(f"HTTP {code}")

    async def succeeded(self) -> None:
        if self.timings is None or not self.timings.retry_interval:
            return
        logger.info("%s answers again: backoff cleared", self.destination)
        await self._backoff.record(self.destination, None, 0, 0)

    async def failed(self, reason: str) -> None:
        # A request made despite the backoff (key fetches) does not lengthen
        # it, or a server down briefly would soon reach the maximum.
        if self._ignore_backoff:
            return
        current = self.timings.retry_interval if self.timings is not None else 0
        interval = self._backoff.policy.next_interval(current, self._backoff.rng)
        now = self._backoff.now_ms()
        failure_ts = self.timings.failure_ts if self.timings is not None else None
        logger.info("%s failed (%s): not tried again for %d ms", self.destination, reason, interval)
        await self._backoff.record(
            self.destination, failure_ts if failure_ts else now, now, interval
        )


class DestinationBackoff:
    def __init__(
        self,
        store: DestinationRows,
        policy: BackoffPolicy,
        clock: Any,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self.policy = policy
        self._clock = clock
        self.rng = rng or random.Random()

    def now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    async def attempt(
        self, destination: str, *, ignore_backoff: bool = False
    ) -> DestinationAttempt:
        """Begin a request to ``destination``; check its ``retry_at_ms()``
        before sending it. If the table cannot be read, the server is
        taken as not failing: the request decides."""
        try:
            timings = await self._store.get_retry_timings(destination)
        except Exception as e:
            logger.warning("cannot read the backoff of %s: %s", destination, e)
            timings = None
        return DestinationAttempt(self, destination, timings, ignore_backoff)

    async def record(
        self, destination: str, failure_ts: int | None, retry_last_ts: int, interval: int
    ) -> None:
        try:
            await self._store.set_retry_timings(destination, failure_ts, retry_last_ts, interval)
        except Exception as e:
            logger.warning("cannot record the backoff of %s: %s", destination, e)

    async def clear(self, destination: str) -> None:
        """``destination`` reached us (a signed request we verified): it is
        up, so stop leaving it alone, as Synapse does."""
        try:
            if await self._store.clear_retry_timings(destination):
                logger.info("%s reached us: backoff cleared", destination)
        except Exception as e:
            logger.warning("cannot clear the backoff of %s: %s", destination, e)
