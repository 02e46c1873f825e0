"""OOD metrics with ID as the positive class (shared/methods.md), all from one sort of each split's scores.

Each is the one the ASH and ReAct reference code computes, `cal_metric(known, novel)` and
`get_curve` in deeplearning-wisc/react util/metrics.py, copied unchanged by andrijazz/ash
utils/metrics.py, so that numbers compare with the seed papers' tables (known = ID scores,
novel = OOD scores, higher = more ID):

- FPR95 (`get_curve`'s fpr_at_tpr95): threshold t = the ID scores sorted ascending at index
  round(0.05 * n_id) (Python's round, half to even), FPR95 = fraction of OOD scores > t (strictly).
  This accepts at least 95% of ID (score >= t) when 0.05 n_id rounds down, a little fewer when it
  rounds up (n_id = 30: 28 of 30), and does not count OOD scores equal to t.
- AUROC (`cal_metric`'s AUROC, -trapz(1 - fpr, tpr) over `get_curve`'s tie-corrected curve): the
  area under the full ROC curve, equal to the Mann-Whitney statistic with ties counted half (and to
  sklearn.metrics.roc_auc_score).
- AUPR-In (`cal_metric`'s AUIN): precision tp / (tp + fp) against recall, trapezoids over the same
  curve, ending at (recall 0, precision 0); not sklearn's average precision (a step sum). A perfect
  separation of n_id samples gives 1 - 1 / (2 n_id), as in the reference.
- AUPR-Out (`cal_metric`'s AUOUT): the same with OOD positive (samples below each threshold), from
  (0, 0); a perfect separation gives 1 - 1 / (2 n_ood).
The reference's curve has one point per distinct score of either split v (ascending), tp = #ID >= v,
fp = #OOD >= v, then (0, 0); AUIN and AUOUT are sums over the ID and OOD distinct values here, so no
joint sort is needed. Other libraries define FPR95 differently (OpenOOD v1.0's threshold, OpenOOD
v1.5's and pytorch-ood's OOD-positive FPR95): tests/test_metrics_reference.py shows by how much.
Values are fractions; papers print percent.
"""

from __future__ import annotations

import numpy as np

from featcache.errors import FeatcacheError

DEFINITIONS = "react-util-metrics"  # progress stores reuse only rows computed with these definitions
ID_REJECTED = 0.05  # get_curve's 0.05 * num_k: the ID share below the 95%-TPR threshold


class SortedScores:
    """Scores sorted once, with the counts needed to place other scores among them."""

    def __init__(self, scores):
        scores = np.asarray(scores, dtype=np.float64).ravel()
        if len(scores) == 0:
            raise FeatcacheError("metrics need at least one ID and one OOD score")
        if np.isnan(scores).any():
            raise FeatcacheError(f"{int(np.isnan(scores).sum())} scores are NaN")
        self.sorted = np.sort(scores)
        self.n = len(scores)
        # distinct values ascending, how many scores take each, and how many are <= each (np.unique's
        # values and counts, from the sort already made)
        starts = np.flatnonzero(np.concatenate(([True], self.sorted[1:] != self.sorted[:-1])))
        self.values = self.sorted[starts]
        self.up_to = np.append(starts[1:], self.n)  # at_most(values), without a search
        self.counts = np.diff(starts, append=self.n)
        self.starts = starts

    def count_placed(self, positions, counts):
        """For each sorted score j, the sum of `counts` over the other split's values o with
        positions[o] <= j. With positions = how many of these scores are <= o (at_most), that is how
        many of the other scores lie below score j (o < score j exactly when j >= #<= o); with positions
        = how many are < o, how many lie at or below it. One pass instead of a search per score."""
        return np.cumsum(np.bincount(np.repeat(positions, counts), minlength=self.n + 1)[: self.n])

    def at_least(self, t):
        """How many scores are >= t, for each t."""
        return self.n - np.searchsorted(self.sorted, t, side="left")

    def at_most(self, t):
        """How many scores are <= t, for each t."""
        return np.searchsorted(self.sorted, t, side="right")


def ood_metrics(id_scores, ood_scores) -> dict:
    """fpr95, auroc, aupr_in and aupr_out for ID scores against OOD scores (higher = more ID).

    Either argument may be a SortedScores, so that one split's sort serves many comparisons.
    """
    ids = id_scores if isinstance(id_scores, SortedScores) else SortedScores(id_scores)
    ood = ood_scores if isinstance(ood_scores, SortedScores) else SortedScores(ood_scores)
    # FPR95 as get_curve: threshold = known[round(0.05 * num_k)] (ascending), OOD counted when > it
    threshold = ids.sorted[round(ID_REJECTED * ids.n)]
    fpr95 = float((ood.n - ood.at_most(threshold)) / ood.n)
    # AUROC = P(ID > OOD) + P(ID = OOD) / 2, counted per distinct OOD value
    # each distinct OOD value placed among the sorted ID scores (two searches); the OOD counts at the
    # ID scores follow from those places by counting, with no search of the ID scores among the OOD
    id_ge_ood, id_le_ood = ids.at_least(ood.values), ids.at_most(ood.values)
    ood_ge_id = ood.n - ids.count_placed(id_le_ood, ood.counts)[ids.starts]
    ood_le_id = ids.count_placed(ids.n - id_ge_ood, ood.counts)[ids.starts]
    below = ids.n - id_ge_ood  # ID scores strictly below each OOD value
    ties = id_le_ood - below
    auroc = float(np.sum(ood.counts * (ids.n - below - ties + 0.5 * ties)) / (ids.n * ood.n))
    # AUIN: recall drops only at ID values u, by count(u) / n_id, from the point at u (tp = #ID >= u,
    # fp = #OOD >= u) to the next one (#ID > u, #OOD > u); the trapezoid averages the two precisions
    # (0 after the last point, the reference's closing (0, 0)).
    aupr_in = float(np.sum(ids.counts / ids.n * (_ratio(ids.n - ids.up_to + ids.counts, ood_ge_id) +
                                                 _ratio(ids.n - ids.up_to, ood.n - ood_le_id)) / 2))
    # AUOUT: OOD positive among the samples below each threshold; the x axis (1 - fpr) moves only at
    # OOD values o, by count(o) / n_ood, from (#OOD < o, #ID < o) to (#OOD <= o, #ID <= o); the first
    # point is the reference's (0, 0).
    ood_lt, id_lt = ood.up_to - ood.counts, ids.n - id_ge_ood
    aupr_out = float(np.sum(ood.counts / ood.n * (_ratio(ood_lt, id_lt) + _ratio(ood.up_to, id_le_ood)) / 2))
    return {"fpr95": fpr95, "auroc": auroc, "aupr_in": aupr_in, "aupr_out": aupr_out}


def _ratio(positives, negatives) -> np.ndarray:
    """positives / (positives + negatives), 0 where both are 0 (the reference drops such points)."""
    positives, total = np.asarray(positives, np.float64), np.asarray(positives + negatives, np.float64)
    return np.divide(positives, total, out=np.zeros_like(total), where=total > 0)


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of the predictions of the head actually used (shaping can change them)."""
    return float(np.mean(np.asarray(predictions) == labels))
