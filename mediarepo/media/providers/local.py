"""The local media store: ``media_store_path``, always the first provider.

It serves files (small ones from the small-file cache), writes generated
files and copies brought back from other providers through its staging
directory, ``.mediarepo_tmp/``; uploads are staged there too (see
``media/staging.py``). The least recently read files are evicted by
``media/local_cache.py`` when the store is bounded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from typing import IO, TypeVar, cast

from twisted.internet import defer
from twisted.internet.interfaces import IConsumer, IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mediarepo.media.cache import SmallFileCache
from mediarepo.media.disk_full import StorageFullReporter, is_storage_full
from mediarepo.media.paths import MediaPaths
from mediarepo.media.providers import StorageProvider
from mediarepo.media.responder import (
    BytesResponder,
    DiscardingConsumer,
    FileResponder,
    Responder,
)
from mediarepo.media.upload_sink import remove_staging_file

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Files smaller than this are read whole and kept in memory for a while
# (small media and thumbnails: most reads), up to the cache's total.
SMALL_FILE_SIZE = 64 * 1024
SMALL_FILE_CACHE_BYTES = 64 * 1024 * 1024
SMALL_FILE_CACHE_SECONDS = 60.0

# A deletion of this many paths or more (a purge's batch) is split between
# up to DELETE_JOBS jobs of the pool running at once. Each unlink and rmdir
# waits for the disk and, while the reactor is busy serving, for the GIL
# after every call; several threads keep both busy. A purge's batch of 500
# media (1,000 paths) with 8 connections downloading meanwhile took 1.8-4.5 s
# in one job, 0.7-0.9 s in four (docs/performance.rst).
DELETE_JOB_PATHS = 100
DELETE_JOBS = 4

STAGING_DIR = ".mediarepo_tmp"
# Staging files not named after a media ID: generated thumbnails, files
# arriving from other providers.
INTERNAL_STAGING_PREFIXES = frozenset({"generated", "incoming"})


class LocalFiles(StorageProvider):
    name = "local"

    def __init__(
        self,
        base: str,
        threadpool: ThreadPool,
        reactor: IReactorFromThreads,
        *,
        note_reads: bool = False,
        admin_contact: str | None = None,
    ) -> None:
        self.paths = MediaPaths(base)
        self.staging_dir = os.path.join(self.paths.base, STAGING_DIR)
        self.threadpool = threadpool
        self.reactor = reactor
        # Keep access times fresh for the cache eviction (see FileResponder.open).
        self._note_reads = note_reads
        # The reactor is a clock too (the two interfaces are two views of it).
        clock = cast(IReactorTime, reactor)
        self._small_files = SmallFileCache(clock, SMALL_FILE_CACHE_BYTES, SMALL_FILE_CACHE_SECONDS)
        # Every write that finds the disk full reports here.
        self.full = StorageFullReporter(clock, admin_contact)
        # Told (on the reactor thread) how many bytes each new file added.
        self.on_written: Callable[[int], None] | None = None
        os.makedirs(self.staging_dir, exist_ok=True)

    def note_written(self, length: int) -> None:
        """Note a new file of ``length`` bytes (from any thread)."""
        if self.on_written is not None:
            self.reactor.callFromThread(self.on_written, length)

    async def in_pool(self, func: Callable[..., T], *args: object) -> T:
        """Run blocking file work on the media I/O thread pool."""
        return await deferToThreadPool(self.reactor, self.threadpool, func, *args)

    async def fetch(self, relative_path: str) -> Responder | None:
        path = self.paths.absolute(relative_path)
        cached = self._small_files.get(path)
        if cached is not None:
            return BytesResponder(cached)
        responder = await FileResponder.open(
            path,
            self.threadpool,
            self.reactor,
            note_read=self._note_reads,
            read_whole_below=SMALL_FILE_SIZE,
        )
        if isinstance(responder, BytesResponder):
            self._small_files.put(path, responder.data)
        return responder

    # -- bringing files back from other providers -------------------------------

    def bringing_back(self, responder: Responder, relative_path: str) -> Responder:
        """``responder`` (another provider's copy), keeping the bytes it
        streams as the local file at ``relative_path`` once all have passed."""
        return _BringBackResponder(responder, self, relative_path)

    async def bring_back(self, responder: Responder, relative_path: str) -> str:
        """Copy all of ``responder`` to ``relative_path`` here; returns its path."""
        with contextlib.closing(responder):
            bringing = _BringBackResponder(responder, self, relative_path)
            await bringing.write_to_consumer(DiscardingConsumer(), 0, responder.size)
        if bringing.full is not None:
            raise self.full.exception() from bringing.full
        return self.paths.absolute(relative_path)

    async def open_incoming(self) -> tuple[str, IO[bytes]]:
        """A new staging file for bytes arriving from another provider."""
        path = os.path.join(self.staging_dir, f"incoming.{secrets.token_hex(8)}")
        opened: IO[bytes] = await self.in_pool(open, path, "xb")
        return path, opened

    async def keep_incoming(self, temp_path: str, file: IO[bytes], relative_path: str) -> None:
        """Make a complete staging file the local file at ``relative_path``
        (unless another copy got there first)."""
        final = self.paths.absolute(relative_path)

        def keep() -> None:
            try:
                file.flush()
                os.fsync(file.fileno())
                with contextlib.suppress(FileExistsError):
                    in_directory(os.path.dirname(final), lambda: os.link(temp_path, final))
                    self.note_written(os.fstat(file.fileno()).st_size)
            finally:
                remove_staging_file(temp_path, file)

        await self.in_pool(keep)

    async def drop_incoming(self, temp_path: str, file: IO[bytes]) -> None:
        await self.in_pool(remove_staging_file, temp_path, file)

    async def exists(self, relative_path: str, size: int | None = None) -> bool:
        return await self.in_pool(file_exists, self.paths.absolute(relative_path), size)

    async def store(self, relative_path: str, local_path: str) -> None:
        final = self.paths.absolute(relative_path)
        if os.path.abspath(local_path) == final:
            return

        def copy() -> None:
            in_directory(os.path.dirname(final), lambda: shutil.copyfile(local_path, final))
            self.note_written(os.path.getsize(final))

        await self.in_pool(copy)

    async def delete(self, relative_path: str) -> None:
        await self.delete_many([relative_path], [])

    async def delete_directory(self, relative_path: str) -> None:
        await self.delete_many([], [relative_path])

    async def delete_many(self, files: Sequence[str], directories: Sequence[str]) -> None:
        """Delete ``files`` and ``directories`` (with what they hold) in a
        few jobs of the thread pool, not several per media: a purge's would
        otherwise wait their turns in the pool, behind the reads of
        downloads. A large batch is split between ``DELETE_JOBS`` jobs
        running at once (see there)."""
        file_paths = [self.paths.absolute(p) for p in files]
        directory_paths = [self.paths.absolute(p) for p in directories]

        def forget() -> None:
            for path in file_paths:
                self._small_files.forget(path)
            self._small_files.forget_under(directory_paths)

        def remove(file_paths: Sequence[str], directory_paths: Sequence[str]) -> None:
            for path in file_paths:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                self._remove_emptied_directories(path)
            for path in directory_paths:
                shutil.rmtree(path, ignore_errors=True)
                self._remove_emptied_directories(path)

        jobs = max(
            1, min(DELETE_JOBS, (len(file_paths) + len(directory_paths)) // DELETE_JOB_PATHS)
        )
        forget()
        removals = [
            defer.ensureDeferred(
                self.in_pool(remove, file_paths[i::jobs], directory_paths[i::jobs])
            )
            for i in range(jobs)
        ]
        # Every job ends before the deletion does, failed or not.
        results = await defer.DeferredList(removals, consumeErrors=True)
        # Again: a read that finished while the files went may have cached one.
        forget()
        for _, result in results:
            if isinstance(result, Failure):
                result.raiseException()

    def _remove_emptied_directories(self, removed: str) -> None:
        """Remove the directories above ``removed`` that it left empty
        (``local_content/ab/cd``, then ``local_content/ab``...), never a
        top-level one of the store (blocking). A directory a new file is
        being put into may go too: writers make it again (``in_directory``)."""
        directory = os.path.dirname(removed)
        while os.path.dirname(directory) != self.paths.base:
            if not directory.startswith(self.paths.base + os.sep):
                return
            try:
                os.rmdir(directory)
            except FileNotFoundError:
                pass
            except OSError:
                return  # not empty: neither is anything above it
            directory = os.path.dirname(directory)

    async def local_path(self, relative_path: str) -> str | None:
        """The absolute path of ``relative_path`` if the file is here."""
        path = self.paths.absolute(relative_path)
        exists = await self.in_pool(os.path.isfile, path)
        return path if exists else None

    async def write_file(self, relative_path: str, data: bytes) -> str:
        """Write a generated file (a thumbnail) to ``relative_path``, replacing
        any file there atomically: readers see the old file or the new one,
        never a part. Returns the absolute path."""
        final = self.paths.absolute(relative_path)

        def write() -> None:
            temp = os.path.join(self.staging_dir, f"generated.{secrets.token_hex(8)}")
            try:
                with open(temp, "xb") as f:
                    f.write(data)
                in_directory(os.path.dirname(final), lambda: os.replace(temp, final))
                self.note_written(len(data))
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
                raise

        await self.in_pool(write)
        self._small_files.forget(final)
        return final


class _BringBackResponder(Responder):
    def __init__(self, inner: Responder, local: LocalFiles, relative_path: str) -> None:
        self._inner = inner
        self._local = local
        self._relative_path = relative_path
        self.size = inner.size
        # Why the copy could not be kept, if the disk was full.
        self.full: OSError | None = None

    async def write_to_consumer(
        self, consumer: IConsumer, start: int, length: int, copy_to: IO[bytes] | None = None
    ) -> None:
        if start != 0 or length != self.size or copy_to is not None:
            # Part of the file: not enough to keep.
            await self._inner.write_to_consumer(consumer, start, length, copy_to)
            return
        # A full disk stops the copy, never the download it rides on.
        try:
            temp_path, file = await self._local.open_incoming()
        except OSError as e:
            if not is_storage_full(e):
                raise
            self._note_full(e)
            await self._inner.write_to_consumer(consumer, start, length)
            return
        copy = _CopyUnlessFull(file)
        try:
            await self._inner.write_to_consumer(consumer, start, length, cast(IO[bytes], copy))
        except BaseException:
            await self._local.drop_incoming(temp_path, file)
            raise
        if copy.full is not None:
            await self._local.drop_incoming(temp_path, file)
            self._note_full(copy.full)
            return
        try:
            await self._local.keep_incoming(temp_path, file, self._relative_path)
        except OSError as e:
            if not is_storage_full(e):
                raise
            self._note_full(e)
            return
        logger.info("brought %s back to the local media store", self._relative_path)

    def _note_full(self, error: OSError) -> None:
        self.full = error
        self._local.full.note(error, "bring back")

    def close(self) -> None:
        self._inner.close()


class _CopyUnlessFull:
    """Where a copy being brought back is written: a write that finds the
    disk full ends the copying (``full`` says why), not the read."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self.full: OSError | None = None

    def write(self, data: bytes) -> int:
        if self.full is None:
            try:
                self._file.write(data)
            except OSError as e:
                if not is_storage_full(e):
                    raise
                self.full = e
        return len(data)


# How often a new file is put into a directory that a deletion removed
# (having emptied it) between its creation and the file's arrival.
_DIRECTORY_ATTEMPTS = 3


def in_directory(directory: str, create: Callable[[], T]) -> T:
    """Make ``directory`` and run ``create`` (which puts a new entry in it),
    again if a deletion removed the directory in between (blocking)."""
    for attempt in range(_DIRECTORY_ATTEMPTS):
        os.makedirs(directory, exist_ok=True)
        try:
            return create()
        except FileNotFoundError:
            if attempt == _DIRECTORY_ATTEMPTS - 1 or os.path.isdir(directory):
                raise
    raise AssertionError("unreachable")


def file_exists(path: str, size: int | None) -> bool:
    """Whether ``path`` is a file here (of ``size`` bytes, if given); blocking."""
    try:
        stat = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return size is None or stat.st_size == size
