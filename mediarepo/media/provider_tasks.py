"""Work owed to storage providers, done in the background until it succeeds.

An asynchronous provider (``store_synchronous: false``) gets its copy after
the upload has been answered; a provider that fails to delete a file is
asked again. The work is queued in the database first, so neither a failing
provider nor a restart loses it: each task is retried with a growing delay
until the provider accepts it, and every failure is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from prometheus_client import Counter, Gauge
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from mediarepo.media.providers import StorageProvider
from mediarepo.media.providers.local import LocalFiles
from mediarepo.storage.provider_task_rows import ProviderOperation, ProviderTask, ProviderTaskRows

logger = logging.getLogger(__name__)

provider_task_results = Counter(
    "mediarepo_provider_tasks_total", "Storage provider tasks run", ["operation", "result"]
)
provider_tasks_queued = Gauge(
    "mediarepo_provider_tasks_queued", "Storage provider tasks waiting (as last counted)"
)

# The first retry comes after this many seconds, each later one after twice
# the previous delay, up to the maximum.
RETRY_BASE_SECONDS = 5.0
RETRY_MAX_SECONDS = 600.0
# How long a process may hold a task before another may take it (a large
# upload to a slow store must fit).
CLAIM_SECONDS = 900.0
_BATCH = 100


class ProviderTasks:
    def __init__(
        self,
        providers: Mapping[str, StorageProvider],
        local: LocalFiles,
        store: ProviderTaskRows,
        clock: IReactorTime,
    ) -> None:
        self._providers = providers
        self._local = local
        self._store = store
        self._clock = clock
        self._running: defer.Deferred[int] | None = None
        self._run_again = False
        self._unknown_reported: set[str] = set()
        # Called when a provider has taken a copy of a file (the local one
        # may then be evicted).
        self.on_stored: Callable[[], None] | None = None

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    async def queue(
        self, provider: StorageProvider, relative_path: str, op: ProviderOperation
    ) -> None:
        """Record the task, then start on it at once (in the background)."""
        await self._store.add(ProviderTask(provider.name, relative_path, op, 0), self._now_ms())
        self.run_soon()

    async def queue_deletions(
        self, provider: StorageProvider, files: Sequence[str], directories: Sequence[str]
    ) -> None:
        """Record the deletion of many files and directories at once, then
        start on them (in the background)."""
        await self._store.add_deletions(provider.name, files, directories, self._now_ms())
        self.run_soon()

    async def stored(self, provider: StorageProvider, relative_path: str) -> None:
        """A provider has just stored a path: older deletions of it are void."""
        await self._store.cancel_deletes(provider.name, relative_path)

    async def copy_queued(self, provider: StorageProvider, relative_path: str) -> bool:
        """Whether ``provider`` is still owed a copy of ``relative_path``
        (what it holds there, if anything, is not that file yet)."""
        return await self._store.is_queued(provider.name, relative_path, ProviderOperation.STORE)

    def run_soon(self) -> None:
        """Run the due tasks now, or, if a run is under way, once more after it
        (a task queued during a run is not left for the next tick)."""
        if self._running is not None:
            self._run_again = True
            return
        self._run_again = False
        self._running = defer.ensureDeferred(self.run_due())

        def finished(result: object) -> object:
            self._running = None
            if self._run_again:
                self.run_soon()
            return result

        self._running.addBoth(finished)
        self._running.addErrback(
            lambda f: logger.error("running provider tasks failed: %s", f.value)
        )

    async def wait_idle(self) -> None:
        """Wait for a run under way (tests, shutdown)."""
        while self._running is not None:
            await self._running

    async def run_due(self) -> int:
        """Run every task that is due; returns how many succeeded."""
        succeeded = 0
        while True:
            tasks = await self._store.due(self._now_ms(), _BATCH)
            if not tasks:
                break
            progress = 0
            for task in tasks:
                if await self._run(task):
                    succeeded += 1
                    progress += 1
            if progress == 0:
                break  # everything due failed again and was postponed
        provider_tasks_queued.set(await self._store.count())
        return succeeded

    async def _run(self, task: ProviderTask) -> bool:
        # Claimed first: several processes (workers) may look at the queue.
        if not await self._store.claim(task, self._now_ms() + int(CLAIM_SECONDS * 1000)):
            return False
        provider = self._providers.get(task.provider)
        if provider is None:
            if task.provider not in self._unknown_reported:
                self._unknown_reported.add(task.provider)
                logger.warning(
                    "tasks are queued for storage provider %s, which is no longer configured;"
                    " they stay queued",
                    task.provider,
                )
            await self._store.postpone(task, self._now_ms() + int(RETRY_MAX_SECONDS * 1000), "")
            return False
        try:
            if task.operation is ProviderOperation.STORE:
                local_path = await self._local.local_path(task.relative_path)
                if local_path is None:
                    # Deleted (or evicted after another copy) meanwhile.
                    logger.info(
                        "not copying %s to %s: no longer stored here",
                        task.relative_path,
                        provider.name,
                    )
                else:
                    await provider.store(task.relative_path, local_path)
                    if self.on_stored is not None:
                        self.on_stored()
            elif task.operation is ProviderOperation.DELETE:
                await provider.delete(task.relative_path)
            else:
                await provider.delete_directory(task.relative_path)
        except Exception as e:
            delay = min(RETRY_BASE_SECONDS * 2**task.attempts, RETRY_MAX_SECONDS)
            logger.warning(
                "%s of %s at %s failed (attempt %d, next in %.0f s): %s",
                task.operation.value,
                task.relative_path,
                provider.name,
                task.attempts + 1,
                delay,
                e,
            )
            provider_task_results.labels(task.operation.value, "failed").inc()
            await self._store.postpone(task, self._now_ms() + int(delay * 1000), repr(e))
            return False
        await self._store.remove(task)
        provider_task_results.labels(task.operation.value, "done").inc()
        return True
