"""The pre-pool map, whatever form the pooling takes; its size in the cache; NAP refused on a 1x1 map;
and models built by `backbone.factory`.

Every channel statistic is compared with the map taken from a forward pass written here (a hook on
the activation module, or the model's layers called by hand), never with the extractor's own output.
"""

import hashlib
import importlib.util
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
import yaml
from PIL import Image
from torch import nn

import featcache
from featcache.cli import main
from featcache.config import load_manifest, load_pipeline
from featcache.errors import FeatcacheError
from featcache.extract.backbones import build_backbone
from featcache.extract.datasets import load_dataset
from featcache.extract.layers import find_layers
from featcache.extract.runner import FeatureExtractor, extract, prepool_size
from featcache.replay import load_replay
from featcache.sweep import run_sweep
from tests.conftest import REPO, write_pipeline

# A DenseNet-BC in the style of the CIFAR DenseNet-BC-100 of DICE, ASH and NAP (DICE's
# models/densenet.py): bottleneck layers concatenated, transitions that pool with F.avg_pool2d, and a
# head that pools functionally, `F.avg_pool2d(relu(bn(out)), 8).view(-1, C)`, then a linear layer.
DENSENET_BC = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn


    class Bottleneck(nn.Module):
        def __init__(self, inp, growth):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(inp)
            self.conv1 = nn.Conv2d(inp, 4 * growth, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(4 * growth)
            self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            out = self.conv1(self.relu(self.bn1(x)))
            out = self.conv2(self.relu(self.bn2(out)))
            return torch.cat([x, out], 1)


    class Transition(nn.Module):
        def __init__(self, inp, out):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(inp)
            self.conv1 = nn.Conv2d(inp, out, 1, bias=False)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            return F.avg_pool2d(self.conv1(self.relu(self.bn1(x))), 2)


    class DenseNetBC(nn.Module):
        def __init__(self, num_classes=10, growth=4, layers=2, in_channels=3, pool=8):
            super().__init__()
            planes = 2 * growth
            self.conv1 = nn.Conv2d(in_channels, planes, 3, padding=1, bias=False)
            stages = []
            for stage in range(3):
                blocks = []
                for _ in range(layers):
                    blocks.append(Bottleneck(planes, growth))
                    planes += growth
                stages.append(nn.Sequential(*blocks))
                if stage < 2:
                    stages.append(Transition(planes, planes // 2))
                    planes //= 2
            self.stages = nn.Sequential(*stages)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.fc = nn.Linear(planes, num_classes)
            self.in_planes = planes
            self.pool = pool

        def forward(self, x):
            out = self.features(x)
            out = F.avg_pool2d(out, self.pool)
            out = out.view(-1, self.in_planes)
            return self.fc(out)

        def features(self, x):
            return self.relu(self.bn1(self.stages(self.conv1(x))))


    def build(**kwargs):
        return DenseNetBC(**kwargs)
''')


@pytest.fixture(scope="module")
def densenet_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "densenet_bc.py"
    path.write_text(DENSENET_BC)
    return path


def import_file(path):
    spec = importlib.util.spec_from_file_location(f"test_prepool_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def randomised(model, seed=0):
    """Random weights and batch-norm statistics, so that the maps are not all alike."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
    return model.eval()


def statistics_of(fmap):
    fmap = fmap.detach().numpy().astype(np.float64)
    return fmap.max(axis=(2, 3)), fmap.mean(axis=(2, 3))


def assert_statistics(model, x, expected_map, prepool=None, mean_pooled=None, size=None):
    layers = find_layers(model)
    if prepool is not None:
        assert layers.prepool == prepool
    if mean_pooled is not None:
        assert layers.mean_pooled == mean_pooled
    extractor = FeatureExtractor(model, layers)
    out = extractor(x)
    chan_max, chan_mean = statistics_of(expected_map)
    np.testing.assert_allclose(out["chan_max"], chan_max, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["chan_mean"], chan_mean, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(out["logits"], model(x).numpy(), rtol=1e-4, atol=1e-4)
    assert prepool_size(extractor, x[:1]) == f"{expected_map.shape[2]}x{expected_map.shape[3]}"
    if size is not None:
        assert tuple(expected_map.shape[2:]) == size
    return layers


def hooked_output(model, module, x):
    """The output of `module` in a plain forward pass of `model`."""
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(out.detach().clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[-1]


def test_resnet18_prepool_is_the_last_block_output():
    torch.manual_seed(0)
    model = randomised(torchvision.models.resnet18(num_classes=5))
    x = torch.randn(2, 3, 64, 64)
    fmap = hooked_output(model, model.layer4, x)
    layers = assert_statistics(model, x, fmap, mean_pooled=True, size=(2, 2))
    assert layers.prepool.startswith("layer4.")


def test_densenet121_prepool_is_the_relu_before_its_functional_pool():
    torch.manual_seed(0)
    model = randomised(torchvision.models.densenet121(num_classes=5))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap = F.relu(model.features(x))  # DenseNet.forward: relu, then adaptive_avg_pool2d
    assert_statistics(model, x, fmap, prepool="relu", mean_pooled=True, size=(2, 2))


def test_vgg16_prepool_is_the_last_relu_before_the_final_max_pool():
    torch.manual_seed(0)
    model = randomised(torchvision.models.vgg16(num_classes=5))
    x = torch.randn(2, 3, 64, 64)
    assert isinstance(model.features[29], nn.ReLU) and isinstance(model.features[30], nn.MaxPool2d)
    fmap = hooked_output(model, model.features[29], x)
    assert_statistics(model, x, fmap, prepool="features.29", mean_pooled=False, size=(4, 4))


def test_mobilenet_v2_prepool_is_the_last_relu6_map():
    torch.manual_seed(0)
    model = randomised(torchvision.models.mobilenet_v2(num_classes=5))
    x = torch.randn(2, 3, 64, 64)
    fmap = hooked_output(model, model.features[18], x)
    assert float(fmap.min()) >= 0 and float(fmap.max()) <= 6  # after ReLU6
    assert_statistics(model, x, fmap, mean_pooled=True, size=(2, 2))


def test_densenet_bc_with_functional_pooling(densenet_file):
    module = import_file(densenet_file)
    torch.manual_seed(0)
    model = randomised(module.DenseNetBC(num_classes=5))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        fmap = model.relu(model.bn1(model.stages(model.conv1(x))))
    chan_max, chan_mean = statistics_of(fmap)
    assert not np.allclose(chan_max, chan_mean)  # an 8x8 map: NAP's ratio is informative
    # avg_pool2d's window is not known without shapes: chan_mean is stored, not linked to features
    assert_statistics(model, x, fmap, prepool="relu", mean_pooled=False, size=(8, 8))


class MeanPooled(nn.Module):
    """Pools with torch.mean over the spatial dims, or with flatten(2).mean(2)."""

    def __init__(self, flatten_first: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(6, 4)
        self.flatten_first = flatten_first

    def forward(self, x):
        out = self.act(self.conv(x))
        pooled = out.flatten(2).mean(2) if self.flatten_first else torch.mean(out, dim=(2, 3))
        return self.fc(pooled)


@pytest.mark.parametrize("flatten_first", [False, True])
def test_mean_over_spatial_dims(flatten_first):
    torch.manual_seed(0)
    model = MeanPooled(flatten_first).eval()
    x = torch.randn(2, 3, 5, 7)
    fmap = hooked_output(model, model.act, x)
    assert_statistics(model, x, fmap, prepool="act", mean_pooled=True, size=(5, 7))


def test_prepool_override_still_wins():
    model = torchvision.models.resnet18(num_classes=3)
    assert find_layers(model, prepool="layer3.1.relu_1").prepool == "layer3.1.relu_1"
    with pytest.raises(FeatcacheError, match="no node 'layer9' for prepool_layer"):
        find_layers(model, prepool="layer9")


# --- the 1x1 map: torchvision's ResNet-18 on 32x32 images -------------------------------------------


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny32")
    rng = np.random.default_rng(0)
    transform = {"normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}

    def write(folder, n, shift):
        folder.mkdir(parents=True)
        for i in range(n):
            pixels = np.clip(rng.normal(128 + shift, 60, size=(32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:02d}.png")

    for part in ("train", "val", "test"):
        for cls, shift in (("a", -40), ("b", 40)):
            write(root / part / cls, 4, shift)
    write(root / "ood", 6, 0)
    write(root / "pseudo", 5, 10)
    datasets = {f"t_{part}": {"source": {"path": str(root / part), "format": "imagefolder"}, "transform": transform,
                              "role": role}
                for part, role in (("train", "id_train"), ("val", "id_val"), ("test", "id_test"))}
    datasets["t_ood"] = {"source": {"path": str(root / "ood"), "format": "folder"}, "transform": transform, "role": "ood"}
    datasets["t_pseudo"] = {"source": {"path": str(root / "pseudo"), "format": "folder"}, "transform": transform,
                            "role": "pseudo_ood"}
    (root / "manifest.yaml").write_text(yaml.safe_dump({"datasets": datasets}))
    return root


def resnet18_pipeline(root, tmp, name, **backbone):
    spec = {"name": name, "manifest": str(root / "manifest.yaml"), "cache": str(tmp / f"{name}.h5"),
            "results": str(tmp / "results"),
            "backbone": {"name": "resnet18", "checkpoint": "random", "seed": 0, "kwargs": {"num_classes": 2}, **backbone},
            "extract": {"batch_size": 8},
            "splits": ["t_train", "t_val", "t_test", "t_ood", "t_pseudo"],
            "sweep": {"energy": {}, "nap+energy": {"w": [0.5]}}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_1x1_map_is_recorded_and_refused_by_nap_only(tiny_images, tmp_path, capsys):
    pipeline = resnet18_pipeline(tiny_images, tmp_path, "flat")
    cache_path = extract(load_pipeline(pipeline), progress=False)
    with featcache.open_cache(cache_path) as cache:
        assert cache.attrs["prepool_size"] == "1x1" and cache.attrs["prepool_layer"] == "layer4.1.relu_1"
        test = cache.one_split("id_test")
        np.testing.assert_array_equal(test["chan_max"], test["chan_mean"])  # why NAP is undefined here

    for command in ("sweep", "select"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, str(pipeline), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 1 and len(err.splitlines()) == 1, err
        assert "nap+energy" in err and "'layer4.1.relu_1' is 1x1" in err and "backbone.prepool_layer" in err

    with pytest.raises(FeatcacheError, match="nap: .*1x1"):
        run_sweep({"nap": {}}, cache_path, tmp_path / "nap.csv", progress=False)
    rows = run_sweep({"energy": {}, "msp": {}}, cache_path, tmp_path / "others.csv", progress=False)
    assert {r["method"] for r in rows} == {"energy", "msp"}
    with featcache.open_cache(cache_path) as cache:  # the last guard: whoever reads chan_max directly
        replay = load_replay(cache)
        assert replay.id_test.features.shape[1] == 512
        with pytest.raises(FeatcacheError, match="split 't_test'.*backbone.prepool_layer"):
            replay.id_test.chan_max


def test_the_override_gives_nap_a_larger_map(tiny_images, tmp_path):
    pipeline = resnet18_pipeline(tiny_images, tmp_path, "override", prepool_layer="layer3.1.relu_1")
    cache_path = extract(load_pipeline(pipeline), progress=False)
    with featcache.open_cache(cache_path) as cache:
        assert cache.attrs["prepool_size"] == "2x2" and cache.attrs["prepool_layer"] == "layer3.1.relu_1"
    rows = run_sweep({"nap+energy": {"w": [0.5]}}, cache_path, tmp_path / "nap.csv", progress=False)
    assert rows and all(np.isfinite(r["auroc"]) for r in rows)


# --- backbone.factory --------------------------------------------------------------------------------


def test_factory_model_extracted_end_to_end(densenet_file, tmp_path):
    factory = f"{densenet_file}:DenseNetBC"
    kwargs = {"num_classes": 10, "in_channels": 1, "pool": 4}  # digits are 16x16 grey: a 4x4 final map
    reference = randomised(import_file(densenet_file).DenseNetBC(**kwargs), seed=1)
    checkpoint = tmp_path / "densenet_bc.pt"
    torch.save({"state_dict": reference.state_dict(), "epoch": 100}, checkpoint)
    pipeline = write_pipeline(tmp_path, name="factory", overrides={
        "backbone": {"factory": factory, "kwargs": kwargs, "checkpoint": str(checkpoint)},
        "splits": ["digits_id_train", "digits_val", "digits_test", "letters"],
    })
    cache_path = extract(load_pipeline(pipeline), progress=False)

    manifest = load_manifest(REPO / "data_manifest.yaml")
    images = torch.from_numpy(load_dataset("digits_test", manifest, REPO / "data_manifest.yaml").images[:40])
    with torch.no_grad():
        fmap = reference.relu(reference.bn1(reference.stages(reference.conv1(images))))
        logits = reference(images).numpy()
    chan_max, chan_mean = statistics_of(fmap)
    with featcache.open_cache(cache_path) as cache:
        attrs = cache.attrs
        assert attrs["backbone"] == factory
        assert attrs["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
        assert (attrs["prepool_layer"], attrs["prepool_size"], attrs["feature_layer"]) == ("relu", "4x4", "view")
        test = cache.one_split("id_test")
        np.testing.assert_allclose(test["chan_max"][:40], chan_max, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(test["chan_mean"][:40], chan_mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(test["features"][:40], chan_mean, rtol=1e-5, atol=1e-5)  # a global 4x4 pool
        np.testing.assert_allclose(test["logits"][:40], logits, rtol=1e-4, atol=1e-4)


def test_factory_as_a_module(densenet_file, monkeypatch):
    monkeypatch.chdir(densenet_file.parent)  # a module beside the pipeline imports from the current directory
    monkeypatch.delitem(sys.modules, "densenet_bc", raising=False)
    model = build_backbone({"factory": "densenet_bc:build", "kwargs": {"num_classes": 3}})
    assert type(model).__name__ == "DenseNetBC" and model.fc.out_features == 3
    model = build_backbone({"factory": "torchvision.models:resnet18", "kwargs": {"num_classes": 4}})
    assert model.fc.out_features == 4


@pytest.mark.parametrize("factory, kwargs, message", [
    ("densenet_bc", {}, "expected \"package.module:callable\""),
    ("densenet_bc.py:", {}, "expected \"package.module:callable\""),
    ("no/such/file.py:Net", {}, "file no/such/file.py not found"),
    ("no_such_module_xyz:Net", {}, "cannot import no_such_module_xyz"),
    ("not a module:Net", {}, "neither a module name nor a .py file"),
    ("{dir}/densenet_bc.py:DenseNetB", {}, "has no attribute 'DenseNetB'; did you mean 'DenseNetBC'"),
    ("{dir}/constant.py:make", {}, "make returned a str, not a torch.nn.Module"),
    ("{dir}/densenet_bc.py:DenseNetBC", {"depth": 3}, "DenseNetBC\\(\\*\\*backbone.kwargs\\) failed: TypeError"),
    ("{dir}/broken.py:Net", {}, "importing .*broken.py failed: ZeroDivisionError"),
    ("{dir}/constant.py:VALUE", {}, "VALUE is not callable \\(it is a int\\)"),
])
def test_bad_factories_fail_with_one_line(densenet_file, factory, kwargs, message):
    folder = densenet_file.parent
    (folder / "broken.py").write_text("x = 1 / 0\n")
    (folder / "constant.py").write_text("VALUE = 3\n\n\ndef make():\n    return 'a model'\n")
    factory = factory.format(dir=folder)
    with pytest.raises(FeatcacheError, match=message) as info:
        build_backbone({"factory": factory, "kwargs": kwargs})
    assert "\n" not in str(info.value) and str(info.value).startswith(f"backbone.factory {factory!r}: ")


def test_pipeline_takes_a_name_or_a_factory_not_both(tmp_path):
    for backbone in ({"name": "resnet18", "factory": "torchvision.models:resnet18"}, {"kwargs": {}}):
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump({"name": "p", "backbone": backbone}))
        with pytest.raises(FeatcacheError, match="'name' or a 'factory'"):
            load_pipeline(path).backbone
