"""PixelBudget: thumbnail work waits until the pixels it decodes fit, in turn."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from mediarepo.media.pixel_budget import PixelBudget
from tests import images
from tests.utils import SERVER_NAME, ServerTestCase

THUMBNAIL = f"/_matrix/client/v1/media/thumbnail/{SERVER_NAME}"


class PixelBudgetTests(unittest.TestCase):
    def setUp(self) -> None:
        self.budget = PixelBudget(100)

    def acquire(self, pixels: int) -> defer.Deferred[None]:
        return defer.ensureDeferred(self.budget.acquire(pixels))

    def test_work_that_fits_starts_at_once(self) -> None:
        first, second = self.acquire(60), self.acquire(40)
        self.assertTrue(first.called and second.called)
        self.assertEqual((self.budget.reserved, self.budget.holders), (100, 2))

    def test_waits_until_its_pixels_fit_first_come_first_served(self) -> None:
        running = self.acquire(70)
        large = self.acquire(50)  # 120 > 100: waits
        small = self.acquire(10)  # would fit, but the large one came first
        self.assertTrue(running.called)
        self.assertFalse(large.called or small.called)
        self.assertEqual(self.budget.waiting, 2)
        self.budget.release(70)
        # Both fit now (60), served in order.
        self.assertTrue(large.called and small.called)
        self.assertEqual((self.budget.reserved, self.budget.waiting), (60, 0))

    def test_release_serves_only_what_fits(self) -> None:
        held = [self.acquire(50), self.acquire(50)]
        waiting = [self.acquire(40), self.acquire(40), self.acquire(40)]
        self.assertTrue(all(d.called for d in held))
        self.budget.release(50)
        self.assertEqual([d.called for d in waiting], [True, False, False])
        self.budget.release(50)
        self.assertEqual([d.called for d in waiting], [True, True, False])
        self.assertEqual(self.budget.reserved, 80)

    def test_larger_than_the_budget_runs_alone(self) -> None:
        small = self.acquire(30)
        huge = self.acquire(250)
        after = self.acquire(10)
        self.assertTrue(small.called)
        self.assertFalse(huge.called or after.called)
        self.budget.release(30)
        # Nothing else decoding: the huge one runs, alone.
        self.assertTrue(huge.called)
        self.assertFalse(after.called)
        self.assertEqual((self.budget.reserved, self.budget.holders), (250, 1))
        self.budget.release(250)
        self.assertTrue(after.called)
        # With nothing waiting and nothing held, a huge one starts at once.
        self.budget.release(10)
        self.assertTrue(self.acquire(1000).called)

    def test_cancelled_wait_leaves_the_queue(self) -> None:
        self.acquire(90)
        cancelled = self.acquire(50)
        behind = self.acquire(10)
        cancelled.cancel()
        self.failureResultOf(cancelled, defer.CancelledError)
        # The one behind it no longer waits for it.
        self.assertTrue(behind.called)
        self.assertEqual((self.budget.reserved, self.budget.waiting), (100, 0))

    def test_reserved_for_releases_on_error(self) -> None:
        async def failing() -> None:
            async with self.budget.reserved_for(80):
                self.assertEqual(self.budget.reserved, 80)
                raise ValueError("render failed")

        self.failureResultOf(defer.ensureDeferred(failing()), ValueError)
        self.assertEqual((self.budget.reserved, self.budget.holders), (0, 0))


class ThumbnailBudgetTests(ServerTestCase):
    # Each image below is 120x100 = 12,000 pixels: two fit at once, not
    # three, though four threads could take them.
    extra_config = {"thumbnail_pixel_budget": 25_000, "thumbnail_threadpool_size": 4}

    async def test_pregeneration_keeps_within_the_budget(self) -> None:
        budget = self.server.repository.thumbnails.pixel_budget
        self.assertEqual(budget.limit, 25_000)
        seen: list[tuple[int, int]] = []
        take = budget._take

        def noting_take(pixels: int) -> None:
            take(pixels)
            seen.append((budget.reserved, budget.holders))

        self.patch(budget, "_take", noting_take)
        token = await self.register()
        uploads = [
            defer.ensureDeferred(self.upload(token, images.png_with_alpha(120, 100), "image/png"))
            for _ in range(6)
        ]
        media_ids = await defer.gatherResults(uploads)
        for media_id in media_ids:
            r = await self.request(
                "GET", f"{THUMBNAIL}/{media_id}?width=32&height=32&method=crop", token=token
            )
            self.assertEqual(r.code, 200)
        self.assertEqual(len(seen), 6)
        self.assertLessEqual(max(reserved for reserved, _ in seen), 25_000)
        self.assertEqual((budget.reserved, budget.holders, budget.waiting), (0, 0, 0))


class ThumbnailBudgetPostgresTests(ThumbnailBudgetTests):
    engine = "psycopg2"
