"""Scores on the original logits: MSP, MaxLogit and Energy."""

from __future__ import annotations

import numpy as np
from featcache.methods.base import Output, energy, logsumexp_rows, original_energy, original_predictions, register


def msp_score(logits: np.ndarray) -> np.ndarray:
    """max_j softmax(f)_j (Hendrycks & Gimpel, 2017)."""
    f = np.asarray(logits, dtype=np.float64)
    return np.exp(f.max(axis=1) - logsumexp_rows(f))


def maxlogit_score(logits: np.ndarray) -> np.ndarray:
    """max_j f_j (Hendrycks et al., 2022)."""
    return np.asarray(logits, dtype=np.float64).max(axis=1)


def energy_score(logits: np.ndarray, T: float = 1.0) -> np.ndarray:
    """T * logsumexp(f / T), the negative free energy (Liu et al., 2020)."""
    return energy(logits, T)


@register("msp", positive="identity")
def msp(data, head, fit):
    # max softmax = exp(max f - logsumexp f), from the shared energy
    return Output(np.exp(maxlogit_score(data.logits) - original_energy(data)), original_predictions(data))


@register("maxlogit")
def maxlogit(data, head, fit):
    return Output(maxlogit_score(data.logits), original_predictions(data))


@register("energy", defaults={"T": 1.0}, paper_default={"T": 1.0})
def energy_method(data, head, fit, T):
    return Output(original_energy(data, T), original_predictions(data))
