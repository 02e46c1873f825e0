"""SCALE (Xu et al., ICLR 2024): ASH-S's scale applied to the whole, unpruned feature.

    r = exp(s1 / s2),  s1 = sum(x),  s2 = sum of the k = D - round(D p / 100) largest entries
    logits = r * (W x) + b,  score = energy(logits)

k and the tie rule are ASH's (featcache.methods.ash); s2 = 0 gives r = 1. Default p = 85.
"""

from __future__ import annotations

import numpy as np

from featcache.methods.ash import ash_prune, ash_s_scale
from featcache.methods.base import Output, energy, register


def scale_factor(x: np.ndarray, p: float) -> np.ndarray:
    return ash_s_scale(x, ash_prune(x, p)[0])


@register("scale", defaults={"p": 85}, paper_default={"p": 85})
def scale(data, head, fit, p):
    x = data.features
    r = scale_factor(x, p)
    logits = ((x @ head.weight.T).astype(np.float64) * r[:, None] + head.bias).astype(np.float32)
    return Output(energy(logits), logits)
