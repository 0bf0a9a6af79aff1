"""Configuration, read from Synapse's ``homeserver.yaml``.

Key names and defaults are Synapse's, so an operator's existing file loads
unchanged. Keys this server does not use are ignored; a bad value of a key it
does use raises :class:`ConfigError` naming the key, which stops start-up with
one line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import yaml

from mediarepo.config_federation import FederationConfig, parse_federation
from mediarepo.config_listeners import (
    MAIN_INSTANCE_NAME,
    STANDALONE_INSTANCE_NAME,
    ListenerConfig,
    parse_process_role,
)
from mediarepo.config_preview import UrlPreviewConfig, parse_url_preview
from mediarepo.config_reader import ConfigReader, RateLimit
from mediarepo.config_storage import (
    StorageProviderConfig,
    parse_media_store_max_size,
    parse_storage_providers,
)
from mediarepo.errors import ConfigError
from mediarepo.identifiers import is_valid_server_name
from mediarepo.outbound.proxy import ProxyAddress, ProxySettings


@attrs.frozen
class DatabaseConfig:
    engine: str  # "sqlite3" or "psycopg2"
    args: Mapping[str, Any]
    cp_min: int
    cp_max: int


@attrs.frozen
class UploadLimit:
    """An entry of ``media_upload_limits``: at most ``max_size`` bytes
    uploaded per user within any ``time_period``."""

    time_period_ms: int
    max_size: int


@attrs.frozen
class ThumbnailSize:
    """One entry of ``thumbnail_sizes``: a size pre-generated for each image."""

    width: int
    height: int
    method: str  # "crop" or "scale"


# Synapse's default ``thumbnail_sizes``.
DEFAULT_THUMBNAIL_SIZES = (
    ThumbnailSize(32, 32, "crop"),
    ThumbnailSize(96, 96, "crop"),
    ThumbnailSize(320, 240, "scale"),
    ThumbnailSize(640, 480, "scale"),
    ThumbnailSize(800, 600, "scale"),
)


# The keys of ``thumbnail_formats``: source formats thumbnailed beyond
# Synapse's JPEG, PNG, GIF and WebP, each on unless turned off.
OPTIONAL_THUMBNAIL_FORMATS = ("heic", "avif", "bmp", "tiff", "video")


@attrs.frozen
class Config:
    server_name: str
    config_dir: str
    public_baseurl: str | None
    listeners: tuple[ListenerConfig, ...]
    database: DatabaseConfig
    media_store_path: str
    max_upload_size: int
    max_image_pixels: int
    enable_authenticated_media: bool
    signing_key_path: str
    log_config: str | None
    enable_metrics: bool
    dynamic_thumbnails: bool
    thumbnail_sizes: tuple[ThumbnailSize, ...]
    # Ours, not Synapse's: threads doing Pillow work.
    thumbnail_threadpool_size: int
    unused_expiration_time_ms: int
    max_pending_media_uploads: int
    rc_media_create: RateLimit
    # Longest period first, as Synapse checks them.
    media_upload_limits: tuple[UploadLimit, ...]
    media_storage_providers: tuple[StorageProviderConfig, ...]
    # Ours: keep the local store under this many bytes by evicting files
    # read least recently that a provider holds; None: no limit.
    media_store_max_size: int | None
    # media_retention: how long unread media is kept; None keeps it for ever.
    local_media_lifetime_ms: int | None
    remote_media_lifetime_ms: int | None
    tls_certificate_path: str | None
    tls_private_key_path: str | None
    federation: FederationConfig
    # worker_app when this process is a Synapse worker (a media repository or
    # generic worker); None for a standalone server.
    worker_app: str | None = None
    # Synapse's instance name: worker_name (or worker_app), else "master".
    instance_name: str = MAIN_INSTANCE_NAME
    pid_file: str | None = None
    # Which instance runs the media background jobs; None: every instance.
    media_instance_running_background_jobs: str | None = None
    # enable_media_repo as the (shared) config says it, for Synapse's main process.
    enable_media_repo: bool = True
    # Synapse's key: who users are told to contact when the server is out of
    # a resource (a full media store).
    admin_contact: str | None = None
    # Ours: how often the periodic jobs (staging sweep, expired reservations,
    # retention, local store eviction) run.
    media_housekeeping_interval_ms: int = 3600 * 1000
    # Ours: source pixels the thumbnail threads may decode at once.
    thumbnail_pixel_budget: int = 32 * 1024 * 1024
    # Ours: which of OPTIONAL_THUMBNAIL_FORMATS are thumbnailed.
    thumbnail_formats: frozenset[str] = frozenset(OPTIONAL_THUMBNAIL_FORMATS)
    # Synapse's http_proxy, https_proxy and no_proxy_hosts (else the
    # environment's): the forward proxy outbound requests go through.
    proxy: ProxySettings | None = None
    # URL previews (config_preview.py).
    url_preview: UrlPreviewConfig = attrs.field(factory=UrlPreviewConfig)
    # For each top-level key, the file it was read from (the last one wins).
    sources: Mapping[str, str] = attrs.field(factory=dict, eq=False)

    @property
    def log_config_key(self) -> str:
        """The key ``log_config`` was read from."""
        return "worker_log_config" if self.worker_app else "log_config"

    @property
    def name_in_tables(self) -> str:
        """Our name in the instance_name columns of Synapse's tables: a
        Synapse worker goes by its worker_name, a standalone server by
        STANDALONE_INSTANCE_NAME."""
        return self.instance_name if self.worker_app else STANDALONE_INSTANCE_NAME

    @property
    def runs_background_jobs(self) -> bool:
        """Whether this instance runs the media background jobs (sweeps,
        retention, eviction, provider tasks), by Synapse's rule."""
        chosen = self.media_instance_running_background_jobs
        return chosen is None or chosen == self.instance_name

    def locate(self, error: ConfigError) -> ConfigError:
        """``error`` naming the file its key came from, when known."""
        if error.source is None:
            source = self.sources.get(_top_level_key(error.key))
            if source is not None:
                return ConfigError(error.key, error.problem, source)
        return error


def _parse_database(root: ConfigReader) -> DatabaseConfig:
    section = root.mapping("database")
    engine = section.string("name", "sqlite3")
    if engine not in ("sqlite3", "psycopg2"):
        raise ConfigError("database.name", f"expected sqlite3 or psycopg2, got {engine!r}")
    args = dict(section.mapping("args")._data)
    # Synapse takes the pool bounds from `args`; accept them beside it too.
    cp_min = args.pop("cp_min", section.raw("cp_min", 5))
    cp_max = args.pop("cp_max", section.raw("cp_max", 10))
    for name, value in (("cp_min", cp_min), ("cp_max", cp_max)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(
                f"database.args.{name}", f"expected a positive integer, got {value!r}"
            )
    if cp_min > cp_max:
        raise ConfigError("database.args.cp_min", "must not exceed cp_max")
    if engine == "sqlite3":
        database = args.get("database", "homeserver.db")
        if not isinstance(database, str) or not database:
            raise ConfigError("database.args.database", "expected a file path")
        if database != ":memory:":
            args["database"] = os.path.abspath(database)
    return DatabaseConfig(engine=engine, args=args, cp_min=cp_min, cp_max=cp_max)


def _parse_proxy(root: ConfigReader, environ: Mapping[str, str]) -> ProxySettings | None:
    """The keys first, then the environment's variables, as Synapse reads them."""
    from_environment = ProxySettings.from_environment(environ) or ProxySettings()
    http_proxy = root.string("http_proxy") or from_environment.http_proxy
    https_proxy = root.string("https_proxy") or from_environment.https_proxy
    if root.raw("no_proxy_hosts") is not None:
        no_proxy = root.strings("no_proxy_hosts")
    else:
        no_proxy = from_environment.no_proxy
    if http_proxy is None and https_proxy is None:
        return None
    for key, value in (("http_proxy", http_proxy), ("https_proxy", https_proxy)):
        if value is not None:
            try:
                ProxyAddress.parse(value)
            except ValueError as e:
                raise ConfigError(key, str(e)) from e
    return ProxySettings(http_proxy=http_proxy, https_proxy=https_proxy, no_proxy=no_proxy)


def _optional_duration(root: ConfigReader, section: str, key: str) -> int | None:
    reader = root.mapping(section)
    if reader.raw(key) is None:
        return None
    return reader.duration_ms(key, "0")


# The shortest media_retention lifetime accepted. Reads reach the database in
# batches, up to a minute late (media.access.FLUSH_INTERVAL_SECONDS, in each
# worker), and retention judges media by the reads recorded there: a lifetime
# near that delay would purge media read moments ago. Five minutes keeps the
# delay a small part of any lifetime; real deployments use days.
MIN_MEDIA_LIFETIME_MS = 5 * 60 * 1000


def _retention_lifetime(root: ConfigReader, key: str) -> int | None:
    lifetime = _optional_duration(root, "media_retention", key)
    if lifetime is not None and lifetime < MIN_MEDIA_LIFETIME_MS:
        raise ConfigError(
            f"media_retention.{key}",
            f"{lifetime} ms is too short; media would be purged right after it was read"
            f" (the minimum is {MIN_MEDIA_LIFETIME_MS // 60000} minutes)",
        )
    return lifetime


def _parse_pixel_budget(root: ConfigReader) -> int:
    budget = root.size("thumbnail_pixel_budget", "32M")
    if budget < 1:
        raise ConfigError("thumbnail_pixel_budget", "must be at least 1")
    return budget


def _parse_thumbnail_formats(root: ConfigReader) -> frozenset[str]:
    section = root.mapping("thumbnail_formats")
    for name in root.raw("thumbnail_formats", {}):
        if name not in OPTIONAL_THUMBNAIL_FORMATS:
            raise ConfigError(
                section.key(str(name)),
                f"unknown format; expected one of {', '.join(OPTIONAL_THUMBNAIL_FORMATS)}",
            )
    return frozenset(name for name in OPTIONAL_THUMBNAIL_FORMATS if section.boolean(name, True))


def _parse_housekeeping_interval(root: ConfigReader) -> int:
    interval = root.duration_ms("media_housekeeping_interval", "1h")
    if interval < 1000:
        raise ConfigError("media_housekeeping_interval", "must be at least 1s")
    return interval


def _parse_rate_limit(root: ConfigReader, key: str, default: RateLimit) -> RateLimit:
    section = root.mapping(key)
    per_second = section.raw("per_second", default.per_second)
    if isinstance(per_second, bool) or not isinstance(per_second, int | float) or per_second < 0:
        raise ConfigError(section.key("per_second"), f"expected a number, got {per_second!r}")
    return RateLimit(float(per_second), section.integer("burst_count", default.burst_count))


def _parse_thumbnail_sizes(root: ConfigReader) -> tuple[ThumbnailSize, ...]:
    if root.raw("thumbnail_sizes") is None:
        return DEFAULT_THUMBNAIL_SIZES
    sizes = []
    for entry in root.entries("thumbnail_sizes"):
        method = entry.string("method", "scale")
        if method not in ("crop", "scale"):
            raise ConfigError(entry.key("method"), f"expected crop or scale, got {method!r}")
        sizes.append(
            ThumbnailSize(
                entry.integer("width", 0, minimum=1), entry.integer("height", 0, minimum=1), method
            )
        )
    return tuple(sizes)


def _parse_upload_limits(root: ConfigReader) -> tuple[UploadLimit, ...]:
    limits = []
    for entry in root.entries("media_upload_limits"):
        for required in ("time_period", "max_size"):
            if entry.raw(required) is None:
                raise ConfigError(entry.key(required), "is required")
        period = entry.duration_ms("time_period", "0")
        if period <= 0:
            raise ConfigError(entry.key("time_period"), "must be longer than zero")
        limits.append(UploadLimit(period, entry.size("max_size", "0")))
    return tuple(sorted(limits, key=lambda limit: limit.time_period_ms, reverse=True))


def parse_config(
    data: Mapping[str, Any], config_dir: str, environ: Mapping[str, str] | None = None
) -> Config:
    """Build a :class:`Config` from the parsed YAML of a ``homeserver.yaml``
    (and the proxy variables of ``environ``, by default the process's).

    Relative paths are resolved as Synapse resolves them: against the working
    directory, except the default signing key, which sits beside the config file.
    """
    if not isinstance(data, Mapping):
        raise ConfigError("(top level)", "expected a mapping of keys")
    root = ConfigReader(data)
    server_name = root.string("server_name")
    if server_name is None:
        raise ConfigError("server_name", "is required")
    if not is_valid_server_name(server_name):
        raise ConfigError("server_name", f"{server_name!r} is not a valid server name")
    proxy = _parse_proxy(root, os.environ if environ is None else environ)
    role = parse_process_role(root)

    def path(key: str, default: str) -> str:
        return os.path.abspath(root.string(key, default) or default)

    def optional_path(key: str) -> str | None:
        value = root.string(key)
        return os.path.abspath(value) if value else None

    max_upload_size = root.size("max_upload_size", "50M")
    storage_providers = parse_storage_providers(root)
    return Config(
        server_name=server_name,
        config_dir=config_dir,
        public_baseurl=root.string("public_baseurl"),
        listeners=role.listeners,
        database=_parse_database(root),
        media_store_path=path("media_store_path", "media_store"),
        max_upload_size=max_upload_size,
        max_image_pixels=root.size("max_image_pixels", "32M"),
        enable_authenticated_media=root.boolean("enable_authenticated_media", True),
        signing_key_path=path(
            "signing_key_path", os.path.join(config_dir, f"{server_name}.signing.key")
        ),
        log_config=role.log_config,
        enable_metrics=root.boolean("enable_metrics", False),
        dynamic_thumbnails=root.boolean("dynamic_thumbnails", False),
        thumbnail_sizes=_parse_thumbnail_sizes(root),
        thumbnail_threadpool_size=root.integer(
            "thumbnail_threadpool_size", max(2, os.cpu_count() or 1), minimum=1
        ),
        unused_expiration_time_ms=root.duration_ms("unused_expiration_time", "24h"),
        max_pending_media_uploads=root.integer("max_pending_media_uploads", 5),
        rc_media_create=_parse_rate_limit(root, "rc_media_create", RateLimit(10, 50)),
        media_upload_limits=_parse_upload_limits(root),
        media_storage_providers=storage_providers,
        media_store_max_size=parse_media_store_max_size(root, storage_providers),
        local_media_lifetime_ms=_retention_lifetime(root, "local_media_lifetime"),
        remote_media_lifetime_ms=_retention_lifetime(root, "remote_media_lifetime"),
        tls_certificate_path=optional_path("tls_certificate_path"),
        tls_private_key_path=optional_path("tls_private_key_path"),
        federation=parse_federation(root),
        worker_app=role.worker_app,
        instance_name=role.instance_name,
        pid_file=role.pid_file,
        media_instance_running_background_jobs=root.string(
            "media_instance_running_background_jobs"
        ),
        enable_media_repo=root.boolean("enable_media_repo", True),
        admin_contact=root.string("admin_contact"),
        media_housekeeping_interval_ms=_parse_housekeeping_interval(root),
        thumbnail_pixel_budget=_parse_pixel_budget(root),
        thumbnail_formats=_parse_thumbnail_formats(root),
        proxy=proxy,
        url_preview=parse_url_preview(root, proxy),
    )


def _top_level_key(key: str) -> str:
    """The top-level key of a place in the config ("worker_listeners[0].port")."""
    return re.split(r"[.\[]", key, maxsplit=1)[0]


def find_config_files(paths: Sequence[str]) -> list[str]:
    """The files the ``-c`` arguments name, as Synapse finds them: a file is
    itself, a directory gives its ``*.yaml`` files in sorted order."""
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            files.extend(
                sorted(
                    os.path.join(path, entry)
                    for entry in os.listdir(path)
                    if entry.endswith(".yaml") and os.path.isfile(os.path.join(path, entry))
                )
            )
        else:
            files.append(path)
    return files


def load_config(config_paths: str | Sequence[str]) -> Config:
    """Read the YAML files (or directories of them) and parse them as one.

    Files are merged in order, as Synapse merges them: a top-level key in a
    later file replaces the whole value an earlier file gave it. Errors name
    the file a key came from. Relative paths inside resolve against the
    working directory; the default signing key sits beside the last file.
    """
    paths = [config_paths] if isinstance(config_paths, str) else list(config_paths)
    files = find_config_files(paths)
    if not files:
        raise ConfigError("(file)", f"no *.yaml files in {', '.join(paths)}")
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for config_path in files:
        try:
            with open(config_path, encoding="utf-8") as config_file:
                data = yaml.safe_load(config_file)
        except OSError as e:
            raise ConfigError("(file)", f"cannot read {config_path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError("(file)", f"{config_path} is not valid YAML: {e}") from e
        if data is None:
            continue
        if not isinstance(data, Mapping):
            raise ConfigError("(top level)", "expected a mapping of keys", config_path)
        merged.update(data)
        sources.update((str(key), config_path) for key in data)
    config_dir = os.path.dirname(os.path.abspath(files[-1]))
    try:
        config = parse_config(merged, config_dir)
    except ConfigError as e:
        raise ConfigError(e.key, e.problem, sources.get(_top_level_key(e.key))) from e
    return attrs.evolve(config, sources=sources)
