"""Scores on the original logits: MSP (Hendrycks & Gimpel, 2017), MaxLogit (Hendrycks et al., 2022)
and Energy (Liu et al., 2020), T * logsumexp(f / T).

Paper settings: MSP and MaxLogit take no parameter; energy T = 1 on every benchmark (the energy score
of ASH section 3 and of NAP's Algorithm 1 is the plain log-sum-exp of the logits)."""

from __future__ import annotations

import numpy as np

from featcache.methods.data import Output, original_energy, original_predictions
from featcache.methods.kernels import row_reduce
from featcache.methods.registry import every_benchmark, register


def maxlogit_score(logits: np.ndarray) -> np.ndarray:
    """max_j f_j, in float64."""
    # the maximum in the logits' own dtype, then cast: casting to float64 is exact and keeps order, so
    # these are the maxima of a float64 copy, without the copy (twice the logits' size), on every core;
    # but which of 0.0 and -0.0 a maximum of zero is depends on the dtype's loop: those rows are
    # taken from a float64 copy, as before
    def maxima(start, stop):
        rows = logits[start:stop]
        out = np.max(rows, axis=1).astype(np.float64)
        zero = np.flatnonzero(out == 0)
        if zero.size:  # rare: the float64 copy keeps the rows' layout, which decides the order of comparison
            out[zero] = np.asarray(rows, dtype=np.float64).max(axis=1)[zero]
        return out

    return row_reduce(maxima, len(logits))


def original_max_logit(data) -> np.ndarray:
    """maxlogit_score of the split's cached logits, once per split (MSP's and MaxLogit's)."""
    return data.memo(("max logit",), lambda: maxlogit_score(data.logits))


@register("msp", paper=every_benchmark({}))
def msp(data, head, fit):
    # max_j softmax(f)_j = exp(max f - logsumexp f), from the energy every logit method shares
    return Output(np.exp(original_max_logit(data) - original_energy(data)), original_predictions(data))


@register("maxlogit", paper=every_benchmark({}))
def maxlogit(data, head, fit):
    return Output(original_max_logit(data), original_predictions(data))


@register("energy", defaults={"T": 1.0}, paper=every_benchmark({"T": 1.0}))
def energy_method(data, head, fit, T):
    return Output(original_energy(data, T), original_predictions(data))
