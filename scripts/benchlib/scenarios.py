"""The scenarios: each prepares what it needs (untimed), then measures.

Every scenario returns :class:`Result` rows with the server's CPU and
memory over the measured part (when its pid is known) and the load
generator's own CPU share.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from benchlib import images
from benchlib.httpclient import Body, Connection, RequestFailed, Response, split_base_url
from benchlib.procmon import (
    GeneratorMeter,
    ServerMonitor,
    cpu_idle_wait,
    machine_busy_seconds,
    postgres_cpu_seconds,
)
from benchlib.results import Result, ms_percentiles
from benchlib.wrk import WrkResult, run_wrk

KIB = 1024
MIB = 1024 * 1024
SMALL_SIZE = 4 * KIB
LARGE_SIZE = 20 * MIB
THUMB_QUERY = "width=320&height=240&method={method}"
# Answers that mean "the thumbnail is not there yet": poll again.
_RETRY_THUMBNAIL = {404, 409, 425, 429, 502, 503, 504}


@dataclass
class Target:
    """A running server to drive."""

    label: str
    base_url: str
    server_name: str
    token: str
    pid: int | None = None
    info: dict[str, Any] = field(default_factory=dict)
    include_children: bool = False
    # For a static file server (nginx): download scenario -> URL path of the file.
    static_paths: dict[str, str] = field(default_factory=dict)
    # For a target that is not a media server (the raw upload sink): the
    # only scenarios it runs.
    only_scenarios: frozenset[str] | None = None
    # Run before each measurement starts (a PostgreSQL checkpoint).
    settle: Callable[[], None] | None = None

    @property
    def host_port_prefix(self) -> tuple[str, int, str]:
        return split_base_url(self.base_url)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def connection(self, *, auth: bool = True, timeout: float = 60.0) -> Connection:
        host, port, _ = self.host_port_prefix
        return Connection(host, port, headers=self.auth if auth else None, timeout=timeout)

    def path(self, path: str) -> str:
        return self.host_port_prefix[2] + path

    def url(self, path: str) -> str:
        return self.base_url.rstrip("/") + path


@dataclass
class Options:
    duration: float = 10.0
    connections: int | None = None
    wrk_threads: int = 2
    thumb_count: int = 20
    request_timeout: float = 60.0
    max_requests: int = 5_000_000
    log: Callable[[str], None] = print
    # The populated database the servers run on (benchlib.populate.Population).
    population: object | None = None
    # The server name of the bench's federation origin, when one runs.
    origin: str | None = None

    def conns(self, default: int) -> int:
        return self.connections or default


class ScenarioSkipped(Exception):
    pass


class ScenarioFailed(Exception):
    pass


# -- paths -------------------------------------------------------------------


def upload_path() -> str:
    return "/_matrix/media/v3/upload?filename=bench.bin"


def download_path(server: str, media_id: str, *, legacy: bool = False) -> str:
    prefix = "/_matrix/media/v3" if legacy else "/_matrix/client/v1/media"
    return f"{prefix}/download/{quote(server)}/{quote(media_id)}"


def thumbnail_path(server: str, media_id: str, method: str) -> str:
    query = THUMB_QUERY.format(method=method)
    return f"/_matrix/client/v1/media/thumbnail/{quote(server)}/{quote(media_id)}?{query}"


def parse_mxc(uri: str) -> tuple[str, str]:
    if not uri.startswith("mxc://") or uri.count("/") != 3:
        raise ScenarioFailed(f"not an mxc:// URI: {uri!r}")
    server, media_id = uri[len("mxc://") :].split("/")
    return server, media_id


def unique_small_body(base: bytes) -> bytes:
    """``base`` with its first 16 bytes replaced by random ones: no two alike."""
    return os.urandom(16) + base[16:]


# -- measuring ---------------------------------------------------------------


def drop_page_cache() -> None:
    """Empty the kernel's page cache of clean pages, where allowed (root)."""
    try:
        with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as f:
            f.write("1\n")
    except OSError:
        pass


class Measurement:
    """Wait for the server to be idle, then measure CPU and memory until :meth:`finish`."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.generator = GeneratorMeter()
        self.monitor: ServerMonitor | None = None
        self.loadavg = 0.0
        self.machine_busy = 0.0
        self.postgres_cpu = 0.0

    def begin(self) -> None:
        # Every measurement starts from the same machine state: what earlier
        # scenarios (or the other server) wrote is on disk and out of the
        # page cache (as root), so that no server pays in its fsyncs for
        # another's writes, or reclaims memory another's files filled; and
        # a PostgreSQL checkpoint is not due in the middle of it.
        os.sync()
        drop_page_cache()
        if self.target.settle is not None:
            self.target.settle()
        cpu_idle_wait(self.target.pid)
        self.loadavg = os.getloadavg()[0]
        if self.target.pid is not None:
            self.monitor = ServerMonitor(
                self.target.pid, include_children=self.target.include_children
            )
            self.monitor.start()
        self.generator.start()
        self.machine_busy = machine_busy_seconds()
        self.postgres_cpu = postgres_cpu_seconds()

    def finish(self, result: Result) -> Result:
        busy = machine_busy_seconds() - self.machine_busy
        postgres = postgres_cpu_seconds() - self.postgres_cpu
        gen = self.generator.stop()
        result.gen_cpu_s = gen.cpu_s
        result.gen_cpu_share = gen.share
        result.loadavg_1m = self.loadavg
        result.server_info = dict(self.target.info)
        if self.monitor is not None:
            usage = self.monitor.stop()
            result.server_cpu_s = usage.cpu_s
            result.server_cpu_share = usage.cpu_s / gen.wall_s if gen.wall_s else None
            result.rss_start_mib = usage.rss_start_mib
            result.rss_peak_mib = usage.rss_peak_mib
            result.vmhwm_mib = usage.vmhwm_mib
            if result.requests:
                result.server_cpu_ms_per_request = usage.cpu_s * 1000 / result.requests
            if usage.died:
                result.notes.append("SERVER PROCESS DIED during the scenario")
        if gen.wall_s:
            server_cpu = result.server_cpu_s or 0.0
            result.postgres_cpu_share = max(0.0, postgres) / gen.wall_s
            other = busy - server_cpu - gen.cpu_s - max(0.0, postgres)
            result.other_cpu_share = max(0.0, other) / gen.wall_s
        return result


class Recorder:
    """Latencies per step, statuses and failures of a closed-loop run."""

    def __init__(self) -> None:
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.statuses: Counter[int] = Counter()
        self.error_kinds: Counter[str] = Counter()
        self.error_samples: list[str] = []
        self.ops = 0
        self.ok_ops = 0
        self.bytes_sent = 0

    def response(self, step: str, seconds: float, response: Response, what: str) -> bool:
        self.latencies[step].append(seconds)
        self.statuses[response.status] += 1
        if 200 <= response.status < 300:
            return True
        self.error_kinds[f"{step} {response.status}"] += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(f"{what} -> {response.short()}")
        return False

    def failure(self, step: str, error: Exception, what: str) -> None:
        self.error_kinds[f"{step} connection error"] += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(f"{what} -> {error}")


Operation = Callable[[Connection, Recorder], Awaitable[bool]]


async def closed_loop(
    target: Target, opts: Options, connections: int, operation: Operation
) -> tuple[Recorder, float]:
    """``connections`` workers, each running ``operation`` back to back on its
    own keep-alive connection for ``opts.duration`` seconds (requests in flight
    at the deadline finish). Returns the recorder and the elapsed seconds."""
    recorder = Recorder()
    start = time.perf_counter()
    deadline = start + opts.duration

    async def worker() -> None:
        conn = target.connection(timeout=opts.request_timeout)
        try:
            while time.perf_counter() < deadline and recorder.ops < opts.max_requests:
                recorder.ops += 1
                if await operation(conn, recorder):
                    recorder.ok_ops += 1
                else:
                    await asyncio.sleep(0.01)  # don't spin on a failing server
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return recorder, time.perf_counter() - start


def loop_result(
    target: Target,
    scenario: str,
    connections: int,
    recorder: Recorder,
    elapsed: float,
    main_step: str,
) -> Result:
    lat = recorder.latencies[main_step]
    pct = ms_percentiles(lat)
    return Result(
        server=target.label,
        scenario=scenario,
        tool="asyncio",
        connections=connections,
        requests=recorder.ops,
        errors=recorder.ops - recorder.ok_ops,
        error_kinds=dict(recorder.error_kinds),
        error_samples=recorder.error_samples,
        duration_s=elapsed,
        rps=recorder.ok_ops / elapsed if elapsed else None,
        p50_ms=pct.get("p50_ms"),
        p95_ms=pct.get("p95_ms"),
        p99_ms=pct.get("p99_ms"),
        bytes=recorder.bytes_sent,
        mb_s=recorder.bytes_sent / elapsed / 1e6 if elapsed and recorder.bytes_sent else None,
    )


def wrk_result(
    target: Target, scenario: str, connections: int, wrk: WrkResult, *, bytes_matter: bool
) -> Result:
    kinds = {
        "non-2xx/3xx (status >= 400)": wrk.errors_status,
        "connect": wrk.errors_connect,
        "read": wrk.errors_read,
        "write": wrk.errors_write,
        "timeout": wrk.errors_timeout,
    }
    return Result(
        server=target.label,
        scenario=scenario,
        tool="wrk",
        connections=connections,
        requests=wrk.requests,
        errors=wrk.errors,
        error_kinds={k: v for k, v in kinds.items() if v},
        duration_s=wrk.duration_s,
        rps=wrk.rps,
        p50_ms=wrk.percentiles_ms.get("p50"),
        p95_ms=wrk.percentiles_ms.get("p95"),
        p99_ms=wrk.percentiles_ms.get("p99"),
        bytes=wrk.bytes,
        mb_s=wrk.bytes / wrk.duration_s / 1e6 if bytes_matter and wrk.duration_s else None,
    )


async def measure_wrk(
    target: Target,
    opts: Options,
    scenario: str,
    path: str,
    connections: int,
    *,
    auth: bool,
    bytes_matter: bool,
    variant: str = "",
) -> Result:
    measurement = Measurement(target)
    await asyncio.to_thread(measurement.begin)
    wrk = await asyncio.to_thread(
        run_wrk,
        target.url(path),
        connections=connections,
        threads=opts.wrk_threads,
        duration=opts.duration,
        headers=target.auth if auth else None,
        timeout=max(30.0, opts.request_timeout),
    )
    measurement.generator.add_child(wrk.usage)
    result = wrk_result(target, scenario, connections, wrk, bytes_matter=bytes_matter)
    result.variant = variant
    return measurement.finish(result)


# -- helpers that run before the measured part ----------------------------------


async def upload(
    conn: Connection, target: Target, body: Body, content_type: str
) -> tuple[str, str]:
    """Upload and return ``(server_name, media_id)``; raises ScenarioFailed."""
    try:
        response = await conn.request(
            "POST",
            target.path(upload_path()),
            headers={"Content-Type": content_type},
            body=body,
        )
    except RequestFailed as e:
        raise ScenarioFailed(f"upload failed: {e}") from e
    if response.status != 200:
        raise ScenarioFailed(f"upload answered {response.short()}")
    server, media_id = parse_mxc(response.json().get("content_uri", ""))
    return server, media_id


async def expect_ok(conn: Connection, path: str, length: int | None = None) -> Response:
    try:
        response = await conn.request("GET", path)
    except RequestFailed as e:
        raise ScenarioFailed(f"GET {path} failed: {e}") from e
    if response.status != 200:
        raise ScenarioFailed(f"GET {path} answered {response.short()}")
    if length is not None and len(response.body) != length:
        raise ScenarioFailed(f"GET {path} gave {len(response.body)} bytes, expected {length}")
    return response


async def poll_thumbnail(
    conn: Connection, path: str, *, limit_s: float = 30.0
) -> tuple[Response | None, int, float, str]:
    """GET ``path`` until it answers 200 (5 ms between tries, ``limit_s`` at most).

    Returns the last response, the number of GETs, the duration of the last
    GET, and a failure description ("" on success)."""
    start = time.perf_counter()
    polls = 0
    while True:
        t0 = time.perf_counter()
        polls += 1
        try:
            response = await conn.request("GET", path)
        except RequestFailed as e:
            return None, polls, time.perf_counter() - t0, f"GET {path}: {e}"
        took = time.perf_counter() - t0
        if response.status == 200:
            if not response.headers.get("content-type", "").startswith("image/"):
                return response, polls, took, f"GET {path}: 200 but {response.headers}"
            return response, polls, took, ""
        if response.status not in _RETRY_THUMBNAIL or time.perf_counter() - start > limit_s:
            return response, polls, took, f"GET {path} -> {response.short()}"
        await asyncio.sleep(0.005)


def log_result_line(opts: Options, result: Result) -> None:
    opts.log(f"   {result.server} {result.key}: {result.status} {result.reason}".rstrip())


# -- the scenarios ---------------------------------------------------------------


async def upload_small(target: Target, opts: Options) -> list[Result]:
    connections = opts.conns(16)
    base = os.urandom(SMALL_SIZE)

    async def op(conn: Connection, rec: Recorder) -> bool:
        body = unique_small_body(base)
        t0 = time.perf_counter()
        try:
            response = await conn.request(
                "POST",
                target.path(upload_path()),
                headers={"Content-Type": "application/octet-stream"},
                body=body,
            )
        except RequestFailed as e:
            rec.failure("upload", e, "POST upload 4 KiB")
            return False
        ok = rec.response("upload", time.perf_counter() - t0, response, "POST upload 4 KiB")
        if ok:
            rec.bytes_sent += len(body)
        return ok

    measurement = Measurement(target)
    await asyncio.to_thread(measurement.begin)
    recorder, elapsed = await closed_loop(target, opts, connections, op)
    result = loop_result(target, "upload_small", connections, recorder, elapsed, "upload")
    result.mb_s = None  # bytes hardly matter at 4 KiB
    return [measurement.finish(result)]


async def upload_large(target: Target, opts: Options) -> list[Result]:
    connections = opts.conns(4)
    base = memoryview(os.urandom(LARGE_SIZE))

    async def op(conn: Connection, rec: Recorder) -> bool:
        body: list[bytes | memoryview] = [os.urandom(16), base[16:]]
        t0 = time.perf_counter()
        try:
            response = await conn.request(
                "POST",
                target.path(upload_path()),
                headers={"Content-Type": "application/octet-stream"},
                body=body,
            )
        except RequestFailed as e:
            rec.failure("upload", e, "POST upload 20 MiB")
            return False
        ok = rec.response("upload", time.perf_counter() - t0, response, "POST upload 20 MiB")
        if ok:
            rec.bytes_sent += LARGE_SIZE
        return ok

    measurement = Measurement(target)
    await asyncio.to_thread(measurement.begin)
    recorder, elapsed = await closed_loop(target, opts, connections, op)
    result = loop_result(target, "upload_large", connections, recorder, elapsed, "upload")
    return [measurement.finish(result)]


async def _download(
    target: Target, opts: Options, scenario: str, size: int, connections: int, *, legacy: bool
) -> list[Result]:
    static_key = "small" if size == SMALL_SIZE else "large"
    if target.static_paths:
        if legacy:
            raise ScenarioSkipped("a static file server has no legacy endpoint")
        path = target.static_paths[static_key]
        auth = False
    else:
        conn = target.connection(timeout=opts.request_timeout)
        try:
            body: list[bytes | memoryview] = [os.urandom(16), memoryview(os.urandom(size - 16))]
            server, media_id = await upload(conn, target, body, "application/octet-stream")
            path = target.path(download_path(server, media_id, legacy=legacy))
            if legacy:
                plain = target.connection(auth=False, timeout=opts.request_timeout)
                try:
                    first = await plain.request("GET", path)
                except RequestFailed as e:
                    raise ScenarioFailed(f"GET {path}: {e}") from e
                finally:
                    plain.close()
                if first.status == 404:
                    raise ScenarioSkipped(
                        "the legacy endpoint answered 404 for new media: the server has "
                        "enable_authenticated_media: true"
                    )
                if first.status != 200 or len(first.body) != size:
                    raise ScenarioFailed(f"GET {path} answered {first.short()}")
            else:
                await expect_ok(conn, path, size)
        finally:
            conn.close()
        auth = not legacy
    return [
        await measure_wrk(
            target, opts, scenario, path, connections, auth=auth, bytes_matter=size > SMALL_SIZE
        )
    ]


async def download_small(target: Target, opts: Options) -> list[Result]:
    return await _download(target, opts, "download_small", SMALL_SIZE, opts.conns(16), legacy=False)


async def download_small_legacy(target: Target, opts: Options) -> list[Result]:
    return await _download(
        target, opts, "download_small_legacy", SMALL_SIZE, opts.conns(16), legacy=True
    )


async def download_large(target: Target, opts: Options) -> list[Result]:
    return await _download(target, opts, "download_large", LARGE_SIZE, opts.conns(4), legacy=False)


# Sources of the upload-to-thumbnail scenarios: (what makes them, media type, name).
_THUMBNAIL_SOURCES: dict[str, tuple[Callable[..., list[bytes]], str, str]] = {
    "thumbnail_upload": (images.jpegs, "image/jpeg", "JPEG"),
    "thumbnail_upload_heic": (images.heics, "image/heic", "HEIC"),
    "thumbnail_upload_video": (images.videos, "video/mp4", "MP4"),
}


async def thumbnail_upload(target: Target, opts: Options) -> list[Result]:
    return await _thumbnail_upload(target, opts, "thumbnail_upload")


async def thumbnail_upload_heic(target: Target, opts: Options) -> list[Result]:
    return await _thumbnail_upload(target, opts, "thumbnail_upload_heic")


async def thumbnail_upload_video(target: Target, opts: Options) -> list[Result]:
    return await _thumbnail_upload(target, opts, "thumbnail_upload_video")


async def _thumbnail_upload(target: Target, opts: Options, scenario: str) -> list[Result]:
    make, media_type, kind = _THUMBNAIL_SOURCES[scenario]
    pictures = await asyncio.to_thread(make, opts.thumb_count, first_seed=0, progress=opts.log)
    # JPEGs are made unique per run (the others are distinct already).
    bodies = [images.uniquified(p) for p in pictures] if kind == "JPEG" else pictures
    upload_lat: list[float] = []
    ready_lat: list[float] = []
    get_lat: list[float] = []
    polls: list[int] = []
    errors: Counter[str] = Counter()
    samples: list[str] = []
    sent = 0
    conn = target.connection(timeout=opts.request_timeout)
    measurement = Measurement(target)
    await asyncio.to_thread(measurement.begin)
    start = time.perf_counter()
    try:
        for body in bodies:
            t0 = time.perf_counter()
            try:
                response = await conn.request(
                    "POST",
                    target.path(upload_path()),
                    headers={"Content-Type": media_type},
                    body=body,
                )
            except RequestFailed as e:
                errors["upload connection error"] += 1
                samples.append(f"POST upload {kind} -> {e}")
                continue
            t1 = time.perf_counter()
            if response.status != 200:
                errors[f"upload {response.status}"] += 1
                samples.append(f"POST upload {kind} -> {response.short()}")
                continue
            upload_lat.append(t1 - t0)
            sent += len(body)
            server, media_id = parse_mxc(response.json().get("content_uri", ""))
            path = target.path(thumbnail_path(server, media_id, "scale"))
            thumb, count, took, failure = await poll_thumbnail(conn, path)
            polls.append(count)
            if failure:
                errors["thumbnail " + (str(thumb.status) if thumb else "connection error")] += 1
                samples.append(failure)
                continue
            ready_lat.append(time.perf_counter() - t0)
            get_lat.append(took)
    finally:
        conn.close()
    elapsed = time.perf_counter() - start
    pct = ms_percentiles(upload_lat)
    result = Result(
        server=target.label,
        scenario=scenario,
        tool="asyncio",
        connections=1,
        requests=len(bodies),
        errors=len(bodies) - len(ready_lat),
        error_kinds=dict(errors),
        error_samples=samples[:5],
        duration_s=elapsed,
        rps=len(ready_lat) / elapsed if elapsed else None,
        p50_ms=pct.get("p50_ms"),
        p95_ms=pct.get("p95_ms"),
        p99_ms=pct.get("p99_ms"),
        bytes=sent,
        mb_s=sent / elapsed / 1e6 if elapsed else None,
        extra={
            **ms_percentiles(ready_lat, "ready_"),
            **{k: v for k, v in ms_percentiles(get_lat, "get_").items() if k == "get_p50_ms"},
            "polls_mean": sum(polls) / len(polls) if polls else 0.0,
        },
        notes=[
            f"{kind} sources; p50.. = until the upload answered;"
            " ready = until its 320x240 thumbnail was served"
        ],
    )
    return [measurement.finish(result)]


async def thumbnail_dynamic(target: Target, opts: Options) -> list[Result]:
    count = opts.thumb_count
    pictures = await asyncio.to_thread(images.jpegs, 2 * count, first_seed=1000, progress=opts.log)
    conn = target.connection(timeout=opts.request_timeout)
    results: list[Result] = []
    try:
        media: list[tuple[str, str]] = []
        for picture in pictures:
            media.append(await upload(conn, target, images.uniquified(picture), "image/jpeg"))
        for method, subset in (("scale", media[:count]), ("crop", media[count:])):
            latencies: list[float] = []
            errors: Counter[str] = Counter()
            samples: list[str] = []
            answers: list[bytes] = []
            # Measurement.begin waits until the server is idle: background
            # work caused by the uploads is over before the first GET.
            measurement = Measurement(target)
            await asyncio.to_thread(measurement.begin)
            start = time.perf_counter()
            for server, media_id in subset:
                path = target.path(thumbnail_path(server, media_id, method))
                t0 = time.perf_counter()
                try:
                    response = await conn.request("GET", path)
                except RequestFailed as e:
                    errors["connection error"] += 1
                    samples.append(f"GET {path} -> {e}")
                    continue
                took = time.perf_counter() - t0
                if response.status != 200:
                    errors[str(response.status)] += 1
                    samples.append(f"GET {path} -> {response.short()}")
                    continue
                latencies.append(took)
                answers.append(response.body)
            elapsed = time.perf_counter() - start
            pct = ms_percentiles(latencies)
            result = Result(
                server=target.label,
                scenario="thumbnail_dynamic",
                variant=method,
                tool="asyncio",
                connections=1,
                requests=len(subset),
                errors=len(subset) - len(latencies),
                error_kinds=dict(errors),
                error_samples=samples[:5],
                duration_s=elapsed,
                rps=len(latencies) / elapsed if elapsed else None,
                p50_ms=pct.get("p50_ms"),
                p95_ms=pct.get("p95_ms"),
                p99_ms=pct.get("p99_ms"),
            )
            measurement.finish(result)
            # Outside the measured part: what size did the server answer?
            sizes = Counter(images.image_size(a) for a in answers)
            if sizes:
                described = ", ".join(f"{s[0]}x{s[1]}" if s else "unreadable" for s in sizes)
                result.notes.append(f"first GET of 320x240 {method}: answered {described}")
                if method == "crop" and set(sizes) != {(320, 240)}:
                    result.notes.append("crop not 320x240: dynamic_thumbnails seems off")
            results.append(result)
    finally:
        conn.close()
    return results


async def thumbnail_cached(target: Target, opts: Options) -> list[Result]:
    connections = opts.conns(16)
    (picture,) = await asyncio.to_thread(images.jpegs, 1, first_seed=2000, progress=opts.log)
    conn = target.connection(timeout=opts.request_timeout)
    paths: dict[str, str] = {}
    sizes: dict[str, tuple[int, int] | None] = {}
    try:
        server, media_id = await upload(conn, target, images.uniquified(picture), "image/jpeg")
        for method in ("scale", "crop"):
            path = target.path(thumbnail_path(server, media_id, method))
            response, _, _, failure = await poll_thumbnail(conn, path)
            if failure or response is None:
                raise ScenarioFailed(failure)
            paths[method] = path
            sizes[method] = images.image_size(response.body)
    finally:
        conn.close()
    results = []
    for method, path in paths.items():
        size = sizes[method]
        described = f"{size[0]}x{size[1]}" if size else "unreadable"
        results.append(
            await measure_wrk(
                target,
                opts,
                "thumbnail_cached",
                path,
                connections,
                auth=True,
                bytes_matter=False,
                variant=method,
            )
        )
        results[-1].notes.append(f"320x240 {method} answered {described}")
    return results


def _put_path(target: Target, created: Response) -> str:
    """Where the content of the media a create answer reserved is PUT."""
    server, media_id = parse_mxc(created.json().get("content_uri", ""))
    return target.path(
        f"/_matrix/media/v3/upload/{quote(server)}/{quote(media_id)}?filename=bench.bin"
    )


async def _probe_create_put(target: Target, opts: Options, create: str, base: bytes) -> None:
    """One create and PUT: the scenario is skipped where create is not
    served, and fails where either is refused."""
    probe_conn = target.connection(timeout=opts.request_timeout)
    try:
        try:
            probe = await probe_conn.request(
                "POST", create, headers={"Content-Type": "application/json"}, body=b"{}"
            )
        except RequestFailed as e:
            raise ScenarioFailed(f"POST {create}: {e}") from e
        if probe.status in (404, 405) or probe.errcode() == "M_UNRECOGNIZED":
            raise ScenarioSkipped(f"POST /_matrix/media/v1/create answered {probe.short()}")
        if probe.status != 200:
            raise ScenarioFailed(f"POST {create} answered {probe.short()}")
        check = await probe_conn.request(
            "PUT",
            _put_path(target, probe),
            headers={"Content-Type": "application/octet-stream"},
            body=unique_small_body(base),
        )
        if check.status != 200:
            raise ScenarioFailed(f"PUT after create answered {check.short()}")
    finally:
        probe_conn.close()


async def create_put(target: Target, opts: Options) -> list[Result]:
    connections = opts.conns(16)
    create = target.path("/_matrix/media/v1/create")
    base = os.urandom(SMALL_SIZE)
    await _probe_create_put(target, opts, create, base)

    async def op(conn: Connection, rec: Recorder) -> bool:
        t0 = time.perf_counter()
        try:
            created = await conn.request(
                "POST", create, headers={"Content-Type": "application/json"}, body=b"{}"
            )
        except RequestFailed as e:
            rec.failure("create", e, "POST create")
            return False
        t1 = time.perf_counter()
        if not rec.response("create", t1 - t0, created, "POST create"):
            return False
        body = unique_small_body(base)
        path = _put_path(target, created)
        try:
            put = await conn.request(
                "PUT", path, headers={"Content-Type": "application/octet-stream"}, body=body
            )
        except RequestFailed as e:
            rec.failure("put", e, "PUT 4 KiB")
            return False
        t2 = time.perf_counter()
        if not rec.response("put", t2 - t1, put, f"PUT {path} 4 KiB"):
            return False
        rec.latencies["pair"].append(t2 - t0)
        rec.bytes_sent += len(body)
        return True

    measurement = Measurement(target)
    await asyncio.to_thread(measurement.begin)
    recorder, elapsed = await closed_loop(target, opts, connections, op)
    result = loop_result(target, "create_put", connections, recorder, elapsed, "pair")
    result.mb_s = None
    result.extra.update(
        {k: v for k, v in ms_percentiles(recorder.latencies["create"], "create_").items()}
    )
    result.extra.update(
        {k: v for k, v in ms_percentiles(recorder.latencies["put"], "put_").items()}
    )
    result.notes.append("req/s = create+PUT pairs/s; p50.. = whole pair")
    return [measurement.finish(result)]


Scenario = Callable[[Target, Options], Awaitable[list[Result]]]
