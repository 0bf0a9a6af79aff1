"""The C allocator's part in memory bounds: giving back what large decodes freed.

Pillow holds an image's pixels in 16 MiB blocks. glibc serves such blocks
with ``mmap`` at first, but its threshold for that moves up to the size of
the first one freed, after which they come from the heaps, and each thumbnail
thread has a heap of its own (an arena) that keeps what it once held. After
a burst of large decodes the process then stays at its peak size for good
(measured: 560 MB after eight 31-megapixel PNGs, idle at 62 MB).

:func:`map_large_allocations` pins the threshold, so pixel blocks are always
mapped and unmapped when freed; :func:`return_freed_memory`, called after
each large decode, releases what the heaps still keep (encoder buffers,
smaller images). Both are no-ops without glibc.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

# glibc's mallopt parameter for the mmap threshold.
_M_MMAP_THRESHOLD = -3
# Allocations at least this large are mapped on their own: Pillow's 16 MiB
# blocks are, Python's small objects and the 1 MiB I/O chunks are not.
MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024


def libc_function(name: str) -> Callable[..., int] | None:
    """The C library's function ``name``, or None where there is none (not glibc)."""
    try:
        libc: Any = ctypes.CDLL(None)
        function: Callable[..., int] = getattr(libc, name)
    except (AttributeError, OSError):
        return None
    return function


_malloc_trim = libc_function("malloc_trim")
_mallopt = libc_function("mallopt")


def map_large_allocations() -> None:
    """Serve every allocation of ``MMAP_THRESHOLD_BYTES`` or more with its
    own mapping, returned to the system when freed (process-wide)."""
    if _mallopt is not None and not _mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES):
        logger.warning("could not set the allocator's mmap threshold")


def return_freed_memory() -> None:
    """Give the system the free pages the C heaps keep (blocking; a few
    milliseconds)."""
    if _malloc_trim is not None:
        _malloc_trim(0)
