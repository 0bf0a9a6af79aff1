"""The thumbnail size and selection rules, as arithmetic (no images)."""

from __future__ import annotations

from twisted.trial import unittest

from mediarepo.config import DEFAULT_THUMBNAIL_SIZES
from mediarepo.media.thumbnail_sizes import (
    SourceSize,
    ThumbnailRequest,
    on_demand_spec,
    pregeneration_specs,
    select_thumbnail,
    target_size,
)
from mediarepo.values import ThumbnailInfo

SOURCES = [(1, 1), (20, 15), (15, 20), (96, 96), (97, 30), (200, 50), (1000, 800), (1600, 1200)]
REQUESTS = [(1, 1), (10, 10), (32, 32), (96, 96), (200, 100), (320, 240), (1000, 1000), (5, 900)]


class TargetSizeTests(unittest.TestCase):
    def test_never_upscaled_never_smaller_than_possible(self) -> None:
        for source_w, source_h in SOURCES:
            for width, height in REQUESTS:
                for method in ("crop", "scale"):
                    case = (source_w, source_h, width, height, method)
                    w, h = target_size(source_w, source_h, width, height, method)
                    self.assertTrue(1 <= w <= source_w and 1 <= h <= source_h, case)
                    if source_w <= width and source_h <= height:
                        # The original is smaller than the request: its own size.
                        self.assertEqual((w, h), (source_w, source_h), case)
                    elif method == "crop":
                        # The requested aspect (to a pixel), as large as allowed.
                        self.assertLessEqual(abs(w * height - h * width), max(width, height), case)
                        self.assertTrue(w == min(width, source_w) or h == min(height, source_h))
                    else:
                        self.assertTrue(w >= width or h >= height, case)

    def test_issue_cases(self) -> None:
        self.assertEqual(target_size(20, 15, 96, 96, "crop"), (20, 15))
        self.assertEqual(target_size(4000, 3000, 200, 100, "crop"), (200, 100))
        self.assertEqual(target_size(1600, 1200, 1000, 1000, "scale"), (1000, 750))
        self.assertEqual(target_size(200, 50, 96, 96, "crop"), (50, 50))


class PregenerationTests(unittest.TestCase):
    def specs(self, w: int, h: int, animated: bool = False) -> list[tuple[int, int, str, str]]:
        made = pregeneration_specs(w, h, "image/png", DEFAULT_THUMBNAIL_SIZES, animated)
        return sorted((s.width, s.height, s.type, s.method) for s in made)

    def test_large_source_as_synapse(self) -> None:
        self.assertEqual(
            self.specs(1000, 800),
            [
                (32, 32, "image/png", "crop"),
                (96, 96, "image/png", "crop"),
                (300, 240, "image/png", "scale"),
                (600, 480, "image/png", "scale"),
                (750, 600, "image/png", "scale"),
            ],
        )

    def test_small_sources_cut_down(self) -> None:
        self.assertEqual(
            self.specs(20, 15), [(20, 15, "image/png", "crop"), (20, 15, "image/png", "scale")]
        )
        # One side short of 96: the square as large as the source holds.
        self.assertEqual(
            self.specs(200, 50),
            [(32, 32, "image/png", "crop"), (50, 50, "image/png", "crop"),
             (200, 50, "image/png", "scale")],
        )  # fmt: skip
        # A crop size equal to the source is a real crop: scale takes its key, as in Synapse.
        self.assertEqual(
            self.specs(96, 96), [(32, 32, "image/png", "crop"), (96, 96, "image/png", "scale")]
        )
        self.assertEqual(
            self.specs(20, 15, animated=True),
            [(20, 15, "image/png", "crop"), (20, 15, "image/png", "scale"),
             (20, 15, "image/webp", "crop"), (20, 15, "image/webp", "scale")],
        )  # fmt: skip


def row(w: int, h: int, method: str, type_: str = "image/jpeg", length: int = 100) -> ThumbnailInfo:
    return ThumbnailInfo(w, h, type_, method, length)


class SelectionTests(unittest.TestCase):
    ROWS = [
        row(32, 32, "crop"),
        row(96, 96, "crop"),
        row(320, 240, "scale"),
        row(640, 480, "scale"),
        row(800, 600, "scale"),
    ]

    def select(self, w: int, h: int, method: str, animated: bool = False) -> object:
        chosen = select_thumbnail(self.ROWS, w, h, method, animated, "image/jpeg")
        return None if chosen is None else (chosen.width, chosen.height)

    def test_smallest_covering(self) -> None:
        self.assertEqual(self.select(32, 32, "crop"), (32, 32))
        self.assertEqual(self.select(33, 33, "crop"), (96, 96))
        self.assertEqual(self.select(500, 400, "scale"), (640, 480))
        self.assertEqual(self.select(900, 500, "scale"), (800, 600))
        self.assertEqual(self.select(1, 1, "scale"), (320, 240))

    def test_none_covers(self) -> None:
        # Wrong aspect or too large: made on demand instead (Synapse: 32x32, 800x600).
        self.assertIsNone(self.select(200, 100, "crop"))
        self.assertIsNone(self.select(97, 97, "crop"))
        self.assertIsNone(self.select(1000, 1000, "scale"))

    def test_animated_rows_only_when_asked(self) -> None:
        rows = [row(96, 96, "crop", "image/webp", 10), row(96, 96, "crop", "image/png", 500)]
        for animated, expected in ((True, "image/webp"), (False, "image/png")):
            chosen = select_thumbnail(rows, 96, 96, "crop", animated, "image/png")
            self.assertEqual(chosen and chosen.type, expected)
        # A static source asked for animation: its static rows.
        chosen = select_thumbnail(rows[1:], 96, 96, "crop", True, "image/png")
        self.assertEqual(chosen and chosen.type, "image/png")

    def test_on_demand_spec(self) -> None:
        request = ThumbnailRequest(200, 100, "crop", animated=True, path="/")
        spec = on_demand_spec(SourceSize(400, 300, animated=True), "image/png", request)
        self.assertEqual((spec.width, spec.height, spec.type), (200, 100, "image/webp"))
        spec = on_demand_spec(SourceSize(400, 300, animated=False), "image/png", request)
        self.assertEqual((spec.width, spec.height, spec.type), (200, 100, "image/png"))
