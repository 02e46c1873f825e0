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
from featcache.methods.data import Output
from featcache.methods.kernels import energy_blocks_shared
from featcache.methods.registry import register


@register("scale", defaults={"p": 85}, paper={"imagenet": {"p": 85}})
def scale(data, head, fit, p):
    # s2 is the sum of the k largest values whatever the ties; and for a large head, since W x = f - b
    # with f the cached logits, r (W x) + b = r (f - b) + b needs no product with the head at all.
    k = keep_count(data.features.shape[1], p)
    r = sharpen_scale(feature_sums(data), top_k_sums(data, k))
    if head.precise:
        return Output(*head.energy(data.features, row_scale=r))
    f, b = data.logits, head.bias.astype(np.float64)

    def finish(logits, out, index):
        np.copyto(out, logits)  # then in place: faster than numpy's casting subtract, the same numbers
        out -= b
        out *= r[index, None]
        out += b

    return Output(*energy_blocks_shared([(lambda start, stop: f[start:stop], [finish])], len(f))[0][0])
