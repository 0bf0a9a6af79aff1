"""StorageFullReporter: one traceback, then one line a minute, and the error to raise."""

from __future__ import annotations

import errno
import logging

from twisted.internet.task import Clock
from twisted.trial import unittest

from mediarepo.errors import InsufficientStorageError
from mediarepo.media.disk_full import WARNING_INTERVAL_SECONDS, StorageFullReporter
from tests.utils import LogRecords


def _full() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


class StorageFullReporterTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.reporter = StorageFullReporter(self.clock, "mailto:ops@example.org")
        self.logged = LogRecords()
        logger = logging.getLogger("mediarepo.media.disk_full")
        logger.addHandler(self.logged)
        self.addCleanup(logger.removeHandler, self.logged)

    def raise_in_block(self, error: BaseException) -> BaseException:
        try:
            with self.reporter.converting("upload"):
                raise error
        except BaseException as raised:
            return raised
        raise AssertionError("nothing raised")

    def test_error_names_the_contact(self) -> None:
        raised = self.raise_in_block(_full())
        assert isinstance(raised, InsufficientStorageError)
        self.assertEqual(raised.code, 507)
        self.assertEqual(
            raised.to_json(),
            {
                "errcode": "M_RESOURCE_LIMIT_EXCEEDED",
                "error": "The media store is full; try again later",
                "admin_contact": "mailto:ops@example.org",
            },
        )
        self.assertIsInstance(self.raise_in_block(OSError(errno.EDQUOT, "quota")),
                              InsufficientStorageError)  # fmt: skip

    def test_other_errors_pass_unchanged(self) -> None:
        for error in (OSError(errno.EIO, "I/O error"), ValueError("no")):
            self.assertIs(self.raise_in_block(error), error)
        self.assertEqual(self.logged.records, [])

    def test_one_traceback_then_a_line_a_minute(self) -> None:
        for _ in range(5):
            self.raise_in_block(_full())
            self.clock.advance(1)
        self.assertEqual([(r.levelno, bool(r.exc_info)) for r in self.logged.records],
                         [(logging.ERROR, True)])  # fmt: skip
        self.clock.advance(WARNING_INTERVAL_SECONDS)
        self.raise_in_block(_full())
        self.raise_in_block(_full())
        self.assertEqual(len(self.logged.records), 2)
        line = self.logged.records[1]
        self.assertEqual((line.levelno, line.exc_info), (logging.WARNING, None))
        # The four failures between the two lines are counted in the second.
        self.assertIn("4 more failed writes not logged", line.getMessage())
        self.assertNotIn("\n", line.getMessage())
