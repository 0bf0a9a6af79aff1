"""URL previews through the whole server, against a site of the test's own
on loopback, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from twisted.application.internet import TimerService
from twisted.internet import defer, task

from mediarepo.media import preview_fetch
from mediarepo.media.lifecycle import (
    URL_CACHE_EXPIRY_INTERVAL_SECONDS,
    URL_CACHE_MEDIA_LIFETIME_MS,
    UrlCacheExpiry,
)
from mediarepo.media.paths import local_media_path, url_cache_path, url_cache_thumbnail_dir
from mediarepo.media.url_previewer import previews_total
from mediarepo.storage.url_cache import UrlCacheStore
from tests.images import size_of
from tests.preview_site import PreviewSite, serve
from tests.utils import SERVER_NAME, LogRecords, Response, ServerTestCase

# What the fixture names resolve to: one good, one with a blocked address among good ones.
NAMES = {"site.test": ["127.0.0.1"], "mixed.test": ["127.0.0.1", "127.0.0.2"]}


async def resolve(host: str) -> Sequence[str]:
    return NAMES.get(host, [])


class PreviewTestCase(ServerTestCase):
    server_options = {"preview_name_resolver": resolve}

    async def set_up(self) -> None:
        self.site = PreviewSite()
        self.site_port, stop = await serve(self.site)
        self.addCleanup(stop)
        self.site_url = f"http://127.0.0.1:{self.site_port}"
        # A second site on an address in the blacklist, which must never be contacted.
        self.forbidden = PreviewSite()
        forbidden_port, stop_forbidden = await serve(self.forbidden, "127.0.0.2")
        self.addCleanup(stop_forbidden)
        self.forbidden_url = f"http://127.0.0.2:{forbidden_port}"
        directory = self.mktemp()
        os.makedirs(directory)
        providers = os.path.join(directory, "providers.json")
        with open(providers, "w") as f:
            json.dump(
                [
                    {
                        "provider_name": "Test",
                        "provider_url": self.site_url,
                        "endpoints": [
                            {
                                "schemes": [f"{self.site_url}/video/*"],
                                "url": f"{self.site_url}/provider",
                            }
                        ],
                    }
                ],
                f,
            )
        self.extra_config = {
            "url_preview_enabled": True,
            "url_preview_ip_range_blacklist": ["127.0.0.2/32", "10.0.0.0/8", "192.168.0.0/16"],
            "url_preview_url_blacklist": [{"path": "/secret*"}, {"netloc": "^evil\\."}],
            "url_preview_accept_language": ["en-GB", "fr;q=0.5"],
            "max_spider_size": "64K",
            "oembed": {"additional_providers": [providers]},
        }
        await super().set_up()
        self.token = await self.register()

    async def preview(
        self, url: str, *, path: str = "/_matrix/client/v1/media/preview_url", **params: Any
    ) -> Response:
        query = "url=" + quote(url, safe="") + "".join(f"&{k}={v}" for k, v in params.items())
        return await self.request("GET", f"{path}?{query}", token=self.token)

    def assert_error(self, response: Response, code: int, errcode: str) -> None:
        self.assertEqual((response.code, response.json()["errcode"]), (code, errcode))


class PreviewTests(PreviewTestCase):
    async def test_open_graph_page(self) -> None:
        response = await self.preview(f"{self.site_url}/og.html")
        self.assertEqual(response.code, 200, response.body)
        og = response.json()
        image = og.pop("og:image")
        self.assertEqual(
            og,
            {
                "og:title": "The OG title",
                "og:description": "What the page is about",
                "og:type": "article",
                "og:image:type": "image/png",
                "og:image:width": 640,
                "og:image:height": 480,
                "matrix:image:size": len(self.site.image),
            },
        )
        self.assertTrue(image.startswith(f"mxc://{SERVER_NAME}/"))
        media_id = image.split("/")[-1]
        # The image is media of ours: stored under url_cache/, with thumbnails.
        self.assertTrue(os.path.isfile(os.path.join(self.media_store, url_cache_path(media_id))))
        self.assertTrue(
            os.listdir(os.path.join(self.media_store, url_cache_thumbnail_dir(media_id)))
        )
        download = await self.request(
            "GET", f"/_matrix/client/v1/media/download/{SERVER_NAME}/{media_id}", token=self.token
        )
        self.assertEqual(download.body, self.site.image)
        thumbnail = await self.request(
            "GET",
            f"/_matrix/client/v1/media/thumbnail/{SERVER_NAME}/{media_id}?width=32&height=32",
            token=self.token,
        )
        self.assertEqual(thumbnail.code, 200)
        self.assertLessEqual(size_of(thumbnail.body)[0], 640)
        # Sent as Synapse sends them: one Accept-Language line each, our User-Agent.
        headers = self.site.headers["/og.html"]
        self.assertEqual(headers[b"Accept-Language"], [b"en-GB", b"fr;q=0.5"])
        self.assertIn(b"mediarepo", headers[b"User-Agent"][0])

    async def test_page_without_open_graph(self) -> None:
        response = await self.preview(
            f"{self.site_url}/plain.html", path="/_matrix/media/v3/preview_url"
        )
        self.assertEqual(response.code, 200, response.body)
        og = response.json()
        self.assertEqual(og["og:title"], "Plain page")
        self.assertEqual(og["og:description"], "A page without Open Graph tags")
        self.assertEqual((og["og:image:width"], og["og:image:height"]), (200, 100))
        self.assertEqual(og["og:image:type"], "image/jpeg")

    async def test_non_utf8_page(self) -> None:
        response = await self.preview(f"{self.site_url}/cp1251.html")
        self.assertEqual(response.json()["og:title"], "Заголовок страницы")

    async def test_image_url(self) -> None:
        response = await self.preview(f"{self.site_url}/image.png")
        og = response.json()
        self.assertEqual(og["og:description"], "picture.png")
        self.assertEqual(
            (og["og:image:width"], og["og:image:height"], og["og:image:type"]),
            (640, 480, "image/png"),
        )
        self.assertTrue(og["og:image"].startswith(f"mxc://{SERVER_NAME}/"))

    async def test_oembed_provider(self) -> None:
        url = f"{self.site_url}/video/1"
        og = (await self.preview(url)).json()
        # The provider's API was asked instead of the page.
        self.assertEqual(self.site.hits["/video/1"], 0)
        self.assertEqual(self.site.hits["/provider"], 1)
        self.assertEqual(og["og:title"], "From the provider")
        self.assertEqual(og["og:url"], url)
        self.assertEqual(og["og:site_name"], "Test Provider")
        self.assertEqual((og["og:video:width"], og["og:type"]), (640, "video.other"))
        self.assertEqual(og["og:image:type"], "image/jpeg")

    async def test_oembed_autodiscovery(self) -> None:
        og = (await self.preview(f"{self.site_url}/oembed-page.html")).json()
        # The page's own title wins over the oEmbed answer's.
        self.assertEqual(og["og:title"], "Page title")
        self.assertEqual(og["og:site_name"], "Test Provider")

    async def test_redirect_into_blocked_range(self) -> None:
        self.site.redirect_to = f"{self.forbidden_url}/og.html"
        response = await self.preview(f"{self.site_url}/redirect")
        self.assertIn(response.code, (403, 502))
        self.assertEqual(sum(self.forbidden.hits.values()), 0)

    async def test_blocked_ip_literal(self) -> None:
        response = await self.preview(f"{self.forbidden_url}/og.html")
        self.assert_error(response, 403, "M_UNKNOWN")
        self.assertEqual(sum(self.forbidden.hits.values()), 0)

    async def test_name_with_an_allowed_and_a_blocked_address(self) -> None:
        response = await self.preview(f"http://mixed.test:{self.site_port}/og.html")
        self.assert_error(response, 502, "M_UNKNOWN")
        self.assertEqual(sum(self.site.hits.values()), 0)
        # The same site by a name with only the good address is previewed.
        response = await self.preview(f"http://site.test:{self.site_port}/og.html")
        self.assertEqual(response.code, 200)

    async def test_page_over_max_spider_size(self) -> None:
        response = await self.preview(f"{self.site_url}/big.html")
        self.assert_error(response, 502, "M_TOO_LARGE")

    async def test_url_blacklist(self) -> None:
        response = await self.preview(f"{self.site_url}/secret/page")
        self.assert_error(response, 403, "M_UNKNOWN")
        self.assertEqual(self.site.hits["/secret/page"], 0)

    async def test_bad_pages(self) -> None:
        self.assert_error(await self.preview(f"{self.site_url}/missing"), 502, "M_UNKNOWN")
        response = await self.preview(f"{self.site_url}/video.mp4")
        self.assert_error(response, 502, "M_UNKNOWN")
        self.assertIn("video/mp4", response.json()["error"])

    async def test_bad_requests(self) -> None:
        for url in (
            "not a url",
            "/relative",
            "ftp://example.com/x",
            "data:text/html,hi",
            "http://:80/",
        ):
            self.assert_error(await self.preview(url), 400, "M_INVALID_PARAM")
        missing = await self.request(
            "GET", "/_matrix/client/v1/media/preview_url", token=self.token
        )
        self.assert_error(missing, 400, "M_MISSING_PARAM")
        anonymous = await self.request(
            "GET", "/_matrix/client/v1/media/preview_url?url=http%3A%2F%2Fa.b%2F"
        )
        self.assert_error(anonymous, 401, "M_MISSING_TOKEN")

    async def test_cache_reuse(self) -> None:
        url = f"{self.site_url}/og.html"
        events, events_logger = LogRecords(logging.INFO), logging.getLogger("mediarepo.events")
        self.addCleanup(events_logger.setLevel, events_logger.level)
        self.addCleanup(events_logger.removeHandler, events)
        events_logger.setLevel(logging.INFO)
        events_logger.addHandler(events)
        memory_before = previews_total.labels("memory")._value.get()
        first = await self.preview(url)
        second = await self.preview(url)
        self.assertEqual(first.body, second.body)
        self.assertEqual(self.site.hits["/og.html"], 1)
        previewed = [
            r for r in events.records if getattr(r, "event", None) == "media.url_previewed"
        ]
        self.assertEqual(len(previewed), 1)
        self.assertEqual(getattr(previewed[0], "host", None), "127.0.0.1")
        self.assertEqual(previews_total.labels("memory")._value.get(), memory_before + 1)
        metrics = await self.request("GET", "/_synapse/metrics")
        self.assertIn(b'mediarepo_url_previews_total{outcome="fetched"}', metrics.body)
        # A fresh server (no memory cache) answers from the database.
        await self.server.stop()
        await self.start_server()
        third = await self.preview(url)
        self.assertEqual(third.body, first.body)
        self.assertEqual(self.site.hits["/og.html"], 1)

    async def test_concurrent_requests_fetch_once(self) -> None:
        url = f"{self.site_url}/slow.html"
        responses = await defer.gatherResults(
            [defer.ensureDeferred(self.preview(url)) for _ in range(5)]
        )
        self.assertEqual({r.code for r in responses}, {200})
        self.assertEqual(self.site.hits["/slow.html"], 1)

    async def test_page_that_never_finishes(self) -> None:
        self.patch(preview_fetch, "BODY_TIMEOUT_SECONDS", 0.5)
        await self.server.stop()
        await self.start_server()
        response = await self.preview(f"{self.site_url}/stall.html")
        self.assert_error(response, 502, "M_TOO_LARGE")

    async def test_expiry(self) -> None:
        response = await self.preview(f"{self.site_url}/og.html")
        media_id = response.json()["og:image"].split("/")[-1]
        assert self.server.database is not None and self.server.repository is not None
        store = UrlCacheStore(self.server.database)
        rows = await self.server.database.run_query(
            "t", "SELECT media_id, expires_ts, download_ts FROM local_media_repository_url_cache"
        )
        self.assertEqual(len(rows), 1)
        page_id, expires_ts, download_ts = rows[0]
        self.assertEqual(expires_ts - download_ts, 3600 * 1000)
        clock = task.Clock()
        expiry = UrlCacheExpiry(
            store, self.server.repository.storage, self.server.repository.forget_local, clock
        )
        clock.advance(expires_ts / 1000 + 1)
        self.assertEqual(await expiry.run(), (1, 0))
        self.assertFalse(os.path.exists(os.path.join(self.media_store, url_cache_path(page_id))))
        # The image stays until the downloads' lifetime is over.
        image_file = os.path.join(self.media_store, url_cache_path(media_id))
        self.assertTrue(os.path.isfile(image_file))
        clock.advance(URL_CACHE_MEDIA_LIFETIME_MS / 1000)
        self.assertEqual(await expiry.run(), (0, 2))
        self.assertFalse(os.path.exists(image_file))
        self.assertFalse(
            os.path.exists(os.path.join(self.media_store, url_cache_thumbnail_dir(media_id)))
        )
        left = await self.server.database.run_query(
            "t", "SELECT COUNT(*) FROM local_media_repository WHERE url_cache IS NOT NULL"
        )
        self.assertEqual(left[0][0], 0)
        gone = await self.request(
            "GET", f"/_matrix/client/v1/media/download/{SERVER_NAME}/{media_id}", token=self.token
        )
        self.assertEqual(gone.code, 404)

    async def test_purge_by_age_takes_preview_downloads_with_their_files(self) -> None:
        response = await self.preview(f"{self.site_url}/og.html")
        image_id = response.json()["og:image"].split("/")[-1]
        upload_id = await self.upload(self.token, b"an ordinary upload")
        admin = await self.register("root", admin=True)
        image_file = os.path.join(self.media_store, url_cache_path(image_id))
        image_thumbnails = os.path.join(self.media_store, url_cache_thumbnail_dir(image_id))
        self.assertTrue(os.listdir(image_thumbnails))
        before_ts = int(time.time() * 1000) + 60_000
        purged = await self.request(
            "POST", f"/_synapse/admin/v1/media/delete?before_ts={before_ts}", token=admin
        )
        self.assertEqual(purged.code, 200, purged.body)
        # The page, its image and the upload.
        self.assertEqual(purged.json()["total"], 3)
        self.assertIn(image_id, purged.json()["deleted_media"])
        self.assertFalse(os.path.exists(image_file))
        self.assertFalse(os.path.exists(image_thumbnails))
        self.assertEqual(os.listdir(os.path.join(self.media_store, "url_cache")), [])
        self.assertFalse(
            os.path.exists(os.path.join(self.media_store, local_media_path(upload_id)))
        )

    def test_url_cache_expiry_is_a_background_job(self) -> None:
        expiry = self.server.namedServices["URL cache expiry"]
        assert isinstance(expiry, TimerService)
        self.assertEqual(expiry.step, URL_CACHE_EXPIRY_INTERVAL_SECONDS)
        self.assertTrue(expiry.running)
        self.assertTrue(self.server.namedServices["URL preview client"].running)

    async def test_url_cache_expiry_left_to_the_background_jobs_instance(self) -> None:
        await self.server.stop()
        await self.start_server(media_instance_running_background_jobs="elsewhere")
        children = self.server.namedServices
        self.assertNotIn("URL cache expiry", children)
        self.assertNotIn("housekeeping", children)
        # Previews are still served, and their client closed at the stop.
        self.assertIn("URL preview client", children)
        response = await self.preview(f"{self.site_url}/og.html")
        self.assertEqual(response.code, 200)
        await self.server.stop()
        self.assertFalse(children["URL preview client"].running)


class PreviewPostgresTests(PreviewTests):
    engine = "psycopg2"


class DisabledPreviewTests(ServerTestCase):
    async def test_disabled_is_unrecognized(self) -> None:
        token = await self.register()
        for prefix in ("/_matrix/client/v1/media", "/_matrix/media/v3", "/_matrix/media/r0"):
            response = await self.request(
                "GET", f"{prefix}/preview_url?url=http%3A%2F%2Fexample.com%2F", token=token
            )
            self.assertEqual(response.code, 404)
            self.assertEqual(response.json()["errcode"], "M_UNRECOGNIZED")
        self.assertNotIn("URL preview client", self.server.namedServices)
        self.assertNotIn("URL cache expiry", self.server.namedServices)
