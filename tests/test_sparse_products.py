"""Issue 16: head products of mostly-zero operands multiply only their nonzero terms.

ASH at a high p keeps few entries per row, DICE at a high p few weights: their float32 products sum
only the nonzero terms, in another order than BLAS's dense product. Checked against float64
references (the standard bound of a float32 sum of m terms), and the choice of path against the
rule: float32 heads only, by the operand's share of nonzeros, whatever the grid.
"""

import numpy as np
import pytest

from featcache.methods import Fit, Head, get_method
from featcache.methods import sparse as sparse_module
from featcache.methods.ash import keep_count
from featcache.methods.data import PRECISE_HEAD_WEIGHTS
from featcache.methods.sparse import (SPARSE_MAX_DENSITY, csr_rows, sparse_rows_product, sparse_weight,
                                      sparse_weight_product, worth_sparse)
from test_perf_exact import split as replay_split  # ReLU features with exact ties, a zero row, a tied row

U = 2.0**-24  # float32's unit roundoff


def gamma(m):
    """gamma_m = m u / (1 - m u): the relative bound of a float32 sum of m products, in any order."""
    m = np.asarray(m, dtype=np.float64)
    return m * U / (1 - m * U)


def mostly_zero(rng, n, d, density, dtype=np.float32):
    x = rng.normal(0.0, 1.0, size=(n, d)).astype(dtype)
    x[rng.random((n, d)) >= density] = 0
    return x


def test_csr_rows_hold_exactly_the_nonzero_entries():
    rng = np.random.default_rng(0)
    x = mostly_zero(rng, 37, 50, 0.1)
    x[0] = 0  # a row without a nonzero
    x[1, :] = 3.0  # a full row
    x[2, 5] = np.nan  # NaN is kept, as the dense product would multiply it
    x[3, 7] = -0.0  # a negative zero adds nothing: dropped
    csr = csr_rows(x)
    assert csr.dtype == np.float32 and csr.shape == x.shape
    np.testing.assert_array_equal(csr.toarray(), x)
    assert csr.nnz == np.count_nonzero(x)
    np.testing.assert_array_equal(np.diff(csr.indptr), np.count_nonzero(x, axis=1))
    for row in range(len(x)):  # each row's columns ascending
        columns = csr.indices[csr.indptr[row] : csr.indptr[row + 1]]
        np.testing.assert_array_equal(columns, np.flatnonzero(x[row]))
    mask = x > 0.5
    np.testing.assert_array_equal(csr_rows(mask).toarray(), mask.astype(np.float32))
    for empty in (np.zeros((0, 8), np.float32), np.zeros((4, 8), np.float32), np.zeros((3, 0), bool)):
        np.testing.assert_array_equal(csr_rows(empty).toarray(), empty)


@pytest.mark.parametrize("density", [0.0, 0.02, 0.1, 0.15])
def test_sparse_rows_product_is_within_the_float32_bound_of_the_float64_product(density):
    rng = np.random.default_rng(1)
    # 600 columns: two pieces of 256 and one of 88
    x, w = mostly_zero(rng, 300, 600, density), rng.normal(0, 0.1, size=(200, 600)).astype(np.float32)
    x[:, :3] *= 1e3  # a few large terms: cancellation is where an order shows
    out = sparse_rows_product(x, np.ascontiguousarray(w.T))
    assert out.dtype == np.float32 and out.shape == (300, 200)
    exact = x.astype(np.float64) @ w.T.astype(np.float64)
    magnitude = np.abs(x).astype(np.float64) @ np.abs(w.T).astype(np.float64)
    m = np.count_nonzero(x, axis=1)[:, None]  # terms summed per logit
    assert (np.abs(out - exact) <= gamma(m) * magnitude).all()


@pytest.mark.parametrize("density", [0.02, 0.1])
def test_sparse_weight_product_is_within_the_float32_bound_of_the_float64_product(density):
    rng = np.random.default_rng(2)
    x, w = rng.normal(size=(300, 600)).astype(np.float32), mostly_zero(rng, 200, 600, density)
    w[0] = 0  # a class with no weight left: its logit is the bias alone
    out = sparse_weight_product(x, sparse_weight(w), w.T)
    assert out.dtype == np.float32 and out.shape == (300, 200) and out.flags.c_contiguous
    exact = x.astype(np.float64) @ w.T.astype(np.float64)
    magnitude = np.abs(x).astype(np.float64) @ np.abs(w.T).astype(np.float64)
    m = np.count_nonzero(w, axis=1)[None, :]
    assert (np.abs(out - exact) <= gamma(m) * magnitude).all()
    assert (out[:, 0] == 0).all()


def test_worth_sparse_is_the_share_of_kept_entries():
    assert worth_sparse(0, 2048) and worth_sparse(int(SPARSE_MAX_DENSITY * 2048), 2048)
    assert not worth_sparse(int(SPARSE_MAX_DENSITY * 2048) + 1, 2048)
    d = 2048  # ImageNet's ResNet-50: ASH at p >= 88 multiplies sparsely, below densely
    ps = (60, 80, 85, 87, 88, 90, 95, 99)  # k = 819, 410, 307, 266, 246, 205, 102, 20
    assert [worth_sparse(keep_count(d, p), d) for p in ps] == [False] * 4 + [True] * 4


# --- through the methods: which products go sparse, and the numbers they give --------------------------


@pytest.fixture(params=["float32", "precise"])
def head_and_splits(request):
    rng = np.random.default_rng(4)
    k, d = (520, 512) if request.param == "float32" else (10, 64)
    assert (k * d > PRECISE_HEAD_WEIGHTS) == (request.param == "float32")
    w = rng.normal(0, 0.1, size=(k, d)).astype(np.float32)
    b = rng.normal(0, 0.1, size=k).astype(np.float32)
    return Head(w, b), Fit(replay_split(rng, 300, d, w, b, "train")), replay_split(rng, 2100, d, w, b, "test")


def energy64(logits):
    top = logits.max(axis=1, keepdims=True)
    return top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))


def ash_reference(x, p, variant):
    """ASH on float64 copies, brute force: the k largest of each row by a stable sort (lowest index
    first among equal values), then the variant's values."""
    x = x.astype(np.float64)
    k = keep_count(x.shape[1], p)
    order = np.argsort(-x, axis=1, kind="stable")[:, :k]
    mask = np.zeros(x.shape, bool)
    np.put_along_axis(mask, order, True, axis=1)
    pruned = np.where(mask, x, 0.0)
    s1, s2 = x.sum(axis=1), pruned.sum(axis=1)
    if variant == "ash_p":
        return pruned
    if variant == "ash_b":
        return mask * (s1 / k)[:, None]
    return pruned * np.exp(s1 / np.where(s2 == 0, 1, s2))[:, None]


@pytest.mark.parametrize("variant", ["ash_p", "ash_s", "ash_b"])
@pytest.mark.parametrize("p", [88, 90, 97])  # k of 512: 61, 51, 15
def test_ash_at_a_high_p_matches_the_float64_formula(head_and_splits, variant, p, monkeypatch):
    head, fit, data = head_and_splits
    calls = []
    original = sparse_module.sparse_rows_product
    monkeypatch.setattr(sparse_module, "sparse_rows_product", lambda *a: calls.append(1) or original(*a))
    method = get_method(variant)
    out = method(data, head, fit, **method.resolve({"p": p}))
    # the float32 head multiplies the kept entries only (every block of rows); the small head in float64
    assert len(calls) == (3 if not head.precise else 0)
    logits = ash_reference(data.features, p, variant) @ head.weight.T.astype(np.float64) + head.bias
    np.testing.assert_allclose(out.scores, energy64(logits), rtol=2e-6, atol=1e-5)
    clear = np.sort(logits, axis=1)[:, -1] - np.sort(logits, axis=1)[:, -2] > 1e-4
    np.testing.assert_array_equal(out.predictions[clear], logits.argmax(axis=1)[clear])


@pytest.mark.parametrize("p", [88, 95])
def test_dice_at_a_high_p_matches_the_float64_formula(head_and_splits, p, monkeypatch):
    head, fit, data = head_and_splits
    calls = []
    original = sparse_module.sparse_weight_product
    monkeypatch.setattr(sparse_module, "sparse_weight_product", lambda *a: calls.append(1) or original(*a))
    out = get_method("dice")(data, head, fit, p=p)
    assert len(calls) == (3 if not head.precise else 0)
    mean = fit.data.features.astype(np.float64).mean(axis=0)
    contrib = mean[None, :] * head.weight.astype(np.float64)
    kept = np.where(contrib > np.percentile(contrib, p), head.weight.astype(np.float64), 0.0)
    logits = data.features.astype(np.float64) @ kept.T + head.bias
    np.testing.assert_allclose(out.scores, energy64(logits), rtol=2e-6, atol=1e-5)


def test_a_dense_float32_product_stays_dense(head_and_splits, monkeypatch):
    """ASH at p = 60 keeps 40% of each row, the replay's head all its weights: BLAS's dense product."""
    head, fit, data = head_and_splits
    monkeypatch.setattr(sparse_module, "csr_rows", lambda block: pytest.fail("a dense operand went sparse"))
    for name, params in (("ash_p", {"p": 60}), ("ash_b", {"p": 80}), ("dice", {"p": 50}), ("react", {"percentile": 90})):
        method = get_method(name)
        method(data, head, fit, **method.resolve(params))


def test_a_head_changed_in_place_multiplies_by_its_new_weights():
    """A plugin's own head may be changed in place between calls: its sparse form is made again at
    each call, not kept from the first; a read-only head's (the replay's, DICE's memoised) is kept."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(50, 600)).astype(np.float32)
    w = mostly_zero(rng, 500, 600, 0.05)  # 300,000 weights: float32, and sparse
    head = Head(w, np.zeros(500, np.float32))
    assert not head.precise
    for _ in range(2):
        scores, _ = head.energy(x, sparse_weights=True)
        np.testing.assert_allclose(scores, energy64(x.astype(np.float64) @ w.T.astype(np.float64)), rtol=1e-6)
        w[:, :300] = 0  # in place
    from featcache.methods.data import read_only

    frozen = read_only(Head(w.copy(), np.zeros(500, np.float32)))  # as the replay's head is made
    first, _ = frozen.energy(x, sparse_weights=True)
    assert frozen._weight_form("sparse", lambda: pytest.fail("made again")) is not None
    np.testing.assert_array_equal(frozen.energy(x, sparse_weights=True)[0], first)


def test_forms_of_a_read_only_head_follow_its_weight_when_it_is_given_another():
    """A head featcache made read-only keeps its weight's sparse forms; given another array (or
    copied, then given another), it multiplies by the new one, as a fresh head does."""
    import copy

    from featcache.methods.data import read_only

    rng = np.random.default_rng(7)
    data_x = np.maximum(rng.normal(0.2, 1.0, size=(40, 600)), 0).astype(np.float32)
    first, second = (rng.normal(0, 0.1, size=(500, 600)).astype(np.float32) for _ in range(2))
    for w in (first, second):
        w.setflags(write=False)
    head = read_only(Head(first, np.zeros(500, np.float32)))
    keep = keep_count(600, 95)
    pruned = ash_reference(data_x, 95, "ash_p").astype(np.float32)
    assert worth_sparse(keep, 600)
    head.energy(pruned, sparse_rows=True)
    twin = copy.copy(head)
    for h in (head, twin):
        h.weight = second
        np.testing.assert_array_equal(h.energy(pruned, sparse_rows=True)[0],
                                      Head(second, h.bias).energy(pruned, sparse_rows=True)[0])
        assert not np.array_equal(h.energy(pruned, sparse_rows=True)[0],
                                  Head(first, h.bias).energy(pruned, sparse_rows=True)[0])


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_dice_keeps_the_nan_of_a_non_finite_feature_in_a_pruned_column():
    """The dense product makes 0 * inf = NaN where DICE zeroed a column's weights; the sparse one,
    which skips those weights, gives such rows the dense product's logits (the scores' NaNs then
    fall where the dense product's fall), and every row of a block without them keeps its numbers."""
    from featcache.methods.dice import dice_head

    rng = np.random.default_rng(8)
    k, d = 520, 512
    w = rng.normal(0, 0.1, size=(k, d)).astype(np.float32)
    b = np.zeros(k, np.float32)
    train = replay_split(rng, 300, d, w, b, "train")
    train.features[:, 7] = 0.0  # a dead channel: its mean is 0, so DICE keeps none of its weights
    fit, head = Fit(train), Head(w, b)
    dense_head = dice_head(head, fit.mean_feature, 90)
    assert (dense_head.weight[:, 7] == 0).all() and sparse_module.worth_sparse(np.count_nonzero(dense_head.weight), w.size)
    clean = get_method("dice")(replay_split(np.random.default_rng(9), 1500, d, w, b, "test"), head, fit, p=90).scores
    assert np.isfinite(clean).all()
    for bad in (np.inf, -np.inf, np.nan):
        broken = replay_split(np.random.default_rng(9), 1500, d, w, b, "test")
        broken.features[[3, 1200], 7] = bad
        scores = get_method("dice")(broken, head, fit, p=90).scores
        dense = dense_head.energy(broken.features)[0]  # the dense product, as before the sparse one
        assert np.isnan(scores[[3, 1200]]).all()
        np.testing.assert_array_equal(np.isnan(scores), np.isnan(dense))
        np.testing.assert_array_equal(scores[1024:1152], clean[1024:1152])  # rows in no block with them
        np.testing.assert_array_equal(scores[128:1024], clean[128:1024])


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_a_head_with_a_non_finite_weight_multiplies_densely(monkeypatch):
    """Skipping zero features would drop 0 * inf = NaN: such a head never goes sparse."""
    rng = np.random.default_rng(10)
    w = rng.normal(0, 0.1, size=(520, 512)).astype(np.float32)
    w[3, 5] = np.inf
    head = Head(w, np.zeros(520, np.float32))
    monkeypatch.setattr(sparse_module, "csr_rows", lambda block: pytest.fail("went sparse"))
    x = ash_reference(np.maximum(rng.normal(size=(30, 512)), 0), 95, "ash_p").astype(np.float32)
    scores, _ = head.energy(x, sparse_rows=True)
    np.testing.assert_array_equal(scores, head.energy(x)[0])


def test_only_dice_multiplies_by_a_head_s_nonzeros(monkeypatch):
    """A pruned model's head (few nonzero weights) multiplies densely for every other method, so
    their numbers do not depend on the head's sparsity."""
    rng = np.random.default_rng(11)
    k, d = 520, 512
    w = mostly_zero(rng, k, d, 0.05)
    b = np.zeros(k, np.float32)
    head, fit, data = Head(w, b), Fit(replay_split(rng, 300, d, w, b, "train")), replay_split(rng, 500, d, w, b, "test")
    calls = []
    original = sparse_module.sparse_weight_product
    monkeypatch.setattr(sparse_module, "sparse_weight_product", lambda *a: calls.append(1) or original(*a))
    for name, params in (("react", {"percentile": 90}), ("ash_p", {"p": 60}), ("ash_rand", {"p": 65}), ("energy", {})):
        method = get_method(name)
        method(data, head, fit, **method.resolve(params))
    assert calls == []
    get_method("dice")(data, head, fit, p=50)  # DICE at 50% of a 5% head keeps under 5%
    assert calls


def test_methods_whose_numbers_changed_have_a_new_version():
    """Progress saved before the sparse products must not be reused for them (featcache.progress
    compares each method's version)."""
    for name in ("ash_p", "ash_s", "ash_b", "react+ash_p", "react+ash_s", "react+ash_b", "dice"):
        assert get_method(name).version == "2", name
        assert get_method(f"nap+{name}").version != get_method(f"nap+{name}").version.replace("2", "1")


def test_a_plugin_s_read_only_head_changed_through_a_view_multiplies_by_its_new_weights():
    """Only heads featcache made read-only keep forms of their weight: a plugin's read-only array may
    still change through a writable view taken before."""
    rng = np.random.default_rng(12)
    w = rng.normal(0, 0.1, size=(500, 600)).astype(np.float32)
    view = w[:]
    w.setflags(write=False)
    head = Head(w, np.zeros(500, np.float32))
    x = ash_reference(np.maximum(rng.normal(size=(30, 600)), 0), 95, "ash_p").astype(np.float32)
    head.energy(x, sparse_rows=True)
    view *= 3
    np.testing.assert_array_equal(head.energy(x, sparse_rows=True)[0],
                                  Head(w.copy(), head.bias).energy(x, sparse_rows=True)[0])


def test_a_head_subclass_with_the_old_job_signature_still_gives_energies():
    """Head.energy passes the sparse flags only when asked, so a plugin's subclass (or wrapper) of
    `job` written before them keeps working for dense products."""
    class Scaled(Head):
        def job(self, x, row_scales=(None,)):
            return super().job(x, row_scales)

    rng = np.random.default_rng(13)
    w = rng.normal(0, 0.1, size=(520, 512)).astype(np.float32)
    x = rng.normal(size=(40, 512)).astype(np.float32)
    scores, _ = Scaled(w, np.zeros(520, np.float32)).energy(x)
    np.testing.assert_array_equal(scores, Head(w, np.zeros(520, np.float32)).energy(x)[0])


def test_a_plugin_s_version_follows_the_built_ins_versions(monkeypatch):
    """A plugin may call a built-in (get_method("ash_s")(...)): raising a built-in's version must
    make a sweep score the plugin's configurations again too."""
    import dataclasses

    import featcache
    from featcache.methods import registry

    monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))  # this test's registrations are undone

    def wrapped_ash_s(data, head, fit, p):
        return get_method("ash_s")(data, head, fit, p=p)

    featcache.register("wrapped_ash_s_version_test", defaults={"p": 90})(wrapped_ash_s)
    before = get_method("wrapped_ash_s_version_test").version
    assert before.startswith("1+") and before.endswith("." + registry.builtin_versions_digest())
    registry.REGISTRY["ash_s"] = dataclasses.replace(registry.REGISTRY["ash_s"], version="3")
    del registry.REGISTRY["wrapped_ash_s_version_test"]
    featcache.register("wrapped_ash_s_version_test", defaults={"p": 90})(wrapped_ash_s)
    assert get_method("wrapped_ash_s_version_test").version != before
