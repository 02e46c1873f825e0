"""OOD metrics with ID as the positive class (shared/methods.md), all from one sort of the scores.

- FPR95: OOD false positive rate at the first ROC point (thresholds descending over every distinct
  score, none dropped) whose TPR on ID is >= 0.95; a sample is accepted when score >= threshold.
- AUROC: area under the full ROC curve, equal to the Mann-Whitney statistic with ties counted half
  (and to sklearn.metrics.roc_auc_score).
- AUPR-In: average precision with ID positive (sklearn.metrics.average_precision_score).
- AUPR-Out: average precision with OOD positive and the scores negated.
Values are fractions; papers print percent.
"""

from __future__ import annotations

import numpy as np

from featcache.errors import FeatcacheError

TPR_LEVEL = 0.95


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
        # distinct values ascending, and how many scores take each
        self.values, self.counts = np.unique(self.sorted, return_counts=True)

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
    # ROC over thresholds at each distinct ID value, descending: TPR steps only there
    thresholds = ids.values[::-1]
    tps = ids.at_least(thresholds).astype(np.float64)
    fps = ood.at_least(thresholds).astype(np.float64)
    # FPR95: the first threshold (descending, over ID and OOD values alike) with TPR >= 0.95. An
    # OOD value between two ID values does not change TPR, so the first ID value reaching it decides.
    first = int(np.argmax(tps / ids.n >= TPR_LEVEL))
    fpr95 = float(fps[first] / ood.n)
    # AUROC = P(ID > OOD) + P(ID = OOD) / 2, counted per distinct OOD value
    below = ids.n - ids.at_least(ood.values)  # ID scores strictly below each OOD value
    ties = ids.at_most(ood.values) - below
    auroc = float(np.sum(ood.counts * (ids.n - below - ties + 0.5 * ties)) / (ids.n * ood.n))
    # AUPR-In: average precision with ID positive, thresholds at distinct ID values
    aupr_in = float(np.sum(ids.counts[::-1] / ids.n * tps / (tps + fps)))
    # AUPR-Out: OOD positive with scores negated, i.e. thresholds at distinct OOD values ascending
    out_tps = ood.at_most(ood.values).astype(np.float64)
    out_fps = ids.at_most(ood.values).astype(np.float64)
    aupr_out = float(np.sum(ood.counts / ood.n * out_tps / (out_tps + out_fps)))
    return {"fpr95": fpr95, "auroc": auroc, "aupr_in": aupr_in, "aupr_out": aupr_out}


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of the predictions of the head actually used (shaping can change them)."""
    return float(np.mean(np.asarray(predictions) == labels))
