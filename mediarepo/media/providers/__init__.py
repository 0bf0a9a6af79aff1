"""Storage backends. Each keeps files under the media store's relative paths."""

from __future__ import annotations

import abc

from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.threadpool import ThreadPool

from mediarepo.config_storage import DirectoryProviderConfig, S3ProviderConfig
from mediarepo.media.responder import Responder


class StorageProvider(abc.ABC):
    """One place media bytes can live; :class:`ProviderChain` chains them."""

    # Identifies the provider in logs and in the queue of pending copies.
    name: str
    # Whether clients may be sent to :meth:`redirect_url` (the config says).
    redirects: bool = False

    # Optional hooks, not abstract: most providers need neither.
    def start(self) -> None:  # noqa: B027
        """Acquire what the provider runs on (a thread pool); called at start-up."""

    def stop(self) -> None:  # noqa: B027
        """Release it again; called at shutdown."""

    @abc.abstractmethod
    async def fetch(self, relative_path: str) -> Responder | None:
        """The file at ``relative_path``, or ``None`` if this provider lacks it."""

    @abc.abstractmethod
    async def exists(self, relative_path: str, size: int | None = None) -> bool:
        """Whether this provider holds ``relative_path`` (of ``size`` bytes, if given)."""

    @abc.abstractmethod
    async def store(self, relative_path: str, local_path: str) -> None:
        """Copy the file at ``local_path`` (on local disk) to ``relative_path``."""

    @abc.abstractmethod
    async def delete(self, relative_path: str) -> None:
        """Remove ``relative_path``; no error if it is absent."""

    async def redirect_url(
        self, relative_path: str, content_type: str, content_disposition: str
    ) -> str | None:
        """A URL serving this provider's copy of ``relative_path`` with these
        response headers, for a client to be redirected to; ``None`` if the
        provider offers none. Whether the copy is there is the caller's
        business."""
        return None

    @abc.abstractmethod
    async def delete_directory(self, relative_path: str) -> None:
        """Remove ``relative_path`` and everything under it (a media's
        thumbnails); no error if it is absent."""


def create_provider(
    config: DirectoryProviderConfig | S3ProviderConfig,
    media_io: ThreadPool,
    reactor: IReactorFromThreads,
) -> StorageProvider:
    """The provider a ``media_storage_providers`` entry describes."""
    # Imported here: boto3 is loaded only when an S3 provider is configured.
    if isinstance(config, S3ProviderConfig):
        from mediarepo.media.providers.s3 import S3Provider

        return S3Provider(config, reactor)
    from mediarepo.media.providers.directory import DirectoryProvider

    return DirectoryProvider(config.directory, media_io, reactor)
