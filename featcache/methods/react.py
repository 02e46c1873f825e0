"""ReAct (Sun et al., NeurIPS 2021): clip the pooled feature at c, then energy; and ReAct + ASH.

c is given (`clip`) or is the `percentile` (default 90) of every entry of the features of
`percentile_of`: id_train (the default, as ASH's appendix D and shared/methods.md describe the ReAct
procedure: "the 90% percentile calculated from training data") or id_val (as the ReAct reference code
does, computing it on held-out ID images). np.percentile, linear interpolation.
ReAct + ASH (ASH paper, section 5): clip first, then shape with ASH-P, -B or -S.

Paper settings: percentile 90 on every benchmark (ASH appendix D, notes on the MobileNet DICE + ReAct
grid: "1.33 is the 90% percentile calculated from training data, following the ReAct procedure").
ReAct + ASH: ASH-S at p = 90 with clip 1.0 on CIFAR-10, CIFAR-100 and ImageNet (ASH appendix D,
notes on table 5); the seeds give no setting for ReAct + ASH-P or ASH-B.
"""

from __future__ import annotations

import numpy as np

from featcache.methods.ash import ash_b_fill, ash_prune, sharpen_scale
from featcache.methods.data import Output
from featcache.errors import FeatcacheError
from featcache.methods.registry import every_benchmark, register


def react_features(x: np.ndarray, c: float) -> np.ndarray:
    """min(x, c) elementwise."""
    return np.minimum(x, np.float32(c))


def clip_value(fit, clip=None, percentile=None, percentile_of="id_train") -> float:
    if clip is not None:
        return float(clip)
    try:
        return fit.feature_percentile(percentile, percentile_of)
    except FeatcacheError as exc:
        raise FeatcacheError(f"react: percentile_of {percentile_of}: {exc}") from None


CLIP = {"percentile": 90, "clip": None, "percentile_of": "id_train"}
CLIP_CHOICE = (("percentile", "clip"),)
QUALIFIES = {"percentile_of": "percentile"}


@register("react", defaults=CLIP, one_of=CLIP_CHOICE, qualifies=QUALIFIES,
          paper=every_benchmark({"percentile": 90}))
def react(data, head, fit, percentile=None, clip=None, percentile_of=None):
    c, x = clip_value(fit, clip, percentile, percentile_of), data.features
    return Output(*head.energy(lambda a, b: react_features(x[a:b], c), n=len(x)))


def clipped(data, fit, percentile, clip, percentile_of):
    return react_features(data.features, clip_value(fit, clip, percentile, percentile_of))


@register("react+ash_p", defaults={"p": 60, **CLIP}, one_of=CLIP_CHOICE, qualifies=QUALIFIES)
def react_ash_p(data, head, fit, p, percentile=None, clip=None, percentile_of=None):
    return Output(*head.energy(ash_prune(clipped(data, fit, percentile, clip, percentile_of), p)[0]))


@register("react+ash_b", defaults={"p": 65, **CLIP}, one_of=CLIP_CHOICE, qualifies=QUALIFIES)
def react_ash_b(data, head, fit, p, percentile=None, clip=None, percentile_of=None):
    x = clipped(data, fit, percentile, clip, percentile_of)
    _, mask, k = ash_prune(x, p)
    return Output(*head.energy(mask, row_scale=ash_b_fill(x, k)))


@register("react+ash_s", defaults={"p": 90, **CLIP}, one_of=CLIP_CHOICE, qualifies=QUALIFIES,
          paper=every_benchmark({"p": 90, "clip": 1.0}))
def react_ash_s(data, head, fit, p, percentile=None, clip=None, percentile_of=None):
    x = clipped(data, fit, percentile, clip, percentile_of)
    pruned = ash_prune(x, p)[0]
    scale = sharpen_scale(x.sum(axis=1, dtype=np.float64), pruned.sum(axis=1, dtype=np.float64))
    return Output(*head.energy(pruned, row_scale=scale))
