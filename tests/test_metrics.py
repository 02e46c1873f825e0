"""Metrics against scikit-learn and against brute-force definitions (the reference code's own
definitions are tested in test_metrics_reference.py)."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from featcache.errors import FeatcacheError
from featcache.metrics import SortedScores, accuracy, ood_metrics


def brute_auroc(id_s, ood_s):
    """Mann-Whitney: P(ID score > OOD score) + 0.5 P(equal), over all pairs."""
    total = 0.0
    for a in id_s:
        for b in ood_s:
            total += 1.0 if a > b else 0.5 if a == b else 0.0
    return total / (len(id_s) * len(ood_s))


def brute_fpr95(id_s, ood_s):
    """The ReAct/ASH reference: threshold = the ID score at ascending index round(0.05 n), OOD above it."""
    t = sorted(id_s)[round(0.05 * len(id_s))]
    return sum(b > t for b in ood_s) / len(ood_s)


@pytest.mark.parametrize("ties", [False, True])
def test_metrics_match_brute_force_and_sklearn(rng, ties):
    for _ in range(5):
        id_s = rng.normal(1.0, 1.0, size=int(rng.integers(20, 200)))
        ood_s = rng.normal(0.0, 1.0, size=int(rng.integers(20, 200)))
        if ties:
            id_s, ood_s = np.round(id_s * 2) / 2, np.round(ood_s * 2) / 2
        m = ood_metrics(id_s, ood_s)
        y = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
        s = np.r_[id_s, ood_s]
        assert m["auroc"] == pytest.approx(brute_auroc(id_s, ood_s), abs=1e-12)
        assert m["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert m["fpr95"] == pytest.approx(brute_fpr95(list(id_s), list(ood_s)), abs=1e-12)
        # the reference's trapezoid AUPR is close to, not equal to, sklearn's average precision
        assert m["aupr_in"] == pytest.approx(average_precision_score(y, s), abs=0.05)
        assert m["aupr_out"] == pytest.approx(average_precision_score(1 - y, -s), abs=0.05)


def test_fpr95_hand_worked():
    # 20 ID scores 1..20: accepting 95% (19 of them) needs threshold 2. OOD at or above 2: 2.5 and 19.5.
    id_s = np.arange(1, 21, dtype=float)
    ood_s = np.array([0.5, 2.5, 19.5])
    m = ood_metrics(id_s, ood_s)
    assert m["fpr95"] == pytest.approx(2 / 3)
    # pairs ID > OOD: 0.5 beaten by all 20, 2.5 by 18, 19.5 by 1 -> 39 of 60
    assert m["auroc"] == pytest.approx(39 / 60)


def test_perfect_and_reversed_separation():
    m = ood_metrics([3, 4, 5], [0, 1, 2])
    assert m["fpr95"] == 0.0 and m["auroc"] == 1.0
    m = ood_metrics([0, 1, 2], [3, 4, 5])
    assert m["fpr95"] == 1.0 and m["auroc"] == 0.0


def test_infinite_scores_rank_and_nan_is_refused():
    m = ood_metrics([1.0, 2.0, np.inf], [-np.inf, 0.0])
    assert m["auroc"] == 1.0
    with pytest.raises(FeatcacheError, match="NaN"):
        ood_metrics([1.0, np.nan], [0.0])


def test_accuracy():
    assert accuracy(np.array([1, 0, 1]), np.array([1, 0, 0])) == pytest.approx(2 / 3)


def test_counts_placed_among_sorted_scores_are_brute_force_counts(rng):
    # the OOD counts at each ID score come from where the OOD values fall among the ID scores;
    # checked against counting every pair, with ties within and across the splits and infinities
    for n_id, n_ood in ((1, 1), (7, 40), (300, 25)):
        id_s = np.concatenate([np.round(rng.normal(size=n_id - 1) * 2) / 2, [-np.inf]])
        ood_s = np.concatenate([np.round(rng.normal(size=n_ood - 1) * 2) / 2, [np.inf]])
        if n_id > 2:
            id_s[:2], ood_s[:1] = np.inf, -np.inf
        ids, ood = SortedScores(id_s), SortedScores(ood_s)
        below = ids.count_placed(ids.at_most(ood.values), ood.counts)
        at_or_below = ids.count_placed(ids.n - ids.at_least(ood.values), ood.counts)
        assert below.tolist() == [int(np.sum(ood_s < v)) for v in ids.sorted]
        assert at_or_below.tolist() == [int(np.sum(ood_s <= v)) for v in ids.sorted]


def test_metric_rows_on_all_cores_are_each_splits_metrics_and_name_the_first_bad_split():
    from featcache.errors import FeatcacheError
    from featcache.replay import metric_rows

    rng = np.random.default_rng(4)
    ids = np.round(rng.normal(1, 1, 3000), 2)  # ties within and across the splits
    oods = {f"ood{i}": np.round(rng.normal(-0.5 * i, 1, 700 + 100 * i), 2) for i in range(5)}
    rows = metric_rows("m", {"p": 1}, ids, 0.25, oods)
    assert [r["ood"] for r in rows] == [*oods, "mean"]
    for row, (name, scores) in zip(rows, oods.items()):
        assert {k: row[k] for k in ("fpr95", "auroc", "aupr_in", "aupr_out")} == ood_metrics(ids, scores)
        assert row["id_acc"] == 0.25 and row["params"] == '{"p": 1}'
    bad = dict(oods)
    bad["ood2"] = bad["ood2"].copy(); bad["ood2"][5] = np.nan
    bad["ood4"] = bad["ood4"].copy(); bad["ood4"][0] = np.nan
    with pytest.raises(FeatcacheError, match=r'm \{"p": 1\} on ood2: 1 scores are NaN'):
        metric_rows("m", {"p": 1}, ids, 0.25, bad)
    with pytest.raises(FeatcacheError, match="on the ID split: 1 scores are NaN"):
        metric_rows("m", {"p": 1}, np.append(ids, np.nan), 0.25, bad)


def test_metric_rows_of_many_configurations_are_each_ones_own_and_name_the_first_bad_one():
    from featcache.errors import FeatcacheError
    from featcache.replay import METRIC_GROUP, metric_rows_of

    rng = np.random.default_rng(9)
    entries = []
    for c in range(2 * METRIC_GROUP + 3):  # groups of METRIC_GROUP, the last one short
        ids = np.round(rng.normal(1, 1, 500 + 37 * c), 2)
        oods = {f"ood{i}": np.round(rng.normal(-0.3 * i - 0.01 * c, 1, 300 + 50 * i), 2) for i in range(1 + c % 4)}
        entries.append((f"m{c}", {"p": c}, ids, c / 100, oods))
    found = metric_rows_of(entries)
    assert len(found) == len(entries)
    for rows, (name, params, ids, acc, oods) in zip(found, entries):
        assert [r["ood"] for r in rows] == [*oods, "mean"]
        for row, scores in zip(rows, oods.values()):
            assert {k: row[k] for k in ("fpr95", "auroc", "aupr_in", "aupr_out")} == ood_metrics(ids, scores)
            assert row["method"] == name and row["params"] == f'{{"p": {params["p"]}}}' and row["id_acc"] == acc
        assert rows[-1]["auroc"] == float(np.mean([r["auroc"] for r in rows[:-1]]))
    bad = list(entries)
    for c in (METRIC_GROUP + 1, METRIC_GROUP + 4):  # two bad configurations of one group: the first is named
        name, params, ids, acc, oods = bad[c]
        oods = {k: v.copy() for k, v in oods.items()}
        oods[list(oods)[-1]][3] = np.nan
        bad[c] = (name, params, ids, acc, oods)
    with pytest.raises(FeatcacheError, match=rf'm{METRIC_GROUP + 1} \{{"p": {METRIC_GROUP + 1}\}} on ood1: 1 scores are NaN'):
        metric_rows_of(bad)
