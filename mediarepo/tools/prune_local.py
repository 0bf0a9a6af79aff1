"""Remove local copies of media that is safely in S3 and was not read for N days.

For every local and cached remote media not read within ``--days`` (by
``last_access_ts``, or for never-read local media ``created_ts``), each of its
files on local disk (the content and its thumbnails) is removed once the S3
provider confirms it holds an object of the same size. Files S3 lacks stay.
A later read brings a file back from S3. ``--dry-run`` only counts.

Usage: ``scripts/prune_local_media -c homeserver.yaml --days 30 [--dry-run]``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet import defer, task

from mediarepo.errors import ConfigError
from mediarepo.media.paths import (
    local_media_path,
    local_thumbnail_dir,
    remote_media_path,
    remote_thumbnail_dir,
)
from mediarepo.media.providers.s3 import S3Provider
from mediarepo.storage.database import Database
from mediarepo.storage.media_admin_rows import MediaAdminRows
from mediarepo.tools import format_bytes, load_s3_setup

_PAGE = 500
DAY_MS = 24 * 3600 * 1000


@attrs.define
class PruneSummary:
    removed: int = 0
    freed_bytes: int = 0
    not_in_s3: int = 0
    failed: int = 0


def _files_of(base: str, content: str, thumbnail_dir: str) -> list[tuple[str, int]]:
    """(relative path, size) of a media's files present on local disk."""
    found = []
    candidates = [content]
    try:
        candidates += [
            os.path.join(thumbnail_dir, name)
            for name in sorted(os.listdir(os.path.join(base, thumbnail_dir)))
        ]
    except (FileNotFoundError, NotADirectoryError):
        pass
    for relative in candidates:
        try:
            found.append((relative, os.path.getsize(os.path.join(base, relative))))
        except (FileNotFoundError, NotADirectoryError):
            continue
    return found


async def prune(
    base: str,
    store: MediaAdminRows,
    provider: S3Provider,
    before_ts: int,
    *,
    local: bool,
    remote: bool,
    dry_run: bool,
) -> PruneSummary:
    pruner = _Pruner(base, provider, dry_run)
    if local:
        after = ""
        while media_ids := await store.local_media_unread_page(before_ts, after, _PAGE):
            for media_id in media_ids:
                await pruner.prune(local_media_path(media_id), local_thumbnail_dir(media_id))
            after = media_ids[-1]
    if remote:
        position = ("", "")
        while entries := await store.remote_media_unread_page(before_ts, position, _PAGE):
            for origin, filesystem_id in entries:
                await pruner.prune(
                    remote_media_path(origin, filesystem_id),
                    remote_thumbnail_dir(origin, filesystem_id),
                )
            position = entries[-1]
    return pruner.summary


class _Pruner:
    """Removes a media's local files that S3 holds, counting as it goes."""

    def __init__(self, base: str, provider: S3Provider, dry_run: bool) -> None:
        self._base = base
        self._provider = provider
        self._dry_run = dry_run
        self.summary = PruneSummary()

    async def prune(self, content: str, thumbnail_dir: str) -> None:
        for relative, size in _files_of(self._base, content, thumbnail_dir):
            try:
                if not await self._provider.exists(relative, size):
                    self.summary.not_in_s3 += 1
                    continue
                if not self._dry_run:
                    os.unlink(os.path.join(self._base, relative))
            except Exception as e:
                print(f"  failed: {relative}: {e}", file=sys.stderr)
                self.summary.failed += 1
                continue
            self.summary.removed += 1
            self.summary.freed_bytes += size


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", required=True, help="the server's homeserver.yaml")
    parser.add_argument("--days", type=int, required=True, help="not read for this many days")
    parser.add_argument("--bucket", help="which S3 provider, if several are configured")
    parser.add_argument("--dry-run", action="store_true", help="count, remove nothing")
    args = parser.parse_args(argv)
    if args.days < 0:
        parser.error("--days must not be negative")
    try:
        config, entry, settings = load_s3_setup(args.config, args.bucket)
    except ConfigError as e:
        print(f"prune_local_media: {e}", file=sys.stderr)
        return 2
    before_ts = int(time.time() * 1000) - args.days * DAY_MS

    async def run(reactor: Any) -> None:
        database = Database(config.database, reactor)
        provider = S3Provider(settings, reactor)
        provider.start()
        started = time.monotonic()
        try:
            summary = await prune(
                config.media_store_path,
                MediaAdminRows(database, config.server_name, (), False),
                provider,
                before_ts,
                local=entry.store_local,
                remote=entry.store_remote,
                dry_run=args.dry_run,
            )
        finally:
            provider.stop()
            database.close()
        verb = "would remove" if args.dry_run else "removed"
        print(
            f"done in {time.monotonic() - started:.1f} s: {verb} {summary.removed} local files"
            f" ({format_bytes(summary.freed_bytes)}); {summary.not_in_s3} kept (not in S3),"
            f" {summary.failed} failed",
            file=sys.stderr,
        )
        if summary.failed:
            raise SystemExit(1)

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    return 0
