"""Deep nearest neighbours, KNN (Sun et al., ICML 2022).

Features are L2-normalised, x / (||x|| + 1e-10) as in the reference code; the bank is the
normalised id_train features, or a random fraction of them (`bank` in (0, 1], numpy default_rng
with `seed`); the score is minus the Euclidean distance to the k-th nearest bank feature. (The
reference's faiss search returns squared distances; the ranking is the same, and this uses the
distance itself as methods.md states.)

Paper settings (KNN paper via shared/methods.md): k = 50 with the whole id_train bank on CIFAR-10
and CIFAR-100, k = 1000 with a 1% bank on ImageNet.

In nap+knn (paper form), S_X = 2 - d (`nap_offset` 2): features are L2-normalised, so d is in
[0, 2] (triangle inequality) and 2 - d >= 0; it is KNN's own score shifted, so KNN's ranking is
unchanged, and it is bounded, unlike 1/d, which is infinite when the k nearest bank features
coincide with the sample. For post-ReLU (non-negative) features d <= sqrt(2), so 2 - d > 0.59 and
the nonpositive rule of nap+ never applies; it would only for antipodal features (d = 2).
"""

from __future__ import annotations

import numpy as np

from featcache.errors import FeatcacheError
from featcache.methods.data import Output, original_predictions
from featcache.methods.kernels import map_row_blocks
from featcache.methods.registry import register

def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-10)


def kth_neighbour_distances(queries: np.ndarray, bank: np.ndarray, ks) -> dict[int, np.ndarray]:
    """Euclidean distance from each (normalised) query to its k-th nearest row of `bank`, for each k of
    ks, from one product of the queries with the bank (the k-th smallest of the same squared
    distances, whichever other ks are asked for)."""
    ks = sorted(set(ks))
    for k in ks:
        if not 1 <= k <= len(bank):
            raise FeatcacheError(f"knn: k = {k} but the bank has {len(bank)} features")
    bank_sq = (bank.astype(np.float64) ** 2).sum(axis=1)
    out = {k: np.empty(len(queries)) for k in ks}

    def kth_squared(start, stop):
        q = queries[start:stop]
        sq = (q.astype(np.float64) ** 2).sum(axis=1)[:, None] + bank_sq[None, :] - 2.0 * (q @ bank.T)
        sq.partition([k - 1 for k in ks], axis=1)
        for k in ks:
            out[k][start:stop] = np.sqrt(np.maximum(sq[:, k - 1], 0.0))

    map_row_blocks(kth_squared, len(queries))
    return out


def knn_bank(fit, bank: float, seed: int) -> np.ndarray:
    def build():
        features = fit.data.features
        rows = np.arange(len(features))
        if bank < 1:
            n = max(1, int(round(bank * len(features))))
            rows = np.sort(np.random.default_rng(seed).choice(len(features), n, replace=False))
        return l2_normalise(features[rows])

    return fit.memo(("knn_bank", bank, seed), build)


KNN_PAPER = {"cifar10": {"k": 50, "bank": 1.0, "seed": 0}, "cifar100": {"k": 50, "bank": 1.0, "seed": 0},
             "imagenet": {"k": 1000, "bank": 0.01, "seed": 0}}


@register("knn", defaults={"k": 50, "bank": 1.0, "seed": 0}, integer=("k",), nap_offset=2.0, paper=KNN_PAPER)
def knn(data, head, fit, k, bank, seed):
    # every k the batch plans with this bank, from one product of the split with it
    features = knn_bank(fit, bank, seed)
    planned = [params["k"] for params in data.planned({"knn"}) if params.get("bank") == bank
               and params.get("seed") == seed and 1 <= params["k"] <= len(features)]  # others fail alone

    def compute(ks):
        found = kth_neighbour_distances(l2_normalise(data.features), features, ks)
        return [found[j] for j in ks]

    return Output(-data.memo_together(("knn", bank, seed), k, planned, compute), original_predictions(data))
