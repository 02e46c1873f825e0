"""NAP, neural activation patterns (seeds/nap-paper.txt), alone and combined with any score.

S_NAP = mean_c (max_c / (mean_c + eps))^2 over the channels of the post-activation pre-pool map,
eps = 1.0.

Combination with a score X: S = S_X^w * S_NAP^(1 - w), w in (0, 1). A real power of a negative
S_X is NaN and energies can be negative, so S_X is first made positive by a monotone transform
stated per method:
- "exp" (energy-like scores: energy, ASH, ReAct, RG, MaxLogit, DICE, SCALE, KNN): S_X' = exp(S_X);
  for energy that is the softmax denominator sum_j exp(f_j).
- "identity" (scores that are never negative: MSP, GradNorm): S_X' = S_X.
The score reported is log S = w * log S_X' + (1 - w) * log S_NAP, which ranks samples exactly as S
does and cannot overflow. A sample with S = 0 (an all-zero map, or GradNorm of an all-zero
feature) gets -inf, the bottom rank, as S = 0 would.
Prediction and ID accuracy are those of X.
"""

from __future__ import annotations

import numpy as np

from featcache.methods.data import Output, original_predictions
from featcache.methods.kernels import row_reduce
from featcache.methods.registry import REGISTRY, Method, register

NAP_EPS = 1.0


def nap_score(chan_max: np.ndarray, chan_mean: np.ndarray, eps: float = NAP_EPS) -> np.ndarray:
    """mean_c (max_c / (mean_c + eps))^2 per sample."""
    ratio = np.asarray(chan_max, np.float64) / (np.asarray(chan_mean, np.float64) + eps)
    return np.mean(ratio**2, axis=1)


def combine_scores(s_x: np.ndarray, s_nap: np.ndarray, w: float, positive: str) -> np.ndarray:
    """log(S_X'^w * S_NAP^(1-w)) with S_X' = exp(S_X) or S_X; see the module docstring."""
    with np.errstate(divide="ignore"):
        log_x = s_x if positive == "exp" else np.log(s_x)
        return w * log_x + (1 - w) * np.log(s_nap)


def shared_nap_score(data, eps):
    mx, mn = data.chan_max, data.chan_mean
    return data.memo(("nap", eps), lambda: row_reduce(lambda a, b: nap_score(mx[a:b], mn[a:b], eps), len(mx)))


@register("nap", defaults={"eps": NAP_EPS}, positive="identity")
def nap(data, head, fit, eps):
    return Output(shared_nap_score(data, eps), original_predictions(data))


def shared_output(base: Method, data, head, fit, params: dict) -> Output:
    """`base`'s output on `data`, computed once per split and parameters: it does not depend on w."""
    key = ("method", base.name, tuple(sorted(params.items())))
    return data.memo(key, lambda: base.fn(data, head, fit, **params))


# NAP paper, table 11, ImageNet-1k column; a pipeline can give other defaults (e.g. CIFAR-10's).
PAPER_W = {"ash_p": 0.8, "ash_b": 0.8, "ash_s": 0.8, "dice": 0.6, "energy": 0.6, "knn": 0.6, "msp": 0.3,
           "react": 0.8, "scale": 0.4}


def combine(base: Method) -> Method:
    """The method nap+<base>: parameters w (default 0.5) and eps, plus all of base's."""
    if "w" in base.defaults or "eps" in base.defaults:
        raise ValueError(f"{base.name}: parameter names clash with NAP's w and eps")

    def score(data, head, fit, w, eps, **params):
        out = shared_output(base, data, head, fit, params)
        return Output(combine_scores(out.scores, shared_nap_score(data, eps), w, base.positive), out.predictions)

    paper = None
    if base.name in PAPER_W:
        paper = {"w": PAPER_W[base.name], **(base.paper_default or {})}
    version = f"nap{REGISTRY['nap'].version}+{base.name}{base.version}"  # either code changing changes it
    return Method(f"nap+{base.name}", score, {"w": 0.5, "eps": NAP_EPS, **base.defaults}, base.positive,
                  base.one_of, paper, base.integer, version)
