"""Large upload bodies are handed to the disk while they arrive, so the
fsync before the answer has only the tail left (mediarepo.media.writeback)."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile

from twisted.internet import reactor
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from mediarepo.media import upload_sink
from mediarepo.media.upload_sink import WRITEBACK_BYTES, UploadSink
from mediarepo.media.writeback import start_writeback

CHUNK = 64 * 1024


class StartWritebackTests(unittest.TestCase):
    def test_asks_the_kernel_on_linux(self) -> None:
        with tempfile.TemporaryFile() as f:
            f.write(os.urandom(CHUNK))
            f.flush()
            asked = start_writeback(f.fileno(), 0, CHUNK)
            f.seek(0)
            self.assertEqual(len(f.read()), CHUNK)
        self.assertEqual(asked, sys.platform.startswith("linux"))

    def test_nothing_to_write(self) -> None:
        with tempfile.TemporaryFile() as f:
            self.assertFalse(start_writeback(f.fileno(), 0, 0))


class UploadSinkWritebackTests(unittest.TestCase):
    def setUp(self) -> None:
        self.pool = ThreadPool(minthreads=1, maxthreads=2, name="test-io")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.ranges: list[tuple[int, int]] = []

        def recording(fd: int, offset: int, length: int) -> bool:
            self.ranges.append((offset, length))
            return start_writeback(fd, offset, length)

        self.patch(upload_sink, "start_writeback", recording)

    async def _store(self, body: bytes) -> bytes:
        path = os.path.join(self.directory, "staged")
        sink = UploadSink(path, "M" * 24, self.pool, IReactorFromThreads(reactor))
        for start in range(0, len(body), CHUNK):
            sink.write(body[start : start + CHUNK])
        written = await sink.finish()
        written.make_durable()
        self.assertEqual(written.sha256, hashlib.sha256(body).hexdigest())
        with open(path, "rb") as f:
            return f.read()

    async def test_large_body_handed_over_in_order(self) -> None:
        body = os.urandom(3 * WRITEBACK_BYTES + 12345)
        self.assertEqual(await self._store(body), body)
        # Contiguous ranges from the start, each at least WRITEBACK_BYTES,
        # covering all but the tail that the final fsync writes.
        self.assertGreaterEqual(len(self.ranges), 1)
        expected_offset = 0
        for offset, length in self.ranges:
            self.assertEqual(offset, expected_offset)
            self.assertGreaterEqual(length, WRITEBACK_BYTES)
            expected_offset += length
        self.assertLessEqual(expected_offset, len(body))
        self.assertGreater(expected_offset, len(body) - 2 * WRITEBACK_BYTES)

    async def test_small_body_left_to_fsync(self) -> None:
        body = os.urandom(WRITEBACK_BYTES // 2)
        self.assertEqual(await self._store(body), body)
        self.assertEqual(self.ranges, [])
