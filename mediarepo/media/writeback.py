"""Starting the disk write of a file's bytes early, while more arrive.

An upload is answered only once its file is fsynced. Left alone, the kernel
keeps the written bytes in the page cache and the final ``fsync`` then
waits for the disk to take all of them at once: for a 20 MiB body that wait
came after the whole body was received, and was most of the upload's time
on a busy disk. ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` hands a range to
the disk now without waiting for it, so the disk works while the rest of the
body is still being received and the final ``fsync`` (which still makes it
durable, metadata included) has only the tail left. Linux only; elsewhere
(or if the call fails) nothing happens and ``fsync`` does all the work, as
before.
"""

from __future__ import annotations

import ctypes
from typing import Any

from mediarepo.media.allocator import libc_function

# Start writing each range at once; don't wait for earlier writes.
_SYNC_FILE_RANGE_WRITE = 2

_sync_file_range: Any = libc_function("sync_file_range")
if _sync_file_range is not None:
    _sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    _sync_file_range.restype = ctypes.c_int


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Ask the kernel to start writing ``length`` bytes of ``fd`` from
    ``offset`` to the disk, without waiting (blocking only if the disk's
    queue is full). Returns whether it was asked; durability still needs
    ``fsync``."""
    if _sync_file_range is None or length <= 0:
        return False
    return bool(_sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE) == 0)
