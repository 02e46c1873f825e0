"""RG, rectified-guided scores (seeds/rg-paper.txt): an output-space energy times or plus a
feature-space term sum_i min(x_i, k). The output term always uses the ORIGINAL logits.

- Multiplicative (`rg`): G = T * logsumexp(f / T) * sum_i min(x_i, k); negative when the energy is,
  and kept so (no logarithm of it is taken).
- Additive (`rg_add`): G = logsumexp(f) + alpha * sum_i min(x_i, k). alpha is given, or is
  alpha_scale * alpha_s where alpha_s = std(logsumexp(f)) / std(sum_i min(x_i, k)) over 1,000
  id_train samples drawn with numpy's default_rng(0) (all of them when there are fewer), population
  standard deviations (ddof = 0).

Paper settings: ImageNet only, the RG paper's one benchmark: T = 1 and k = 1, the defaults of its
equation 8, and alpha = alpha_s for the additive form (section 4, "U plus V exploration"). The seeds
give none for CIFAR.
"""

from __future__ import annotations

import numpy as np

from featcache.methods.data import Output, original_energy, original_predictions
from featcache.methods.kernels import clip_above, energy, row_reduce
from featcache.methods.registry import register


def clipped_sum(x: np.ndarray, k: float) -> np.ndarray:
    """sum_i min(x_i, k) per sample, in float64."""
    return clip_above(x, np.float32(k)).sum(axis=1, dtype=np.float64)


ALPHA_SAMPLES = 1000


def alpha_s(fit, k: float) -> float:
    """The alpha that equalises the standard deviations of the two terms on id_train."""

    def compute():
        rows = fit.subsample(ALPHA_SAMPLES)
        output_term = energy(fit.data.logits[rows])  # logsumexp(f), T = 1
        feature_term = clipped_sum(fit.data.features[rows], k)
        spread = feature_term.std()
        return float(output_term.std() / spread) if spread > 0 else 0.0

    return fit.memo(("alpha_s", k), compute)


def shared_clipped_sum(data, k):
    """`clipped_sum` of the split's features, once per float32 k (RG's k and ReAct's clip alike)."""
    x = data.features
    return data.memo(("clipped_sum", float(np.float32(k))),
                     lambda: row_reduce(lambda a, b: clipped_sum(x[a:b], k), len(x)))


@register("rg", defaults={"k": 1.0, "T": 1.0}, paper={"imagenet": {"k": 1.0, "T": 1.0}})
def rg(data, head, fit, k, T):
    return Output(original_energy(data, T) * shared_clipped_sum(data, k), original_predictions(data))


@register("rg_add", defaults={"k": 1.0, "alpha_scale": 1.0, "alpha": None}, one_of=(("alpha_scale", "alpha"),),
          paper={"imagenet": {"k": 1.0, "alpha_scale": 1.0}})
def rg_add(data, head, fit, k, alpha_scale=None, alpha=None):
    if alpha is None:
        alpha = alpha_scale * alpha_s(fit, k)
    return Output(original_energy(data) + alpha * shared_clipped_sum(data, k), original_predictions(data))
