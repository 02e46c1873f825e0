"""ReAct (Sun et al., NeurIPS 2021): clip the pooled feature at c, then energy; and ReAct + ASH.

c is given (`clip`) or is the `percentile` (default 90) of every entry of the id_train features.
ReAct + ASH (ASH paper, section 5): clip first, then shape with ASH-P, -B or -S.
"""

from __future__ import annotations

import numpy as np

from featcache.methods.ash import ash_b_fill, ash_prune, sharpen_scale
from featcache.methods.data import Output
from featcache.methods.registry import register


def react_features(x: np.ndarray, c: float) -> np.ndarray:
    """min(x, c) elementwise."""
    return np.minimum(x, np.float32(c))


def clip_value(fit, clip=None, percentile=None) -> float:
    return float(clip) if clip is not None else fit.feature_percentile(percentile)


CLIP_CHOICE = (("percentile", "clip"),)


@register("react", defaults={"percentile": 90, "clip": None}, one_of=CLIP_CHOICE, paper_default={"percentile": 90})
def react(data, head, fit, percentile=None, clip=None):
    c, x = clip_value(fit, clip, percentile), data.features
    return Output(*head.energy(lambda a, b: react_features(x[a:b], c), n=len(x)))


def clipped(data, fit, percentile, clip):
    return react_features(data.features, clip_value(fit, clip, percentile))


@register("react+ash_p", defaults={"p": 60, "percentile": 90, "clip": None}, one_of=CLIP_CHOICE)
def react_ash_p(data, head, fit, p, percentile=None, clip=None):
    return Output(*head.energy(ash_prune(clipped(data, fit, percentile, clip), p)[0]))


@register("react+ash_b", defaults={"p": 65, "percentile": 90, "clip": None}, one_of=CLIP_CHOICE)
def react_ash_b(data, head, fit, p, percentile=None, clip=None):
    x = clipped(data, fit, percentile, clip)
    _, mask, k = ash_prune(x, p)
    return Output(*head.energy(mask, row_scale=ash_b_fill(x, k)))


@register("react+ash_s", defaults={"p": 90, "percentile": 90, "clip": None}, one_of=CLIP_CHOICE)
def react_ash_s(data, head, fit, p, percentile=None, clip=None):
    x = clipped(data, fit, percentile, clip)
    pruned = ash_prune(x, p)[0]
    scale = sharpen_scale(x.sum(axis=1, dtype=np.float64), pruned.sum(axis=1, dtype=np.float64))
    return Output(*head.energy(pruned, row_scale=scale))
