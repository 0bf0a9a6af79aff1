"""The server: config -> thread pools, providers, database -> the other
parts (built by ``assembly.py``) -> listeners.

:func:`media_server` builds the one server every launcher runs (``python -m
mediarepo``, each ``--workers`` process, a Synapse-style worker, the twistd
plugin, the tests): a ``twisted.application`` service whose named children
are its parts, started in order and stopped in reverse (``services.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort
from twisted.python.threadpool import ThreadPool

from mediarepo.assembly import Groundwork, ServerParts, build_parts, provider_slots
from mediarepo.config import Config
from mediarepo.federation.keys import load_signing_keys
from mediarepo.media.allocator import map_large_allocations
from mediarepo.media.provider_chain import ProviderChain
from mediarepo.media.repository import MediaRepository
from mediarepo.media.uploads import LocalUploads
from mediarepo.outbound import NameResolver
from mediarepo.services import OrderedServices, Outcome, StepService
from mediarepo.storage.database import Database
from mediarepo.storage.schema import prepare_database
from mediarepo.workers import (
    ListeningPorts,
    ListeningSocket,
    inherited_sockets,
    open_listening_sockets,
    worker_index,
)

logger = logging.getLogger(__name__)

# How long a shutdown waits for uploads still arriving before rolling them back.
SHUTDOWN_GRACE_SECONDS = 10.0
_MEDIA_IO_THREADS = 20


def media_server(
    config: Config, reactor: Any = None, *, preview_name_resolver: NameResolver | None = None
) -> MediaServer:
    """The server every launcher runs. A worker of ``--workers`` serves the
    sockets its supervisor opened (and only worker 0 may run background
    jobs); any other process opens its own. ``preview_name_resolver`` is
    how URL previews look names up (the reactor's resolver when None)."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    return MediaServer(
        config,
        reactor,
        inherited_sockets(),
        runs_background_jobs=worker_index() == 0,
        preview_name_resolver=preview_name_resolver,
    )


class MediaServer(OrderedServices):
    """One server: the named child services of its parts, added (and so
    started) in the order below once the reactor runs, and stopped in the
    reverse order: stop listening, stop the background jobs and LISTEN,
    close URL preview and federation connections, let uploads in flight
    finish (or roll them back after the grace period), close client
    connections, settle thumbnails, access times and provider tasks, close
    the database, stop the providers and the thread pools."""

    def __init__(
        self,
        config: Config,
        reactor: Any,
        inherited: Sequence[ListeningSocket] = (),
        runs_background_jobs: bool = True,
        preview_name_resolver: NameResolver | None = None,
    ) -> None:
        super().__init__(reactor, SHUTDOWN_GRACE_SECONDS)
        self.config = config
        # Any: the reactor is used through several of its interfaces.
        self.reactor: Any = reactor
        # Listening sockets opened by a supervisor (--workers), by listener.
        self._inherited_sockets = list(inherited)
        # With several workers, one runs the periodic jobs for all; of several
        # instances, the one media_instance_running_background_jobs names.
        self._runs_background_jobs = runs_background_jobs and config.runs_background_jobs
        # How URL previews look names up (the reactor's resolver when None).
        self._preview_name_resolver = preview_name_resolver
        self.started = Outcome()
        self._assembling: defer.Deferred[None] | None = None
        self._parts: ServerParts | None = None

    @property
    def shutdown_grace_seconds(self) -> float:
        """How long a stop waits for uploads still arriving."""
        return self.stop_budget_seconds

    @shutdown_grace_seconds.setter
    def shutdown_grace_seconds(self, seconds: float) -> None:
        self.stop_budget_seconds = seconds

    @property
    def parts(self) -> ServerParts:
        if self._parts is None:
            raise RuntimeError("the server has not started")
        return self._parts

    @property
    def database(self) -> Database:
        return self.parts.database

    @property
    def repository(self) -> MediaRepository:
        return self.parts.repository

    @property
    def uploads(self) -> LocalUploads:
        return self.parts.uploads

    @property
    def ports(self) -> list[IListeningPort]:
        ports = self.namedServices["ports"]
        assert isinstance(ports, ListeningPorts)
        return ports.ports

    def startService(self) -> None:
        super().startService()
        # Launchers start services before the reactor runs; the parts need it.
        self.reactor.callWhenRunning(self._begin)

    def _begin(self) -> None:
        if self.stopped.ended or not self.running:
            return
        self._assembling = defer.ensureDeferred(self._assemble())
        self._assembling.addBoth(self.started.end)

    async def start(self) -> None:
        """Start, and wait until serving (raises what made the start fail)."""
        self.startService()
        await self.started.wait()

    async def stop(self) -> None:
        await self.stopService()

    async def before_stopping_children(self) -> None:
        if self._assembling is not None and not self.started.ended:
            # Stopped while starting: the start gives up where it is.
            self._assembling.cancel()
            try:
                await self.started.wait()
            except Exception:
                logger.debug("start given up for the stop")

    def all_stopped(self) -> None:
        logger.info("mediarepo stopped")

    async def _assemble(self) -> None:
        signing_keys = load_signing_keys(self.config.signing_key_path)
        # The ports first: a port in use fails the start before the database
        # is touched, and connections wait in the backlog meanwhile.
        sockets = self._inherited_sockets or self._open_sockets()
        ports = ListeningPorts(self.reactor, sockets, shared=bool(self._inherited_sockets))
        try:
            await self._assemble_parts(signing_keys, ports)
        except BaseException:
            ports.close_unserved()
            raise
        if self._runs_background_jobs:
            logger.info("media background jobs run in this process")
        elif not self.config.runs_background_jobs:
            logger.info(
                "media background jobs are left to instance %s",
                self.config.media_instance_running_background_jobs,
            )
        logger.info("mediarepo serving %s as instance %s", self.config.server_name,
                    self.config.instance_name)  # fmt: skip

    def _open_sockets(self) -> list[ListeningSocket]:
        """Listening sockets of this process's own, one per listener address."""
        sockets = []
        for listening, sock in open_listening_sockets(self.config, shared=False):
            # The descriptor is handed to the reactor when the ports start.
            sock.detach()
            sockets.append(listening)
        return sockets

    async def _assemble_parts(self, signing_keys: list[Any], ports: ListeningPorts) -> None:
        ground = await self._lay_groundwork()
        parts = build_parts(
            ground,
            signing_keys,
            ports,
            runs_background_jobs=self._runs_background_jobs,
            preview_name_resolver=self._preview_name_resolver,
        )
        # Stopped in the reverse order of what follows.
        self.add(StepService("provider tasks", stop=parts.provider_tasks.wait_idle))
        self.add(StepService("access times", stop=parts.repository.access.flush))
        self.add(parts.jobs.access_time_flushes)
        # Every process resumes what a crashed one left, at start.
        thumbnails = parts.thumbnails
        self.add(StepService("thumbnails", start=thumbnails.resume_pending, stop=thumbnails.settle))

        async def close_connections() -> None:
            await defer.gatherResults(
                [defer.ensureDeferred(site.close_connections()) for site in parts.sites]
            )

        self.add(StepService("client connections", stop=close_connections))
        self.add(
            StepService(
                "uploads",
                stop=lambda: self._settle_uploads(parts.storage),
                stop_seconds=lambda: self.shutdown_grace_seconds + 1,
            )
        )
        self.add(StepService("federation client", stop=parts.federation_client.close))
        if parts.preview_client is not None:
            self.add(StepService("URL preview client", stop=parts.preview_client.close))
        if parts.notifications is not None:
            self.add(StepService("LISTEN", stop=parts.notifications.stop))
            await parts.notifications.start()
        if parts.local_cache is not None:
            self.add(StepService("local cache eviction", stop=parts.local_cache.stop))
        for timer in parts.jobs.background:
            self.add(timer)
        self._parts = parts
        self.add(ports)

    async def _lay_groundwork(self) -> Groundwork:
        """The thread pools, the storage providers and the database (its
        schema prepared), each started as it is added."""
        config = self.config
        media_io = ThreadPool(minthreads=1, maxthreads=_MEDIA_IO_THREADS, name="media-io")
        thumbnail_pool = ThreadPool(
            minthreads=0, maxthreads=config.thumbnail_threadpool_size, name="thumbnails"
        )
        for pool in (media_io, thumbnail_pool):
            self.add(StepService(f"{pool.name} threads", start=pool.start, stop=pool.stop))
        # Pixels freed by thumbnailing go back to the system (see allocator).
        map_large_allocations()
        slots = provider_slots(config, media_io, self.reactor)
        for slot in slots:
            self.add(
                StepService(
                    f"storage provider {slot.provider.name}",
                    start=slot.provider.start,
                    stop=slot.provider.stop,
                )
            )
            logger.info(
                "storage provider %s (store_local: %s, store_remote: %s, synchronous: %s)",
                slot.provider.name, slot.store_local, slot.store_remote, slot.store_synchronous,
            )  # fmt: skip
        database = Database(config.database, self.reactor)
        # Closing blocks until running statements end: each is bounded by
        # the connection's timeouts (see storage.engines.POSTGRES_CONNECT_DEFAULTS).
        self.add(StepService("database", stop=database.close))
        schema = await prepare_database(database)
        return Groundwork(config, self.reactor, media_io, thumbnail_pool, slots, database, schema)

    async def _settle_uploads(self, storage: ProviderChain) -> None:
        """Let uploads still arriving finish, or roll them back after the grace period."""
        idle = storage.when_uploads_idle()
        idle.addTimeout(self.shutdown_grace_seconds, self.reactor)
        try:
            await idle
        except defer.TimeoutError:
            logger.warning("rolling back %d unfinished uploads", storage.uploads_in_progress)
            await storage.abort_all_uploads()
