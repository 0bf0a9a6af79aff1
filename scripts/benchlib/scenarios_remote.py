"""Remote media fetched over federation for the first time: what every
federated user waits for when someone on another server posts a file.

``remote_fetch`` asks the server under test, as a client
(``/_matrix/client/v1/media/download/{origin}/{id}``), for media of the
bench's origin (:mod:`benchlib.origin`, on loopback TLS, trusted by both
servers) that it has never fetched: each GET makes the server fetch the
media over federation, store it and stream it back. Three sizes, each a
variant: ``4KiB`` (``SMALL_COUNT`` media, ``SMALL_CLIENTS`` clients at
once), ``1MiB`` and ``20MiB``. Reported per size: first fetches/s, the
latency p50/p95/p99 of each GET, and MB/s delivered to the clients.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter

from benchlib.httpclient import RequestFailed
from benchlib.results import Result, ms_percentiles
from benchlib.scenarios import (
    Measurement,
    Options,
    ScenarioSkipped,
    Target,
    download_path,
)

KIB = 1024
MIB = 1024 * 1024
# (variant, the origin's size tag, bytes, media fetched, clients at once)
REMOTE_SIZES = (
    ("4KiB", "s", 4 * KIB, 200, 8),
    ("1MiB", "m", 1 * MIB, 50, 4),
    ("20MiB", "l", 20 * MIB, 12, 4),
)


def _run_prefix(target: Target) -> str:
    """Media IDs of the origin no server has seen: a fresh prefix per run and target."""
    return "b" + os.urandom(6).hex() + "".join(c for c in target.label if c.isalnum())


async def remote_fetch(target: Target, opts: Options) -> list[Result]:
    if not opts.origin:
        raise ScenarioSkipped(
            "no origin: remote_fetch runs with --start-ours or --compare-synapse, which "
            "start the bench's origin and make the servers trust it"
        )
    prefix = _run_prefix(target)
    results = []
    for variant, tag, size, count, clients in REMOTE_SIZES:
        media_ids = [f"{prefix}{tag}{n}" for n in range(count)]
        results.append(
            await _fetch_all(target, opts, opts.origin, variant, size, media_ids, clients)
        )
    return results


async def _fetch_all(
    target: Target,
    opts: Options,
    origin: str,
    variant: str,
    size: int,
    media_ids: list[str],
    clients: int,
) -> Result:
    clients = opts.conns(clients)
    pending = list(reversed(media_ids))
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    samples: list[str] = []
    delivered = 0

    async def client() -> None:
        nonlocal delivered
        conn = target.connection(timeout=opts.request_timeout)
        try:
            while pending:
                path = target.path(download_path(origin, pending.pop()))
                t0 = time.perf_counter()
                try:
                    response = await conn.request("GET", path)
                except RequestFailed as e:
                    errors["connection error"] += 1
                    samples.append(f"GET {path} -> {e}")
                    continue
                took = time.perf_counter() - t0
                if response.status != 200 or len(response.body) != size:
                    errors[f"{response.status}, {len(response.body)} bytes"] += 1
                    samples.append(f"GET {path} -> {response.short()}")
                    continue
                latencies.append(took)
                delivered += size
        finally:
            conn.close()

    measurement = Measurement(target)
    await asyncio.to_thread(measurement.begin)
    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    pct = ms_percentiles(latencies)
    result = Result(
        server=target.label,
        scenario="remote_fetch",
        variant=variant,
        tool="asyncio",
        connections=clients,
        requests=len(media_ids),
        errors=len(media_ids) - len(latencies),
        error_kinds=dict(errors),
        error_samples=samples[:5],
        duration_s=elapsed,
        rps=len(latencies) / elapsed if elapsed else None,
        p50_ms=pct.get("p50_ms"),
        p95_ms=pct.get("p95_ms"),
        p99_ms=pct.get("p99_ms"),
        bytes=delivered,
        mb_s=delivered / elapsed / 1e6 if elapsed and delivered else None,
        notes=[f"{len(media_ids)} media of {variant}, each fetched once from the origin"],
    )
    return measurement.finish(result)
