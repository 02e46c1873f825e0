"""Memory for a replay's large arrays: keep what it frees for its next split instead of handing it
back to the system (`keep_freed_memory`), and fault a new array's pages in on every core
(`faulted_empty`).

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
import mmap
import sys
import threading

import numpy as np

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


FAULT_IN_PARALLEL_BYTES = 32 << 20  # below this, faulting in the pages costs less than starting threads


def faulted_empty(shape, dtype) -> np.ndarray:
    """np.empty(shape, dtype) whose pages are already faulted in, on every core at once.

    The first write to a fresh page makes the kernel zero it, and a virtual machine's host back it:
    about 2 s per GB on a virtual machine whose memory was idle (free page reporting hands it back
    to the host), four times as long as reading and hashing the same bytes of a cache. Reading a
    split into a new array pays that in one thread; spread over the cores, it takes a fraction.
    Pages already in use (memory a replay freed and reuses) cost one write each.
    """
    out = np.empty(shape, dtype)
    from featcache.methods.kernels import n_workers

    workers = n_workers()
    if out.nbytes < FAULT_IN_PARALLEL_BYTES or workers < 2:
        return out
    flat = out.reshape(-1).view(np.uint8)
    page = mmap.PAGESIZE
    bounds = [flat.size * i // workers // page * page for i in range(workers)] + [flat.size]
    # a strided assignment of a scalar releases the GIL, so the threads fault pages at the same time
    threads = [threading.Thread(target=flat[a:b:page].fill, args=(0,)) for a, b in zip(bounds, bounds[1:])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return out
