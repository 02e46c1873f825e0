"""Row-block kernels: head products, shaping and logsumexp run a block of rows at a time on every core.

numpy's elementwise work is single-threaded; whole blocks in a thread per core, with BLAS held to one
thread, keep every core busy, and no (N, K) float64 array is ever held.
"""

from __future__ import annotations

import os
import threading
from typing import Callable

import numpy as np


ROW_BLOCK = 1024  # rows per block of work: one head product of 1024 x D, temporaries of 1024 x K


LSE_BLOCK = 128  # rows per in-place logsumexp pass: small enough to stay in the CPU cache
LSE_PASS = 4 * LSE_BLOCK  # rows per pass of `energy`, each still shifted by its LSE_BLOCK's top


def n_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


_POOL: dict = {}  # the worker threads and the BLAS limiter, made once per process: a sweep calls this hundreds of times
_IN_WORKER = threading.local()
_ONE_CALL_AT_A_TIME = threading.Lock()


def _pool_and_limiter(workers: int):
    if _POOL.get("workers") != workers or _POOL.get("pid") != os.getpid():  # a forked child needs its own threads
        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import ThreadpoolController

        if "pool" in _POOL and _POOL.get("pid") == os.getpid():
            _POOL["pool"].shutdown(wait=True)
        # the controller finds the BLAS libraries once; threadpool_limits() would search for them per call
        _POOL.update(workers=workers, pid=os.getpid(), pool=ThreadPoolExecutor(workers, thread_name_prefix="featcache-rows"),
                     controller=ThreadpoolController())
    return _POOL["pool"], _POOL["controller"]


def map_items(fn: Callable, items: list) -> list:
    """[fn(item) for item in items], on all cores, as `map_jobs` runs blocks (numpy releases the GIL
    in its loops and sorts): for small independent work such as one metric per ood split."""
    results = [None] * len(items)

    def run(start, stop):
        for i in range(start, stop):
            results[i] = fn(items[i])

    map_jobs([(run, len(items))], block=1)
    return results


def map_row_blocks(fn: Callable, n: int, block: int = ROW_BLOCK) -> None:
    """Call fn(start, stop) for every block of rows, on all cores.

    numpy's elementwise work is single-threaded; running whole blocks (product, shaping,
    logsumexp) in a thread per core, with BLAS held to one thread, keeps every core busy.
    Called from inside a block (nested), it runs serially in that thread.
    """
    map_jobs([(fn, n)], block)


def map_jobs(jobs: list[tuple[Callable, int]], block: int = ROW_BLOCK) -> None:
    """`map_row_blocks` of every (fn, n) in `jobs`, their blocks in one queue: a core done with one
    job's last block takes the next job's first, instead of waiting for the other cores to finish
    theirs (with 2 cores, about half a head product of 1024 rows per job). A job's blocks, and so
    its numbers, are those `map_row_blocks` gives it alone."""
    tasks = [(fn, start, min(start + block, n)) for fn, n in jobs for start in range(0, n, block)]
    if getattr(_IN_WORKER, "active", False):  # nested: already one call, with BLAS on one thread
        for fn, start, stop in tasks:
            fn(start, stop)
        return
    pool, controller = _pool_and_limiter(n_workers())

    def run(fn, start, stop):
        _IN_WORKER.active = True
        try:
            fn(start, stop)
        finally:
            _IN_WORKER.active = False

    from concurrent.futures import wait

    # One call at a time in the process, and BLAS on one thread even for one block in this thread:
    # BLAS's thread limit is the process's, so a call ending while another multiplies would let that
    # one's products run threaded, with other rounding than they have alone (threads of a program
    # using the API), and a split's numbers would depend on its size, the cores or --jobs. The cores
    # are all busy with one call.
    with _ONE_CALL_AT_A_TIME, controller.limit(limits=1, user_api="blas"):
        if min(n_workers(), len(tasks)) <= 1:  # one block, or one core: here, as a worker would
            for task in tasks:
                run(*task)
            return
        futures = [pool.submit(run, *task) for task in tasks]
        wait(futures)  # all of them, so that none still runs when an error is raised
        for future in futures:
            future.result()


def _energy_inplace(z: np.ndarray, T: float, reload: Callable, rows: np.ndarray | None = None,
                    top: np.float64 | None = None, block: int | None = None) -> np.ndarray:
    """T * logsumexp(rows / T) per row, in float64, worked out in the float64 buffer `z` (rows' shape),
    which is overwritten; `rows` is z itself when not given; `top`, rows.max() when already known, or
    one shift per row (an array), the same for each run of `block` rows when `block` is given.

    Shifted by the block's largest value, a scalar (cheaper than a per-row maximum): every term is
    then at most 1, so nothing overflows. Rows whose own maximum lies so far below that their sum
    underflows are redone from `reload(rows)`, the original values, each with its own shift.
    """
    rows = z if rows is None else rows
    if top is None:
        top = np.float64(rows.max())  # a float32 maximum is exact in float64: the same as the cast rows'
    if rows is not z:
        np.copyto(z, rows)  # then the shift in place: faster than numpy's casting subtract
    if np.ndim(top) == 0:
        z -= top  # one shift for all rows
    elif block:
        # a scalar shift per run of rows: numpy subtracts a column row by row, three times slower
        for start in range(0, len(z), block):
            z[start : start + block] -= top[start]
    else:
        z -= top[:, None]  # each row's own
    if T != 1:
        z *= 1.0 / T  # a multiply is several times cheaper than a divide
    sums = np.exp(z, out=z).sum(axis=1)
    low = np.flatnonzero(sums < 1e-250)
    sums[low] = 1.0
    out = top + T * np.log(sums)
    if low.size:
        again = reload(low) / T
        row_top = again.max(axis=1, keepdims=True)
        out[low] = T * (row_top[:, 0] + np.log(np.exp(again - row_top).sum(axis=1)))
    return out


def energy_blocks_shared(jobs: list[tuple[Callable, list]], n: int, T: float = 1.0) -> list[list]:
    """For each (product, finishes) of `jobs`, [(energy, argmax)] for each `finish` of its `product`,
    a block of rows at a time, on all cores; every job's blocks in one queue (`map_jobs`).

    product(start, stop) -> rows start:stop (a head product, computed once per block however many
    configurations use it, in float32 or float64); finish(rows, out, index) writes one
    configuration's float64 logits of `rows` (the split's rows `index`, a slice or indices) into
    `out` (a per-row scale, the bias). Each configuration gets exactly the numbers of its own
    product, finish and logsumexp done alone.

    Every configuration is finished and reduced LSE_BLOCK rows at a time in one buffer that stays in
    the CPU cache, instead of a float64 copy of the whole block per configuration.
    """
    outs = [[(np.empty(n), np.empty(n, dtype=np.int64)) for _ in finishes] for _, finishes in jobs]

    def logits_into(finish, rows, out, index):
        finish(rows, out, index)
        return out

    def blocks_of(product, finishes, job_outs):
        def run(start, stop):
            block = product(start, stop)
            buffer = np.empty((min(LSE_BLOCK, len(block)),) + block.shape[1:])
            for a in range(0, len(block), LSE_BLOCK):
                rows = block[a : a + LSE_BLOCK]
                index = slice(start + a, start + a + len(rows))
                for finish, (scores, predictions) in zip(finishes, job_outs):
                    z = logits_into(finish, rows, buffer[: len(rows)], index)
                    predictions[index] = best = z.argmax(axis=1)
                    # the rows' maxima are where their argmax points (a NaN included): no second pass for the max
                    scores[index] = _energy_inplace(
                        z, T, lambda low, f=finish, rows=rows, first=index.start:
                        logits_into(f, rows[low], np.empty((len(low),) + rows.shape[1:]), first + low),
                        top=z[np.arange(len(z)), best].max())
        return run

    map_jobs([(blocks_of(product, finishes, job_outs), n) for (product, finishes), job_outs in zip(jobs, outs)])
    return outs


def energy(logits: np.ndarray, T: float = 1.0, block_tops: np.ndarray | None = None,
           tops_out: np.ndarray | None = None) -> np.ndarray:
    """T * logsumexp(f / T) per row, in float64.

    Each LSE_BLOCK rows are shifted by their largest value: `block_tops` when already known (they do
    not depend on T, so a sweep of T reads them instead of a pass over the logits), else found; when
    `tops_out` (n_lse_blocks(len(logits)) float64) is given, the tops used are written there. The
    work goes LSE_PASS rows at a time, each row shifted by its own block's top: the same numbers as
    one block at a time, in a quarter of numpy's calls.
    """
    out = np.empty(len(logits))

    def run(start, stop):
        buffer = np.empty((min(LSE_PASS, stop - start), logits.shape[1]))
        for a in range(start, stop, LSE_PASS):
            b = min(a + LSE_PASS, stop)
            first, last = a // LSE_BLOCK, -(-b // LSE_BLOCK)
            if block_tops is None:
                tops = np.array([logits[g : min(g + LSE_BLOCK, b)].max() for g in range(a, b, LSE_BLOCK)], np.float64)
            else:
                tops = block_tops[first:last]
            if tops_out is not None:
                tops_out[first:last] = tops
            out[a:b] = _energy_inplace(buffer[: b - a], T, lambda low, a=a: logits[a + low].astype(np.float64),
                                       rows=logits[a:b], top=np.repeat(tops, LSE_BLOCK)[: b - a], block=LSE_BLOCK)

    map_row_blocks(run, len(logits))
    return out


def n_lse_blocks(n: int) -> int:
    """How many LSE_BLOCK-row blocks `energy` shifts n rows in: the length of its block tops."""
    return -(-n // LSE_BLOCK)


def clip_above(x, c: np.generic) -> np.ndarray:
    """min(x, c) elementwise, for a numpy scalar c: np.minimum(x, c) to the bit, its dtype, zeros'
    signs and NaN included. numpy runs a scalar operand through a loop about 2.5 times slower than a
    row broadcast down the rows, so c goes in as a row of the result's dtype."""
    x = np.asarray(x)
    return np.minimum(x, np.full(x.shape[-1:], c, dtype=np.result_type(x, c)))


def row_reduce(fn: Callable, n: int, block: int = ROW_BLOCK) -> np.ndarray:
    """fn(start, stop) -> one float64 per row, over all rows, `block` rows at a time on all cores."""
    out = np.empty(n)

    def run(start, stop):
        out[start:stop] = fn(start, stop)

    map_row_blocks(run, n, block)
    return out
