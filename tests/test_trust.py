"""Caches teammates can trust: verify, convert, merge, remote Zarr, concurrent readers, bad input."""

import shutil
import subprocess
import sys
import zipfile

import h5py
import numpy as np
import pytest
import torch
import yaml

import featcache
from featcache.cache.convert import merge
from featcache.cache.schema import SPLIT_ARRAYS
from featcache.cache.verify import verify
from featcache.cli import main
from featcache.config import load_pipeline
from featcache.extract.runner import extract
from tests.cache_helpers import restamp
from tests.conftest import write_pipeline


def same_cache(a, b):
    a, b = featcache.open_cache(a), featcache.open_cache(b)
    assert a.fingerprint == b.fingerprint and a.split_names == b.split_names
    np.testing.assert_array_equal(a.head_weight, b.head_weight)
    for name in a.split_names:
        sa, sb = a.split(name), b.split(name)
        for key in ("role", "source", "n", "complete", "corruption", "severity", "checksums"):
            assert sa.attrs.get(key) == sb.attrs.get(key), (name, key)
        for key in SPLIT_ARRAYS:
            x, y = sa[key], sb[key]
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), (name, key)


def copy(src, tmp_path, name="c.h5"):
    dst = tmp_path / name
    shutil.copy2(src, dst)
    return dst


# --- verify ---------------------------------------------------------------------------------------

def test_verify_passes_an_intact_cache(random_digits, capsys):
    checks = verify(random_digits["h5"])
    assert all(c.ok for c in checks) and len(checks) > 100
    main(["verify", str(random_digits["zarr"])])
    assert "the cache is intact" in capsys.readouterr().out


@pytest.mark.parametrize("damage, expect, stamp", [
    (lambda f: f["splits/letters/features"].__setitem__((3, 2), 123.0), "letters/features: checksum DIFFERS", False),
    (lambda f: f["splits/photos"].attrs.__setitem__("complete", False), "photos: INCOMPLETE", False),
    (lambda f: f["splits/noise"].__delitem__("chan_max"), "split 'noise' has no dataset 'chan_max'", False),
    # written so by a faulty writer, checksums and all: verify's own logits check must find it
    (lambda f: f["splits/digits_test/logits"].__setitem__((0, 0), 99.0), "digits_test: logits = features @ W.T + b", True),
])
def test_verify_finds_damage(random_digits, tmp_path, capsys, damage, expect, stamp):
    path = copy(random_digits["h5"], tmp_path)
    with h5py.File(path, "r+") as fh:
        damage(fh)
    if stamp:
        restamp(path)
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", str(path)])
    out = capsys.readouterr().out
    assert exit_info.value.code == 1 and expect in out, out


# --- convert, merge, remote Zarr, concurrent readers ------------------------------------------------

def test_convert_both_ways_without_loss(random_digits, tmp_path, capsys):
    main(["convert", str(random_digits["h5"]), str(tmp_path / "a.zarr")])
    main(["convert", str(tmp_path / "a.zarr"), str(tmp_path / "b.h5")])
    same_cache(random_digits["h5"], tmp_path / "a.zarr")
    same_cache(random_digits["h5"], tmp_path / "b.h5")
    assert all(c.ok for c in verify(tmp_path / "b.h5"))
    with pytest.raises(SystemExit):
        main(["convert", str(random_digits["h5"]), str(tmp_path / "b.h5")])  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_convert_starts_again_a_partial_left_by_a_copy_of_another_cache(random_digits, tmp_path):
    # an interrupted convert of cache A leaves t.h5.partial; converting cache B to t.h5 must copy B,
    # not finish A's partial with B's remaining rows
    a = copy(random_digits["h5"], tmp_path, "a.h5")
    b = copy(random_digits["h5"], tmp_path, "b.h5")
    with h5py.File(b, "r+") as fh:
        fh["splits/digits_id_train/logits"][0] += np.float32(1.0)  # a split the partial holds complete
    restamp(b)
    target = tmp_path / "t.h5"
    main(["convert", str(a), str(target)])
    partial = tmp_path / "t.h5.partial"
    target.rename(partial)
    with h5py.File(partial, "r+") as fh:  # as a kill during the copy of a split leaves it
        fh.attrs["fingerprint"] = ""
        fh["splits/photos"].attrs["complete"] = False
    main(["convert", str(b), str(target)])
    main(["convert", str(b), str(tmp_path / "direct.h5")])
    same_cache(tmp_path / "direct.h5", target)
    assert featcache.open_cache(target).fingerprint == featcache.open_cache(b).fingerprint


def test_sharded_extraction_merged_equals_one_run(random_digits, tmp_path):
    pipeline = load_pipeline(random_digits["pipeline"])
    shards = [extract(pipeline, out=tmp_path / f"s{i}.h5", progress=False, shard=(i, 3), batch_size=64)
              for i in range(3)]
    sizes = [featcache.open_cache(s).split("letters").n for s in shards]
    assert sum(sizes) == 500 and sizes[0] % 64 == 0 and sizes[1] % 64 == 0 and min(sizes) > 0
    merged = merge([shards[2], shards[0], shards[1]], tmp_path / "merged.zarr")
    same_cache(extract(pipeline, out=tmp_path / "whole.h5", progress=False, batch_size=64), merged)
    with pytest.raises(featcache.errors.FeatcacheError, match="not one complete set"):
        merge(shards[:2], tmp_path / "incomplete.h5")
    # a shard of another precision, or one storing chan_mean another way (autocast before and after
    # 2026-12-05), is not part of this extraction: its rows would make a cache no single run writes
    for n, (node, key, value) in enumerate([("/", "precision", "bf16"), ("splits/letters", "chan_mean_is_features", False)]):
        odd = copy(shards[1], tmp_path, f"odd{n}.h5")
        with h5py.File(odd, "r+") as fh:
            fh[node].attrs[key] = value
        with pytest.raises(featcache.errors.FeatcacheError, match=key if n == 0 else "chan_mean"):
            merge([shards[0], odd, shards[2]], tmp_path / f"odd{n}_merged.h5")


def sweep_csv(tmp_path, cache, name):
    pipeline = tmp_path / f"{name}.yaml"
    pipeline.write_text(yaml.safe_dump({"name": name, "cache": str(cache), "results": str(tmp_path / "res"),
                                        "sweep": {"energy": {}, "ash_s": {"p": [90]}, "nap+msp": {"w": [0.5]}}}))
    main(["sweep", str(pipeline), "--quiet"])
    return (tmp_path / "res" / name / "sweep.csv").read_text()


def test_zarr_read_from_a_zip_file_and_a_file_url(random_digits, tmp_path):
    zipped = tmp_path / "digits.zarr.zip"
    root = random_digits["zarr"]
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(root).as_posix())
    reference = sweep_csv(tmp_path, random_digits["h5"], "h5")
    assert sweep_csv(tmp_path, zipped, "zip") == reference
    assert sweep_csv(tmp_path, root.resolve().as_uri(), "url") == reference
    assert all(c.ok for c in verify(zipped))


def test_concurrent_sweeps_on_one_read_only_cache(random_digits, tmp_path):
    cache = copy(random_digits["h5"], tmp_path)
    cache.chmod(0o444)
    procs = []
    for i in range(3):
        pipeline = tmp_path / f"p{i}.yaml"
        pipeline.write_text(yaml.safe_dump({"name": f"p{i}", "cache": str(cache), "results": str(tmp_path / "res"),
                                            "sweep": {"energy": {}, "ash_b": {"p": [60, 80]}, "react": {}}}))
        procs.append(subprocess.Popen([sys.executable, "-m", "featcache.cli", "sweep", str(pipeline), "--quiet"],
                                      cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
    texts = {(tmp_path / "res" / f"p{i}" / "sweep.csv").read_text() for i in range(3)}
    assert len(texts) == 1


# --- bad input: one line naming the culprit, exit status 1, nothing lost ----------------------------

def h5_with(random_digits, tmp_path, change, stamp=False):
    """A copy changed by `change`; with `stamp`, its checksums and fingerprint rewritten from its arrays
    (as if written so), so that the check under test, not the checksums, is what refuses it."""
    path = copy(random_digits["h5"], tmp_path)
    with h5py.File(path, "r+") as fh:
        change(fh)
    if stamp:
        restamp(path)
    return path


def _nan(fh):
    x = fh["splits/photos/features"][...]
    x[[4, 9], 1] = [np.nan, np.inf]
    fh["splits/photos/features"][...] = x


def _minus_inf(fh):
    x = fh["splits/photos/features"][...]
    x[6, 3] = -np.inf
    fh["splits/photos/features"][...] = x


def _nan_prepool(fh):
    # read only by NAP, a run of rows at a time: the error still counts the whole array
    x = fh["splits/photos/chan_max"][...]
    x[[4, 9], 1] = [np.nan, -np.inf]
    fh["splits/photos/chan_max"][...] = x


def _empty_ood(fh):
    group = fh["splits/noise"]
    for key in SPLIT_ARRAYS:
        dtype = group[key].dtype
        shape = (0,) + group[key].shape[1:]
        del group[key]
        group.create_dataset(key, shape=shape, dtype=dtype)
    group.attrs["n"] = 0


def _wide_head(fh):
    weight = fh["head/weight"][...]
    del fh["head/weight"]
    fh["head/weight"] = np.concatenate([weight, weight], axis=1)


BAD_CACHES = {
    "missing": (lambda d, t: t / "nope.h5", "no such cache file"),
    "not hdf5": (lambda d, t: (t / "junk.h5").write_bytes(b"plain text") and t / "junk.h5", "not a readable HDF5 file"),
    "empty dir": (lambda d, t: (t / "e.zarr").mkdir() or t / "e.zarr", "not a Zarr store"),
    "truncated": (lambda d, t: (t / "cut.h5").write_bytes(d["h5"].read_bytes()[:50_000]) and t / "cut.h5", "truncated"),
    "newer schema": (lambda d, t: h5_with(d, t, lambda f: f.attrs.__setitem__("schema", "featcache-cache/3")),
                     "'featcache-cache/3' is not supported; this featcache reads 'featcache-cache/2'"),
    "older schema": (lambda d, t: h5_with(d, t, lambda f: f.attrs.__setitem__("schema", "featcache-cache/0")),
                     "'featcache-cache/0' is not supported"),
    "missing dataset": (lambda d, t: h5_with(d, t, lambda f: f["splits/letters"].__delitem__("logits")),
                        "split 'letters' has no dataset 'logits'"),
    "incomplete split": (lambda d, t: h5_with(d, t, lambda f: f["splits/letters"].attrs.__setitem__("complete", False)),
                         "split 'letters' is incomplete"),
    "width": (lambda d, t: h5_with(d, t, _wide_head), "features have width 64, the head takes 128"),
    "nan": (lambda d, t: h5_with(d, t, _nan, stamp=True), "2 NaN or Inf values in 2 samples, first in sample 'photos/"),
    "-inf": (lambda d, t: h5_with(d, t, _minus_inf, stamp=True), "1 NaN or Inf values in 1 samples, first in sample 'photos/"),
    "nan pre-pool": (lambda d, t: h5_with(d, t, _nan_prepool, stamp=True),
                     "dataset 'chan_max' has 2 NaN or Inf values in 2 samples, first in sample 'photos/"),
    "empty ood": (lambda d, t: h5_with(d, t, _empty_ood), "split 'noise' is empty"),
    "no id_test": (lambda d, t: h5_with(d, t, lambda f: f["splits"].__delitem__("digits_test"), stamp=True),
                   "no split with role 'id_test'"),
}


def _huge_but_finite(fh):
    for key in ("features", "chan_max"):
        x = fh[f"splits/photos/{key}"][...]
        x[::2] = np.finfo(np.float32).max / 4  # finite, but their float32 sum overflows to inf
        fh[f"splits/photos/{key}"][...] = x


def test_finite_values_whose_sum_overflows_are_not_refused(random_digits, tmp_path):
    from featcache.replay import split_loader, surely_finite

    path = h5_with(random_digits, tmp_path, _huge_but_finite, stamp=True)
    with featcache.open_cache(path) as cache:
        split = next(s for s in cache.splits() if s.name == "photos")
        load, runs = split_loader(cache, split)
        features = load("features")
        assert not surely_finite(features) and np.isfinite(features).all()
        assert sum(len(rows) for _, _, rows in runs("chan_max")) == split.n
    for bad in (np.nan, np.inf, -np.inf):
        values = np.ones((50, 3), np.float32)
        values[7, 1] = bad
        assert not surely_finite(values)
    assert surely_finite(np.full((50, 3), 60000, np.float16))  # summed in float32, where it does not overflow
    assert surely_finite(np.arange(6).reshape(2, 3)) and surely_finite(np.ones((4, 4), np.float32))


@pytest.mark.parametrize("case", list(BAD_CACHES))
def test_bad_cache_is_refused_in_one_line(random_digits, tmp_path, capsys, case):
    make, message = BAD_CACHES[case]
    cache = make(random_digits, tmp_path)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "p", "cache": str(cache), "results": str(tmp_path / "res"),
                                        "sweep": {"energy": {}, "nap": {}}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", str(pipeline), "--quiet"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_info.value.code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert message in lines[0] and str(cache.name) in lines[0], lines[0]
    assert not (tmp_path / "res" / "p" / "sweep.csv").exists()


def test_checkpoint_that_does_not_fit_names_the_keys(tmp_path, capsys):
    from featcache.extract.backbones import DigitsResNet

    state = DigitsResNet().state_dict()
    state.pop("fc.bias")
    state["head.extra"] = torch.zeros(3)
    torch.save(state, tmp_path / "wrong.pt")
    pipeline = write_pipeline(tmp_path, checkpoint=tmp_path / "wrong.pt")
    with pytest.raises(SystemExit) as exit_info:
        main(["extract", str(pipeline), "--quiet"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and len(err.strip().splitlines()) == 1
    assert "missing keys fc.bias" in err and "unexpected keys head.extra" in err and "wrong.pt" in err


def _nap_by_hand(path, split):
    """NAP's formula on a split's stored arrays, read with h5py alone."""
    with h5py.File(path, "r") as fh:
        mx = fh[f"splits/{split}/chan_max"][...].astype(np.float64)
        mn = fh[f"splits/{split}/chan_mean"][...].astype(np.float64)
    return np.mean((mx / (mn + 1.0)) ** 2, axis=1)


def _nap_scores(path, split):
    from featcache.methods.nap import shared_nap_score
    from featcache.replay import load_replay

    with featcache.open_cache(path) as cache:
        replay = load_replay(cache)
        data = next(d for d in [replay.id_test, *replay.oods] if d.name == split)
        return shared_nap_score(data, 1.0)


def test_nap_takes_the_stored_means_whatever_an_attribute_claims(random_digits, tmp_path):
    # a split whose attribute says chan_mean is the features while its (checksummed) means differ:
    # NAP scores the means it stores, never the features in their place
    path = copy(random_digits["h5"], tmp_path)
    with h5py.File(path, "r+") as fh:
        group = fh["splits/photos"]
        assert group.attrs["chan_mean_is_features"]
        means = group["features"][...] * np.float32(0.5) + np.float32(0.25)
        del group["chan_mean"]
        group["chan_mean"] = means
    restamp(path)
    expected = _nap_by_hand(path, "photos")
    with h5py.File(path, "r") as fh:
        assert not np.array_equal(fh["splits/photos/chan_mean"][...], fh["splits/photos/features"][...])
    assert np.array_equal(_nap_scores(path, "photos"), expected)


def test_autocast_extraction_keeps_the_means_in_both_formats(random_digits, tmp_path):
    # under autocast the pooled features are rounded to bf16 while the means are float32: they differ,
    # so HDF5 stores the means too (no link), and NAP scores the same numbers from .h5 and .zarr
    pipeline = write_pipeline(tmp_path, checkpoint="random",
                              overrides={"extract": {"amp": "bf16"}, "pseudo_ood": None})
    h5 = extract(load_pipeline(pipeline), progress=False)
    zarr = extract(load_pipeline(pipeline), out=tmp_path / "digits.zarr", progress=False)
    with h5py.File(h5, "r") as fh:
        group = fh["splits/photos"]
        assert not group.attrs["chan_mean_is_features"]
        assert not np.array_equal(group["chan_mean"][...], group["features"][...])
    assert np.array_equal(_nap_scores(h5, "photos"), _nap_scores(zarr, "photos"))
    assert np.array_equal(_nap_scores(h5, "photos"), _nap_by_hand(h5, "photos"))


@pytest.mark.parametrize("target", ["out.h5", "out.zarr"])
def test_convert_keeps_means_an_attribute_claims_are_the_features(random_digits, tmp_path, target):
    # the attribute says chan_mean is the features, the stored (checksummed) means differ: a copy
    # keeps the means instead of linking them away
    from featcache.cache.convert import convert

    path = copy(random_digits["h5"], tmp_path)
    with h5py.File(path, "r+") as fh:
        group = fh["splits/photos"]
        means = group["features"][...] * np.float32(0.5) + np.float32(0.25)
        del group["chan_mean"]
        group["chan_mean"] = means
    restamp(path)
    out = convert(path, tmp_path / target)
    with featcache.open_cache(out) as copied, featcache.open_cache(path) as source:
        assert copied.fingerprint == source.fingerprint
        assert np.array_equal(copied.split("photos")["chan_mean"], means)
    assert np.array_equal(_nap_scores(out, "photos"), _nap_by_hand(path, "photos"))


def test_means_stored_twice_are_read_as_the_features(random_digits, tmp_path, monkeypatch):
    # chan_mean stored again instead of linked, and no attribute saying so (another writer's cache):
    # equal checksums say the bytes are the features', so they are not read a second time
    from featcache.cache import store as stores

    path = copy(random_digits["h5"], tmp_path)
    with h5py.File(path, "r+") as fh:
        group = fh["splits/photos"]
        features = group["features"][...]
        del group["chan_mean"]
        group["chan_mean"] = features
        del group.attrs["chan_mean_is_features"]
    restamp(path)
    nodes = []
    honest = stores.H5Store.blocks

    def recorded(self, node, out=None):
        nodes.append(node)
        yield from honest(self, node, out)

    monkeypatch.setattr(stores.H5Store, "blocks", recorded)
    assert np.array_equal(_nap_scores(path, "photos"), _nap_by_hand(path, "photos"))
    assert "/splits/photos/features" in nodes and "/splits/photos/chan_mean" not in nodes


@pytest.mark.parametrize("fmt", ["h5", "zarr"])
def test_nap_scores_the_very_bytes_it_checked(random_digits, fmt, monkeypatch):
    # NAP reads the pre-pool maxima a run at a time: each run is hashed as it is used, so bytes that
    # change between a check and a read cannot be scored, and each is read from the store once
    from featcache.cache import store as stores
    from featcache.cache.reader import ChecksumMismatch
    from featcache.replay import sweep_batch

    store_class = stores.H5Store if fmt == "h5" else stores.ZarrStore
    honest = store_class.blocks
    reads = []

    def changed_on_the_way(self, node, out=None):
        for start, stop, rows in honest(self, node, out):
            if node.endswith("chan_max"):
                reads.append(node)
                if node.endswith("photos/chan_max") and start == 0:
                    rows = rows + 1  # what a concurrent writer would hand over after the check
            yield start, stop, rows

    monkeypatch.setattr(store_class, "blocks", changed_on_the_way)
    monkeypatch.setattr(store_class, "read", lambda *a, **k: pytest.fail("chan_max read whole or twice"))
    with pytest.raises(ChecksumMismatch, match="photos.*chan_max"):
        sweep_batch(random_digits[fmt], [("nap", {"eps": 1.0})])
    assert len(reads) == len(set(reads))  # each pre-pool array streamed once
