"""Queries on Synapse's ``worker_locks`` table: named locks shared by every
process on the database, Synapse's workers included."""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs

from mediarepo.storage.database import Database, Transaction

logger = logging.getLogger(__name__)

# A lock not renewed for this long is free for anyone to take (Synapse's figure).
LOCK_TIMEOUT_MS = 2 * 60 * 1000


@attrs.frozen
class LockToken:
    """A lock as its holder knows it: whoever holds ``token`` holds it."""

    name: str
    key: str
    token: str


@attrs.frozen
class LockClaim:
    """An attempt to take a lock."""

    lock: LockToken
    instance_name: str  # the process taking it
    now_ms: int
    # Whether the process of an instance name is known to have exited, so
    # that what it holds may be taken at once (blocking; run on a pool thread).
    holder_is_dead: Callable[[str], bool]


class LockRows:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def renew(self, lock: LockToken, now_ms: int) -> None:
        await self._db.run_update(
            "renew_lock",
            "UPDATE worker_locks SET last_renewed_ts = ?"
            " WHERE lock_name = ? AND lock_key = ? AND token = ?",
            (now_ms, lock.name, lock.key, lock.token),
        )

    async def release(self, lock: LockToken) -> None:
        await self._db.run_update(
            "drop_lock",
            "DELETE FROM worker_locks WHERE lock_name = ? AND lock_key = ? AND token = ?",
            (lock.name, lock.key, lock.token),
        )


def commit_unflushed_txn(t: Transaction) -> None:
    """Let the transaction's commit not wait for PostgreSQL's write-ahead log
    to reach the disk. Only for a transaction that takes a lock and reads:
    a lock matters only to running processes, and one lost with a crash of
    the database itself is free anyway."""
    if t.engine.name == "psycopg2":
        t.execute("SET LOCAL synchronous_commit TO OFF")


def take_lock_txn(t: Transaction, claim: LockClaim) -> bool:
    """Take the lock unless another instance holds it and renewed it lately,
    or (a crash) its holder is known to have exited; the caller's
    transaction makes it its own only if it commits."""
    lock = claim.lock
    if _try_acquire_lock_txn(t, claim):
        return True
    holder = _lock_holder_txn(t, lock)
    if holder is None or not claim.holder_is_dead(holder[0]):
        return False
    dead, dead_token = holder
    if not _take_lock_over_txn(t, claim, dead_token):
        return False
    logger.info("took lock %s/%s over from %s, which has exited", lock.name, lock.key, dead)
    return True


def release_lock_txn(t: Transaction, lock: LockToken) -> None:
    t.execute(
        "DELETE FROM worker_locks WHERE lock_name = ? AND lock_key = ? AND token = ?",
        (lock.name, lock.key, lock.token),
    )


def _try_acquire_lock_txn(t: Transaction, claim: LockClaim) -> bool:
    lock = claim.lock
    t.execute(
        "INSERT INTO worker_locks (lock_name, lock_key, instance_name, token,"
        " last_renewed_ts) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (lock_name, lock_key) DO UPDATE SET token = EXCLUDED.token,"
        " instance_name = EXCLUDED.instance_name,"
        " last_renewed_ts = EXCLUDED.last_renewed_ts"
        " WHERE worker_locks.last_renewed_ts < ?"
        " OR worker_locks.instance_name = EXCLUDED.instance_name",
        (lock.name, lock.key, claim.instance_name, lock.token, claim.now_ms,
         claim.now_ms - LOCK_TIMEOUT_MS),
    )  # fmt: skip
    return t.rowcount == 1


def _lock_holder_txn(t: Transaction, lock: LockToken) -> tuple[str, str] | None:
    """The instance name and token of whoever holds the lock, if anyone."""
    t.execute(
        "SELECT instance_name, token FROM worker_locks WHERE lock_name = ? AND lock_key = ?",
        (lock.name, lock.key),
    )
    row = t.fetchone()
    return (row[0], row[1]) if row is not None else None


def _take_lock_over_txn(t: Transaction, claim: LockClaim, old_token: str) -> bool:
    """Take the lock from the holder of ``old_token`` (a process known to be
    dead); ``False`` if someone else took or released it meanwhile."""
    lock = claim.lock
    t.execute(
        "UPDATE worker_locks SET instance_name = ?, token = ?, last_renewed_ts = ?"
        " WHERE lock_name = ? AND lock_key = ? AND token = ?",
        (claim.instance_name, lock.token, claim.now_ms, lock.name, lock.key, old_token),
    )
    return t.rowcount == 1
