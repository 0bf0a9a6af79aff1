"""Wiring: config -> database -> stores -> repository -> resource trees -> listeners."""

from __future__ import annotations

import errno
import logging
import time
from typing import Any

from twisted.internet import defer, task
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.python.threadpool import ThreadPool

from mediarepo.accounts import Accounts
from mediarepo.config import Config
from mediarepo.http.auth import Authenticator
from mediarepo.http.site import MediaSite
from mediarepo.http.tree import Handlers, build_tree, upload_target
from mediarepo.media.locks import WorkerLocks
from mediarepo.media.providers.local import LocalMediaStore
from mediarepo.media.repository import MediaRepository
from mediarepo.media.storage import MediaStorage
from mediarepo.media.thumbnails import ThumbnailProvider
from mediarepo.storage.database import Database
from mediarepo.storage.locks import LockStore
from mediarepo.storage.media import CONTENT_CHANNEL, MediaStore
from mediarepo.storage.notifications import PostgresListener
from mediarepo.storage.schema import prepare_database
from mediarepo.storage.users import UserStore

logger = logging.getLogger(__name__)

# How long a shutdown waits for uploads still arriving before rolling them back.
SHUTDOWN_GRACE_SECONDS = 10.0
# How often leftovers of crashed uploads and expired reservations are removed.
HOUSEKEEPING_INTERVAL_SECONDS = 3600.0
_MEDIA_IO_THREADS = 20


class MediaServer:
    """One running server. ``start`` and ``stop`` are the whole lifecycle."""

    def __init__(self, config: Config, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        # Any: the reactor is used through several of its interfaces.
        self.reactor: Any = reactor
        self.ports: list[IListeningPort] = []
        self.sites: list[MediaSite] = []
        self.database: Database | None = None
        self.repository: MediaRepository | None = None
        self.accounts: Accounts | None = None
        self._media_io = ThreadPool(minthreads=1, maxthreads=_MEDIA_IO_THREADS, name="media-io")
        self._thumbnail_pool = ThreadPool(
            minthreads=0, maxthreads=config.thumbnail_threadpool_size, name="thumbnails"
        )
        self._sweeper: task.LoopingCall | None = None
        self._listener: PostgresListener | None = None
        self.shutdown_grace_seconds = SHUTDOWN_GRACE_SECONDS

    async def start(self) -> None:
        config = self.config
        reactor = self.reactor
        self.database = Database(config.database, reactor)
        await prepare_database(self.database)
        self._media_io.start()
        self._thumbnail_pool.start()

        local = LocalMediaStore(config.media_store_path, self._media_io, reactor)
        storage = MediaStorage(local, providers=[])
        media_store = MediaStore(self.database)
        thumbnails = ThumbnailProvider(
            storage,
            media_store,
            self._thumbnail_pool,
            reactor,
            sizes=config.thumbnail_sizes,
            max_image_pixels=config.max_image_pixels,
            dynamic=config.dynamic_thumbnails,
        )
        locks = WorkerLocks(LockStore(self.database), reactor)
        self.repository = MediaRepository(config, storage, media_store, thumbnails, locks, reactor)
        if self.database.engine.name == "psycopg2":
            # Downloads waiting for an async upload wake when another process
            # sharing the database completes it.
            self._listener = PostgresListener(
                config.database.args, CONTENT_CHANNEL, self.repository.arrivals.announce, reactor
            )
            await self._listener.start()
        self.accounts = Accounts(UserStore(self.database), reactor)
        handlers = Handlers.create(self.repository, Authenticator(self.accounts))

        for listener in config.listeners:
            site = MediaSite(
                build_tree(listener, handlers, config.enable_metrics),
                reactor,
                max_upload_size=config.max_upload_size,
                x_forwarded=listener.x_forwarded,
                upload_target=upload_target,
                begin_upload=handlers.upload.begin_upload,
                abandon_upload=self.repository.abandon_upload,
            )
            self.sites.append(site)
            self._listen(listener.port, listener.bind_addresses, site)

        self._sweeper = task.LoopingCall(self._housekeeping)
        self._sweeper.clock = reactor
        self._sweeper.start(HOUSEKEEPING_INTERVAL_SECONDS, now=True)
        logger.info("mediarepo serving %s", config.server_name)

    def _listen(self, port: int, addresses: tuple[str, ...], site: MediaSite) -> None:
        bound_any_v6 = False
        for address in addresses:
            try:
                listening = self.reactor.listenTCP(port, site, interface=address)
            except CannotListenError as e:
                # "::" also takes IPv4 on dual-stack hosts, so a following
                # "0.0.0.0" on the same port finds it in use; that is fine.
                in_use = getattr(e.socketError, "errno", None) == errno.EADDRINUSE
                if address == "0.0.0.0" and bound_any_v6 and in_use:
                    continue
                raise
            bound_any_v6 = bound_any_v6 or address == "::"
            self.ports.append(listening)
            host = listening.getHost()
            logger.info("listening on %s port %d", getattr(host, "host", address), host.port)

    async def _housekeeping(self) -> None:
        """Clean up after crashed uploads and expired reservations."""
        assert self.repository is not None
        for sweep in (self.repository.sweep_staging, self.repository.sweep_expired_reservations):
            try:
                await sweep()
            except Exception:
                logger.exception("%s failed", sweep.__name__)

    async def stop(self) -> None:
        """Stop listening, let uploads in flight finish (or roll them back
        after a grace period), then close the database pool."""
        for port in self.ports:
            stopped = port.stopListening()
            if stopped is not None:
                await stopped
        self.ports = []
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        if self.repository is not None:
            storage = self.repository.storage
            deadline = time.monotonic() + self.shutdown_grace_seconds
            while storage.uploads_in_progress and time.monotonic() < deadline:
                await task.deferLater(self.reactor, 0.1, lambda: None)
            if storage.uploads_in_progress:
                logger.warning("rolling back %d unfinished uploads", storage.uploads_in_progress)
                storage.abort_all_uploads()
                # Let the removals queued on the I/O pool run.
                await task.deferLater(self.reactor, 0.1, lambda: None)
        for site in self.sites:
            site.close_connections()
        self.sites = []
        if self.repository is not None:
            await self.repository.thumbnails.settle()
        if self.database is not None:
            self.database.close()
            self.database = None
        for pool in (self._media_io, self._thumbnail_pool):
            if pool.started:
                pool.stop()
        logger.info("mediarepo stopped")

    def start_deferred(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self.start())

    def stop_deferred(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self.stop())
