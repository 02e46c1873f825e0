"""Stage one: the cache written by `featcache extract` against the contract and independent recomputation."""

import numpy as np
import pytest
import torch

import featcache
from featcache.cache.schema import ROOT_ATTRS, SCHEMA, SPLIT_ARRAYS
from featcache.config import load_manifest, load_pipeline
from featcache.extract.backbones import DigitsResNet, load_checkpoint
from featcache.extract.datasets import load_dataset
from featcache.extract.runner import extract
from tests.conftest import REPO, write_pipeline

DTYPES = {"features": "float32", "chan_max": "float32", "chan_mean": "float32", "logits": "float32",
          "labels": "int64", "ids": "str"}


def test_cache_follows_the_schema(digits):
    cache = featcache.open_cache(digits["cache"])
    assert cache.attrs["schema"] == SCHEMA
    for key in ROOT_ATTRS:
        assert cache.attrs.get(key) not in (None, ""), key
    assert len(cache.attrs["fingerprint"]) == 64
    k, d = cache.head_weight.shape
    assert cache.head_bias.shape == (k,)
    roles = [s.role for s in cache.splits()]
    assert sorted(r for r in roles if r.startswith("id_")) == ["id_test", "id_train", "id_val"]
    assert roles.count("ood") >= 3 and roles.count("pseudo_ood") >= 5
    for split in cache.splits():
        assert split.complete and split.attrs["source"] == split.name
        for key in SPLIT_ARRAYS:
            assert split.dtype(key) == DTYPES[key], (split.name, key)
            assert split.shape(key)[0] == split.n
        assert split.shape("features")[1] == d and split.shape("logits")[1] == k
        labels = split["labels"]
        if split.role in ("ood", "pseudo_ood"):
            assert (labels == -1).all()
        else:
            assert ((labels >= 0) & (labels < k)).all()
        if split.role == "pseudo_ood":
            assert split.attrs["corruption"] and 1 <= split.attrs["severity"] <= 5
        assert len(set(split["ids"])) == split.n


def test_default_backbone_reaches_97_percent(digits):
    test = featcache.open_cache(digits["cache"]).one_split("id_test")
    acc = np.mean(test["logits"].argmax(1) == test["labels"])
    assert acc >= 0.97
    assert (digits["checkpoint"].with_name("digits_resnet.pt.sha256")).exists()


def test_logits_equal_features_through_head(digits):
    cache = featcache.open_cache(digits["cache"])
    w, b = cache.head_weight.astype(np.float64), cache.head_bias.astype(np.float64)
    for split in cache.splits():
        np.testing.assert_allclose(split["logits"], split["features"] @ w.T + b, rtol=1e-5, atol=1e-5)


def test_channel_statistics_match_the_prepool_map(digits):
    """chan_max / chan_mean recomputed by running the model's layers by hand, not through featcache."""
    model = load_checkpoint(DigitsResNet(), digits["checkpoint"]).eval()
    manifest = load_pipeline(digits["pipeline"]).manifest()  # with the pseudo_ood shorthand's splits
    cache = featcache.open_cache(digits["cache"])
    for name in ("digits_test", "photos", "digits_val_c_contrast"):
        data = load_dataset(name, manifest, "m")
        images = (torch.from_numpy(data.images) if hasattr(data, "images")
                  else torch.stack([data[i][0] for i in range(len(data))]))
        with torch.no_grad():
            fmap = model.layer3(model.layer2(model.layer1(model.stem(images)))).numpy().astype(np.float64)
        split = cache.split(name)
        np.testing.assert_allclose(split["chan_max"], fmap.max(axis=(2, 3)), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(split["chan_mean"], fmap.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(split["features"], fmap.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)
        assert (split["chan_max"] >= split["chan_mean"] - 1e-6).all()


def test_hdf5_and_zarr_hold_the_same_numbers(random_digits):
    a, b = featcache.open_cache(random_digits["h5"]), featcache.open_cache(random_digits["zarr"])
    assert a.format == "h5" and b.format == "zarr"
    assert a.fingerprint == b.fingerprint
    assert a.split_names == b.split_names
    np.testing.assert_array_equal(a.head_weight, b.head_weight)
    np.testing.assert_array_equal(a.head_bias, b.head_bias)
    for name in a.split_names:
        sa, sb = a.split(name), b.split(name)
        assert {k: v for k, v in sa.attrs.items()} == {k: v for k, v in sb.attrs.items()}
        for key in SPLIT_ARRAYS:
            x, y = sa[key], sb[key]
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)


def test_two_extractions_are_bitwise_equal(random_digits, tmp_path):
    again = extract(load_pipeline(random_digits["pipeline"]), out=tmp_path / "again.h5", progress=False)
    a, b = featcache.open_cache(random_digits["h5"]), featcache.open_cache(again)
    assert a.fingerprint == b.fingerprint
    for name in a.split_names:
        for key in SPLIT_ARRAYS:
            x, y = a.split(name)[key], b.split(name)[key]
            assert x.tobytes() == y.tobytes(), (name, key)


def test_split_not_marked_complete_is_refused(random_digits, tmp_path):
    import h5py

    from featcache.errors import FeatcacheError

    path = tmp_path / "c.h5"
    path.write_bytes(random_digits["h5"].read_bytes())
    with h5py.File(path, "r+") as fh:
        fh["splits/letters"].attrs["complete"] = False
    cache = featcache.open_cache(path)
    with pytest.raises(FeatcacheError, match="letters.*incomplete"):
        cache.split("letters")
    assert cache.split("letters", allow_incomplete=True).n == 500


def test_interrupted_extraction_resumes(random_digits, tmp_path, monkeypatch):
    """A run that dies mid-split leaves only a .partial; running again finishes it, equal to a clean run."""
    from featcache.cache import writer as writer_mod

    pipeline = load_pipeline(random_digits["pipeline"])
    out = tmp_path / "resumed.h5"
    calls = {"n": 0}
    original = writer_mod.SplitWriter.append

    def dying_append(self, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        original(self, batch)

    monkeypatch.setattr(writer_mod.SplitWriter, "append", dying_append)
    with pytest.raises(KeyboardInterrupt):
        extract(pipeline, out=out, progress=False, batch_size=128)
    monkeypatch.setattr(writer_mod.SplitWriter, "append", original)
    assert not out.exists() and writer_mod.partial_path(out).exists()
    extract(pipeline, out=out, progress=False, batch_size=128)
    a, b = featcache.open_cache(random_digits["h5"]), featcache.open_cache(out)
    assert a.fingerprint == b.fingerprint
    for name in a.split_names:
        for key in SPLIT_ARRAYS:
            assert a.split(name)[key].tobytes() == b.split(name)[key].tobytes()


def test_check_logits_refuses_a_non_linear_head():
    from featcache.errors import FeatcacheError
    from featcache.cache.verify import check_logits

    rng = np.random.default_rng(0)
    x = rng.random((8, 5), dtype=np.float32)
    w = rng.normal(size=(3, 5)).astype(np.float32)
    b = rng.normal(size=3).astype(np.float32)
    check_logits(x, (x @ w.T + b).astype(np.float32), w, b, "ok")
    with pytest.raises(FeatcacheError, match="not a plain linear layer"):
        check_logits(x, x @ w.T + b + 1e-2, w, b, "shifted")


def test_model_whose_output_is_not_the_linear_head_is_refused():
    from featcache.errors import FeatcacheError
    from featcache.extract.layers import find_layers

    class Scaled(DigitsResNet):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(FeatcacheError, match="nn.Linear"):
        find_layers(Scaled())


@pytest.mark.parametrize("name, prepool, feature", [
    ("resnet18", "layer4", "flatten"),
    ("mobilenet_v2", "features", "flatten"),
    ("densenet121", "relu", "flatten"),
])
def test_layers_of_torchvision_models(name, prepool, feature):
    import torchvision

    from featcache.extract.layers import find_layers

    layers = find_layers(torchvision.models.get_model(name, weights=None))
    assert layers.prepool.split(".")[0] == prepool or layers.prepool == prepool
    assert layers.feature == feature and layers.mean_pooled


def test_training_the_backbone_is_reproducible(tmp_path):
    """Same seed, same checkpoint bytes: a teammate's `make extract` gives the same cache."""
    from featcache.extract.runner import prepare_backbone

    shas = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        pipeline = write_pipeline(tmp_path / run)
        spec = load_pipeline(pipeline)
        spec.raw["backbone"]["train"].update(epochs=2, min_accuracy=None)
        _, sha = prepare_backbone(spec, load_manifest(REPO / "data_manifest.yaml"), progress=False)
        shas.append(sha)
    assert shas[0] == shas[1]
