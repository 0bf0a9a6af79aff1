"""Wiring: config -> database -> stores -> repository -> resource trees -> listeners."""

from __future__ import annotations

import inspect
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from OpenSSL import crypto
from twisted.internet import defer, ssl, task
from twisted.internet.interfaces import IListeningPort
from twisted.protocols.tls import TLSMemoryBIOFactory
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
from mediarepo.http.tree import Handlers, build_tree, upload_target
from mediarepo.media.access import FLUSH_INTERVAL_SECONDS
from mediarepo.media.admin import MediaAdmin
from mediarepo.media.allocator import map_large_allocations
from mediarepo.media.lifecycle import (
    URL_CACHE_EXPIRY_INTERVAL_SECONDS,
    MediaPurger,
    Retention,
    UrlCacheExpiry,
)
from mediarepo.media.local_cache import LocalCacheEviction
from mediarepo.media.locks import WorkerLocks
from mediarepo.media.oembed import OEmbedProviders
from mediarepo.media.pending import ContentArrivals
from mediarepo.media.pending_thumbnails import PendingThumbnailWork
from mediarepo.media.preview_fetch import PreviewDownloader, preview_client_settings
from mediarepo.media.provider_tasks import ProviderTasks
from mediarepo.media.providers import StorageProvider, create_provider
from mediarepo.media.providers.local import LocalMediaStore
from mediarepo.media.remote import RemoteMediaCache
from mediarepo.media.repository import MediaRepository
from mediarepo.media.rooms import RoomMedia
from mediarepo.media.storage import MediaStorage, ProviderSlot
from mediarepo.media.thumbnails import ThumbnailProvider
from mediarepo.media.url_previewer import UrlPreviewer
from mediarepo.outbound import NameResolver, OutboundClient
from mediarepo.storage.database import Database
from mediarepo.storage.destinations import DestinationStore
from mediarepo.storage.keys import KeyStore
from mediarepo.storage.locks import LockStore
from mediarepo.storage.media import CONTENT_CHANNEL, MediaStore
from mediarepo.storage.media_admin import MediaAdminStore
from mediarepo.storage.notifications import CHANGED_CHANNEL, PostgresListener
from mediarepo.storage.pending_thumbnails import PendingThumbnailStore
from mediarepo.storage.provider_tasks import ProviderTaskStore
from mediarepo.storage.quarantine import QuarantineStore
from mediarepo.storage.rooms import RoomEventStore
from mediarepo.storage.schema import prepare_database
from mediarepo.storage.url_cache import UrlCacheStore
from mediarepo.storage.users import UserStore
from mediarepo.workers import ListeningSocket, open_listening_sockets

logger = logging.getLogger(__name__)

# How long a shutdown waits for uploads still arriving before rolling them back.
SHUTDOWN_GRACE_SECONDS = 10.0
# How long a shutdown waits for each of its other steps (closing
# connections, letting background work settle).
STOP_STEP_SECONDS = 5.0
# Our name in the instance_name columns of Synapse's tables (the stream
# writer of quarantined_media_changes, worker_locks' holders) when we are not
# a Synapse worker with a worker_name.
STANDALONE_INSTANCE_NAME = "mediarepo"
# How often queued storage provider tasks (copies, deletions) are looked at.
PROVIDER_TASKS_INTERVAL_SECONDS = 10.0
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


class MediaServer:
    """One running server. ``start`` and ``stop`` are the whole lifecycle."""

    def __init__(
        self,
        config: Config,
        reactor: Any = None,
        inherited_sockets: Sequence[ListeningSocket] = (),
        runs_housekeeping: bool = True,
        preview_name_resolver: NameResolver | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        # Listening sockets opened by a supervisor (--workers), by listener.
        self._inherited_sockets = list(inherited_sockets)
        # Listening sockets opened or inherited and not yet given to the reactor.
        self._unserved_sockets: list[ListeningSocket] = list(inherited_sockets)
        # With several workers, one runs the periodic jobs for all; of several
        # instances, the one media_instance_running_background_jobs names.
        self._runs_housekeeping = runs_housekeeping and config.runs_background_jobs
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
        # The LISTEN connection for announcements from other processes (PostgreSQL).
        self.notifications: PostgresListener | None = None
        self._access_flush: task.LoopingCall | None = None
        self.retention: Retention | None = None
        self.local_cache: LocalCacheEviction | None = None
        self._providers: list[StorageProvider] = []
        self._provider_tasks: task.LoopingCall | None = None
        self.federation_client: FederationClient | None = None
        # URL previews' own client (url_preview_ip_range_*), when previews are on.
        self.preview_client: OutboundClient | None = None
        # How URL previews look names up (the reactor's resolver when None).
        self._preview_name_resolver = preview_name_resolver
        self.previewer: UrlPreviewer | None = None
        self._url_cache_expiry: task.LoopingCall | None = None
        self.shutdown_grace_seconds = SHUTDOWN_GRACE_SECONDS
        self._stop_started = False
        self._stop_deadline = 0.0

    async def start(self) -> None:
        config = self.config
        reactor = self.reactor
        signing_keys = load_signing_keys(config.signing_key_path)
        # The ports first: a port in use fails the start before the database
        # is touched, and connections wait in the backlog meanwhile.
        sockets = self._inherited_sockets or self._open_sockets()
        self.database = Database(config.database, reactor)
        schema = await prepare_database(self.database)
        self._media_io.start()
        self._thumbnail_pool.start()
        # Pixels freed by thumbnailing go back to the system (see allocator).
        map_large_allocations()

        local = LocalMediaStore(
            config.media_store_path,
            self._media_io,
            reactor,
            note_reads=config.media_store_max_size is not None,
            admin_contact=config.admin_contact,
        )
        storage = self._create_storage(local)
        media_store = MediaStore(self.database)
        # A Synapse worker goes by its worker_name in Synapse's tables.
        worker_name = config.instance_name if config.worker_app else STANDALONE_INSTANCE_NAME
        locks = WorkerLocks(LockStore(self.database), reactor, worker_name)
        thumbnails = ThumbnailProvider(
            storage,
            media_store,
            self._thumbnail_pool,
            reactor,
            sizes=config.thumbnail_sizes,
            max_image_pixels=config.max_image_pixels,
            dynamic=config.dynamic_thumbnails,
            pixel_budget=config.thumbnail_pixel_budget,
            formats=config.thumbnail_formats,
            pending=PendingThumbnailWork(
                PendingThumbnailStore(self.database), locks.instance_name, reactor
            ),
        )
        quarantine = QuarantineStore(
            self.database,
            schema.quarantine_records,
            worker_name,
            reactor,
            synapse_owned=schema.synapse_owned,
        )
        backoff = DestinationBackoff(
            DestinationStore(self.database), BackoffPolicy.from_config(config.federation), reactor
        )
        self.federation_client = FederationClient(
            reactor, config.server_name, signing_keys[0], config.federation, backoff=backoff
        )
        arrivals = ContentArrivals(reactor)
        remote = RemoteMediaCache(
            config, storage, media_store, self.federation_client, thumbnails, quarantine, locks,
            arrivals, reactor,
        )  # fmt: skip
        self.repository = MediaRepository(
            config, storage, media_store, thumbnails, remote, locks, quarantine, arrivals, reactor
        )
        admin_store = MediaAdminStore(
            self.database, config.server_name, schema.avatar_columns, schema.has_profiles
        )
        purger = MediaPurger(
            storage, media_store, admin_store, self.repository.forget_local, reactor
        )
        media_admin = MediaAdmin(
            config.server_name,
            media_store,
            admin_store,
            quarantine,
            purger,
            self.repository.forget_local,
        )
        room_events = RoomEventStore(self.database) if schema.has_room_events else None
        self.retention = Retention(
            purger,
            self.repository.access,
            reactor,
            local_lifetime_ms=config.local_media_lifetime_ms,
            remote_lifetime_ms=config.remote_media_lifetime_ms,
        )
        if self.database.engine.name == "psycopg2":
            # Downloads waiting for an async upload wake when another process
            # sharing the database completes it; media deleted or quarantined
            # by another process stop being served from this one's caches.
            self.notifications = PostgresListener(
                self.database.connect_args,
                {
                    CONTENT_CHANNEL: self.repository.arrivals.announce,
                    CHANGED_CHANNEL: self.repository.media_changed_elsewhere,
                },
                reactor,
            )
            await self.notifications.start()
        self.accounts = Accounts(UserStore(self.database), reactor)
        keyring = Keyring(
            KeyStore(self.database),
            self.federation_client,
            signing_keys,
            config.federation.trusted_key_servers,
            reactor,
        )

        def keys_response() -> dict[str, Any]:
            valid_until = int(reactor.seconds() * 1000) + config.federation.key_refresh_interval_ms
            return server_keys_response(
                config.server_name, signing_keys, config.federation.old_signing_keys, valid_until
            )

        if config.url_preview.enabled:
            self.previewer = self._create_previewer(media_store, thumbnails, quarantine)
        authenticator = Authenticator(self.accounts)
        handlers = Handlers.create(
            self.repository,
            authenticator,
            FederationAuthenticator(
                keyring, config.server_name, config.federation.domain_whitelist, backoff
            ),
            keys_response,
            AdminHandler(media_admin, RoomMedia(room_events, media_admin), authenticator),
            self.previewer,
        )

        for index, listener in enumerate(config.listeners):
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
            tls = None
            if listener.tls:
                if not config.tls_certificate_path or not config.tls_private_key_path:
                    raise ConfigError(
                        "tls_certificate_path", "a listener has tls: true but no certificate"
                    )
                tls = server_tls_options(config.tls_certificate_path, config.tls_private_key_path)
            self._serve([s for s in sockets if s.listener_index == index], site, tls)

        # Every process resumes what a crashed one left, at start.
        thumbnails.resume_pending()
        if self._runs_housekeeping:
            self._sweeper = task.LoopingCall(self._housekeeping)
            self._sweeper.clock = reactor
            self._sweeper.start(config.media_housekeeping_interval_ms / 1000, now=True)
        if self._runs_housekeeping and self.previewer is not None:
            expiry = UrlCacheExpiry(
                UrlCacheStore(self.database), storage, self.repository.forget_local, reactor
            )
            self._url_cache_expiry = task.LoopingCall(self._run_logged, expiry.run)
            self._url_cache_expiry.clock = reactor
            self._url_cache_expiry.start(URL_CACHE_EXPIRY_INTERVAL_SECONDS, now=True)
        self._access_flush = task.LoopingCall(self.repository.access.flush)
        self._access_flush.clock = reactor
        self._access_flush.start(FLUSH_INTERVAL_SECONDS, now=False)
        if self._runs_housekeeping:
            logger.info("media background jobs run in this process")
        elif not config.runs_background_jobs:
            logger.info(
                "media background jobs are left to instance %s",
                config.media_instance_running_background_jobs,
            )
        logger.info("mediarepo serving %s as instance %s", config.server_name,
                    config.instance_name)  # fmt: skip

    def _create_previewer(
        self, media_store: MediaStore, thumbnails: ThumbnailProvider, quarantine: QuarantineStore
    ) -> UrlPreviewer:
        assert self.database is not None and self.repository is not None
        config = self.config
        previews = config.url_preview
        self.preview_client = OutboundClient(
            self.reactor,
            preview_client_settings(previews),
            name_resolver=self._preview_name_resolver,
        )
        storage = self.repository.storage
        downloader = PreviewDownloader(
            self.preview_client,
            storage,
            media_store,
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
            UrlCacheStore(self.database),
            media_store,
            thumbnails,
            storage.local,
            self.reactor,
        )

    async def _run_logged(self, job: Callable[[], Awaitable[object]]) -> None:
        """A periodic job whose failure is logged, not the end of its timer."""
        try:
            await job()
        except Exception:
            logger.exception("%s failed", getattr(job, "__qualname__", job))

    def _create_storage(self, local: LocalMediaStore) -> MediaStorage:
        """The local store, then the configured providers, started."""
        assert self.database is not None
        config = self.config
        slots: list[ProviderSlot] = []
        for entry in config.media_storage_providers:
            provider = create_provider(entry.backend, self._media_io, self.reactor)
            if any(slot.provider.name == provider.name for slot in slots):
                raise ConfigError("media_storage_providers", f"{provider.name} is listed twice")
            slots.append(
                ProviderSlot(
                    provider, entry.store_local, entry.store_remote, entry.store_synchronous
                )
            )
        for slot in slots:
            slot.provider.start()
            self._providers.append(slot.provider)
            logger.info(
                "storage provider %s (store_local: %s, store_remote: %s, synchronous: %s)",
                slot.provider.name, slot.store_local, slot.store_remote, slot.store_synchronous,
            )  # fmt: skip
        tasks = ProviderTasks(
            {slot.provider.name: slot.provider for slot in slots},
            local,
            ProviderTaskStore(self.database),
            self.reactor,
        )
        if slots and self._runs_housekeeping:
            self._provider_tasks = task.LoopingCall(tasks.run_soon)
            self._provider_tasks.clock = self.reactor
            self._provider_tasks.start(PROVIDER_TASKS_INTERVAL_SECONDS, now=True)
        if config.media_store_max_size is not None:
            self.local_cache = LocalCacheEviction(
                local, slots, config.media_store_max_size, self.reactor
            )
            # Every worker evicts once its writes take the store over the limit.
            local.on_written = self.local_cache.note_written
            tasks.on_stored = self.local_cache.note_copied
        return MediaStorage(local, slots, tasks, self.reactor)

    def _open_sockets(self) -> list[ListeningSocket]:
        """Listening sockets of this process's own, one per listener address."""
        sockets = []
        for listening, sock in open_listening_sockets(self.config, shared=False):
            # The descriptor is handed to the reactor in _serve.
            sock.detach()
            sockets.append(listening)
        self._unserved_sockets = sockets
        return sockets

    def _serve(self, sockets: Sequence[ListeningSocket], site: MediaSite, tls: Any) -> None:
        """Serve ``site`` on listening sockets: this process's own, or a
        supervisor's shared with the other workers (the kernel gives each
        connection to one of them)."""
        factory: Any = site if tls is None else TLSMemoryBIOFactory(tls, False, site)
        shared = bool(self._inherited_sockets)
        for listening_socket in sockets:
            family = socket.AF_INET6 if ":" in listening_socket.address else socket.AF_INET
            listening = self.reactor.adoptStreamPort(listening_socket.fd, family, factory)
            if shared:
                # One connection per wake-up: otherwise the first worker to
                # wake takes every pending connection and the others stay idle.
                listening.numberAccepts = 1
            # The reactor has its own copy of the descriptor.
            os.close(listening_socket.fd)
            self._unserved_sockets.remove(listening_socket)
            self.ports.append(listening)
            logger.info("listening on %s port %d%s", listening_socket.address,
                        listening.getHost().port, " (shared)" if shared else "")  # fmt: skip

    async def _housekeeping(self) -> None:
        """Clean up after crashed uploads and expired reservations."""
        assert self.repository is not None
        sweeps: list[Callable[[], Awaitable[object]]] = [
            self.repository.sweep_staging,
            self.repository.sweep_expired_reservations,
            self.repository.resume_thumbnails,
        ]
        if self.retention is not None and self.retention.enabled:
            sweeps.append(self.retention.apply)
        if self.local_cache is not None:
            sweeps.append(self.local_cache.run)
        for sweep in sweeps:
            try:
                await sweep()
            except Exception:
                logger.exception("%s failed", sweep.__name__)

    async def stop(self) -> None:
        """Stop listening, let uploads in flight finish (or roll them back
        after the grace period), then close the pools.

        Each step runs whatever became of the ones before it (a failure is
        logged, not raised) and each wait is bounded, so that stopping ends
        within the grace period and a few seconds, whatever state the
        database, the peers or the clients are in.
        """
        if self._stop_started:
            return
        self._stop_started = True
        # Waits end by this time at the latest (the uploads' grace period,
        # then a step's worth for the rest).
        self._stop_deadline = time.monotonic() + self.shutdown_grace_seconds + STOP_STEP_SECONDS
        await self._stop_step("stop listening", self._stop_listening)
        for timer in (self._sweeper, self._provider_tasks, self._url_cache_expiry):
            if timer is not None and timer.running:
                await self._stop_step("stop a periodic job", timer.stop)
        if self.local_cache is not None:
            await self._stop_step("stop evicting", self.local_cache.stop)
        if self.notifications is not None:
            await self._stop_step("stop LISTEN", self.notifications.stop)
            self.notifications = None
        if self.federation_client is not None:
            await self._stop_step("close federation connections", self.federation_client.close)
            self.federation_client = None
        if self.preview_client is not None:
            await self._stop_step("close URL preview connections", self.preview_client.close)
            self.preview_client = None
        if self.repository is not None:
            await self._stop_step(
                "settle uploads", self._settle_uploads, self.shutdown_grace_seconds + 1
            )
        for site in self.sites:
            await self._stop_step("close client connections", site.close_connections)
        self.sites = []
        if self.repository is not None:
            repository = self.repository
            await self._stop_step("settle thumbnails", repository.thumbnails.settle)
            if self._access_flush is not None and self._access_flush.running:
                await self._stop_step("stop access flushes", self._access_flush.stop)
            await self._stop_step("flush access times", repository.access.flush)
            await self._stop_step("settle provider tasks", repository.storage.tasks.wait_idle)
        if self.database is not None:
            # Blocks until running statements end: each is bounded by the
            # connection's timeouts (see POSTGRES_CONNECT_DEFAULTS).
            await self._stop_step("close the database pool", self.database.close)
            self.database = None
        for provider in self._providers:
            await self._stop_step(f"stop storage provider {provider.name}", provider.stop)
        self._providers = []
        for pool in (self._media_io, self._thumbnail_pool):
            if pool.started:
                await self._stop_step(f"stop the {pool.name} threads", pool.stop)
        logger.info("mediarepo stopped")

    async def _stop_step(
        self, what: str, step: Callable[[], object], seconds: float | None = None
    ) -> None:
        """Run one step of stopping; wait for it at most ``seconds``, by
        default a step's time and not past the stop's deadline."""
        if seconds is None:
            seconds = max(0.1, min(STOP_STEP_SECONDS, self._stop_deadline - time.monotonic()))
        try:
            result: Any = step()
            if isinstance(result, defer.Deferred) or inspect.iscoroutine(result):
                waiting: defer.Deferred[object] = defer.ensureDeferred(result)
                waiting.addTimeout(seconds, self.reactor)
                await waiting
        except defer.TimeoutError:
            logger.warning("stopping: %s did not finish within %.0fs; going on", what, seconds)
        except Exception:
            logger.exception("stopping: %s failed; going on", what)

    async def _stop_listening(self) -> None:
        for unserved in self._unserved_sockets:
            # Opened for a start that failed before serving them.
            os.close(unserved.fd)
        self._unserved_sockets = []
        ports, self.ports = self.ports, []
        stopping = [d for d in (port.stopListening() for port in ports) if d is not None]
        await defer.DeferredList(stopping, consumeErrors=True)

    async def _settle_uploads(self) -> None:
        """Let uploads still arriving finish, or roll them back after the grace period."""
        assert self.repository is not None
        storage = self.repository.storage
        deadline = time.monotonic() + self.shutdown_grace_seconds
        while storage.uploads_in_progress and time.monotonic() < deadline:
            await task.deferLater(self.reactor, 0.1, lambda: None)
        if storage.uploads_in_progress:
            logger.warning("rolling back %d unfinished uploads", storage.uploads_in_progress)
            storage.abort_all_uploads()
            # Let the removals queued on the I/O pool run.
            await task.deferLater(self.reactor, 0.1, lambda: None)

    def start_deferred(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self.start())

    def stop_deferred(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self.stop())
