"""Copy an existing media store to the configured S3 provider.

Idempotent and resumable: a file already in the bucket with the same size is
not sent again, and what was copied is noted in a small SQLite file (by
default beside the media store) so a run that was interrupted resumes
without asking the bucket about every file again. Prints a progress bar and
a summary; exits non-zero if any file could not be copied.

Usage: ``scripts/copy_media_to_s3 -c homeserver.yaml [--bucket B] [--concurrency N]``
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet import defer, task

from mediarepo.errors import ConfigError
from mediarepo.media.providers.s3 import S3Provider
from mediarepo.tools import (
    LOCAL_DIRECTORIES,
    REMOTE_DIRECTORIES,
    Progress,
    format_bytes,
    load_s3_setup,
    walk_store,
)

STATE_FILE = ".mediarepo_s3_copy.sqlite"
# Copies noted per state-file commit.
_COMMIT_EVERY = 50


@attrs.define
class CopySummary:
    copied: int = 0
    copied_bytes: int = 0
    already_there: int = 0
    failed: list[tuple[str, str]] = attrs.Factory(list)


class CopyState:
    """What earlier runs copied: (path, size) pairs in a SQLite file."""

    def __init__(self, path: str, bucket: str, prefix: str) -> None:
        self._db = sqlite3.connect(path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS copied (bucket TEXT NOT NULL, key TEXT NOT NULL,"
            " size INTEGER NOT NULL, PRIMARY KEY (bucket, key))"
        )
        self._bucket = bucket
        self._prefix = prefix
        self._pending = 0

    def copied(self) -> dict[str, int]:
        rows = self._db.execute("SELECT key, size FROM copied WHERE bucket = ?", (self._bucket,))
        return {
            key[len(self._prefix) :]: size for key, size in rows if key.startswith(self._prefix)
        }

    def note(self, relative_path: str, size: int) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO copied (bucket, key, size) VALUES (?, ?, ?)",
            (self._bucket, self._prefix + relative_path, size),
        )
        self._pending += 1
        if self._pending >= _COMMIT_EVERY:
            self.commit()

    def commit(self) -> None:
        self._db.commit()
        self._pending = 0

    def close(self) -> None:
        self.commit()
        self._db.close()


async def copy_store(
    base: str,
    provider: S3Provider,
    directories: Sequence[str],
    state: CopyState,
    concurrency: int,
) -> CopySummary:
    files = walk_store(base, tuple(directories))
    done_before = state.copied()
    todo = [(path, size) for path, size in files if done_before.get(path) != size]
    summary = CopySummary(already_there=len(files) - len(todo))
    progress = Progress(len(todo), sum(size for _, size in todo))
    print(
        f"{len(files)} files in {base}; {summary.already_there} copied by earlier runs,"
        f" {len(todo)} to check and copy ({format_bytes(progress.total_bytes)})",
        file=sys.stderr,
    )
    limit = defer.DeferredSemaphore(concurrency)

    async def one(relative_path: str, size: int) -> None:
        try:
            if await provider.exists(relative_path, size):
                summary.already_there += 1
            else:
                await provider.store(relative_path, os.path.join(base, relative_path))
                summary.copied += 1
                summary.copied_bytes += size
            state.note(relative_path, size)
        except Exception as e:
            summary.failed.append((relative_path, str(e)))
        progress.advance(size)

    await defer.gatherResults([limit.run(one, path, size) for path, size in todo])
    state.commit()
    progress.draw(final=True)
    print(
        f"done in {progress.elapsed():.1f} s: {summary.copied} copied"
        f" ({format_bytes(summary.copied_bytes)}), {summary.already_there} already in the"
        f" bucket, {len(summary.failed)} failed",
        file=sys.stderr,
    )
    for path, error in summary.failed[:20]:
        print(f"  failed: {path}: {error}", file=sys.stderr)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", required=True, help="the server's homeserver.yaml")
    parser.add_argument("--bucket", help="which S3 provider, if several are configured")
    parser.add_argument("--concurrency", type=int, default=8, help="copies at once (8)")
    parser.add_argument(
        "--state", help=f"the resume file (default: {STATE_FILE} in the media store)"
    )
    args = parser.parse_args(argv)
    try:
        config, entry, settings = load_s3_setup(args.config, args.bucket)
    except ConfigError as e:
        print(f"copy_media_to_s3: {e}", file=sys.stderr)
        return 2
    directories = (LOCAL_DIRECTORIES if entry.store_local else ()) + (
        REMOTE_DIRECTORIES if entry.store_remote else ()
    )
    if not directories:
        print("copy_media_to_s3: the provider stores neither local nor remote media",
              file=sys.stderr)  # fmt: skip
        return 2
    state_path = args.state or os.path.join(config.media_store_path, STATE_FILE)

    async def run(reactor: Any) -> None:
        provider = S3Provider(settings, reactor)
        provider.start()
        state = CopyState(state_path, settings.bucket, settings.prefix)
        try:
            summary = await copy_store(
                config.media_store_path, provider, directories, state, max(1, args.concurrency)
            )
        finally:
            state.close()
            provider.stop()
        if summary.failed:
            raise SystemExit(1)

    # react() stops the reactor and exits with the status run() ends with.
    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    return 0
