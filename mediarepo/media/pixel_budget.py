"""How many source pixels the thumbnail thread pool may hold decoded at once.

A decoded image costs 4 bytes a pixel, 8 while an image with transparency
is turned into the premultiplied copy that resizing needs (see
``mediarepo.media.thumbnailer``). Threads alone do not bound that: two
threads decoding 31-megapixel PNGs hold half a gigabyte. Each piece of
thumbnail work therefore reserves the pixels it will decode before it goes
to the pool, and waits (on the reactor, holding no thread) until they fit
under the budget. Waiting is first come, first served, so a large image is
never overtaken for ever by small ones; an image larger than the whole
budget runs once nothing else is decoding, alone.

Memory: the pool's decoded pixels stay under ``thumbnail_pixel_budget``
(or one image's, when that is larger), so the server's peak is about its
idle size plus 8 bytes a budget pixel.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import Gauge
from twisted.internet import defer

pixels_decoding = Gauge(
    "mediarepo_thumbnail_pixels_reserved", "Source pixels reserved by thumbnail work under way"
)
work_waiting = Gauge(
    "mediarepo_thumbnail_work_waiting", "Thumbnail work waiting for the pixel budget"
)


class PixelBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        # Pixels reserved by work under way, and how many pieces of work.
        self.reserved = 0
        self.holders = 0
        self._waiting: collections.deque[tuple[int, defer.Deferred[None]]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _fits(self, pixels: int) -> bool:
        return self.holders == 0 or self.reserved + pixels <= self.limit

    def _take(self, pixels: int) -> None:
        self.reserved += pixels
        self.holders += 1
        pixels_decoding.set(self.reserved)

    async def acquire(self, pixels: int) -> None:
        """Reserve ``pixels``, once they fit (and everyone who came first has
        been served); pair with :meth:`release`."""
        if not self._waiting and self._fits(pixels):
            self._take(pixels)
            return
        ready: defer.Deferred[None] = defer.Deferred()
        self._waiting.append((pixels, ready))
        work_waiting.set(len(self._waiting))
        try:
            await ready
        except defer.CancelledError:
            # Cancelled while waiting (a granted reservation has fired
            # ``ready``): those behind it may fit now.
            self._waiting.remove((pixels, ready))
            self._serve_waiting()
            raise

    def release(self, pixels: int) -> None:
        self.reserved -= pixels
        self.holders -= 1
        self._serve_waiting()

    def _serve_waiting(self) -> None:
        while self._waiting and self._fits(self._waiting[0][0]):
            waiting_pixels, ready = self._waiting.popleft()
            self._take(waiting_pixels)
            ready.callback(None)
        pixels_decoding.set(self.reserved)
        work_waiting.set(len(self._waiting))

    @asynccontextmanager
    async def reserved_for(self, pixels: int) -> AsyncIterator[None]:
        """``pixels`` reserved for the duration of the block."""
        await self.acquire(pixels)
        try:
            yield
        finally:
            self.release(pixels)
