"""The parts a server is made of, built from its config: the file store
and its providers, the row families, the media layer, federation, URL
previews, the resource trees and their sites, and the periodic jobs.

Nothing here starts or stops anything: :class:`~mediarepo.app.MediaServer`
starts the thread pools, the providers and the database first, has the
rest built here, then adds each part that starts or stops as a child
service, in order.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from OpenSSL import crypto
from twisted.internet import ssl
from twisted.python.threadpool import ThreadPool

from mediarepo.accounts import Accounts
from mediarepo.config import Config
from mediarepo.errors import ConfigError
from mediarepo.federation.backoff import BackoffPolicy, DestinationBackoff
from mediarepo.federation.client import FederationClient
from mediarepo.federation.keyring import Keyring
from mediarepo.federation.keys import server_keys_response
from mediarepo.http.admin import AdminHandler
from mediarepo.http.auth import Authenticator, FederationAuthenticator
from mediarepo.http.site import MediaSite
from mediarepo.http.tree import Handlers, build_tree
from mediarepo.media.access import FLUSH_INTERVAL_SECONDS
from mediarepo.media.admin_rules import MediaAdmin
from mediarepo.media.lifecycle import (
    Housekeeping,
    MediaPurger,
    PeriodicJobs,
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
from mediarepo.media.thumbnails import ThumbnailMaker
from mediarepo.media.uploads import LocalUploads
from mediarepo.media.url_previewer import UrlPreviewer
from mediarepo.outbound import NameResolver, OutboundClient
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
from mediarepo.storage.schema import SchemaState
from mediarepo.storage.upload_rows import UploadRows
from mediarepo.storage.url_cache import UrlCacheStore
from mediarepo.storage.user_rows import UserRows
from mediarepo.workers import ListeningPorts

logger = logging.getLogger(__name__)


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


def provider_slots(config: Config, media_io: ThreadPool, reactor: Any) -> list[ProviderSlot]:
    """The configured storage providers, not started."""
    slots: list[ProviderSlot] = []
    for entry in config.media_storage_providers:
        provider = create_provider(entry.backend, media_io, reactor)
        if any(slot.provider.name == provider.name for slot in slots):
            raise ConfigError("media_storage_providers", f"{provider.name} is listed twice")
        slots.append(
            ProviderSlot(provider, entry.store_local, entry.store_remote, entry.store_synchronous)
        )
    return slots


@attrs.frozen
class Groundwork:
    """What a server starts before the rest of its parts are built."""

    config: Config
    # Any: the reactor is used through several of its interfaces.
    reactor: Any
    media_io: ThreadPool
    thumbnail_pool: ThreadPool
    slots: list[ProviderSlot]
    # Its schema prepared.
    database: Database
    schema: SchemaState


@attrs.frozen
class ServerParts:
    """What a server is made of: for its start and stop, and for tools and
    tests to reach."""

    database: Database
    repository: MediaRepository
    uploads: LocalUploads
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
    storage: ProviderChain
    provider_tasks: ProviderTasks
    thumbnails: ThumbnailMaker
    # URL previews' own outbound client, when previews are on.
    preview_client: OutboundClient | None
    jobs: PeriodicJobs


@attrs.frozen
class _FileStore:
    """The local store and the provider chain over it, with what keeps the
    providers' copies and the store's size."""

    local: LocalFiles
    tasks: ProviderTasks
    local_cache: LocalCacheEviction | None
    chain: ProviderChain


def build_parts(
    ground: Groundwork,
    signing_keys: list[Any],
    ports: ListeningPorts,
    *,
    runs_background_jobs: bool,
    preview_name_resolver: NameResolver | None,
) -> ServerParts:
    """Every part above the groundwork, the sites given to ``ports``;
    ``runs_background_jobs`` says whether this instance runs the
    housekeeping, provider task polling and URL cache expiry."""
    config, reactor, database = ground.config, ground.reactor, ground.database
    schema = ground.schema
    files = _file_store(ground)
    storage = files.chain
    media_store = MediaRows(database)
    locks = WorkerLocks(LockRows(database), reactor, config.name_in_tables)
    thumbnails = ThumbnailMaker(
        storage,
        media_store,
        ground.thumbnail_pool,
        reactor,
        sizes=config.thumbnail_sizes,
        max_image_pixels=config.max_image_pixels,
        dynamic=config.dynamic_thumbnails,
        pixel_budget=config.thumbnail_pixel_budget,
        formats=config.thumbnail_formats,
        pending=PendingThumbnailWork(PendingThumbnailRows(database), locks.instance_name, reactor),
    )
    quarantine = QuarantineRows(
        database,
        schema.quarantine_records,
        config.name_in_tables,
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
    accounts = Accounts(UserRows(database), reactor)
    keyring = Keyring(
        KeyRows(database),
        federation_client,
        signing_keys,
        config.federation.trusted_key_servers,
        reactor,
    )
    preview_client, previewer = _url_previews(
        ground, preview_name_resolver, storage, media_store, thumbnails, quarantine
    )
    authenticator = Authenticator(accounts)
    handlers = Handlers.create(
        repository,
        uploads,
        authenticator,
        FederationAuthenticator(
            keyring, config.server_name, config.federation.domain_whitelist, backoff
        ),
        _keys_response(config, signing_keys, reactor),
        AdminHandler(media_admin, RoomMedia(room_events, media_admin), authenticator),
        previewer,
    )
    sites = [
        _site(config, index, handlers, uploads, ports, reactor)
        for index in range(len(config.listeners))
    ]
    jobs = _periodic_jobs(
        ground, files, repository, uploads, retention, runs_background_jobs, previewer
    )
    return ServerParts(
        database=database,
        repository=repository,
        uploads=uploads,
        accounts=accounts,
        federation_client=federation_client,
        notifications=_notifications(database, repository, reactor),
        sites=sites,
        retention=retention,
        local_cache=files.local_cache,
        local_store=files.local,
        media_io=ground.media_io,
        thumbnail_pool=ground.thumbnail_pool,
        storage=storage,
        provider_tasks=files.tasks,
        thumbnails=thumbnails,
        preview_client=preview_client,
        jobs=jobs,
    )


def _file_store(ground: Groundwork) -> _FileStore:
    """The local store, the provider chain over it and the providers, and
    the work owed to providers."""
    config, reactor = ground.config, ground.reactor
    local = LocalFiles(
        config.media_store_path,
        ground.media_io,
        reactor,
        note_reads=config.media_store_max_size is not None,
        admin_contact=config.admin_contact,
    )
    tasks = ProviderTasks(
        {slot.provider.name: slot.provider for slot in ground.slots},
        local,
        ProviderTaskRows(ground.database),
        reactor,
    )
    local_cache = None
    if config.media_store_max_size is not None:
        local_cache = LocalCacheEviction(local, ground.slots, config.media_store_max_size, reactor)
        # Every worker evicts once its writes take the store over the limit.
        local.on_written = local_cache.note_written
        tasks.on_stored = local_cache.note_copied
    return _FileStore(local, tasks, local_cache, ProviderChain(local, ground.slots, tasks, reactor))


def _notifications(
    database: Database, repository: MediaRepository, reactor: Any
) -> PostgresListener | None:
    """Where processes sharing a PostgreSQL database hear of each other's
    changes: downloads waiting for an async upload wake when another
    process completes it; media deleted or quarantined by another process
    stop being served from this one's caches."""
    if database.engine.name != "psycopg2":
        return None
    return PostgresListener(
        database.connect_args,
        {
            CONTENT_CHANNEL: repository.arrivals.announce,
            CHANGED_CHANNEL: repository.media_changed_elsewhere,
        },
        reactor,
    )


def _periodic_jobs(
    ground: Groundwork,
    files: _FileStore,
    repository: MediaRepository,
    uploads: LocalUploads,
    retention: Retention,
    runs_background_jobs: bool,
    previewer: UrlPreviewer | None,
) -> PeriodicJobs:
    sweeps: list[Callable[[], Awaitable[object]]] = [
        uploads.sweep_staging,
        uploads.sweep_expired_reservations,
        repository.resume_thumbnails,
    ]
    if retention.enabled:
        sweeps.append(retention.apply)
    if files.local_cache is not None:
        sweeps.append(files.local_cache.run)
    url_cache_expiry = None
    if previewer is not None and runs_background_jobs:
        url_cache_expiry = UrlCacheExpiry(
            UrlCacheStore(ground.database), files.chain, repository.forget_local, ground.reactor
        )
    return periodic_jobs(
        ground.reactor,
        flush_access_times=repository.access.flush,
        flush_interval_seconds=FLUSH_INTERVAL_SECONDS,
        housekeeping=Housekeeping(sweeps) if runs_background_jobs else None,
        housekeeping_interval_seconds=ground.config.media_housekeeping_interval_ms / 1000,
        run_provider_tasks=files.tasks.run_soon if ground.slots and runs_background_jobs else None,
        url_cache_expiry=url_cache_expiry,
    )


def _keys_response(
    config: Config, signing_keys: list[Any], reactor: Any
) -> Callable[[], dict[str, Any]]:
    """Our ``/_matrix/key/v2/server`` answer, made afresh for each request."""

    def keys_response() -> dict[str, Any]:
        valid_until = int(reactor.seconds() * 1000) + config.federation.key_refresh_interval_ms
        return server_keys_response(
            config.server_name, signing_keys, config.federation.old_signing_keys, valid_until
        )

    return keys_response


def _url_previews(
    ground: Groundwork,
    name_resolver: NameResolver | None,
    storage: ProviderChain,
    media_store: MediaRows,
    thumbnails: ThumbnailMaker,
    quarantine: QuarantineRows,
) -> tuple[OutboundClient | None, UrlPreviewer | None]:
    """URL previews, with their own outbound client (``url_preview_ip_range_*``),
    when they are on."""
    config = ground.config
    previews = config.url_preview
    if not previews.enabled:
        return None, None
    client = OutboundClient(
        ground.reactor, preview_client_settings(previews), name_resolver=name_resolver
    )
    downloader = PreviewDownloader(
        client,
        storage,
        UploadRows(ground.database),
        quarantine,
        ground.reactor,
        max_size=previews.max_spider_size,
        accept_language=previews.accept_language,
        url_blacklist=previews.url_blacklist,
        authenticated_media=config.enable_authenticated_media,
    )
    previewer = UrlPreviewer(
        config.server_name,
        downloader,
        OEmbedProviders(previews.oembed_endpoints),
        UrlCacheStore(ground.database),
        media_store,
        thumbnails,
        ground.media_io,
        ground.reactor,
    )
    return client, previewer


def _site(
    config: Config,
    index: int,
    handlers: Handlers,
    uploads: LocalUploads,
    ports: ListeningPorts,
    reactor: Any,
) -> MediaSite:
    """The site of listener ``index``, given to its sockets."""
    listener = config.listeners[index]
    site = MediaSite(
        build_tree(listener, handlers, config.enable_metrics),
        reactor,
        max_upload_size=config.max_upload_size,
        x_forwarded=listener.x_forwarded,
        abandon_upload=uploads.abandon_upload,
    )
    tls = None
    if listener.tls:
        if not config.tls_certificate_path or not config.tls_private_key_path:
            raise ConfigError("tls_certificate_path", "a listener has tls: true but no certificate")
        tls = server_tls_options(config.tls_certificate_path, config.tls_private_key_path)
    ports.serve(index, site, tls)
    return site
