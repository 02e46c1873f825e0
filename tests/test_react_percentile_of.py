"""ReAct's clip: the percentile of the id_train features (default) or of the id_val features."""

import math

import numpy as np
import pytest

from featcache.errors import FeatcacheError
from featcache.methods import Fit, Head, SplitData, get_method


def bf_percentile(values, q):
    v = sorted(float(a) for a in values)
    pos = q / 100 * (len(v) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def bf_react_energy(x, w, b, c):
    f = [sum(float(w[j][i]) * min(float(x[i]), c) for i in range(len(x))) + float(b[j]) for j in range(len(b))]
    m = max(f)
    return m + math.log(sum(math.exp(a - m) for a in f))


def make(rng, name, n, scale):
    x = (np.maximum(rng.normal(0.2, 1.0, size=(n, 10)), 0) * scale).astype(np.float32)
    return SplitData(name, features=x, chan_max=x, chan_mean=x, logits=np.zeros((n, 3), np.float32),
                     labels=np.zeros(n, int), ids=np.arange(n).astype(str))


@pytest.mark.parametrize("name", ["react", "react+ash_s", "nap+react"])
@pytest.mark.parametrize("of", ["id_train", "id_val"])
def test_clip_is_the_percentile_of_the_chosen_split(rng, name, of):
    train, val, test = make(rng, "train", 50, 1.0), make(rng, "val", 40, 3.0), make(rng, "test", 8, 2.0)
    w, b = rng.normal(size=(3, 10)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    head, fit = Head(w, b), Fit(train, id_val=lambda: val)
    source = {"id_train": train, "id_val": val}[of]
    c = bf_percentile(source.features.ravel(), 85)
    other = bf_percentile({"id_train": val, "id_val": train}[of].features.ravel(), 85)
    assert abs(c - other) > 0.1  # the two splits give clearly different clips here
    method = get_method(name)
    params = method.resolve({"percentile": 85, "percentile_of": of, **({"p": 0} if name == "react+ash_s" else {}),
                             **({"w": 0.5} if name.startswith("nap+") else {})})
    assert params["percentile_of"] == of
    scores = method(test, head, fit, **params).scores
    if name == "nap+react":
        s_nap = [np.mean((np.asarray(r, float) / (np.asarray(r, float) + 1)) ** 2) for r in test.features]
        expected = [math.log(bf_react_energy(x, w, b, c) ** 0.5 * n ** 0.5) for x, n in zip(test.features, s_nap)]
    else:  # ASH-S at p = 0 keeps everything and scales by exp(1)
        scale = math.e if name == "react+ash_s" else 1.0
        expected = [bf_react_energy(np.minimum(x, c) * scale, w, b, np.inf) for x in test.features]
    np.testing.assert_allclose(scores, expected, rtol=1e-5)


def test_default_is_id_train_and_clip_excludes_percentile_of(rng):
    method = get_method("react")
    assert method.resolve({}) == {"percentile": 90, "percentile_of": "id_train"}
    assert method.resolve({"clip": 1.0}) == {"clip": 1.0}
    with pytest.raises(FeatcacheError, match="percentile_of applies only with percentile"):
        method.resolve({"clip": 1.0, "percentile_of": "id_val"})
    with pytest.raises(FeatcacheError, match="percentile_of must be 'id_train' or 'id_val', got 'test'"):
        method.resolve({"percentile_of": "test"})


def test_id_val_without_such_a_split_is_one_clear_error(rng):
    train = make(rng, "train", 20, 1.0)
    head = Head(np.ones((3, 10), np.float32), np.zeros(3, np.float32))
    method = get_method("react")
    with pytest.raises(FeatcacheError, match="react: percentile_of id_val: .*no id_val split"):
        method(train, head, Fit(train), **method.resolve({"percentile_of": "id_val"}))


def test_sweep_reads_id_val_from_the_cache(digits):
    import featcache
    from featcache.replay import load_replay

    cache = featcache.open_cache(digits["cache"])
    replay = load_replay(cache)
    val = cache.one_split("id_val").read("features")
    method = get_method("react")
    params = method.resolve({"percentile": 90, "percentile_of": "id_val"})
    scores = method(replay.id_test, replay.head, replay.fit, **params).scores
    c = bf_percentile(val.ravel(), 90)
    assert replay.fit.feature_percentile(90, "id_val") == pytest.approx(c, rel=1e-6)  # float32 features
    np.testing.assert_allclose(scores, method(replay.id_test, replay.head, replay.fit, clip=c).scores, rtol=1e-5)
