"""GradNorm (Huang et al., NeurIPS 2021), last layer, in closed form.

The gradient of the KL divergence between the uniform distribution and softmax(f / T) with respect
to the head's weight is an outer product U V^T, U = (softmax(f / T) - 1/K) / T (times K for the
reference code's all-ones targets), V = x; its L1 norm is ||U||_1 * ||V||_1:

    S = (K / T) * sum_j |softmax(f / T)_j - 1 / K| * ||x||_1

The factor K follows the reference code; it does not change rankings. Uses the original logits.

Paper setting: T = 1 on ImageNet, where the RG paper compares with GradNorm in GradNorm's own
settings (section 4.1, tables 1 and 2); the seeds give none for CIFAR.
"""

from __future__ import annotations

import numpy as np

from featcache.methods.data import Output, original_predictions
from featcache.methods.kernels import LSE_BLOCK, row_reduce
from featcache.methods.logit import original_max_logit
from featcache.methods.registry import register


def gradnorm_score(logits: np.ndarray, x: np.ndarray, T: float = 1.0, l1: np.ndarray | None = None,
                   tops: np.ndarray | None = None) -> np.ndarray:
    """`l1`: ||x||_1 per row when already known (it does not depend on T); `tops`: the rows' largest
    logits in float64, when known (f / T is largest where f is: a correctly rounded division by T > 0
    keeps order, so max(f) / T is the largest of f / T, to the bit; used for T > 0 only)."""
    if l1 is None:
        l1 = feature_l1(x)
    # LSE_BLOCK rows at a time in two buffers that stay in the CPU cache, in place: the very
    # operations of the formula, so the same numbers, without (N, K) float64 temporaries
    n, k = np.shape(logits)
    out = np.empty(n)
    z, e = np.empty((2, min(LSE_BLOCK, n), k))
    for a in range(0, n, LSE_BLOCK):
        rows = slice(a, min(a + LSE_BLOCK, n))
        zr, er = z[: rows.stop - a], e[: rows.stop - a]
        if T == 1:
            np.copyto(zr, logits[rows])  # a division by 1 is exact: the same numbers, without numpy's casting divide
        else:
            np.divide(logits[rows], T, out=zr, dtype=np.float64)
        top = zr.max(axis=1, keepdims=True) if tops is None or not T > 0 else np.divide(tops[rows], T)[:, None]
        lse = top[:, 0] + np.log(np.exp(np.subtract(zr, top, out=er), out=er).sum(axis=1))  # logsumexp per row
        probs = np.exp(np.subtract(zr, lse[:, None], out=er), out=er)
        probs -= 1.0 / k
        out[rows] = (k / T) * np.abs(probs, out=probs).sum(axis=1) * l1[rows]
    return out


def feature_l1(x: np.ndarray) -> np.ndarray:
    return np.abs(np.asarray(x, np.float64)).sum(axis=1)


@register("gradnorm", defaults={"T": 1.0}, paper={"imagenet": {"T": 1.0}})
def gradnorm(data, head, fit, T):
    # a block of rows at a time: each row's score is its own, and no (N, K) float64 array is held
    f, x = data.logits, data.features
    l1 = data.memo(("l1",), lambda: row_reduce(lambda a, b: feature_l1(x[a:b]), len(x)))  # one pass for every T
    tops = original_max_logit(data)
    return Output(row_reduce(lambda a, b: gradnorm_score(f[a:b], None, T, l1[a:b], tops[a:b]), len(f)),
                  original_predictions(data))
