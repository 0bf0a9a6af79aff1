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
from collections import Counter
from urllib.parse import quote

from benchlib import images
from benchlib.each_once import get_each_once
from benchlib.httpclient import Response
from benchlib.results import Result
from benchlib.scenarios import Options, Target, upload

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
        f"/_matrix/client/v1/media/thumbnail/{quote(server)}/{quote(media_id)}"
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
    paths = [target.path(cold_thumbnail_path(server, media_id)) for server, media_id in media]
    sizes: Counter[tuple[int, int] | None] = Counter()

    def an_image(response: Response) -> str:
        size = images.image_size(response.body)
        sizes[size] += 1
        return "" if size else "not an image"

    # get_each_once measures from when the server is idle: thumbnails made
    # because of the uploads are done before the first GET.
    outcome, measurement = await get_each_once(target, opts, paths, clients, an_image)
    result = measurement.finish(outcome.result(target, "thumbnail_cold", "", clients))
    result.bytes, result.mb_s = 0, None  # thumbnails' bytes hardly matter
    described = ", ".join(
        f"{n} x {s[0]}x{s[1]}" if s else f"{n} unreadable" for s, n in sizes.items()
    )
    width, height = COLD_SIZE
    result.notes.append(
        f"{count} distinct 3000x2000 JPEGs, first GET of {width}x{height} crop each, "
        f"{clients} clients; answered {described or 'nothing'}"
    )
    return [result]
