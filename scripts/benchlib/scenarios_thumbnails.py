"""Thumbnails made on demand under load: what a busy room costs when it is
opened and every client asks for thumbnails nobody has asked for before.

``thumbnail_cold`` uploads ``COLD_IMAGES`` distinct 3000x2000 JPEGs (not
timed), waits until the server is idle (so whatever it makes at upload is
made), then ``COLD_CLIENTS`` clients at once each take the next image from a
shared list and GET its thumbnail at a size no server makes at upload
(``COLD_SIZE``, crop): every GET makes a thumbnail. Reported: thumbnails/s
over the whole burst, latency p50/p95/p99 of each GET, and the size answered.
Needs ``dynamic_thumbnails: true`` (without it a server answers the nearest
stored size and makes nothing).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from benchlib import images
from benchlib.httpclient import RequestFailed
from benchlib.results import Result, ms_percentiles
from benchlib.scenarios import Measurement, Options, Target, upload

COLD_IMAGES = 200
COLD_CLIENTS = 16
# Not among Synapse's default thumbnail_sizes (32x32, 96x96 crop; 320x240,
# 640x480, 800x600 scale) nor ours: made on demand by both.
COLD_SIZE = (176, 144)
# The JPEG seeds of this scenario: apart from the other scenarios' images.
_FIRST_SEED = 5000


def cold_thumbnail_path(server: str, media_id: str) -> str:
    width, height = COLD_SIZE
    return (
        f"/_matrix/client/v1/media/thumbnail/{server}/{media_id}"
        f"?width={width}&height={height}&method=crop"
    )


async def thumbnail_cold(target: Target, opts: Options) -> list[Result]:
    count = COLD_IMAGES
    clients = opts.conns(COLD_CLIENTS)
    pictures = await asyncio.to_thread(
        images.jpegs, count, first_seed=_FIRST_SEED, progress=opts.log
    )
    conn = target.connection(timeout=opts.request_timeout)
    media: list[tuple[str, str]] = []
    try:
        for picture in pictures:
            media.append(await upload(conn, target, images.uniquified(picture), "image/jpeg"))
    finally:
        conn.close()
    pending = list(reversed(media))
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    samples: list[str] = []
    sizes: Counter[tuple[int, int] | None] = Counter()

    async def client() -> None:
        own = target.connection(timeout=opts.request_timeout)
        try:
            while pending:
                server, media_id = pending.pop()
                path = target.path(cold_thumbnail_path(server, media_id))
                t0 = time.perf_counter()
                try:
                    response = await own.request("GET", path)
                except RequestFailed as e:
                    errors["connection error"] += 1
                    samples.append(f"GET {path} -> {e}")
                    own.close()
                    own = target.connection(timeout=opts.request_timeout)
                    continue
                took = time.perf_counter() - t0
                if response.status != 200:
                    errors[str(response.status)] += 1
                    samples.append(f"GET {path} -> {response.short()}")
                    continue
                latencies.append(took)
                sizes[images.image_size(response.body)] += 1
        finally:
            own.close()

    # Measurement.begin waits until the server is idle: thumbnails made
    # because of the uploads are done before the first GET.
    measurement = Measurement(target)
    await asyncio.to_thread(measurement.begin)
    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    pct = ms_percentiles(latencies)
    result = Result(
        server=target.label,
        scenario="thumbnail_cold",
        tool="asyncio",
        connections=clients,
        requests=count,
        errors=count - len(latencies),
        error_kinds=dict(errors),
        error_samples=samples[:5],
        duration_s=elapsed,
        rps=len(latencies) / elapsed if elapsed else None,
        p50_ms=pct.get("p50_ms"),
        p95_ms=pct.get("p95_ms"),
        p99_ms=pct.get("p99_ms"),
    )
    measurement.finish(result)
    described = ", ".join(
        f"{n} x {s[0]}x{s[1]}" if s else f"{n} unreadable" for s, n in sizes.items()
    )
    width, height = COLD_SIZE
    result.notes.append(
        f"{count} distinct 3000x2000 JPEGs, first GET of {width}x{height} crop each, "
        f"{clients} clients; answered {described or 'nothing'}"
    )
    return [result]
