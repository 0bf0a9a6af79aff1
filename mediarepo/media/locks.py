"""Locks shared with every process on the database, Synapse's included.

A lock is a ``worker_locks`` row holding a random token; its holder renews it
while working and deletes it when done. A holder that dies stops renewing,
and the lock frees itself after ``LOCK_TIMEOUT_MS``, or at once if the
holder was a process of this machine known to have exited (see
:func:`instance_is_dead`). Within this process a key being taken or held is
refused at once, without asking the database.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

from twisted.internet import task
from twisted.internet.interfaces import IReactorTime

from mediarepo.media.paths import random_letters
from mediarepo.storage.lock_rows import LockClaim, LockRows, LockToken

R = TypeVar("R")

logger = logging.getLogger(__name__)

RENEW_INTERVAL_SECONDS = 30.0


def _process_scope() -> str | None:
    """The host and PID namespace this process runs in: a process can tell
    whether another is alive only when both share them (not across hosts,
    nor across containers). ``None`` where that cannot be known (no /proc)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return None
    digits = "".join(c for c in namespace if c.isdigit())
    return f"{socket.gethostname()}-{digits}" if digits else None


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot), or ``None`` if
    there is no such process or it has exited (a zombie not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name, in parentheses, may hold anything; fields follow it.
    fields = stat[stat.rfind(b")") + 2 :].split()
    if len(fields) < 20 or fields[0] == b"Z":
        return None
    return fields[19].decode()


def instance_name(worker_name: str = "mediarepo", pid: int | None = None) -> str:
    """This process's name in ``worker_locks`` (and in other work it claims):
    the worker's name for whoever reads the table, then what makes it new at
    every start (as Synapse's instance IDs are) and never one of Synapse's.
    That part names the host, the PID namespace, the PID and the process's
    start time, so that another process on the same machine can tell it has
    exited (:func:`instance_is_dead`), PID reuse included."""
    if pid is None:
        pid = os.getpid()
    scope = _process_scope()
    start = _process_start(pid) if scope is not None else None
    if scope is None or start is None:
        return f"{worker_name}@{socket.gethostname()}-{pid}-{secrets.token_hex(3)}"
    return f"{worker_name}@{scope}-{pid}.{start}-{secrets.token_hex(3)}"


def instance_is_dead(name: str) -> bool:
    """Whether ``name`` belonged to a process of this host and PID namespace
    that has exited, so what it held may be taken at once instead of after
    a timeout. ``False`` whenever that cannot be told for sure: a process of
    another host or container, a Synapse worker, an older name."""
    scope = _process_scope()
    if scope is None:
        return False
    _, _, process = name.rpartition("@")
    prefix = f"{scope}-"
    if not process.startswith(prefix):
        return False
    pid_text, _, rest = process[len(prefix) :].partition(".")
    start, _, _ = rest.partition("-")
    if not pid_text.isdigit() or not start.isdigit():
        return False
    return _process_start(int(pid_text)) != start


class HeldLock:
    def __init__(self, locks: WorkerLocks, token: LockToken) -> None:
        self._locks = locks
        self.token = token
        self._renewal = task.LoopingCall(self._renew)
        self._renewal.clock = locks.clock
        self._renewal.start(RENEW_INTERVAL_SECONDS, now=False)

    async def _renew(self) -> None:
        try:
            await self._locks.store.renew(self.token, self._locks.now_ms())
        except Exception:
            logger.exception("renewing lock %s/%s failed", self.token.name, self.token.key)

    async def release(self) -> None:
        self.forget()
        await self._locks.store.release(self.token)

    def forget(self) -> None:
        """Stop renewing the lock and let this process take it again (once
        it was released by a transaction of the storage layer)."""
        if self._renewal.running:
            self._renewal.stop()
        self._locks.held.discard((self.token.name, self.token.key))


class WorkerLocks:
    def __init__(
        self, store: LockRows, clock: IReactorTime, worker_name: str = "mediarepo"
    ) -> None:
        self.store = store
        self.clock = clock
        self.instance_name = instance_name(worker_name)
        self.held: set[tuple[str, str]] = set()

    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    async def try_lock_then(
        self, name: str, key: str, take: Callable[[LockClaim], Awaitable[tuple[bool, R]]]
    ) -> tuple[HeldLock | None, R | None]:
        """The lock ``(name, key)`` if nobody (here or elsewhere) holds it,
        with what ``take`` read: a storage method that takes the lock and
        reads what it guards in one transaction, returning whether it took
        it."""
        if (name, key) in self.held:
            return None, None
        self.held.add((name, key))
        claim = LockClaim(
            LockToken(name, key, random_letters(16)),
            self.instance_name,
            self.now_ms(),
            # A holder that died (a crash) need not time out.
            instance_is_dead,
        )
        try:
            acquired, result = await take(claim)
        except BaseException:
            self.held.discard((name, key))
            raise
        if not acquired:
            self.held.discard((name, key))
            return None, None
        return HeldLock(self, claim.lock), result
