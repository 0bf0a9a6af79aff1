"""Storage backends. Each keeps files under the media store's relative paths."""

from __future__ import annotations

import abc

from mediarepo.media.responder import Responder


class StorageProvider(abc.ABC):
    """One place media bytes can live; :class:`MediaStorage` chains them."""

    name: str

    @abc.abstractmethod
    async def fetch(self, relative_path: str) -> Responder | None:
        """The file at ``relative_path``, or ``None`` if this provider lacks it."""

    @abc.abstractmethod
    async def store(self, relative_path: str, local_path: str) -> None:
        """Copy the file at ``local_path`` (on local disk) to ``relative_path``."""

    @abc.abstractmethod
    async def delete(self, relative_path: str) -> None:
        """Remove ``relative_path``; no error if it is absent."""

    @abc.abstractmethod
    async def delete_directory(self, relative_path: str) -> None:
        """Remove ``relative_path`` and everything under it (a media's
        thumbnails); no error if it is absent."""
