"""DICE, directed sparsification of the head (Sun & Li, ECCV 2022).

contrib = mean_id_train(x)[None, :] * W, a (K, D) signed matrix; the threshold is percentile p of
all its entries (numpy linear interpolation); weights with contrib > threshold are kept, the rest
set to zero, the bias is unchanged; the score is the energy of the sparsified head's logits, and
ID accuracy is that head's. p = 90 for CIFAR in the paper, 70 for ImageNet.
"""

from __future__ import annotations

import numpy as np

from featcache.methods.data import Head, Output
from featcache.methods.registry import register


def dice_head(head: Head, mean_feature: np.ndarray, p: float) -> Head:
    contrib = mean_feature[None, :] * head.weight.astype(np.float64)
    threshold = np.percentile(contrib, p)
    return Head(np.where(contrib > threshold, head.weight, 0).astype(np.float32), head.bias)


@register("dice", defaults={"p": 90}, paper_default={"p": 90})
def dice(data, head, fit, p):
    sparse = fit.memo(("dice_head", p), lambda: dice_head(head, fit.mean_feature, p))
    return Output(*sparse.energy(data.features))
