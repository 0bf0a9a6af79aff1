"""The Pillow side of thumbnailing, on real images made here."""

from __future__ import annotations

import io
import os
import random
import resource
import struct
import time
import zlib
from typing import Any

from PIL import Image, ImageCms, ImageDraw
from twisted.trial import unittest

from mediarepo.media import thumbnailer as thumbnailer_module
from mediarepo.media.source_formats import ANIMATED_THUMBNAIL_TYPE, THUMBNAIL_OUTPUT_TYPES, aspect
from mediarepo.media.thumbnailer import (
    MAX_ANIMATED_FRAMES,
    ImageTooLargeError,
    Thumbnailer,
    ThumbnailError,
)
from tests import images

LIMIT = 32 * 1024 * 1024

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def n_frames(image: Image.Image) -> int:
    return int(getattr(image, "n_frames", 1))


def is_animated(image: Image.Image) -> bool:
    return bool(getattr(image, "is_animated", False))


def close_to(actual: Any, expected: tuple[int, ...], tolerance: int = 40) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=False))


def halves(
    width: int, height: int, left: tuple[int, int, int], right: tuple[int, int, int]
) -> Image.Image:
    image = Image.new("RGB", (width, height), left)
    ImageDraw.Draw(image).rectangle((width // 2, 0, width, height), fill=right)
    return image


def pattern(width: int, height: int) -> Image.Image:
    """Asymmetric and smooth, so a wrong turn or shift shows."""
    image = Image.new("RGB", (width, height))
    image.putdata(
        [
            (x * 255 // width, y * 255 // height, (x * y) * 255 // (width * height))
            for y in range(height)
            for x in range(width)
        ]
    )
    return image


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    assert a.size == b.size
    pixels_a = a.convert("RGB").tobytes()
    pixels_b = b.convert("RGB").tobytes()
    return sum(abs(x - y) for x, y in zip(pixels_a, pixels_b, strict=True)) / len(pixels_a)


def exif_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


class ThumbnailerTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def save(self, name: str, image: Image.Image, image_format: str, **params: Any) -> str:
        path = self.path(name)
        image.save(path, format=image_format, **params)
        return path

    def write(self, name: str, data: bytes) -> str:
        path = self.path(name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def animated_gif(
        self, name: str, colours: list[tuple[int, int, int]], durations: list[int], **params: Any
    ) -> str:
        frames = [Image.new("RGB", (60, 40), colour) for colour in colours]
        return self.save(
            name,
            frames[0],
            "GIF",
            save_all=True,
            append_images=frames[1:],
            duration=durations,
            **params,
        )

    def assertFails(self, path: str, media_type: str, animated: bool = False) -> ThumbnailError:
        """Opening and thumbnailing ``path`` raises a ThumbnailError somewhere."""
        try:
            with Thumbnailer(path, media_type, LIMIT) as t:
                t.scale(16, 16, THUMBNAIL_OUTPUT_TYPES.get(media_type, "image/png"), animated)
                t.crop(16, 16, THUMBNAIL_OUTPUT_TYPES.get(media_type, "image/png"), animated)
        except ThumbnailError as e:
            return e
        self.fail(f"{path} as {media_type} did not fail")


class AspectTests(unittest.TestCase):
    def test_synapse_sizes(self) -> None:
        self.assertEqual(aspect(1000, 800, 320, 240), (300, 240))
        self.assertEqual(aspect(1000, 800, 640, 480), (600, 480))
        self.assertEqual(aspect(1000, 800, 800, 600), (750, 600))

    def test_width_bound(self) -> None:
        self.assertEqual(aspect(3000, 2000, 320, 240), (320, 213))
        self.assertEqual(aspect(1920, 1080, 800, 600), (800, 450))

    def test_tiny_and_extreme(self) -> None:
        self.assertEqual(aspect(1, 1, 32, 32), (32, 32))
        self.assertEqual(aspect(1, 1, 1, 1), (1, 1))
        # Never zero, however thin.
        self.assertEqual(aspect(10000, 1, 32, 32), (32, 1))
        self.assertEqual(aspect(1, 10000, 32, 32), (1, 32))


class OutputTypeTests(unittest.TestCase):
    def test_synapse_map(self) -> None:
        synapse_types = ("image/jpeg", "image/jpg", "image/webp", "image/gif", "image/png")
        self.assertEqual(
            {t: THUMBNAIL_OUTPUT_TYPES[t] for t in synapse_types},
            {
                "image/jpeg": "image/jpeg",
                "image/jpg": "image/jpeg",
                "image/webp": "image/jpeg",
                "image/gif": "image/png",
                "image/png": "image/png",
            },
        )
        self.assertEqual(ANIMATED_THUMBNAIL_TYPE, "image/webp")
        # Every type made is one of the three Synapse writes.
        self.assertLessEqual(
            set(THUMBNAIL_OUTPUT_TYPES.values()), {"image/jpeg", "image/png", "image/webp"}
        )


class SizeTests(ThumbnailerTestCase):
    def _check_sizes(self, path: str, media_type: str, source: tuple[int, int]) -> None:
        output_type = THUMBNAIL_OUTPUT_TYPES[media_type]
        with Thumbnailer(path, media_type, LIMIT) as t:
            self.assertEqual((t.width, t.height), source)
            self.assertFalse(t.is_animated)
            for box in [(32, 32), (96, 96), (320, 240), (640, 480)]:
                fitted = aspect(source[0], source[1], *box)
                fitted = (min(fitted[0], source[0]), min(fitted[1], source[1]))
                self.assertEqual(decode(t.scale(*fitted, output_type, False)).size, fitted)
                self.assertEqual(decode(t.crop(*box, output_type, False)).size, box)

    def test_landscape_jpeg(self) -> None:
        path = self.save("land.jpg", pattern(400, 200), "JPEG")
        self._check_sizes(path, "image/jpeg", (400, 200))

    def test_portrait_png(self) -> None:
        path = self.save("portrait.png", pattern(200, 400), "PNG")
        self._check_sizes(path, "image/png", (200, 400))

    def test_one_pixel(self) -> None:
        path = self.save("dot.png", Image.new("RGB", (1, 1), RED), "PNG")
        self._check_sizes(path, "image/png", (1, 1))
        with Thumbnailer(path, "image/png", LIMIT) as t:
            cropped = decode(t.crop(32, 32, "image/png", False))
            self.assertEqual(cropped.size, (32, 32))
            self.assertTrue(close_to(cropped.getpixel((16, 16)), RED, 2))

    def test_scale_is_exact_size(self) -> None:
        # The caller's size is used as given, even if it is not the aspect fit.
        path = self.save("sq.png", pattern(100, 100), "PNG")
        with Thumbnailer(path, "image/png", LIMIT) as t:
            self.assertEqual(decode(t.scale(50, 20, "image/png", False)).size, (50, 20))

    def test_crop_keeps_the_middle(self) -> None:
        # Red | green | blue thirds; a square crop of the 300x100 keeps green.
        image = Image.new("RGB", (300, 100), RED)
        draw = ImageDraw.Draw(image)
        draw.rectangle((100, 0, 199, 99), fill=GREEN)
        draw.rectangle((200, 0, 299, 99), fill=BLUE)
        path = self.save("thirds.png", image, "PNG")
        with Thumbnailer(path, "image/png", LIMIT) as t:
            cropped = decode(t.crop(50, 50, "image/png", False))
        self.assertEqual(cropped.size, (50, 50))
        for xy in [(2, 2), (25, 25), (47, 47)]:
            self.assertTrue(close_to(cropped.getpixel(xy), GREEN, 10), cropped.getpixel(xy))

    def test_crop_matches_scale_then_cut(self) -> None:
        # Synapse's geometry: scale to cover, then cut the middle.
        source = pattern(300, 170)
        path = self.save("pattern.png", source, "PNG")
        with Thumbnailer(path, "image/png", LIMIT) as t:
            for width, height in [(96, 96), (120, 30), (30, 120), (500, 400)]:
                if width * 170 > height * 300:
                    scaled = (width, width * 170 // 300)
                    top = (scaled[1] - height) // 2
                    window = (0, top, width, top + height)
                else:
                    scaled = (height * 300 // 170, height)
                    left = (scaled[0] - width) // 2
                    window = (left, 0, left + width, height)
                expected = source.resize(scaled, Image.Resampling.LANCZOS).crop(window)
                actual = decode(t.crop(width, height, "image/png", False))
                self.assertLess(mean_difference(actual, expected), 2.0, (width, height))

    def test_thin_source_crop_is_bounded(self) -> None:
        # Cropping covers by scaling up: a 1x20000 line cropped to 96x96
        # would be 96x1920000 scaled; only the kept part is made.
        path = self.save("line.png", Image.new("RGB", (1, 20000), BLUE), "PNG")
        started = time.monotonic()
        with Thumbnailer(path, "image/png", LIMIT) as t:
            cropped = decode(t.crop(96, 96, "image/png", False))
        self.assertEqual(cropped.size, (96, 96))
        self.assertLess(time.monotonic() - started, 5)

    def test_bad_requests(self) -> None:
        path = self.save("p.png", pattern(20, 20), "PNG")
        with Thumbnailer(path, "image/png", LIMIT) as t:
            self.assertRaises(ThumbnailError, t.scale, 0, 10, "image/png", False)
            self.assertRaises(ThumbnailError, t.crop, 10, 0, "image/png", False)
            self.assertRaises(ThumbnailError, t.crop, 0, 0, "image/png", False)
            self.assertRaises(ThumbnailError, t.scale, -5, 10, "image/png", False)
            self.assertRaises(ThumbnailError, t.prepare, 0, 0)
            self.assertRaises(ThumbnailError, t.scale, 10, 10, "image/gif", False)
            self.assertRaises(ThumbnailError, t.scale, 10, 10, "text/plain", False)
            self.assertRaises(ImageTooLargeError, t.crop, 10000, 10000, "image/png", False)
            # Still usable afterwards.
            self.assertEqual(decode(t.scale(10, 10, "image/png", False)).size, (10, 10))


class FormatTests(ThumbnailerTestCase):
    def test_jpeg_to_jpeg(self) -> None:
        path = self.save("a.jpg", pattern(200, 100), "JPEG")
        with Thumbnailer(path, "image/jpeg", LIMIT) as t:
            out = decode(t.scale(100, 50, "image/jpeg", False))
            self.assertEqual(out.format, "JPEG")
            self.assertEqual(out.mode, "RGB")
            self.assertEqual(decode(t.crop(32, 32, "image/jpeg", False)).format, "JPEG")

    def test_jpg_alias_and_parameters(self) -> None:
        path = self.save("a.jpg", pattern(200, 100), "JPEG")
        for media_type in ["image/jpg", "IMAGE/JPEG; charset=binary", " image/jpeg "]:
            with Thumbnailer(path, media_type, LIMIT) as t:
                self.assertEqual(decode(t.scale(20, 10, "image/jpeg", False)).format, "JPEG")

    def test_png_alpha_kept(self) -> None:
        image = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
        ImageDraw.Draw(image).rectangle((50, 0, 99, 99), fill=(*RED, 255))
        path = self.save("alpha.png", image, "PNG")
        with Thumbnailer(path, "image/png", LIMIT) as t:
            for data in [t.scale(50, 50, "image/png", False), t.crop(20, 40, "image/png", False)]:
                out = decode(data)
                self.assertEqual(out.format, "PNG")
                self.assertEqual(out.mode, "RGBA")
                width, height = out.size
                self.assertEqual(images.pixel(out, (1, 1))[3], 0)
                self.assertEqual(out.getpixel((width - 2, height // 2)), (*RED, 255))

    def test_palette_gif_to_png(self) -> None:
        image = Image.new("P", (80, 60))
        image.putpalette([*RED, *GREEN, *BLUE] + [0] * (253 * 3))
        ImageDraw.Draw(image).rectangle((40, 0, 79, 59), fill=2)
        path = self.save("pal.gif", image, "GIF")
        with Thumbnailer(path, "image/gif", LIMIT) as t:
            self.assertFalse(t.is_animated)
            out = decode(t.scale(40, 30, "image/png", False))
        self.assertEqual(out.format, "PNG")
        self.assertEqual(out.mode, "RGB")
        self.assertTrue(close_to(out.getpixel((2, 15)), RED, 5))
        self.assertTrue(close_to(out.getpixel((37, 15)), BLUE, 5))

    def test_transparent_gif_keeps_transparency(self) -> None:
        image = Image.new("P", (80, 60), 0)
        image.putpalette([*RED, *GREEN, *BLUE] + [0] * (253 * 3))
        ImageDraw.Draw(image).rectangle((40, 0, 79, 59), fill=1)
        path = self.save("trans.gif", image, "GIF", transparency=0)
        with Thumbnailer(path, "image/gif", LIMIT) as t:
            out = decode(t.scale(40, 30, "image/png", False))
        self.assertEqual(out.mode, "RGBA")
        self.assertEqual(images.pixel(out, (2, 15))[3], 0)
        self.assertEqual(out.getpixel((37, 15)), (*GREEN, 255))

    def test_webp_to_jpeg(self) -> None:
        path = self.save("a.webp", pattern(120, 80), "WEBP")
        with Thumbnailer(path, "image/webp", LIMIT) as t:
            out = decode(t.scale(60, 40, "image/jpeg", False))
        self.assertEqual(out.format, "JPEG")

    def test_greyscale_and_16_bit(self) -> None:
        grey = self.save("grey.png", Image.new("L", (40, 40), 100), "PNG")
        deep = self.save("deep.png", Image.new("I;16", (40, 40), 40000), "PNG")
        for path, level in [(grey, 100), (deep, 40000 // 257)]:
            with Thumbnailer(path, "image/png", LIMIT) as t:
                out = decode(t.scale(20, 20, "image/png", False))
                self.assertEqual(out.mode, "RGB")
                self.assertTrue(close_to(out.getpixel((10, 10)), (level,) * 3, 2))

    def test_cmyk_jpeg(self) -> None:
        path = self.save("cmyk.jpg", Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG")
        with Thumbnailer(path, "image/jpeg", LIMIT) as t:
            for output_type in ["image/jpeg", "image/png"]:
                out = decode(t.scale(32, 32, output_type, False))
                self.assertEqual(out.mode, "RGB")
                self.assertTrue(close_to(out.getpixel((16, 16)), RED, 40))

    def test_webp_output_of_static_source(self) -> None:
        path = self.save("a.png", pattern(64, 64), "PNG")
        with Thumbnailer(path, "image/png", LIMIT) as t:
            out = decode(t.scale(32, 32, "image/webp", False))
        self.assertEqual(out.format, "WEBP")
        self.assertFalse(is_animated(out))

    def test_metadata_not_copied_but_rgb_profile_is(self) -> None:
        srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
        path = self.save(
            "meta.jpg",
            pattern(64, 32),
            "JPEG",
            exif=exif_with_orientation(3),
            icc_profile=srgb,
        )
        with Thumbnailer(path, "image/jpeg", LIMIT) as t:
            for output_type in ["image/jpeg", "image/png", "image/webp"]:
                out = decode(t.scale(32, 16, output_type, False))
                self.assertNotIn(0x0112, out.getexif())
                self.assertEqual(out.info.get("icc_profile"), srgb)

    def test_mpo_is_a_jpeg(self) -> None:
        first, second = pattern(80, 60), Image.new("RGB", (80, 60), BLUE)
        path = self.save("camera.jpg", first, "MPO", save_all=True, append_images=[second])
        with Image.open(path) as opened:
            self.assertEqual(opened.format, "MPO")
        with Thumbnailer(path, "image/jpeg", LIMIT) as t:
            self.assertFalse(t.is_animated)
            out = decode(t.scale(40, 30, "image/jpeg", True))
        self.assertEqual((out.format, out.size), ("JPEG", (40, 30)))


class OrientationTests(ThumbnailerTestCase):
    def test_rotated_jpeg(self) -> None:
        # Stored 400x200, red left and blue right; orientation 6 means "turn
        # clockwise to display", so it shows 200x400 with red on top.
        path = self.save(
            "rot.jpg", halves(400, 200, RED, BLUE), "JPEG", exif=exif_with_orientation(6)
        )
        with Thumbnailer(path, "image/jpeg", LIMIT) as t:
            self.assertEqual((t.width, t.height), (200, 400))
            fitted = aspect(t.width, t.height, 320, 240)
            self.assertEqual(fitted, (120, 240))
            out = decode(t.scale(*fitted, "image/jpeg", False))
            self.assertEqual(out.size, (120, 240))
            self.assertTrue(close_to(out.getpixel((60, 20)), RED))
            self.assertTrue(close_to(out.getpixel((60, 220)), BLUE))
            cropped = decode(t.crop(50, 80, "image/jpeg", False))
            self.assertEqual(cropped.size, (50, 80))

    def test_every_orientation(self) -> None:
        # Lossless PNG with an eXIf chunk, compared with Pillow's own
        # transposition followed by the plain resize-then-crop.
        source = pattern(90, 50)
        transpose = {
            2: Image.Transpose.FLIP_LEFT_RIGHT,
            3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270,
            7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90,
        }
        for orientation in range(1, 9):
            path = self.save(
                f"o{orientation}.png", source, "PNG", exif=exif_with_orientation(orientation)
            )
            shown = source.transpose(transpose[orientation]) if orientation > 1 else source
            with Thumbnailer(path, "image/png", LIMIT) as t:
                self.assertEqual((t.width, t.height), shown.size, orientation)
                scaled = decode(t.scale(shown.width // 2, shown.height // 2, "image/png", False))
                expected = shown.resize(scaled.size, Image.Resampling.LANCZOS)
                self.assertLess(mean_difference(scaled, expected), 2.0, orientation)
                cropped = decode(t.crop(20, 20, "image/png", False))
                w, h = shown.size
                if 20 * h > 20 * w:
                    cover = (20, 20 * h // w)
                    box = (0, (cover[1] - 20) // 2, 20, (cover[1] - 20) // 2 + 20)
                else:
                    cover = (20 * w // h, 20)
                    box = ((cover[0] - 20) // 2, 0, (cover[0] - 20) // 2 + 20, 20)
                expected = shown.resize(cover, Image.Resampling.LANCZOS).crop(box)
                self.assertLess(mean_difference(cropped, expected), 2.0, orientation)

    def test_bad_exif_is_ignored(self) -> None:
        path = self.save("bad.jpg", pattern(40, 20), "JPEG", exif=b"Exif\x00\x00garbage")
        with Thumbnailer(path, "image/jpeg", LIMIT) as t:
            self.assertEqual((t.width, t.height), (40, 20))
            self.assertEqual(decode(t.scale(20, 10, "image/jpeg", False)).size, (20, 10))

    def test_out_of_range_orientation_is_ignored(self) -> None:
        path = self.save("nine.jpg", pattern(40, 20), "JPEG", exif=exif_with_orientation(9))
        with Thumbnailer(path, "image/jpeg", LIMIT) as t:
            self.assertEqual((t.width, t.height), (40, 20))


class AnimationTests(ThumbnailerTestCase):
    def test_animated_gif(self) -> None:
        path = self.animated_gif("anim.gif", [RED, GREEN, BLUE], [50, 120, 200], loop=3)
        with Thumbnailer(path, "image/gif", LIMIT) as t:
            self.assertTrue(t.is_animated)
            self.assertEqual((t.width, t.height), (60, 40))
            for data, size in [
                (t.scale(30, 20, ANIMATED_THUMBNAIL_TYPE, True), (30, 20)),
                (t.crop(16, 16, ANIMATED_THUMBNAIL_TYPE, True), (16, 16)),
            ]:
                out = Image.open(io.BytesIO(data))
                self.assertEqual(out.format, "WEBP")
                self.assertTrue(is_animated(out))
                self.assertEqual(n_frames(out), 3)
                self.assertEqual(out.size, size)
                self.assertEqual(out.info["loop"], 3)
                for index, (colour, duration) in enumerate(
                    zip([RED, GREEN, BLUE], [50, 120, 200], strict=True)
                ):
                    out.seek(index)
                    out.load()
                    self.assertEqual(out.info["duration"], duration)
                    self.assertTrue(close_to(out.convert("RGB").getpixel((8, 8)), colour))
            static = decode(t.scale(30, 20, "image/png", False))
            self.assertEqual((static.format, static.size), ("PNG", (30, 20)))
            self.assertTrue(close_to(static.convert("RGB").getpixel((5, 5)), RED, 5))

    def test_default_duration_and_loop(self) -> None:
        frames = [Image.new("RGB", (20, 20), colour) for colour in (RED, GREEN)]
        path = self.save("nodelay.gif", frames[0], "GIF", save_all=True, append_images=frames[1:])
        with Thumbnailer(path, "image/gif", LIMIT) as t:
            out = Image.open(io.BytesIO(t.scale(10, 10, ANIMATED_THUMBNAIL_TYPE, True)))
        self.assertEqual(n_frames(out), 2)
        self.assertEqual(out.info["loop"], 0)
        out.load()
        self.assertEqual(out.info["duration"], 100)

    def test_animated_webp_and_png_sources(self) -> None:
        frames = [Image.new("RGBA", (40, 30), (*c, 255)) for c in (RED, GREEN, BLUE, RED)]
        sources = [
            (
                self.save(
                    f"a.{ext}", frames[0], fmt, save_all=True, append_images=frames[1:], duration=80
                ),
                f"image/{ext}",
            )
            for fmt, ext in [("WEBP", "webp"), ("PNG", "png")]
        ]
        for path, media_type in sources:
            with Thumbnailer(path, media_type, LIMIT) as t:
                self.assertTrue(t.is_animated)
                out = Image.open(io.BytesIO(t.scale(20, 15, ANIMATED_THUMBNAIL_TYPE, True)))
                self.assertEqual((out.format, n_frames(out), out.size), ("WEBP", 4, (20, 15)))
                out.seek(1)
                out.load()
                self.assertEqual(out.info["duration"], 80)
                self.assertTrue(close_to(out.convert("RGB").getpixel((10, 7)), GREEN))

    def test_static_source_asked_for_animation(self) -> None:
        path = self.save("still.png", pattern(64, 48), "PNG")
        with Thumbnailer(path, "image/png", LIMIT) as t:
            self.assertFalse(t.is_animated)
            as_png = decode(t.scale(32, 24, "image/png", True))
            self.assertEqual((as_png.format, as_png.size), ("PNG", (32, 24)))
            as_webp = Image.open(io.BytesIO(t.crop(16, 16, ANIMATED_THUMBNAIL_TYPE, True)))
            self.assertEqual((as_webp.format, as_webp.size), ("WEBP", (16, 16)))
            self.assertFalse(is_animated(as_webp))

    def test_frame_cap(self) -> None:
        colours = [(i * 37 % 256, i * 91 % 256, i * 53 % 256) for i in range(MAX_ANIMATED_FRAMES)]
        at_cap = self.animated_gif("cap.gif", colours, [20] * len(colours))
        over = self.animated_gif("over.gif", [*colours, GREEN], [20] * (len(colours) + 1))
        with Image.open(at_cap) as counted:
            self.assertEqual(n_frames(counted), MAX_ANIMATED_FRAMES)
        with Image.open(over) as counted:
            self.assertEqual(n_frames(counted), MAX_ANIMATED_FRAMES + 1)
        with Thumbnailer(at_cap, "image/gif", LIMIT) as t:
            out = Image.open(io.BytesIO(t.scale(10, 10, ANIMATED_THUMBNAIL_TYPE, True)))
            self.assertEqual(n_frames(out), MAX_ANIMATED_FRAMES)
        with Thumbnailer(over, "image/gif", LIMIT) as t:
            self.assertTrue(t.is_animated)
            # Over the cap: a still of the first frame, in the type asked for
            # (a single-frame WebP when the caller asks for the animated type).
            for _ in range(2):
                out = Image.open(io.BytesIO(t.scale(10, 10, ANIMATED_THUMBNAIL_TYPE, True)))
                self.assertEqual(out.format, "WEBP")
                self.assertFalse(is_animated(out))
                self.assertTrue(close_to(out.convert("RGB").getpixel((5, 5)), colours[0], 10))
                # Found once; later renders go straight to the still.
                self.assertTrue(t._too_many_frames)
            still = decode(t.crop(8, 8, "image/png", True))
            self.assertEqual((still.format, still.size), ("PNG", (8, 8)))

    def test_declared_frame_count_over_cap(self) -> None:
        # APNG and WebP declare their frame count: the cap applies before decoding.
        frames = [Image.new("RGB", (8, 8), (i % 256, 0, 0)) for i in range(MAX_ANIMATED_FRAMES + 1)]
        path = self.save("many.png", frames[0], "PNG", save_all=True, append_images=frames[1:])
        with Thumbnailer(path, "image/png", LIMIT) as t:
            self.assertTrue(t.is_animated)
            out = Image.open(io.BytesIO(t.scale(4, 4, ANIMATED_THUMBNAIL_TYPE, True)))
            self.assertEqual(out.format, "WEBP")
            self.assertFalse(is_animated(out))

    def test_cap_is_sane(self) -> None:
        self.assertTrue(10 <= thumbnailer_module.MAX_ANIMATED_FRAMES <= 1000)

    def test_corrupt_later_frame(self) -> None:
        path = self.animated_gif("broken.gif", [RED, GREEN, BLUE], [50, 50, 50])
        with open(path, "rb") as f:
            data = f.read()
        # Cut inside the last frame's image data.
        truncated = self.write("truncated.gif", data[: len(data) - 12])
        self.assertFails(truncated, "image/gif", animated=True)


class HostileInputTests(ThumbnailerTestCase):
    def _bomb(self, name: str, width: int, height: int) -> str:
        """A small valid PNG whose header claims ``width`` x ``height``."""
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), RED).save(buffer, "PNG")
        data = buffer.getvalue()
        # Signature (8), then IHDR: length (4), type (4), data (13), CRC (4).
        ihdr = bytearray(data[16:29])
        ihdr[0:8] = struct.pack(">II", width, height)
        patched = data[:16] + bytes(ihdr) + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
        return self.write(name, patched + data[33:])

    def test_decompression_bomb(self) -> None:
        huge = self._bomb("huge.png", 100000, 100000)
        # Beyond Pillow's own limit...
        self.assertRaises(Image.DecompressionBombError, Image.open, huge)
        # ...and within it (81M pixels) but over ours.
        large = self._bomb("large.png", 9000, 9000)
        with Image.open(large) as opened:
            self.assertEqual(opened.size, (9000, 9000))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.monotonic()
        for path in (huge, large):
            self.assertRaises(ImageTooLargeError, Thumbnailer, path, "image/png", LIMIT)
        # Pillow's refusal is our error type too, whatever our limit.
        self.assertRaises(ImageTooLargeError, Thumbnailer, huge, "image/png", 10**12)
        self.assertLess(time.monotonic() - started, 1)
        grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        self.assertLess(grown_kib, 50 * 1024)

    def test_header_lie_within_limit(self) -> None:
        # Allowed by the limit, so decoded: the missing pixels are an error.
        self.assertFails(self._bomb("lie.png", 2000, 2000), "image/png")

    def test_pixel_limit_from_header(self) -> None:
        path = self.save("hundred.png", pattern(100, 100), "PNG")
        self.assertRaises(ImageTooLargeError, Thumbnailer, path, "image/png", 5000)
        # The limit itself is too large; one more is fine.
        self.assertRaises(ImageTooLargeError, Thumbnailer, path, "image/png", 10000)
        with Thumbnailer(path, "image/png", 10001) as t:
            self.assertEqual(decode(t.scale(10, 10, "image/png", False)).size, (10, 10))

    def test_pixel_limit_jpeg_and_gif(self) -> None:
        jpeg = self.save("big.jpg", pattern(100, 100), "JPEG")
        gif = self.animated_gif("big.gif", [RED, GREEN], [10, 10])
        self.assertRaises(ImageTooLargeError, Thumbnailer, jpeg, "image/jpeg", 5000)
        self.assertRaises(ImageTooLargeError, Thumbnailer, gif, "image/gif", 60 * 40)

    def test_truncated_jpeg(self) -> None:
        with open(self.save("full.jpg", pattern(300, 200), "JPEG"), "rb") as f:
            data = f.read()
        path = self.write("half.jpg", data[: len(data) // 2])
        self.assertFails(path, "image/jpeg")

    def test_truncated_png(self) -> None:
        with open(self.save("full.png", pattern(300, 200), "PNG"), "rb") as f:
            data = f.read()
        for name, cut in [("half.png", len(data) // 2), ("header.png", 40)]:
            self.assertFails(self.write(name, data[:cut]), "image/png")

    def test_truncated_webp(self) -> None:
        with open(self.save("full.webp", pattern(300, 200), "WEBP"), "rb") as f:
            data = f.read()
        self.assertFails(self.write("half.webp", data[: len(data) // 2]), "image/webp")

    def test_corrupt_png_data(self) -> None:
        with open(self.save("full.png", pattern(300, 200), "PNG"), "rb") as f:
            data = bytearray(f.read())
        data[100:140] = b"\xff" * 40
        self.assertFails(self.write("corrupt.png", bytes(data)), "image/png")

    def test_mislabelled(self) -> None:
        jpeg = self.save("photo.jpg", pattern(40, 40), "JPEG")
        error = self.assertFails(jpeg, "image/png")
        self.assertIn("mislabelled", str(error))
        png = self.save("pic.png", pattern(40, 40), "PNG")
        self.assertIn("mislabelled", str(self.assertFails(png, "image/gif")))
        self.assertIn("mislabelled", str(self.assertFails(png, "image/webp")))

    def test_text_and_empty(self) -> None:
        text = self.write("notes.txt", b"hello, this is not an image\n" * 10)
        self.assertFails(text, "image/jpeg")
        self.assertFails(self.write("empty.png", b""), "image/png")
        self.assertFails(self.write("magic.png", b"\x89PNG\r\n\x1a\n"), "image/png")

    def test_formats_only_as_themselves(self) -> None:
        bmp = self.save("pic.bmp", pattern(40, 40), "BMP")
        tiff = self.save("pic.tiff", pattern(40, 40), "TIFF")
        for path in (bmp, tiff):
            self.assertFails(path, "image/png")
            self.assertFails(path, "image/jpeg")
        self.assertFails(bmp, "image/tiff")
        self.assertFails(tiff, "image/bmp")
        self.assertFails(self.save("ok.png", pattern(10, 10), "PNG"), "application/octet-stream")
        self.assertFails(self.save("pic.ico", pattern(16, 16), "ICO"), "image/x-icon")

    def test_missing_file(self) -> None:
        self.assertFails(self.path("nothing-here.png"), "image/png")

    def test_mangled_files(self) -> None:
        # Flipped bytes, cuts and insertions: a thumbnail or a ThumbnailError,
        # nothing else, and quickly.
        rng = random.Random(1234)
        frames = [pattern(60, 40), pattern(40, 60).resize((60, 40)), Image.new("RGB", (60, 40))]
        animated: dict[str, Any] = {"save_all": True, "append_images": frames[1:], "duration": 40}
        sources = [
            ("JPEG", "image/jpeg", {}),
            ("PNG", "image/png", animated),
            ("GIF", "image/gif", animated),
            ("WEBP", "image/webp", animated),
        ]
        for image_format, media_type, params in sources:
            buffer = io.BytesIO()
            frames[0].save(buffer, image_format, **params)
            original = buffer.getvalue()
            for attempt in range(60):
                data = bytearray(original)
                where = rng.randrange(len(data))
                if attempt % 3 == 0:
                    for _ in range(rng.randint(1, 8)):
                        data[rng.randrange(len(data))] = rng.randrange(256)
                elif attempt % 3 == 1:
                    del data[where:]
                else:
                    data[where:where] = rng.randbytes(rng.randint(1, 30))
                path = self.write(f"mangled-{image_format}-{attempt}", bytes(data))
                started = time.monotonic()
                try:
                    with Thumbnailer(path, media_type, LIMIT) as t:
                        t.scale(30, 20, ANIMATED_THUMBNAIL_TYPE, True)
                        t.crop(16, 16, "image/png", False)
                except ThumbnailError:
                    pass
                self.assertLess(time.monotonic() - started, 2)

    def test_zero_size_gif(self) -> None:
        # A GIF header claiming a 0x0 screen with no frames.
        data = b"GIF89a" + struct.pack("<HHBBB", 0, 0, 0, 0, 0) + b";"
        self.assertFails(self.write("zero.gif", data), "image/gif")


class DecodeTests(ThumbnailerTestCase):
    def test_large_jpeg_is_drafted(self) -> None:
        path = self.save("big.jpg", pattern(300, 200).resize((3000, 2000)), "JPEG")
        with Thumbnailer(path, "image/jpeg", LIMIT) as t:
            fitted = aspect(3000, 2000, 320, 240)
            out = decode(t.scale(*fitted, "image/jpeg", False))
            self.assertEqual(out.size, (320, 213))
            # Decoded at 1/8 scale, not 3000x2000.
            assert t._decoded is not None
            self.assertEqual(t._decoded.image.size, (375, 250))
            small = t._decoded
            # A smaller one reuses that decode.
            t.crop(32, 32, "image/jpeg", False)
            self.assertIs(t._decoded, small)
            # A larger one decodes again, at a larger scale.
            out = decode(t.scale(*aspect(3000, 2000, 800, 600), "image/jpeg", False))
            self.assertEqual(out.size, (800, 533))
            self.assertEqual(t._decoded.image.size, (1500, 1000))

    def test_prepare_decodes_once(self) -> None:
        path = self.save("big.jpg", pattern(300, 200).resize((3000, 2000)), "JPEG")
        with Thumbnailer(path, "image/jpeg", LIMIT) as t:
            t.prepare(800, 600)
            decoded = t._decoded
            assert decoded is not None
            # Cover of 800x600 on 3:2 is 900x600: drafted at 1/2.
            self.assertEqual(decoded.image.size, (1500, 1000))
            for width, height in [(32, 32), (96, 96)]:
                cropped = decode(t.crop(width, height, "image/jpeg", False))
                self.assertEqual(cropped.size, (width, height))
            for box in [(320, 240), (640, 480), (800, 600)]:
                fitted = aspect(3000, 2000, *box)
                self.assertEqual(decode(t.scale(*fitted, "image/jpeg", False)).size, fitted)
            self.assertIs(t._decoded, decoded)

    def test_pixels_to_decode_is_what_is_decoded(self) -> None:
        """What the pixel budget reserves matches the decode that follows."""
        jpeg = self.save("big.jpg", pattern(300, 200).resize((3000, 2000)), "JPEG")
        png = self.save("big.png", pattern(300, 200).resize((3000, 2000)), "PNG")
        for box in [(32, 32), (320, 240), (800, 600), (2000, 2000), (3000, 2000)]:
            with Thumbnailer(jpeg, "image/jpeg", LIMIT) as t:
                expected = t.pixels_to_decode(*box)
                t.prepare(*box)
                assert t._decoded is not None
                width, height = t._decoded.image.size
                self.assertEqual(expected, width * height, box)
            with Thumbnailer(png, "image/png", LIMIT) as t:
                # Other formats decode whole.
                self.assertEqual(t.pixels_to_decode(*box), 3000 * 2000)

    def test_drafted_rotated_jpeg(self) -> None:
        path = self.save(
            "rotbig.jpg", halves(2000, 1000, RED, BLUE), "JPEG", exif=exif_with_orientation(8)
        )
        with Thumbnailer(path, "image/jpeg", LIMIT) as t:
            self.assertEqual((t.width, t.height), (1000, 2000))
            out = decode(t.scale(100, 200, "image/jpeg", False))
            assert t._decoded is not None
            self.assertEqual(t._decoded.image.size, (250, 125))
        # Orientation 8 turns anticlockwise: the right (blue) half goes on top.
        self.assertEqual(out.size, (100, 200))
        self.assertTrue(close_to(out.getpixel((50, 20)), BLUE))
        self.assertTrue(close_to(out.getpixel((50, 180)), RED))

    def test_png_decoded_once(self) -> None:
        path = self.save("p.png", pattern(200, 100), "PNG")
        with Thumbnailer(path, "image/png", LIMIT) as t:
            t.scale(20, 10, "image/png", False)
            decoded = t._decoded
            t.crop(96, 96, "image/png", False)
            t.scale(200, 100, "image/png", False)
            self.assertIs(t._decoded, decoded)
        self.assertIsNone(t._decoded)

    def test_close_twice(self) -> None:
        path = self.save("p.png", pattern(20, 10), "PNG")
        t = Thumbnailer(path, "image/png", LIMIT)
        t.scale(10, 5, "image/png", False)
        t.close()
        t.close()
