"""Wiring: config -> database -> stores -> repository -> resource trees -> listeners.

:func:`media_server` builds the one server every launcher runs (``python -m
mediarepo``, each ``--workers`` process, a Synapse-style worker, the twistd
plugin, the tests): a ``twisted.application`` service whose named children
are its parts, started in order and stopped in reverse (``services.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import attrs
from OpenSSL import crypto
from twisted.internet import defer, ssl, task
from twisted.internet.interfaces import IListeningPort
from twisted.python.threadpool import ThreadPool

from mediarepo.accounts import Accounts
from mediarepo.config import Config
from mediarepo.errors import ConfigError
from mediarepo.federation.backoff import BackoffPolicy, DestinationBackoff
from mediarepo.federation.client import FederationClient
from mediarepo.federation.keyring import Keyring
from mediarepo.federation.keys import load_signing_keys, server_keys_response
from mediarepo.http.admin import AdminHandler
from mediarepo.http.auth import Authenticator, FederationAuthenticator
from mediarepo.http.site import MediaSite
from mediarepo.http.tree import Handlers, build_tree
from mediarepo.media.access import FLUSH_INTERVAL_SECONDS
from mediarepo.media.admin_rules import MediaAdmin
from mediarepo.media.allocator import map_large_allocations
from mediarepo.media.lifecycle import (
    Housekeeping,
    MediaPurger,
    Retention,
    UrlCacheExpiry,
    periodic_jobs,
)
from mediarepo.media.local_cache import LocalCacheEviction
from mediarepo.media.locks import WorkerLocks
from mediarepo.media.oembed import OEmbedProviders
from mediarepo.media.pending import ContentArrivals
from mediarepo.media.pending_thumbnails import PendingThumbnailWork
from mediarepo.media.preview_fetch import PreviewDownloader, preview_client_settings
from mediarepo.media.provider_chain import ProviderChain, ProviderSlot
from mediarepo.media.provider_tasks import ProviderTasks
from mediarepo.media.providers import create_provider
from mediarepo.media.providers.local import LocalFiles
from mediarepo.media.remote import RemoteMediaCache
from mediarepo.media.repository import MediaRepository
from mediarepo.media.rooms import RoomMedia
from mediarepo.media.thumbnails import ThumbnailProvider
from mediarepo.media.uploads import LocalUploads
from mediarepo.media.url_previewer import UrlPreviewer
from mediarepo.outbound import NameResolver, OutboundClient
from mediarepo.services import OrderedServices, Outcome, StepService
from mediarepo.storage.database import Database
from mediarepo.storage.destination_rows import DestinationRows
from mediarepo.storage.key_rows import KeyRows
from mediarepo.storage.lock_rows import LockRows
from mediarepo.storage.media_admin_rows import MediaAdminRows
from mediarepo.storage.media_rows import CONTENT_CHANNEL, MediaRows
from mediarepo.storage.notifications import CHANGED_CHANNEL, PostgresListener
from mediarepo.storage.pending_thumbnail_rows import PendingThumbnailRows
from mediarepo.storage.provider_task_rows import ProviderTaskRows
from mediarepo.storage.quarantine_rows import QuarantineRows
from mediarepo.storage.room_rows import RoomEventRows
from mediarepo.storage.schema import prepare_database
from mediarepo.storage.upload_rows import UploadRows
from mediarepo.storage.url_cache import UrlCacheStore
from mediarepo.storage.user_rows import UserRows
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


def server_tls_options(certificate_path: str, private_key_path: str) -> Any:
    """TLS for a listener: the certificate file may hold the chain after the
    server's own certificate, as Synapse's ``tls_certificate_path`` may."""
    try:
        with open(certificate_path, "rb") as f:
            pem = f.read()
        with open(private_key_path, "rb") as f:
            key = ssl.KeyPair.load(f.read(), crypto.FILETYPE_PEM)
        certificates = [
            ssl.Certificate.loadPEM(b"-----BEGIN CERTIFICATE-----" + part)
            for part in pem.split(b"-----BEGIN CERTIFICATE-----")[1:]
        ]
    except (OSError, crypto.Error) as e:
        raise ConfigError("tls_certificate_path", f"cannot load the certificate: {e}") from e
    if not certificates:
        raise ConfigError("tls_certificate_path", f"{certificate_path} holds no certificate")
    return ssl.CertificateOptions(
        privateKey=key.original,
        certificate=certificates[0].original,
        extraCertChain=[c.original for c in certificates[1:]],
    )


@attrs.frozen
class ServerParts:
    """What a started server is made of, for tools and tests to reach."""

    database: Database
    repository: MediaRepository
    accounts: Accounts
    federation_client: FederationClient
    # The LISTEN connection for announcements from other processes (PostgreSQL).
    notifications: PostgresListener | None
    sites: list[MediaSite]
    retention: Retention
    # Evicting from the local store, when media_store_max_size is set.
    local_cache: LocalCacheEviction | None
    # The local media store (tests look at it).
    local_store: LocalFiles
    media_io: ThreadPool
    thumbnail_pool: ThreadPool


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
        config = self.config
        reactor = self.reactor
        media_io = ThreadPool(minthreads=1, maxthreads=_MEDIA_IO_THREADS, name="media-io")
        thumbnail_pool = ThreadPool(
            minthreads=0, maxthreads=config.thumbnail_threadpool_size, name="thumbnails"
        )
        for pool in (media_io, thumbnail_pool):
            self.add(StepService(f"{pool.name} threads", start=pool.start, stop=pool.stop))
        # Pixels freed by thumbnailing go back to the system (see allocator).
        map_large_allocations()
        slots = self._add_providers(media_io)
        database = Database(config.database, reactor)
        # Closing blocks until running statements end: each is bounded by
        # the connection's timeouts (see storage.engines.POSTGRES_CONNECT_DEFAULTS).
        self.add(StepService("database", stop=database.close))
        schema = await prepare_database(database)

        local = LocalFiles(
            config.media_store_path,
            media_io,
            reactor,
            note_reads=config.media_store_max_size is not None,
            admin_contact=config.admin_contact,
        )
        tasks = ProviderTasks(
            {slot.provider.name: slot.provider for slot in slots},
            local,
            ProviderTaskRows(database),
            reactor,
        )
        local_cache = None
        if config.media_store_max_size is not None:
            local_cache = LocalCacheEviction(local, slots, config.media_store_max_size, reactor)
            # Every worker evicts once its writes take the store over the limit.
            local.on_written = local_cache.note_written
            tasks.on_stored = local_cache.note_copied
        storage = ProviderChain(local, slots, tasks, reactor)
        media_store = MediaRows(database)
        worker_name = config.name_in_tables
        locks = WorkerLocks(LockRows(database), reactor, worker_name)
        thumbnails = ThumbnailProvider(
            storage,
            media_store,
            thumbnail_pool,
            reactor,
            sizes=config.thumbnail_sizes,
            max_image_pixels=config.max_image_pixels,
            dynamic=config.dynamic_thumbnails,
            pixel_budget=config.thumbnail_pixel_budget,
            formats=config.thumbnail_formats,
            pending=PendingThumbnailWork(
                PendingThumbnailRows(database), locks.instance_name, reactor
            ),
        )
        quarantine = QuarantineRows(
            database,
            schema.quarantine_records,
            worker_name,
            reactor,
            synapse_owned=schema.synapse_owned,
        )
        backoff = DestinationBackoff(
            DestinationRows(database), BackoffPolicy.from_config(config.federation), reactor
        )
        federation_client = FederationClient(
            reactor,
            config.server_name,
            signing_keys[0],
            config.federation,
            backoff=backoff,
            proxy=config.proxy,
        )
        arrivals = ContentArrivals(reactor)
        remote = RemoteMediaCache(
            config, storage, media_store, federation_client, thumbnails, quarantine, locks,
            arrivals, reactor,
        )  # fmt: skip
        uploads = LocalUploads(
            config, storage, media_store, UploadRows(database), thumbnails, locks,
            quarantine, arrivals, reactor,
        )  # fmt: skip
        repository = MediaRepository(
            config, storage, media_store, uploads, thumbnails, remote, arrivals, reactor
        )
        admin_store = MediaAdminRows(
            database, config.server_name, schema.avatar_columns, schema.has_profiles
        )
        purger = MediaPurger(storage, media_store, admin_store, repository.forget_local, reactor)
        media_admin = MediaAdmin(
            config.server_name, media_store, admin_store, quarantine, purger,
            repository.forget_local,
        )  # fmt: skip
        room_events = RoomEventRows(database) if schema.has_room_events else None
        retention = Retention(
            purger,
            repository.access,
            reactor,
            local_lifetime_ms=config.local_media_lifetime_ms,
            remote_lifetime_ms=config.remote_media_lifetime_ms,
        )
        notifications = None
        if database.engine.name == "psycopg2":
            # Downloads waiting for an async upload wake when another process
            # sharing the database completes it; media deleted or quarantined
            # by another process stop being served from this one's caches.
            notifications = PostgresListener(
                database.connect_args,
                {
                    CONTENT_CHANNEL: repository.arrivals.announce,
                    CHANGED_CHANNEL: repository.media_changed_elsewhere,
                },
                reactor,
            )
        accounts = Accounts(UserRows(database), reactor)
        keyring = Keyring(
            KeyRows(database),
            federation_client,
            signing_keys,
            config.federation.trusted_key_servers,
            reactor,
        )

        def keys_response() -> dict[str, Any]:
            valid_until = int(reactor.seconds() * 1000) + config.federation.key_refresh_interval_ms
            return server_keys_response(
                config.server_name, signing_keys, config.federation.old_signing_keys, valid_until
            )

        previewer = None
        preview_client = None
        if config.url_preview.enabled:
            # URL previews' own client (url_preview_ip_range_*).
            preview_client = OutboundClient(
                reactor,
                preview_client_settings(config.url_preview),
                name_resolver=self._preview_name_resolver,
            )
            previewer = self._previewer(
                preview_client, storage, database, media_store, thumbnails, quarantine, media_io
            )
        authenticator = Authenticator(accounts)
        handlers = Handlers.create(
            repository,
            authenticator,
            FederationAuthenticator(
                keyring, config.server_name, config.federation.domain_whitelist, backoff
            ),
            keys_response,
            AdminHandler(media_admin, RoomMedia(room_events, media_admin), authenticator),
            previewer,
        )
        sites = [
            self._site(index, handlers, repository, ports) for index in range(len(config.listeners))
        ]

        # Stopped in the reverse order of what follows.
        self.add(StepService("provider tasks", stop=tasks.wait_idle))
        self.add(StepService("access times", stop=repository.access.flush))
        sweeps: list[Any] = [
            repository.sweep_staging,
            repository.sweep_expired_reservations,
            repository.resume_thumbnails,
        ]
        if retention.enabled:
            sweeps.append(retention.apply)
        if local_cache is not None:
            sweeps.append(local_cache.run)
        jobs = periodic_jobs(
            reactor,
            flush_access_times=repository.access.flush,
            flush_interval_seconds=FLUSH_INTERVAL_SECONDS,
            housekeeping=Housekeeping(sweeps) if self._runs_background_jobs else None,
            housekeeping_interval_seconds=config.media_housekeeping_interval_ms / 1000,
            run_provider_tasks=tasks.run_soon if slots and self._runs_background_jobs else None,
            url_cache_expiry=(
                UrlCacheExpiry(UrlCacheStore(database), storage, repository.forget_local, reactor)
                if previewer is not None and self._runs_background_jobs
                else None
            ),
        )
        self.add(jobs.access_time_flushes)
        # Every process resumes what a crashed one left, at start.
        self.add(StepService("thumbnails", start=thumbnails.resume_pending, stop=thumbnails.settle))

        def close_connections() -> None:
            for site in sites:
                site.close_connections()

        self.add(StepService("client connections", stop=close_connections))
        self.add(
            StepService(
                "uploads",
                stop=lambda: self._settle_uploads(storage),
                stop_seconds=lambda: self.shutdown_grace_seconds + 1,
            )
        )
        self.add(StepService("federation client", stop=federation_client.close))
        if preview_client is not None:
            self.add(StepService("URL preview client", stop=preview_client.close))
        if notifications is not None:
            self.add(StepService("LISTEN", stop=notifications.stop))
            await notifications.start()
        if local_cache is not None:
            self.add(StepService("local cache eviction", stop=local_cache.stop))
        for timer in jobs.background:
            self.add(timer)
        self._parts = ServerParts(
            database, repository, accounts, federation_client, notifications, sites,
            retention, local_cache, local, media_io, thumbnail_pool,
        )  # fmt: skip
        self.add(ports)

    def _previewer(
        self,
        client: OutboundClient,
        storage: ProviderChain,
        database: Database,
        media_store: MediaRows,
        thumbnails: ThumbnailProvider,
        quarantine: QuarantineRows,
        parse_pool: ThreadPool,
    ) -> UrlPreviewer:
        config = self.config
        previews = config.url_preview
        downloader = PreviewDownloader(
            client,
            storage,
            UploadRows(database),
            quarantine,
            self.reactor,
            max_size=previews.max_spider_size,
            accept_language=previews.accept_language,
            url_blacklist=previews.url_blacklist,
            authenticated_media=config.enable_authenticated_media,
        )
        return UrlPreviewer(
            config.server_name,
            downloader,
            OEmbedProviders(previews.oembed_endpoints),
            UrlCacheStore(database),
            media_store,
            thumbnails,
            parse_pool,
            self.reactor,
        )

    def _add_providers(self, media_io: ThreadPool) -> list[ProviderSlot]:
        """The configured storage providers, each a child service."""
        slots: list[ProviderSlot] = []
        for entry in self.config.media_storage_providers:
            provider = create_provider(entry.backend, media_io, self.reactor)
            if any(slot.provider.name == provider.name for slot in slots):
                raise ConfigError("media_storage_providers", f"{provider.name} is listed twice")
            slots.append(
                ProviderSlot(
                    provider, entry.store_local, entry.store_remote, entry.store_synchronous
                )
            )
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
        return slots

    def _site(
        self, index: int, handlers: Handlers, repository: MediaRepository, ports: ListeningPorts
    ) -> MediaSite:
        """The site of listener ``index``, to be served on its sockets."""
        config = self.config
        listener = config.listeners[index]
        site = MediaSite(
            build_tree(listener, handlers, config.enable_metrics),
            self.reactor,
            max_upload_size=config.max_upload_size,
            x_forwarded=listener.x_forwarded,
            abandon_upload=repository.abandon_upload,
        )
        tls = None
        if listener.tls:
            if not config.tls_certificate_path or not config.tls_private_key_path:
                raise ConfigError(
                    "tls_certificate_path", "a listener has tls: true but no certificate"
                )
            tls = server_tls_options(config.tls_certificate_path, config.tls_private_key_path)
        ports.serve(index, site, tls)
        return site

    async def _settle_uploads(self, storage: ProviderChain) -> None:
        """Let uploads still arriving finish, or roll them back after the grace period."""
        deadline = time.monotonic() + self.shutdown_grace_seconds
        while storage.uploads_in_progress and time.monotonic() < deadline:
            await task.deferLater(self.reactor, 0.1, lambda: None)
        if storage.uploads_in_progress:
            logger.warning("rolling back %d unfinished uploads", storage.uploads_in_progress)
            storage.abort_all_uploads()
            # Let the removals queued on the I/O pool run.
            await task.deferLater(self.reactor, 0.1, lambda: None)
