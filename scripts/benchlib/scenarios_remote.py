"""Remote media fetched over federation for the first time: what every
federated user waits for when someone on another server posts a file.

``remote_fetch`` asks the server under test, as a client
(``/_matrix/client/v1/media/download/{origin}/{id}``), for media of the
bench's origin (:mod:`benchlib.origin`, on loopback TLS, trusted by both
servers) that it has never fetched: each GET makes the server fetch the
media over federation, store it and stream it back. Three sizes, each a
variant (``REMOTE_SIZES``: how many media, how many clients at once).
Reported per size: first fetches/s, the latency p50/p95/p99 of each GET,
and MB/s delivered to the clients.
"""

from __future__ import annotations

import os

from benchlib.each_once import get_each_once
from benchlib.httpclient import Response
from benchlib.results import Result
from benchlib.scenarios import Options, ScenarioSkipped, Target, download_path

KIB = 1024
MIB = 1024 * 1024
# (variant, the origin's size tag, bytes, media fetched, clients at once)
REMOTE_SIZES = (
    ("4KiB", "s", 4 * KIB, 200, 8),
    ("1MiB", "m", 1 * MIB, 50, 4),
    ("20MiB", "l", 20 * MIB, 12, 4),
)


async def remote_fetch(target: Target, opts: Options) -> list[Result]:
    origin = opts.origin
    if not origin:
        raise ScenarioSkipped(
            "no origin: remote_fetch runs with --start-ours or --compare-synapse, which "
            "start the bench's origin and make the servers trust it"
        )
    # Media IDs no server has seen: a fresh prefix per run and target.
    prefix = "b" + os.urandom(6).hex() + "".join(c for c in target.label if c.isalnum())
    results = []
    for variant, tag, size, count, clients in REMOTE_SIZES:
        clients = opts.conns(clients)
        paths = [target.path(download_path(origin, f"{prefix}{tag}{n}")) for n in range(count)]

        def whole(response: Response, size: int = size) -> str:
            return "" if len(response.body) == size else f"{len(response.body)} bytes"

        outcome, measurement = await get_each_once(target, opts, paths, clients, whole)
        result = outcome.result(target, "remote_fetch", variant, clients)
        result.notes.append(f"{count} media of {variant}, each fetched once from the origin")
        results.append(measurement.finish(result))
    return results
