"""Keep the memory a replay frees for its next split, instead of handing it back to the system.

A sweep reads, sorts and releases one split after another, arrays of hundreds of MB each. glibc
serves allocations that large with mmap and unmaps them when freed, so each split's arrays land on
fresh pages. On a virtual machine that returns freed pages to its host (free page reporting, as on
Firecracker and many cloud VMs), every fresh page is faulted in again at about 2.4 s per GB here:
up to the time of a dense product per split. With mmap off and no trimming, the next split reuses
the memory the last one freed. The process never holds more at once than before; it keeps what it
peaked at until it exits, which suits a command, not a library: only `featcache sweep` and
`featcache select` ask for it.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
TRIM_ABOVE = 2**31 - 1  # bytes free at the top of the heap before any is returned: the largest int


def keep_freed_memory() -> bool:
    """Ask glibc to serve large allocations from the heap and keep freed memory; False where the C
    library is not glibc (nothing is changed then)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries: left as they are
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_ABOVE))
