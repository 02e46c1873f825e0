"""ReAct (Sun et al., NeurIPS 2021): clip the pooled feature at c, then energy; and ReAct + ASH.

c is given (`clip`) or is the `percentile` (default 90) of every entry of the id_train features.
ReAct + ASH (ASH paper, section 5): clip first, then shape with ASH-P, -B or -S.
"""

from __future__ import annotations

import numpy as np

from featcache.methods.ash import ash_b_features, ash_p_features, ash_s_logits
from featcache.methods.base import Output, energy, register


def react_features(x: np.ndarray, c: float) -> np.ndarray:
    """min(x, c) elementwise."""
    return np.minimum(x, np.float32(c))


def clip_value(fit, clip=None, percentile=None) -> float:
    return float(clip) if clip is not None else fit.feature_percentile(percentile)


CLIP_CHOICE = (("percentile", "clip"),)


@register("react", defaults={"percentile": 90, "clip": None}, one_of=CLIP_CHOICE, paper_default={"percentile": 90})
def react(data, head, fit, percentile=None, clip=None):
    logits = head(react_features(data.features, clip_value(fit, clip, percentile)))
    return Output(energy(logits), logits)


def _react_then(shape_fn):
    def score(data, head, fit, p, percentile=None, clip=None):
        clipped = react_features(data.features, clip_value(fit, clip, percentile))
        logits = head(shape_fn(clipped, p))
        return Output(energy(logits), logits)

    return score


@register("react+ash_s", defaults={"p": 90, "percentile": 90, "clip": None}, one_of=CLIP_CHOICE)
def react_ash_s(data, head, fit, p, percentile=None, clip=None):
    clipped = react_features(data.features, clip_value(fit, clip, percentile))
    logits = ash_s_logits(clipped, head, p)
    return Output(energy(logits), logits)


register("react+ash_p", defaults={"p": 60, "percentile": 90, "clip": None}, one_of=CLIP_CHOICE)(
    _react_then(ash_p_features))
register("react+ash_b", defaults={"p": 65, "percentile": 90, "clip": None}, one_of=CLIP_CHOICE)(
    _react_then(ash_b_features))
