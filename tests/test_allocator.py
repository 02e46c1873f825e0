"""The API keeps freed memory only while it runs (featcache.allocator.freed_memory_kept)."""

import os

import numpy as np
import pytest

from featcache.allocator import _glibc, freed_memory_kept

pytestmark = pytest.mark.skipif(_glibc() is None, reason="glibc only: elsewhere nothing is changed")

MB = 1 << 20


def resident() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_after_freeing(megabytes: int = 256) -> int:
    """Resident bytes once a large array has been filled and freed, above what they were before."""
    before = resident()
    block = np.ones(megabytes * MB, dtype=np.uint8)
    del block
    return resident() - before


def test_freed_memory_is_kept_inside_and_handed_back_after():
    with freed_memory_kept():
        with freed_memory_kept():  # nested (or a second thread's call): the inner end restores nothing
            pass
        assert rss_after_freeing() > 200 * MB  # kept for the next split
    # at the end the free memory went back to the system, and large arrays are unmapped when freed again
    assert rss_after_freeing() < 50 * MB


def test_api_sweeps_keep_freed_memory_and_leave_glibc_as_they_found_it(random_digits, monkeypatch):
    import importlib

    import featcache

    engine = importlib.import_module("featcache.sweep")  # the module, not the API function of that name
    kept, original = [], engine.run_sweep

    def measuring(*args, **kwargs):
        kept.append(rss_after_freeing())
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "run_sweep", measuring)
    featcache.sweep(random_digits["h5"], {"energy": {"T": [1, 2]}, "ash_p": {"p": [60]}}, progress=False)
    assert kept and kept[0] > 200 * MB
    featcache.scores(random_digits["h5"], "energy")
    assert rss_after_freeing() < 50 * MB
