"""HEIC, AVIF, BMP, TIFF and video sources, on real files made here."""

from __future__ import annotations

import io
import os
import time

from PIL import Image
from twisted.trial import unittest

from mediarepo.media.source_formats import THUMBNAIL_OUTPUT_TYPES, source_family
from mediarepo.media.thumbnailer import ImageTooLargeError, Thumbnailer, ThumbnailError
from mediarepo.media.video import (
    MAX_BYTES_READ,
    VIDEO_DECODE_COST,
    BoundedReader,
    VideoLimitError,
    VideoThumbnailer,
)
from tests import images

LIMIT = 32 * 1024 * 1024


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


class _Files(unittest.TestCase):
    def write(self, data: bytes) -> str:
        path: str = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        return path


class ImageFormatTests(_Files):
    def test_each_format_thumbnailed_as_its_output_type(self) -> None:
        cases = [
            (images.heic(400, 300), "image/heic", "JPEG"),
            (images.heic(400, 300), "image/heif", "JPEG"),
            (images.avif_with_alpha(400, 300), "image/avif", "WEBP"),
            (images.bmp(400, 300), "image/bmp", "PNG"),
            (images.tiff_with_alpha(400, 300), "image/tiff", "PNG"),
        ]
        for data, media_type, output_format in cases:
            path = self.write(data)
            output_type = THUMBNAIL_OUTPUT_TYPES[media_type]
            with Thumbnailer(path, media_type, LIMIT) as t:
                self.assertEqual((t.width, t.height), (400, 300), media_type)
                self.assertFalse(t.is_animated)
                scaled = decode(t.scale(96, 72, output_type, False))
                cropped = decode(t.crop(32, 32, output_type, False))
            self.assertEqual((scaled.format, scaled.size), (output_format, (96, 72)), media_type)
            self.assertEqual((cropped.format, cropped.size), (output_format, (32, 32)), media_type)

    def test_transparency_kept(self) -> None:
        for data, media_type in [
            (images.avif_with_alpha(200, 200), "image/avif"),
            (images.tiff_with_alpha(200, 200), "image/tiff"),
        ]:
            path = self.write(data)
            with Thumbnailer(path, media_type, LIMIT) as t:
                thumbnail = decode(t.scale(100, 100, THUMBNAIL_OUTPUT_TYPES[media_type], False))
            self.assertIn("A", thumbnail.getbands(), media_type)
            self.assertEqual(images.pixel(thumbnail.convert("RGBA"), (2, 2))[3], 0, media_type)
            self.assertGreater(
                images.pixel(thumbnail.convert("RGBA"), (37, 37))[3], 200, media_type
            )

    def test_heic_colours_and_orientation(self) -> None:
        path = self.write(images.heic(400, 200))
        with Thumbnailer(path, "image/heic", LIMIT) as t:
            thumbnail = decode(t.scale(200, 100, "image/jpeg", False)).convert("RGB")
        # The blue marker stays top-left, the rest red.
        self.assertGreater(images.pixel(thumbnail, (10, 5))[2], 150)
        self.assertGreater(images.pixel(thumbnail, (180, 90))[0], 150)

    def test_pixel_limit_checked_before_decoding(self) -> None:
        for data, media_type in [
            (images.heic(400, 300), "image/heic"),
            (images.avif_with_alpha(400, 300), "image/avif"),
            (images.bmp(400, 300), "image/bmp"),
            (images.tiff_with_alpha(400, 300), "image/tiff"),
        ]:
            with self.assertRaises(ImageTooLargeError, msg=media_type):
                Thumbnailer(self.write(data), media_type, 400 * 300)

    def test_decode_cost_counted(self) -> None:
        # libheif and libavif hold planes of their own while decoding.
        for data, media_type, cost in [
            (images.heic(400, 300), "image/heic", 2),
            (images.avif_with_alpha(400, 300), "image/avif", 3),
            (images.bmp(400, 300), "image/bmp", 1),
            (images.tiff_with_alpha(400, 300), "image/tiff", 1),
        ]:
            with Thumbnailer(self.write(data), media_type, LIMIT) as t:
                self.assertEqual(t.pixels_to_decode(96, 96), 400 * 300 * cost, media_type)

    def test_mislabelled_and_corrupt(self) -> None:
        cases = [
            (images.jpeg(100, 100), "image/heic"),
            (images.heic(100, 100), "image/avif"),
            (images.png(100, 100), "image/tiff"),
            (images.bmp(100, 100)[:60], "image/bmp"),
            (images.heic(200, 200)[:300], "image/heic"),
            (images.avif_with_alpha(200, 200)[:200], "image/avif"),
            (b"II*\x00" + b"\xff" * 200, "image/tiff"),
        ]
        for data, media_type in cases:
            with self.assertRaises(ThumbnailError, msg=media_type):
                with Thumbnailer(self.write(data), media_type, LIMIT) as t:
                    t.scale(32, 32, THUMBNAIL_OUTPUT_TYPES[media_type], False)

    def test_families(self) -> None:
        self.assertEqual(source_family("image/HEIC; x=y"), "heic")
        self.assertEqual(source_family("video/quicktime"), "video")
        self.assertEqual(source_family("image/x-ms-bmp"), "bmp")
        self.assertIsNone(source_family("text/plain"))
        self.assertIsNone(source_family(None))


class VideoTests(_Files):
    def test_mp4_webm_and_quicktime(self) -> None:
        cases = [
            (images.mp4(320, 240), "video/mp4"),
            (images.webm(320, 240), "video/webm"),
            (images.video("webm", "libvpx-vp9", 320, 240), "video/webm"),
            (images.video("mov", "mpeg4", 320, 240), "video/quicktime"),
        ]
        for data, media_type in cases:
            path = self.write(data)
            with VideoThumbnailer(path, media_type, LIMIT) as header:
                # The header alone: size and budget, nothing decoded.
                self.assertEqual((header.width, header.height), (320, 240))
                self.assertEqual(header.pixels_to_decode(96, 96), 320 * 240 * VIDEO_DECODE_COST)
                self.assertIsNone(header._decoded)
            with VideoThumbnailer(path, media_type, LIMIT, decode_now=True) as t:
                encoded = decode(t.scale(160, 120, "image/jpeg", False))
                cropped = decode(t.crop(32, 32, "image/jpeg", False))
            self.assertEqual((encoded.format, encoded.size), ("JPEG", (160, 120)), media_type)
            thumbnail = encoded.convert("RGB")
            self.assertEqual(cropped.size, (32, 32))
            # The frame's colours: the blue marker top-left, red elsewhere.
            self.assertGreater(images.pixel(thumbnail, (10, 10))[2], 150, media_type)
            self.assertGreater(images.pixel(thumbnail, (150, 110))[0], 150, media_type)

    def test_rotation_applied(self) -> None:
        # Stored landscape, displayed turned 90° clockwise (as phones record).
        path = self.write(images.mp4(320, 240, rotation=-90))
        with VideoThumbnailer(path, "video/mp4", LIMIT, decode_now=True) as t:
            self.assertEqual((t.width, t.height), (240, 320))
            thumbnail = decode(t.scale(120, 160, "image/jpeg", False)).convert("RGB")
        # The stored top-left marker is now top-right.
        self.assertGreater(images.pixel(thumbnail, (110, 10))[2], 150)
        self.assertLess(images.pixel(thumbnail, (10, 10))[2], 100)

    def assertFailsFast(self, data: bytes, media_type: str, error: type[Exception]) -> str:
        path = self.write(data)
        started = time.monotonic()
        with self.assertRaises(error) as raised:
            with VideoThumbnailer(path, media_type, LIMIT, decode_now=True) as t:
                t.scale(32, 32, "image/jpeg", False)
        self.assertLess(time.monotonic() - started, 5)
        return str(raised.exception)

    def test_truncated(self) -> None:
        for data, media_type in [
            (images.mp4(320, 240)[:1500], "video/mp4"),
            (images.webm(320, 240)[:300], "video/webm"),
            (images.mp4(320, 240)[:100], "video/quicktime"),
        ]:
            self.assertFailsFast(data, media_type, ThumbnailError)

    def test_huge_declared_resolution(self) -> None:
        message = self.assertFailsFast(
            images.webm_huge_declared(), "video/webm", ImageTooLargeError
        )
        self.assertIn("16383x16383", message)

    def test_frame_over_the_limit_is_not_decoded(self) -> None:
        # FFmpeg's max_pixels refuses the frame itself, whatever was declared.
        path = self.write(images.webm(320, 240))
        with self.assertRaises(ImageTooLargeError):
            VideoThumbnailer(path, "video/webm", 320 * 240, decode_now=True)

    def test_not_a_video(self) -> None:
        cases = [
            (b"not a video at all" * 200, "video/mp4"),
            (images.jpeg(100, 100), "video/mp4"),
            # A real WebM typed as MP4: the MP4 demuxer is used, not probing.
            (images.webm(64, 64), "video/mp4"),
            (b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n", "video/mp4"),
            (b"", "video/webm"),
        ]
        for data, media_type in cases:
            self.assertFailsFast(data, media_type, ThumbnailError)

    def test_wall_clock_limit(self) -> None:
        # A clock that jumps a minute on each look: the first read is refused.
        now = [0.0]

        def clock() -> float:
            now[0] += 60
            return now[0]

        path = self.write(images.mp4(64, 64))
        with self.assertRaises(VideoLimitError):
            VideoThumbnailer(path, "video/mp4", LIMIT, clock=clock)

    def test_bytes_read_capped(self) -> None:
        path = self.write(images.mp4(320, 240))
        with self.assertRaises(ThumbnailError) as raised:
            VideoThumbnailer(path, "video/mp4", LIMIT, decode_now=True, max_bytes=500)
        self.assertIn("500 bytes", str(raised.exception))
        self.assertEqual(MAX_BYTES_READ, 32 * 1024 * 1024)

    def test_bounded_reader(self) -> None:
        path = self.write(b"x" * 100)
        now = [0.0]
        with BoundedReader(path, 60, 10.0, lambda: now[0]) as reader:
            self.assertEqual(len(reader.read(50)), 50)
            reader.seek(0)
            self.assertEqual(len(reader.read(50)), 10)
            with self.assertRaises(VideoLimitError):
                reader.read(1)
        with BoundedReader(path, 1000, 10.0, lambda: now[0]) as reader:
            reader.seek(0, os.SEEK_END)
            self.assertEqual(reader.tell(), 100)
            now[0] = 11.0
            with self.assertRaises(VideoLimitError):
                reader.read(1)
