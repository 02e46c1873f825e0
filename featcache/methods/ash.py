"""Activation shaping, ASH (Djurisic et al., ICLR 2023; seeds/ash-paper.txt, ash-readme.txt).

Applied per sample to the pooled feature x (D entries), then the head, then energy:
- keep the k = D - round(D * p / 100) largest entries (numpy rounding, half to even), zero the rest;
- ASH-P: prune only;
- ASH-B: kept entries all set to s1 / k, s1 = sum(x) before pruning;
- ASH-S: kept entries multiplied by exp(s1 / s2), s2 = sum after pruning;
- ASH-RAND: kept entries replaced by uniform draws in [0, 10].

Choices where the reference code is silent or ill-defined:
- Ties at the k-th value: the reference uses torch.topk, whose choice among equal values is
  unspecified (on CPU it differs with the row's length). Here the lowest indices win. This only
  matters for ASH-B and ASH-RAND (for ASH-P and ASH-S tied zeros contribute nothing).
- k = 0 (p close to 100 on a short feature): everything is pruned, the shaped feature is zero.
- ASH-S with s2 = 0 (every kept entry is zero): the pruned feature is used unscaled, i.e. the scale
  is 1, instead of the reference's 0/0 = NaN. The logits are then the bias alone.
- ASH-RAND: draws come from numpy's default_rng seeded with (seed, crc32 of the sample id), so a
  sample gets the same draws whatever order or split it is replayed in.
"""

from __future__ import annotations

import zlib

import numpy as np

from featcache.methods.base import Output, energy, register


def keep_count(n: int, p: float) -> int:
    """k = n - round(n * p / 100), with numpy's round-half-to-even as in the reference code."""
    return n - int(np.round(n * p / 100.0))


def top_k_mask(x: np.ndarray, k: int) -> np.ndarray:
    """Boolean (N, D) mask of the k largest entries per row; among equal values, lowest index first."""
    n, d = x.shape
    if k <= 0:
        return np.zeros_like(x, dtype=bool)
    if k >= d:
        return np.ones_like(x, dtype=bool)
    kth = np.partition(x, d - k, axis=1)[:, d - k][:, None]  # the k-th largest value per row
    mask = x > kth
    need = k - mask.sum(axis=1, keepdims=True)
    tied = x == kth
    mask |= tied & (np.cumsum(tied, axis=1) <= need)
    return mask


def ash_prune(x: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray, int]:
    """(pruned x, keep mask, k): entries outside the top k set to zero."""
    k = keep_count(x.shape[1], p)
    mask = top_k_mask(x, k)
    return np.where(mask, x, 0).astype(x.dtype, copy=False), mask, k


def ash_p_features(x: np.ndarray, p: float) -> np.ndarray:
    return ash_prune(x, p)[0]


def ash_b_features(x: np.ndarray, p: float) -> np.ndarray:
    _, mask, k = ash_prune(x, p)
    if k == 0:
        return np.zeros_like(x)
    fill = x.astype(np.float64).sum(axis=1, keepdims=True) / k
    return (mask * fill).astype(x.dtype)


def ash_s_scale(x: np.ndarray, pruned: np.ndarray) -> np.ndarray:
    """exp(s1 / s2) per sample, and 1 where s2 = 0."""
    s1 = x.astype(np.float64).sum(axis=1)
    s2 = pruned.astype(np.float64).sum(axis=1)
    safe = np.where(s2 == 0, 1.0, s2)
    return np.where(s2 == 0, 1.0, np.exp(s1 / safe))


def ash_s_features(x: np.ndarray, p: float) -> np.ndarray:
    pruned = ash_prune(x, p)[0]
    return (pruned * ash_s_scale(x, pruned)[:, None]).astype(x.dtype)


def ash_rand_features(x: np.ndarray, p: float, seed: int = 0, ids=None) -> np.ndarray:
    _, mask, k = ash_prune(x, p)
    out = np.zeros_like(x)
    ids = np.arange(len(x)).astype(str) if ids is None else ids
    for row, sample_id in enumerate(ids):
        rng = np.random.default_rng([seed, zlib.crc32(str(sample_id).encode("utf-8"))])
        out[row, mask[row]] = rng.uniform(0.0, 10.0, size=k)
    return out


def _shaped(shape_fn):
    def score(data, head, fit, p, **extra):
        logits = head(shape_fn(data.features, p, **extra))
        return Output(energy(logits), logits)

    return score


def ash_s_logits(x: np.ndarray, head, p: float) -> np.ndarray:
    """ASH-S logits with one product: exp(s1/s2) * (W x_pruned) + b, as the scale is per sample."""
    pruned = ash_prune(x, p)[0]
    scale = ash_s_scale(x, pruned)
    return ((pruned @ head.weight.T).astype(np.float64) * scale[:, None] + head.bias).astype(np.float32)


register("ash_p", defaults={"p": 60}, paper_default={"p": 60})(_shaped(ash_p_features))
register("ash_b", defaults={"p": 65}, paper_default={"p": 65})(_shaped(ash_b_features))


@register("ash_s", defaults={"p": 90}, paper_default={"p": 90})
def ash_s(data, head, fit, p):
    logits = ash_s_logits(data.features, head, p)
    return Output(energy(logits), logits)


@register("ash_rand", defaults={"p": 65, "seed": 0})
def ash_rand(data, head, fit, p, seed):
    logits = head(ash_rand_features(data.features, p, seed, data.ids))
    return Output(energy(logits), logits)
