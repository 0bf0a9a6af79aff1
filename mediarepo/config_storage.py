"""Configuration of the storage provider chain: ``media_storage_providers``
(with the module names and options of Synapse's providers), Synapse's older
``backup_media_store_path``, and our ``media_store_max_size``."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import attrs

from mediarepo.errors import ConfigError

if TYPE_CHECKING:
    from mediarepo.config_reader import ConfigReader


@attrs.frozen
class DirectoryProviderConfig:
    """Synapse's file-system storage provider: a copy of the store elsewhere."""

    directory: str


@attrs.frozen
class S3ProviderConfig:
    """The S3 storage provider module's ``config`` block, same option names."""

    bucket: str
    region_name: str | None = None
    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    storage_class: str = "STANDARD"
    prefix: str = ""
    threadpool_size: int = 40
    sse_customer_key: str | None = None
    sse_customer_algo: str = "AES256"
    # Our own keys. Encryption by the store with its own or a KMS key
    # (SSE-S3, SSE-KMS), as opposed to SSE-C above.
    server_side_encryption: str | None = None
    sse_kms_key_id: str | None = None
    # Uploads above the threshold go in parts of the chunk size.
    multipart_threshold: int = 8 * 1024 * 1024
    multipart_chunksize: int = 8 * 1024 * 1024
    # Downloads the client allows to be redirected go to the store:
    # ``"presigned"`` (a presigned GET) or a public base URL (a CDN in front
    # of the bucket); ``None``: never.
    download_redirect: str | None = None
    presigned_url_expiry_seconds: int = 3600


PRESIGNED_REDIRECT = "presigned"
# S3 refuses presigned URLs valid for longer than seven days.
_MAX_PRESIGNED_EXPIRY_SECONDS = 7 * 24 * 3600
# S3's smallest part (but the last) of a multipart upload.
_MIN_PART_SIZE = 5 * 1024 * 1024
_SERVER_SIDE_ENCRYPTIONS = ("AES256", "aws:kms", "aws:kms:dsse")


def _download_redirect(options: ConfigReader, sse_customer_key: str | None) -> str | None:
    value = options.string("download_redirect")
    if not value:
        return None
    if value != PRESIGNED_REDIRECT:
        url = urlsplit(value)
        if url.scheme not in ("http", "https") or not url.netloc or url.query or url.fragment:
            raise ConfigError(
                options.key("download_redirect"),
                f"must be {PRESIGNED_REDIRECT!r} or a http(s) base URL, got {value!r}",
            )
    if sse_customer_key is not None:
        # A GET of an SSE-C object needs the key in its headers: a client
        # that is redirected cannot send them.
        raise ConfigError(options.key("download_redirect"), "cannot be used with sse_customer_key")
    return value


@attrs.frozen
class StorageProviderConfig:
    """An entry of ``media_storage_providers``; the flags default to false, as in Synapse."""

    backend: DirectoryProviderConfig | S3ProviderConfig
    store_local: bool = False
    store_remote: bool = False
    store_synchronous: bool = False


# Module names an existing Synapse config may give each built-in provider.
DIRECTORY_PROVIDER_MODULES = frozenset(
    {
        "file_system",
        "synapse.rest.media.v1.storage_provider.FileStorageProviderBackend",
        "synapse.media.storage_provider.FileStorageProviderBackend",
    }
)
S3_PROVIDER_MODULES = frozenset({"s3", "s3_storage_provider.S3StorageProviderBackend"})


def _provider_backend(
    module: str, options: ConfigReader
) -> DirectoryProviderConfig | S3ProviderConfig:
    if module in DIRECTORY_PROVIDER_MODULES:
        directory = options.string("directory")
        if not directory:
            raise ConfigError(options.key("directory"), "is required")
        return DirectoryProviderConfig(os.path.abspath(directory))
    bucket = options.string("bucket")
    if not bucket:
        raise ConfigError(options.key("bucket"), "is required")
    algo = options.string("sse_customer_algo", "AES256") or "AES256"
    sse_customer_key = options.string("sse_customer_key")
    server_side_encryption = options.string("server_side_encryption")
    if server_side_encryption is not None:
        if server_side_encryption not in _SERVER_SIDE_ENCRYPTIONS:
            raise ConfigError(
                options.key("server_side_encryption"),
                f"must be one of {', '.join(_SERVER_SIDE_ENCRYPTIONS)}",
            )
        if sse_customer_key is not None:
            raise ConfigError(
                options.key("server_side_encryption"), "cannot be used with sse_customer_key"
            )
    expiry_ms = options.duration_ms("presigned_url_expiry", "1h")
    if not 1000 <= expiry_ms <= _MAX_PRESIGNED_EXPIRY_SECONDS * 1000:
        raise ConfigError(
            options.key("presigned_url_expiry"), "must be between 1s and 7d (S3's limit)"
        )
    chunksize = options.size("multipart_chunksize", "8M")
    if chunksize < _MIN_PART_SIZE:
        raise ConfigError(options.key("multipart_chunksize"), "must be at least 5M (S3's minimum)")
    return S3ProviderConfig(
        bucket=bucket,
        region_name=options.string("region_name"),
        endpoint_url=options.string("endpoint_url"),
        access_key_id=options.string("access_key_id"),
        secret_access_key=options.string("secret_access_key"),
        session_token=options.string("session_token"),
        storage_class=options.string("storage_class", "STANDARD") or "STANDARD",
        prefix=options.string("prefix", "") or "",
        threadpool_size=options.integer("threadpool_size", 40, minimum=1),
        sse_customer_key=sse_customer_key,
        sse_customer_algo=algo,
        server_side_encryption=server_side_encryption,
        sse_kms_key_id=options.string("sse_kms_key_id"),
        multipart_threshold=options.size("multipart_threshold", "8M"),
        multipart_chunksize=chunksize,
        download_redirect=_download_redirect(options, sse_customer_key),
        presigned_url_expiry_seconds=expiry_ms // 1000,
    )


def parse_storage_providers(root: ConfigReader) -> tuple[StorageProviderConfig, ...]:
    providers = []
    for entry in root.entries("media_storage_providers"):
        module = entry.string("module")
        if module not in DIRECTORY_PROVIDER_MODULES | S3_PROVIDER_MODULES:
            known = ", ".join(sorted(DIRECTORY_PROVIDER_MODULES | S3_PROVIDER_MODULES))
            raise ConfigError(entry.key("module"), f"{module!r} is not one of {known}")
        providers.append(
            StorageProviderConfig(
                backend=_provider_backend(module, entry.mapping("config")),
                store_local=entry.boolean("store_local", False),
                store_remote=entry.boolean("store_remote", False),
                store_synchronous=entry.boolean("store_synchronous", False),
            )
        )
    backup = root.string("backup_media_store_path")
    if backup:
        if providers:
            raise ConfigError(
                "backup_media_store_path", "cannot be used with media_storage_providers"
            )
        providers.append(
            StorageProviderConfig(
                backend=DirectoryProviderConfig(os.path.abspath(backup)),
                store_local=True,
                store_remote=True,
                store_synchronous=root.boolean("synchronous_backup_media_store", False),
            )
        )
    return tuple(providers)


def parse_media_store_max_size(
    root: ConfigReader, providers: tuple[StorageProviderConfig, ...]
) -> int | None:
    if root.raw("media_store_max_size") is None:
        return None
    if not any(p.store_local and p.store_remote for p in providers):
        raise ConfigError(
            "media_store_max_size",
            "needs a storage provider with store_local and store_remote to keep what is evicted",
        )
    return root.size("media_store_max_size", "0")
