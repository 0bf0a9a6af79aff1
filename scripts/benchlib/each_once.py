"""Many clients at once, each URL asked exactly once: the shape of the
scenarios that measure first requests (remote fetches, cold thumbnails),
where every GET makes the server do the work anew."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from benchlib.httpclient import RequestFailed, Response
from benchlib.results import Result, ms_percentiles
from benchlib.scenarios import Measurement, Options, Target

# What a 200 answer must also satisfy: "" if it does, else what is wrong.
Check = Callable[[Response], str]


@dataclass
class EachOnce:
    """Latencies of the GETs that answered well, and what went wrong."""

    requests: int
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)
    bytes: int = 0
    elapsed: float = 0.0

    def result(self, target: Target, scenario: str, variant: str, clients: int) -> Result:
        pct = ms_percentiles(self.latencies)
        elapsed = self.elapsed
        return Result(
            server=target.label,
            scenario=scenario,
            variant=variant,
            tool="asyncio",
            connections=clients,
            requests=self.requests,
            errors=self.requests - len(self.latencies),
            error_kinds=dict(self.errors),
            error_samples=self.samples[:5],
            duration_s=elapsed,
            rps=len(self.latencies) / elapsed if elapsed else None,
            p50_ms=pct.get("p50_ms"),
            p95_ms=pct.get("p95_ms"),
            p99_ms=pct.get("p99_ms"),
            bytes=self.bytes,
            mb_s=self.bytes / elapsed / 1e6 if elapsed and self.bytes else None,
        )


async def get_each_once(
    target: Target, opts: Options, paths: list[str], clients: int, check: Check
) -> tuple[EachOnce, Measurement]:
    """``clients`` connections at once, each taking the next of ``paths``
    until none is left; measured from when the server is idle. Returns the
    outcome and the measurement (for the caller to finish with its result)."""
    outcome = EachOnce(requests=len(paths))
    pending = list(reversed(paths))

    async def client() -> None:
        conn = target.connection(timeout=opts.request_timeout)
        try:
            while pending:
                path = pending.pop()
                t0 = time.perf_counter()
                try:
                    response = await conn.request("GET", path)
                except RequestFailed as e:
                    outcome.errors["connection error"] += 1
                    outcome.samples.append(f"GET {path} -> {e}")
                    continue
                took = time.perf_counter() - t0
                wrong = f"status {response.status}" if response.status != 200 else check(response)
                if wrong:
                    outcome.errors[wrong] += 1
                    outcome.samples.append(f"GET {path} -> {response.short()}")
                    continue
                outcome.latencies.append(took)
                outcome.bytes += len(response.body)
        finally:
            conn.close()

    measurement = Measurement(target)
    await asyncio.to_thread(measurement.begin)
    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    outcome.elapsed = time.perf_counter() - start
    return outcome, measurement
