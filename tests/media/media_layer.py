"""The media layer for unit tests: ``MediaRepository`` and its parts built
as ``mediarepo/assembly.py`` builds them, without HTTP or a listening
server.

Every timer of the media layer runs on a :class:`~tests.clock.WatchedClock`
that the test advances; the database (SQLite, or PostgreSQL in a subclass
that sets ``engine``), the files and the thread pools stay real. Other
servers are one in-memory peer: a resource of the test's own
(:meth:`MediaLayerTestCase.peer`), reached through treq's traversal agent,
whose ``flush`` moves what the resource writes later.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any, cast

from signedjson.key import generate_signing_key
from treq.testing import RequestTraversalAgent
from twisted.internet import reactor
from twisted.internet.interfaces import IReactorFromThreads, IReactorThreads
from twisted.web.resource import NoResource, Resource

from mediarepo.config import parse_config
from mediarepo.federation.backoff import BackoffPolicy, DestinationBackoff
from mediarepo.federation.client import FederationClient
from mediarepo.media.locks import WorkerLocks
from mediarepo.media.pending import ContentArrivals
from mediarepo.media.pending_thumbnails import PendingThumbnailWork
from mediarepo.media.provider_chain import ProviderChain, ProviderSlot
from mediarepo.media.provider_tasks import ProviderTasks
from mediarepo.media.providers.local import LocalFiles
from mediarepo.media.remote import RemoteMediaCache
from mediarepo.media.repository import MediaRepository
from mediarepo.media.thumbnails import ThumbnailMaker
from mediarepo.media.uploads import LocalUploads
from mediarepo.storage.database import Database
from mediarepo.storage.destination_rows import DestinationRows
from mediarepo.storage.lock_rows import LockRows
from mediarepo.storage.media_rows import MediaRows
from mediarepo.storage.pending_thumbnail_rows import PendingThumbnailRows
from mediarepo.storage.provider_task_rows import ProviderTaskRows
from mediarepo.storage.quarantine_rows import QuarantineRows
from mediarepo.storage.schema import SchemaState, prepare_database
from mediarepo.storage.upload_rows import UploadRows
from mediarepo.values import Requester
from tests.clock import WatchedClock
from tests.utils import SERVER_NAME, AsyncSetUpTestCase, prepared_database_section


class ReactorWithThreads(IReactorThreads, IReactorFromThreads):
    """The real reactor as the file work sees it."""


# Where the files go: in memory where the system offers a directory there
# (no test here is about disks, and a disk's fsyncs would take most of each
# test's time), else the usual temporary directory.
MEMORY_DIRECTORY = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
# Where the clock starts: timestamps in rows look like today's.
CLOCK_START_SECONDS = 1_750_000_000.0
_SIGNING_KEY = generate_signing_key("unit")
# What prepare_database found, by engine: every prepared database of an
# engine is a copy of the same one, and asking again costs 10-20 ms on
# PostgreSQL.
_schemas: dict[str, SchemaState] = {}
ALICE = Requester(f"@alice:{SERVER_NAME}", None, False, False, None)


class MediaLayerTestCase(AsyncSetUpTestCase):
    # Each test takes milliseconds; one that waits for what never comes
    # fails after this many seconds rather than trial's two minutes.
    timeout = 10
    engine = "sqlite3"
    # homeserver.yaml keys of a test class.
    extra_config: dict[str, Any] = {}

    def peer(self) -> Resource:
        """What the in-memory peer answers with (every server name reaches it)."""
        return NoResource()

    def provider_slots(self) -> list[ProviderSlot]:
        """The storage providers after the local store."""
        return []

    async def set_up(self) -> None:
        self.clock = WatchedClock()
        self.clock.advance(CLOCK_START_SECONDS)
        self.workdir = tempfile.mkdtemp(prefix="mediarepo-unit-", dir=MEMORY_DIRECTORY)
        self.addCleanup(shutil.rmtree, self.workdir, True)
        cleanups: list[Callable[[], None]] = []
        section = await prepared_database_section(self.engine, self.workdir, cleanups)
        for cleanup in cleanups:
            self.addCleanup(cleanup)
        self.config = parse_config(
            {
                "server_name": SERVER_NAME,
                "database": section,
                "media_store_path": os.path.join(self.workdir, "media_store"),
                **self.extra_config,
            },
            self.workdir,
        )
        self.database = Database(self.config.database, reactor)
        self.addCleanup(self.database.close)
        schema = _schemas.get(self.engine)
        if schema is None:
            schema = _schemas[self.engine] = await prepare_database(self.database)
        self._build(schema)

    def _build(self, schema: SchemaState) -> None:
        config, clock, database = self.config, self.clock, self.database
        # The real reactor runs the file work (its threads report back to it).
        real = cast(ReactorWithThreads, reactor)
        threads = real.getThreadPool()
        self.local = LocalFiles(config.media_store_path, threads, real)
        slots = self.provider_slots()
        self.tasks = ProviderTasks(
            {slot.provider.name: slot.provider for slot in slots},
            self.local,
            ProviderTaskRows(database),
            clock,
        )
        self.storage = ProviderChain(self.local, slots, self.tasks, clock)
        self.media_rows = MediaRows(database)
        self.locks = WorkerLocks(LockRows(database), clock)
        # Thumbnails are made on real threads; none of these tests wants them.
        thumbnails = ThumbnailMaker(
            self.storage,
            self.media_rows,
            threads,
            real,
            sizes=config.thumbnail_sizes,
            max_image_pixels=config.max_image_pixels,
            dynamic=config.dynamic_thumbnails,
            pixel_budget=config.thumbnail_pixel_budget,
            formats=config.thumbnail_formats,
            pending=PendingThumbnailWork(
                PendingThumbnailRows(database), self.locks.instance_name, clock
            ),
        )
        quarantine = QuarantineRows(
            database,
            schema.quarantine_records,
            "mediarepo",
            clock,
            synapse_owned=schema.synapse_owned,
        )
        self.peer_agent = RequestTraversalAgent(self.peer())
        self.backoff = DestinationBackoff(
            DestinationRows(database), BackoffPolicy.from_config(config.federation), clock
        )
        federation = FederationClient(
            clock,
            SERVER_NAME,
            _SIGNING_KEY,
            config.federation,
            backoff=self.backoff,
            agent=self.peer_agent,
        )
        self.arrivals = ContentArrivals(clock)
        self.remote = RemoteMediaCache(
            config, self.storage, self.media_rows, federation, thumbnails, quarantine,
            self.locks, self.arrivals, clock,
        )  # fmt: skip
        self.uploads = LocalUploads(
            config, self.storage, self.media_rows, UploadRows(database), thumbnails,
            self.locks, quarantine, self.arrivals, clock,
        )  # fmt: skip
        self.repository = MediaRepository(
            config, self.storage, self.media_rows, self.uploads, thumbnails, self.remote,
            self.arrivals, clock,
        )  # fmt: skip

    async def upload(self, data: bytes, media_type: str = "text/plain") -> str:
        """Store ``data`` as new local media by ``ALICE``; its media ID."""
        sink = await self.uploads.begin_upload(ALICE, len(data))
        sink.write(data)
        mxc = await self.uploads.complete_upload(sink, ALICE, media_type, None)
        return mxc.rsplit("/", 1)[1]

    async def reserve(self) -> str:
        """A media ID reserved by ``ALICE`` (``/create``), without content."""
        mxc, _ = await self.uploads.create_media_id(ALICE)
        return mxc.rsplit("/", 1)[1]

    async def fill(self, media_id: str, data: bytes) -> None:
        """The content of a reservation arrives (``PUT``)."""
        sink = await self.uploads.begin_reserved_upload(ALICE, SERVER_NAME, media_id, len(data))
        sink.write(data)
        await self.uploads.complete_upload(sink, ALICE, "text/plain", None)

    def files_under(self, *parts: str) -> list[str]:
        """The files under a directory of the local media store."""
        top = os.path.join(self.config.media_store_path, *parts)
        return sorted(name for _, _, names in os.walk(top) for name in names)
