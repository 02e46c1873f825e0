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

Paper settings (ASH appendix D, "Notes on implementation"): ImageNet (table 2) ASH-P p = 60, ASH-B
p = 65, ASH-S p = 90; CIFAR-10 (tables 3, A2) 90 / 95 / 95; CIFAR-100 (tables 3, A3) 80 / 85 / 90.
ASH-RAND has none (table 3 lists it at several p without recommending one).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from featcache.methods.data import Output, made_together
from featcache.methods.kernels import map_row_blocks, row_reduce
from featcache.methods.registry import register
from featcache.methods.sparse import worth_sparse

# ASH appendix D: "Notes on ImageNet results (Table 2)" and "Notes on CIFAR results (Table 3, Table A2,
# Table A3)", the p each variant "is implemented with".
ASH_PAPER_P = {
    "ash_p": {"imagenet": 60, "cifar10": 90, "cifar100": 80},
    "ash_b": {"imagenet": 65, "cifar10": 95, "cifar100": 85},
    "ash_s": {"imagenet": 90, "cifar10": 95, "cifar100": 90},
}


def ash_paper(name: str) -> dict:
    return {benchmark: {"p": p} for benchmark, p in ASH_PAPER_P[name].items()}


def keep_count(n: int, p: float) -> int:
    """k = n - round(n * p / 100), with numpy's round-half-to-even as in the reference code."""
    return n - int(np.round(n * p / 100.0))


@dataclass
class TopK:
    """Per row of a split, for one k: the k-th and (k+1)-th largest values (None when k is 0 or D:
    every entry is then dropped or kept) and the float64 sum of the k largest."""

    kth: np.ndarray | None
    after: np.ndarray | None
    sums: np.ndarray


def top_k_stats(x: np.ndarray, ks) -> dict[int, TopK]:
    """`TopK` of the rows of x for each k of ks (0 <= k <= D), from one sort of a block of rows at a time.

    What every p of a sweep needs from the sort, without holding the sorted (N, D) array: the block's
    sort is used while it is in the cache and dropped. Each sum adds the k largest values in
    descending order, as `x_sorted[:, :k].sum(axis=1, dtype=np.float64)` of the whole sorted array
    does, to the last bit.
    """
    n, d = x.shape
    ks = sorted(set(ks))
    out = {k: TopK(np.empty(n, x.dtype) if 0 < k < d else None, np.empty(n, x.dtype) if 0 < k < d else None,
                   np.empty(n)) for k in ks}

    def run(start, stop):
        srt = sorted_descending(x[start:stop])
        for k, stats in out.items():
            if stats.kth is not None:
                stats.kth[start:stop], stats.after[start:stop] = srt[:, k - 1], srt[:, k]
            stats.sums[start:stop] = srt[:, :k].sum(axis=1, dtype=np.float64)

    map_row_blocks(run, n)
    return out


def sorted_descending(rows: np.ndarray) -> np.ndarray:
    """Each row sorted from largest to smallest, a new C-order array.

    For floats, -x sorted ascending and negated back: the same values as reversing an ascending
    sort, without numpy's slow copy of a reversed view (a third of the time). Equal values may sit
    in another order, which only a 0.0 next to a -0.0 can show (they compare equal everywhere ASH
    uses them). Other dtypes (whose negation may wrap), and rows holding NaN (which a sort puts
    last whatever the sign), are reversed."""
    if rows.dtype.kind == "f":
        out = np.negative(rows, out=np.empty(rows.shape, rows.dtype))
        out.sort(axis=1)
        if not (out.shape[1] and np.isnan(out[:, -1]).any()):
            return np.negative(out, out=out)
    return np.ascontiguousarray(np.sort(rows, axis=1)[:, ::-1])


def top_k_mask(x: np.ndarray, k: int, zero_ties: bool = True) -> np.ndarray:
    """Boolean (N, D) mask of the k largest entries per row; among equal values, lowest index first.

    With zero_ties=False, ties at a k-th value of 0 need not be broken (all zeros may be kept): for
    pruning that changes nothing, as kept and dropped zeros are both zero, and it can save the work.
    """
    n, d = x.shape
    if k <= 0:
        return np.zeros_like(x, dtype=bool)
    if k >= d:
        return np.ones_like(x, dtype=bool)
    stats = top_k_stats(x, [k])[k]
    return mask_from_kth(x, k, stats.kth, stats.after, zero_ties)


def mask_from_kth(x: np.ndarray, k: int, kth: np.ndarray, after: np.ndarray, zero_ties: bool = True) -> np.ndarray:
    """`top_k_mask` from each row's k-th and (k+1)-th largest values, 0 < k < D."""
    # Where the (k+1)-th value equals the k-th, more entries tie than there is room for.
    ties = after == kth
    if not zero_ties:
        ties &= kth != 0
    tie_rows = np.flatnonzero(ties)
    if not tie_rows.size:
        return x >= kth[:, None]
    if 2 * tie_rows.size >= len(x):
        # Most rows tie (clipped features, many zeros): breaking ties on every row costs less than
        # gathering the tied ones; a row without ties keeps all its entries >= kth as it should.
        return break_ties(x, k, kth[:, None])
    mask = x >= kth[:, None]
    mask[tie_rows] = break_ties(x[tie_rows], k, kth[tie_rows, None])
    return mask


def break_ties(x: np.ndarray, k: int, kth: np.ndarray) -> np.ndarray:
    """The k largest entries of each row: all above the row's k-th value `kth`, then the entries equal
    to it from the lowest index until there are k. Worked on the flags packed eight to a byte."""
    above = np.packbits(x > kth, axis=1)
    tied = np.packbits(x == kth, axis=1)
    need = k - _popcount(above).sum(axis=1, dtype=np.int64)
    return np.unpackbits(above | _first_set(tied, need), axis=1, count=x.shape[1]).view(bool)


# Rows of flags packed eight to a byte (np.packbits: column 8j + t is bit 7 - t of byte j).
_POPCOUNT = np.array([bin(byte).count("1") for byte in range(256)], dtype=np.uint8)
_NTH_SET = np.full((256, 9), 8, dtype=np.int64)  # [byte, r]: column offset 0-7 of its r-th set bit
for _byte in range(256):
    for _r, _t in enumerate((t for t in range(8) if _byte >> (7 - t) & 1), 1):
        _NTH_SET[_byte, _r] = _t


def _popcount(packed: np.ndarray) -> np.ndarray:
    """Set bits of each byte: numpy's vectorised bitwise_count (numpy 2), else a table."""
    return np.bitwise_count(packed) if hasattr(np, "bitwise_count") else _POPCOUNT[packed]


def first_true(flags: np.ndarray, need: np.ndarray) -> np.ndarray:
    """flags with only the first need[i] True entries of each row i kept (all of them if fewer): the
    same as flags & (np.cumsum(flags, axis=1) <= need[:, None]), on the packed bytes."""
    return np.unpackbits(_first_set(np.packbits(flags, axis=1), need), axis=1, count=flags.shape[1]).view(bool)


def _first_set(packed: np.ndarray, need: np.ndarray) -> np.ndarray:
    """`first_true` of packed rows, packed: the 64-bit word holding each row's need-th set bit is found
    from the words' running counts (a count is the same in either byte order), then that word's bits
    are kept as `_first_set_bytes` keeps them; every word before it is kept whole."""
    rows, n_bytes = packed.shape
    if not n_bytes or n_bytes % 8 or not hasattr(np, "bitwise_count"):  # numpy 1 counts the bits of bytes only
        return _first_set_bytes(packed, need)
    n_words = n_bytes // 8
    running = np.cumsum(np.bitwise_count(packed.view(np.uint64)), axis=1, dtype=np.int32)
    # the last word when the row has fewer: all of its set bits are kept then
    word = np.minimum(np.count_nonzero(running < need[:, None], axis=1), n_words - 1)
    at = np.arange(rows)
    before = np.where(word > 0, running[at, np.maximum(word - 1, 0)], 0)
    keep = np.where(np.arange(n_words) < word[:, None], np.uint64(0xFFFFFFFFFFFFFFFF), np.uint64(0))
    keep = keep.view(np.uint8).reshape(rows, n_words, 8)
    keep[at, word] = _first_set_bytes(packed.reshape(rows, n_words, 8)[at, word], need - before)
    return packed & keep.reshape(rows, n_bytes)


def _first_set_bytes(packed: np.ndarray, need: np.ndarray) -> np.ndarray:
    """`_first_set` for rows of any number of bytes, a byte at a time."""
    rows, n_bytes = packed.shape
    running = np.cumsum(_popcount(packed), axis=1, dtype=np.int32)
    byte = np.count_nonzero(running < need[:, None], axis=1)  # n_bytes when the row has fewer
    inside = np.minimum(byte, n_bytes - 1)
    at = np.arange(rows)
    before = np.where(byte > 0, running[at, np.maximum(byte - 1, 0)], 0)
    nth = _NTH_SET[packed[at, inside], np.clip(need - before, 0, 8)]
    keep = -(np.arange(n_bytes, dtype=np.int32) < inside[:, None]).view(np.uint8)  # 0xFF before the byte
    keep[at, inside] = (0xFF00 >> (nth + 1)) & 0xFF  # its bits up to the need-th set one
    keep[need <= 0] = 0
    keep[byte >= n_bytes] = 0xFF
    return packed & keep


def ash_prune(x: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray, int]:
    """(pruned x, keep mask, k): entries outside the top k set to zero."""
    k = keep_count(x.shape[1], p)
    mask = top_k_mask(x, k)
    return np.where(mask, x, 0).astype(x.dtype, copy=False), mask, k


def ash_p_features(x: np.ndarray, p: float) -> np.ndarray:
    return ash_prune(x, p)[0]


def ash_b_fill(x: np.ndarray, k: int) -> np.ndarray:
    """s1 / k per sample: the value every kept entry gets."""
    return x.sum(axis=1, dtype=np.float64) / k if k else np.zeros(len(x))


def ash_b_features(x: np.ndarray, p: float) -> np.ndarray:
    _, mask, k = ash_prune(x, p)
    return (mask * ash_b_fill(x, k)[:, None]).astype(x.dtype)


def sharpen_scale(s1: np.ndarray, s2: np.ndarray) -> np.ndarray:
    """exp(s1 / s2) per sample, and 1 where s2 = 0."""
    safe = np.where(s2 == 0, 1.0, s2)
    return np.where(s2 == 0, 1.0, np.exp(s1 / safe))


def ash_s_scale(x: np.ndarray, pruned: np.ndarray) -> np.ndarray:
    return sharpen_scale(x.sum(axis=1, dtype=np.float64), pruned.sum(axis=1, dtype=np.float64))


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


# --- registered methods: shaping, then the head (one product per block of rows), then energy ------


# the methods whose parameter p sets ASH's k: a split's sort serves every k they plan at once
TOP_K_METHODS = {"ash_p", "ash_b", "ash_s", "scale", "react+ash_p", "react+ash_b", "react+ash_s"}


def shared_top_k(data, k: int) -> TopK:
    """The split's `TopK` at k, computed along with every other k its batch plans (`TOP_K_METHODS`)."""
    d = data.features.shape[1]
    planned = [keep_count(d, params["p"]) for params in data.planned(TOP_K_METHODS) if "p" in params]

    def compute(ks):
        stats = top_k_stats(data.features, ks)
        return [stats[j] for j in ks]

    return data.memo_together(("top_k",), k, planned, compute)


def feature_sums(data) -> np.ndarray:
    return data.memo(("s1",), lambda: row_reduce(lambda a, b: data.features[a:b].sum(axis=1, dtype=np.float64),
                                                  len(data.features)))


def pruned_blocks(data, p, zero_ties):
    """(rows(start, stop) -> pruned rows, mask(start, stop), k), shaping a block at a time."""
    x = data.features
    k = keep_count(x.shape[1], p)
    stats = shared_top_k(data, k)

    def mask(start, stop):
        if stats.kth is None:
            return top_k_mask(x[start:stop], k)
        return mask_from_kth(x[start:stop], k, stats.kth[start:stop], stats.after[start:stop], zero_ties)

    def rows(start, stop):
        return x[start:stop] * mask(start, stop)

    return rows, mask, k


def top_k_sums(data, k):
    """s2 per row, the sum of the k largest values (whatever the ties), from the shared sort."""
    return shared_top_k(data, k).sums


PRUNED = ("ash_p", "ash_s")  # one pruned feature, the second only rescales its rows: one product for both


def pruned_output(data, head, p, variant):
    """ASH-P's or ASH-S's output at p, with one head product for both where the batch scores both.

    Whichever comes first computes the other too when the split's plan has it (`SplitData.plan`),
    from the same product: logits_P = W x_pruned + b and logits_S = r (W x_pruned) + b, r =
    exp(s1 / s2). The products of every other p the batch plans for either run in the same queue
    (`made_together`). Each gets exactly the numbers it gets alone. Kept: nap+ash_s and ash_s at one
    p both ask for it.
    """
    planned = [(params["p"], v) for v in PRUNED for params in data.planned({v})]
    return made_together(data, head, "pruned_outputs", p, variant, planned, lambda q, variants: pruned_job(data, head, q, variants),
                         len(data.features))


def pruned_job(data, head, p, variants):
    """The head product of the pruned feature at p, finished as each of `variants` (of PRUNED)."""
    k = keep_count(data.features.shape[1], p)
    scales = [sharpen_scale(feature_sums(data), top_k_sums(data, k)) if v == "ash_s" else None for v in variants]
    rows, _, _ = pruned_blocks(data, p, zero_ties=False)
    return head.job(rows, scales, sparse_rows=worth_sparse(k, data.features.shape[1]))


@register("ash_p", defaults={"p": 60}, paper=ash_paper("ash_p"), version=2)  # 2: sparse products at a high p
def ash_p(data, head, fit, p):
    return pruned_output(data, head, p, "ash_p")


@register("ash_b", defaults={"p": 65}, paper=ash_paper("ash_b"), version=2)
def ash_b(data, head, fit, p):
    def job(q, _variants):
        # W (fill * mask) = fill * (W mask): the product of the 0/1 mask, scaled per sample
        _, mask, k = pruned_blocks(data, q, zero_ties=True)
        return head.job(mask, [feature_sums(data) / k if k else np.zeros(len(data.features))],
                        sparse_rows=worth_sparse(k, data.features.shape[1]))

    planned = [(params["p"], "ash_b") for params in data.planned({"ash_b"})]
    return made_together(data, head, "ash_b", p, "ash_b", planned, job, len(data.features))


@register("ash_s", defaults={"p": 90}, paper=ash_paper("ash_s"), version=2)
def ash_s(data, head, fit, p):
    return pruned_output(data, head, p, "ash_s")


@register("ash_rand", defaults={"p": 65, "seed": 0})
def ash_rand(data, head, fit, p, seed):
    return Output(*head.energy(ash_rand_features(data.features, p, seed, data.ids)))
