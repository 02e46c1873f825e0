"""Pseudo-OOD for any data set: `generator: corrupt` over every source format, the `pseudo_ood:`
shorthand, OOD groups, and the whole chain extract -> sweep -> select -> report on image folders
made here with a random-weight torchvision ResNet-18, selection unchanged when the test OOD changes."""

import csv
import pickle

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import featcache
from featcache.cli import main
from featcache.config import load_pipeline
from featcache.errors import FeatcacheError
from featcache.extract.corruptions import CORRUPTIONS, corrupt, sample_rng
from featcache.extract.datasets import load_dataset

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
TRANSFORM = {"resize": 36, "crop": 32, "normalize": {"mean": MEAN, "std": STD}}


def write_images(folder, n, seed, size=(40, 48), tint=0):
    """Smooth random colour fields (so blurs and zooms change them), one PNG each."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = rng.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size[1], size[0]), Image.BILINEAR)
        pixels = np.clip(np.asarray(img, np.int16) + tint, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")


def by_hand(path_or_array, transform, corruption, severity, seed, sample_id):
    """The ImageNet-C order, computed here: resize, crop, corrupt (uint8), then /255 and normalise."""
    from torchvision import transforms as T

    image = Image.fromarray(path_or_array) if isinstance(path_or_array, np.ndarray) else Image.open(path_or_array).convert("RGB")
    if transform.get("resize"):
        image = T.Resize(transform["resize"], antialias=True)(image)
    if transform.get("crop"):
        image = T.CenterCrop(transform["crop"])(image)
    pixels = corrupt(np.asarray(image), corruption, severity, sample_rng(seed, sample_id)) / 255.0
    mean, std = np.array(transform["normalize"]["mean"]), np.array(transform["normalize"]["std"])
    return ((pixels - mean) / std).transpose(2, 0, 1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Image folders: an ID set of three classes (train, val, test), three OOD folders, a list file."""
    root = tmp_path_factory.mktemp("pood")
    for split, n, seed in (("train", 6, 0), ("val", 4, 1), ("test", 5, 2)):
        for c, cls in enumerate(("ant", "bee", "cow")):
            write_images(root / split / cls, n, seed * 10 + c, tint=40 * c)
    write_images(root / "ood_far", 10, 100, size=(50, 36), tint=-60)
    write_images(root / "ood_near", 10, 101)
    write_images(root / "ood_other", 12, 102, size=(64, 64), tint=60)
    (root / "near.txt").write_text("".join(f"ood_near/img{i:03d}.png 0\n" for i in range(10)))
    entry = lambda path, role, fmt, **kw: {"source": {"path": str(path), "format": fmt, **kw},  # noqa: E731
                                           "transform": TRANSFORM, "role": role}
    datasets = {
        "tiny_train": entry(root / "train", "id_train", "imagefolder"),
        "tiny_val": entry(root / "val", "id_val", "imagefolder"),
        "tiny_test": entry(root / "test", "id_test", "imagefolder"),
        "far_a": {**entry(root / "ood_far", "ood", "folder"), "group": "far"},
        "near_b": {**entry(root / "near.txt", "ood", "list", root=str(root)), "group": "near"},
        "other_c": entry(root / "ood_other", "ood", "folder"),
    }
    (root / "manifest.yaml").write_text(yaml.safe_dump({"datasets": datasets}))
    return root


GRID = {"msp": {}, "energy": {"T": [1]}, "react": {"percentile": [70, 90]}, "ash_s": {"p": [60, 90]},
        "knn": {"k": [1, 3]}, "nap+energy": {"w": [0.5]}}
PSEUDO = {"of": "tiny_val", "corruptions": "all", "severity": 3, "per_corruption": 6, "seed": 0}


def write_pipeline(root, tmp, name, oods, pseudo=PSEUDO, **extra):
    spec = {"name": name, "manifest": str(root / "manifest.yaml"), "cache": str(tmp / f"{name}.h5"),
            "results": str(tmp / "results"),
            # layer4 is 1x1 on 32x32 images, where NAP is refused: layer3's 2x2 map instead
            "backbone": {"name": "resnet18", "checkpoint": "random", "seed": 0, "kwargs": {"num_classes": 3},
                         "prepool_layer": "layer3.1.relu_1"},
            "extract": {"batch_size": 16, "workers": 0}, "splits": ["tiny_train", "tiny_val", "tiny_test", *oods],
            "sweep": GRID, "select": {"criterion": "auroc", "paper_defaults": {"knn": {"k": 3}}}, **extra}
    if pseudo:
        spec["pseudo_ood"] = pseudo
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def read(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def chain(data, tmp_path_factory):
    """Two pipelines with the same ID data and pseudo-OOD and different test OOD, run end to end."""
    tmp = tmp_path_factory.mktemp("chain")
    out = {}
    for name, oods in (("a", ["far_a", "near_b"]), ("b", ["other_c"])):
        pipeline = write_pipeline(data, tmp, name, oods)
        main(["extract", str(pipeline), "--quiet"])
        main(["sweep", str(pipeline), "--quiet"])
        main(["select", str(pipeline), "--quiet"])
        main(["report", str(pipeline)] + ([] if name == "a" else ["--no-figures"]))
        out[name] = {"pipeline": pipeline, "cache": tmp / f"{name}.h5", "results": tmp / "results" / name}
    return out


def test_shorthand_gives_one_split_per_corruption_with_its_attributes(chain):
    cache = featcache.open_cache(chain["a"]["cache"])
    pseudo = {s.name: s for s in cache.splits("pseudo_ood")}
    assert sorted(pseudo) == sorted(f"tiny_val_c_{c}" for c in CORRUPTIONS)
    val_ids = set(cache.one_split("id_val")["ids"])
    for name, split in pseudo.items():
        corruption = name[len("tiny_val_c_"):]
        assert split.n == 6 and split.attrs["corruption"] == corruption and split.attrs["severity"] == 3
        assert split.attrs["of"] == "tiny_val" and (split["labels"] == -1).all()
        base = {i.rsplit("#", 1)[0] for i in split["ids"]}
        assert base <= val_ids and all(i.endswith(f"#{corruption}@3") for i in split["ids"])
    groups = {s.name: s.attrs.get("group") for s in cache.splits("ood")}
    assert groups == {"far_a": "far", "near_b": "near"}


def test_pseudo_ood_features_are_the_model_on_the_corrupted_images(chain, data):
    """Rows of two pseudo-OOD splits recomputed: images corrupted by hand, through the ResNet."""
    import torchvision

    cache = featcache.open_cache(chain["a"]["cache"])
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    for corruption in ("glass_blur", "frost"):
        split = cache.split(f"tiny_val_c_{corruption}")
        ids = [i.rsplit("#", 1)[0] for i in split["ids"]]
        x = torch.tensor(np.stack([by_hand(data / "val" / i, TRANSFORM, corruption, 3, 0, i) for i in ids]),
                         dtype=torch.float32)
        with torch.no_grad():
            logits = model(x).numpy()
        np.testing.assert_allclose(split["logits"], logits, rtol=1e-4, atol=1e-4)


def test_group_rows_are_the_means_of_their_splits(chain):
    for kind in ("sweep", "selection"):
        rows = read(chain["a"]["results"] / f"{kind}.csv")
        keyed = {}
        for r in rows:
            keyed.setdefault((r["method"], r["params"], r.get("choice")), {})[r["ood"]] = r
        for oods in keyed.values():
            assert list(oods) == ["far_a", "near_b", "group:far", "group:near", "mean"]
            for metric in ("fpr95", "auroc", "aupr_in", "aupr_out"):
                assert float(oods["group:far"][metric]) == pytest.approx(float(oods["far_a"][metric]))
                assert float(oods["group:near"][metric]) == pytest.approx(float(oods["near_b"][metric]))
                assert float(oods["mean"][metric]) == pytest.approx(
                    (float(oods["far_a"][metric]) + float(oods["near_b"][metric])) / 2)
    table = (chain["a"]["results"] / "table.md").read_text()
    page = (chain["a"]["results"] / "report.html").read_text()
    for text in (table, page):
        assert "far_a FPR95" in text and "group:far FPR95" in text and "group:near AUROC" in text and "mean FPR95" in text


def test_selection_does_not_depend_on_the_test_ood_splits(chain):
    """Same ID data and pseudo-OOD, other test OOD: the same configuration is selected for every
    method, though the test OOD results (and so the oracle's search) differ."""
    selected = {}
    for name in ("a", "b"):
        rows = read(chain[name]["results"] / "selection.csv")
        selected[name] = {r["method"]: (r["params"], r["selection_auroc"]) for r in rows
                          if r["choice"] == "selected" and r["ood"] == "mean"}
    assert selected["a"] == selected["b"] and set(selected["a"]) == set(GRID)
    mean_a = {(r["method"], r["params"]): r["auroc"] for r in read(chain["a"]["results"] / "sweep.csv") if r["ood"] == "mean"}
    mean_b = {(r["method"], r["params"]): r["auroc"] for r in read(chain["b"]["results"] / "sweep.csv") if r["ood"] == "mean"}
    assert mean_a.keys() == mean_b.keys() and mean_a != mean_b
    ids = {n: featcache.open_cache(chain[n]["cache"]).split("tiny_val_c_fog")["features"] for n in ("a", "b")}
    np.testing.assert_array_equal(ids["a"], ids["b"])


def test_select_without_pseudo_ood_says_what_to_add_and_where(data, tmp_path, capsys):
    pipeline = write_pipeline(data, tmp_path, "nopseudo", ["far_a"], pseudo=None)
    main(["extract", str(pipeline), "--quiet"])
    with pytest.raises(SystemExit):
        main(["select", str(pipeline), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "`pseudo_ood: {of: tiny_val, corruptions: all, severity: 3, per_corruption: 200}`" in err
    assert f"to {pipeline}" in err and f"featcache extract {pipeline} --overwrite" in err


def test_pipeline_groups_override_the_manifest_at_sweep_time(chain, tmp_path, capsys):
    spec = yaml.safe_load(chain["a"]["pipeline"].read_text())
    spec.update(results=str(tmp_path / "res"), groups={"hard": ["far_a", "near_b"]})
    path = tmp_path / "regroup.yaml"
    path.write_text(yaml.safe_dump(spec))
    main(["sweep", str(path), "--quiet"])
    oods = list(dict.fromkeys(r["ood"] for r in read(tmp_path / "res" / "a" / "sweep.csv")))
    assert oods == ["far_a", "near_b", "group:hard", "mean"]
    spec["groups"] = {"hard": ["other_c"]}
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SystemExit):
        main(["sweep", str(path), "--quiet"])
    assert f"{path}: groups: 'other_c' is not an ood split" in capsys.readouterr().err


# --- `generator: corrupt` over every source format ------------------------------------------------


def write_cifar(folder, n, rng):
    folder.mkdir(parents=True, exist_ok=True)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({"data": data, "labels": list(range(n))}, fh)
    return data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)


def test_corrupt_source_over_every_format_is_resize_crop_corrupt_normalise(data, tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(5)
    cifar = write_cifar(tmp_path / "cifar", 4, rng)
    svhn = rng.integers(0, 256, size=(32, 32, 3, 3), dtype=np.uint8)
    savemat(tmp_path / "svhn.mat", {"X": svhn, "y": np.array([[1], [2], [10]])})
    small = {"resize": 24, "crop": 20, "normalize": {"mean": MEAN, "std": STD}}
    bases = {
        "imagefolder": ({"path": str(data / "val"), "format": "imagefolder"},
                        lambda i: data / "val" / i),
        "folder": ({"path": str(data / "ood_far"), "format": "folder"}, lambda i: data / "ood_far" / i),
        "list": ({"path": str(data / "near.txt"), "format": "list", "root": str(data)}, lambda i: data / i),
        "cifar10": ({"path": str(tmp_path / "cifar"), "format": "cifar10", "part": "test"},
                    lambda i: cifar[int(i.rsplit("/", 1)[1])]),
        "svhn": ({"path": str(tmp_path / "svhn.mat"), "format": "svhn"},
                 lambda i: np.ascontiguousarray(svhn[..., int(i.rsplit("/", 1)[1])])),
    }
    for fmt, (source, original) in bases.items():
        for corruption in ("motion_blur", "elastic_transform"):
            manifest = {"base": {"name": "base", "source": source, "transform": small, "role": "id_val"},
                        "bad": {"name": "bad", "source": {"generator": "corrupt", "of": "base", "corruption": corruption,
                                                          "severity": 4, "seed": 7, "subset": 3},
                                "transform": {}, "role": "pseudo_ood"}}
            dataset = load_dataset("bad", manifest, "m.yaml")
            assert len(dataset) == 3 and (dataset.labels == -1).all()
            for k in range(3):
                image, ok = dataset[k]
                base_id = dataset.ids[k].rsplit("#", 1)[0]
                assert ok and dataset.ids[k] == f"{base_id}#{corruption}@4"
                expected = by_hand(original(base_id), small, corruption, 4, 7, base_id)
                np.testing.assert_allclose(image.numpy(), expected, rtol=1e-5, atol=1e-5, err_msg=f"{fmt} {corruption}")


def test_corrupt_source_over_a_built_in_generator_and_its_shards():
    from featcache.config import load_manifest
    from featcache.extract.datasets import gen_digits, resize
    from tests.conftest import REPO

    manifest = load_manifest(REPO / "data_manifest.yaml")
    manifest["val_fog"] = {"name": "val_fog", "source": {"generator": "corrupt", "of": "digits_val", "corruption": "fog",
                                                         "severity": 2, "seed": 1}, "transform": {}, "role": "pseudo_ood"}
    dataset = load_dataset("val_fog", manifest, "m.yaml")
    images, _, ids = gen_digits("val")
    assert len(dataset) == 270 and list(dataset.ids) == [f"{i}#fog@2" for i in ids]
    for k in (0, 100, 269):
        pixels = np.round(resize(images[k:k + 1], 16)[0] * 255).astype(np.uint8)
        expected = (corrupt(pixels, "fog", 2, sample_rng(1, ids[k])) / 255.0 - 0.3) / 0.4
        np.testing.assert_allclose(dataset[k][0].numpy()[0], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(dataset.subset(k, 270)[0][0].numpy(), dataset[k][0].numpy())
    # the same images through DataLoader workers, in batches
    from torch.utils.data import DataLoader

    from featcache.extract.files import collate

    batches = [b for b, _ in DataLoader(dataset, batch_size=64, num_workers=2, collate_fn=collate)]
    np.testing.assert_array_equal(torch.cat(batches)[269].numpy(), dataset[269][0].numpy())


def test_bad_corrupt_sources_and_shorthands_are_refused_by_name(data, tmp_path):
    manifest = {"base": {"name": "base", "source": {"path": str(data / "val"), "format": "imagefolder"},
                         "transform": TRANSFORM, "role": "id_val"}}
    cases = [({"of": "nope", "corruption": "fog"}, "unknown dataset 'nope'"),
             ({"of": "base", "corruption": "spatter"}, "'spatter' is one of ImageNet-C's validation corruptions"),
             ({"of": "base", "corruption": "fog", "severity": 6}, "severity must be an integer from 1 to 5"),
             ({"of": "base", "corruption": "fog", "subset": 0}, "source.subset must be a positive integer"),
             ({"of": "base", "corruption": "fog", "sevrity": 2}, "unknown field source.sevrity")]
    for source, message in cases:
        manifest["bad"] = {"name": "bad", "source": {"generator": "corrupt", **source}, "transform": {}, "role": "pseudo_ood"}
        with pytest.raises(FeatcacheError, match=message):
            load_dataset("bad", manifest, "m.yaml")
    for pseudo, message in ((dict(PSEUDO, corruptions=["fog", "blur"]), "unknown corruption 'blur'"),
                            (dict(PSEUDO, of="missing"), "unknown dataset 'missing'"),
                            (dict(PSEUDO, per_corruption=-1), "'per_corruption' must be a positive integer"),
                            (dict(PSEUDO, corruption="fog"), "unknown field 'corruption'")):
        pipeline = load_pipeline(write_pipeline(data, tmp_path, "bad", ["far_a"], pseudo=pseudo))
        with pytest.raises(FeatcacheError, match=message):
            pipeline.manifest()


def test_example_pipelines_declare_pseudo_ood_from_their_id_val(monkeypatch):
    from tests.conftest import REPO

    monkeypatch.chdir(REPO)
    for name, of in (("imagenet_resnet50", "imagenet_val_holdout"), ("cifar10_resnet18", "cifar10_val"),
                     ("digits", "digits_val")):
        pipeline = load_pipeline(REPO / "pipelines" / f"{name}.yaml")
        manifest = pipeline.manifest()
        pseudo = [s for s in pipeline.splits if manifest[s]["role"] == "pseudo_ood"]
        assert sorted(pseudo) == sorted(f"{of}_c_{c}" for c in CORRUPTIONS)
        assert manifest[of]["role"] == "id_val"
        assert all(manifest[s]["transform"] == manifest[of]["transform"] for s in pseudo)
        assert all(manifest[s].get("group") for s in pipeline.splits if manifest[s]["role"] == "ood")
