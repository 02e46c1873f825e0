"""nap+X in the NAP paper's form S = S_X^w * S_NAP^(1-w) (seeds/nap-paper.txt, section 4.3 and
Algorithm 1), the rule for S_X <= 0, KNN's positive form, the exp form on request, and the counts of
samples with S_X <= 0 in a sweep's meta file and report."""

import json
import math

import numpy as np
import pytest

from featcache.errors import FeatcacheError
from featcache.methods import Fit, Head, SplitData, get_method

K, D, C = 6, 20, 20


def bf_energy(f):
    m = max(f)
    return m + math.log(sum(math.exp(a - m) for a in f))


def bf_nap(mx, mn):
    return sum((float(a) / (float(b) + 1.0)) ** 2 for a, b in zip(mx, mn)) / len(mx)


def split(rng, n, name, logit_shift=0.0, spread=1.0):
    x = np.maximum(rng.normal(0.3, 1.0, size=(n, D)), 0).astype(np.float32)
    mx = (x + np.abs(rng.normal(size=(n, C)))).astype(np.float32)
    logits = (spread * (x @ split.w.T + split.b) + logit_shift).astype(np.float32)
    return SplitData(name, features=x, chan_max=mx, chan_mean=x.copy(), logits=logits,
                     labels=rng.integers(0, K, size=n), ids=np.array([f"{name}/{i}" for i in range(n)]))


@pytest.fixture
def setup(rng):
    split.w = rng.normal(0, 0.5, size=(K, D)).astype(np.float32)
    split.b = rng.normal(0, 0.1, size=K).astype(np.float32)
    # the head must match the logits for the shaping methods: logit_shift 0 and spread 1 there
    return Head(split.w, split.b), Fit(split(rng, 50, "train"))


def run(name, setup, data, **params):
    head, fit = setup
    method = get_method(name)
    return method(data, head, fit, **method.resolve(params))


def paper_product(s_x, s_nap, w):
    """The paper's S, one sample at a time, in float64."""
    return [float(a) ** w * float(b) ** (1 - w) for a, b in zip(s_x, s_nap)]


def assert_same_ranking(scores, reference):
    """Every pair of samples is ordered alike (ties alike too)."""
    a, b = np.asarray(scores), np.asarray(reference)
    np.testing.assert_array_equal(np.sign(a[:, None] - a[None, :]), np.sign(b[:, None] - b[None, :]))


# --- positive scores: the log of the paper's product ---------------------------------------------

@pytest.mark.parametrize("w", [0.2, 0.4, 0.6, 0.8])
def test_nap_energy_is_the_log_of_lse_power_w_times_nap_power_one_minus_w(rng, setup, w):
    data = split(rng, 40, "s", logit_shift=3.0)  # every energy positive
    energies = [bf_energy([float(v) for v in f]) for f in data.logits]
    s_nap = [bf_nap(mx, mn) for mx, mn in zip(data.chan_max, data.chan_mean)]
    assert min(energies) > 0
    product = paper_product(energies, s_nap, w)
    out = run("nap+energy", setup, data, w=w)
    np.testing.assert_allclose(out.scores, [math.log(s) for s in product], rtol=1e-12, atol=1e-12)
    assert_same_ranking(out.scores, product)
    assert out.nonpositive == 0


@pytest.mark.parametrize("name, params", [("msp", {}), ("ash_s", {"p": 80}), ("react", {"percentile": 85}),
                                          ("dice", {"p": 60}), ("scale", {"p": 70}), ("gradnorm", {}),
                                          ("rg", {"k": 0.5}), ("maxlogit", {})])
def test_paper_form_of_every_positive_base_score(rng, setup, name, params):
    head, _ = setup
    data = split(rng, 30, "s")
    base = run(name, setup, data, **params).scores
    keep = np.flatnonzero(base > 0)  # the positive samples; the others are the rule's, tested below
    s_nap = [bf_nap(mx, mn) for mx, mn in zip(data.chan_max, data.chan_mean)]
    w = 0.35
    out = run(f"nap+{name}", setup, data, w=w, **params)
    product = paper_product(base[keep], np.asarray(s_nap)[keep], w)
    np.testing.assert_allclose(out.scores[keep], [math.log(s) for s in product], rtol=1e-12, atol=1e-12)
    assert_same_ranking(out.scores[keep], product)
    assert out.nonpositive == len(data.features) - len(keep)


# --- S_X <= 0: below every positive sample, ordered by S_X, never NaN ------------------------------

def check_rule(scores, s_x):
    scores, s_x = np.asarray(scores), np.asarray(s_x)
    assert np.isfinite(scores).all()
    pos, nonpos = s_x > 0, s_x <= 0
    if pos.any() and nonpos.any():
        assert scores[nonpos].max() < scores[pos].min()
    order = np.argsort(s_x[nonpos], kind="stable")
    assert (np.diff(scores[nonpos][order]) >= 0).all()  # monotone in S_X
    distinct = np.diff(s_x[nonpos][order]) > 1e-9
    assert (np.diff(scores[nonpos][order])[distinct] > 0).all()  # and strictly where S_X differs


@pytest.mark.parametrize("w", [0.01, 0.3, 0.7, 0.99])
def test_mixed_signs_rank_every_nonpositive_sample_below_every_positive_one(rng, setup, w):
    data = split(rng, 60, "m", logit_shift=-1.5, spread=3.0)  # energies on both sides of 0
    energies = np.array([bf_energy([float(v) for v in f]) for f in data.logits])
    assert (energies > 0).any() and (energies <= 0).any()
    out = run("nap+energy", setup, data, w=w)
    check_rule(out.scores, energies)
    assert out.nonpositive == int((energies <= 0).sum())
    pos = energies > 0
    s_nap = np.array([bf_nap(mx, mn) for mx, mn in zip(data.chan_max, data.chan_mean)])
    np.testing.assert_allclose(out.scores[pos], np.log(paper_product(energies[pos], s_nap[pos], w)), rtol=1e-12)
    # a fixed function of (S_X, S_NAP, w): ID and OOD are compared, so no split's data may move it
    half = data.take(np.arange(0, 60, 2))
    np.testing.assert_allclose(run("nap+energy", setup, half, w=w).scores, out.scores[::2], rtol=1e-12)


def test_rule_holds_whatever_s_nap_and_w():
    from featcache.methods.nap import combine_scores

    tiny = np.nextafter(0.0, 1.0)  # the smallest positive float64: the lowest log a positive S can have
    s_x = np.array([-1e6, -3.0, -1e-6, 0.0, tiny, 1e-300, 1e-6, 2.0, 1e300, tiny, 5.0])
    s_nap = np.array([1e300, 1e300, 1e300, 1e300, tiny, tiny, tiny, 1e-300, 1e-300, 0.0, 0.0])
    for w in (1e-9, 0.01, 0.5, 0.99, 1 - 1e-9):
        scores = combine_scores(s_x, s_nap, w)
        check_rule(scores, s_x)
        # S_X > 0 with S_NAP = 0 is the paper's S = 0: one value, below every S > 0, above every S_X <= 0
        zero = (s_x > 0) & (s_nap == 0)
        assert len(set(scores[zero])) == 1
        assert scores[zero][0] < scores[(s_x > 0) & (s_nap > 0)].min()
        assert scores[zero][0] > scores[s_x <= 0].max()


# --- KNN: S_X = 2 - d --------------------------------------------------------------------------------

def test_knn_uses_two_minus_the_distance(rng, setup):
    head, fit = setup
    data = split(rng, 25, "k")
    k, w = 3, 0.6
    unit = lambda v: v / (np.linalg.norm(v) + 1e-10)  # noqa: E731
    bank = [unit(r.astype(np.float64)) for r in fit.data.features]
    expected, s_x = [], []
    for x, mx, mn in zip(data.features, data.chan_max, data.chan_mean):
        q = unit(x.astype(np.float64))
        d = sorted(math.sqrt(sum((q[i] - b[i]) ** 2 for i in range(D))) for b in bank)[k - 1]
        assert 0 <= d <= math.sqrt(2) + 1e-9  # non-negative features: never antipodal
        s_x.append(2 - d)
        expected.append(math.log((2 - d) ** w * bf_nap(mx, mn) ** (1 - w)))
    out = run("nap+knn", setup, data, w=w, k=k)
    np.testing.assert_allclose(out.scores, expected, rtol=1e-6, atol=1e-6)
    assert min(s_x) > 0 and out.nonpositive == 0
    assert_same_ranking(np.round(out.scores, 9), np.round(expected, 9))


# --- the exp form, on request only --------------------------------------------------------------------

def test_exp_form_on_request_and_recorded(rng, setup):
    data = split(rng, 20, "e", logit_shift=-1.5, spread=3.0)
    method = get_method("nap+energy")
    assert method.resolve({})["form"] == "paper"
    assert method.resolve({"form": "exp"})["form"] == "exp"
    energies = np.array([bf_energy([float(v) for v in f]) for f in data.logits])
    s_nap = np.array([bf_nap(mx, mn) for mx, mn in zip(data.chan_max, data.chan_mean)])
    out = run("nap+energy", setup, data, w=0.3, form="exp")
    # S = exp(E)^w * S_NAP^(1-w): its log, for any sign of E
    np.testing.assert_allclose(out.scores, 0.3 * energies + 0.7 * np.log(s_nap), rtol=1e-12)
    assert out.nonpositive is None
    paper = run("nap+energy", setup, data, w=0.3)
    assert not np.allclose(out.scores, paper.scores)
    with pytest.raises(FeatcacheError, match="form must be 'paper' or 'exp'"):
        method.resolve({"form": "log"})


# --- the counts in a sweep's meta file and report ---------------------------------------------------------

def test_sweep_meta_and_report_count_nonpositive_samples(digits, tmp_path):
    import featcache
    from featcache.report import write_html
    from featcache.sweep import run_sweep

    # RG's additive form with a negative alpha is negative for many samples: a known mix of signs
    grid = {"nap+rg_add": {"w": [0.5], "k": [1.0], "alpha": [-0.3]}, "nap+energy": {"w": [0.5]}}
    out = tmp_path / "res" / "sweep.csv"
    run_sweep(grid, digits["cache"], out, progress=False)
    meta = json.loads((tmp_path / "res" / "sweep.meta.json").read_text())["nap_nonpositive"]
    cache = featcache.open_cache(digits["cache"])
    expected = {}
    for s in [cache.one_split("id_test")] + cache.splits("ood"):
        f = s.read("logits").astype(np.float64)
        lse = f.max(axis=1) + np.log(np.exp(f - f.max(axis=1, keepdims=True)).sum(axis=1))
        g = lse - 0.3 * np.minimum(s.read("features").astype(np.float64), 1.0).sum(axis=1)
        expected[s.name] = int((g <= 0).sum())
    (params, counts), = meta["nap+rg_add"].items()
    assert json.loads(params)["alpha"] == -0.3
    assert counts == expected and 0 < sum(counts.values()) < sum(s.n for s in cache.splits() if s.name in counts)
    assert set(meta["nap+energy"]) and all(c is not None for c in meta["nap+energy"].values())
    page = write_html(tmp_path / "res", "t", []).read_text()
    assert "S_X &lt;= 0" in page and f">{counts['noise']}<" in page
