"""Locks shared with every process on the database, Synapse's included.

A lock is a ``worker_locks`` row holding a random token; its holder renews it
while working and deletes it when done. A holder that dies stops renewing,
and the lock frees itself after ``LOCK_TIMEOUT_MS``. Within this process a
key being taken or held is refused at once, without asking the database.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Callable
from typing import TypeVar

from twisted.internet import task
from twisted.internet.interfaces import IReactorTime

from mediarepo.media.paths import random_letters
from mediarepo.storage.database import Transaction
from mediarepo.storage.locks import LockStore, release_lock_txn, try_acquire_lock_txn

R = TypeVar("R")

logger = logging.getLogger(__name__)

RENEW_INTERVAL_SECONDS = 30.0


def instance_name(worker_name: str = "mediarepo") -> str:
    """This process's name in ``worker_locks``: the worker's name for
    whoever reads the table, then what makes it new at every start (as
    Synapse's instance IDs are), so a restarted process does not take over
    the locks of the one it replaces before they time out."""
    return f"{worker_name}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class HeldLock:
    def __init__(self, locks: WorkerLocks, name: str, key: str, token: str) -> None:
        self._locks = locks
        self.name = name
        self.key = key
        self.token = token
        self._renewal = task.LoopingCall(self._renew)
        self._renewal.clock = locks.clock
        self._renewal.start(RENEW_INTERVAL_SECONDS, now=False)

    async def _renew(self) -> None:
        try:
            await self._locks.store.renew(self.name, self.key, self.token, self._locks.now_ms())
        except Exception:
            logger.exception("renewing lock %s/%s failed", self.name, self.key)

    async def release(self) -> None:
        self.forget()
        await self._locks.store.release(self.name, self.key, self.token)

    def release_txn(self, t: Transaction) -> None:
        """Release the lock with a statement of a trip already under way
        (blocking); call :meth:`forget` once that trip is over."""
        release_lock_txn(t, self.name, self.key, self.token)

    def forget(self) -> None:
        """Stop renewing the lock and let this process take it again."""
        if self._renewal.running:
            self._renewal.stop()
        self._locks.held.discard((self.name, self.key))


class WorkerLocks:
    def __init__(
        self, store: LockStore, clock: IReactorTime, worker_name: str = "mediarepo"
    ) -> None:
        self.store = store
        self.clock = clock
        self.instance_name = instance_name(worker_name)
        self.held: set[tuple[str, str]] = set()

    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    async def try_lock(self, name: str, key: str) -> HeldLock | None:
        """The lock ``(name, key)`` if nobody (here or elsewhere) holds it."""
        lock, _ = await self.try_lock_then(name, key, lambda t: None)
        return lock

    async def try_lock_then(
        self, name: str, key: str, then: Callable[[Transaction], R]
    ) -> tuple[HeldLock | None, R | None]:
        """The lock ``(name, key)`` if nobody (here or elsewhere) holds it,
        and what ``then`` (blocking statements: reading what the lock
        guards) returned once it was taken, in the same trip to the pool."""
        if (name, key) in self.held:
            return None, None
        self.held.add((name, key))
        token = random_letters(16)
        now_ms = self.now_ms()

        def take(t: Transaction) -> tuple[bool, R | None]:
            if not try_acquire_lock_txn(t, name, key, self.instance_name, token, now_ms):
                return False, None
            try:
                return True, then(t)
            except BaseException:
                release_lock_txn(t, name, key, token)
                raise

        try:
            acquired, result = await self.store.run_statements("try_acquire_lock", take)
        except BaseException:
            self.held.discard((name, key))
            raise
        if not acquired:
            self.held.discard((name, key))
            return None, None
        return HeldLock(self, name, key, token), result
