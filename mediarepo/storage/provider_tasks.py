"""The queue of work owed to storage providers (``mediarepo_provider_tasks``)."""

from __future__ import annotations

import enum

import attrs

from mediarepo.storage.database import Database


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


class ProviderTaskStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def add(self, task: ProviderTask, due_ms: int) -> None:
        """Queue ``task`` (the same task already queued stays as it is)."""
        await self._db.run_query(
            "add_provider_task",
            "INSERT INTO mediarepo_provider_tasks (provider, relative_path, operation, attempts,"
            " next_attempt_ts) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (provider, relative_path, operation) DO NOTHING",
            (task.provider, task.relative_path, task.operation.value, task.attempts, due_ms),
        )

    async def due(self, now_ms: int, limit: int) -> list[ProviderTask]:
        rows = await self._db.run_query(
            "get_due_provider_tasks",
            "SELECT provider, relative_path, operation, attempts FROM mediarepo_provider_tasks"
            " WHERE next_attempt_ts <= ? ORDER BY next_attempt_ts LIMIT ?",
            (now_ms, limit),
        )
        return [ProviderTask(r[0], r[1], ProviderOperation(r[2]), int(r[3])) for r in rows]

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

    async def count(self) -> int:
        rows = await self._db.run_query(
            "count_provider_tasks", "SELECT COUNT(*) FROM mediarepo_provider_tasks"
        )
        return int(rows[0][0])
