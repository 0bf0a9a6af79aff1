"""Scenarios that need a populated database (``scripts/bench --populate N``):
downloads of many different media, the admin listing of a user with many
media, and the purge of stale media while downloads go on; and the table
that sets each scenario's figures at every population side by side.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any, TextIO
from urllib.parse import quote

from benchlib.httpclient import Connection, RequestFailed
from benchlib.populate import Population, iter_sample, purge_plan
from benchlib.results import Result, ms_percentiles
from benchlib.scenarios import (
    Measurement,
    Options,
    Recorder,
    Scenario,
    ScenarioFailed,
    ScenarioSkipped,
    Target,
    closed_loop,
    download_path,
    loop_result,
)

ADMIN = "/_synapse/admin/v1"
# The goal: no scenario's p99 at the largest population above this many
# times its p99 at the smallest.
P99_GOAL = 1.5


def _population(opts: Options) -> Population:
    population = opts.population
    if not isinstance(population, Population):
        raise ScenarioSkipped("needs a populated database: scripts/bench --populate N")
    return population


async def _download_one(
    target: Target, conn: Connection, rec: Recorder, media: Iterator[str]
) -> bool:
    """GET the next media of ``media``, recorded as a "download" step."""
    path = target.path(download_path(target.server_name, next(media)))
    t0 = time.perf_counter()
    try:
        response = await conn.request("GET", path)
    except RequestFailed as e:
        rec.failure("download", e, f"GET {path}")
        return False
    ok = rec.response("download", time.perf_counter() - t0, response, f"GET {path}")
    if ok:
        rec.bytes_sent += len(response.body)
    return ok


async def _download_loop(
    target: Target, opts: Options, connections: int, media: Iterator[str], stop: asyncio.Event
) -> Recorder:
    """Download populated media on ``connections`` connections until ``stop``."""
    recorder = Recorder()

    async def worker() -> None:
        conn = target.connection(timeout=opts.request_timeout)
        try:
            while not stop.is_set():
                recorder.ops += 1
                if await _download_one(target, conn, recorder, media):
                    recorder.ok_ops += 1
                else:
                    await asyncio.sleep(0.01)
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return recorder


async def download_populated(target: Target, opts: Options) -> list[Result]:
    """4 KiB downloads, each of a different populated media (no cache helps)."""
    population = _population(opts)
    connections = opts.conns(16)
    media = iter_sample(population, random.Random(1))

    async def op(conn: Connection, rec: Recorder) -> bool:
        return await _download_one(target, conn, rec, media)

    measurement = Measurement(target)
    await asyncio.to_thread(measurement.begin)
    recorder, elapsed = await closed_loop(target, opts, connections, op)
    result = loop_result(target, "download_populated", connections, recorder, elapsed, "download")
    result.mb_s = None
    result.notes.append(f"{len(population.sample_media)} different 4 KiB media in random order")
    return [measurement.finish(result)]


# Orders of the admin listing measured: (variant, query, deep pages only).
_LISTINGS = (
    ("newest", "", False),
    ("newest_deep", "", True),
    ("by_size", "&order_by=media_length&dir=b", False),
)
# The variants of the user whose media grow with the population: their p99
# ratio mixes the user's growth with the table's, so the goal is not theirs.
HEAVY_PREFIX = "heavy_"


async def admin_user_media(target: Target, opts: Options) -> list[Result]:
    """GET /users/<user>/media: pages of 100 at random offsets (the newest
    first, as the API defaults, then the last tenth of the pages, then by
    size), 4 connections; first for a user with the same number of media at
    every population (how the listing follows the table's size), then for
    the heavy user, who owns min(100k, N/10) media (the issue's "user with
    100k media" at a million rows)."""
    population = _population(opts)
    users = (
        ("", population.listed_user, population.listed_count),
        (HEAVY_PREFIX, population.heavy_user, population.heavy_count),
    )
    results = []
    for prefix, user, count in users:
        for variant, query, deep in _LISTINGS:
            results.append(
                await _list_user_media(target, opts, user, count, prefix + variant, query, deep)
            )
    return results


async def _list_user_media(
    target: Target, opts: Options, user: str, count: int, variant: str, query: str, deep: bool
) -> Result:
    """One variant of ``admin_user_media``: pages of ``user``'s ``count`` media."""
    connections = opts.conns(4)
    base = f"{ADMIN}/users/{quote(user)}/media?limit=100"
    probe = target.connection(timeout=opts.request_timeout)
    try:
        response = await probe.request("GET", target.path(base))
    except RequestFailed as e:
        raise ScenarioFailed(f"GET {base}: {e}") from e
    finally:
        probe.close()
    if response.status != 200:
        raise ScenarioFailed(f"GET {base} answered {response.short()}")
    total = response.json().get("total")
    if total != count:
        raise ScenarioFailed(f"the listing of {user} counts {total} media, not {count}")
    rng = random.Random(variant)
    low = total * 9 // 10 if deep else 0

    async def op(conn: Connection, rec: Recorder) -> bool:
        start = rng.randrange(low, max(low + 1, total - 100))
        path = target.path(f"{base}{query}&from={start}")
        t0 = time.perf_counter()
        try:
            page = await conn.request("GET", path)
        except RequestFailed as e:
            rec.failure("page", e, f"GET {path}")
            return False
        return rec.response("page", time.perf_counter() - t0, page, f"GET {path}")

    measurement = Measurement(target)
    await asyncio.to_thread(measurement.begin)
    recorder, elapsed = await closed_loop(target, opts, connections, op)
    result = loop_result(target, "admin_user_media", connections, recorder, elapsed, "page")
    result.variant = variant
    result.mb_s = None
    result.notes.append(f"pages of 100 of {user}'s {total} media")
    return measurement.finish(result)


async def purge_stale(target: Target, opts: Options) -> list[Result]:
    """Delete stale local media (POST /media/delete?before_ts=) and then
    stale cached remote media (POST /purge_media_cache?before_ts=), the
    oldest of the server's purge plan, each measured in rows/s, while 8
    connections download other media: their p99 shows whether the purge
    holds up serving."""
    population = _population(opts)
    plan = (population.purge_plans or {}).get(target.label)
    if plan is None:
        raise ScenarioSkipped(f"no purge plan for {target.label}")
    results = []
    steps = (
        ("local", f"{ADMIN}/media/delete?before_ts={plan.local_before_ts}", "total",
         plan.local_rows),
        ("remote", f"{ADMIN}/purge_media_cache?before_ts={plan.remote_before_ts}", "deleted",
         plan.remote_rows),
    )  # fmt: skip
    for variant, path, field, expected in steps:
        measurement = Measurement(target)
        await asyncio.to_thread(measurement.begin)
        stop = asyncio.Event()
        media = iter_sample(population, random.Random(variant))
        downloads = asyncio.ensure_future(_download_loop(target, opts, 8, media, stop))
        # The purge may take minutes (Synapse deletes one media at a time).
        conn = target.connection(timeout=max(opts.request_timeout, 1800.0))
        t0 = time.perf_counter()
        try:
            response = await conn.request(
                "POST", target.path(path), headers={"Content-Type": "application/json"}, body=b"{}"
            )
            elapsed = time.perf_counter() - t0
        except RequestFailed as e:
            raise ScenarioFailed(f"POST {path}: {e}") from e
        finally:
            conn.close()
            stop.set()
            recorder = await downloads
        if response.status != 200:
            raise ScenarioFailed(f"POST {path} answered {response.short()}")
        deleted = response.json().get(field)
        pct = ms_percentiles(recorder.latencies["download"])
        result = Result(
            server=target.label,
            scenario="purge_stale",
            variant=variant,
            tool="asyncio",
            connections=8,
            requests=recorder.ops,
            errors=recorder.ops - recorder.ok_ops,
            error_kinds=dict(recorder.error_kinds),
            error_samples=recorder.error_samples,
            duration_s=elapsed,
            rps=recorder.ok_ops / elapsed if elapsed else None,
            p50_ms=pct.get("p50_ms"),
            p95_ms=pct.get("p95_ms"),
            p99_ms=pct.get("p99_ms"),
            extra={"purged": float(deleted or 0), "purged_rows_s": (deleted or 0) / elapsed},
            notes=[
                f"purged {deleted} of {expected} stale {variant} media in {elapsed:.1f} s"
                f" ({(deleted or 0) / elapsed:,.0f}/s); req/s, p50.. = downloads meanwhile"
            ],
        )
        if deleted != expected:
            result.notes.append(f"EXPECTED {expected} purged")
        results.append(measurement.finish(result))
    return results


# Synapse deletes media one at a time (13-20 a second here): it purges this
# many of the stale media, not all 100,000, so that a run ends in minutes.
SYNAPSE_PURGE_ROWS = 2000


def with_purge_plans(
    population: Population, psql_dsn: dict[str, Any], most: int | None = None
) -> Population:
    """``population`` with the purge plan of each server: all its stale
    media for ours, ``SYNAPSE_PURGE_ROWS`` of them for Synapse, or at most
    ``most`` for both."""
    everything = max(population.stale_local, population.stale_remote)
    ours = everything if most is None else min(everything, most)
    synapse = min(everything, SYNAPSE_PURGE_ROWS if most is None else most)
    plans = {
        "ours": purge_plan(psql_dsn, population, ours),
        "synapse": purge_plan(psql_dsn, population, synapse),
    }
    return dataclasses.replace(population, purge_plans=plans)


SCALE_SCENARIOS: dict[str, Scenario] = {
    "download_populated": download_populated,
    "admin_user_media": admin_user_media,
    "purge_stale": purge_stale,
}


def population_label(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def tag_population(results: list[Result], population: object | None) -> list[Result]:
    """Mark results of a populated run with its size ("download_small[@1M]"),
    so that the same scenario at two sizes are two rows."""
    if isinstance(population, Population):
        label = population_label(population.n)
        for r in results:
            r.variant = f"{r.variant}@{label}"
            r.server_info["populated"] = population.n
    return results


def _untagged_key(result: Result) -> str:
    variant = result.variant.rsplit("@", 1)[0]
    return f"{result.scenario}[{variant}]" if variant else result.scenario


def print_population_table(results: Sequence[Result], out: TextIO) -> None:
    """Each server's scenarios at every population side by side: req/s and
    p99, and p99 at the largest over p99 at the smallest (goal: at most
    ``P99_GOAL``)."""
    table: dict[tuple[str, str], dict[int, Result]] = defaultdict(dict)
    populations: set[int] = set()
    for r in results:
        n = r.server_info.get("populated")
        if r.status != "ok" or not isinstance(n, int):
            continue
        populations.add(n)
        table[(r.server, _untagged_key(r))][n] = r
    if len(populations) < 1:
        return
    sizes = sorted(populations)
    labels = [population_label(n) for n in sizes]
    print(f"\n== populated database: {' vs '.join(labels)} rows", file=out)
    head = f"{'server':8} {'scenario':32}"
    for label in labels:
        head += f" {'req/s ' + label:>12} {'p99 ms ' + label:>12}"
    print(head + f" {'p99 ratio':>9}", file=out)
    for (server, key), by_n in sorted(table.items()):
        line = f"{server:8} {key:32}"
        for n in sizes:
            r = by_n.get(n)
            rps = f"{r.rps:,.1f}" if r and r.rps is not None else "-"
            p99 = f"{r.p99_ms:,.2f}" if r and r.p99_ms is not None else "-"
            line += f" {rps:>12} {p99:>12}"
        first, last = by_n.get(sizes[0]), by_n.get(sizes[-1])
        ratio = "-"
        if len(sizes) > 1 and first and last and first.p99_ms and last.p99_ms:
            value = last.p99_ms / first.p99_ms
            judged = not _untagged_key(last).startswith(f"admin_user_media[{HEAVY_PREFIX}")
            ratio = f"{value:.2f}" + (" !" if judged and value > P99_GOAL else "")
        print(f"{line} {ratio:>9}", file=out)
    print(
        f"   p99 ratio: p99 at {labels[-1]} / p99 at {labels[0]}; '!' marks one over the"
        f" goal of {P99_GOAL}x. purge_stale: req/s and p99 are of the downloads served"
        " during the purge; its rows/s are in the notes. admin_user_media[heavy_*]: a user"
        " with min(100k, N/10) media, growing with N (not judged by the goal).",
        file=out,
    )
