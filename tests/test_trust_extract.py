"""Extraction that cannot be turned against its user: resume only under the same settings, one
writer per output, full disks, checkpoints and CIFAR batches that are data and never code, names
and ids that cannot leave the output (issue 12, points 1, 5, 9, 10, 11, 13)."""

import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import featcache
from featcache.cache.schema import SPLIT_ARRAYS
from featcache.cache.store import H5Store, ZarrStore
from featcache.cache.writer import SplitWriter, lock_path, partial_path
from featcache.cli import main
from featcache.config import load_manifest, load_pipeline
from featcache.errors import DiskFull, FeatcacheError
from featcache.extract.backbones import DigitsResNet
from featcache.extract.datasets import resolved_entry
from featcache.extract.files import load_files
from featcache.extract.runner import check_ids, extract
from tests.conftest import REPO

NORMALIZE = {"mean": [0.5], "std": [0.25]}
BATCH = 16  # 48-row splits: three appends each


def noise(seed, role="ood", kind="uniform", size=48, normalize=NORMALIZE):
    return {"source": {"generator": "noise", "kind": kind, "seed": seed}, "transform": {"normalize": normalize},
            "size": size, "role": role}


def tiny_datasets():
    return {"n_ood": noise(4, kind="blobs"), "n_train": noise(1, "id_train"), "n_val": noise(2, "id_val"),
            "n_test": noise(3, "id_test")}


def tiny(tmp, datasets=None, *, name="tiny", backbone=None, manifest="manifest.yaml"):
    """A pipeline of small generated splits and a random digits backbone; returns its path."""
    datasets = datasets or tiny_datasets()
    (tmp / manifest).write_text(yaml.safe_dump({"datasets": datasets}))
    spec = {"name": name, "manifest": str(tmp / manifest), "cache": str(tmp / f"{name}.h5"),
            "backbone": backbone or {"name": "digits_resnet", "checkpoint": "random", "seed": 0},
            "extract": {"batch_size": BATCH}, "splits": list(datasets)}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def numbers(path):
    """Every split's arrays, as bytes, and the fingerprint."""
    cache = featcache.open_cache(path)
    out = {name: {key: (str(cache.split(name)[key].dtype), cache.split(name)[key].tobytes()) for key in SPLIT_ARRAYS}
           for name in cache.split_names}
    return cache.fingerprint, out


def interrupt(pipeline, out, at, **kwargs):
    """Run an extraction that dies (as on Ctrl-C) at its `at`-th append, leaving the partial."""
    original, calls = SplitWriter.append, {"n": 0}

    def dying(self, batch):
        calls["n"] += 1
        if calls["n"] == at:
            raise KeyboardInterrupt
        original(self, batch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SplitWriter, "append", dying)
        with pytest.raises(KeyboardInterrupt):
            extract(load_pipeline(pipeline), out=out, progress=False, **kwargs)
    assert partial_path(out).exists() and not out.exists()


def child_env():
    return {**os.environ, "PYTHONPATH": str(REPO)}


# --- point 1: what the numbers were computed with --------------------------------------------------


def test_root_attributes_record_precision_device_and_resolved_preprocessing(tmp_path):
    pipeline = tiny(tmp_path)
    cache = featcache.open_cache(extract(load_pipeline(pipeline), progress=False))
    assert cache.attrs["precision"] == "float32" and cache.attrs["device"] == "cpu"
    # 16x16 input, stride-2 stages twice: the pre-pool map is 4x4
    assert cache.attrs["prepool_size"] == "4x4"
    expected = {"source": {"generator": "noise", "kind": "blobs", "seed": 4, "canvas": 16},
                "transform": {"channels": 1, "normalize": NORMALIZE}, "size": 48}  # the digits net takes grey
    assert json.loads(cache.attrs["preprocessing"])["n_ood"] == expected
    bf16 = featcache.open_cache(extract(load_pipeline(pipeline), out=tmp_path / "bf16.h5", progress=False, amp="bf16"))
    assert bf16.attrs["precision"] == "bf16"


def test_resolved_entries_write_out_presets_and_defaults(tmp_path):
    manifest = {"datasets": {
        "c10": {"source": {"path": "data/c10", "format": "cifar10"}, "transform": {"preset": "imagenet", "crop": 200},
                "role": "ood"},
        "lst": {"source": {"path": "data/x/list.txt", "format": "list"}, "role": "ood"},
        "blur": {"source": {"generator": "corrupt", "of": "val", "corruption": "gaussian_blur"}, "role": "pseudo_ood",
                 "size": 270, "transform": {"resize": 16}},
        "val": {"source": {"generator": "digits", "part": "val"}, "role": "id_val", "size": 270},
    }}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(manifest))
    m = load_manifest(tmp_path / "m.yaml")
    imagenet = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert resolved_entry("c10", m, "m") == {
        "role": "ood", "source": {"path": "data/c10", "format": "cifar10", "part": "test"},
        "transform": {"resize": 256, "crop": 200, "normalize": imagenet}, "size": None}
    assert resolved_entry("lst", m, "m")["source"]["root"] == "data/x"
    identity = {"mean": [0.0], "std": [1.0]}
    val = {"role": "id_val", "source": {"generator": "digits", "part": "val", "seed": 0, "id_train_size": 600},
           "transform": {"normalize": identity}, "size": 270}
    assert resolved_entry("blur", m, "m") == {
        "role": "pseudo_ood",
        "source": {"generator": "corrupt", "of": "val", "corruption": "gaussian_blur", "severity": 3, "seed": 0,
                   "of_entry": val},
        "transform": {"resize": 16, "normalize": identity}, "size": 270}


# --- point 5: resume only what was begun under the same settings ---------------------------------


def _change_transform(datasets, kwargs):
    datasets["n_ood"]["transform"]["normalize"] = {"mean": [0.4], "std": [0.25]}
    return "splits.n_ood.transform.normalize.mean: was [0.5], now [0.4]"


def _change_generator(datasets, kwargs):
    datasets["n_ood"]["source"]["canvas"] = 20
    return "splits.n_ood.source.canvas: was 16, now 20"


def _change_batch(datasets, kwargs):
    kwargs["batch_size"] = 24
    return "batch_size: was 16, now 24"


def _change_precision(datasets, kwargs):
    kwargs["amp"] = "bf16"
    return 'precision: was "float32", now "bf16"'


@pytest.mark.parametrize("change", [None, _change_transform, _change_generator, _change_batch, _change_precision],
                         ids=["unchanged", "transform", "generator", "batch-size", "precision"])
def test_resume_only_when_nothing_that_shapes_the_numbers_changed(tmp_path, capsys, change):
    """Killed in the third split; the first (complete) split is what a changed setting must redo."""
    datasets = tiny_datasets()
    pipeline = tiny(tmp_path, datasets)
    out = tmp_path / "run.h5"
    interrupt(pipeline, out, at=8, batch_size=BATCH)
    kwargs = {"batch_size": BATCH}
    reason = change(datasets, kwargs) if change else None
    pipeline = tiny(tmp_path, datasets)  # the manifest edited in place
    capsys.readouterr()
    extract(load_pipeline(pipeline), out=out, progress=True, **kwargs)
    printed = capsys.readouterr().out
    if reason is None:
        assert f"resuming {partial_path(out)}" in printed and "not resuming" not in printed
    else:
        assert f"not resuming {partial_path(out)}: what shapes its numbers changed since it was begun: {reason}" \
            in printed
    clean = extract(load_pipeline(pipeline), out=tmp_path / "clean.h5", progress=False, **kwargs)
    assert numbers(out) == numbers(clean)


def test_overwrite_always_starts_afresh(tmp_path, capsys):
    import h5py

    pipeline = tiny(tmp_path)
    out = tmp_path / "run.h5"
    interrupt(pipeline, out, at=8, batch_size=BATCH)
    with h5py.File(partial_path(out), "r+") as fh:  # a complete split of the partial, spoiled
        fh["splits/n_ood/features"][:] = 0
    extract(load_pipeline(pipeline), out=out, progress=False, overwrite=True, batch_size=BATCH)
    assert "--overwrite starts afresh" in capsys.readouterr().out
    clean = extract(load_pipeline(pipeline), out=tmp_path / "clean.h5", progress=False, batch_size=BATCH)
    assert numbers(out) == numbers(clean)


@pytest.mark.parametrize("fmt", ["h5", "zarr"])
def test_partial_with_damaged_metadata_is_restarted_with_a_message(tmp_path, capsys, fmt):
    pipeline = tiny(tmp_path)
    out = tmp_path / f"run.{fmt}"
    interrupt(pipeline, out, at=8, batch_size=BATCH)
    partial = partial_path(out)
    if fmt == "h5":  # as if the last metadata write had been cut short
        with open(partial, "r+b") as fh:
            fh.truncate(os.path.getsize(partial) // 2)
    else:
        (partial / "zarr.json").write_text('{"zarr_format": 3, "node_type": "gr')
    extract(load_pipeline(pipeline), out=out, progress=False, batch_size=BATCH)
    assert re.search(rf"not resuming {re.escape(str(partial))}: it cannot be read \(.*\); a failed write may have "
                     "damaged it; starting afresh", capsys.readouterr().out)
    clean = extract(load_pipeline(pipeline), out=tmp_path / f"clean.{fmt}", progress=False, batch_size=BATCH)
    assert numbers(out) == numbers(clean)


def write_rgb(folder, names, seed):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).save(folder / name)


def file_pipeline(tmp):
    write_rgb(tmp / "id" / "a", [f"a{i}.png" for i in range(3)], 0)
    write_rgb(tmp / "id" / "b", [f"b{i}.png" for i in range(3)], 1)
    write_rgb(tmp / "ood", [f"img{i:03d}.png" for i in range(8)], 2)
    transform = {"normalize": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    ident = {"source": {"path": str(tmp / "id"), "format": "imagefolder"}, "transform": transform}
    datasets = {"f_train": {**ident, "role": "id_train"}, "f_val": {**ident, "role": "id_val"},
                "f_test": {**ident, "role": "id_test"},
                "f_ood": {"source": {"path": str(tmp / "ood"), "format": "folder"}, "transform": transform, "role": "ood"}}
    backbone = {"name": "digits_resnet", "checkpoint": "random", "seed": 0, "kwargs": {"in_channels": 3, "num_classes": 2}}
    return tiny(tmp, datasets, name="files", backbone=backbone)


def test_resumed_split_whose_files_changed_is_extracted_again(tmp_path, capsys):
    """Same paths and settings, but a file renamed since the partial was begun: the rows already
    written no longer belong to the samples at those positions."""
    pipeline = file_pipeline(tmp_path)
    out = tmp_path / "run.h5"
    interrupt(pipeline, out, at=12, batch_size=2)  # 3 id splits of 6 rows = 9 appends, then 2 of f_ood
    os.rename(tmp_path / "ood" / "img000.png", tmp_path / "ood" / "img999.png")
    extract(load_pipeline(pipeline), out=out, progress=False, batch_size=2)
    assert ("split 'f_ood' row 0 holds sample 'img000.png', the data set now has 'img001.png'; extracting this "
            "split again") in capsys.readouterr().out
    clean = extract(load_pipeline(pipeline), out=tmp_path / "clean.h5", progress=False, batch_size=2)
    assert numbers(out) == numbers(clean)


# --- point 9: one writer per output ---------------------------------------------------------------

PAUSING_WRITER = """
import pathlib, sys, time
from featcache.cache import writer
from featcache.config import load_pipeline
from featcache.extract.runner import extract

pipeline, out, gate = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
original, calls = writer.SplitWriter.append, [0]

def append(self, batch):
    calls[0] += 1
    if calls[0] == 5:  # mid-extraction, lock held, partial on disk: wait for the test
        gate.with_suffix(".waiting").touch()
        while not gate.exists():
            time.sleep(0.05)
    original(self, batch)

writer.SplitWriter.append = append
print(extract(load_pipeline(pipeline), out=out, progress=False, batch_size=16))
"""


def start_pausing_writer(tmp_path, pipeline, out, gate):
    script = tmp_path / "pausing.py"
    script.write_text(PAUSING_WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(pipeline), str(out), str(gate)], env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not gate.with_suffix(".waiting").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc


def cli_extract(pipeline, out, *extra):
    return subprocess.run([sys.executable, "-m", "featcache.cli", "extract", str(pipeline), "--out", str(out),
                           "--quiet", "--batch-size", str(BATCH), *extra], env=child_env(), capture_output=True,
                          text=True, timeout=300)


def test_second_extraction_to_the_same_output_is_refused(tmp_path):
    pipeline = tiny(tmp_path)
    out, gate = tmp_path / "shared.h5", tmp_path / "gate"
    first = start_pausing_writer(tmp_path, pipeline, out, gate)
    try:
        partial_size = os.path.getsize(partial_path(out))
        for extra in ((), ("--overwrite",)):
            second = cli_extract(pipeline, out, *extra)
            lines = second.stderr.strip().splitlines()
            assert second.returncode == 1 and len(lines) == 1, second.stderr
            assert f"{out}: in use by another featcache process writing it (pid {first.pid} on " in lines[0]
            assert partial_path(out).exists() and os.path.getsize(partial_path(out)) == partial_size
        gate.touch()
        stdout, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, stderr
    assert stdout.strip() == str(out) and not lock_path(out).exists()
    clean = extract(load_pipeline(pipeline), out=tmp_path / "clean.h5", progress=False, batch_size=BATCH)
    assert numbers(out) == numbers(clean)


def test_a_killed_writer_leaves_no_lock_behind(tmp_path):
    pipeline = tiny(tmp_path)
    out, gate = tmp_path / "shared.h5", tmp_path / "gate"
    first = start_pausing_writer(tmp_path, pipeline, out, gate)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert lock_path(out).exists()  # the file stays, the kernel dropped the lock with the process
    extract(load_pipeline(pipeline), out=out, progress=False, batch_size=BATCH)
    clean = extract(load_pipeline(pipeline), out=tmp_path / "clean.h5", progress=False, batch_size=BATCH)
    assert numbers(out) == numbers(clean)


# --- point 10: a full disk ------------------------------------------------------------------------


def fail_writes_after(monkeypatch, fmt, writes):
    """The store's writes of split rows raise ENOSPC after `writes` of them, as a full disk does."""
    store = H5Store if fmt == "h5" else ZarrStore
    original, calls = store.write, {"n": 0}

    def write(self, node, start, values):
        if node.startswith("/splits/"):
            calls["n"] += 1
            if calls["n"] > writes:
                raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, node, start, values)

    monkeypatch.setattr(store, "write", write)


def _size(path):
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


@pytest.mark.parametrize("fmt", ["h5", "zarr"])
@pytest.mark.parametrize("writes", [0, 40], ids=["at-once", "mid-way"])  # HDF5 writes 5 arrays an append, Zarr 6
def test_injected_disk_full_ends_in_one_line_and_running_again_completes(tmp_path, monkeypatch, capsys, fmt, writes):
    pipeline = tiny(tmp_path)
    out = tmp_path / f"full.{fmt}"
    fail_writes_after(monkeypatch, fmt, writes)
    with pytest.raises(DiskFull) as info:
        extract(load_pipeline(pipeline), out=out, progress=False, batch_size=BATCH)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{partial_path(out)}: the disk filled up while writing it")
    need = float(re.search(r"(?:about|up to) ([\d.,]+) MiB", message).group(1).replace(",", "")) * 2**20
    assert info.value.abandoned == (fmt == "h5") and partial_path(out).exists() == (fmt == "zarr")
    monkeypatch.undo()
    extract(load_pipeline(pipeline), out=out, progress=True, batch_size=BATCH)
    assert ("resuming" in capsys.readouterr().out) == (fmt == "zarr")
    clean = extract(load_pipeline(pipeline), out=tmp_path / f"clean.{fmt}", progress=False, batch_size=BATCH)
    assert numbers(out) == numbers(clean)
    if writes == 0:  # nothing written yet: the estimate is for the whole cache, as it ends up on disk
        assert _size(clean) - 0.05 * 2**20 <= need <= 2 * _size(clean) + 2 * 2**20, (need, _size(clean))


FAILING_CLI = """
import errno, sys
from featcache.cache import store
cls = store.H5Store if sys.argv[1] == "h5" else store.ZarrStore
original, calls = cls.write, [0]
def write(self, node, start, values):
    calls[0] += node.startswith("/splits/")
    if calls[0] > 40:
        raise OSError(errno.ENOSPC, "No space left on device")
    return original(self, node, start, values)
cls.write = write
from featcache.cli import main
main(sys.argv[2:])
"""


@pytest.mark.parametrize("fmt", ["h5", "zarr"])
def test_disk_full_on_the_command_line_is_one_line_without_traceback(tmp_path, fmt):
    pipeline = tiny(tmp_path)
    script = tmp_path / "failing.py"
    script.write_text(FAILING_CLI)
    out = tmp_path / f"full.{fmt}"
    proc = subprocess.run([sys.executable, str(script), fmt, "extract", str(pipeline), "--out", str(out), "--quiet"],
                          env=child_env(), capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"featcache: error: {partial_path(out)}: the disk filled up") and "MiB" in lines[0]


def _tmpfs_available(mnt) -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mnt}"],
                           capture_output=True)
    return probe.returncode == 0


NO_CHECK = """
import sys
from featcache.extract import runner
runner.Room.check = lambda self, nbytes: None  # as if another process filled the disk after each check
from featcache.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("fmt", ["h5", "zarr"])
def test_real_small_file_system_fills_up(tmp_path, fmt):
    """A 6 MiB tmpfs in a private mount namespace with 1.5 MiB left free, a cache of about 2 MiB:
    the first run stops before the disk is full; a second, its space check disabled as if another
    process had taken the space, fails in a write; both end in one line. With the filler removed,
    the same command completes, equal to a clean run."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not _tmpfs_available(mnt):
        pytest.skip("no unprivileged tmpfs mount here (unshare -Urm)")
    # 128-wide features, 1,600 rows in one chunk of each array: about 2 MiB (HDF5) to 3 MiB (Zarr)
    backbone = {"name": "digits_resnet", "checkpoint": "random", "seed": 0, "kwargs": {"width": 32}}
    pipeline = tiny(tmp_path, {**tiny_datasets(), "n_more": noise(5, size=1600)}, backbone=backbone)
    (tmp_path / "nocheck.py").write_text(NO_CHECK)
    out = mnt / f"c.{fmt}"
    args = f"extract {pipeline} --out {out} --quiet --batch-size 64"
    script = f"""
mount -t tmpfs -o size=6m tmpfs {mnt} || exit 90
dd if=/dev/zero of={mnt}/filler bs=1k count={6 * 1024 - 1536} 2>/dev/null
cd {tmp_path}
{sys.executable} -m featcache.cli {args} > 1.out 2> 1.err; echo $? > 1.rc
{sys.executable} nocheck.py {args} > 2.out 2> 2.err; echo $? > 2.rc
rm {mnt}/filler
{sys.executable} -m featcache.cli {args} > 3.out 2> 3.err; echo $? > 3.rc
cp -r {out} result.{fmt}
"""
    subprocess.run(["unshare", "-Urm", "sh", "-c", script], env=child_env(), timeout=600)
    partial = re.escape(str(partial_path(out)))
    for run, pattern in ((1, rf"{partial}: the disk is nearly full \([\d.]+ MiB free\); (about|up to) [\d.]+ MiB are needed "
                             "for the rest of the cache; free some space and run the same command again to resume"),
                         (2, rf"{partial}: the disk filled up while writing it \(No space left on device\)")):
        err = (tmp_path / f"{run}.err").read_text().strip().splitlines()
        assert (tmp_path / f"{run}.rc").read_text().strip() == "1" and len(err) == 1, (run, err)
        assert re.match("featcache: error: " + pattern, err[0]), (run, err[0])
    assert (tmp_path / "3.rc").read_text().strip() == "0", (tmp_path / "3.err").read_text()
    clean = extract(load_pipeline(pipeline), out=tmp_path / f"clean.{fmt}", progress=False, batch_size=64)
    assert numbers(tmp_path / f"result.{fmt}") == numbers(clean)


# --- point 11: checkpoints and CIFAR batches are data ---------------------------------------------


class Payload:
    """Unpickling this creates a file: what a hostile checkpoint or batch would do instead."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_whole_pickled_model_needs_the_opt_in(tmp_path, capsys):
    torch.manual_seed(5)
    model = DigitsResNet()
    torch.save(model, tmp_path / "whole.pt")
    torch.save(model.state_dict(), tmp_path / "state.pt")
    whole = tiny(tmp_path, name="whole", backbone={"name": "digits_resnet", "checkpoint": str(tmp_path / "whole.pt")})
    with pytest.raises(SystemExit) as exit_info:
        main(["extract", str(whole), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1
    assert "whole.pt: refused" in err[0] and "full unpickling" in err[0]
    assert "`backbone.trust_checkpoint: true`" in err[0] and "--trust-checkpoint" in err[0]
    state = tiny(tmp_path, name="state", backbone={"name": "digits_resnet", "checkpoint": str(tmp_path / "state.pt")})
    reference = numbers(extract(load_pipeline(state), progress=False))[1]
    main_ok = subprocess.run([sys.executable, "-m", "featcache.cli", "extract", str(whole), "--quiet",
                              "--trust-checkpoint"], env=child_env(), capture_output=True, text=True, timeout=300)
    assert main_ok.returncode == 0, main_ok.stderr
    assert numbers(tmp_path / "whole.h5")[1] == reference
    trusted = tiny(tmp_path, name="trusted", backbone={"name": "digits_resnet", "checkpoint": str(tmp_path / "whole.pt"),
                                                      "trust_checkpoint": True})
    assert numbers(extract(load_pipeline(trusted), progress=False))[1] == reference
    loose = tiny(tmp_path, name="loose", backbone={"name": "digits_resnet", "checkpoint": str(tmp_path / "whole.pt"),
                                                  "trust_checkpoint": "yes"})
    with pytest.raises(FeatcacheError, match="backbone.trust_checkpoint' must be true or false, got 'yes'"):
        extract(load_pipeline(loose), progress=False)


def test_checkpoint_with_a_code_payload_is_refused_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "created-by-checkpoint"
    state = DigitsResNet().state_dict()
    state["extra"] = Payload(marker)
    torch.save(state, tmp_path / "evil.pt")
    pipeline = tiny(tmp_path, backbone={"name": "digits_resnet", "checkpoint": str(tmp_path / "evil.pt")})
    with pytest.raises(SystemExit):
        main(["extract", str(pipeline), "--quiet"])
    err = capsys.readouterr().err
    assert "evil.pt: refused" in err and "--trust-checkpoint" in err
    assert not marker.exists()


def cifar_batch(rng, n=5):
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    # keys and names are str, as Python 2 wrote them and as pickle.load(encoding="latin1") reads them
    return data, {"batch_label": "testing batch 1 of 1", "labels": [int(v) for v in rng.integers(0, 10, n)],
                  "data": data, "filenames": [f"img{i}.png" for i in range(n)]}


@pytest.mark.parametrize("numpy_names", ["numpy._core", "numpy.core"])
def test_genuine_cifar_batch_loads(tmp_path, numpy_names):
    """Written as CIFAR's own batches are (pickle protocol 2); 'numpy.core' is how the published
    batches, pickled under numpy 1, name numpy's reconstructor."""
    data, batch = cifar_batch(np.random.default_rng(0))
    raw = pickle.dumps(batch, protocol=2)
    if numpy_names == "numpy.core":
        assert b"numpy._core.multiarray\n" in raw
        raw = raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(raw)
    images = load_files({"path": str(folder), "format": "cifar10"}, {}, "id_test", "m: dataset 'c'")
    np.testing.assert_array_equal(images.arrays, data.reshape(5, 3, 32, 32).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(images.labels, batch["labels"])


def test_cifar_batch_with_a_code_payload_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "created-by-batch"
    _, batch = cifar_batch(np.random.default_rng(1))
    batch["labels"] = Payload(marker)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(FeatcacheError, match=r"test_batch is not a CIFAR python batch \(refused global .*open\); "
                                             "refused, because unpickling it could run code"):
        load_files({"path": str(folder), "format": "cifar10"}, {}, "id_test", "m: dataset 'c'")
    assert not marker.exists()


# --- point 13: names and ids never leave the output -----------------------------------------------


@pytest.mark.parametrize("name", ["../../evil", "a/b", "..", ".", "a\\b", "bell\x07", "new\nline", ""])
def test_pipeline_and_dataset_names_must_be_plain(tmp_path, name):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": name}))
    with pytest.raises(FeatcacheError, match="field 'name' must be a plain name"):
        load_pipeline(path)
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"datasets": {name: noise(1)}}))
    with pytest.raises(FeatcacheError, match="a dataset name must be a plain name"):
        load_manifest(tmp_path / "m.yaml")


@pytest.mark.parametrize("line", ["../../etc/passwd 0", "/etc/passwd 0", "ok/../../up.png 1"])
def test_list_file_cannot_reach_outside_its_root(tmp_path, line):
    (tmp_path / "images").mkdir()
    (tmp_path / "list.txt").write_text(f"{line}\n")
    with pytest.raises(FeatcacheError, match=r"list.txt:1: image path .* must be relative to .* and stay under it"):
        load_files({"path": str(tmp_path / "list.txt"), "format": "list", "root": str(tmp_path / "images")},
                   {}, "ood", "m: dataset 'l'")


def test_sample_ids_are_relative_names():
    check_ids(np.array(["digits/12", "n01440764/ILSVRC2012_val_00000293.JPEG", "digits/3#jpeg@5", "svhn/test/0"]), "w")
    for bad in ["a\nb", "tab\there", "", "/etc/passwd", "../up", "a/../b", "a/./b", "x\x7f", "dir/.."]:
        with pytest.raises(FeatcacheError, match=rf"w: sample 1 has id {re.escape(repr(bad))}; a sample id must be"):
            check_ids(np.array(["fine", bad, "fine2"]), "w")


def test_file_with_a_control_character_in_its_name_is_refused(tmp_path):
    pipeline = file_pipeline(tmp_path)
    write_rgb(tmp_path / "ood", ["bad\nname.png"], 3)
    with pytest.raises(FeatcacheError, match=r"dataset 'f_ood': sample 0 has id 'bad\\nname.png'"):
        extract(load_pipeline(pipeline), progress=False)
    assert not (tmp_path / "files.h5").exists()
