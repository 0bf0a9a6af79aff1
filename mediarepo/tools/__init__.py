"""Operator tools run from ``scripts/``: moving a media store to S3 and
trimming the local copies once they are safe there.

They read the server's ``homeserver.yaml`` for the media store, the database
and the S3 provider, and use the server's own provider and database code.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

from mediarepo.config import Config, load_config
from mediarepo.config_storage import S3ProviderConfig, StorageProviderConfig
from mediarepo.errors import ConfigError

# The media store's directories, by whose media they hold.
LOCAL_DIRECTORIES = ("local_content", "local_thumbnails")
REMOTE_DIRECTORIES = ("remote_content", "remote_thumbnail")


def load_s3_setup(
    config_path: str, bucket: str | None
) -> tuple[Config, StorageProviderConfig, S3ProviderConfig]:
    """The server's config, its S3 provider entry (the one with ``bucket``,
    if given) and that provider's settings; raises :class:`ConfigError`."""
    config = load_config(config_path)
    for entry in config.media_storage_providers:
        backend = entry.backend
        if isinstance(backend, S3ProviderConfig) and bucket in (None, backend.bucket):
            return config, entry, backend
    wanted = f"with bucket {bucket!r} " if bucket else ""
    raise ConfigError("media_storage_providers", f"no S3 provider {wanted}is configured")


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    raise AssertionError("unreachable")


class Progress:
    """A progress bar on a terminal; a line per tenth of the work otherwise."""

    def __init__(self, total_files: int, total_bytes: int, out: TextIO = sys.stderr) -> None:
        self.total_files = total_files
        self.total_bytes = total_bytes
        self.files = 0
        self.bytes = 0
        self._out = out
        self._tty = out.isatty()
        self._started = time.monotonic()
        self._last_draw = 0.0
        self._last_tenth = -1

    def advance(self, size: int) -> None:
        self.files += 1
        self.bytes += size
        self.draw()

    def draw(self, final: bool = False) -> None:
        fraction = self.files / self.total_files if self.total_files else 1.0
        if self._tty:
            now = time.monotonic()
            if not final and now - self._last_draw < 0.2:
                return
            self._last_draw = now
            width = 30
            filled = int(width * fraction)
            self._out.write(
                f"\r[{'#' * filled}{'.' * (width - filled)}] {self.files}/{self.total_files}"
                f" files, {format_bytes(self.bytes)}/{format_bytes(self.total_bytes)}"
                f", {self.rate()}   "
            )
            if final:
                self._out.write("\n")
        else:
            tenth = int(fraction * 10)
            if tenth == self._last_tenth and not final:
                return
            self._last_tenth = tenth
            self._out.write(
                f"{int(fraction * 100)}%: {self.files}/{self.total_files} files,"
                f" {format_bytes(self.bytes)}\n"
            )
        self._out.flush()

    def rate(self) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-6)
        return f"{format_bytes(self.bytes / elapsed)}/s"

    def elapsed(self) -> float:
        return time.monotonic() - self._started


def walk_store(base: str, directories: tuple[str, ...]) -> list[tuple[str, int]]:
    """(relative path, size) of every file under ``directories`` of the store."""
    found = []
    for top in directories:
        for directory, _subdirs, names in os.walk(os.path.join(base, top)):
            for name in sorted(names):
                path = os.path.join(directory, name)
                try:
                    found.append((os.path.relpath(path, base), os.path.getsize(path)))
                except FileNotFoundError:
                    continue
    return sorted(found)
