"""A full media store: ``ENOSPC`` or ``EDQUOT`` on any write.

Every write path (staging an upload, linking it into place, thumbnails,
remote media, files brought back from a provider) turns these into
:class:`~mediarepo.errors.InsufficientStorageError` through one
:class:`StorageFullReporter`, which also does the logging. A full disk
fails every write until someone frees space, so a traceback per request
would bury the log: the first failure is logged with its traceback, later
ones as one line at most every ``WARNING_INTERVAL_SECONDS`` (saying how many
were not logged), and every one is counted in
``mediarepo_storage_full_total``.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter
from twisted.internet.interfaces import IReactorTime

from mediarepo.errors import InsufficientStorageError

logger = logging.getLogger(__name__)

STORAGE_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
WARNING_INTERVAL_SECONDS = 60.0

storage_full_failures = Counter(
    "mediarepo_storage_full_total", "Writes refused because the media store was full", ["write"]
)


def is_storage_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in STORAGE_FULL_ERRNOS


class StorageFullReporter:
    def __init__(self, clock: IReactorTime, admin_contact: str | None = None) -> None:
        self._clock = clock
        self._admin_contact = admin_contact
        self._logged_traceback = False
        self._last_warning = 0.0
        self._unlogged = 0

    def error(self, cause: OSError, write: str) -> InsufficientStorageError:
        """Note ``cause`` (a storage-full error during ``write``, such as
        "upload") and return the error to raise for it."""
        self.note(cause, write)
        return self.exception()

    def exception(self) -> InsufficientStorageError:
        return InsufficientStorageError(self._admin_contact)

    def note(self, cause: OSError, write: str) -> None:
        """Count and log ``cause``, for a write whose failure is not the
        request's (a copy kept on the side)."""
        storage_full_failures.labels(write).inc()
        now = self._clock.seconds()
        if not self._logged_traceback:
            self._logged_traceback = True
            self._last_warning = now
            logger.error(
                "the media store is full (%s): %s; writes fail with 507 until space is freed",
                write,
                cause,
                exc_info=cause,
            )
        elif now - self._last_warning >= WARNING_INTERVAL_SECONDS:
            self._last_warning = now
            logger.warning(
                "the media store is still full (%s): %s (%d more failed writes not logged)",
                write,
                cause.strerror,
                self._unlogged,
            )
            self._unlogged = 0
        else:
            self._unlogged += 1

    @contextmanager
    def converting(self, write: str) -> Iterator[None]:
        """Raise :class:`InsufficientStorageError` for a storage-full error
        inside the block; any other error passes unchanged."""
        try:
            yield
        except OSError as e:
            if not is_storage_full(e):
                raise
            raise self.error(e, write) from e
