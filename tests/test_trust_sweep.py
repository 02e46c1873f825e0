"""Sweep results can be trusted: a swapped cache stops the sweep, saved progress never changes a number,
--out never replaces a file that is not a results file, and a sweep killed at any moment resumes to the
same bytes."""

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from featcache.cli import main
from featcache.errors import FeatcacheError

GRID = {"energy": {"T": [1, 2]}, "ash_s": {"p": [60, 80]}, "react": {"percentile": [85, 90]}, "msp": None}


def pipeline_for(tmp: Path, base_pipeline: Path, cache: Path, grid=GRID) -> Path:
    spec = yaml.safe_load(base_pipeline.read_text())
    spec["cache"] = str(cache)
    spec["results"] = str(tmp / "results")
    spec["sweep"] = grid
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_cli(*args):
    """Exit status of the featcache CLI run in this process."""
    try:
        main(list(map(str, args)))
    except SystemExit as exc:
        return exc.code or 0
    return 0


def clean_csv(tmp: Path, pipeline: Path) -> bytes:
    out = tmp / "clean" / "sweep.csv"
    assert run_cli("sweep", pipeline, "--out", out, "--quiet") == 0
    return out.read_bytes()


@pytest.fixture
def two_caches(digits, random_digits, tmp_path):
    """A cache path holding the trained digits cache, and the random-weight cache to swap in."""
    path = tmp_path / "cache.h5"
    shutil.copy2(digits["cache"], path)
    other = tmp_path / "other.h5"
    shutil.copy2(random_digits["h5"], other)
    return path, other


# --- a cache replaced while a sweep runs ------------------------------------------------------------------


@pytest.mark.parametrize("jobs", [1, 2])
def test_cache_swapped_between_batches_stops_the_sweep(two_caches, digits, tmp_path, monkeypatch, jobs):
    from featcache.cache.reader import open_cache
    from featcache.grid import batches_by_method
    from featcache.progress import ProgressStore
    from featcache.sweep import run_sweep

    path, other = two_caches
    with open_cache(path) as cache:
        first = cache.fingerprint
    with open_cache(other) as cache:
        second = cache.fingerprint
    assert first != second
    added = ProgressStore.add

    def add_then_swap(self, *args, **kwargs):
        added(self, *args, **kwargs)
        if path.exists() and other.exists():
            os.replace(other, path)  # a teammate puts a new cache at the same path

    monkeypatch.setattr(ProgressStore, "add", add_then_swap)
    # a serial sweep runs one batch; per-method batches here, so that there is a "between batches"
    monkeypatch.setattr(importlib.import_module("featcache.sweep"), "batches_for",
                        lambda configs, parallel: batches_by_method(configs))
    out = tmp_path / "results" / "sweep.csv"
    with pytest.raises(FeatcacheError, match="changed while"):
        run_sweep(GRID, path, out, jobs=jobs, progress=False)
    assert not out.exists()  # no results file mixing two caches
    lines = (out.parent / f".{out.name}.progress.jsonl").read_text().splitlines()
    assert lines and all(json.loads(line)["fingerprint"] == first for line in lines)
    for saved in (out.parent / f".{out.name}.scores").glob("*.npz"):
        with np.load(saved) as npz:
            assert json.loads(str(npz["meta"]))["fingerprint"] == first

    # run again on the new cache: nothing of the old one is used
    monkeypatch.setattr(ProgressStore, "add", added)
    rows = run_sweep(GRID, path, out, jobs=1, progress=False)
    reference = tmp_path / "reference" / "sweep.csv"
    shutil.copy2(path, tmp_path / "fresh.h5")
    run_sweep(GRID, tmp_path / "fresh.h5", reference, jobs=1, progress=False)
    assert out.read_bytes() == reference.read_bytes()
    assert json.loads((out.parent / "sweep.meta.json").read_text())["fingerprint"] == second
    assert len(rows) > 0


def test_cache_swapped_during_select_writes_nothing(two_caches, digits, tmp_path, monkeypatch):
    select = importlib.import_module("featcache.select")  # featcache.select is the API function

    path, other = two_caches
    pipeline = pipeline_for(tmp_path, digits["pipeline"], path, grid={"energy": {"T": [1]}})
    original = select.run_select

    def run_then_swap(*args, **kwargs):
        rows = original(*args, **kwargs)
        os.replace(other, path)
        return rows

    monkeypatch.setattr(select, "run_select", run_then_swap)
    out = tmp_path / "selection.csv"
    assert run_cli("select", pipeline, "--out", out, "--quiet") == 1
    assert not out.exists()


# --- the progress store can only save work ----------------------------------------------------------------


def _poisons(entry: dict):
    """(name, line) pairs: every way a saved line can be wrong."""
    from featcache.progress import content_digest

    def redigest(e):
        e = dict(e)
        e["digest"] = content_digest(e)
        return json.dumps(e)

    tampered = json.loads(json.dumps(entry))
    tampered["rows"][0]["auroc"] = 0.123456  # digest left as it was
    yield "tampered value", json.dumps(tampered)
    yield "wrong digest", json.dumps({**entry, "digest": "0" * 64})
    yield "other method version", redigest({**entry, "method_version": "0"})
    yield "other featcache version", redigest({**entry, "featcache_version": "0.0.0"})
    yield "other fingerprint", redigest({**entry, "fingerprint": "f" * 64})
    yield "no rows", redigest({**entry, "rows": []})
    yield "missing key", redigest({k: v for k, v in entry.items() if k != "method_version"})
    yield "wrong type", redigest({**entry, "params": json.loads(entry["params"])})
    rows = json.loads(json.dumps(entry["rows"]))
    rows[0]["ood"] = "elsewhere"
    yield "wrong ood split", redigest({**entry, "rows": rows})
    rows = json.loads(json.dumps(entry["rows"]))
    rows[0]["fpr95"] = 1.5
    yield "metric out of range", redigest({**entry, "rows": rows})
    rows = json.loads(json.dumps(entry["rows"]))
    rows[0]["method"] = "msp"
    yield "rows of another method", redigest({**entry, "rows": rows})
    yield "a JSON array", json.dumps([entry])
    yield "a JSON string", json.dumps("rows")
    yield "null", "null"
    yield "garbage", "\udcff\x00{{{"


def test_poisoned_progress_is_ignored_and_recomputed(digits, tmp_path):
    pipeline = pipeline_for(tmp_path, digits["pipeline"], digits["cache"])
    reference = clean_csv(tmp_path, pipeline)
    saved = (tmp_path / "clean" / ".sweep.csv.progress.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in saved]
    assert {"fingerprint", "featcache_version", "method_version", "digest"} <= set(entries[0])
    for i, (name, line) in enumerate(_poisons(entries[0])):
        out = tmp_path / f"poisoned{i}" / "sweep.csv"
        out.parent.mkdir()
        # every other configuration's line is genuine: only the poisoned one must be recomputed
        text = "\n".join([line] + saved[1:]) + "\n"
        (out.parent / ".sweep.csv.progress.jsonl").write_text(text, errors="surrogateescape")
        assert run_cli("sweep", pipeline, "--out", out, "--quiet") == 0, name
        assert out.read_bytes() == reference, name


def test_genuine_progress_is_reused(digits, tmp_path, monkeypatch):
    sweep = importlib.import_module("featcache.sweep")  # featcache.sweep is the API function

    pipeline = pipeline_for(tmp_path, digits["pipeline"], digits["cache"])
    reference = clean_csv(tmp_path, pipeline)
    monkeypatch.setattr(sweep, "sweep_batch", lambda *a, **k: pytest.fail("a saved configuration was recomputed"))
    assert run_cli("sweep", pipeline, "--out", tmp_path / "clean" / "sweep.csv", "--quiet") == 0
    assert (tmp_path / "clean" / "sweep.csv").read_bytes() == reference


def test_damaged_saved_scores_are_recomputed(digits, tmp_path):
    from featcache.cache.reader import open_cache
    from featcache.grid import expand_grid, params_key
    from featcache.progress import ScoreScratch
    from featcache.replay import sweep_batch

    grid = {"energy": {"T": [1]}}
    pipeline = pipeline_for(tmp_path, digits["pipeline"], digits["cache"], grid=grid)
    reference = clean_csv(tmp_path, pipeline)
    with open_cache(digits["cache"]) as cache:
        fingerprint = cache.fingerprint
        split = cache.one_split("id_test")
        n = split.n
    (method, params), = expand_grid(grid)
    out = tmp_path / "damaged" / "sweep.csv"
    scratch = ScoreScratch(out.parent / ".sweep.csv.scores", fingerprint, {method.name: method.version})
    scratch.save(method.name, params_key(params), split.name, np.zeros(n), 1.0)
    saved = scratch._file(method.name, params_key(params), split.name)
    with np.load(saved) as npz:
        meta = str(npz["meta"])
    np.savez(saved, scores=np.ones(n), meta=np.array(meta))  # the numbers changed, the record did not
    assert scratch.load(method.name, params_key(params), split.name, n) is None
    saved.write_bytes(b"not an npz file")
    assert scratch.load(method.name, params_key(params), split.name, n) is None
    assert run_cli("sweep", pipeline, "--out", out, "--quiet") == 0
    assert out.read_bytes() == reference
    rows, _, _ = sweep_batch(digits["cache"], [(method.name, params)], fingerprint=fingerprint, scratch=scratch)
    assert rows


def test_scores_saved_in_the_background_are_all_written_when_the_block_ends(tmp_path, monkeypatch):
    import threading

    from featcache.progress import ScoreScratch, saving_in_background

    scratch = ScoreScratch(tmp_path / "scores", "f" * 64, {"energy": "1"})
    rng = np.random.default_rng(0)
    saved = {f"s{i}": rng.normal(size=500 + i) for i in range(40)}
    with saving_in_background(scratch.save) as save:
        for split, scores in saved.items():
            save("energy", '{"T": 1}', split, scores, 0.5 if split == "s0" else None, None)
    assert not [t for t in threading.enumerate() if t.name.startswith("featcache-scratch")]
    for split, scores in saved.items():
        found, id_acc, nonpositive = scratch.load("energy", '{"T": 1}', split, len(scores))
        assert found.tobytes() == scores.tobytes() and id_acc == (0.5 if split == "s0" else None)

    # a write that fails raises, at a later save or when the block ends; and none is left running
    real_savez = np.savez

    def savez(path, **arrays):
        if json.loads(str(arrays["meta"]))["split"] == "full":
            raise OSError(28, "No space left on device")
        real_savez(path, **arrays)

    monkeypatch.setattr(np, "savez", savez)
    with pytest.raises(OSError, match="No space left"):
        with saving_in_background(scratch.save) as save:
            save("energy", '{"T": 2}', "full", np.zeros(3), None, None)
    with pytest.raises(OSError, match="No space left"):
        with saving_in_background(scratch.save) as save:
            save("energy", '{"T": 2}', "full", np.zeros(3), None, None)
            time.sleep(0.5)
            save("energy", '{"T": 2}', "good", np.zeros(3), None, None)  # raises here, the write done
            raise AssertionError("not reached")
    # an error of the block itself goes through, once the writes before it have ended
    with pytest.raises(KeyError):
        with saving_in_background(scratch.save) as save:
            save("energy", '{"T": 3}', "late", np.ones(4), None, None)
            raise KeyError("the batch's own error")
    assert scratch.load("energy", '{"T": 3}', "late", 4)[0].tolist() == [1.0] * 4
    assert not [t for t in threading.enumerate() if t.name.startswith("featcache-scratch")]

    # Ctrl-C (or any error) with slow writes queued: the one under way ends, the rest are dropped
    def slow_savez(path, **arrays):
        time.sleep(0.05)
        real_savez(path, **arrays)

    monkeypatch.setattr(np, "savez", slow_savez)
    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        with saving_in_background(scratch.save) as save:
            for i in range(60):
                save("energy", '{"T": 4}', f"q{i}", np.full(3, float(i)), None, None)
            raise KeyboardInterrupt
    assert time.perf_counter() - started < 1.5  # not the 3 s of all 60 writes
    written = [i for i in range(60) if scratch.load("energy", '{"T": 4}', f"q{i}", 3) is not None]
    assert written == list(range(len(written))) and len(written) < 60
    assert all(scratch.load("energy", '{"T": 4}', f"q{i}", 3)[0].tolist() == [float(i)] * 3 for i in written)
    assert not list(scratch.directory.glob("*.tmp.npz"))


# --- --out never replaces what is not a results file ------------------------------------------------------


def test_out_refuses_files_that_are_not_results(digits, tmp_path):
    pipeline = pipeline_for(tmp_path, digits["pipeline"], digits["cache"], grid={"energy": {"T": [1]}})
    cache_copy = tmp_path / "precious.h5"
    shutil.copy2(digits["cache"], cache_copy)
    notes = tmp_path / "notes.csv"
    notes.write_text("my,own,data\n1,2,3\n")
    for target in (pipeline, cache_copy, notes):
        before = target.read_bytes()
        for command in (["sweep", pipeline], ["select", pipeline]):
            assert run_cli(*command, "--out", target, "--quiet") == 1, (command, target)
            assert target.read_bytes() == before
    assert run_cli("sweep", pipeline, "--out", tmp_path, "--quiet") != 0  # a directory (click refuses it)


def test_out_of_sweep_select_and_compare(digits, tmp_path, capsys):
    pipeline = pipeline_for(tmp_path, digits["pipeline"], digits["cache"], grid={"energy": {"T": [1, 2]}})
    sweep_out = tmp_path / "mine" / "sweep_a.csv"
    assert run_cli("sweep", pipeline, "--out", sweep_out, "--quiet") == 0
    assert sweep_out.read_text().splitlines()[0] == "method,params,ood,fpr95,auroc,aupr_in,aupr_out,id_acc"
    assert json.loads((sweep_out.parent / "sweep_a.meta.json").read_text())["command"] == "sweep"
    assert run_cli("sweep", pipeline, "--out", sweep_out, "--quiet") == 0  # its own results: replaced
    select_out = tmp_path / "mine" / "chosen.csv"
    assert run_cli("select", pipeline, "--out", select_out, "--quiet") == 0
    assert select_out.read_text().startswith("method,choice,params,ood")
    assert run_cli("select", pipeline, "--out", select_out, "--quiet") == 0
    assert run_cli("sweep", pipeline, "--out", select_out, "--quiet") == 1  # selection results are not a sweep's
    compare_out = tmp_path / "mine" / "compare.csv"
    assert run_cli("compare", sweep_out, sweep_out, "--out", compare_out) == 0
    lines = compare_out.read_text().splitlines()
    assert lines[0] == "method,params,fpr95_a,auroc_a,fpr95_b,auroc_b,fpr95_diff,auroc_diff" and len(lines) == 3
    before = pipeline.read_bytes()
    assert run_cli("compare", sweep_out, sweep_out, "--out", pipeline) == 1
    assert pipeline.read_bytes() == before
    notes = tmp_path / "notes.csv"
    notes.write_text("mine\n")
    assert run_cli("sweep", pipeline, "--out", notes, "--overwrite", "--quiet") == 0
    assert notes.read_text().startswith("method,params,ood")


# --- a sweep killed at random moments resumes to the same bytes ------------------------------------------


def test_sweep_killed_at_random_moments_resumes_to_the_same_csv(digits, tmp_path):
    grid = {"energy": {"T": [1, 2, 5]}, "ash_p": {"p": [50, 60, 70, 80, 90]}, "ash_s": {"p": [50, 60, 70, 80, 90]},
            "react": {"percentile": [80, 85, 90, 95]}, "rg": {"k": [0.5, 1.0], "T": [1, 2]},
            "nap+energy": {"w": [0.2, 0.4, 0.6, 0.8]}, "knn": {"k": [1, 5, 10]}, "dice": {"p": [50, 70, 90]}}
    pipeline = pipeline_for(tmp_path, digits["pipeline"], digits["cache"], grid=grid)
    command = [sys.executable, "-m", "featcache.cli", "sweep", str(pipeline), "--quiet"]
    clean = tmp_path / "clean.csv"
    started = time.perf_counter()
    subprocess.run(command + ["--out", str(clean)], check=True, capture_output=True)
    duration = time.perf_counter() - started
    out = tmp_path / "killed" / "sweep.csv"
    rng = np.random.default_rng(7)
    kills = 0
    for _ in range(30):  # each resumed run has less left to do, so later kills come sooner
        proc = subprocess.Popen(command + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(float(rng.uniform(0.2, 0.9)) * duration)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        if kills >= 6:
            break
        if out.exists():  # this run got to the end: start again from what it saved, to be killed again
            out.unlink()
            duration *= 0.8
    assert kills >= 5
    subprocess.run(command + ["--out", str(out)], check=True, capture_output=True)
    assert out.read_bytes() == clean.read_bytes()
