"""Fault injection: extraction killed with SIGKILL at random moments resumes to a bitwise equal cache."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import featcache
from featcache.cache.schema import SPLIT_ARRAYS
from featcache.cache.writer import partial_path
from featcache.config import load_pipeline
from featcache.errors import FeatcacheError
from featcache.extract.runner import extract
from tests.conftest import REPO, write_pipeline

SPLITS = ["digits_id_train", "digits_val", "digits_test", "letters"]
BATCH = 32


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    pipeline = write_pipeline(tmp, checkpoint="random", overrides={"splits": SPLITS})
    reference = extract(load_pipeline(pipeline), out=tmp / "reference.h5", progress=False, batch_size=BATCH)
    return pipeline, reference


def arrays(path, allow_incomplete=False):
    cache = featcache.open_cache(path)
    out = {}
    for split in cache.splits(allow_incomplete=allow_incomplete):
        out[split.name] = (split.attrs, {k: split[k] for k in SPLIT_ARRAYS})
    return (None if allow_incomplete else cache.fingerprint), out  # a partial has no fingerprint yet


def check_partial_state(partial, reference):
    """What a killed run left: complete splits equal the reference, counted rows too."""
    try:
        _, state = arrays(partial, allow_incomplete=True)
    except FeatcacheError:
        return  # killed while the file itself was being created: the next run starts it afresh
    _, ref = arrays(reference)
    for name, (attrs, values) in state.items():
        written = attrs["n"] if attrs.get("complete") else attrs.get("rows_written", 0)
        for key in SPLIT_ARRAYS:
            assert values[key][:written].tobytes() == ref[name][1][key][:written].tobytes(), (name, key)


@pytest.mark.parametrize("fmt, kills", [("h5", 6), ("zarr", 5)])
def test_sigkill_at_random_moments_then_resume(small, tmp_path, fmt, kills):
    pipeline, reference = small
    out = tmp_path / f"killed.{fmt}"
    partial = partial_path(out)
    command = [sys.executable, "-m", "featcache.cli", "extract", str(pipeline), "--out", str(out),
               "--quiet", "--batch-size", str(BATCH)]
    rng = np.random.default_rng(7 if fmt == "h5" else 8)
    killed = 0
    for attempt in range(kills * 3):
        if killed == kills:
            break
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the interesting moments are once writing has begun
        time.sleep(float(rng.uniform(0.0, 0.8)))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            killed += 1
            assert not out.exists()
            if partial.exists():
                check_partial_state(partial, reference)
        else:
            assert proc.returncode == 0, proc.stderr.read().decode()
            out.unlink() if out.is_file() else __import__("shutil").rmtree(out)  # finished too soon: again
    assert killed == kills
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert out.exists() and not partial.exists()
    fp, got = arrays(out)
    ref_fp, ref = arrays(reference)
    assert fp == ref_fp
    for name in ref:
        assert got[name][0]["complete"]
        for key in SPLIT_ARRAYS:
            assert got[name][1][key].tobytes() == ref[name][1][key].tobytes(), (name, key)
