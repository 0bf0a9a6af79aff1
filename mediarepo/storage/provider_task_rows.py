"""The queue of work owed to storage providers (``mediarepo_provider_tasks``)."""

from __future__ import annotations

import enum
from collections.abc import Sequence

import attrs

from mediarepo.storage.database import Database, Transaction


class ProviderOperation(enum.Enum):
    STORE = "store"
    DELETE = "delete"
    DELETE_DIRECTORY = "delete_directory"


@attrs.frozen
class ProviderTask:
    provider: str
    relative_path: str
    operation: ProviderOperation
    attempts: int
    # When it was due, as read (what a claim compares against).
    due_ts: int = 0


# A path's queued copy, void once the path is to be deleted (parameters:
# _cancel_store_args), or every copy under a directory to be deleted
# (_cancel_stores_under_args).
_CANCEL_STORE = (
    "DELETE FROM mediarepo_provider_tasks WHERE provider = ? AND relative_path = ?"
    " AND operation = ?"
)
_CANCEL_STORES_UNDER = (
    "DELETE FROM mediarepo_provider_tasks WHERE provider = ?"
    " AND SUBSTR(relative_path, 1, ?) = ? AND operation = ?"
)
_INSERT = (
    "INSERT INTO mediarepo_provider_tasks (provider, relative_path, operation,"
    " attempts, next_attempt_ts) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (provider, relative_path, operation) DO NOTHING"
)


def _cancel_store_args(provider: str, relative_path: str) -> tuple[object, ...]:
    return (provider, relative_path, ProviderOperation.STORE.value)


def _cancel_stores_under_args(provider: str, directory: str) -> tuple[object, ...]:
    prefix = directory.rstrip("/") + "/"
    return (provider, len(prefix), prefix, ProviderOperation.STORE.value)


class ProviderTaskRows:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def add(self, task: ProviderTask, due_ms: int) -> None:
        """Queue ``task`` (the same task already queued stays as it is).

        A task undoes its opposite still waiting: a store cancels a pending
        deletion of the path, a deletion the pending stores it covers, so an
        old deletion can never remove a newer copy.
        """

        def txn(t: Transaction) -> None:
            if task.operation is ProviderOperation.STORE:
                self._cancel_deletes_txn(t, task.provider, task.relative_path)
            elif task.operation is ProviderOperation.DELETE:
                t.execute(_CANCEL_STORE, _cancel_store_args(task.provider, task.relative_path))
            else:
                t.execute(
                    _CANCEL_STORES_UNDER,
                    _cancel_stores_under_args(task.provider, task.relative_path),
                )
            t.execute(
                _INSERT,
                (task.provider, task.relative_path, task.operation.value, task.attempts, due_ms),
            )

        await self._db.run_interaction("add_provider_task", txn)

    async def add_deletions(
        self, provider: str, files: Sequence[str], directories: Sequence[str], due_ms: int
    ) -> None:
        """Queue the deletion of ``files`` and ``directories`` at
        ``provider``, each as :meth:`add` queues it, in one transaction: a
        purge's batch of 500 media took 1,000 transactions one after the
        other. (Deletions only: they cancel stores, never each other, so the
        cancellations can all go first.)"""
        delete, delete_directory = ProviderOperation.DELETE, ProviderOperation.DELETE_DIRECTORY

        def txn(t: Transaction) -> None:
            t.execute_batch(_CANCEL_STORE, [_cancel_store_args(provider, f) for f in files])
            t.execute_batch(
                _CANCEL_STORES_UNDER, [_cancel_stores_under_args(provider, d) for d in directories]
            )
            t.execute_batch(
                _INSERT,
                [(provider, f, delete.value, 0, due_ms) for f in files]
                + [(provider, d, delete_directory.value, 0, due_ms) for d in directories],
            )

        await self._db.run_interaction("add_provider_deletions", txn)

    async def cancel_deletes(self, provider: str, relative_path: str) -> None:
        """Forget pending deletions of a path the provider has just stored."""
        await self._db.run_interaction(
            "cancel_provider_deletes",
            lambda t: self._cancel_deletes_txn(t, provider, relative_path),
        )

    @staticmethod
    def _cancel_deletes_txn(t: Transaction, provider: str, relative_path: str) -> None:
        t.execute(
            "DELETE FROM mediarepo_provider_tasks WHERE provider = ? AND relative_path = ?"
            " AND operation = ?",
            (provider, relative_path, ProviderOperation.DELETE.value),
        )

    async def claim(self, task: ProviderTask, lease_until_ms: int) -> bool:
        """Take ``task`` for this process until ``lease_until_ms``; ``False``
        if another process (or run) took it first."""
        changed = await self._db.run_update(
            "claim_provider_task",
            "UPDATE mediarepo_provider_tasks SET next_attempt_ts = ? WHERE provider = ?"
            " AND relative_path = ? AND operation = ? AND next_attempt_ts = ?",
            (lease_until_ms, task.provider, task.relative_path, task.operation.value,
             task.due_ts),
        )  # fmt: skip
        return changed == 1

    async def due(self, now_ms: int, limit: int) -> list[ProviderTask]:
        rows = await self._db.run_query(
            "get_due_provider_tasks",
            "SELECT provider, relative_path, operation, attempts, next_attempt_ts"
            " FROM mediarepo_provider_tasks"
            " WHERE next_attempt_ts <= ? ORDER BY next_attempt_ts LIMIT ?",
            (now_ms, limit),
        )
        return [
            ProviderTask(r[0], r[1], ProviderOperation(r[2]), int(r[3]), int(r[4])) for r in rows
        ]

    async def postpone(self, task: ProviderTask, next_attempt_ms: int, error: str) -> None:
        await self._db.run_query(
            "postpone_provider_task",
            "UPDATE mediarepo_provider_tasks SET attempts = ?, next_attempt_ts = ?,"
            " last_error = ? WHERE provider = ? AND relative_path = ? AND operation = ?",
            (task.attempts + 1, next_attempt_ms, error[:500], task.provider, task.relative_path,
             task.operation.value),
        )  # fmt: skip

    async def remove(self, task: ProviderTask) -> None:
        await self._db.run_query(
            "remove_provider_task",
            "DELETE FROM mediarepo_provider_tasks"
            " WHERE provider = ? AND relative_path = ? AND operation = ?",
            (task.provider, task.relative_path, task.operation.value),
        )

    async def is_queued(self, provider: str, relative_path: str, op: ProviderOperation) -> bool:
        rows = await self._db.run_query(
            "is_provider_task_queued",
            "SELECT 1 FROM mediarepo_provider_tasks"
            " WHERE provider = ? AND relative_path = ? AND operation = ?",
            (provider, relative_path, op.value),
        )
        return bool(rows)

    async def count(self) -> int:
        rows = await self._db.run_query(
            "count_provider_tasks", "SELECT COUNT(*) FROM mediarepo_provider_tasks"
        )
        return int(rows[0][0])
