"""torchvision backbones on small generated image folders: schema, logits, channel statistics
against the model's own feature map, sharding, bad images, CIFAR/SVHN readers, autocast."""

import pickle

import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image

import featcache
from featcache.cache.convert import merge
from featcache.cache.schema import SPLIT_ARRAYS
from featcache.cache.verify import verify
from featcache.cli import main
from featcache.config import load_manifest, load_pipeline
from featcache.errors import FeatcacheError
from featcache.extract.datasets import load_dataset
from featcache.extract.runner import extract, prepare_backbone

TRANSFORM = {"resize": 40, "crop": 32, "normalize": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}


def write_images(folder, n, rng, size=(48, 40)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 3), ("test", 5)):
        for cls in ("cat", "dog", "fox"):
            write_images(root / split / cls, n, rng)
    write_images(root / "ood_flat", 9, rng, size=(64, 50))
    (root / "ood_list.txt").write_text("\n".join(f"ood_flat/img{i:03d}.png" for i in range(0, 9, 2)) + "\n")
    manifest = {"datasets": {
        "tiny_train": {"source": {"path": str(root / "train"), "format": "imagefolder"}, "transform": TRANSFORM, "role": "id_train"},
        "tiny_val": {"source": {"path": str(root / "val"), "format": "imagefolder"}, "transform": TRANSFORM, "role": "id_val"},
        "tiny_test": {"source": {"path": str(root / "test"), "format": "imagefolder"}, "transform": TRANSFORM,
                      "role": "id_test", "size": 15},
        "tiny_ood": {"source": {"path": str(root / "ood_flat"), "format": "folder"}, "transform": TRANSFORM, "role": "ood"},
        "tiny_ood_list": {"source": {"path": str(root / "ood_list.txt"), "format": "list", "root": str(root)},
                          "transform": TRANSFORM, "role": "ood"},
    }}
    (root / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    return root


def pipeline_for(root, tmp, backbone, **extract_options):
    spec = {"name": backbone, "manifest": str(root / "manifest.yaml"), "cache": str(tmp / f"{backbone}.h5"),
            "backbone": {"name": backbone, "checkpoint": "random", "seed": 0, "kwargs": {"num_classes": 3}},
            "extract": {"batch_size": 4, "workers": 0, **extract_options},
            "splits": ["tiny_train", "tiny_val", "tiny_test", "tiny_ood", "tiny_ood_list"]}
    path = tmp / f"{backbone}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def feature_map(model, name, x):
    """The last feature map before pooling, computed by calling the model's modules directly."""
    with torch.no_grad():
        if name.startswith("resnet"):
            x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
            return model.layer4(model.layer3(model.layer2(model.layer1(x))))
        if name == "mobilenet_v2":
            return model.features(x)
        if name == "densenet121":
            return torch.nn.functional.relu(model.features(x))
        if name == "vgg16":
            return model.features[:-1](x)  # the last ReLU map, before the final max-pool
    raise ValueError(name)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
def test_torchvision_backbone_on_image_folders(folders, tmp_path, backbone):
    pipeline = load_pipeline(pipeline_for(folders, tmp_path, backbone))
    cache_path = extract(pipeline, progress=False)
    assert all(c.ok for c in verify(cache_path)), [c.what for c in verify(cache_path) if not c.ok]
    cache = featcache.open_cache(cache_path)
    test = cache.split("tiny_test")
    assert test.n == 15 and sorted(set(test["labels"])) == [0, 1, 2]
    assert test["ids"][0] == "cat/img000.png"
    assert (cache.split("tiny_ood")["labels"] == -1).all() and cache.split("tiny_ood_list").n == 5
    model, _ = prepare_backbone(pipeline, load_manifest(folders / "manifest.yaml"), progress=False)
    manifest = load_manifest(folders / "manifest.yaml")
    for name in ("tiny_test", "tiny_ood"):
        data = load_dataset(name, manifest, "m")
        images = torch.stack([data[i][0] for i in range(len(data))])
        fmap = feature_map(model, backbone, images).double().numpy()
        split = cache.split(name)
        np.testing.assert_allclose(split["chan_max"], fmap.max(axis=(2, 3)), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(split["chan_mean"], fmap.mean(axis=(2, 3)), rtol=1e-5, atol=1e-5)
        w, b = cache.head_weight.astype(np.float64), cache.head_bias.astype(np.float64)
        np.testing.assert_allclose(split["logits"], split["features"] @ w.T + b, rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            live = model(images).double().numpy()
        np.testing.assert_allclose(split["logits"], live, rtol=1e-4, atol=1e-4)


def test_sharded_real_extraction_merges_to_one_run(folders, tmp_path):
    pipeline = load_pipeline(pipeline_for(folders, tmp_path, "resnet18"))
    whole = extract(pipeline, out=tmp_path / "whole.h5", progress=False)
    shards = [extract(pipeline, out=tmp_path / f"s{i}.zarr", progress=False, shard=(i, 2)) for i in range(2)]
    merged = merge(shards, tmp_path / "merged.h5")
    a, b = featcache.open_cache(whole), featcache.open_cache(merged)
    assert a.fingerprint == b.fingerprint
    for name in a.split_names:
        for key in SPLIT_ARRAYS:
            assert a.split(name)[key].tobytes() == b.split(name)[key].tobytes(), (name, key)


def test_autocast_output_is_float32_and_consistent(folders, tmp_path):
    pipeline = load_pipeline(pipeline_for(folders, tmp_path, "resnet18", amp="bf16", workers=2))
    cache_path = extract(pipeline, progress=False)
    assert all(c.ok for c in verify(cache_path))
    assert featcache.open_cache(cache_path).split("tiny_test").dtype("features") == "float32"


def test_unreadable_image_is_refused_with_its_name(folders, tmp_path, capsys):
    broken = tmp_path / "broken"
    for cls in ("a", "b"):
        write_images(broken / cls, 2, np.random.default_rng(1))
    (broken / "b" / "img001.png").write_bytes(b"not a png")
    manifest = yaml.safe_load((folders / "manifest.yaml").read_text())
    manifest["datasets"]["tiny_test"] = {"source": {"path": str(broken), "format": "imagefolder"},
                                         "transform": TRANSFORM, "role": "id_test"}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(manifest))
    pipeline = pipeline_for(folders, tmp_path, "resnet18")
    spec = yaml.safe_load(pipeline.read_text())
    spec["manifest"] = str(tmp_path / "m.yaml")
    pipeline.write_text(yaml.safe_dump(spec))
    with pytest.raises(SystemExit) as exit_info:
        main(["extract", str(pipeline), "--quiet"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and len(err.strip().splitlines()) == 1
    assert "img001.png" in err and "cannot be read" in err


@pytest.mark.parametrize("name, head, prepool, mean_pooled", [
    ("densenet121", "classifier", "relu", True),
    ("vgg16", "classifier.6", "features.29", False),
])
def test_other_architectures(name, head, prepool, mean_pooled):
    from featcache.extract.layers import find_layers
    from featcache.extract.runner import FeatureExtractor

    model = torchvision.models.get_model(name, weights=None, num_classes=5).eval()
    layers = find_layers(model)
    assert (layers.head, layers.prepool, layers.mean_pooled) == (head, prepool, mean_pooled)
    x = torch.randn(2, 3, 64, 64)
    out = FeatureExtractor(model, layers)(x)
    fmap = feature_map(model, name, x).numpy()
    np.testing.assert_allclose(out["chan_max"], fmap.max(axis=(2, 3)), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(out["logits"], model(x).numpy(), rtol=1e-4, atol=1e-4)


def test_cifar_and_svhn_readers(tmp_path):
    from scipy.io import savemat

    from featcache.extract.files import load_files

    rng = np.random.default_rng(0)
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    data = rng.integers(0, 256, size=(6, 3072), dtype=np.uint8)
    with open(batches / "test_batch", "wb") as fh:
        pickle.dump({"data": data, "labels": [3, 1, 4, 1, 5, 9]}, fh)
    cifar = load_files({"path": str(batches), "format": "cifar10", "part": "test"}, {"preset": "cifar"}, "id_test", "c")
    assert len(cifar) == 6 and list(cifar.labels) == [3, 1, 4, 1, 5, 9]
    image, ok = cifar[2]
    assert ok and image.shape == (3, 32, 32)
    expected = (data[2].reshape(3, 32, 32) / 255.0 - np.array([0.4914, 0.4822, 0.4465])[:, None, None]) \
        / np.array([0.2470, 0.2435, 0.2616])[:, None, None]
    np.testing.assert_allclose(image.numpy(), expected, rtol=1e-5, atol=1e-5)
    x = rng.integers(0, 256, size=(32, 32, 3, 4), dtype=np.uint8)
    savemat(tmp_path / "test_32x32.mat", {"X": x, "y": np.array([[10], [1], [2], [10]])})
    svhn = load_files({"path": str(tmp_path / "test_32x32.mat"), "format": "svhn"}, {"preset": "cifar"}, "ood", "s")
    assert len(svhn) == 4 and (svhn.labels == -1).all()
    labelled = load_files({"path": str(tmp_path / "test_32x32.mat"), "format": "svhn"}, {"preset": "cifar"}, "id_test", "s")
    assert list(labelled.labels) == [0, 1, 2, 0]
    with pytest.raises(FeatcacheError, match="does not exist"):
        load_files({"path": str(tmp_path / "nope"), "format": "imagefolder"}, {}, "ood", "x")


@pytest.mark.parametrize("name", ["imagenet_resnet50", "cifar10_resnet18"])
def test_example_pipelines_are_valid_and_name_missing_data(name, capsys, monkeypatch):
    from featcache.extract.runner import validate_splits
    from tests.conftest import REPO

    monkeypatch.chdir(REPO)
    pipeline = load_pipeline(REPO / "pipelines" / f"{name}.yaml")
    validate_splits(pipeline, pipeline.manifest())
    from featcache.grid import expand_grid

    assert expand_grid(pipeline.sweep)
    with pytest.raises(SystemExit) as exit_info:
        main(["extract", str(REPO / "pipelines" / f"{name}.yaml"), "--out", "/tmp/never-written.h5", "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and len(err.strip().splitlines()) == 1
    assert "data/" in err and ("not found" in err or "does not exist" in err)


def test_checkpoint_as_state_dict_or_whole_model(tmp_path):
    from featcache.extract.backbones import build_backbone, load_checkpoint

    torch.manual_seed(3)
    source = torchvision.models.resnet18(num_classes=4)
    torch.save(source.state_dict(), tmp_path / "state.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "wrapped.pt")
    torch.save(source, tmp_path / "whole.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = source.eval()(x)
    for name in ("state.pt", "wrapped.pt", "whole.pt"):  # a whole model only with the opt-in (test_trust_extract)
        model = load_checkpoint(build_backbone({"name": "resnet18", "kwargs": {"num_classes": 4}}), tmp_path / name,
                                trust=name == "whole.pt").eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected)
