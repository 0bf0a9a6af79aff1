"""URL previews cached by one server are served by the other: Synapse and
mediarepo, one after the other on one ``homeserver.yaml``, one PostgreSQL
database and one media store, preview pages of a site of the test's own on
loopback (which counts its hits, so a preview answered from the other
server's cache is seen not to fetch again).

1. Synapse previews page A (and caches its image). It stops.
2. mediarepo answers A's preview from Synapse's cache without fetching it,
   serves A's image, and previews page B. It stops.
3. Synapse answers B's preview from mediarepo's cache without fetching it,
   and serves B's image and a thumbnail of it.

``tox -e interop`` runs it (with the other interop tests).
"""

from __future__ import annotations

import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote

from tests import images
from tests.integration.test_synapse_interop import (
    DOWNLOAD_PATH,
    SynapseTestCase,
    http_request,
    media_id_of,
)

PREVIEW_PATH = "/_matrix/client/v1/media/preview_url"


def page(title: str, image: str) -> bytes:
    return (
        f"<html><head><title>ignored</title><meta property='og:title' content='{title}'>"
        f"<meta property='og:description' content='About {title}'>"
        f"<meta property='og:image' content='{image}'></head><body><p>x</p></body></html>"
    ).encode()


class _Site(ThreadingHTTPServer):
    hits: Counter[str]
    pages: dict[str, tuple[bytes, str]]


class _Handler(BaseHTTPRequestHandler):
    server: _Site

    def do_GET(self) -> None:
        self.server.hits[self.path] += 1
        body, content_type = self.server.pages.get(self.path, (b"missing", "text/plain"))
        self.send_response(200 if self.path in self.server.pages else 404)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class SynapsePreviewInteropTest(SynapseTestCase):
    def setUp(self) -> None:
        super().setUp()
        site = _Site(("127.0.0.1", 0), _Handler)
        site.hits = Counter()
        site.pages = {
            "/a.html": (page("Page A", "/a.png"), "text/html; charset=utf-8"),
            "/b.html": (page("Page B", "/b.jpg"), "text/html; charset=utf-8"),
            "/a.png": (images.png(400, 300), "image/png"),
            "/b.jpg": (images.jpeg(800, 600), "image/jpeg"),
        }
        threading.Thread(target=site.serve_forever, daemon=True).start()
        self.addCleanup(site.server_close)
        self.addCleanup(site.shutdown)
        self.site = site
        self.site_url = f"http://127.0.0.1:{site.server_address[1]}"

    def test_previews_cached_by_one_are_served_by_the_other(self) -> None:
        try:
            self._run_scenario()
        except BaseException:
            self._dump_logs()
            raise

    def _preview(self, token: str, path: str, who: str) -> dict[str, Any]:
        url = quote(self.site_url + path, safe="")
        response = http_request(self.port, "GET", f"{PREVIEW_PATH}?url={url}", token=token)
        self.assertEqual(response.status, 200, f"{who} preview of {path}: {response.body!r}")
        og: dict[str, Any] = response.json()
        return og

    def _assert_image_served(self, token: str, og: dict[str, Any], path: str, who: str) -> None:
        server, media_id = media_id_of(og["og:image"])
        response = http_request(
            self.port, "GET", f"{DOWNLOAD_PATH}/{server}/{media_id}", token=token
        )
        self.assertEqual(response.status, 200, f"{who}: image of {path}")
        self.assertTrue(response.body == self.site.pages[path][0], f"{who}: bytes of {path}")

    def _run_scenario(self) -> None:
        self._write_config(
            url_preview_enabled=True,
            url_preview_ip_range_blacklist=["10.0.0.0/8", "192.168.0.0/16"],
        )
        synapse = self._start_synapse("synapse-1")
        token = self._register_and_login()
        a_by_synapse = self._preview(token, "/a.html", "synapse-1")
        self.assertEqual(a_by_synapse["og:title"], "Page A")
        self.assertEqual(a_by_synapse["og:image:width"], 400)
        self._stop(synapse)

        mediarepo = self._start_mediarepo(token)
        a_by_us = self._preview(token, "/a.html", "mediarepo")
        self.assertEqual(a_by_us, a_by_synapse)
        self.assertEqual(self.site.hits["/a.html"], 1, "mediarepo fetched a page Synapse cached")
        self._assert_image_served(token, a_by_us, "/a.png", "mediarepo")
        b_by_us = self._preview(token, "/b.html", "mediarepo")
        self.assertEqual(
            (b_by_us["og:title"], b_by_us["og:image:width"], b_by_us["og:image:height"]),
            ("Page B", 800, 600),
        )
        self._stop(mediarepo)

        synapse = self._start_synapse("synapse-2")
        b_by_synapse = self._preview(token, "/b.html", "synapse-2")
        self.assertEqual(b_by_synapse, b_by_us)
        self.assertEqual(self.site.hits["/b.html"], 1, "Synapse fetched a page mediarepo cached")
        self._assert_image_served(token, b_by_synapse, "/b.jpg", "synapse-2")
        server, media_id = media_id_of(b_by_synapse["og:image"])
        thumbnail = http_request(
            self.port,
            "GET",
            f"/_matrix/client/v1/media/thumbnail/{server}/{media_id}?width=320&height=240",
            token=token,
        )
        self.assertEqual(thumbnail.status, 200, f"Synapse thumbnail of ours: {thumbnail.body!r}")
        self.assertEqual(thumbnail.header("Content-Type"), "image/jpeg")
        self._stop(synapse)
