"""A small in-memory cache whose entries live a few seconds.

The hot paths (a download, a cached thumbnail) read rows that almost never
change; a short life keeps them from costing a query per request while a
change made elsewhere (by Synapse, an admin, another worker) shows within
seconds.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

from twisted.internet.interfaces import IReactorTime

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ExpiringCache(Generic[K, V]):
    def __init__(self, clock: IReactorTime, seconds: float, max_entries: int = 50_000) -> None:
        self._clock = clock
        self._seconds = seconds
        self._max_entries = max_entries
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock.seconds() - entry[0] >= self._seconds:
            del self._entries[key]
            return None
        return entry[1]

    def put(self, key: K, value: V) -> None:
        self._entries[key] = (self._clock.seconds(), value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def forget(self, key: K) -> None:
        self._entries.pop(key, None)
