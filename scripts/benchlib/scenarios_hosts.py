"""The several-hosts benchmark (``scripts/bench --hosts 1,2,3``): the same
scenarios against 1, 2 and 3 instances behind one address (see
:mod:`benchlib.cluster`), and downloads redirected to the object store.

Scenarios, run through the balancer for each instance count:

* ``upload_small``, ``download_small``: as in the single-server benchmark.
* ``download_s3[cold]``: media of 64 KiB, uploaded, then dropped from every
  instance's local cache; each is read once, so every read is served from
  S3 (and kept locally as it streams).
* ``download_s3[warm]``: the same media once every instance has a copy.
* ``download_redirect``: 256 KiB media, read over and over: ``direct`` (the
  bytes through mediarepo), ``307`` (``allow_redirect=true``, the redirect
  not followed: what it costs mediarepo), ``followed`` (the client follows
  the 307 to the object store and reads the bytes from it).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TextIO
from urllib.parse import urlsplit

from benchlib.cluster import MotoS3, require_moto, setup_cluster
from benchlib.httpclient import Connection, RequestFailed, Response
from benchlib.results import Result
from benchlib.scenarios import (
    Measurement,
    Options,
    Recorder,
    ScenarioFailed,
    Target,
    closed_loop,
    download_path,
    download_small,
    expect_ok,
    loop_result,
    upload,
    upload_small,
)
from benchlib.servers import (
    Cleanup,
    Postgres,
    install_signal_handlers,
    make_workdir,
    sweep_stale_workdirs,
)

KIB = 1024
S3_MEDIA_SIZE = 64 * KIB
REDIRECT_MEDIA_SIZE = 256 * KIB
REDIRECT_MEDIA_COUNT = 50
CONNECTIONS = 16


async def upload_many(target: Target, opts: Options, count: int, size: int) -> list[str]:
    """``count`` distinct media of ``size`` bytes through ``target`` (not
    measured), on ``CONNECTIONS`` connections; their media IDs."""
    base = os.urandom(size)
    media: list[str] = []
    numbers = iter(range(count))

    async def worker() -> None:
        conn = target.connection(timeout=opts.request_timeout)
        try:
            for _ in numbers:
                body = os.urandom(16) + base[16:]
                _, media_id = await upload(conn, target, body, "application/octet-stream")
                media.append(media_id)
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
    return media


async def read_all(target: Target, opts: Options, media: Sequence[str], size: int) -> None:
    """GET each of ``media`` once through ``target`` (not measured)."""
    paths = iter(target.path(download_path(target.server_name, m)) for m in media)

    async def worker() -> None:
        conn = target.connection(timeout=opts.request_timeout)
        try:
            for path in paths:
                await expect_ok(conn, path, size)
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))


async def _each_once(target: Target, opts: Options, paths: Sequence[str]) -> tuple[Recorder, float]:
    """GET each of ``paths`` once, on ``CONNECTIONS`` connections, until all
    are read; the recorder and the seconds it took."""
    recorder = Recorder()
    pending = iter(paths)
    start = time.perf_counter()

    async def worker() -> None:
        conn = target.connection(timeout=opts.request_timeout)
        try:
            for path in pending:
                recorder.ops += 1
                t0 = time.perf_counter()
                try:
                    response = await conn.request("GET", path, keep_body=False)
                except RequestFailed as e:
                    recorder.failure("get", e, f"GET {path}")
                    continue
                if recorder.response("get", time.perf_counter() - t0, response, f"GET {path}"):
                    recorder.ok_ops += 1
                    recorder.bytes_sent += response.body_length
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
    return recorder, time.perf_counter() - start


async def download_s3(
    target: Target, instances: Sequence[Target], opts: Options, *, count: int,
    drop_local_copies: Callable[[], None],
) -> list[Result]:  # fmt: skip
    """``count`` media read once each from S3 (``cold``: no instance has a
    copy), then once each again with a copy on every instance (``warm``)."""
    media = await upload_many(target, opts, count, S3_MEDIA_SIZE)
    drop_local_copies()
    paths = [target.path(download_path(target.server_name, m)) for m in media]
    results = []
    for variant in ("cold", "warm"):
        if variant == "warm":
            # Every instance reads every media once, not measured.
            for instance in instances:
                await read_all(instance, opts, media, S3_MEDIA_SIZE)
        measurement = Measurement(target)
        await asyncio.to_thread(measurement.begin)
        recorder, elapsed = await _each_once(target, opts, paths)
        result = loop_result(target, "download_s3", CONNECTIONS, recorder, elapsed, "get")
        result.variant = variant
        result.notes.append(f"{count} media of {S3_MEDIA_SIZE // KIB} KiB, each read once")
        results.append(measurement.finish(result))
    return results


async def download_redirect(
    target: Target, instances: Sequence[Target], opts: Options
) -> list[Result]:
    """The same media read directly, as a 307 only, and with the 307 followed
    to the object store."""
    media = await upload_many(target, opts, REDIRECT_MEDIA_COUNT, REDIRECT_MEDIA_SIZE)
    redirected = [download_path(target.server_name, m) + "?allow_redirect=true" for m in media]
    # Not measured: every instance has a copy of each media, and has seen
    # each object in the store (a HEAD, remembered).
    for instance in instances:
        await read_all(instance, opts, media, REDIRECT_MEDIA_SIZE)
        await get_each(instance, opts, [instance.path(p) for p in redirected], 307)
    return [
        await _redirect_variant(target, opts, media, variant)
        for variant in ("direct", "307", "followed")
    ]


async def get_each(target: Target, opts: Options, paths: Sequence[str], status: int) -> None:
    """GET each of ``paths`` once, expecting ``status`` (not measured)."""
    pending = iter(paths)

    async def worker() -> None:
        conn = target.connection(timeout=opts.request_timeout)
        try:
            for path in pending:
                response = await conn.request("GET", path, keep_body=False)
                if response.status != status:
                    raise ScenarioFailed(f"GET {path} answered {response.short()}")
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))


class _ObjectStore:
    """Redirects to the object store followed, on a connection to it per
    connection to ours."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._connections: dict[int, Connection] = {}

    async def follow(self, conn: Connection, redirect: Response) -> Response:
        location = urlsplit(redirect.headers.get("location", ""))
        store = self._connections.get(id(conn))
        if store is None:
            store = Connection(
                location.hostname or "127.0.0.1", location.port or 80, timeout=self._timeout
            )
            self._connections[id(conn)] = store
        return await store.request("GET", f"{location.path}?{location.query}", keep_body=False)

    def close(self) -> None:
        for store in self._connections.values():
            store.close()


async def _redirect_variant(
    target: Target, opts: Options, media: Sequence[str], variant: str
) -> Result:
    query = "" if variant == "direct" else "?allow_redirect=true"
    paths = itertools.cycle(
        [target.path(download_path(target.server_name, m)) + query for m in media]
    )
    store = _ObjectStore(opts.request_timeout)
    expected = 200 if variant == "direct" else 307

    async def op(conn: Connection, rec: Recorder) -> bool:
        path = next(paths)
        t0 = time.perf_counter()
        try:
            response = await conn.request("GET", path, keep_body=False)
        except RequestFailed as e:
            rec.failure("get", e, f"GET {path}")
            return False
        if response.status != expected:
            rec.response("get", time.perf_counter() - t0, response, f"GET {path}")
            return False
        if variant == "307":
            rec.latencies["get"].append(time.perf_counter() - t0)
            rec.statuses[response.status] += 1
            return True
        if variant == "followed":
            try:
                response = await store.follow(conn, response)
            except RequestFailed as e:
                rec.failure("get", e, "GET Location")
                return False
        ok = rec.response("get", time.perf_counter() - t0, response, f"GET {path}")
        if ok:
            rec.bytes_sent += response.body_length
        return ok

    measurement = Measurement(target)
    await asyncio.to_thread(measurement.begin)
    try:
        recorder, elapsed = await closed_loop(target, opts, CONNECTIONS, op)
    finally:
        store.close()
    result = loop_result(target, "download_redirect", CONNECTIONS, recorder, elapsed, "get")
    result.variant = variant
    if variant == "307":
        result.mb_s = None
    result.notes.append(
        f"{REDIRECT_MEDIA_COUNT} media of {REDIRECT_MEDIA_SIZE // KIB} KiB, read in turn"
    )
    return measurement.finish(result)


async def run_hosts_scenarios(
    target: Target,
    instances: Sequence[Target],
    opts: Options,
    *,
    s3_count: int,
    drop_local_copies: Callable[[], None],
    emit: Callable[[list[Result]], None],
) -> None:
    """Every scenario against one cluster, each result emitted as it comes."""
    steps: list[tuple[str, Callable[[], Awaitable[list[Result]]]]] = [
        ("upload_small", lambda: upload_small(target, opts)),
        ("download_small", lambda: download_small(target, opts)),
        (
            "download_s3",
            lambda: download_s3(
                target, instances, opts, count=s3_count, drop_local_copies=drop_local_copies
            ),
        ),
        ("download_redirect", lambda: download_redirect(target, instances, opts)),
    ]
    for name, step in steps:
        opts.log(f"{target.label}: {name}")
        try:
            results = await step()
        except (ScenarioFailed, RequestFailed) as e:
            results = [Result(target.label, name, status="failed", reason=str(e))]
        for result in results:
            result.server_info = result.server_info or dict(target.info)
        emit(results)


def scaling_rows(results: Sequence[Result]) -> list[tuple[str, str, dict[str, float | None]]]:
    """Per scenario: each cluster's req/s and p50 as a ratio to the first
    cluster's (one instance)."""
    labels: list[str] = []
    for r in results:
        if r.server not in labels:
            labels.append(r.server)
    rows = []
    keys: list[str] = []
    for r in results:
        if r.key not in keys:
            keys.append(r.key)
    for key in keys:
        by_label = {r.server: r for r in results if r.key == key and r.status == "ok"}
        base = by_label.get(labels[0]) if labels else None
        for label in labels:
            r = by_label.get(label)
            if r is None or base is None:
                continue
            rows.append(
                (
                    key,
                    label,
                    {
                        "rps": r.rps,
                        "p50_ms": r.p50_ms,
                        "rps_ratio": (r.rps / base.rps) if r.rps and base.rps else None,
                        "p50_ratio": (r.p50_ms / base.p50_ms) if r.p50_ms and base.p50_ms else None,
                    },
                )
            )
    return rows


async def run_hosts(
    counts: Sequence[int],
    *,
    python: str,
    postgres: Postgres,
    keep: bool,
    opts: Options,
    s3_count: int,
    emit: Callable[[list[Result]], None],
) -> None:
    """A cluster of each size in ``counts`` in turn (one moto server for
    all, a fresh database and bucket for each), every scenario on it."""
    cleanup = Cleanup()
    install_signal_handlers()
    try:
        sweep_stale_workdirs()
        postgres.sweep_stale()
        require_moto(python)
        moto = MotoS3(python, make_workdir(cleanup, "moto", keep))
        moto.start(cleanup)
        for count in counts:
            cluster = await asyncio.to_thread(
                setup_cluster, cleanup, python=python, postgres=postgres, moto=moto,
                instances=count, keep=keep,
            )  # fmt: skip
            cluster.start(cleanup)  # from the main thread: see servers._die_with_parent
            try:
                target = cluster.target()
                target.settle = postgres.checkpoint
                await run_hosts_scenarios(
                    target,
                    cluster.instance_targets(),
                    opts,
                    s3_count=s3_count,
                    drop_local_copies=cluster.drop_local_copies,
                    emit=emit,
                )
            finally:
                cluster.stop()
    finally:
        await asyncio.to_thread(cleanup.run)


def print_scaling(results: Sequence[Result], out: TextIO) -> None:
    rows = scaling_rows(results)
    if not rows:
        return
    print("\nseveral hosts: req/s and p50 against one instance (same total cores)", file=out)
    print(f"  {'scenario':32} {'cluster':8} {'req/s':>9} {'x1':>6} {'p50 ms':>9} {'x1':>6}",
          file=out)  # fmt: skip
    for key, label, figures in rows:

        def fmt(value: float | None, digits: int) -> str:
            return "-" if value is None else f"{value:.{digits}f}"

        print(
            f"  {key:32} {label:8} {fmt(figures['rps'], 1):>9} {fmt(figures['rps_ratio'], 2):>6}"
            f" {fmt(figures['p50_ms'], 2):>9} {fmt(figures['p50_ratio'], 2):>6}",
            file=out,
        )
