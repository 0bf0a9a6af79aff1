"""Responders: a stored file, ready to stream into a Twisted consumer.

A storage provider returns a :class:`Responder`; the HTTP layer decides the
byte range and the headers and then calls :meth:`Responder.write_to_consumer`.
File reads happen on the media I/O thread pool, one chunk at a time, and stop
while the consumer (the client's socket) is full, so a slow client costs no
memory and a large file never sits in memory whole.
"""

from __future__ import annotations

import abc
import contextlib
import os
import time
from collections.abc import Callable
from typing import IO, Any

from prometheus_client import Counter
from twisted.internet import defer
from twisted.internet.interfaces import IConsumer, IPushProducer, IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

bytes_served = Counter(
    "mediarepo_media_bytes_served_total", "Bytes of media streamed to clients in whole responses"
)

# Large enough that a thread hop per chunk costs little, small enough to
# keep per-connection memory low.
CHUNK_SIZE = 1024 * 1024
# How stale a file's access time may get before a read refreshes it.
READ_NOTE_INTERVAL_SECONDS = 3600.0


class Responder(abc.ABC):
    """A file that can be streamed; ``size`` is its length in bytes."""

    size: int

    @abc.abstractmethod
    async def write_to_consumer(
        self, consumer: IConsumer, start: int, length: int, copy_to: IO[bytes] | None = None
    ) -> None:
        """Write ``length`` bytes from offset ``start`` into ``consumer``,
        and each chunk to ``copy_to`` too if given (on the reading thread).

        Returns when done; raises if the transfer was cut off.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release the underlying file or stream; safe to call twice."""


class FileResponder(Responder):
    """A file opened from local disk."""

    def __init__(
        self, file: IO[bytes], size: int, threadpool: ThreadPool, reactor: IReactorFromThreads
    ) -> None:
        self._file = file
        self.size = size
        self._threadpool = threadpool
        self._reactor = reactor

    @classmethod
    async def open(
        cls,
        path: str,
        threadpool: ThreadPool,
        reactor: IReactorFromThreads,
        *,
        note_read: bool = False,
        read_whole_below: int = 0,
    ) -> Responder | None:
        """Open ``path`` on the thread pool; ``None`` if it does not exist.

        A file smaller than ``read_whole_below`` bytes is read at once and
        closed, in the same trip to the pool, and comes back as a
        :class:`BytesResponder`. With ``note_read``, the file's access time
        is brought up to date (at most hourly, whatever the mount's atime
        options), for a cache that evicts the files read least recently.
        """

        def do_open() -> Responder | None:
            try:
                file = open(path, "rb")
            except (FileNotFoundError, NotADirectoryError):
                return None
            stat = os.fstat(file.fileno())
            if note_read and time.time() - stat.st_atime > READ_NOTE_INTERVAL_SECONDS:
                with contextlib.suppress(OSError):
                    os.utime(file.fileno(), (time.time(), stat.st_mtime))
            if stat.st_size < read_whole_below:
                with file:
                    return BytesResponder(file.read())
            return cls(file, stat.st_size, threadpool, reactor)

        responder: Responder | None = await deferToThreadPool(reactor, threadpool, do_open)
        return responder

    async def write_to_consumer(
        self, consumer: IConsumer, start: int, length: int, copy_to: IO[bytes] | None = None
    ) -> None:
        position = start

        def read(size: int) -> bytes:
            nonlocal position
            self._file.seek(position)
            chunk = self._file.read(size)
            position += len(chunk)
            return chunk

        producer = ThreadedProducer(
            read, length, consumer, self._threadpool, self._reactor, copy_to
        )
        await producer.run()

    def fileno(self) -> int:
        """The open file's descriptor (for sendfile)."""
        return self._file.fileno()

    def close(self) -> None:
        self._file.close()


class BytesResponder(Responder):
    """A small file already in memory: written out in one go."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    async def write_to_consumer(
        self, consumer: IConsumer, start: int, length: int, copy_to: IO[bytes] | None = None
    ) -> None:
        whole = (start, length) == (0, self.size)
        chunk = self.data if whole else self.data[start : start + length]
        if copy_to is not None:
            copy_to.write(chunk)
        consumer.write(chunk)

    def close(self) -> None:
        pass


@implementer(IPushProducer)
class ThreadedProducer:
    """Pushes ``length`` bytes from a blocking ``read(size)`` into a consumer.

    Each read runs on the thread pool, one chunk at a time, and none starts
    while the consumer has paused us: back-pressure reaches the source.
    """

    def __init__(
        self,
        read: Callable[[int], bytes],
        length: int,
        consumer: IConsumer,
        threadpool: ThreadPool,
        reactor: IReactorFromThreads,
        copy_to: IO[bytes] | None = None,
    ) -> None:
        self._read = read
        self._remaining = length
        self._consumer = consumer
        self._threadpool = threadpool
        self._reactor = reactor
        self._copy_to = copy_to
        self._paused = False
        self._reading = False
        self._stopped = False
        self._done: defer.Deferred[None] = defer.Deferred()

    async def run(self) -> None:
        self._consumer.registerProducer(self, True)
        self._read_next()
        try:
            await self._done
        finally:
            self._consumer.unregisterProducer()

    def _read_chunk(self, size: int) -> bytes:
        chunk = self._read(size)
        if self._copy_to is not None and chunk:
            self._copy_to.write(chunk)
        return chunk

    def _read_next(self) -> None:
        if self._stopped or self._paused or self._reading or self._done.called:
            return
        if self._remaining <= 0:
            self._done.callback(None)
            return
        self._reading = True
        d = deferToThreadPool(
            self._reactor, self._threadpool, self._read_chunk, min(CHUNK_SIZE, self._remaining)
        )
        d.addCallbacks(self._got_chunk, self._failed)

    def _got_chunk(self, chunk: bytes) -> None:
        self._reading = False
        if self._stopped:
            return
        if not chunk:
            self._fail(OSError("the file ended before its recorded length"))
            return
        self._remaining -= len(chunk)
        # write() may call pauseProducing() synchronously.
        self._consumer.write(chunk)
        self._read_next()

    def _failed(self, failure: Any) -> None:
        self._reading = False
        self._fail(failure.value)

    def _fail(self, error: BaseException) -> None:
        if not self._done.called:
            self._done.errback(error)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._read_next()

    def stopProducing(self) -> None:
        self._stopped = True
        self._fail(ConnectionError("the client went away"))


@implementer(IConsumer)
class DiscardingConsumer:
    """A consumer that drops what it gets: for reading a responder only for
    its ``copy_to`` side (bringing a provider's file to local disk)."""

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass
