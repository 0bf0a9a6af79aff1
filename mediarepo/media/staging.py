"""Upload staging: where an upload's body lands before it is media.

A body is written to a temporary file under ``.mediarepo_tmp/`` (named
after its media ID), fsynced, then hard-linked to its final Synapse path.
Linking fails rather than replace an existing file, and the final path
appears whole or not at all. The temporary name stays until the database
row is committed, so a crash in between leaves a trace that
:meth:`UploadStaging.sweep` can clean up.
"""

from __future__ import annotations

import contextlib
import errno
import filecmp
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence

from twisted.internet import defer

from mediarepo.media.paths import (
    UnsafePathError,
    is_valid_media_id,
    local_media_path,
    random_letters,
)
from mediarepo.media.providers.local import (
    INTERNAL_STAGING_PREFIXES,
    LocalFiles,
    in_directory,
)
from mediarepo.media.upload_sink import UploadSink, WrittenUpload

logger = logging.getLogger(__name__)


class FileExistsInStoreError(Exception):
    """The final path of a new file is already taken."""


class UploadStaging:
    """The uploads being received into the local store's staging directory."""

    def __init__(self, local: LocalFiles) -> None:
        self._local = local
        self._in_progress: set[UploadSink] = set()
        # Waiting for the last upload in progress to end (a shutdown).
        self._idle_waiters: list[defer.Deferred[None]] = []

    def begin(self, media_id: str) -> UploadSink:
        """A sink writing to a fresh staging file for ``media_id``."""
        name = f"{media_id}.{random_letters(8)}"
        sink = UploadSink(
            os.path.join(self._local.staging_dir, name),
            media_id,
            self._local.threadpool,
            self._local.reactor,
        )
        self._in_progress.add(sink)
        return sink

    def end(self, sink: UploadSink) -> None:
        self._in_progress.discard(sink)
        if not self._in_progress:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.called:  # not given up on (a timeout)
                    waiter.callback(None)

    def when_idle(self) -> defer.Deferred[None]:
        """Fires once no upload is in progress (at once if none is)."""
        if not self._in_progress:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    def paths_in_use(self) -> set[str]:
        return {sink.temp_path for sink in self._in_progress}

    @property
    def in_progress(self) -> int:
        return len(self._in_progress)

    async def abort_all(self) -> None:
        """Roll back every upload still receiving its body (at shutdown);
        returns once their staging files are gone."""
        removals = []
        for sink in list(self._in_progress):
            removals.append(sink.abort())
            self.end(sink)
        await defer.gatherResults(removals, consumeErrors=True)

    async def publish(
        self, upload: WrittenUpload, relative_path: str, same_as: Sequence[str] = ()
    ) -> tuple[str, bool]:
        """:meth:`place_upload` on the media I/O pool."""
        return await self._local.in_pool(self.place_upload, upload, relative_path, same_as)

    def place_upload(
        self,
        upload: WrittenUpload,
        relative_path: str,
        same_as: Sequence[str] = (),
        *,
        replace_orphan: bool = False,
    ) -> tuple[str, bool]:
        """Make the staged file durable and link it to ``relative_path``
        (blocking: run it on a pool thread); returns the absolute path and
        whether an existing file was linked instead.

        ``same_as`` names files already stored with the same content (by
        SHA-256): the first one still there, and of the right size, is linked
        in its place, so identical media share one set of bytes on disk while
        each keeps its own Synapse path (deleting one never deletes another).
        Raises :class:`FileExistsInStoreError` if something is already there,
        unless ``replace_orphan`` says the caller knows a file there is a
        leftover (an upload into a reservation, under its lock, whose row
        has no content: an earlier upload died between linking its file and
        recording it), which then goes first.
        """
        final = self._local.paths.absolute(relative_path)
        upload.make_durable()
        directory = os.path.dirname(final)

        def link() -> bool:
            if replace_orphan:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(final)
                    logger.warning(
                        "replaced the file an interrupted upload left at %s", relative_path
                    )
            for existing in (self._local.paths.absolute(p) for p in same_as):
                try:
                    if os.stat(existing).st_size == upload.length:
                        os.link(existing, final)
                        return True
                except (FileNotFoundError, NotADirectoryError):
                    continue
                except OSError as e:
                    if e.errno in (errno.EXDEV, errno.EMLINK, errno.EPERM):
                        break  # no hard links here; keep a copy of our own
                    raise
            os.link(upload.temp_path, final)
            return False

        try:
            shared = in_directory(directory, link)
            if not shared:
                self._local.note_written(upload.length)
            return final, shared
        except FileExistsError as e:
            raise FileExistsInStoreError(relative_path) from e
        finally:
            # Make the new directory entry itself durable.
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    @staticmethod
    def remove_staged(temp_path: str) -> None:
        """Remove a staging file once its media is recorded (blocking). A
        failure is only logged: the media is stored, and the staging sweep
        removes the name later."""
        try:
            os.unlink(temp_path)
        except FileNotFoundError:
            pass
        except OSError as e:
            logger.warning("could not remove staging file %s: %s", temp_path, e)

    async def sweep(
        self,
        max_age_seconds: float,
        recorded: Callable[[list[str]], Awaitable[set[str]]],
    ) -> int:
        """Clean up after crashed uploads; returns how many staging files went.

        A staging file older than ``max_age_seconds`` and not in use by
        this process belongs to an upload that died. If its media has no
        content in the database (``recorded`` says which do), the final file
        it may have been published as is an orphan and goes too: the staged
        file itself linked into place, or, for content that was already
        stored, a link to the identical bytes of another media.
        """

        stale_names = await self._local.in_pool(self._stale_names, max_age_seconds)
        busy = self.paths_in_use()
        stale = [
            name for name in stale_names if os.path.join(self._local.staging_dir, name) not in busy
        ]
        if not stale:
            return 0
        media_ids = sorted({name.split(".", 1)[0] for name in stale})
        known = await recorded([m for m in media_ids if is_valid_media_id(m)])
        await self._local.in_pool(self._remove_stale, stale, known)
        logger.info("removed %d stale staging files", len(stale))
        return len(stale)

    def _stale_names(self, max_age_seconds: float) -> list[str]:
        """Staging files untouched for ``max_age_seconds`` (blocking)."""
        cutoff = time.time() - max_age_seconds
        stale = []
        with os.scandir(self._local.staging_dir) as entries:
            for entry in entries:
                try:
                    if entry.stat().st_mtime < cutoff:
                        stale.append(entry.name)
                except FileNotFoundError:
                    continue
        return stale

    def _remove_stale(self, names: list[str], recorded: set[str]) -> None:
        """Remove stale staging files, and what they were published as when
        their media has no content recorded (blocking)."""
        for name in names:
            media_id = name.split(".", 1)[0]
            staged = os.path.join(self._local.staging_dir, name)
            if media_id not in recorded and media_id not in INTERNAL_STAGING_PREFIXES:
                self._remove_orphan(media_id, staged)
            try:
                os.unlink(staged)
            except FileNotFoundError:
                pass

    def _remove_orphan(self, media_id: str, staged: str) -> None:
        """Remove the final file of unrecorded media if it holds the staged bytes."""
        try:
            final = self._local.paths.absolute(local_media_path(media_id))
            if os.path.exists(final) and _same_bytes(final, staged):
                os.unlink(final)
                logger.info("removed orphaned media file for %s", media_id)
        except (UnsafePathError, OSError) as e:
            if getattr(e, "errno", None) not in (None, errno.ENOENT):
                logger.warning("could not check %s: %s", media_id, e)


def _same_bytes(a: str, b: str) -> bool:
    """Whether two files are one, or hold identical bytes (read in a thread)."""
    return os.path.samefile(a, b) or filecmp.cmp(a, b, shallow=False)
