"""Queries on Synapse's ``worker_locks`` table: named locks shared by every
process on the database, Synapse's workers included."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from mediarepo.storage.database import Database, Transaction

R = TypeVar("R")

# A lock not renewed for this long is free for anyone to take (Synapse's figure).
LOCK_TIMEOUT_MS = 2 * 60 * 1000


class LockStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def run_statements(self, desc: str, func: Callable[[Transaction], R]) -> R:
        """Run ``func`` in one trip to the pool (see :meth:`Database.run_statements`),
        its commits not waiting for the disk: a lock matters only to running
        processes, and one lost with a crash of the database is free anyway."""
        return await self._db.run_statements(desc, func, durable=False)

    async def renew(self, name: str, key: str, token: str, now_ms: int) -> None:
        await self._db.run_query(
            "renew_lock",
            "UPDATE worker_locks SET last_renewed_ts = ?"
            " WHERE lock_name = ? AND lock_key = ? AND token = ?",
            (now_ms, name, key, token),
        )

    async def release(self, name: str, key: str, token: str) -> None:
        await self.run_statements("drop_lock", lambda t: release_lock_txn(t, name, key, token))


def try_acquire_lock_txn(
    t: Transaction, name: str, key: str, instance_name: str, token: str, now_ms: int
) -> bool:
    """Take the lock unless another instance holds it and renewed it lately."""
    t.execute(
        "INSERT INTO worker_locks (lock_name, lock_key, instance_name, token,"
        " last_renewed_ts) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (lock_name, lock_key) DO UPDATE SET token = EXCLUDED.token,"
        " instance_name = EXCLUDED.instance_name,"
        " last_renewed_ts = EXCLUDED.last_renewed_ts"
        " WHERE worker_locks.last_renewed_ts < ?"
        " OR worker_locks.instance_name = EXCLUDED.instance_name",
        (name, key, instance_name, token, now_ms, now_ms - LOCK_TIMEOUT_MS),
    )
    return t.rowcount == 1


def release_lock_txn(t: Transaction, name: str, key: str, token: str) -> None:
    t.execute(
        "DELETE FROM worker_locks WHERE lock_name = ? AND lock_key = ? AND token = ?",
        (name, key, token),
    )


def lock_holder_txn(t: Transaction, name: str, key: str) -> tuple[str, str] | None:
    """The instance name and token of whoever holds the lock, if anyone."""
    t.execute(
        "SELECT instance_name, token FROM worker_locks WHERE lock_name = ? AND lock_key = ?",
        (name, key),
    )
    row = t.fetchone()
    return (row[0], row[1]) if row is not None else None


def take_lock_over_txn(
    t: Transaction, name: str, key: str, old_token: str, instance_name: str, token: str,
    now_ms: int,
) -> bool:  # fmt: skip
    """Take the lock from the holder of ``old_token`` (a process known to be
    dead); ``False`` if someone else took or released it meanwhile."""
    t.execute(
        "UPDATE worker_locks SET instance_name = ?, token = ?, last_renewed_ts = ?"
        " WHERE lock_name = ? AND lock_key = ? AND token = ?",
        (instance_name, token, now_ms, name, key, old_token),
    )
    return t.rowcount == 1
