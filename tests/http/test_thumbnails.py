"""Thumbnails over real HTTP: pre-generated and dynamic, on SQLite and PostgreSQL."""

from __future__ import annotations

import os

from twisted.internet import defer

from mediarepo.media.paths import local_thumbnail_dir
from tests import images
from tests.utils import SERVER_NAME, Response, ServerTestCase

THUMBNAIL = f"/_matrix/client/v1/media/thumbnail/{SERVER_NAME}"
LEGACY_THUMBNAIL = f"/_matrix/media/v3/thumbnail/{SERVER_NAME}"


class ThumbnailTestCase(ServerTestCase):
    async def set_up(self) -> None:
        await super().set_up()
        self.token = await self.register()

    async def thumbnail(self, media_id: str, query: str, path: str = THUMBNAIL) -> Response:
        return await self.request("GET", f"{path}/{media_id}?{query}", token=self.token)

    async def rows(self, media_id: str) -> list[tuple[int, int, str, str]]:
        assert self.server.repository is not None
        rows = await self.server.repository._media_store.get_local_thumbnails(media_id)
        return sorted((r.width, r.height, r.type, r.method) for r in rows)

    def thumbnail_files(self, media_id: str) -> list[str]:
        directory = os.path.join(self.media_store, local_thumbnail_dir(media_id))
        return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


class PregeneratedThumbnailTests(ThumbnailTestCase):
    async def test_synapse_sizes_rows_and_paths(self) -> None:
        media_id = await self.upload(self.token, images.jpeg(1000, 800), "image/jpeg")
        # The thumbnail request waits for pre-generation still under way.
        r = await self.thumbnail(media_id, "width=320&height=240&method=scale")
        self.assertEqual(r.code, 200, r.body)
        self.assertEqual(r.header("Content-Type"), "image/jpeg")
        self.assertEqual(r.header("Content-Disposition"), "inline; filename=thumbnail.jpg")
        self.assertEqual(images.size_of(r.body), (300, 240))
        expected = [
            (32, 32, "image/jpeg", "crop"),
            (96, 96, "image/jpeg", "crop"),
            (300, 240, "image/jpeg", "scale"),
            (600, 480, "image/jpeg", "scale"),
            (750, 600, "image/jpeg", "scale"),
        ]
        self.assertEqual(await self.rows(media_id), expected)
        self.assertEqual(
            self.thumbnail_files(media_id),
            sorted(f"{w}-{h}-image-jpeg-{m}" for w, h, _, m in expected),
        )
        r = await self.thumbnail(media_id, "width=32&height=32&method=crop")
        self.assertEqual(images.size_of(r.body), (32, 32))
        # Selection: the smallest stored size at least as large as asked.
        r = await self.thumbnail(media_id, "width=500&height=400")
        self.assertEqual(images.size_of(r.body), (600, 480))
        # Larger than any stored size: made from the original, at its own size
        # since it is smaller than the request (Synapse: the 750x600).
        r = await self.thumbnail(media_id, "width=2000&height=2000")
        self.assertEqual(images.size_of(r.body), (1000, 800))

    async def test_tiny_png_is_never_upscaled(self) -> None:
        media_id = await self.upload(self.token, images.png(1, 1), "image/png")
        r = await self.thumbnail(media_id, "width=32&height=32&method=crop")
        self.assertEqual((r.code, r.header("Content-Type")), (200, "image/png"))
        self.assertEqual(images.size_of(r.body), (1, 1))
        # Synapse makes 32x32 and 96x96 crops (upscaled); the spec forbids that.
        # Every size collapses to the source's own, once per method so that a
        # Synapse (which answers crops from crop rows only) finds one too.
        self.assertEqual(
            await self.rows(media_id),
            [(1, 1, "image/png", "crop"), (1, 1, "image/png", "scale")],
        )

    async def test_png_keeps_transparency(self) -> None:
        media_id = await self.upload(self.token, images.png_with_alpha(400, 300), "image/png")
        r = await self.thumbnail(media_id, "width=320&height=240")
        self.assertEqual(r.header("Content-Type"), "image/png")
        image = images.open_image(r.body)
        self.assertIn("A", image.getbands())
        self.assertEqual(images.pixel(image, (0, 0))[3], 0)

    async def test_exif_orientation_applied(self) -> None:
        # Stored landscape, shown portrait (orientation 6: rotate 90° clockwise).
        media_id = await self.upload(self.token, images.jpeg(400, 200, orientation=6), "image/jpeg")
        r = await self.thumbnail(media_id, "width=320&height=240")
        self.assertEqual(images.size_of(r.body), (120, 240))

    async def test_animated_gif(self) -> None:
        media_id = await self.upload(self.token, images.animated_gif(200, 100), "image/gif")
        r = await self.thumbnail(media_id, "width=96&height=96&method=crop&animated=true")
        self.assertEqual(r.header("Content-Type"), "image/webp")
        image = images.open_image(r.body)
        self.assertEqual(images.frame_count(image), 3)
        r = await self.thumbnail(media_id, "width=96&height=96&method=crop&animated=false")
        self.assertEqual(r.header("Content-Type"), "image/png")
        self.assertFalse(getattr(images.open_image(r.body), "is_animated", False))
        types = {row[2] for row in await self.rows(media_id)}
        self.assertEqual(types, {"image/png", "image/webp"})

    async def test_static_source_with_animated_true(self) -> None:
        media_id = await self.upload(self.token, images.png(100, 100), "image/png")
        r = await self.thumbnail(media_id, "width=96&height=96&method=crop&animated=true")
        self.assertEqual((r.code, r.header("Content-Type")), (200, "image/png"))

    async def test_sources_that_cannot_be_thumbnailed(self) -> None:
        cases = [
            (b"just text", "text/plain"),
            (b"not an image at all", "image/png"),
            (images.jpeg(300, 200), "image/png"),  # mislabelled
            (images.jpeg(300, 200)[:400], "image/jpeg"),  # truncated
        ]
        for data, content_type in cases:
            media_id = await self.upload(self.token, data, content_type)
            r = await self.thumbnail(media_id, "width=32&height=32")
            self.assertEqual((r.code, r.json()["errcode"]), (400, "M_UNKNOWN"), content_type)
            self.assertIn("Cannot find any thumbnails", r.json()["error"])
            self.assertEqual(self.thumbnail_files(media_id), [])
        # Too large to thumbnail: the spec's 413 (Synapse: the 400 above).
        media_id = await self.upload(self.token, images.png_bomb(), "image/png")
        r = await self.thumbnail(media_id, "width=32&height=32")
        self.assertEqual((r.code, r.json()["errcode"]), (413, "M_TOO_LARGE"))
        self.assertEqual(self.thumbnail_files(media_id), [])
        # The server keeps serving.
        media_id = await self.upload(self.token, images.png(50, 50), "image/png")
        r = await self.thumbnail(media_id, "width=32&height=32")
        self.assertEqual(r.code, 200)

    async def test_missing_file_is_regenerated(self) -> None:
        media_id = await self.upload(self.token, images.jpeg(1000, 800), "image/jpeg")
        # Another size, asked for to wait until pre-generation is done.
        await self.thumbnail(media_id, "width=32&height=32&method=crop")
        directory = os.path.join(self.media_store, local_thumbnail_dir(media_id))
        os.unlink(os.path.join(directory, "300-240-image-jpeg-scale"))
        again = await self.thumbnail(media_id, "width=320&height=240")
        self.assertEqual(again.code, 200)
        self.assertEqual(images.size_of(again.body), (300, 240))
        self.assertIn("300-240-image-jpeg-scale", os.listdir(directory))

    async def test_parameters_and_access(self) -> None:
        media_id = await self.upload(self.token, images.png(64, 64), "image/png")
        cases = [
            ("height=32", 400, "M_MISSING_PARAM"),
            ("width=32", 400, "M_MISSING_PARAM"),
            ("width=0&height=32", 400, "M_INVALID_PARAM"),
            ("width=-5&height=32", 400, "M_INVALID_PARAM"),
            ("width=x&height=32", 400, "M_INVALID_PARAM"),
            ("width=99999&height=32", 400, "M_INVALID_PARAM"),
            ("width=32&height=32&method=zoom", 400, "M_INVALID_PARAM"),
            ("width=32&height=32&animated=yes", 400, "M_INVALID_PARAM"),
        ]
        for query, code, errcode in cases:
            r = await self.thumbnail(media_id, query)
            self.assertEqual((r.code, r.json()["errcode"]), (code, errcode), query)
        # Authentication comes before the parameters.
        r = await self.request("GET", f"{THUMBNAIL}/{media_id}")
        self.assertEqual((r.code, r.json()["errcode"]), (401, "M_MISSING_TOKEN"))
        # Authenticated media is not served on the legacy path.
        r = await self.request("GET", f"{LEGACY_THUMBNAIL}/{media_id}?width=32&height=32")
        self.assertEqual((r.code, r.json()["errcode"]), (404, "M_NOT_FOUND"))
        r = await self.thumbnail("unknownmediaid", "width=32&height=32")
        self.assertEqual((r.code, r.json()["errcode"]), (404, "M_NOT_FOUND"))
        r = await self.thumbnail(
            media_id, "width=32&height=32", "/_matrix/client/v1/media/thumbnail/127.0.0.1:1"
        )
        # A remote server that cannot be reached (loopback is blocked by default).
        self.assertEqual((r.code, r.json()["errcode"]), (502, "M_UNKNOWN"))

    async def test_legacy_path_for_unauthenticated_media(self) -> None:
        await self.server.stop()
        await self.start_server(enable_authenticated_media=False)
        token = await self.register("bob")
        media_id = await self.upload(token, images.png(64, 64), "image/png")
        for version in ("r0", "v3", "v1"):
            r = await self.request(
                "GET",
                f"/_matrix/media/{version}/thumbnail/{SERVER_NAME}/{media_id}?width=32&height=32",
            )
            self.assertEqual((r.code, r.header("Content-Type")), (200, "image/png"))


class PregeneratedThumbnailPostgresTests(PregeneratedThumbnailTests):
    engine = "psycopg2"


class DynamicThumbnailTests(ThumbnailTestCase):
    extra_config = {"dynamic_thumbnails": True}

    def generated(self) -> float:
        from mediarepo.media.thumbnails import thumbnails_generated

        return float(thumbnails_generated.labels("dynamic", "jpeg")._value.get())

    async def test_exact_size_generated_once_under_concurrency(self) -> None:
        media_id = await self.upload(self.token, images.jpeg(3000, 2000), "image/jpeg")
        # Nothing is made before it is asked for.
        self.assertEqual(await self.rows(media_id), [])
        before = self.generated()
        responses = await defer.gatherResults(
            [
                defer.ensureDeferred(self.thumbnail(media_id, "width=320&height=240&method=scale"))
                for _ in range(20)
            ]
        )
        self.assertEqual({r.code for r in responses}, {200})
        self.assertEqual({r.body for r in responses}.__len__(), 1)
        self.assertEqual(images.size_of(responses[0].body), (320, 213))
        self.assertEqual(self.generated() - before, 1)
        # Recorded at its real size (Synapse records the requested 320x240).
        self.assertEqual(await self.rows(media_id), [(320, 213, "image/jpeg", "scale")])
        # Reused afterwards.
        r = await self.thumbnail(media_id, "width=320&height=240&method=scale")
        self.assertEqual(r.body, responses[0].body)
        self.assertEqual(self.generated() - before, 1)

    async def test_crop_exact_and_never_upscaled(self) -> None:
        media_id = await self.upload(self.token, images.jpeg(640, 480), "image/jpeg")
        r = await self.thumbnail(media_id, "width=100&height=100&method=crop")
        self.assertEqual(images.size_of(r.body), (100, 100))
        # The source fits inside the request: its own size (the spec: the
        # original rather than a thumbnail), not a 640x320 cut of it.
        r = await self.thumbnail(media_id, "width=2000&height=1000&method=crop")
        self.assertEqual(images.size_of(r.body), (640, 480))
        # Larger than the source in one dimension only: the requested aspect,
        # as large as the source holds.
        r = await self.thumbnail(media_id, "width=1000&height=200&method=crop")
        self.assertEqual(images.size_of(r.body), (640, 128))
        r = await self.thumbnail(media_id, "width=2000&height=2000&method=scale")
        self.assertEqual(images.size_of(r.body), (640, 480))

    async def test_failures(self) -> None:
        media_id = await self.upload(self.token, b"text", "text/plain")
        r = await self.thumbnail(media_id, "width=32&height=32")
        self.assertEqual((r.code, r.json()["error"]), (400, "Failed to generate thumbnail."))
        media_id = await self.upload(self.token, images.jpeg(300, 300)[:300], "image/jpeg")
        r = await self.thumbnail(media_id, "width=32&height=32")
        self.assertEqual((r.code, r.json()["errcode"]), (400, "M_UNKNOWN"))
        self.assertEqual(self.thumbnail_files(media_id), [])
        media_id = await self.upload(self.token, images.png_bomb(), "image/png")
        r = await self.thumbnail(media_id, "width=32&height=32")
        self.assertEqual((r.code, r.json()["errcode"]), (413, "M_TOO_LARGE"))
        self.assertEqual(self.thumbnail_files(media_id), [])


class DynamicThumbnailPostgresTests(DynamicThumbnailTests):
    engine = "psycopg2"


def generated_on_demand() -> float:
    from mediarepo.media.thumbnails import thumbnails_generated

    return sum(
        sample.value
        for metric in thumbnails_generated.collect()
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels.get("reason") == "dynamic"
    )


class SpecSelectionTests(ThumbnailTestCase):
    """The spec's rules with the default ``dynamic_thumbnails: false``: never
    upscaled, never smaller than asked unless the original is, crops of the
    requested aspect, and what no stored size covers made on demand."""

    async def test_small_source_never_upscaled(self) -> None:
        media_id = await self.upload(self.token, images.png(20, 15), "image/png")
        r = await self.thumbnail(media_id, "width=96&height=96&method=crop")
        self.assertEqual((r.code, r.header("Content-Type")), (200, "image/png"))
        # The original's size, not a 15x15 cut: the spec asks for the original
        # when it is smaller than the request.
        self.assertEqual(images.size_of(r.body), (20, 15))
        self.assertEqual(
            await self.rows(media_id),
            [(20, 15, "image/png", "crop"), (20, 15, "image/png", "scale")],
        )
        self.assertEqual(
            self.thumbnail_files(media_id), ["20-15-image-png-crop", "20-15-image-png-scale"]
        )
        for method in ("crop", "scale"):
            for width, height in ((20, 15), (32, 32), (96, 96), (200, 100), (10_000, 10_000)):
                r = await self.thumbnail(media_id, f"width={width}&height={height}&method={method}")
                self.assertEqual(r.code, 200)
                self.assertEqual(images.size_of(r.body), (20, 15), (method, width, height))
            for width, height in ((1, 1), (10, 10), (16, 12), (20, 10), (5, 15)):
                r = await self.thumbnail(media_id, f"width={width}&height={height}&method={method}")
                w, h = images.size_of(r.body)
                self.assertLessEqual((w, h), (20, 15), (method, width, height))
                self.assertLessEqual(h, 15)
                if method == "crop":
                    # Requested aspect, at least the requested size.
                    self.assertEqual(w * height, h * width, (method, width, height))
                    self.assertGreaterEqual((w, h), (width, height))
                else:
                    self.assertTrue(w >= width or h >= height, (method, width, height))
        # Nothing stored anywhere is larger than the source.
        for w, h, _, _ in await self.rows(media_id):
            self.assertLessEqual((w, h), (20, 15))
            self.assertLessEqual(h, 15)

    async def test_crop_has_the_requested_aspect(self) -> None:
        media_id = await self.upload(self.token, images.jpeg(1600, 1200), "image/jpeg")
        before = generated_on_demand()
        # Synapse answers with the 32x32 crop.
        r = await self.thumbnail(media_id, "width=200&height=100&method=crop")
        self.assertEqual((r.code, images.size_of(r.body)), (200, (200, 100)))
        self.assertIn((200, 100, "image/jpeg", "crop"), await self.rows(media_id))
        self.assertEqual(generated_on_demand() - before, 1)
        # A smaller request of the same aspect is covered by it.
        r = await self.thumbnail(media_id, "width=100&height=50&method=crop")
        self.assertEqual(images.size_of(r.body), (200, 100))
        r = await self.thumbnail(media_id, "width=64&height=64&method=crop")
        self.assertEqual(images.size_of(r.body), (96, 96))
        self.assertEqual(generated_on_demand() - before, 1)
        # Wider than the source: the aspect kept, as large as the source holds.
        r = await self.thumbnail(media_id, "width=4000&height=200&method=crop")
        self.assertEqual(images.size_of(r.body), (1600, 80))

    async def test_scale_covers_the_request(self) -> None:
        media_id = await self.upload(self.token, images.jpeg(1600, 1200), "image/jpeg")
        # Synapse answers with the 800x600.
        r = await self.thumbnail(media_id, "width=1000&height=1000&method=scale")
        self.assertEqual(images.size_of(r.body), (1000, 750))
        r = await self.thumbnail(media_id, "width=500&height=1000&method=scale")
        self.assertEqual(images.size_of(r.body), (640, 480))
        r = await self.thumbnail(media_id, "width=300&height=300&method=scale")
        self.assertEqual(images.size_of(r.body), (320, 240))
        # Larger than the original: the original's size.
        r = await self.thumbnail(media_id, "width=3000&height=3000&method=scale")
        self.assertEqual(images.size_of(r.body), (1600, 1200))
        self.assertEqual(
            await self.rows(media_id),
            [
                (32, 32, "image/jpeg", "crop"),
                (96, 96, "image/jpeg", "crop"),
                (320, 240, "image/jpeg", "scale"),
                (640, 480, "image/jpeg", "scale"),
                (800, 600, "image/jpeg", "scale"),
                (1000, 750, "image/jpeg", "scale"),
                (1600, 1200, "image/jpeg", "scale"),
            ],
        )

    async def test_made_on_demand_once_then_served_from_its_row(self) -> None:
        media_id = await self.upload(self.token, images.jpeg(1600, 1200), "image/jpeg")
        await self.thumbnail(media_id, "width=32&height=32&method=crop")  # pre-generation done
        before = generated_on_demand()
        responses = await defer.gatherResults(
            [
                defer.ensureDeferred(self.thumbnail(media_id, "width=1000&height=1000"))
                for _ in range(10)
            ]
        )
        self.assertEqual({r.code for r in responses}, {200})
        self.assertEqual(len({r.body for r in responses}), 1)
        self.assertEqual(generated_on_demand() - before, 1)
        self.assertIn("1000-750-image-jpeg-scale", self.thumbnail_files(media_id))
        # Its row answers the next requests it covers; nothing more is made.
        for query in ("width=1000&height=1000", "width=900&height=700", "width=950&height=1000"):
            r = await self.thumbnail(media_id, query)
            self.assertEqual(r.body, responses[0].body, query)
        self.assertEqual(generated_on_demand() - before, 1)

    async def test_animated_made_on_demand(self) -> None:
        media_id = await self.upload(self.token, images.animated_gif(400, 200), "image/gif")
        r = await self.thumbnail(media_id, "width=200&height=100&method=crop&animated=true")
        self.assertEqual(r.header("Content-Type"), "image/webp")
        image = images.open_image(r.body)
        self.assertEqual((image.size, images.frame_count(image)), ((200, 100), 3))
        r = await self.thumbnail(media_id, "width=200&height=100&method=crop&animated=false")
        self.assertEqual(r.header("Content-Type"), "image/png")
        self.assertEqual(images.size_of(r.body), (200, 100))

    async def test_headers_as_downloads(self) -> None:
        media_id = await self.upload(self.token, images.png(100, 80), "image/png")
        download = await self.request(
            "GET", f"/_matrix/client/v1/media/download/{SERVER_NAME}/{media_id}", token=self.token
        )
        for query, expected in (
            ("width=32&height=32&method=crop", "inline; filename=thumbnail.png"),
            ("width=60&height=30&method=crop", "inline; filename=thumbnail.png"),  # on demand
        ):
            r = await self.thumbnail(media_id, query)
            self.assertEqual(r.code, 200)
            self.assertEqual(r.header("Content-Disposition"), expected)
            for name in (
                "Content-Security-Policy",
                "X-Content-Security-Policy",
                "Referrer-Policy",
                "Cross-Origin-Resource-Policy",
                "Cache-Control",
                "ETag",
                "X-Robots-Tag",
                "Access-Control-Allow-Origin",
            ):
                self.assertIsNotNone(download.header(name), name)
                self.assertEqual(r.header(name), download.header(name), name)
        # Error answers from the thumbnail paths carry them too, as downloads' do.
        r = await self.thumbnail("unknownmediaid", "width=32&height=32")
        self.assertEqual(r.code, 404)
        self.assertEqual(
            r.header("Content-Security-Policy"), download.header("Content-Security-Policy")
        )
        jpeg_id = await self.upload(self.token, images.jpeg(100, 80), "image/jpeg")
        r = await self.thumbnail(jpeg_id, "width=32&height=32&method=crop")
        self.assertEqual(r.header("Content-Disposition"), "inline; filename=thumbnail.jpg")


class SpecSelectionPostgresTests(SpecSelectionTests):
    engine = "psycopg2"
