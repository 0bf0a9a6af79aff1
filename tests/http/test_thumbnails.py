"""Thumbnails over real HTTP: pre-generated and dynamic, on SQLite and PostgreSQL."""

from __future__ import annotations

import os

from twisted.internet import defer

from mediarepo.media.paths import local_thumbnail_dir
from tests import images
from tests.utils import SERVER_NAME, ServerTestMixin, on_both_databases

THUMBNAIL = f"/_matrix/client/v1/media/thumbnail/{SERVER_NAME}"
LEGACY_THUMBNAIL = f"/_matrix/media/v3/thumbnail/{SERVER_NAME}"


class ThumbnailTestMixin(ServerTestMixin):
    async def setUp(self) -> None:  # type: ignore[override]
        await super().setUp()
        self.token = await self.register()

    async def thumbnail(self, media_id: str, query: str, path: str = THUMBNAIL) -> object:
        return await self.request("GET", f"{path}/{media_id}?{query}", token=self.token)

    async def rows(self, media_id: str) -> list[tuple[int, int, str, str]]:
        assert self.server.repository is not None
        rows = await self.server.repository._media_store.get_local_thumbnails(media_id)
        return sorted((r.width, r.height, r.type, r.method) for r in rows)

    def thumbnail_files(self, media_id: str) -> list[str]:
        directory = os.path.join(self.media_store, local_thumbnail_dir(media_id))
        return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


@on_both_databases
class PregeneratedThumbnailTests(ThumbnailTestMixin):
    async def test_synapse_sizes_rows_and_paths(self) -> None:
        media_id = await self.upload(self.token, images.jpeg(1000, 800), "image/jpeg")
        # The thumbnail request waits for pre-generation still under way.
        r = await self.thumbnail(media_id, "width=320&height=240&method=scale")
        self.assertEqual(r.code, 200, r.body)
        self.assertEqual(r.header("Content-Type"), "image/jpeg")
        self.assertEqual(r.header("Content-Disposition"), "inline")
        self.assertIsNone(r.header("Content-Security-Policy"))
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
        r = await self.thumbnail(media_id, "width=2000&height=2000")
        self.assertEqual(images.size_of(r.body), (750, 600))

    async def test_tiny_png_collapses_scale_sizes(self) -> None:
        media_id = await self.upload(self.token, images.png(1, 1), "image/png")
        r = await self.thumbnail(media_id, "width=32&height=32&method=crop")
        self.assertEqual((r.code, r.header("Content-Type")), (200, "image/png"))
        self.assertEqual(
            await self.rows(media_id),
            [
                (1, 1, "image/png", "scale"),
                (32, 32, "image/png", "crop"),
                (96, 96, "image/png", "crop"),
            ],
        )

    async def test_png_keeps_transparency(self) -> None:
        media_id = await self.upload(self.token, images.png_with_alpha(400, 300), "image/png")
        r = await self.thumbnail(media_id, "width=320&height=240")
        self.assertEqual(r.header("Content-Type"), "image/png")
        image = images.open_image(r.body)
        self.assertIn("A", image.getbands())
        self.assertEqual(image.getpixel((0, 0))[3], 0)

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
        self.assertTrue(image.is_animated)
        self.assertEqual(image.n_frames, 3)
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
            (images.png_bomb(), "image/png"),
        ]
        for data, content_type in cases:
            media_id = await self.upload(self.token, data, content_type)
            r = await self.thumbnail(media_id, "width=32&height=32")
            self.assertEqual((r.code, r.json()["errcode"]), (400, "M_UNKNOWN"), content_type)
            self.assertIn("Cannot find any thumbnails", r.json()["error"])
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


@on_both_databases
class DynamicThumbnailTests(ThumbnailTestMixin):
    extra_config = {"dynamic_thumbnails": True}

    def generated(self) -> float:
        from mediarepo.media.thumbnails import thumbnails_generated

        return thumbnails_generated.labels("dynamic", "jpeg")._value.get()

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
        self.assertEqual(await self.rows(media_id), [(320, 240, "image/jpeg", "scale")])
        # Reused afterwards.
        r = await self.thumbnail(media_id, "width=320&height=240&method=scale")
        self.assertEqual(r.body, responses[0].body)
        self.assertEqual(self.generated() - before, 1)

    async def test_crop_exact_and_never_upscaled(self) -> None:
        media_id = await self.upload(self.token, images.jpeg(640, 480), "image/jpeg")
        r = await self.thumbnail(media_id, "width=100&height=100&method=crop")
        self.assertEqual(images.size_of(r.body), (100, 100))
        r = await self.thumbnail(media_id, "width=2000&height=1000&method=crop")
        self.assertEqual(images.size_of(r.body), (640, 320))
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
