"""Issue 16: the shared work of a batch changes no number.

One head product serving ASH-P and ASH-S (and react+ash_p and react+ash_s), ReAct + ASH shaped a
block at a time from the split's one sort, and several percentiles from one sort must give,
to the last bit, what each configuration computed alone by the plain formula gives.
"""

import numpy as np
import pytest

from featcache.grid import work_plan
from featcache.methods import Fit, Head, SplitData, get_method
from featcache.errors import FeatcacheError
from featcache.methods.data import PRECISE_HEAD_WEIGHTS, percentiles


def features(rng, n, d):
    x = np.maximum(rng.normal(0.2, 1.0, size=(n, d)), 0).astype(np.float32)
    x[:, : d // 4] = np.round(x[:, : d // 4] * 4) / 4  # exact ties, zeros included
    x[0] = 0.0  # s2 = 0 for ASH-S
    x[1] = 0.5  # every entry tied
    return x


def split(rng, n, d, w, b, name="test"):
    x = features(rng, n, d)
    return SplitData(name, features=x, chan_max=x + 1, chan_mean=x, logits=(x @ w.T + b).astype(np.float32),
                     labels=np.zeros(n, dtype=np.int64), ids=np.array([f"{name}/{i}" for i in range(n)]))


@pytest.fixture(params=["precise", "float32"])
def setup(request):
    rng = np.random.default_rng(3)
    # a head of over PRECISE_HEAD_WEIGHTS weights multiplies in float32, a small one in float64
    k, d = (10, 64) if request.param == "precise" else (520, 512)
    assert (k * d <= PRECISE_HEAD_WEIGHTS) == (request.param == "precise")
    w = rng.normal(0, 0.1, size=(k, d)).astype(np.float32)
    b = rng.normal(0, 0.1, size=k).astype(np.float32)
    # 2100 rows: several row blocks, the last one short
    return Head(w, b), Fit(split(rng, 300, d, w, b, "train")), lambda: split(np.random.default_rng(5), 2100, d, w, b)


def scored(setup, configs, shared):
    """Scores of each configuration on a fresh split, with the batch's plan (shared) or alone."""
    head, fit, fresh = setup
    data = fresh()
    if shared:  # as a sweep's batch sets it, from the resolved parameters, with the replay's head
        data.plan = work_plan((name, get_method(name).resolve(params)) for name, params in configs)
        data.replay_head = head
    fit.data.replay_head = head if shared else None
    out = {}
    for name, params in configs:
        method = get_method(name)
        result = method(data if shared else alone(fresh(), head), head, fit, **method.resolve(params))
        out[(name, str(params))] = (result.scores, result.predictions)
    return out


def alone(data, head):
    """A split of its own, whose cached logits are `head`'s (SCALE uses them), without a plan."""
    data.replay_head = head
    return data


CONFIGS = [("ash_p", {"p": 60}), ("ash_s", {"p": 60}), ("ash_s", {"p": 90}), ("nap+ash_s", {"p": 90, "w": 0.5}),
           ("ash_p", {"p": 90}), ("ash_b", {"p": 90}), ("scale", {"p": 90}),
           ("react+ash_s", {"clip": 1.0, "p": 80}), ("react+ash_p", {"clip": 1.0, "p": 80}),
           ("react+ash_b", {"clip": 1.0, "p": 80}), ("react+ash_s", {"percentile": 90, "p": 65}),
           ("react", {"percentile": 80}), ("react", {"percentile": 95}), ("react+ash_p", {"percentile": 90, "p": 65}),
           ("scale", {"p": 60})]


def test_shared_products_give_each_configuration_its_own_numbers(setup):
    alone, shared = scored(setup, CONFIGS, False), scored(setup, CONFIGS, True)
    for key in alone:
        np.testing.assert_array_equal(shared[key][0], alone[key][0], err_msg=str(key))
        np.testing.assert_array_equal(shared[key][1], alone[key][1], err_msg=str(key))


@pytest.mark.parametrize("clip", [1.0, 0.1, 0.25, -0.5])
def test_react_ash_blocks_equal_the_whole_array_formula(setup, clip):
    """ReAct + ASH shaped a block at a time from the split's one sort: the numbers of shaping the
    whole clipped array (clip, sort it, prune, then the head), the way it was computed before. Low
    clips tie most rows' k-th values at c (capped blocks), others tie some rows."""
    from featcache.methods.ash import ash_b_fill, ash_prune, sharpen_scale
    from featcache.methods.sparse import worth_sparse

    head, fit, fresh = setup
    data = fresh()
    x = np.minimum(data.features, np.float32(clip))
    for p in (0, 50, 80, 99):
        pruned, mask, k = ash_prune(x, p)
        sparse = worth_sparse(k, x.shape[1])  # p = 99 keeps 1%: the float32 head multiplies those only
        expected = {
            "react+ash_p": head.energy(pruned, sparse_rows=sparse),
            "react+ash_b": head.energy(mask, row_scale=ash_b_fill(x, k), sparse_rows=sparse),
            "react+ash_s": head.energy(pruned, row_scale=sharpen_scale(x.sum(axis=1, dtype=np.float64),
                                                                       pruned.sum(axis=1, dtype=np.float64)),
                                       sparse_rows=sparse),
        }
        for name, (scores, predictions) in expected.items():
            method = get_method(name)
            out = method(fresh(), head, fit, **method.resolve({"clip": clip, "p": p}))
            np.testing.assert_array_equal(out.scores, scores, err_msg=f"{name} p={p}")
            np.testing.assert_array_equal(out.predictions, predictions)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_percentiles_from_one_sort_equal_numpy(dtype):
    rng = np.random.default_rng(0)
    qs = [0, 100, 90, 99.9, 50, 33.3, 80, 85.5, 97, 1e-9, 12]
    for shape in [(300, 64), (7, 3), (1, 1), (2, 1)]:
        values = np.maximum(rng.normal(0.2, 1, size=shape), 0).astype(dtype)
        values[:, :1] = np.round(values[:, :1])  # ties
        many = qs + [float(v) for v in rng.uniform(0, 100, 30)]
        for q, value in zip(many, percentiles(values, many)):
            assert value == float(np.percentile(values, q)), (shape, q)
        before = values.copy()
        percentiles(values, many)
        np.testing.assert_array_equal(values, before)  # the caller's array is left as it was
    for q, value in zip(qs, percentiles(-np.zeros((1, 1), dtype), qs)):  # numpy keeps a lone -0.0's sign
        assert np.signbit(value) and np.signbit(np.percentile(-np.zeros((1, 1), dtype), q)), q


QS = [0, 0.1, 1, 50, 90, 99.9, 100, 12, 33.3, 1e-9, 100 - 1e-9, 50.0, 99, 25]  # ints and floats
KINDS = ["normal", "relu90", "negative", "ties", "narrow", "half_narrow", "deep", "equal"]


def spread(rng, n, dtype, kind):
    """n values of `kind`: spikes, ties, both zeros, values alike in their leading bits."""
    if kind == "normal":
        x = rng.normal(0.3, 2.0, n)
    elif kind == "relu90":  # 90% exact zeros: one bucket holds most values (a spike of one value)
        x = np.where(rng.random(n) < 0.9, 0.0, np.abs(rng.normal(size=n)))
    elif kind == "negative":  # negative values, ties and both zeros
        x = np.round(rng.normal(-1, 1, n) * 8) / 8
        x[rng.random(n) < 0.3] = -0.0
        x[rng.random(n) < 0.1] = 0.0
    elif kind == "ties":
        x = rng.integers(-3, 4, n) / 4
    elif kind == "narrow":  # one top digit holds every value, unequal: selected by the lower digits
        x = 1 + rng.random(n) * 2.0**-10
    elif kind == "half_narrow":  # a big bucket of many values beside spread-out ones
        x = np.where(rng.random(n) < 0.5, -1 - rng.random(n) * 2.0**-10, rng.normal(size=n))
    elif kind == "deep":  # float64 values alike in their top 32 bits, of either sign: the third digit decides
        x = (1 + rng.random(n) * 2.0**-25) * rng.choice([-1, 1], n)
    elif kind == "equal":
        x = np.full(n, 0.1)
    return x.astype(dtype)


def assert_numpy_percentiles(values, qs):
    """percentiles == one np.percentile per q; the same zero sign where the values hold one kind of zero."""
    got = percentiles(values, qs)
    zeros = values[values == 0]
    one_zero_sign = np.signbit(zeros).all() or not np.signbit(zeros).any()
    for q, value in zip(qs, got):
        expected = float(np.percentile(values, q))
        assert value == expected, (values.dtype, values.size, q, value, expected)
        if one_zero_sign:
            assert np.signbit(value) == np.signbit(expected), (values.dtype, values.size, q, value, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_percentiles_of_many_shapes_of_data_equal_numpy(dtype, kind):
    rng = np.random.default_rng(KINDS.index(kind))
    values = spread(rng, 150_000, dtype, kind).reshape(300, 500)
    before = values.copy()
    qs = QS + [float(q) for q in rng.uniform(0, 100, 20)] + [int(q) for q in rng.integers(0, 101, 5)]
    assert_numpy_percentiles(values, qs)
    np.testing.assert_array_equal(values, before)  # the caller's array is left as it was
    assert_numpy_percentiles(values.T, [0, 50, 97.5, 100])  # not contiguous
    assert_numpy_percentiles(values[:3], QS)
    assert percentiles(values, [50, 50, 90]) == [float(np.percentile(values, q)) for q in (50, 50, 90)]
    assert percentiles(values, []) == []


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_percentiles_of_tiny_arrays_and_zeros_equal_numpy(dtype):
    rng = np.random.default_rng(7)
    for n in (1, 2, 3):
        for values in (rng.normal(size=n), np.zeros(n), -np.zeros(n), np.array([-0.0, 0.0, 1.0])[:n]):
            assert_numpy_percentiles(values.astype(dtype), QS)
    # one kind of zero beside negative values: numpy's sign (-0.0 from two -0.0 neighbours at gamma >= 0.5)
    for zero in (0.0, -0.0):
        values = np.where(rng.random(100_000) < 0.7, zero, -np.abs(rng.normal(size=100_000))).astype(dtype)
        assert_numpy_percentiles(values, QS + [float(q) for q in rng.uniform(25, 100, 20)])
    assert_numpy_percentiles(np.full(100_000, -0.0, dtype), [0, 30, 50.5, 70, 99.99, 100])


def test_percentiles_of_other_dtypes_equal_numpy():
    rng = np.random.default_rng(8)
    big_endian = rng.normal(size=100_000).astype(">f4")
    for values in (rng.integers(-50, 50, 100_000), big_endian, rng.normal(size=9).astype(np.float16)):
        assert_numpy_percentiles(values, QS)


def test_a_numpy_float_percentile_is_its_python_value():
    values = np.random.default_rng(9).normal(size=(300, 77)).astype(np.float32)
    qs = [float(q) for q in np.linspace(1, 99, 23)]
    assert percentiles(values, [np.float64(q) for q in qs]) == [float(np.percentile(values, q)) for q in qs]


def test_a_batch_clips_at_the_percentiles_each_config_gets_alone(setup):
    head, fit, fresh = setup
    configs = [("react", {"percentile": q}) for q in (80, 85, 90, 95.5)]
    alone = {q: float(np.percentile(fit.data.features, q)) for q in (80, 85, 90, 95.5)}
    data = fresh()
    data.plan = work_plan((name, get_method(name).resolve(params)) for name, params in configs)
    from featcache.methods.react import clip_value

    for q in alone:
        assert clip_value(fit, percentile=q, percentile_of="id_train", data=data) == alone[q]


def test_a_batch_multiplies_once_per_distinct_shaped_feature(setup, monkeypatch):
    """The engine's head products on a split are the grid's floor (featcache.grid.floor_products),
    counted by hand here: 8 for CONFIGS (SCALE multiplies too when the head is small: its float64
    product there replaces the cached float32 logits)."""
    from featcache.grid import floor_products

    head, fit, _ = setup
    calls = []
    original = Head.job  # one head product each, whether run alone or with others in one queue

    def counting(self, x, row_scales=(None,), **kwargs):
        calls.append(len(row_scales))
        return original(self, x, row_scales, **kwargs)

    monkeypatch.setattr(Head, "job", counting)
    scored(setup, CONFIGS, True)
    assert floor_products(CONFIGS) == 8
    assert len(calls) == 8 + (1 if head.precise else 0)
    calls.clear()
    scored(setup, CONFIGS, False)  # alone, each configuration multiplies for itself
    assert len(calls) == len(CONFIGS) - (0 if head.precise else 2)


def test_top_k_stats_are_the_whole_sorted_arrays_columns_and_sums():
    """Each k's values and sums, taken a block of rows at a time, are the columns and row sums of the
    whole sorted array, to the last bit (several blocks, the last one short; negative values)."""
    from featcache.methods.ash import top_k_stats

    rng = np.random.default_rng(12)
    x = features(rng, 2500, 77)
    x[3:40] -= 0.75
    srt = np.ascontiguousarray(np.sort(x, axis=1)[:, ::-1])
    ks = [0, 1, 19, 38, 76, 77]
    stats = top_k_stats(x, ks)
    assert sorted(stats) == ks
    for k in ks:
        assert np.array_equal(stats[k].sums, srt[:, :k].sum(axis=1, dtype=np.float64))
        assert np.allclose(stats[k].sums, [sum(float(v) for v in row[:k]) for row in srt], rtol=1e-12, atol=1e-12)
        if 0 < k < 77:
            assert np.array_equal(stats[k].kth, srt[:, k - 1]) and np.array_equal(stats[k].after, srt[:, k])
        else:
            assert stats[k].kth is None and stats[k].after is None


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int32, np.uint8])
def test_rows_sorted_descending_are_python_s_sorted_rows(dtype):
    from featcache.methods.ash import sorted_descending

    rng = np.random.default_rng(13)
    x = (rng.normal(0, 3, size=(300, 41)) * (1 if np.issubdtype(dtype, np.floating) else 20)).round(0)
    if np.issubdtype(dtype, np.unsignedinteger):
        x = np.abs(x)
    x = x.astype(dtype)
    if np.issubdtype(dtype, np.floating):
        x[5, :20], x[5, 20:] = 0.0, -0.0
        x[6, 3], x[7, 4] = np.inf, -np.inf
    x = x[:, ::-1] if dtype == np.float64 else x  # a view that is not C-ordered
    got = sorted_descending(x)
    assert got.flags.c_contiguous and got.dtype == x.dtype
    assert got.tolist() == [sorted(row, reverse=True) for row in x.tolist()]
    if np.issubdtype(dtype, np.floating):  # NaN first, as the reversal of numpy's ascending sort has it
        x = np.array(x)
        x[9, 2] = np.nan
        got = sorted_descending(x)
        assert got.tobytes() == np.ascontiguousarray(np.sort(x, axis=1)[:, ::-1]).tobytes()
        assert np.isnan(got[9, 0]) and not np.isnan(got[9, 1:]).any()


def test_a_batch_sorts_each_split_once_for_every_planned_p(setup, monkeypatch):
    """Every k the batch plans (ASH, SCALE, ReAct + ASH, nap+X as X) comes from one sort of the split;
    a k it did not plan costs one more."""
    import featcache.methods.ash as ash

    calls = []
    original = ash.top_k_stats

    def counting(x, ks):
        calls.append(sorted(ks))
        return original(x, ks)

    monkeypatch.setattr(ash, "top_k_stats", counting)
    scored(setup, CONFIGS, True)
    assert len(calls) == 1
    head, fit, fresh = setup
    data = fresh()
    data.plan = work_plan([("ash_p", get_method("ash_p").resolve({"p": 60}))])
    get_method("ash_b").__call__(data, head, fit, p=75)
    get_method("ash_p").__call__(data, head, fit, p=60)
    d = data.features.shape[1]
    assert calls[1:] == [sorted({ash.keep_count(d, 60), ash.keep_count(d, 75)})]


def brute_top_k(x, k):
    """The k largest entries of each row, equal values taken lowest index first (a stable sort)."""
    mask = np.zeros(x.shape, dtype=bool)
    for row, values in enumerate(x):
        mask[row, np.argsort(-values, kind="stable")[:k]] = True
    return mask


@pytest.mark.parametrize("tied_rows", [0.0, 0.2, 0.9, 1.0])
def test_top_k_mask_breaks_ties_lowest_index_first_on_every_path(tied_rows):
    # no row tied, a few (gathered), most (broken on every row), all: each path against a stable sort
    from featcache.methods.ash import top_k_mask

    rng = np.random.default_rng(11)
    n, d = 300, 77  # rows that do not fill a whole number of packed bytes
    x = rng.permuted(np.tile(np.arange(d, dtype=np.float32), (n, 1)), axis=1)  # distinct values per row
    tie = rng.random(n) < tied_rows
    x[tie] = np.round(rng.normal(size=(int(tie.sum()), d)) * 2).clip(0).astype(np.float32) / 2  # ties, zeros
    for k in (1, 5, 38, 60, 76):
        expected = brute_top_k(x, k)
        assert np.array_equal(top_k_mask(x, k), expected)
        pruned = np.where(top_k_mask(x, k, zero_ties=False), x, 0)
        assert np.array_equal(pruned, np.where(expected, x, 0))


def test_first_true_is_a_running_count():
    from featcache.methods.ash import first_true

    rng = np.random.default_rng(12)
    # widths of whole 64-bit words (counted a word at a time) and of any number of bytes
    widths = [64, 128, 512, 2048, 1000, 63, 65]
    for i in range(600):
        rows = rng.integers(1, 30)
        d = widths[i % len(widths)] if i % 2 else rng.integers(1, 300)
        flags = rng.random((rows, d)) < rng.random() ** 3
        need = rng.integers(-1, d + 2, size=rows)
        assert np.array_equal(first_true(flags, need), flags & (np.cumsum(flags, axis=1) <= need[:, None]))


def test_ties_are_broken_lowest_index_first_as_a_running_count_breaks_them():
    # break_ties works on packed bits; the reference counts every tied entry with a cumulative sum
    from featcache.methods.ash import break_ties

    rng = np.random.default_rng(13)
    for _ in range(400):
        rows, d = rng.integers(1, 20), rng.integers(2, 90)
        x = rng.integers(-2, 3, size=(rows, d)).astype(np.float32)  # many ties, negative values too
        k = int(rng.integers(1, d))
        kth = -np.sort(-x, axis=1)[:, k - 1 : k]
        above, tied = x > kth, x == kth
        expected = above | (tied & (np.cumsum(tied, axis=1) <= (k - above.sum(axis=1))[:, None]))
        mask = break_ties(x, k, kth)
        assert mask.dtype == bool and np.array_equal(mask, expected)
        assert (mask.sum(axis=1) == k).all()


def test_nap_reads_the_prepool_maxima_a_run_of_rows_at_a_time():
    # never the whole (N, C) arrays: NAP's score from runs of rows equals the formula on the whole,
    # the maxima and the means streamed together though their runs end on different rows
    from featcache.methods.nap import shared_nap_score

    rng = np.random.default_rng(13)
    n, c = 5000, 24
    arrays = {"chan_mean": rng.random((n, c)).astype(np.float32), "logits": np.zeros((n, 3), np.float32)}
    arrays["chan_max"] = arrays["chan_mean"] * (1 + rng.exponential(size=(n, c))).astype(np.float32)
    arrays["features"] = arrays["chan_mean"] + 1  # not the means: they are read for NAP alone
    steps = {"chan_max": 2000, "chan_mean": 1500}
    whole, runs = [], []

    def load(key):
        whole.append(key)
        return arrays[key]

    def load_runs(key):
        step = steps[key]
        for start in range(0, n, step):
            runs.append((key, start, min(start + step, n)))
            yield start, min(start + step, n), arrays[key][start : start + step]

    data = SplitData("s", loader=load, run_loader=load_runs)
    ratio = arrays["chan_max"].astype(np.float64) / (arrays["chan_mean"].astype(np.float64) + 1.0)
    assert np.array_equal(shared_nap_score(data, 1.0), (ratio**2).mean(axis=1))
    assert "chan_max" not in whole and "chan_mean" not in whole
    assert [r[1:] for r in runs if r[0] == "chan_max"] == [(0, 2000), (2000, 4000), (4000, 5000)]
    assert [r[1:] for r in runs if r[0] == "chan_mean"] == [(0, 1500), (1500, 3000), (3000, 4500), (4500, 5000)]

    # where chan_mean is the features, the features are read whole (every product method needs them)
    whole.clear(), runs.clear()
    arrays["features"] = arrays["chan_mean"]
    data = SplitData("s", loader=load, run_loader=load_runs, same_as={"chan_mean": "features"})
    assert np.array_equal(shared_nap_score(data, 1.0), (ratio**2).mean(axis=1))
    assert "features" in whole and not {"chan_max", "chan_mean"} & set(whole) and {r[0] for r in runs} == {"chan_max"}


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int64])
@pytest.mark.parametrize("n, c", [(0, 4), (1, 1), (7, 3), (1000, 2048), (333, 1000)])
def test_nap_score_in_passes_is_the_formula_on_float64_copies(dtype, n, c):
    from featcache.methods.nap import nap_score

    rng = np.random.default_rng(n + c)
    mean = (rng.random((n, c)) * 3).astype(dtype)
    top = (mean * (1 + rng.exponential(size=(n, c)))).astype(dtype)
    for eps in (1.0, 0.5, 1e-3):
        ratio = top.astype(np.float64) / (mean.astype(np.float64) + eps)
        assert np.array_equal(nap_score(top, mean, eps), np.mean(ratio**2, axis=1))


def test_nap_score_of_other_layouts_keeps_their_numbers():
    # column-major copies sum in their own order, a (C,) mean broadcasts: the whole-copy formula's numbers
    from featcache.methods.nap import nap_score

    rng = np.random.default_rng(4)
    top, mean = rng.random((100, 16)).astype(np.float32) * 5, rng.random((100, 16)).astype(np.float32)
    for a, b in [(np.asfortranarray(top), np.asfortranarray(mean)), (top[:, ::-1], mean), (top, mean[0])]:
        ratio = np.asarray(a, np.float64) / (np.asarray(b, np.float64) + 1.0)
        assert np.array_equal(nap_score(a, b), np.mean(ratio**2, axis=1))
    eps = rng.random((100, 1)) + 0.5  # one per row
    assert np.array_equal(nap_score(top, mean, eps), np.mean((top.astype(np.float64) / (mean + eps)) ** 2, axis=1))


def test_row_runs_together_refuses_arrays_of_different_lengths():
    data = SplitData("s", a=np.zeros((5000, 2)), b=np.zeros((4000, 2)))
    with pytest.raises(FeatcacheError, match="different lengths"):
        list(data.row_runs_together("a", "b"))


def test_dice_heads_of_a_batch_are_each_np_percentiles():
    # one contribution matrix and one sort for every p: each head as DICE's formula gives it alone
    from featcache.methods.dice import dice_heads

    rng = np.random.default_rng(14)
    w = rng.normal(size=(30, 40)).astype(np.float32)
    w[:, :5] = 0.0  # tied contributions
    mean = np.abs(rng.normal(size=40))
    head = Head(w, np.zeros(30, np.float32))
    ps = [50, 70.5, 90, 99]
    for p, sparse in zip(ps, dice_heads(head, mean, ps)):
        contrib = mean[None, :] * w.astype(np.float64)
        assert np.array_equal(sparse.weight, np.where(contrib > np.percentile(contrib, p), w, 0))


def test_concurrent_calls_give_the_serial_numbers():
    """Methods called from several threads at once (the Python API in a threaded program) give the
    numbers each gives alone: BLAS stays on one thread per block until the last call ends."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(21)
    k, d = 520, 512  # over PRECISE_HEAD_WEIGHTS: float32 products, whose bits depend on BLAS's threads
    w = rng.normal(0, 0.1, size=(k, d)).astype(np.float32)
    b = rng.normal(0, 0.1, size=k).astype(np.float32)
    head, fit = Head(w, b), Fit(split(rng, 300, d, w, b, "train"))
    configs = [("ash_s", {"p": 80}), ("ash_b", {"p": 60}), ("react", {"clip": 0.7}), ("dice", {"p": 50})] * 3

    def run(i):
        name, params = configs[i]
        method = get_method(name)
        fresh = split(np.random.default_rng(22 + i), 4000, d, w, b)  # nothing memoised from another run
        return method(fresh, head, fit, **method.resolve(params)).scores

    serial = [run(i) for i in range(len(configs))]
    for _ in range(3):
        with ThreadPoolExecutor(4) as pool:
            concurrent = list(pool.map(run, range(len(configs))))
        for i, (alone, together) in enumerate(zip(serial, concurrent)):
            assert np.array_equal(alone, together), configs[i]


def test_a_one_block_split_does_not_depend_on_blas_threads():
    """A split of one block runs in the calling thread; its products still run on one BLAS thread, so
    its numbers do not depend on how many threads the process (or --jobs) lets BLAS have."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(23)
    k, d = 520, 512
    w = rng.normal(0, 0.1, size=(k, d)).astype(np.float32)
    b = rng.normal(0, 0.1, size=k).astype(np.float32)
    head, fit = Head(w, b), Fit(split(rng, 300, d, w, b, "train"))
    for name, params in [("ash_b", {"p": 60}), ("react", {"clip": 0.7}), ("dice", {"p": 50})]:
        method = get_method(name)
        scores = []
        for blas_threads in (1, 4):
            with threadpool_limits(blas_threads, user_api="blas"):
                data = split(np.random.default_rng(24), 700, d, w, b)
                scores.append(method(data, head, fit, **method.resolve(params)).scores)
        assert np.array_equal(*scores), name


def test_knn_at_every_planned_k_from_one_product(setup, monkeypatch):
    """A batch's KNN configurations with one bank multiply the split with it once, and each k gets
    the distance a brute-force search gives."""
    import featcache.methods.knn as knn_module

    head, fit, fresh = setup
    configs = [("knn", {"k": k, "bank": 1.0, "seed": 0}) for k in (1, 5, 50)] + [("knn", {"k": 10, "bank": 0.5, "seed": 0})]
    calls = []
    original = knn_module.kth_neighbour_distances
    monkeypatch.setattr(knn_module, "kth_neighbour_distances", lambda q, b, ks: calls.append(sorted(ks)) or original(q, b, ks))
    shared = scored(setup, configs, True)
    assert sorted(calls) == [[1, 5, 50], [10]]
    data = fresh()
    queries = data.features / (np.linalg.norm(data.features, axis=1, keepdims=True) + 1e-10)
    bank = knn_module.knn_bank(fit, 1.0, 0).astype(np.float64)
    brute = np.sort(((queries[:50, None, :] - bank[None]) ** 2).sum(axis=2), axis=1)  # squared distances
    for k in (1, 5, 50):
        distance = -shared[("knn", str({"k": k, "bank": 1.0, "seed": 0}))][0][:50]
        np.testing.assert_allclose(distance ** 2, brute[:, k - 1], rtol=1e-4, atol=1e-6)  # float32 products


def test_mean_feature_is_the_float64_sum_of_the_rows_in_order_over_n():
    from featcache.methods.data import Fit

    rng = np.random.default_rng(11)
    x = (rng.standard_normal((3001, 37)) * rng.uniform(0.01, 1e4, size=37)).astype(np.float32)
    total = np.zeros(37)
    for row in x:  # the brute-force formula: add the rows one after another in float64
        total += row.astype(np.float64)
    expected = total / len(x)
    for layout in (x, x[::-1][::-1], np.ascontiguousarray(x)):
        np.testing.assert_array_equal(Fit(SplitData("train", features=layout)).mean_feature, expected)
    # column-major features keep the numbers of a float64 copy's mean, summed pairwise down each whole
    # column (numpy's buffered cast would sum 8,192 rows at a time: other last bits on 9,000 rows)
    tall = ((rng.standard_normal((9000, 5)) * 3) ** 3).astype(np.float32)
    fortran = np.asfortranarray(tall)
    pairwise = fortran.astype(np.float64).mean(axis=0)
    assert not np.array_equal(pairwise, fortran.mean(axis=0, dtype=np.float64))  # the case is a real one
    np.testing.assert_array_equal(Fit(SplitData("train", features=fortran)).mean_feature, pairwise)


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("shape,dtype", [((5, 3), np.float32), ((9_000_001,), np.float32), ((4097, 2048), np.float64),
                                         ((0, 7), np.float32), ((3, 5_000_000), np.int8)])
def test_faulted_empty_is_a_writable_c_order_array_of_the_shape(monkeypatch, workers, shape, dtype):
    from featcache import allocator
    from featcache.methods import kernels

    monkeypatch.setattr(kernels, "n_workers", lambda: workers)
    import resource
    import sys

    out = allocator.faulted_empty(shape, dtype)
    assert out.shape == shape and out.dtype == dtype and out.flags.c_contiguous and out.flags.writeable
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out[...] = 7
    faulted_on_write = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    assert (out == 7).all()
    if out.nbytes >= allocator.FAULT_IN_PARALLEL_BYTES and workers > 1 and sys.platform.startswith("linux"):
        # its pages are in already: writing all of it faults none in (a fresh array takes one fault per
        # page, or per 2 MB huge page)
        assert faulted_on_write < 4, faulted_on_write


FAMILIES = [("ash_b", {"p": 50}), ("ash_b", {"p": 70}), ("ash_b", {"p": 90}), ("dice", {"p": 60}), ("dice", {"p": 90}),
            ("react", {"percentile": 80}), ("react", {"clip": 0.7}), ("nap+react", {"clip": 1.1, "w": 0.5}),
            ("ash_p", {"p": 65}), ("ash_s", {"p": 80}), ("nap+ash_s", {"p": 65, "w": 0.3}),
            ("react+ash_b", {"clip": 1.0, "p": 65}), ("react+ash_b", {"percentile": 90, "p": 80}),
            ("react+ash_p", {"clip": 1.0, "p": 65}), ("react+ash_s", {"clip": 1.0, "p": 65}),
            ("react+ash_s", {"percentile": 85, "p": 90})]


def test_a_family_s_products_run_in_one_queue_with_the_numbers_each_gets_alone(setup, monkeypatch):
    """Each method family's head products on a split (every p, clip or (clip, p) the batch plans) go
    to the cores as one queue of blocks, one call for the family, and each configuration keeps the
    numbers it gets alone."""
    from featcache.methods import data as data_module

    queues = []
    original = data_module.energy_blocks_shared

    def recording(jobs, n, T=1.0):
        queues.append(len(jobs))
        return original(jobs, n, T)

    monkeypatch.setattr(data_module, "energy_blocks_shared", recording)
    together = scored(setup, FAMILIES, True)
    # ash_b 3 p; dice 2 p; react 3 clips (nap+react's too); ash_p/ash_s 2 p (65 shared by ash_p and
    # nap+ash_s's ash_s); react+ash_b 2 (c, p); react+ash_p/s 2 (c, p) (clip 1.0 and p 65 shared)
    assert sorted(queues) == [2, 2, 2, 2, 3, 3]
    queues.clear()
    alone = scored(setup, FAMILIES, False)
    assert queues == [1] * len(FAMILIES)  # alone, each configuration multiplies for itself
    for key, (scores, predictions) in alone.items():
        np.testing.assert_array_equal(together[key][0], scores, err_msg=str(key))
        np.testing.assert_array_equal(together[key][1], predictions, err_msg=str(key))


def test_map_jobs_calls_every_block_of_every_job_once_as_map_row_blocks_cuts_them():
    from featcache.methods.kernels import map_jobs, map_row_blocks

    for block in (1024, 7):
        seen, expected = [], []
        map_jobs([(lambda a, b, j=j: seen.append((j, a, b)), n) for j, n in enumerate([0, 1, 2500, 1024, 3000])], block)
        for j, n in enumerate([0, 1, 2500, 1024, 3000]):
            map_row_blocks(lambda a, b, j=j: expected.append((j, a, b)), n, block)
        assert sorted(seen) == sorted(expected) and len(set(seen)) == len(seen)


def test_a_resumed_batch_multiplies_only_for_what_its_progress_store_lacks(random_digits, monkeypatch):
    """Configurations whose scores the progress store holds are left out of the split's plan, so the
    family queue does not redo their products; the others get the numbers of a fresh run."""
    from featcache.replay import sweep_batch

    configs = [("ash_b", {"p": p}) for p in (50, 65, 80, 90)]

    class Store:  # a progress store: scores of ash_b at 50 and 90 on every split are kept
        def __init__(self, held=None):
            self.held = dict(held or {})

        def load(self, method, key, split, n):
            return self.held.get((method, key, split))

        def save(self, method, key, split, scores, acc, nonpositive):
            self.held[(method, key, split)] = (scores, acc, nonpositive)

    fresh = Store()
    rows, _, _ = sweep_batch(random_digits["h5"], configs, scratch=fresh)
    kept = {k: v for k, v in fresh.held.items() if k[1] in ('{"p": 50}', '{"p": 90}')}
    products = []
    original = Head.job

    def counting(self, x, row_scales=(None,), **kwargs):
        products.append(1)
        return original(self, x, row_scales, **kwargs)

    monkeypatch.setattr(Head, "job", counting)
    resumed = Store(kept)
    again, _, _ = sweep_batch(random_digits["h5"], configs, scratch=resumed)
    n_splits = len({split for _, _, split in fresh.held})
    assert len(products) == 2 * n_splits  # p 65 and 80 on each split, not 50 and 90 again
    assert again == rows


def test_a_kernel_inside_map_items_runs_in_its_thread_instead_of_waiting_for_the_pool():
    import threading

    from featcache.methods.kernels import map_items, row_reduce

    found = []
    worker = threading.Thread(target=lambda: found.append(
        map_items(lambda i: float(row_reduce(lambda a, b: np.full(b - a, float(i)), 5000).sum()), [1, 2, 3])))
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "map_items deadlocked"
    assert found == [[5000.0, 10000.0, 15000.0]]


def test_a_method_called_with_another_head_gets_that_head_s_numbers(setup, monkeypatch):
    """Only the replay's head shares products and memos: a plugin calling a built-in with a head of
    its own (here W / 2, b / 2: a temperature), made per call or changed in place between calls, gets
    that head's numbers, multiplies once per call, and leaves nothing in the split's memo."""
    head, fit, fresh = setup
    configs = [("react", {"clip": 1.0}), ("ash_b", {"p": 65}), ("ash_p", {"p": 65}), ("ash_s", {"p": 65}),
               ("react+ash_b", {"clip": 1.0, "p": 65}), ("react+ash_s", {"clip": 1.0, "p": 65}), ("dice", {"p": 70}),
               ("nap+react", {"clip": 1.0, "w": 0.5}), ("nap+dice", {"p": 70, "w": 0.5})]
    train = {key: getattr(fit.data, key).copy() for key in ("features", "chan_max", "chan_mean", "logits", "labels", "ids")}

    def alone(method, h, params):  # a split and id_train of its own, nothing shared with the batch's
        return method(fresh(), h, Fit(SplitData("train", **train)), **params).scores

    for other_first in (False, True):
        data = fresh()
        data.plan = work_plan((name, get_method(name).resolve(params)) for name, params in configs)
        data.replay_head = head
        batch_fit = Fit(SplitData("train", **train))
        batch_fit.data.replay_head = head
        for name, params in configs:
            method = get_method(name)
            params = method.resolve(params)
            other = Head(head.weight / 2, head.bias / 2)
            for h in ((other, head) if other_first else (head, other)):
                np.testing.assert_array_equal(method(data, h, batch_fit, **params).scores, alone(method, h, params),
                                              err_msg=f"{name} {h is other}")
            other.weight *= 3  # the same head object, changed in place
            np.testing.assert_array_equal(method(data, other, batch_fit, **params).scores, alone(method, other, params),
                                          err_msg=f"{name} changed in place")
    products = []
    original = Head.job
    monkeypatch.setattr(Head, "job", lambda self, x, row_scales=(None,): products.append(1) or original(self, x, row_scales))
    data = fresh()
    data.plan = work_plan([("react", get_method("react").resolve({"clip": c})) for c in (0.5, 1.0, 1.5, 2.0)])
    data.replay_head = head
    memo = len(data._memo)
    get_method("react")(data, Head(head.weight / 2, head.bias / 2), fit, **get_method("react").resolve({"clip": 1.0}))
    assert len(products) == 1 and len(data._memo) == memo


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int32])
def test_max_logit_is_the_maximum_of_a_float64_copy(dtype):
    # the maximum is taken in the logits' own dtype and cast; the brute force casts every logit first
    rng = np.random.default_rng(11)
    logits = (rng.standard_normal((2500, 37)) * 50).astype(dtype)  # several row blocks, the last one short
    if np.issubdtype(dtype, np.floating):
        logits[3] = -np.inf
        logits[4, 5] = np.inf
        logits[5] = np.finfo(dtype).max
    from featcache.methods.logit import maxlogit_score

    got = maxlogit_score(logits)
    want = np.array([max(float(v) for v in row) for row in logits])
    assert got.dtype == np.float64 and np.array_equal(got, want)
    assert got.tobytes() == np.asarray(logits, np.float64).max(axis=1).tobytes()
    if np.issubdtype(dtype, np.floating):  # a maximum of zero keeps the float64 copy's sign of zero
        zeros = np.zeros((3000, 5), dtype)
        zeros[rng.random(zeros.shape) < 0.5] = -0.0
        zeros[:, 4] = -3
        for layout in (zeros, np.asfortranarray(zeros), zeros[:, ::-1]):
            assert maxlogit_score(layout).tobytes() == np.asarray(layout, np.float64).max(axis=1).tobytes()


def test_scale_with_a_large_head_rescales_the_cached_logits_for_every_p_of_a_batch():
    # r (f - b) + b from the cached logits f, in float64, then energy shifting each LSE_BLOCK rows by
    # their top: to the bit, for each p of a batch made in one pass, and for each alone
    from featcache.methods.kernels import energy

    rng = np.random.default_rng(8)
    k, d = 520, 512
    w = rng.normal(0, 0.1, size=(k, d)).astype(np.float32)
    b = rng.normal(0, 0.1, size=k).astype(np.float32)
    head = Head(w, b)
    assert not head.precise
    data = split(rng, 2100, d, w, b)
    fit = Fit(split(rng, 50, d, w, b, "train"))
    ps = [0, 60, 85, 99]
    data.plan = work_plan(("scale", {"p": p}) for p in ps)
    data.replay_head = head
    x, f = data.features, data.logits.astype(np.float64)
    for p in ps:
        top = d - int(round(d * p / 100))
        s1 = x.astype(np.float64).sum(axis=1)
        s2 = np.sort(x, axis=1)[:, ::-1][:, :top].astype(np.float64).sum(axis=1)
        r = np.where(s2 == 0, 1.0, np.exp(s1 / np.where(s2 == 0, 1.0, s2)))
        logits = (f - b.astype(np.float64)) * r[:, None] + b.astype(np.float64)
        alone = SplitData("alone", features=data.features, logits=data.logits)
        alone.replay_head = head  # the cached logits are this head's
        for target in (data, alone):  # in the batch, then alone
            out = get_method("scale")(target, head, fit, p=p)
            assert np.array_equal(out.scores, energy(logits)), p
            assert np.array_equal(out.predictions, logits.argmax(axis=1)), p


def test_scale_with_another_large_head_multiplies_by_that_head():
    # the cached logits are the replay's head's: a plugin's own large head must not get them
    rng = np.random.default_rng(14)
    k, d = 520, 512
    w = rng.normal(0, 0.1, size=(k, d)).astype(np.float32)
    b = rng.normal(0, 0.1, size=k).astype(np.float32)
    data = split(rng, 1500, d, w, b)
    data.replay_head = Head(w, b)
    data.plan = work_plan([("scale", {"p": 85})])
    other = Head(2 * w, b + 1)
    assert not other.precise
    x = data.features.astype(np.float64)
    top = d - int(round(d * 85 / 100))
    s2 = -np.sort(-x, axis=1)[:, :top].sum(axis=1)
    r = np.where(s2 == 0, 1.0, np.exp(x.sum(axis=1) / np.where(s2 == 0, 1.0, s2)))
    logits = r[:, None] * (x @ other.weight.T.astype(np.float64)) + other.bias
    top_logit = logits.max(axis=1)
    expected = top_logit + np.log(np.exp(logits - top_logit[:, None]).sum(axis=1))
    out = get_method("scale")(data, other, Fit(split(rng, 50, d, w, b, "train")), p=85)
    np.testing.assert_allclose(out.scores, expected, rtol=1e-5)
    assert np.array_equal(out.predictions, logits.argmax(axis=1))


@pytest.mark.parametrize("name, params", [("msp", {}), ("maxlogit", {}), ("energy", {"T": 2.0}), ("scale", {"p": 85}),
                                          ("ash_s", {"p": 90}), ("nap+energy", {"w": 0.5})])
def test_what_a_batch_shares_cannot_be_changed_in_place(setup, name, params):
    # a plugin doing out.scores += ... on a built-in's shared output must not change it for the others
    head, fit, fresh = setup
    data = fresh()
    method = get_method(name)
    data.plan = work_plan([(name, method.resolve(params))])
    data.replay_head = head
    first = method(data, head, fit, **method.resolve(params))
    before = first.scores.copy()
    try:
        first.scores += 1.0  # refused where the array is shared; a fresh one may change
    except ValueError as exc:
        assert "read-only" in str(exc)
    again = method(data, head, fit, **method.resolve(params))
    assert np.array_equal(again.scores, before)
    if name in ("maxlogit", "energy", "scale", "ash_s"):  # these hand out what they share
        assert not again.scores.flags.writeable


def test_a_replay_s_head_cannot_be_changed_in_place_and_its_arrays_are_not_copied(random_digits):
    # every configuration of a batch reads the same head: a plugin must not change it; the arrays
    # read from the cache stay writable, because numpy's argmax would copy a read-only one whole
    from featcache.cache.reader import open_cache
    from featcache.replay import load_replay

    with open_cache(random_digits["h5"]) as cache:
        replay = load_replay(cache)
        with pytest.raises(ValueError, match="read-only"):
            replay.head.weight[0, 0] = 1
        with pytest.raises(ValueError, match="read-only"):
            replay.head.bias += 1
        assert replay.id_test.logits.flags.writeable and replay.fit.data.features.flags.writeable


@pytest.mark.parametrize("T", [1, 1.0, 0.3, 7.5])
def test_gradnorm_from_known_row_maxima_and_at_T_1_is_the_formula_to_the_bit(T):
    # the rows' largest logits divided by T are the largest of f / T (division keeps order), and a
    # division by 1 is a copy: both give the very numbers of the formula's own steps
    from featcache.methods.gradnorm import gradnorm_score

    rng = np.random.default_rng(21)
    f = (rng.standard_normal((700, 50)) * 4).astype(np.float32)
    f[3] = 0.0  # a row of zeros, its maximum a zero
    f[4, :10] = -0.0
    x = rng.random((700, 8)).astype(np.float32)
    z = f.astype(np.float64) / T
    lse = z.max(axis=1) + np.log(np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1))
    expected = (50 / T) * np.abs(np.exp(z - lse[:, None]) - 1.0 / 50).sum(axis=1) * np.abs(x.astype(np.float64)).sum(axis=1)
    tops = f.max(axis=1).astype(np.float64)
    assert np.array_equal(gradnorm_score(f, x, T), expected)
    assert np.array_equal(gradnorm_score(f, x, T, tops=tops), expected)
    # a T <= 0 (refused by every command, not by a direct call) reverses the order: the maxima are not used
    assert np.array_equal(gradnorm_score(f, x, -T, tops=tops), gradnorm_score(f, x, -T))
