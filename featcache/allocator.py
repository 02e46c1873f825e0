"""Keep the memory a replay frees for its next split, instead of handing it back to the system.

A sweep reads, sorts and releases one split after another, arrays of hundreds of MB each. glibc
serves allocations that large with mmap and unmaps them when freed, so each split's arrays land on
fresh pages. On a virtual machine that returns freed pages to its host (free page reporting, as on
Firecracker and many cloud VMs), every fresh page is faulted in again at about 2.4 s per GB here:
up to the time of a dense product per split. With mmap off and no trimming, the next split reuses
the memory the last one freed. The process never holds more at once than before.

`featcache sweep` and `featcache select` ask for it for the life of the command. The Python API's
sweep, select and scores ask for it only while they run (`freed_memory_kept`): glibc's defaults
are set again when the last of them returns, and the freed memory is handed back.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from contextlib import contextmanager

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
TRIM_ABOVE = 2**31 - 1  # bytes free at the top of the heap before any is returned: the largest int
# glibc's defaults (malloc.c), or what the process was started with (its MALLOC_*_ variables)
DEFAULT_MMAP_MAX = 65536
DEFAULT_TRIM_THRESHOLD = 128 * 1024


def _glibc():
    """The C library when it is glibc (mallopt and malloc_trim typed), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):  # musl and other C libraries: left as they are
        return None
    return libc


def keep_freed_memory() -> bool:
    """Ask glibc to serve large allocations from the heap and keep freed memory; False where the C
    library is not glibc (nothing is changed then)."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_ABOVE))


def _environment_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


_HOLDERS = [0]  # calls inside `freed_memory_kept` now (the API may be called from several threads)
_LOCK = threading.Lock()


@contextmanager
def freed_memory_kept():
    """`keep_freed_memory` while the block runs; when the last such block ends, glibc's settings
    (its defaults, or the process's MALLOC_MMAP_MAX_ and MALLOC_TRIM_THRESHOLD_) are set again and
    the free memory is handed back to the system (malloc_trim)."""
    libc = _glibc()
    if libc is None:
        yield
        return
    with _LOCK:
        if _HOLDERS[0] == 0:
            keep_freed_memory()
        _HOLDERS[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            _HOLDERS[0] -= 1
            if _HOLDERS[0] == 0:
                libc.mallopt(M_MMAP_MAX, _environment_int("MALLOC_MMAP_MAX_", DEFAULT_MMAP_MAX))
                libc.mallopt(M_TRIM_THRESHOLD, _environment_int("MALLOC_TRIM_THRESHOLD_", DEFAULT_TRIM_THRESHOLD))
                libc.malloc_trim(0)
