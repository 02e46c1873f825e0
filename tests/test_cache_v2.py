"""Cache schema version 2: content fingerprint, verified reads, upgrade from version 1, and the
crafted caches a reader refuses (issue 12, points 1, 2, 6, 7, 12, 13)."""

import hashlib
import json
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

import featcache
from featcache.cache.convert import convert, merge
from featcache.cache.integrity import Checksum, content_fingerprint
from featcache.cache.reader import ChecksumMismatch
from featcache.cache.verify import verify
from featcache.cli import main
from featcache.errors import FeatcacheError
from tests.cache_helpers import ARRAYS, content_fingerprint_of, fingerprint_text, h5_content, restamp, sha

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from synthetic import make_synthetic_cache  # noqa: E402


def copy(src, tmp_path, name=None):
    dst = tmp_path / (name or Path(src).name)
    (shutil.copytree if Path(src).is_dir() else shutil.copy2)(src, dst)
    return dst


def edited(random_digits, tmp_path, change, stamp=True, name="c.h5"):
    """A copy of the HDF5 cache changed by `change(h5py.File)`; with `stamp`, its checksums and
    fingerprint are rewritten from its arrays, as a writer would have, so only the change is wrong."""
    path = copy(random_digits["h5"], tmp_path, name)
    with h5py.File(path, "r+") as fh:
        change(fh)
    if stamp:
        restamp(path)
    return path


def sweep_fails(tmp_path, capsys, cache, *texts):
    """`featcache sweep` on `cache` ends with one line holding `texts`, exit 1, and no results."""
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "p", "cache": str(cache), "results": str(tmp_path / "res"),
                                        "sweep": {"energy": {}, "nap": {}, "ash_s": {"p": [90]}}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", str(pipeline), "--quiet"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_info.value.code == 1 and len(lines) == 1 and "Traceback" not in err, err
    for text in texts:
        assert text in lines[0], (text, lines[0])
    assert not (tmp_path / "res" / "p" / "sweep.csv").exists()
    return lines[0]


# --- point 1: the content fingerprint ----------------------------------------------------------------

def test_content_fingerprint_of_a_hand_written_example():
    head = {"weight": "1" * 64, "bias": "2" * 64}
    sums = {key: f"{i}" * 64 for i, key in enumerate(ARRAYS, start=3)}
    text = ("featcache-cache/2\nhead/weight " + "1" * 64 + "\nhead/bias " + "2" * 64 + "\n"
            "splits/a ood\n" + "".join(f"splits/a/{key} {sums[key]}\n" for key in ARRAYS) +
            "splits/b id_test\n" + "".join(f"splits/b/{key} {sums[key]}\n" for key in ARRAYS))
    got = content_fingerprint(head, {"b": ("id_test", sums), "a": ("ood", sums)})  # any order in, sorted out
    assert got == hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("fmt", ["h5", "zarr"])
def test_fingerprint_is_recomputed_from_the_arrays_alone(random_digits, fmt):
    path = random_digits[fmt]
    cache = featcache.open_cache(path)
    assert cache.fingerprint == content_fingerprint_of(path)
    assert cache.attrs["schema"] == "featcache-cache/2"
    if fmt == "h5":
        head, _ = h5_content(path)
        with h5py.File(path, "r") as fh:
            assert json.loads(fh["head"].attrs["checksums"]) == head


def test_any_different_number_gives_another_fingerprint(random_digits, tmp_path):
    def nudge(fh):
        x = fh["splits/letters/features"][...]
        x[7, 3] = np.nextafter(x[7, 3], np.float32(np.inf))
        fh["splits/letters/features"][...] = x

    other = edited(random_digits, tmp_path, nudge)  # a cache written with that one number different
    a, b = featcache.open_cache(random_digits["h5"]), featcache.open_cache(other)
    assert a.fingerprint != b.fingerprint and b.fingerprint == content_fingerprint_of(other)
    assert all(c.ok for c in verify(other))


def test_checksum_streamed_in_blocks_and_threads_equals_one_hash(rng):
    values = rng.standard_normal((3000, 700)).astype(np.float32)  # blocks above the threading threshold
    digest = Checksum(False, threaded=True)
    for start in range(0, 3000, 700):
        digest.update(values[start:start + 700])
    assert digest.hexdigest() == hashlib.sha256(values.tobytes()).hexdigest()
    ids = Checksum(True)
    for block in (["a/1", "b"], [], ["c"]):
        ids.update(block)
    assert ids.hexdigest() == hashlib.sha256(b"a/1\nb\nc").hexdigest()


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_multi_block_arrays_read_verified_and_damage_found(tmp_path, suffix):
    """Arrays of several 8 MiB blocks (the threaded path) read back equal, and a change is refused."""
    path = make_synthetic_cache(tmp_path / f"big{suffix}", d=512, k=10, chunk=4000, splits={
        "train": ("id_train", 100), "val": ("id_val", 100), "test": ("id_test", 9000), "far": ("ood", 100)})
    if suffix == ".h5":
        with h5py.File(path, "r") as fh:
            expected = fh["splits/test/chan_max"][...]
    else:
        import zarr

        expected = np.asarray(zarr.open_group(str(path), mode="r")["splits/test/chan_max"][...])
    with featcache.open_cache(path) as cache:
        assert cache.fingerprint == content_fingerprint_of(path)
        assert cache.split("test")["chan_max"].tobytes() == expected.tobytes()
    assert all(c.ok for c in verify(path))
    if suffix == ".h5":
        with h5py.File(path, "r+") as fh:
            fh["splits/test/chan_max"][8500, 5] += 1.0  # in the last block
        with pytest.raises(ChecksumMismatch, match="split 'test' dataset 'chan_max'"):
            featcache.open_cache(path).split("test")["chan_max"]


# --- point 1: version 1 refused, `featcache upgrade` ------------------------------------------------

def make_v1(path):
    """What a version-1 writer left: schema 1, an ids-and-head fingerprint, no head checksums, no precision/device."""
    if str(path).endswith(".zarr"):
        import zarr

        root = zarr.open_group(str(path), mode="r+")
        head, attrs = root["head"].attrs, root.attrs
    else:
        fh = h5py.File(path, "r+")
        head, attrs = fh["head"].attrs, fh.attrs
    del head["checksums"]
    attrs["schema"], attrs["fingerprint"] = "featcache-cache/1", "0" * 64
    for key in ("precision", "device"):
        if key in attrs:
            del attrs[key]
    if not str(path).endswith(".zarr"):
        fh.close()
    return path


@pytest.mark.parametrize("fmt", ["h5", "zarr"])
def test_version_1_is_refused_then_upgraded_in_place(random_digits, tmp_path, capsys, fmt):
    original = featcache.open_cache(random_digits[fmt]).fingerprint
    path = make_v1(copy(random_digits[fmt], tmp_path))
    line = sweep_fails(tmp_path, capsys, path, "featcache-cache/1", "featcache-cache/2", f"featcache upgrade {path}")
    assert "version 1" in line and "version 2" in line
    main(["upgrade", str(path)])
    assert "upgraded from featcache-cache/1 to featcache-cache/2" in capsys.readouterr().out
    with featcache.open_cache(path) as cache, featcache.open_cache(random_digits[fmt]) as before:
        assert cache.fingerprint == original == content_fingerprint_of(path)
        assert cache.attrs["precision"] == "unknown (featcache-cache/1)"
        for name in cache.split_names:  # only attributes were rewritten
            for key in ARRAYS:
                assert sha(cache.store.read(f"/splits/{name}/{key}")) == sha(before.store.read(f"/splits/{name}/{key}"))
    assert all(c.ok for c in verify(path))
    main(["upgrade", str(path)])
    assert "already featcache-cache/2" in capsys.readouterr().out


def test_upgrade_refuses_a_damaged_version_1_cache(random_digits, tmp_path, capsys):
    path = make_v1(copy(random_digits["h5"], tmp_path))
    with h5py.File(path, "r+") as fh:
        fh["splits/photos/logits"][3, 1] += 0.5
    with pytest.raises(SystemExit) as exit_info:
        main(["upgrade", str(path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "split 'photos' dataset 'logits'" in err and "not upgraded" in err
    with h5py.File(path, "r") as fh:
        assert fh.attrs["schema"] == "featcache-cache/1" and "checksums" not in fh["head"].attrs


# --- point 2: every read checked against its checksum ----------------------------------------------

def test_edited_array_is_refused_on_read_whole_or_sliced(random_digits, tmp_path, capsys):
    path = edited(random_digits, tmp_path, lambda f: f["splits/photos/features"].__setitem__((5, 2), 7.0), stamp=False)
    cache = featcache.open_cache(path)  # attributes untouched: opening is fine
    with pytest.raises(ChecksumMismatch, match=r"c\.h5: split 'photos' dataset 'features'"):
        cache.split("photos")["features"]
    with pytest.raises(ChecksumMismatch, match="split 'photos' dataset 'features'"):
        cache.split("photos").read("features", slice(0, 2))  # rows that were not edited, same refusal
    assert cache.split("photos").read("logits", slice(0, 2)).shape[0] == 2  # other datasets read fine
    sweep_fails(tmp_path, capsys, path, "c.h5", "split 'photos' dataset 'features'", "checksum")


def test_edited_head_is_refused(random_digits, tmp_path, capsys):
    path = edited(random_digits, tmp_path, lambda f: f["head/bias"].__setitem__(0, 3.0), stamp=False)
    with pytest.raises(ChecksumMismatch, match="head bias"):
        featcache.open_cache(path).head_bias
    sweep_fails(tmp_path, capsys, path, "c.h5", "head bias")


def test_zarr_store_with_a_deleted_chunk_is_refused(random_digits, tmp_path, capsys):
    path = copy(random_digits["zarr"], tmp_path)
    chunks = sorted((path / "splits" / "photos" / "features" / "c").rglob("*"))
    next(c for c in chunks if c.is_file()).unlink()  # reads back as fill values
    line = sweep_fails(tmp_path, capsys, path, "split 'photos' dataset 'features'", "checksum")
    assert "digits.zarr" in line
    assert any("photos/features: checksum DIFFERS" in c.what for c in verify(path) if not c.ok)


def test_edited_checksum_or_role_attribute_is_refused_on_open(random_digits, tmp_path, capsys):
    def fake(fh):  # someone "fixes" a damaged array by storing its new checksum
        sums = json.loads(fh["splits/letters"].attrs["checksums"])
        sums["logits"] = "f" * 64
        fh["splits/letters"].attrs["checksums"] = json.dumps(sums)

    path = edited(random_digits, tmp_path, fake, stamp=False)
    with pytest.raises(FeatcacheError, match="fingerprint"):
        featcache.open_cache(path)
    role = edited(random_digits, tmp_path, lambda f: f["splits/letters"].attrs.__setitem__("role", "pseudo_ood"),
                  stamp=False, name="role.h5")
    sweep_fails(tmp_path, capsys, role, "role.h5", "fingerprint")


# --- point 7: shapes, roles, n, complete ------------------------------------------------------------

@pytest.mark.parametrize("change, texts", [
    (lambda f: f["splits/letters"].attrs.__setitem__("role", "odd"), ["split 'letters' has role 'odd'", "one of"]),
    (lambda f: f["splits/letters"].attrs.__setitem__("complete", "false"), ["'complete' is 'false', not a boolean"]),
    (lambda f: f["splits/letters"].attrs.__setitem__("n", 499), ["'letters' dataset 'features' has 500 rows",
                                                                 "n = 499"]),
    (lambda f: (f["splits/letters"].__delitem__("labels"),
                f["splits/letters"].create_dataset("labels", data=np.full(499, -1, np.int64))),
     ["'letters' dataset 'labels' has 499 rows", "n = 500"]),
    (lambda f: f["splits/letters"].attrs.__setitem__("n", 10**12), ["has 500 rows", "n = 1000000000000"]),
    (lambda f: (f["splits/letters"].__delitem__("logits"),
                f["splits/letters"].create_dataset("logits", data=np.zeros((500, 9), np.float32))),
     ["split 'letters' logits have width 9, the head has 10 classes"]),
])
def test_inconsistent_split_is_refused_on_open(random_digits, tmp_path, capsys, change, texts):
    path = edited(random_digits, tmp_path, change)
    sweep_fails(tmp_path, capsys, path, "c.h5", *texts)


def test_a_small_file_claiming_10_to_the_12_rows_ends_in_one_line(random_digits, tmp_path, capsys):
    n = 10**12

    def huge(fh):
        group = fh["splits/photos"]
        for key in ARRAYS:
            shape, dtype = (n,) + group[key].shape[1:], group[key].dtype
            del group[key]
            group.create_dataset(key, shape=shape, dtype=dtype, chunks=(1024,) + shape[1:])  # nothing allocated
        group.attrs["n"] = n
        sums = {key: "0" * 64 for key in ARRAYS}  # whatever the claim: checked only once read
        group.attrs["checksums"] = json.dumps(sums)

    path = edited(random_digits, tmp_path, huge, stamp=False)
    head, splits = h5_content_without(path, "photos")
    splits["photos"] = ("ood", {key: "0" * 64 for key in ARRAYS})
    with h5py.File(path, "r+") as fh:
        fh.attrs["fingerprint"] = hashlib.sha256(fingerprint_text(head, splits).encode()).hexdigest()
    assert path.stat().st_size < 20 << 20
    sweep_fails(tmp_path, capsys, path, "c.h5", "split 'photos'", "more than this machine's", "memory")


def h5_content_without(path, skip):
    """h5_content of every split but `skip` (whose arrays are not to be read)."""
    with h5py.File(path, "r") as fh:
        head = {key: sha(fh[f"head/{key}"][...]) for key in ("weight", "bias")}
        splits = {name: (str(g.attrs["role"]), {key: sha(g[key][...]) for key in ARRAYS})
                  for name, g in fh["splits"].items() if name != skip}
    return head, splits


# --- point 12: a cache holds its own bytes ----------------------------------------------------------

def _external_storage(tmp_path):
    def change(fh):
        labels = fh["splits/letters/labels"][...]
        raw = tmp_path / "labels.bin"
        raw.write_bytes(labels.astype("<i8").tobytes())
        del fh["splits/letters/labels"]
        fh.create_dataset("splits/letters/labels", shape=labels.shape, dtype="<i8",
                          external=[(str(raw), 0, labels.nbytes)])
    return change


def _external_link(tmp_path):
    def change(fh):
        with h5py.File(tmp_path / "other.h5", "w") as other:
            other["x"] = fh["splits/letters/labels"][...]
        del fh["splits/letters/labels"]
        fh["splits/letters/labels"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/x")
    return change


def _virtual(tmp_path):
    def change(fh):
        labels = fh["splits/letters/labels"][...]
        with h5py.File(tmp_path / "source.h5", "w") as other:
            other["x"] = labels
        layout = h5py.VirtualLayout(shape=labels.shape, dtype=labels.dtype)
        layout[:] = h5py.VirtualSource(str(tmp_path / "source.h5"), "x", shape=labels.shape)
        del fh["splits/letters/labels"]
        fh.create_virtual_dataset("splits/letters/labels", layout)
    return change


@pytest.mark.parametrize("make, text", [
    (_external_storage, "/splits/letters/labels stores its data in external file"),
    (_external_link, "/splits/letters/labels is an external link to"),
    (_virtual, "/splits/letters/labels is a virtual dataset"),
    (lambda tmp: lambda f: f.__setitem__("splits/letters/extra", h5py.SoftLink("/head/bias")),
     "/splits/letters/extra is a soft link"),
])
def test_hdf5_cache_reaching_outside_itself_is_refused(random_digits, tmp_path, capsys, make, text):
    path = edited(random_digits, tmp_path, make(tmp_path), stamp=False)
    line = sweep_fails(tmp_path, capsys, path, "c.h5", text, "must hold its own bytes")
    assert line.count("\n") == 0
    with pytest.raises(FeatcacheError, match="must hold its own bytes"):
        convert(path, tmp_path / "out.h5")
    assert not (tmp_path / "out.h5").exists()


# --- point 13: plain split names and sample ids -----------------------------------------------------

@pytest.mark.parametrize("name", ["..", "a\\b", "tab\there"])
def test_split_name_that_is_not_plain_is_refused(random_digits, tmp_path, capsys, name):
    path = edited(random_digits, tmp_path, lambda f: f.move("splits/letters", f"splits/{name}"))
    sweep_fails(tmp_path, capsys, path, "c.h5", f"split name {name!r} is not a plain name")


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/abs/path", "a/./b", "new\nline", "back\\slash", ""])
def test_sample_id_that_is_not_a_plain_relative_name_is_refused(random_digits, tmp_path, capsys, bad):
    def change(fh):
        ids = fh["splits/photos/ids"].asstr()[...].tolist()
        ids[3] = bad
        del fh["splits/photos/ids"]
        fh.create_dataset("splits/photos/ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())

    path = edited(random_digits, tmp_path, change)  # checksums agree: only the id is wrong
    with pytest.raises(FeatcacheError, match=r"split 'photos' dataset 'ids': sample 3 has id"):
        featcache.open_cache(path).split("photos")["ids"]
    with pytest.raises(FeatcacheError, match="sample 3 has id"):
        convert(path, tmp_path / "out.zarr")
    assert not (tmp_path / "out.zarr").exists()


# --- point 6: convert and merge refuse a damaged source ---------------------------------------------

def flip_a_byte(path, dataset):
    """Flip one bit of one stored byte of `dataset` in the file itself, as a bad disk would."""
    with h5py.File(path, "r") as fh:
        offset = fh[dataset].id.get_chunk_info(0).byte_offset + 17
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.parametrize("target", ["out.zarr", "out.h5"])
def test_convert_refuses_a_damaged_source_and_writes_nothing(random_digits, tmp_path, target):
    path = copy(random_digits["h5"], tmp_path)
    flip_a_byte(path, "splits/digits_id_train/chan_max")
    with pytest.raises(ChecksumMismatch, match="split 'digits_id_train' dataset 'chan_max'"):
        convert(path, tmp_path / target)
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())


def test_merge_refuses_a_damaged_shard_and_writes_nothing(random_digits, tmp_path):
    shards = []
    for i in range(2):  # two copies stamped as the shards of one extraction: a complete set
        shard = copy(random_digits["h5"], tmp_path, f"s{i}.h5")
        with h5py.File(shard, "r+") as fh:
            fh.attrs["shard"] = f"{i}/2"
        shards.append(shard)
    assert featcache.open_cache(merge(shards, tmp_path / "ok.h5")).split("letters").n == 1000
    flip_a_byte(shards[1], "splits/letters/logits")
    with pytest.raises(ChecksumMismatch, match=r"s1\.h5: split 'letters' dataset 'logits'"):
        merge(shards, tmp_path / "merged.h5")
    assert not any(p.name.startswith("merged") for p in tmp_path.iterdir())


# --- verify and info on version 2 -------------------------------------------------------------------

def test_verify_recomputes_the_content_fingerprint(random_digits, capsys):
    checks = verify(random_digits["zarr"])
    assert all(c.ok for c in checks)
    assert any(c.what == "fingerprint recomputed from the content matches" for c in checks)
    assert any(c.what == "head/weight: checksum matches" for c in checks)


def test_info_shows_the_version_2_attributes(random_digits, capsys):
    main(["info", str(random_digits["h5"])])
    out = capsys.readouterr().out
    for key in ("schema: featcache-cache/2", "precision:", "device:", "prepool_size:", "preprocessing:"):
        assert key in out, key
    preprocessing = json.loads(featcache.open_cache(random_digits["h5"]).attrs["preprocessing"])
    for name in preprocessing:
        assert f"    {name}: " in out
