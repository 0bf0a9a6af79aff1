"""Responders: a stored file, ready to stream into a Twisted consumer.

A storage provider returns a :class:`Responder`; the HTTP layer decides the
byte range and the headers and then calls :meth:`Responder.write_to_consumer`.
File reads happen on the media I/O thread pool, one chunk at a time, and stop
while the consumer (the client's socket) is full, so a slow client costs no
memory and a large file never sits in memory whole.
"""

from __future__ import annotations

import abc
import os
from typing import IO, Any

from prometheus_client import Counter
from twisted.internet import defer
from twisted.internet.interfaces import IConsumer, IPushProducer, IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

bytes_served = Counter("mediarepo_media_bytes_served_total", "Bytes of media streamed to clients")

# Large enough that a thread hop per chunk costs little, small enough to
# keep per-connection memory low.
CHUNK_SIZE = 256 * 1024


class Responder(abc.ABC):
    """A file that can be streamed; ``size`` is its length in bytes."""

    size: int

    @abc.abstractmethod
    async def write_to_consumer(self, consumer: IConsumer, start: int, length: int) -> None:
        """Write ``length`` bytes from offset ``start`` into ``consumer``.

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
        cls, path: str, threadpool: ThreadPool, reactor: IReactorFromThreads
    ) -> FileResponder | None:
        """Open ``path`` on the thread pool; ``None`` if it does not exist."""

        def do_open() -> tuple[IO[bytes], int] | None:
            try:
                file = open(path, "rb")
            except (FileNotFoundError, NotADirectoryError):
                return None
            return file, os.fstat(file.fileno()).st_size

        opened = await deferToThreadPool(reactor, threadpool, do_open)
        if opened is None:
            return None
        return cls(opened[0], opened[1], threadpool, reactor)

    async def write_to_consumer(self, consumer: IConsumer, start: int, length: int) -> None:
        producer = _ThreadedFileProducer(
            self._file, start, length, consumer, self._threadpool, self._reactor
        )
        await producer.run()

    def close(self) -> None:
        self._file.close()


@implementer(IPushProducer)
class _ThreadedFileProducer:
    def __init__(
        self,
        file: IO[bytes],
        start: int,
        length: int,
        consumer: IConsumer,
        threadpool: ThreadPool,
        reactor: IReactorFromThreads,
    ) -> None:
        self._file = file
        self._offset = start
        self._remaining = length
        self._consumer = consumer
        self._threadpool = threadpool
        self._reactor = reactor
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

    def _read_chunk(self, offset: int, size: int) -> bytes:
        self._file.seek(offset)
        return self._file.read(size)

    def _read_next(self) -> None:
        if self._stopped or self._paused or self._reading or self._done.called:
            return
        if self._remaining <= 0:
            self._done.callback(None)
            return
        self._reading = True
        d = deferToThreadPool(
            self._reactor,
            self._threadpool,
            self._read_chunk,
            self._offset,
            min(CHUNK_SIZE, self._remaining),
        )
        d.addCallbacks(self._got_chunk, self._failed)

    def _got_chunk(self, chunk: bytes) -> None:
        self._reading = False
        if self._stopped:
            return
        if not chunk:
            self._fail(OSError("file ended before its recorded length"))
            return
        self._offset += len(chunk)
        self._remaining -= len(chunk)
        bytes_served.inc(len(chunk))
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
