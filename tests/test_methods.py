"""Every method against a brute-force version written from its formula, one sample at a time."""

import math

import numpy as np
import pytest

from featcache.errors import FeatcacheError
from featcache.methods import Fit, Head, SplitData, get_method

K, D, C = 7, 24, 24


# --- brute-force references (plain Python loops, float64) ----------------------------------------

def bf_logsumexp(v):
    m = max(v)
    return m + math.log(sum(math.exp(a - m) for a in v))


def bf_energy(f, T=1.0):
    return T * bf_logsumexp([a / T for a in f])


def bf_head(x, w, b):
    return [sum(float(w[j][i]) * float(x[i]) for i in range(len(x))) + float(b[j]) for j in range(len(b))]


def bf_keep(x, p):
    """Indices of the k largest entries, k = n - round(n p / 100) half to even; ties: lowest index first."""
    n = len(x)
    k = n - int(round(n * p / 100))  # Python's round is half-to-even too
    return sorted(range(n), key=lambda i: (-x[i], i))[:k], k


def bf_ash(x, p, kind):
    keep, k = bf_keep(list(x), p)
    s1 = sum(float(v) for v in x)
    out = [0.0] * len(x)
    for i in keep:
        out[i] = float(x[i])
    if kind == "p":
        return out
    if kind == "b":
        return [s1 / k if i in keep else 0.0 for i in range(len(x))] if k else [0.0] * len(x)
    s2 = sum(out)
    scale = 1.0 if s2 == 0 else math.exp(s1 / s2)
    return [v * scale for v in out]


def bf_percentile(values, q):
    v = sorted(values)
    pos = q / 100 * (len(v) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def bf_nap(mx, mn, eps=1.0):
    return sum((a / (b + eps)) ** 2 for a, b in zip(mx, mn)) / len(mx)


def bf_std(v):
    mu = sum(v) / len(v)
    return math.sqrt(sum((a - mu) ** 2 for a in v) / len(v))


# --- data ----------------------------------------------------------------------------------------

def make_split(rng, n, name="s", ties=True, scale=1.0, logit_shift=0.0):
    x = np.maximum(rng.normal(0.3, 1.0, size=(n, D)), 0).astype(np.float32) * scale
    if ties:
        x = (np.round(x * 4) / 4).astype(np.float32)  # many exact ties, zeros included
        x[0] = 0.0  # an all-zero feature: s2 = 0 for ASH-S
        x[1, :] = 0.5  # every entry tied
    chan_max = x + np.abs(rng.normal(size=(n, C))).astype(np.float32)
    w = make_split.w
    b = make_split.b
    logits = (x @ w.T + b + logit_shift).astype(np.float32)
    return SplitData(name, features=x, chan_max=chan_max, chan_mean=x.copy(), logits=logits,
                     labels=rng.integers(0, K, size=n), ids=np.array([f"{name}/{i}" for i in range(n)]))


@pytest.fixture
def setup(rng):
    make_split.w = rng.normal(0, 0.5, size=(K, D)).astype(np.float32)
    make_split.b = rng.normal(0, 0.1, size=K).astype(np.float32)
    head = Head(make_split.w, make_split.b)
    fit = Fit(make_split(rng, 60, "train", ties=False))
    data = make_split(rng, 30, "test")
    return head, fit, data


def run(name, setup, data=None, **params):
    head, fit, default = setup
    method = get_method(name)
    return method(data or default, head, fit, **method.resolve(params))


def assert_close(a, b, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=rtol, atol=atol)


# --- logit scores --------------------------------------------------------------------------------

def test_msp_maxlogit_energy(setup):
    _, _, data = setup
    f = data.logits.astype(np.float64)
    msp = [max(math.exp(a - bf_logsumexp(row)) for a in row) for row in f]
    assert_close(run("msp", setup).scores, msp)
    assert_close(run("maxlogit", setup).scores, [max(row) for row in f])
    for T in (1.0, 0.5, 3.0):
        assert_close(run("energy", setup, T=T).scores, [bf_energy(row, T) for row in f])


# --- ASH -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["p", "b", "s"])
@pytest.mark.parametrize("p", [0, 10, 50, 65, 90, 95, 99])
def test_ash_against_brute_force(setup, kind, p):
    head, _, data = setup
    out = run(f"ash_{kind}", setup, p=p)
    expected_logits, expected = [], []
    for x in data.features:
        f = bf_head(bf_ash(x, p, kind), head.weight, head.bias)
        expected_logits.append(f)
        expected.append(bf_energy(f))
    np.testing.assert_array_equal(out.predictions, np.argmax(expected_logits, axis=1))
    assert_close(out.scores, expected, rtol=1e-5, atol=1e-5)
    assert np.isfinite(out.scores).all()
    from featcache.methods import ash

    shaped = {"p": ash.ash_p_features, "b": ash.ash_b_features, "s": ash.ash_s_features}[kind](data.features, p)
    assert_close(shaped, [bf_ash(x, p, kind) for x in data.features], rtol=1e-5, atol=1e-6)


def test_ash_s_with_all_zero_feature_gives_the_bias(setup):
    head, _, data = setup
    out = run("ash_s", setup, p=90)
    assert out.predictions[0] == np.argmax(head.bias)  # row 0 is all zero: s2 = 0, scale 1, logits = b
    assert_close(out.scores[0], bf_energy(head.bias.astype(float)))


def test_ash_keep_count_rounds_half_to_even():
    from featcache.methods.ash import keep_count

    assert keep_count(10, 25) == 8  # 2.5 rounds to 2
    assert keep_count(10, 35) == 6  # 3.5 rounds to 4
    assert keep_count(2048, 65) == 2048 - 1331
    assert keep_count(64, 99.9) == 0


def test_ash_p_at_zero_keeps_everything(setup):
    _, _, data = setup
    assert_close(run("ash_p", setup, p=0).scores, run("energy", setup).scores, rtol=1e-5, atol=1e-5)


def test_ash_rand(setup):
    head, fit, data = setup
    p, seed = 65, 3
    out = run("ash_rand", setup, p=p, seed=seed)
    from featcache.methods.ash import ash_rand_features

    shaped = ash_rand_features(data.features, p, seed, data.ids)
    for x, row in zip(data.features, shaped):
        keep, k = bf_keep(list(x), p)
        assert set(np.flatnonzero(row)) == set(keep) and len(keep) == k
        assert ((row[keep] >= 0) & (row[keep] <= 10)).all()
    assert_close(out.scores, [bf_energy(bf_head(r, head.weight, head.bias)) for r in shaped])
    # same draws for the same sample id whatever the order; a different seed draws differently
    perm = np.random.default_rng(0).permutation(len(data.features))
    assert_close(ash_rand_features(data.features[perm], p, seed, data.ids[perm]), shaped[perm])
    assert not np.allclose(ash_rand_features(data.features, p, seed + 1, data.ids), shaped)


# --- ReAct ---------------------------------------------------------------------------------------

def test_react_percentile_comes_from_id_train(setup):
    head, fit, data = setup
    for q in (85, 90, 95):
        c = bf_percentile([float(v) for v in fit.data.features.ravel()], q)
        expected = [bf_energy(bf_head([min(float(v), c) for v in x], head.weight, head.bias)) for x in data.features]
        assert_close(run("react", setup, percentile=q).scores, expected)


def test_react_with_given_clip(setup):
    head, _, data = setup
    expected = [bf_energy(bf_head([min(float(v), 0.7) for v in x], head.weight, head.bias)) for x in data.features]
    assert_close(run("react", setup, clip=0.7).scores, expected)


@pytest.mark.parametrize("kind", ["p", "b", "s"])
def test_react_then_ash(setup, kind):
    head, _, data = setup
    expected = []
    for x in data.features:
        clipped = np.array([min(float(v), 1.0) for v in x])
        expected.append(bf_energy(bf_head(bf_ash(clipped, 80, kind), head.weight, head.bias)))
    assert_close(run(f"react+ash_{kind}", setup, clip=1.0, p=80).scores, expected, rtol=1e-5, atol=1e-5)


# --- RG ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k, T", [(0.5, 1.0), (1.0, 1.0), (0.7, 2.0)])
def test_rg_multiplicative(setup, k, T):
    _, _, data = setup
    expected = [bf_energy(f, T) * sum(min(float(v), k) for v in x) for f, x in zip(data.logits, data.features)]
    assert_close(run("rg", setup, k=k, T=T).scores, expected)


def test_rg_keeps_the_sign_of_negative_energies(rng, setup):
    head, fit, _ = setup
    data = make_split(rng, 20, "neg", logit_shift=-30.0)
    out = run("rg", setup, data=data, k=1.0)
    expected = [bf_energy(f) * sum(min(float(v), 1.0) for v in x) for f, x in zip(data.logits, data.features)]
    assert (np.asarray(expected)[2:] < 0).all()
    assert_close(out.scores, expected)


def test_rg_additive_alpha_s(setup):
    _, fit, data = setup
    k = 0.7
    lse = [bf_energy(f) for f in fit.data.logits]  # fewer than 1,000 id_train samples: all of them
    feat = [sum(min(float(v), k) for v in x) for x in fit.data.features]
    alpha_s = bf_std(lse) / bf_std(feat)
    for scale in (0.3, 1.0):
        expected = [bf_energy(f) + scale * alpha_s * sum(min(float(v), k) for v in x)
                    for f, x in zip(data.logits, data.features)]
        assert_close(run("rg_add", setup, k=k, alpha_scale=scale).scores, expected)
    expected = [bf_energy(f) + 2.5 * sum(min(float(v), k) for v in x) for f, x in zip(data.logits, data.features)]
    assert_close(run("rg_add", setup, k=k, alpha=2.5).scores, expected)


# --- NAP -----------------------------------------------------------------------------------------

def test_nap(setup):
    _, _, data = setup
    expected = [bf_nap(mx, mn) for mx, mn in zip(data.chan_max, data.chan_mean)]
    assert_close(run("nap", setup).scores, expected)


@pytest.mark.parametrize("shift", [0.0, -40.0])  # -40 makes every energy negative
@pytest.mark.parametrize("w", [0.2, 0.5, 0.8])
def test_nap_energy_combination_exp_form(rng, setup, shift, w):
    data = make_split(rng, 25, "n", logit_shift=shift)
    out = run("nap+energy", setup, data=data, w=w, form="exp")
    # the exp form (the paper form is tested in test_nap_paper.py): S = exp(E)^w * S_NAP^(1-w), computed directly (small enough here not to overflow); score = log S
    expected = [math.log(math.exp(bf_energy(f)) ** w * bf_nap(mx, mn) ** (1 - w))
                for f, mx, mn in zip(data.logits, data.chan_max, data.chan_mean)]
    assert np.isfinite(out.scores).all()
    assert_close(out.scores, expected)
    np.testing.assert_array_equal(out.predictions, data.logits.argmax(axis=1))


def test_nap_msp_combination(setup):
    # MSP is positive: the paper form is log(MSP^w * S_NAP^(1-w))
    _, _, data = setup
    w = 0.3
    expected = []
    for f, mx, mn in zip(data.logits.astype(float), data.chan_max, data.chan_mean):
        msp = max(math.exp(a - bf_logsumexp(f)) for a in f)
        expected.append(math.log(msp**w * bf_nap(mx, mn) ** (1 - w)))
    assert_close(run("nap+msp", setup, w=w).scores, expected)


def test_nap_combination_with_shaped_method_uses_its_logits(setup):
    head, _, data = setup
    out = run("nap+ash_s", setup, w=0.6, p=90, form="exp")
    ash = run("ash_s", setup, p=90)
    s_nap = np.array([bf_nap(mx, mn) for mx, mn in zip(data.chan_max, data.chan_mean)])
    assert_close(out.scores, 0.6 * ash.scores + 0.4 * np.log(s_nap))
    np.testing.assert_array_equal(out.predictions, ash.predictions)


# --- properties shared by every method -------------------------------------------------------------

ALL = [("msp", {}), ("maxlogit", {}), ("energy", {"T": 2.0}), ("ash_p", {"p": 70}), ("ash_b", {"p": 70}),
       ("ash_s", {"p": 90}), ("ash_rand", {"p": 60}), ("react", {"percentile": 90}), ("rg", {"k": 0.5}),
       ("rg_add", {"k": 0.5}), ("nap", {}), ("nap+msp", {"w": 0.4}), ("nap+energy", {"w": 0.4}),
       ("nap+react", {"w": 0.5}), ("react+ash_s", {"p": 90, "percentile": 90}), ("gradnorm", {}),
       ("dice", {"p": 70}), ("scale", {"p": 85}), ("knn", {"k": 5}), ("nap+knn", {"w": 0.5, "k": 5})]


@pytest.mark.parametrize("name, params", ALL)
def test_reordering_samples_reorders_scores(setup, name, params):
    _, _, data = setup
    perm = np.random.default_rng(1).permutation(len(data.features))
    base = run(name, setup, **params)
    moved = run(name, setup, data=data.take(perm), **params)
    assert_close(moved.scores, base.scores[perm], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name, params, message", [
    ("ash_s", {"p": 100}, "p must be"),
    ("ash_p", {"p": -1}, "p must be"),
    ("nap+energy", {"w": 1.0}, "w must be"),
    ("nap+energy", {"w": 0}, "w must be"),
    ("energy", {"T": 0}, "T must be"),
    ("rg", {"k": -1}, "k must be"),
    ("react", {"percentile": 90, "clip": 1.0}, "only one of"),
    ("ash_s", {"q": 3}, "unknown parameter 'q'"),
])
def test_bad_parameters_are_refused(name, params, message):
    with pytest.raises(FeatcacheError, match=message):
        get_method(name).resolve(params)


def test_unknown_method_suggests_the_closest():
    with pytest.raises(FeatcacheError, match="did you mean 'ash_s'"):
        get_method("ahs_s")
    with pytest.raises(FeatcacheError, match="did you mean 'nap\\+energy'"):
        get_method("nap+enegry")


# --- peer methods (GradNorm, DICE, SCALE, KNN) -----------------------------------------------------

@pytest.mark.parametrize("T", [1.0, 2.0])
def test_gradnorm(setup, T):
    _, _, data = setup
    expected = []
    for f, x in zip(data.logits.astype(float), data.features):
        lse = bf_logsumexp([a / T for a in f])
        probs = [math.exp(a / T - lse) for a in f]
        expected.append((K / T) * sum(abs(q - 1 / K) for q in probs) * sum(abs(float(v)) for v in x))
    assert_close(run("gradnorm", setup, T=T).scores, expected)


def test_gradnorm_equals_the_autograd_gradient_norm(setup):
    """The closed form against torch autograd of the reference code's loss (all-ones targets)."""
    import torch

    head, _, data = setup
    T = 1.5
    for x in data.features[2:6]:
        fc = torch.nn.Linear(D, K)
        with torch.no_grad():
            fc.weight.copy_(torch.from_numpy(head.weight))
            fc.bias.copy_(torch.from_numpy(head.bias))
        logits = fc(torch.from_numpy(x)[None].double().float())
        loss = torch.sum(-torch.ones(1, K) * torch.log_softmax(logits / T, dim=-1))
        loss.backward()
        expected = fc.weight.grad.abs().sum().item()
        f = (torch.from_numpy(x)[None] @ torch.from_numpy(head.weight).T + torch.from_numpy(head.bias)).numpy()
        from featcache.methods.gradnorm import gradnorm_score

        assert gradnorm_score(f, x[None], T)[0] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("p", [0, 50, 90])
def test_dice(setup, p):
    head, fit, data = setup
    mean = [sum(float(r[i]) for r in fit.data.features) / len(fit.data.features) for i in range(D)]
    contrib = [[mean[i] * float(head.weight[j][i]) for i in range(D)] for j in range(K)]
    threshold = bf_percentile([c for row in contrib for c in row], p)
    w = [[float(head.weight[j][i]) if contrib[j][i] > threshold else 0.0 for i in range(D)] for j in range(K)]
    expected_logits = [bf_head(x, w, head.bias) for x in data.features]
    out = run("dice", setup, p=p)
    np.testing.assert_array_equal(out.predictions, np.argmax(expected_logits, axis=1))
    assert_close(out.scores, [bf_energy(f) for f in expected_logits])


@pytest.mark.parametrize("p", [0, 65, 85, 99])
def test_scale(setup, p):
    head, _, data = setup
    expected = []
    for x in data.features:
        keep, _ = bf_keep(list(x), p)
        s1 = sum(float(v) for v in x)
        s2 = sum(float(x[i]) for i in keep)
        r = 1.0 if s2 == 0 else math.exp(s1 / s2)
        expected.append(bf_energy(bf_head([r * float(v) for v in x], head.weight, head.bias)))
    assert_close(run("scale", setup, p=p).scores, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn(setup, k):
    _, fit, data = setup

    def normalise(v):
        norm = math.sqrt(sum(float(a) ** 2 for a in v))
        return [float(a) / (norm + 1e-10) for a in v]

    bank = [normalise(v) for v in fit.data.features]
    expected = []
    for x in data.features:
        q = normalise(x)
        dists = sorted(math.sqrt(sum((a - b) ** 2 for a, b in zip(q, row))) for row in bank)
        expected.append(-dists[k - 1])
    assert_close(run("knn", setup, k=k).scores, expected, rtol=1e-5, atol=1e-5)


def test_knn_subsampled_bank(setup):
    _, fit, _ = setup
    from featcache.methods.knn import knn_bank

    bank = knn_bank(fit, 0.5, 7)
    assert len(bank) == 30
    full = knn_bank(fit, 1.0, 0)
    assert all(any(np.allclose(row, f) for f in full) for row in bank)
    with pytest.raises(FeatcacheError, match="bank has"):
        run("knn", setup, k=31, bank=0.5)


@pytest.mark.parametrize("name, params", [("nap+gradnorm", {"w": 0.4}), ("nap+dice", {"w": 0.5, "p": 80}),
                                          ("nap+scale", {"w": 0.6}), ("nap+knn", {"w": 0.7, "k": 3})])
def test_nap_combinations_of_peer_methods(setup, name, params):
    _, _, data = setup
    base = run(name[4:], setup, **{k: v for k, v in params.items() if k != "w"})
    w = params["w"]
    s_nap = [bf_nap(mx, mn) for mx, mn in zip(data.chan_max, data.chan_mean)]
    # the exp form: S = exp(S_X)^w * S_NAP^(1-w) in 50-digit decimals (exp(S_X) overflows floats)
    from decimal import Decimal, getcontext

    getcontext().prec = 50
    products = [Decimal(float(s)).exp() ** Decimal(w) * Decimal(float(n)) ** (1 - Decimal(w))
                for s, n in zip(base.scores, s_nap)]
    assert_close(run(name, setup, form="exp", **params).scores, [float(v.ln()) for v in products])


def test_energy_of_rows_far_apart_neither_overflows_nor_underflows(rng):
    from featcache.methods.kernels import ROW_BLOCK, energy

    f = rng.normal(0, 3, size=(ROW_BLOCK + 300, 40)).astype(np.float32)
    f[5] -= 2000  # far below the rest of its block: a shared shift would underflow its sum
    f[7] += 800  # far above: exp without a shift would overflow
    for T in (1.0, 0.5, 4.0):
        expected = [bf_energy([float(a) for a in row], T) for row in f]
        assert_close(energy(f, T), expected, rtol=1e-12, atol=1e-9)


def test_energy_finds_each_blocks_top_once_and_reads_it_at_other_temperatures(rng):
    # the first T records each LSE block's largest logit (checked against the blocks' maxima by
    # hand); a later T takes the tops it is given instead of finding them again: tops moved up by 1
    # still give the brute-force energies (a small shift does not change the maths) but not the same
    # last bits
    from featcache.methods.kernels import LSE_BLOCK, ROW_BLOCK, energy, n_lse_blocks

    f = rng.normal(0, 3, size=(ROW_BLOCK + LSE_BLOCK + 57, 30)).astype(np.float32)
    f[LSE_BLOCK + 3] -= 2000  # its sum underflows under its block's shift: redone with its own
    tops = np.empty(n_lse_blocks(len(f)))
    found = energy(f, 1.0, tops_out=tops)
    assert tops.tolist() == [float(f[a : a + LSE_BLOCK].max()) for a in range(0, len(f), LSE_BLOCK)]
    assert np.array_equal(found, energy(f, 1.0))
    for T in (1.0, 7.0):
        expected = [bf_energy([float(a) for a in row], T) for row in f]
        assert np.array_equal(energy(f, T, block_tops=tops), energy(f, T))
        moved = energy(f, T, block_tops=tops + 1)
        assert_close(moved, expected, rtol=1e-12, atol=1e-9)
        assert not np.array_equal(moved, energy(f, T))


def test_original_energy_keeps_the_block_tops_for_the_next_temperature(rng):
    from featcache.methods.data import original_energy
    from featcache.methods.kernels import energy

    logits = rng.normal(0, 3, size=(700, 20)).astype(np.float32)
    data = SplitData("s", logits=logits)
    first = original_energy(data, 1.0)
    assert np.array_equal(first, energy(logits, 1.0))
    data._memo[("logit block tops",)] = data._memo[("logit block tops",)] + 1  # what a later T must read
    second = original_energy(data, 2.0)
    assert_close(second, [bf_energy([float(a) for a in row], 2.0) for row in logits], rtol=1e-12, atol=1e-9)
    assert not np.array_equal(second, energy(logits, 2.0))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_clip_above_is_numpys_minimum_to_the_bit(rng, dtype):
    from featcache.methods.kernels import clip_above

    x = rng.normal(size=(37, 53)).astype(dtype)
    where = rng.random(x.shape)
    x[where < 0.1], x[(where >= 0.1) & (where < 0.2)] = 0.0, -0.0
    x[(where >= 0.2) & (where < 0.25)], x[(where >= 0.25) & (where < 0.3)] = np.nan, -np.inf
    for c in (np.float32(0.0), np.float32(-0.0), np.float32(0.7), np.float32(np.inf), np.float32(np.nan)):
        for rows in (x, x[3], x[:, ::3], x.T):
            expected = np.minimum(rows, c)
            got = clip_above(rows, c)
            assert got.dtype == expected.dtype
            assert got.tobytes() == expected.tobytes()
    assert clip_above([[0.5, 2.0], [-0.0, 3.0]], np.float32(1.0)).tolist() == [[0.5, 1.0], [-0.0, 1.0]]


def test_energy_in_passes_of_several_blocks_gives_each_block_s_own_numbers(rng):
    # LSE_PASS rows at a time, each row shifted by its own LSE_BLOCK's top, must give to the last bit
    # what one block at a time with one scalar shift gives, underflowing rows included
    from featcache.methods.kernels import LSE_BLOCK, LSE_PASS, _energy_inplace, energy

    assert LSE_PASS % LSE_BLOCK == 0 and LSE_PASS > LSE_BLOCK
    for n in (1, LSE_BLOCK - 1, LSE_PASS + 3, 3 * LSE_PASS + LSE_BLOCK + 57):
        f = rng.normal(0, 3, size=(n, 50)).astype(np.float32)
        f[n // 2] -= 2000  # redone with its own shift
        for T in (1.0, 0.7, 9.0):
            expected = np.concatenate([
                _energy_inplace(np.empty((len(f[a:a + LSE_BLOCK]), 50)), T,
                                lambda low, a=a: f[a + low].astype(np.float64), rows=f[a:a + LSE_BLOCK],
                                top=np.float64(f[a:a + LSE_BLOCK].max()))
                for a in range(0, n, LSE_BLOCK)])
            assert np.array_equal(energy(f, T), expected), (n, T)


def test_shared_finishing_shifts_each_lse_block_by_its_own_top(rng):
    # energy_blocks_shared's scores and predictions, to the last bit: each product block finished and
    # reduced LSE_BLOCK rows at a time, shifted by the largest finished logit of those rows;
    # underflowing rows are redone from their finished logits; a short last block included
    from featcache.methods.kernels import LSE_BLOCK, ROW_BLOCK, _energy_inplace, energy_blocks_shared

    n, k = 2 * ROW_BLOCK + 3 * LSE_BLOCK + 41, 30
    x = rng.normal(0, 3, size=(n, k)).astype(np.float32)
    x[ROW_BLOCK + 5] -= 3000
    scale, bias = rng.uniform(0.5, 2, size=n), rng.normal(size=k)

    def finish_scaled(z, out, index):
        np.multiply(z, scale[index, None], out=out, dtype=np.float64)
        out += bias

    def finish_plain(z, out, index):
        np.copyto(out, z)
        out += bias

    for T in (1.0, 0.5):
        (scaled, plain), = energy_blocks_shared([(lambda a, b: x[a:b], [finish_scaled, finish_plain])], n, T)
        for finish, (scores, predictions) in ((finish_scaled, scaled), (finish_plain, plain)):
            want_scores, want_predictions = [], []
            for start in range(0, n, ROW_BLOCK):  # the product's blocks, then LSE_BLOCK rows at a time
                for a in range(start, min(start + ROW_BLOCK, n), LSE_BLOCK):
                    index = slice(a, min(a + LSE_BLOCK, start + ROW_BLOCK, n))
                    z = np.empty((index.stop - a, k))
                    finish(x[index], z, index)
                    want_predictions.append(z.argmax(axis=1))

                    def reload(low, index=index):
                        out = np.empty((len(low), k))
                        finish(x[index][low], out, index.start + low)
                        return out
                    want_scores.append(_energy_inplace(z, T, reload, top=np.float64(z.max())))
            assert np.array_equal(scores, np.concatenate(want_scores)), T
            assert np.array_equal(predictions, np.concatenate(want_predictions)), T
            assert np.isfinite(scores).all()


@pytest.mark.parametrize("clip", [1e39, -1e39, 3.5e38])
def test_a_clip_beyond_float32_is_refused_by_name(clip):
    # the clip is applied in float32, where these become infinite: -1e39 made every score NaN
    for name in ("react", "react+ash_s", "nap+react"):
        with pytest.raises(FeatcacheError, match="clip must be a finite number within float32's range"):
            get_method(name).resolve({"clip": clip})
    assert get_method("react").resolve({"clip": 3.4e38})["clip"] == 3.4e38
