"""DICE, directed sparsification of the head (Sun & Li, ECCV 2022).

contrib = mean_id_train(x)[None, :] * W, a (K, D) signed matrix; the threshold is percentile p of
all its entries (numpy linear interpolation); weights with contrib > threshold are kept, the rest
set to zero, the bias is unchanged; the score is the energy of the sparsified head's logits, and
ID accuracy is that head's.

Paper settings: p = 70 on ImageNet ("70% is the recommended threshold of DICE when used alone", ASH
appendix D, notes on table 2; shared/methods.md), p = 90 on CIFAR-10 and CIFAR-100 (shared/methods.md
from the DICE paper; the DICE reference code's demo-cifar.sh runs both with --p 90).
"""

from __future__ import annotations

import numpy as np

from featcache.methods.data import Head, made_together, percentiles, shares
from featcache.methods.registry import register

DICE_PAPER = {"imagenet": {"p": 70}, "cifar10": {"p": 90}, "cifar100": {"p": 90}}


def dice_head(head: Head, mean_feature: np.ndarray, p: float) -> Head:
    return dice_heads(head, mean_feature, [p])[0]


def dice_heads(head: Head, mean_feature: np.ndarray, ps) -> list[Head]:
    """The sparsified head at each p of `ps`, from one contribution matrix and one sort of it
    (`percentiles` gives np.percentile's numbers to the last bit)."""
    contrib = mean_feature[None, :] * head.weight.astype(np.float64)
    return [Head(np.where(contrib > threshold, head.weight, 0).astype(np.float32), head.bias)
            for threshold in percentiles(contrib, ps)]


@register("dice", defaults={"p": 90}, paper=DICE_PAPER, version=2)  # 2: sparse products at a high p
def dice(data, head, fit, p):
    planned = [params["p"] for params in data.planned({"dice"})]

    def sparse_head(q):
        if not shares(fit.data, head):  # a head of a plugin's own: its sparse head alone, not kept
            return dice_head(head, fit.mean_feature, q)
        # the heads at the batch's other p are made in the same pass, as ReAct's clips are
        return fit.memo_together(("dice_head",), q, planned, lambda ps: dice_heads(head, fit.mean_feature, ps))

    # and their products run in one queue
    return made_together(data, head, "dice", p, "dice", [(q, "dice") for q in planned],
                         lambda q, _: sparse_head(q).job(data.features, sparse_weights=True), len(data.features))
