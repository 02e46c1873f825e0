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


def _curve(pos: np.ndarray, neg: np.ndarray):
    """True and false positive counts at each distinct threshold, thresholds descending."""
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(len(pos), bool), np.zeros(len(neg), bool)])
    order = np.argsort(-scores, kind="mergesort")
    scores, is_pos = scores[order], is_pos[order]
    # the last index of each run of equal scores closes one threshold
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tps = np.cumsum(is_pos)[last]
    fps = last + 1 - tps
    return tps.astype(np.float64), fps.astype(np.float64)


def _average_precision(tps, fps, n_pos):
    precision = tps / (tps + fps)
    recall = tps / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def ood_metrics(id_scores, ood_scores) -> dict:
    """fpr95, auroc, aupr_in and aupr_out for ID scores against OOD scores (higher = more ID)."""
    id_scores = np.asarray(id_scores, dtype=np.float64).ravel()
    ood_scores = np.asarray(ood_scores, dtype=np.float64).ravel()
    if len(id_scores) == 0 or len(ood_scores) == 0:
        raise FeatcacheError("metrics need at least one ID and one OOD score")
    for label, values in (("ID", id_scores), ("OOD", ood_scores)):
        if np.isnan(values).any():
            raise FeatcacheError(f"{int(np.isnan(values).sum())} {label} scores are NaN")
    n_id, n_ood = len(id_scores), len(ood_scores)
    tps, fps = _curve(id_scores, ood_scores)
    tpr, fpr = tps / n_id, fps / n_ood
    fpr95 = float(fpr[np.argmax(tpr >= TPR_LEVEL)])
    tpr0, fpr0 = np.r_[0.0, tpr], np.r_[0.0, fpr]
    auroc = float(np.sum(np.diff(fpr0) * (tpr0[1:] + tpr0[:-1]) / 2))
    aupr_in = _average_precision(tps, fps, n_id)
    out_tps, out_fps = _curve(-ood_scores, -id_scores)
    aupr_out = _average_precision(out_tps, out_fps, n_ood)
    return {"fpr95": fpr95, "auroc": auroc, "aupr_in": aupr_in, "aupr_out": aupr_out}


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of the predictions of the head actually used (shaping can change them)."""
    return float(np.mean(np.asarray(predictions) == labels))
