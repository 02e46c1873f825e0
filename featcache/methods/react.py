"""ReAct (Sun et al., NeurIPS 2021): clip the pooled feature at c, then energy; and ReAct + ASH.

c is given (`clip`) or is the `percentile` (default 90) of every entry of the features of
`percentile_of`: id_train (the default, as ASH's appendix D and shared/methods.md describe the ReAct
procedure: "the 90% percentile calculated from training data") or id_val (as the ReAct reference code
does, computing it on held-out ID images). np.percentile, linear interpolation.
ReAct + ASH (ASH paper, section 5): clip first, then shape with ASH-P, -B or -S.

Paper settings: percentile 90 on every benchmark (ASH appendix D, notes on the MobileNet DICE + ReAct
grid: "1.33 is the 90% percentile calculated from training data, following the ReAct procedure").
ReAct + ASH: ASH-S at p = 90 with clip 1.0 on CIFAR-10, CIFAR-100 and ImageNet (ASH appendix D,
notes on table 5); the seeds give no setting for ReAct + ASH-P or ASH-B.
"""

from __future__ import annotations

import numpy as np

from featcache.methods.ash import first_true, keep_count, mask_from_kth, sharpen_scale, shared_top_k, top_k_mask
from featcache.methods.data import Output, made_together
from featcache.methods.kernels import clip_above
from featcache.methods.rg import shared_clipped_sum
from featcache.errors import FeatcacheError
from featcache.methods.registry import every_benchmark, register
from featcache.methods.sparse import worth_sparse


def react_features(x: np.ndarray, c: float) -> np.ndarray:
    """min(x, c) elementwise."""
    return clip_above(x, np.float32(c))


def clip_value(fit, clip=None, percentile=None, percentile_of="id_train", data=None) -> float:
    """c: `clip`, or the `percentile` of the features of `percentile_of`; with `data`, the other
    percentiles of the same split its batch asks for are computed in the same pass."""
    if clip is not None:
        return float(clip)
    try:
        return fit.feature_percentile(percentile, percentile_of, also=planned_percentiles(data, percentile_of))
    except FeatcacheError as exc:
        raise FeatcacheError(f"react: percentile_of {percentile_of}: {exc}") from None


CLIPPING = {"react", "react+ash_p", "react+ash_b", "react+ash_s"}  # the methods that clip at ReAct's c


def planned_percentiles(data, of) -> list:
    """Percentiles of split `of` that the ReAct-family configurations of data's batch clip at."""
    if data is None:
        return []
    return sorted(params["percentile"] for params in data.planned(CLIPPING)
                  if params.get("percentile") is not None and params.get("percentile_of", "id_train") == of)


CLIP = {"percentile": 90, "clip": None, "percentile_of": "id_train"}
CLIP_CHOICE = (("percentile", "clip"),)
QUALIFIES = {"percentile_of": "percentile"}


@register("react", defaults=CLIP, one_of=CLIP_CHOICE, qualifies=QUALIFIES,
          paper=every_benchmark({"percentile": 90}))
def react(data, head, fit, percentile=None, clip=None, percentile_of=None):
    x = data.features

    def job(c, _variants):
        return head.job(lambda a, b: react_features(x[a:b], c))

    planned = [(planned_clip(fit, params, data), "react") for params in data.planned({"react"})]
    c = clip_value(fit, clip, percentile, percentile_of, data)
    return made_together(data, head, "react", c, "react", planned, job, len(x))


def planned_clip(fit, params: dict, data) -> float:
    """c of a planned configuration's parameters (`SplitData.planned`)."""
    return clip_value(fit, params.get("clip"), params.get("percentile"), params.get("percentile_of") or "id_train", data)


def clipped_blocks(data, c, p):
    """(rows clipped at c, their keep mask, k, capped), a block of rows at a time, from the split's one sort.

    min(., c) is monotone, so the clipped rows' k-th values are the rows' k-th values clipped.
    The mask is ASH's (ties at the k-th value broken lowest index first), as `ash_prune` of the whole
    clipped array gives it. capped(start, stop): whether every row of the block has more than k
    entries at c or above, so that its k kept entries are the first k of them, all equal to c (a
    clip below most rows' k-th value): the mask then needs no count of the entries above the k-th,
    and the kept entries sum to k c exactly.
    """
    c, x = np.float32(c), data.features
    k = keep_count(x.shape[1], p)
    stats = shared_top_k(data, k)

    def rows(start, stop):
        return react_features(x[start:stop], c)

    def capped(start, stop):
        # the (k+1)-th largest clipped value is c: then so is the k-th, and more than k entries tie at it
        return stats.kth is not None and bool((stats.after[start:stop] >= c).all())

    def mask(start, stop, clipped=None):
        """The mask of rows start:stop; `clipped`: those rows, when already made."""
        if stats.kth is None:
            return top_k_mask(x[start:stop], k)
        block = rows(start, stop) if clipped is None else clipped
        if capped(start, stop):
            return first_true(block >= c, np.full(stop - start, k))  # clipped rows reach c only where they equal it
        kth, after = np.minimum(stats.kth[start:stop], c), np.minimum(stats.after[start:stop], c)
        return mask_from_kth(block, k, kth, after)

    return rows, mask, k, capped


CLIPPED_PRUNED = ("react+ash_p", "react+ash_s")  # one clipped, pruned feature; the second rescales its rows


def clipped_pruned_output(data, head, fit, p, clip_params, variant):
    """react+ash_p's or react+ash_s's output, one head product for both where the batch scores both.

    As `featcache.methods.ash.pruned_output`: logits_S = r (W x_pruned) + b, r = exp(s1 / s2), with
    s1 the clipped row's sum and s2 the pruned row's; the products of every other (c, p) the batch
    plans for either run in the same queue.
    """
    planned = [((planned_clip(fit, params, data), params["p"]), v) for v in CLIPPED_PRUNED for params in data.planned({v})]
    c = clip_value(fit, **clip_params, data=data)
    return made_together(data, head, "clipped_pruned_outputs", (c, p), variant, planned,
                         lambda cp, variants: clipped_pruned_job(data, head, cp, variants), len(data.features))


def clipped_pruned_job(data, head, cp, variants):
    """The head product of the features clipped at c and pruned at p, cp = (c, p), finished as each
    of `variants` (of CLIPPED_PRUNED)."""
    c, p = cp
    rows, mask, k, capped = clipped_blocks(data, c, p)
    n = len(data.features)

    def pruned(start, stop):
        block = rows(start, stop)  # a new array: pruned in place, as ASH's pruning (np.where costs six times more)
        return np.multiply(block, mask(start, stop, block), out=block)

    scales, shaped = [None] * len(variants), pruned
    if "react+ash_s" in variants:
        # r = exp(s1 / s2) filled in a block at a time as the block is shaped, before its product is
        # scaled: one shaping pass instead of two (r is elementwise, so the same numbers)
        s1, r = shared_clipped_sum(data, c), np.empty(n)  # s1 = sum(min(x, c)), shared with RG
        scales[variants.index("react+ash_s")] = r
        # a capped row keeps k entries equal to c (in float32, as clipped), the rest zeros: every
        # partial sum j c (j <= k) is exact in float64, so the sum in any order is k c
        capped_sum = k * float(np.float32(c))

        def shaped(start, stop):
            block = pruned(start, stop)
            s2 = np.full(stop - start, capped_sum) if capped(start, stop) else block.sum(axis=1, dtype=np.float64)
            r[start:stop] = sharpen_scale(s1[start:stop], s2)
            return block

    return head.job(shaped, scales, sparse_rows=worth_sparse(k, data.features.shape[1]))


@register("react+ash_p", defaults={"p": 60, **CLIP}, one_of=CLIP_CHOICE, qualifies=QUALIFIES,
          version=2)  # 2: sparse products at a high p
def react_ash_p(data, head, fit, p, percentile=None, clip=None, percentile_of=None):
    clip_params = {"percentile": percentile, "clip": clip, "percentile_of": percentile_of}
    return clipped_pruned_output(data, head, fit, p, clip_params, "react+ash_p")


@register("react+ash_b", defaults={"p": 65, **CLIP}, one_of=CLIP_CHOICE, qualifies=QUALIFIES,
          version=2)
def react_ash_b(data, head, fit, p, percentile=None, clip=None, percentile_of=None):
    def job(cp, _variants):
        _, mask, k, _ = clipped_blocks(data, *cp)
        return head.job(mask, [shared_clipped_sum(data, cp[0]) / k if k else np.zeros(len(data.features))],
                        sparse_rows=worth_sparse(k, data.features.shape[1]))

    planned = [((planned_clip(fit, params, data), params["p"]), "react+ash_b") for params in data.planned({"react+ash_b"})]
    c = clip_value(fit, clip, percentile, percentile_of, data)
    return made_together(data, head, "react+ash_b", (c, p), "react+ash_b", planned, job, len(data.features))


@register("react+ash_s", defaults={"p": 90, **CLIP}, one_of=CLIP_CHOICE, qualifies=QUALIFIES,
          paper=every_benchmark({"p": 90, "clip": 1.0}), version=2)
def react_ash_s(data, head, fit, p, percentile=None, clip=None, percentile_of=None):
    clip_params = {"percentile": percentile, "clip": clip, "percentile_of": percentile_of}
    return clipped_pruned_output(data, head, fit, p, clip_params, "react+ash_s")
