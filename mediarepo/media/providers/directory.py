"""A directory elsewhere (another disk, a network mount) keeping a copy of
the media store: Synapse's ``FileStorageProviderBackend`` (module names
``file_system``, ``synapse.rest.media.v1.storage_provider.FileStorageProviderBackend``),
with its ``directory`` option and the same layout."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable
from typing import TypeVar

from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from mediarepo.media.paths import MediaPaths
from mediarepo.media.providers import StorageProvider
from mediarepo.media.providers.local import file_exists
from mediarepo.media.responder import FileResponder, Responder

T = TypeVar("T")


class DirectoryProvider(StorageProvider):
    def __init__(
        self, directory: str, threadpool: ThreadPool, reactor: IReactorFromThreads
    ) -> None:
        self.paths = MediaPaths(directory)
        self.name = f"directory:{self.paths.base}"
        self._threadpool = threadpool
        self._reactor = reactor

    async def in_pool(self, func: Callable[..., T], *args: object) -> T:
        return await deferToThreadPool(self._reactor, self._threadpool, func, *args)

    async def fetch(self, relative_path: str) -> Responder | None:
        return await FileResponder.open(
            self.paths.absolute(relative_path), self._threadpool, self._reactor
        )

    async def exists(self, relative_path: str, size: int | None = None) -> bool:
        return await self.in_pool(file_exists, self.paths.absolute(relative_path), size)

    async def store(self, relative_path: str, local_path: str) -> None:
        final = self.paths.absolute(relative_path)

        def copy() -> None:
            # Copied under a temporary name and renamed: a reader (or a crash)
            # never sees half a file at the final path.
            os.makedirs(os.path.dirname(final), exist_ok=True)
            temp = f"{final}.part-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                shutil.copyfile(local_path, temp)
                os.replace(temp, final)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
                raise

        await self.in_pool(copy)

    async def delete(self, relative_path: str) -> None:
        def remove() -> None:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                os.unlink(self.paths.absolute(relative_path))

        await self.in_pool(remove)

    async def delete_directory(self, relative_path: str) -> None:
        await self.in_pool(shutil.rmtree, self.paths.absolute(relative_path), True)
