"""The queue of work owed to storage providers (ProviderTasks) on a test
clock, its rows real: the retry schedule of a failing provider, the work
done once it is back, a provider no longer configured, one process's
claim against another's, and a task queued during a run."""

from __future__ import annotations

from twisted.internet import defer

from mediarepo.media.provider_chain import ProviderSlot
from mediarepo.media.provider_tasks import (
    CLAIM_SECONDS,
    RETRY_BASE_SECONDS,
    RETRY_MAX_SECONDS,
    ProviderTasks,
)
from mediarepo.media.providers import StorageProvider
from mediarepo.media.responder import Responder
from mediarepo.storage.provider_task_rows import ProviderOperation, ProviderTask, ProviderTaskRows
from tests.media.media_layer import MediaLayerTestCase

PATH = "local_content/ab/cd/efghijklmnopqrstuvwx"
# Due times are whole milliseconds: a task is looked at this far either
# side of when it falls due.
MARGIN = 0.01


class BackupStore(StorageProvider):
    """A provider the test controls: up or down, and, while ``hold`` is
    set, keeping every store waiting on it."""

    def __init__(self, name: str = "backup") -> None:
        self.name = name
        self.files: dict[str, bytes] = {}
        self.down = False
        self.hold: defer.Deferred[None] | None = None
        # When each store was attempted (clock seconds).
        self.attempts: list[float] = []
        self.clock_seconds = lambda: 0.0
        self._attempted: list[defer.Deferred[None]] = []

    def next_attempt(self) -> defer.Deferred[None]:
        """Fires when a store is next attempted (and held, if it is to be)."""
        attempted: defer.Deferred[None] = defer.Deferred()
        self._attempted.append(attempted)
        return attempted

    async def store(self, relative_path: str, local_path: str) -> None:
        self.attempts.append(self.clock_seconds())
        hold = self.hold
        attempted, self._attempted = self._attempted, []
        for waiting in attempted:
            waiting.callback(None)
        if hold is not None:
            await hold
        if self.down:
            raise ConnectionError("the store is down")
        with open(local_path, "rb") as f:
            self.files[relative_path] = f.read()

    async def fetch(self, relative_path: str) -> Responder | None:
        return None

    async def exists(self, relative_path: str, size: int | None = None) -> bool:
        return relative_path in self.files

    async def delete(self, relative_path: str) -> None:
        self.files.pop(relative_path, None)

    async def delete_directory(self, relative_path: str) -> None:
        for path in [p for p in self.files if p.startswith(relative_path.rstrip("/") + "/")]:
            del self.files[path]


class ProviderTaskTests(MediaLayerTestCase):
    def provider_slots(self) -> list[ProviderSlot]:
        self.backup = BackupStore()
        self.backup.clock_seconds = lambda: self.clock.seconds()
        return [ProviderSlot(self.backup, True, True, store_synchronous=False)]

    async def queue_copy(self, data: bytes = b"to be copied") -> None:
        """A file written here, its copy owed to the provider (queued, and
        the run that queueing starts over)."""
        await self.local.write_file(PATH, data)
        await self.tasks.queue(self.backup, PATH, ProviderOperation.STORE)
        await self.tasks.wait_idle()

    async def queued(self) -> list[tuple[object, ...]]:
        return await self.database.run_query(
            "t", "SELECT operation, attempts, last_error FROM mediarepo_provider_tasks"
        )

    async def test_retried_on_a_doubling_delay_up_to_the_maximum(self) -> None:
        self.backup.down = True
        await self.queue_copy()
        self.assertEqual(len(self.backup.attempts), 1)
        delays = []
        delay = RETRY_BASE_SECONDS
        while delay < RETRY_MAX_SECONDS:
            delays.append(delay)
            delay *= 2
        delays += [RETRY_MAX_SECONDS, RETRY_MAX_SECONDS]
        self.assertEqual(delays[:4], [5, 10, 20, 40])
        for attempt, delay in enumerate(delays, start=2):
            self.clock.advance(delay - MARGIN)
            self.assertEqual(await self.tasks.run_due(), 0)
            self.assertEqual(len(self.backup.attempts), attempt - 1, f"before {delay} s")
            self.clock.advance(2 * MARGIN)
            self.assertEqual(await self.tasks.run_due(), 0)
            self.assertEqual(len(self.backup.attempts), attempt, f"after {delay} s")
        [(operation, attempts, error)] = await self.queued()
        self.assertEqual((operation, attempts), ("store", len(delays) + 1))
        self.assertIn("the store is down", str(error))

    async def test_done_once_the_provider_is_back(self) -> None:
        copied = []
        self.tasks.on_stored = lambda: copied.append(True)
        self.backup.down = True
        await self.queue_copy(b"kept until copied")
        self.backup.down = False
        # Not before it is due again, whatever else runs.
        self.assertEqual(await self.tasks.run_due(), 0)
        self.assertEqual(self.backup.files, {})
        self.clock.advance(RETRY_BASE_SECONDS)
        self.assertEqual(await self.tasks.run_due(), 1)
        self.assertEqual(self.backup.files, {PATH: b"kept until copied"})
        self.assertEqual(await self.queued(), [])
        self.assertEqual(copied, [True])

    async def test_a_provider_no_longer_configured_keeps_its_tasks(self) -> None:
        rows = ProviderTaskRows(self.database)
        await rows.add(
            ProviderTask("gone", PATH, ProviderOperation.DELETE, 0),
            int(self.clock.seconds() * 1000),
        )
        with self.assertLogs("mediarepo.media.provider_tasks", "WARNING") as logs:
            self.assertEqual(await self.tasks.run_due(), 0)
            self.clock.advance(RETRY_MAX_SECONDS - MARGIN)
            await self.tasks.run_due()
            self.clock.advance(2 * MARGIN)
            await self.tasks.run_due()
        # Told once, looked at again only after the longest delay.
        self.assertEqual(len(logs.records), 1)
        self.assertIn("no longer configured", logs.output[0])
        [(operation, attempts, _)] = await self.queued()
        self.assertEqual((operation, attempts), ("delete", 2))

    async def test_a_task_claimed_by_another_process_waits_for_its_claim(self) -> None:
        """The other process took it and died with it."""
        self.backup.hold = defer.Deferred()
        await self.local.write_file(PATH, b"claimed")
        attempted = self.backup.next_attempt()
        await self.tasks.queue(self.backup, PATH, ProviderOperation.STORE)
        await attempted  # this process has it, and never lets go
        other = ProviderTasks({"backup": self.backup}, self.local, ProviderTaskRows(self.database),
                              self.clock)  # fmt: skip
        self.backup.hold = None
        self.clock.advance(CLAIM_SECONDS - MARGIN)
        self.assertEqual(await other.run_due(), 0)
        self.assertEqual(len(self.backup.attempts), 1)
        self.clock.advance(2 * MARGIN)
        self.assertEqual(await other.run_due(), 1)
        self.assertEqual(self.backup.files, {PATH: b"claimed"})

    async def test_work_queued_during_a_run_is_done_after_it(self) -> None:
        """Without waiting for the periodic look at the queue."""
        hold: defer.Deferred[None] = defer.Deferred()
        self.backup.hold = hold
        await self.local.write_file(PATH, b"first")
        attempted = self.backup.next_attempt()
        await self.tasks.queue(self.backup, PATH, ProviderOperation.STORE)
        await attempted
        self.backup.hold = None
        second = PATH[:-1] + "y"
        await self.local.write_file(second, b"second")
        await self.tasks.queue(self.backup, second, ProviderOperation.STORE)
        self.assertEqual(len(self.backup.attempts), 1)
        hold.callback(None)
        await self.tasks.wait_idle()
        self.assertEqual(self.backup.files, {PATH: b"first", second: b"second"})
        self.assertEqual(await self.queued(), [])


class ProviderTaskPostgresTests(ProviderTaskTests):
    engine = "psycopg2"
