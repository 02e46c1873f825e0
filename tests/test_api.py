"""The Python API (featcache.extract, sweep, select, scores) and `featcache scores`, checked against
computations made here: a hand-run forward pass of a model written in this file, sklearn's metrics
on scores computed with numpy from the cache's arrays."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy.special import logsumexp
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import featcache
from featcache.cli import main
from featcache.errors import FeatcacheError

from tests.conftest import REPO, write_pipeline


class TinyNet(nn.Module):
    """A user's model: conv stem, a block, global average pooling, a linear head."""

    def __init__(self, channels=3, width=8, classes=4):
        super().__init__()
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.block(torch.relu(self.stem(x)))), 1))


def by_hand(model, images):
    """features, chan_max, chan_mean, logits computed directly from the modules."""
    with torch.no_grad():
        fmap = model.block(torch.relu(model.stem(images)))
        features = fmap.mean(dim=(2, 3))
        return features.numpy(), fmap.amax(dim=(2, 3)).numpy(), fmap.mean(dim=(2, 3)).numpy(), model.fc(features).numpy()


def make_splits(seed=0, n=(40, 24, 32, 20, 28), channels=3):
    g = torch.Generator().manual_seed(seed)
    sets = {}
    for (name, role), size, shift in zip((("tr", "id_train"), ("va", "id_val"), ("te", "id_test"), ("o1", "ood"),
                                          ("o2", "ood")), n, (0, 0, 0, 1.5, -1.0)):
        images = torch.randn(size, channels, 8, 8, generator=g) + shift
        labels = torch.randint(0, 4, (size,), generator=g)
        sets[name] = (TensorDataset(images, labels), role)
    return sets


@pytest.fixture(scope="module")
def api_cache(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyNet()
    tmp = tmp_path_factory.mktemp("api")
    splits = make_splits()
    out = featcache.extract(model, splits, tmp / "mine.h5", batch_size=16, progress=False)
    return {"model": model, "splits": splits, "cache": out, "tmp": tmp}


def test_extract_writes_what_the_model_computes(api_cache):
    model, splits = api_cache["model"], api_cache["splits"]
    with featcache.open_cache(api_cache["cache"]) as cache:
        assert cache.attrs["backbone"].endswith("TinyNet")
        np.testing.assert_array_equal(cache.head_weight, model.fc.weight.detach().numpy())
        for name, (data, role) in splits.items():
            split = cache.split(name)
            assert split.role == role
            features, cmax, cmean, logits = by_hand(model, data.tensors[0])
            np.testing.assert_allclose(split.read("features"), features, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(split.read("chan_max"), cmax, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(split.read("chan_mean"), cmean, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(split.read("logits"), logits, rtol=1e-5, atol=1e-5)
            expected = data.tensors[1].numpy() if role.startswith("id_") else np.full(len(data), -1)
            np.testing.assert_array_equal(split.read("labels"), expected)
            assert list(split.read("ids")) == [str(i) for i in range(len(data))]


def test_extract_restores_training_flag_and_accepts_loaders_and_plain_tensors(tmp_path):
    torch.manual_seed(1)
    model = TinyNet(channels=1).train()
    images = torch.rand(30, 1, 8, 8)

    class Plain(Dataset):  # images only, no labels
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i]

    labelled = TensorDataset(images, torch.arange(30) % 4)
    splits = {"a": (DataLoader(labelled, batch_size=7), "id_train"),
              "b": (labelled, "id_val"), "c": {"data": labelled, "role": "id_test"},
              "d": {"data": Plain(), "role": "ood", "group": "far"}}
    out = featcache.extract(model, splits, tmp_path / "x.zarr", progress=False)
    assert model.training
    with featcache.open_cache(out) as cache:
        assert cache.split("d").attrs["group"] == "far"
        np.testing.assert_array_equal(cache.split("b").read("labels"), np.arange(30) % 4)
        np.testing.assert_array_equal(cache.split("d").read("labels"), np.full(30, -1))
        np.testing.assert_allclose(cache.split("d").read("logits"), by_hand(model.eval(), images)[3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, message", [
    ({"a": (None, "id_train")}, "expected a map-style torch Dataset"),
    ({"a": ("x", "id_test", 3)}, "expected (data, role)"),
    ({"a": (TensorDataset(torch.rand(4, 3, 8, 8)), "train_me")}, "role must be one of"),
    ({"a": (DataLoader(TensorDataset(torch.rand(4, 3, 8, 8)), shuffle=True), "id_train")}, "keep the data set's order"),
])
def test_extract_refuses_bad_splits_in_one_line(tmp_path, bad, message):
    with pytest.raises(FeatcacheError) as info:
        featcache.extract(TinyNet(), bad, tmp_path / "x.h5", progress=False)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "x.h5").exists()


def test_extract_needs_every_role_and_names_images_the_model_cannot_take(tmp_path):
    splits = make_splits()
    del splits["va"]
    with pytest.raises(FeatcacheError, match="exactly one id_val"):
        featcache.extract(TinyNet(), splits, tmp_path / "x.h5", progress=False)
    with pytest.raises(FeatcacheError) as info:  # 3-channel images, a 1-channel network
        featcache.extract(TinyNet(channels=1), make_splits(), tmp_path / "y.h5", progress=False)
    assert "split 'tr'" in str(info.value) and "3 channels" in str(info.value) and "takes 1" in str(info.value)


class Flaky(Dataset):
    """A data set that fails once at row `fail_at` (an interruption), then reads normally."""

    def __init__(self, images, fail_at):
        self.images, self.fail_at = images, fail_at

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        if i == self.fail_at:
            self.fail_at = None
            raise KeyboardInterrupt
        return self.images[i], 0


def test_extract_resumes_an_interrupted_run_to_the_same_cache(tmp_path):
    torch.manual_seed(2)
    model = TinyNet()
    splits = make_splits(seed=3)
    whole = featcache.extract(model, splits, tmp_path / "whole.h5", batch_size=8, progress=False)
    flaky = dict(splits)
    flaky["o1"] = (Flaky(splits["o1"][0].tensors[0], fail_at=13), "ood")
    with pytest.raises(KeyboardInterrupt):
        featcache.extract(model, flaky, tmp_path / "resumed.h5", batch_size=8, progress=False)
    assert (tmp_path / "resumed.h5.partial").exists() and not (tmp_path / "resumed.h5").exists()
    resumed = featcache.extract(model, flaky, tmp_path / "resumed.h5", batch_size=8, progress=False)
    with featcache.open_cache(whole) as a, featcache.open_cache(resumed) as b:
        assert a.fingerprint == b.fingerprint
    # other weights: the partial is not resumed
    flaky["o1"] = (Flaky(splits["o1"][0].tensors[0], fail_at=5), "ood")
    with pytest.raises(KeyboardInterrupt):
        featcache.extract(model, flaky, tmp_path / "other.h5", batch_size=8, progress=False)
    with torch.no_grad():
        model.fc.weight.mul_(2)
    out = featcache.extract(model, flaky, tmp_path / "other.h5", batch_size=8, progress=False)
    with featcache.open_cache(out) as c:
        np.testing.assert_allclose(c.split("o1").read("logits"), by_hand(model, splits["o1"][0].tensors[0])[3],
                                   rtol=1e-5, atol=1e-5)


def energy_auroc(id_logits, ood_logits, T=1.0):
    """AUROC of energy (T log sum exp(z / T)), ID as the positive class, from sklearn."""
    s_id, s_ood = T * logsumexp(id_logits / T, axis=1), T * logsumexp(ood_logits / T, axis=1)
    return roc_auc_score(np.r_[np.ones(len(s_id)), np.zeros(len(s_ood))], np.r_[s_id, s_ood])


def test_sweep_returns_the_csv_rows_with_parameters_as_columns(api_cache, tmp_path):
    from featcache.results import read_csv

    grid = {"energy": {"T": [1, 2]}, "ash_s": {"p": [50, 80]}}
    frame = featcache.sweep(api_cache["cache"], grid, out=tmp_path / "s.csv", progress=False)
    assert isinstance(frame, pd.DataFrame)
    on_disk = read_csv(tmp_path / "s.csv")
    assert len(frame) == len(on_disk) == 4 * 3
    for row, disk in zip(frame.to_dict("records"), on_disk):
        assert row["params"] == disk["params"] and row["ood"] == disk["ood"]
        assert row["auroc"] == disk["auroc"] and row["fpr95"] == disk["fpr95"]
        for key, value in json.loads(row["params"]).items():
            assert row[key] == value
    with featcache.open_cache(api_cache["cache"]) as cache:
        id_logits = cache.split("te").read("logits").astype(np.float64)
        for T in (1, 2):
            for ood in ("o1", "o2"):
                got = frame[(frame.method == "energy") & (frame["T"] == T) & (frame.ood == ood)].auroc.item()
                assert got == pytest.approx(energy_auroc(id_logits, cache.split(ood).read("logits").astype(np.float64), T),
                                            abs=1e-12)
    without_out = featcache.sweep(api_cache["cache"], grid, progress=False)
    pd.testing.assert_frame_equal(without_out, frame)


def test_scores_table_matches_a_numpy_computation(api_cache):
    table = featcache.scores(api_cache["cache"], "energy", T=2.0, groups={"o2": "near"})
    assert list(table.columns) == ["split", "role", "group", "id", "label", "score", "prediction"]
    assert json.loads(table.attrs["params"]) == {"T": 2.0}
    with featcache.open_cache(api_cache["cache"]) as cache:
        assert table.attrs["fingerprint"] == cache.fingerprint
        for name, (data, role) in api_cache["splits"].items():
            part = table[table.split == name]
            logits = cache.split(name).read("logits").astype(np.float64)
            np.testing.assert_allclose(part.score.to_numpy(), 2.0 * logsumexp(logits / 2.0, axis=1), rtol=1e-12)
            np.testing.assert_array_equal(part.prediction.to_numpy(), logits.argmax(axis=1))
            assert (part.role == role).all() and list(part.id) == [str(i) for i in range(len(data))]
            assert (part.group == ("near" if name == "o2" else "")).all()
    with pytest.raises(FeatcacheError, match="unknown parameter 'q'"):
        featcache.scores(api_cache["cache"], "energy", q=1)


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".npz"])
def test_scores_command_writes_each_format(api_cache, tmp_path, suffix, capsys):
    pipeline = write_pipeline(tmp_path, cache=api_cache["cache"])
    out = tmp_path / f"scores{suffix}"
    main(["scores", str(pipeline), "--method", "ash_s", "--params", '{"p": 70}', "--out", str(out)])
    expected = featcache.scores(api_cache["cache"], "ash_s", p=70)
    if suffix == ".parquet":
        got = pd.read_parquet(out)
    elif suffix == ".csv":
        got = pd.read_csv(out, keep_default_na=False, dtype={"id": str, "group": str})
    else:
        with np.load(out) as npz:
            got = pd.DataFrame({k: npz[k] for k in npz.files})
    assert list(got.columns) == list(expected.columns)
    np.testing.assert_array_equal(got.score.to_numpy(), expected.score.to_numpy())  # exact, also through text
    assert list(got.id.astype(str)) == list(expected.id) and list(got.split) == list(expected.split)
    with pytest.raises(SystemExit) as exit_info:  # never replaced without being asked
        main(["scores", str(pipeline), "--method", "ash_s", "--out", str(out)])
    assert exit_info.value.code == 1 and "exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["scores", str(pipeline), "--method", "ash_s", "--params", "{p: 1}", "--out", str(tmp_path / "n.csv")])
    assert "not JSON" in capsys.readouterr().err


def test_select_returns_the_selection_rows(digits, tmp_path):
    grid = {"energy": {"T": [1]}, "react": {"percentile": [80, 90]}}
    frame = featcache.select(digits["cache"], grid, benchmark="cifar10", out=tmp_path / "sel.csv", progress=False)
    from featcache.results import read_csv

    on_disk = read_csv(tmp_path / "sel.csv")
    assert len(frame) == len(on_disk) and list(frame.choice) == [r["choice"] for r in on_disk]
    assert list(frame.auroc) == [r["auroc"] for r in on_disk]
    assert set(frame.choice) == {"selected", "paper_default", "oracle"}
    assert "percentile" in frame.columns


# --- channels: grey images and backbones that take 1 or 3 channels ---------------------------------


def grey_pngs(folder, n=6, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L").save(folder / f"{i}.png")
    return folder


def pipeline_with_folder(tmp_path, transform=None, checkpoint="random"):
    manifest = yaml.safe_load((REPO / "data_manifest.yaml").read_text())
    manifest["datasets"]["grey_pngs"] = {"source": {"path": str(grey_pngs(tmp_path / "pngs")), "format": "folder"},
                                         "role": "ood", "transform": transform or {}}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(manifest))
    pipeline = write_pipeline(tmp_path, checkpoint=checkpoint)
    spec = yaml.safe_load(pipeline.read_text())
    spec["manifest"] = str(tmp_path / "m.yaml")
    spec["splits"] = ["digits_id_train", "digits_val", "digits_test", "grey_pngs"]
    spec.pop("pseudo_ood", None)
    pipeline.write_text(yaml.safe_dump(spec))
    return pipeline


def test_grey_pngs_go_through_the_one_channel_digits_backbone(tmp_path):
    from PIL import Image

    pipeline = pipeline_with_folder(tmp_path)
    main(["extract", str(pipeline), "--quiet"])
    with featcache.open_cache(tmp_path / "digits.h5") as cache:
        features = cache.split("grey_pngs").read("features")
        assert json.loads(cache.attrs["preprocessing"])["grey_pngs"]["transform"]["channels"] == 1
    # by hand: the same network on the files read as grey, in [0, 1]
    from featcache.config import load_pipeline
    from featcache.extract.runner import prepare_backbone

    spec = load_pipeline(pipeline)
    model, _ = prepare_backbone(spec, spec.manifest(), progress=False)
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(tmp_path / "pngs" / f"{i}.png"), np.float32) / 255)[None]
                          for i in range(6)])
    from torchvision.models.feature_extraction import create_feature_extractor

    with torch.no_grad():
        node = featcache.open_cache(tmp_path / "digits.h5").attrs["feature_layer"]
        expected = create_feature_extractor(model, [node])(images)[node].flatten(1).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)


def test_channels_the_backbone_cannot_take_are_one_line(tmp_path, capsys):
    pipeline = pipeline_with_folder(tmp_path, transform={"channels": 3})
    with pytest.raises(SystemExit) as exit_info:
        main(["extract", str(pipeline), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and "\n" not in err and "Traceback" not in err
    assert "grey_pngs" in err and "transform.channels is 3" in err and "takes 1" in err
    bad = pipeline_with_folder(tmp_path / "b", transform={"channels": 2})
    with pytest.raises(SystemExit):
        main(["extract", str(bad), "--quiet"])
    assert "transform.channels must be 1 (grey) or 3 (RGB), got 2" in capsys.readouterr().err


def test_grey_generated_images_are_repeated_for_an_rgb_backbone(tmp_path):
    """digits (grey) through torchvision's resnet18 (3 channels): each channel carries the grey image."""
    pipeline = write_pipeline(tmp_path, checkpoint="random")
    spec = yaml.safe_load(pipeline.read_text())
    spec["backbone"] = {"name": "resnet18", "checkpoint": "random", "num_classes": 10, "seed": 0,
                        "prepool_layer": "layer3.1.relu_1"}
    spec["splits"] = ["digits_id_train", "digits_val", "digits_test", "letters"]
    spec.pop("pseudo_ood", None)
    spec.pop("train", None)
    pipeline.write_text(yaml.safe_dump(spec))
    from featcache.config import load_pipeline
    from featcache.extract.datasets import load_dataset
    from featcache.extract.runner import extract

    loaded = load_pipeline(pipeline)
    grey = load_dataset("letters", loaded.manifest(), loaded.manifest_path)
    rgb = load_dataset("letters", loaded.manifest(), loaded.manifest_path, channels=3)
    assert grey.images.shape[1] == 1 and rgb.images.shape[1] == 3
    for c in range(3):
        np.testing.assert_array_equal(rgb.images[:, c], grey.images[:, 0])
    out = extract(loaded, progress=False)
    with featcache.open_cache(out) as cache:
        assert cache.split("letters").n == len(grey)


def test_the_package_exports_the_api_without_importing_torch():
    code = ("import sys, featcache; assert 'torch' not in sys.modules; "
            "print(sorted(n for n in ('extract', 'sweep', 'select', 'scores', 'open_cache') if callable(getattr(featcache, n))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['extract', 'open_cache', 'scores', 'select', 'sweep']"
    import featcache.extract.runner  # noqa: F401  (importing the subpackage's modules keeps the function)

    assert callable(featcache.extract) and featcache.extract.__module__ == "featcache.api"


def test_the_readme_example_runs(tmp_path, monkeypatch):
    import re

    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ash_s" in result.stdout and "react" in result.stdout and "other" in result.stdout
    with featcache.open_cache(tmp_path / "cache" / "api_example.h5") as cache:
        assert sorted(s.name for s in cache.splits()) == ["other", "test", "train", "val"]


# --- what a hostile review found: resume into changed data, labels, dtypes, model state --------------


def interrupted(model, splits, out, name="tr", at=30, batch_size=8):
    """Extract until row `at` of split `name` raises KeyboardInterrupt; returns the Flaky data set."""
    data, role = splits[name]
    flaky = Flaky(data.tensors[0], fail_at=at)
    flaky.labels = data.tensors[1]
    flaky.__class__ = LabelledFlaky
    with pytest.raises(KeyboardInterrupt):
        featcache.extract(model, {**splits, name: (flaky, role)}, out, batch_size=batch_size, progress=False)
    return flaky


class LabelledFlaky(Flaky):
    def __getitem__(self, i):
        image, _ = super().__getitem__(i)
        return image, self.labels[i]


@pytest.mark.parametrize("change", ["image", "labels", "activation"])
def test_resume_refuses_rows_computed_from_other_data_or_code(tmp_path, change, capsys):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(6, 4))
    splits = make_splits(seed=5, n=(40, 16, 16, 16, 16))
    out = tmp_path / "c.h5"
    flaky = interrupted(model, splits, out)
    images, labels = flaky.images.clone(), flaky.labels.clone()
    if change == "image":
        images[5] += 3
    elif change == "labels":
        labels = (labels + 1) % 4
    else:
        model[1] = nn.GELU()  # same weights, same class, other forward code
    featcache.extract(model, {**splits, "tr": (TensorDataset(images, labels), "id_train")}, out, batch_size=8,
                      progress=False)
    with featcache.open_cache(out) as cache:
        split = cache.split("tr")
        with torch.no_grad():
            expected = model(images).numpy()
        np.testing.assert_allclose(split.read("logits"), expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(split.read("labels"), labels.numpy())


def test_labels_must_be_classes_of_the_head_and_images_floats(tmp_path):
    splits = make_splits()
    images, labels = splits["tr"][0].tensors
    with pytest.raises(FeatcacheError, match=r"sample 0 has label 7, not a class of the head \(0..3\)"):
        featcache.extract(TinyNet(), {**splits, "tr": (TensorDataset(images, labels * 0 + 7), "id_train")},
                          tmp_path / "a.h5", progress=False)
    with pytest.raises(FeatcacheError, match="label -1"):  # an id split without labels
        featcache.extract(TinyNet(), {**splits, "te": (TensorDataset(images), "id_test")}, tmp_path / "b.h5",
                          progress=False)
    with pytest.raises(FeatcacheError, match="uint8 tensor; the network takes floating-point images"):
        featcache.extract(TinyNet(), {**splits, "o1": (TensorDataset((images * 50).to(torch.uint8)), "ood")},
                          tmp_path / "c.h5", progress=False)


def test_every_submodule_keeps_its_mode_and_the_first_convolution_run_decides_channels(tmp_path):
    class Declared(nn.Module):  # a 1x1 mixing conv declared before the stem that runs first
        def __init__(self):
            super().__init__()
            self.mix = nn.Conv2d(8, 8, 1)
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(self.bn(self.mix(self.stem(x))).mean(dim=(2, 3)))

    model = Declared().train()
    model.bn.eval()  # frozen BatchNorm while fine-tuning
    featcache.extract(model, make_splits(), tmp_path / "d.h5", progress=False)
    assert model.training and model.mix.training and not model.bn.training


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18", "densenet121", "efficientnet_b0"])
def test_input_channels_of_torchvision_models_whose_stem_is_a_block(name):
    import torchvision

    from featcache.extract.runner import input_channels

    assert input_channels(getattr(torchvision.models, name)(num_classes=3)) == 3
    assert input_channels(TinyNet(channels=1)) == 1
