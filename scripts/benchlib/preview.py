"""The ``preview`` scenario: URL preview latency, of pages never previewed
(each a new URL: fetched, parsed, its image fetched and thumbnailed, the
result stored) and of one page previewed before (answered from cache).

The pages come from a small web site this tool serves itself on loopback;
the servers need ``url_preview_enabled`` with a blacklist that lets
127.0.0.1 through (``servers.PREVIEW_CONFIG``).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote

from benchlib.httpclient import Connection, RequestFailed
from benchlib.results import Result, ms_percentiles
from benchlib.scenarios import (
    Measurement,
    Options,
    Recorder,
    ScenarioFailed,
    ScenarioSkipped,
    Target,
    closed_loop,
    loop_result,
)

PREVIEW_PATH = "/_matrix/client/v1/media/preview_url"
# A page as news sites have them: Open Graph tags, some prose, a picture.
_PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8"><title>Bench page {n}</title>
<meta property="og:title" content="Bench page {n}">
<meta property="og:description" content="A page for the URL preview benchmark">
<meta property="og:image" content="/picture.jpg?page={n}"></head>
<body><nav>menu</nav><article>{prose}</article></body></html>"""
_PROSE = "<p>" + "Some words of an article, long enough to be summarised. " * 40 + "</p>"


class _PageHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Site

    def do_GET(self) -> None:
        if self.path.startswith("/picture.jpg"):
            body, content_type = self.server.picture, "image/jpeg"
        else:
            body = _PAGE.format(n=quote(self.path), prose=_PROSE).encode()
            content_type = "text/html; charset=utf-8"
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Site(ThreadingHTTPServer):
    daemon_threads = True
    picture: bytes


def _picture() -> bytes:
    """A picture of the size pages share (1200x630), of noise (so it is not tiny)."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.effect_noise((1200, 630), 48).convert("RGB").save(out, "JPEG", quality=85)
    return out.getvalue()


@contextmanager
def page_site() -> Iterator[str]:
    """A web site on loopback serving bench pages (any path) and their picture."""
    site = _Site(("127.0.0.1", 0), _PageHandler)
    site.picture = _picture()
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{site.server_address[1]}"
    finally:
        site.shutdown()
        site.server_close()


def _preview_path(target: Target, page_url: str) -> str:
    return target.path(f"{PREVIEW_PATH}?url={quote(page_url, safe='')}")


async def run_preview(target: Target, opts: Options) -> list[Result]:
    with page_site() as site_url:
        probe = target.connection(timeout=opts.request_timeout)
        try:
            try:
                answer = await probe.request("GET", _preview_path(target, f"{site_url}/warm"))
            except RequestFailed as e:
                raise ScenarioFailed(f"preview: {e}") from e
        finally:
            probe.close()
        if answer.status == 404 and answer.errcode() == "M_UNRECOGNIZED":
            raise ScenarioSkipped("URL previews are off on this server (url_preview_enabled)")
        if answer.status != 200 or "og:image" not in answer.json():
            raise ScenarioFailed(f"preview of a bench page answered {answer.short()}")
        return [
            await _measure(target, opts, site_url, "uncached", opts.conns(4)),
            await _measure(target, opts, site_url, "cached", opts.conns(16)),
        ]


async def _measure(
    target: Target, opts: Options, site_url: str, variant: str, connections: int
) -> Result:
    cached_path = _preview_path(target, f"{site_url}/cached-page")

    async def op(conn: Connection, rec: Recorder) -> bool:
        if variant == "cached":
            path = cached_path
        else:
            path = _preview_path(target, f"{site_url}/page/{uuid.uuid4().hex}")
        start = time.perf_counter()
        try:
            response = await conn.request("GET", path)
        except RequestFailed as e:
            rec.failure("preview", e, f"GET {path}")
            return False
        return rec.response("preview", time.perf_counter() - start, response, f"GET {path}")

    if variant == "cached":
        warm = target.connection(timeout=opts.request_timeout)
        try:
            await warm.request("GET", cached_path)
        finally:
            warm.close()
    measurement = Measurement(target)
    await asyncio.to_thread(measurement.begin)
    recorder, elapsed = await closed_loop(target, opts, connections, op)
    result = loop_result(target, "preview", connections, recorder, elapsed, "preview")
    result.variant = variant
    result.extra.update(ms_percentiles(recorder.latencies["preview"], "preview_"))
    if variant == "uncached":
        result.notes.append("each request a new page: fetch, parse, image fetch and thumbnails")
    return measurement.finish(result)
