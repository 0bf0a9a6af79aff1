"""Where an upload body goes while it arrives.

The HTTP request hands each chunk of the body to :meth:`UploadSink.write` on
the reactor thread. The sink queues it and writes and hashes it on the media
I/O thread pool, one batch at a time. When too much is queued it pauses the
connection (TCP back-pressure) until the disk catches up, so memory stays
bounded however fast the client sends.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable
from typing import IO

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mediarepo.media.writeback import start_writeback

logger = logging.getLogger(__name__)

# A body up to this size stays in memory until it is made durable.
SMALL_BODY_BYTES = 64 * 1024
# Pause the client above this many queued bytes, resume below the low mark.
_HIGH_WATER = 2 * 1024 * 1024
_LOW_WATER = 512 * 1024
# Once this much is written and not yet handed to the disk, the disk is
# asked to start on it (see mediarepo.media.writeback): the fsync before
# the answer then waits for the last few MiB, not for the whole body.
WRITEBACK_BYTES = 4 * 1024 * 1024


@attrs.frozen
class WrittenUpload:
    """A body fully written to its staging file, not yet made durable:
    whoever publishes it calls ``make_durable`` (blocking, on a pool thread)
    first, in the same trip to the pool as the rest of its file work."""

    temp_path: str
    length: int
    sha256: str
    make_durable: Callable[[], None]


class UploadSink:
    def __init__(
        self,
        temp_path: str,
        media_id: str,
        threadpool: ThreadPool,
        reactor: IReactorFromThreads,
    ) -> None:
        self.temp_path = temp_path
        self.media_id = media_id
        self._threadpool = threadpool
        self._reactor = reactor
        self._file: IO[bytes] | None = None
        self._hash = hashlib.sha256()
        self._queue: list[bytes] = []
        self._queued_bytes = 0
        self._writing = False
        self._write_error: BaseException | None = None
        self._drained: list[defer.Deferred[None]] = []
        self._pause: Callable[[], None] | None = None
        self._resume: Callable[[], None] | None = None
        self._paused = False
        self._closed = False
        self.length = 0
        # Written to the file and not yet handed to the disk (pool thread only).
        self._writeback_from = 0
        self._written = 0

    def set_flow_control(self, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        """How to stop and restart the sender when the queue is long."""
        self._pause, self._resume = pause, resume

    def write(self, data: bytes) -> None:
        """Queue ``data``; called on the reactor thread."""
        if self._closed or self._write_error is not None:
            return
        self._queue.append(data)
        self._queued_bytes += len(data)
        self.length += len(data)
        if self._queued_bytes > _HIGH_WATER and not self._paused and self._pause:
            self._paused = True
            self._pause()
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if self._writing:
            return
        if self._file is None and self.length <= SMALL_BODY_BYTES and not self._closed:
            # Small so far: kept in memory, written with the fsync at the end
            # (one trip to the pool for the whole file instead of two).
            return
        if not self._queue:
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)
            return
        batch, self._queue = self._queue, []
        size = sum(len(chunk) for chunk in batch)
        self._writing = True
        d = deferToThreadPool(self._reactor, self._threadpool, self._write_batch, batch)
        d.addBoth(self._batch_written, size)

    def _write_batch(self, batch: list[bytes]) -> None:
        if self._file is None:
            self._file = open(self.temp_path, "xb")
        for chunk in batch:
            self._hash.update(chunk)
            self._file.write(chunk)
            self._written += len(chunk)
        if self._written - self._writeback_from >= WRITEBACK_BYTES:
            self._file.flush()
            start_writeback(
                self._file.fileno(), self._writeback_from, self._written - self._writeback_from
            )
            self._writeback_from = self._written

    def _batch_written(self, result: Failure | None, size: int) -> None:
        self._writing = False
        self._queued_bytes -= size
        if isinstance(result, Failure):
            self._write_error = result.value
            self._queue = []
            self._queued_bytes = 0
        if self._paused and self._queued_bytes < _LOW_WATER and self._resume:
            self._paused = False
            self._resume()
        self._maybe_flush()

    async def finish(self) -> WrittenUpload:
        """Wait for the queue to reach the file; its length and SHA-256 are
        then known (the fsync and close come with publishing). A small body
        still in memory is hashed here and written by ``make_durable``."""
        if self._write_error is not None:
            raise self._write_error
        if self._file is None and not self._writing and self.length <= SMALL_BODY_BYTES:
            self._closed = True
            for chunk in self._queue:
                self._hash.update(chunk)
            return WrittenUpload(
                self.temp_path, self.length, self._hash.hexdigest(), self._sync_and_close
            )
        if self._writing or self._queue:
            d: defer.Deferred[None] = defer.Deferred()
            self._drained.append(d)
            await d
        if self._write_error is not None:
            raise self._write_error
        self._closed = True
        return WrittenUpload(
            self.temp_path, self.length, self._hash.hexdigest(), self._sync_and_close
        )

    def _sync_and_close(self) -> None:
        """Flush, fsync and close the staging file (blocking)."""
        if self._file is None:
            # A small (or empty) body, still in memory.
            self._file = open(self.temp_path, "xb")
            for chunk in self._queue:
                self._file.write(chunk)
            self._queue = []
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def abort(self) -> defer.Deferred[None]:
        """Drop the body; the temporary file goes once no write is using it.
        The Deferred fires when it has gone (callers need not wait)."""
        self._closed = True
        self._queue = []
        if self._writing:
            drained: defer.Deferred[None] = defer.Deferred()
            self._drained.append(drained)
            return drained.addCallback(lambda _: self._remove_now())
        return self._remove_now()

    def _remove_now(self) -> defer.Deferred[None]:
        if self._file is None:
            # Nothing ever reached the disk (a small body, never published).
            return defer.succeed(None)

        d = deferToThreadPool(
            self._reactor, self._threadpool, remove_staging_file, self.temp_path, self._file
        )
        d.addErrback(lambda f: logger.warning("could not remove %s: %s", self.temp_path, f.value))
        return d


def remove_staging_file(path: str, file: IO[bytes] | None) -> None:
    """Close and remove a staging file (blocking). Closing flushes what is
    buffered, which fails on a full disk: the file goes all the same."""
    try:
        if file is not None:
            try:
                file.close()
            except OSError as e:
                logger.debug("closing %s: %s", path, e)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
