"""Checks of hyperparameter values, by parameter name, shared by every method."""

from __future__ import annotations

import math


def _finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


CHECKS = {
    "p": (lambda v: _finite(v) and 0 <= v < 100, "a number in [0, 100)"),
    "percentile": (lambda v: _finite(v) and 0 <= v <= 100, "a number in [0, 100]"),
    "w": (lambda v: _finite(v) and 0 < v < 1, "a number in (0, 1)"),
    "T": (lambda v: _finite(v) and v > 0, "a positive number"),
    "k": (lambda v: _finite(v) and v > 0, "a positive number"),
    "eps": (lambda v: _finite(v) and v > 0, "a positive number"),
    "alpha_scale": (lambda v: _finite(v) and v > 0, "a positive number"),
    "alpha": (_finite, "a finite number"),
    # applied in float32: a larger magnitude would become an infinite clip
    "clip": (lambda v: _finite(v) and abs(v) <= 3.4028234663852886e38, "a finite number within float32's range"),
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a non-negative integer"),
    "bank": (lambda v: _finite(v) and 0 < v <= 1, "a fraction in (0, 1]"),
    "form": (lambda v: v in ("paper", "exp"), "'paper' or 'exp'"),
    "percentile_of": (lambda v: v in ("id_train", "id_val"), "'id_train' or 'id_val'"),
}
