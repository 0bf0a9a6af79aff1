"""Synapse's ``media_store_path`` layout, byte for byte, with its path guard.

All paths here are relative to the media store; :func:`MediaPaths.absolute`
joins them to the base and checks the result stays inside it.
"""

from __future__ import annotations

import os
import re
import secrets
import string
import threading

# What Synapse lets into any path component.
_PATH_COMPONENT = re.compile(r"\A[A-Za-z0-9_\-.\[\]:]+\Z")
# What the Matrix spec lets into a media ID.
_MEDIA_ID = re.compile(r"\A[A-Za-z0-9_-]{1,255}\Z")

_ID_ALPHABET = string.ascii_letters


class UnsafePathError(ValueError):
    """A path component that could leave the media store or is not Synapse's shape."""


# Random bytes below this map evenly onto the 52 letters (4 x 52 = 208).
_UNBIASED_BELOW = 256 - 256 % len(_ID_ALPHABET)


class _RandomLetters:
    """Letters from the system's randomness, read 4 KiB at a time (a system
    call per letter, or per ID, costs more than the rest of an upload's
    bookkeeping). Bytes that would favour some letters are dropped."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._letters = ""

    def take(self, count: int) -> str:
        with self._lock:
            while len(self._letters) < count:
                self._letters += "".join(
                    _ID_ALPHABET[b % len(_ID_ALPHABET)]
                    for b in secrets.token_bytes(4096)
                    if b < _UNBIASED_BELOW
                )
            taken, self._letters = self._letters[:count], self._letters[count:]
            return taken


_random_letters = _RandomLetters()


def random_letters(count: int) -> str:
    """``count`` letters from the system's randomness, without a system call
    each time (for names and tokens made on every upload)."""
    return _random_letters.take(count)


def random_media_id() -> str:
    """A new local media ID: 24 random letters, as Synapse makes them."""
    return random_letters(24)


def is_valid_media_id(media_id: str) -> bool:
    return bool(_MEDIA_ID.match(media_id))


def _component(value: str) -> str:
    if value in (".", "..") or not _PATH_COMPONENT.match(value):
        raise UnsafePathError(f"unsafe path component {value!r}")
    return value


def _split_id(file_id: str) -> tuple[str, str, str]:
    """``abcdefgh`` -> ``ab``, ``cd``, ``efgh``; needs at least five characters."""
    _component(file_id)
    if len(file_id) < 5:
        raise UnsafePathError(f"file id {file_id!r} is too short for the store layout")
    return file_id[0:2], file_id[2:4], file_id[4:]


def thumbnail_file_name(width: int, height: int, content_type: str, method: str) -> str:
    top, _, sub = content_type.partition("/")
    return _component(f"{width}-{height}-{_component(top)}-{_component(sub)}-{_component(method)}")


def local_media_path(media_id: str) -> str:
    return os.path.join("local_content", *_split_id(media_id))


_URL_CACHE_DATED_ID = re.compile(r"\A\d{4}-\d{2}-\d{2}")


def url_cache_path(media_id: str) -> str:
    """Where a URL-preview download lives: ``url_cache/<date>/<rest>`` for
    Synapse's dated IDs, ``url_cache/ab/cd/rest`` for older ones."""
    return os.path.join("url_cache", *_url_cache_id_parts(media_id))


def _url_cache_id_parts(media_id: str) -> tuple[str, ...]:
    if _URL_CACHE_DATED_ID.match(media_id):
        return _component(media_id[:10]), _component(media_id[11:])
    return _split_id(media_id)


def url_cache_thumbnail_dir(media_id: str) -> str:
    """The thumbnails of a URL-preview download (``url_cache_thumbnails/...``)."""
    return os.path.join("url_cache_thumbnails", *_url_cache_id_parts(media_id))


def url_cache_thumbnail_path(
    media_id: str, width: int, height: int, content_type: str, method: str
) -> str:
    return os.path.join(
        url_cache_thumbnail_dir(media_id), thumbnail_file_name(width, height, content_type, method)
    )


def local_thumbnail_dir(media_id: str) -> str:
    return os.path.join("local_thumbnails", *_split_id(media_id))


def local_thumbnail_path(
    media_id: str, width: int, height: int, content_type: str, method: str
) -> str:
    return os.path.join(
        local_thumbnail_dir(media_id), thumbnail_file_name(width, height, content_type, method)
    )


def remote_media_path(server_name: str, filesystem_id: str) -> str:
    return os.path.join("remote_content", _component(server_name), *_split_id(filesystem_id))


def remote_thumbnail_dir(server_name: str, filesystem_id: str) -> str:
    # Synapse's name has no "s", unlike local_thumbnails.
    return os.path.join("remote_thumbnail", _component(server_name), *_split_id(filesystem_id))


def remote_thumbnail_path(
    server_name: str,
    filesystem_id: str,
    width: int,
    height: int,
    content_type: str,
    method: str,
) -> str:
    return os.path.join(
        remote_thumbnail_dir(server_name, filesystem_id),
        thumbnail_file_name(width, height, content_type, method),
    )


# Top-level directories of the store, by whose media they hold.
_LOCAL_TOP = ("local_content", "local_thumbnails")
_REMOTE_TOP = ("remote_content", "remote_thumbnail")


def is_local_path(relative_path: str) -> bool:
    """Our own media or its thumbnails (not URL previews)."""
    return relative_path.split("/", 1)[0] in _LOCAL_TOP


def is_remote_path(relative_path: str) -> bool:
    """Other servers' media cached here, or its thumbnails."""
    return relative_path.split("/", 1)[0] in _REMOTE_TOP


class MediaPaths:
    """Turns store-relative paths into absolute ones inside ``base``."""

    def __init__(self, base: str) -> None:
        self.base = os.path.abspath(base)

    def absolute(self, relative: str) -> str:
        path = os.path.normpath(os.path.join(self.base, relative))
        if os.path.commonpath([self.base, path]) != self.base or path == self.base:
            raise UnsafePathError(f"{relative!r} leaves the media store")
        return path
