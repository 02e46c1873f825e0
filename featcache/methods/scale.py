"""SCALE (Xu et al., ICLR 2024): ASH-S's scale applied to the whole, unpruned feature.

    r = exp(s1 / s2),  s1 = sum(x),  s2 = sum of the k = D - round(D p / 100) largest entries
    logits = r * (W x) + b,  score = energy(logits)

k and the tie rule are ASH's (featcache.methods.ash); s2 = 0 gives r = 1. Default p = 85.

Paper settings: p = 85 on ImageNet (shared/methods.md; the SCALE reference code's ImageNet ResNet-50
evaluation, configs/postprocessors/scale.yml). The seeds give no p for CIFAR-10 or CIFAR-100 (the NAP
paper's SCALE rows on CIFAR do not state one), so there is none.
"""

from __future__ import annotations

import numpy as np

from featcache.methods.ash import feature_sums, keep_count, sharpen_scale, top_k_sums
from featcache.methods.data import made_together, shares
from featcache.methods.registry import register


@register("scale", defaults={"p": 85}, paper={"imagenet": {"p": 85}})
def scale(data, head, fit, p):
    # every p of the batch is finished from one pass over the split (`made_together`): they differ
    # only in r, and share what comes before it
    planned = [("scale", params["p"]) for params in data.planned({"scale"})]
    return made_together(data, head, "scale", "scale", p, planned, lambda _, ps: scale_job(data, head, ps),
                         len(data.features))


def sharpening(data, p) -> np.ndarray:
    """r = exp(s1 / s2) per row; s2 is the sum of the k largest values whatever the ties."""
    return sharpen_scale(feature_sums(data), top_k_sums(data, keep_count(data.features.shape[1], p)))


def scale_job(data, head, ps):
    """(rows, finishes) of SCALE at each p of `ps`, for `kernels.energy_blocks_shared`.

    A small head multiplies the feature once for every p. For the replay's own large head, since
    W x = f - b with f the cached logits, r (W x) + b = r (f - b) + b needs no product with the head
    at all: the rows are f - b in float64, made once for every p. Any other head (a plugin's) is
    multiplied: the cached logits are not its.
    """
    scales = [sharpening(data, p) for p in ps]
    if head.precise or not shares(data, head):
        return head.job(data.features, scales)
    f, b = data.logits, head.bias.astype(np.float64)

    def without_bias(start, stop):
        rows = np.empty((stop - start,) + f.shape[1:])
        np.copyto(rows, f[start:stop])  # then in place: faster than numpy's casting subtract, the same numbers
        rows -= b
        return rows

    def finish_with(r):
        def finish(rows, out, index):
            np.multiply(rows, r[index, None], out=out)
            out += b
        return finish

    return without_bias, [finish_with(r) for r in scales]
