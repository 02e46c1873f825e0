"""Scores on the original logits: MSP (Hendrycks & Gimpel, 2017), MaxLogit (Hendrycks et al., 2022)
and Energy (Liu et al., 2020), T * logsumexp(f / T).

Paper settings: MSP and MaxLogit take no parameter; energy T = 1 on every benchmark (the energy score
of ASH section 3 and of NAP's Algorithm 1 is the plain log-sum-exp of the logits)."""

from __future__ import annotations

import numpy as np

from featcache.methods.data import Output, original_energy, original_predictions
from featcache.methods.registry import every_benchmark, register


def maxlogit_score(logits: np.ndarray) -> np.ndarray:
    """max_j f_j."""
    return np.asarray(logits, dtype=np.float64).max(axis=1)


@register("msp", paper=every_benchmark({}))
def msp(data, head, fit):
    # max_j softmax(f)_j = exp(max f - logsumexp f), from the energy every logit method shares
    return Output(np.exp(maxlogit_score(data.logits) - original_energy(data)), original_predictions(data))


@register("maxlogit", paper=every_benchmark({}))
def maxlogit(data, head, fit):
    return Output(maxlogit_score(data.logits), original_predictions(data))


@register("energy", defaults={"T": 1.0}, paper=every_benchmark({"T": 1.0}))
def energy_method(data, head, fit, T):
    return Output(original_energy(data, T), original_predictions(data))
