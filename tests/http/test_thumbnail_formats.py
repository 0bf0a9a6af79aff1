"""HEIC, AVIF, BMP, TIFF and video uploads get thumbnails, over real HTTP, on
SQLite and PostgreSQL; videos that cannot be decoded fail cleanly."""

from __future__ import annotations

import logging
import time

from mediarepo.media.events import MediaEvent
from tests import images
from tests.http.test_thumbnails import ThumbnailTestCase


class _Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _CapturingTestCase(ThumbnailTestCase):
    async def set_up(self) -> None:
        await super().set_up()
        self.captured = _Captured()
        for name in ("mediarepo.media.thumbnails", "mediarepo.events"):
            logger = logging.getLogger(name)
            self.addCleanup(logger.setLevel, logger.level)
            logger.setLevel(logging.INFO)
            logger.addHandler(self.captured)
            self.addCleanup(logger.removeHandler, self.captured)

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.captured.records]


class NewSourceFormatTests(_CapturingTestCase):
    async def test_each_format_pregenerated(self) -> None:
        cases = [
            (images.heic(640, 480), "image/heic", "image/jpeg", "heic"),
            (images.avif_with_alpha(640, 480), "image/avif", "image/webp", "avif"),
            (images.bmp(640, 480), "image/bmp", "image/png", "bmp"),
            (images.tiff_with_alpha(640, 480), "image/tiff", "image/png", "tiff"),
            (images.mp4(640, 480), "video/mp4", "image/jpeg", "video"),
            (images.webm(640, 480), "video/webm", "image/jpeg", "video"),
            (images.video("mov", "mpeg4", 640, 480), "video/quicktime", "image/jpeg", "video"),
        ]
        for data, media_type, output_type, family in cases:
            media_id = await self.upload(self.token, data, media_type)
            r = await self.thumbnail(media_id, "width=320&height=240&method=scale")
            self.assertEqual((r.code, r.header("Content-Type")), (200, output_type), media_type)
            self.assertEqual(images.size_of(r.body), (320, 240), media_type)
            r = await self.thumbnail(media_id, "width=32&height=32&method=crop")
            self.assertEqual((r.code, images.size_of(r.body)), (200, (32, 32)), media_type)
            rows = await self.rows(media_id)
            self.assertEqual({row[2] for row in rows}, {output_type}, media_type)
            self.assertIn((640, 480, output_type, "scale"), rows, media_type)
            # Pre-generation is done: nothing is left owed.
            assert self.server.database is not None
            owed = await self.server.database.run_query(
                "test", "SELECT media_id FROM mediarepo_pending_thumbnails", ()
            )
            self.assertEqual(owed, [], media_type)
            # The event names the source's family.
            sources = {
                getattr(r, "source_type", None)
                for r in self.captured.records
                if getattr(r, "media_id", None) == media_id
                and getattr(r, "event", None) == MediaEvent.THUMBNAIL_GENERATED.value
            }
            self.assertEqual(sources, {family}, media_type)
        from mediarepo.media.thumbnails import thumbnails_generated

        for family in ("heic", "avif", "bmp", "tiff", "video"):
            self.assertGreater(
                thumbnails_generated.labels("pregenerate", family)._value.get(), 0, family
            )
        r = await self.request("GET", "/_synapse/metrics")
        self.assertIn(b'source="heic"', r.body)

    async def test_broken_videos_fail_cleanly(self) -> None:
        cases = [
            (images.mp4(320, 240)[:1500], "video/mp4"),  # truncated
            (images.webm(320, 240)[:300], "video/webm"),  # truncated
            (b"this is not a video" * 100, "video/mp4"),
            (images.webm(64, 64), "video/mp4"),  # mislabelled
        ]
        started = time.monotonic()
        for data, media_type in cases:
            media_id = await self.upload(self.token, data, media_type)
            r = await self.thumbnail(media_id, "width=32&height=32")
            self.assertEqual((r.code, r.json()["errcode"]), (400, "M_UNKNOWN"), media_type)
            self.assertIn("Cannot find any thumbnails", r.json()["error"])
            self.assertEqual(self.thumbnail_files(media_id), [])
            self.assertTrue(
                any(m.startswith(f"not thumbnailing {media_id}") for m in self.messages()),
                (media_type, self.messages()),
            )
        # A video declaring a resolution over max_image_pixels is refused as
        # any other too large source is, before anything is decoded.
        media_id = await self.upload(self.token, images.webm_huge_declared(), "video/webm")
        r = await self.thumbnail(media_id, "width=32&height=32")
        self.assertEqual((r.code, r.json()["errcode"]), (413, "M_TOO_LARGE"))
        self.assertEqual(self.thumbnail_files(media_id), [])
        self.assertLess(time.monotonic() - started, 30)
        # No thread is left busy: a good video still gets its thumbnail.
        media_id = await self.upload(self.token, images.mp4(160, 120), "video/mp4")
        r = await self.thumbnail(media_id, "width=32&height=32")
        self.assertEqual((r.code, r.header("Content-Type")), (200, "image/jpeg"))


class NewSourceFormatPostgresTests(NewSourceFormatTests):
    engine = "psycopg2"


class DisabledFormatTests(_CapturingTestCase):
    extra_config = {"thumbnail_formats": {"video": False, "heic": False}}

    async def test_turned_off_formats_get_no_thumbnails(self) -> None:
        for data, media_type in [
            (images.mp4(160, 120), "video/mp4"),
            (images.heic(160, 120), "image/heic"),
        ]:
            media_id = await self.upload(self.token, data, media_type)
            r = await self.thumbnail(media_id, "width=32&height=32")
            self.assertEqual((r.code, r.json()["errcode"]), (400, "M_UNKNOWN"), media_type)
            self.assertEqual(await self.rows(media_id), [])
        # The others still do.
        media_id = await self.upload(self.token, images.bmp(160, 120), "image/bmp")
        r = await self.thumbnail(media_id, "width=32&height=32")
        self.assertEqual(r.code, 200)


class DisabledFormatPostgresTests(DisabledFormatTests):
    engine = "psycopg2"


class DynamicVideoTests(_CapturingTestCase):
    extra_config = {"dynamic_thumbnails": True}

    async def test_video_on_demand(self) -> None:
        media_id = await self.upload(self.token, images.webm(320, 240), "video/webm")
        r = await self.thumbnail(media_id, "width=100&height=100&method=crop")
        self.assertEqual((r.code, r.header("Content-Type")), (200, "image/jpeg"))
        self.assertEqual(images.size_of(r.body), (100, 100))
        media_id = await self.upload(self.token, images.webm_huge_declared(), "video/webm")
        r = await self.thumbnail(media_id, "width=100&height=100&method=crop")
        self.assertEqual((r.code, r.json()["errcode"]), (413, "M_TOO_LARGE"))


class DynamicVideoPostgresTests(DynamicVideoTests):
    engine = "psycopg2"
