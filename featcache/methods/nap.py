"""NAP, neural activation patterns (seeds/nap-paper.txt), alone and combined with any score.

S_NAP = mean_c (max_c / (mean_c + eps))^2 over the channels of the post-activation pre-pool map,
eps = 1.0 (section 5: "consistently set to 1.0").

Combination with a score X (section 4.3 and Algorithm 1, whose last line is LSE^w * S^(1-w)):

    S = S_X^w * S_NAP^(1 - w),  w in (0, 1),

on the raw score S_X, e.g. the energy LSE itself. `form: paper` (the default) reports

    log S = w log S_X + (1 - w) log S_NAP,

which ranks samples exactly as S does and cannot overflow. Two cases have no finite log S:
- S_X <= 0, where the paper's power is undefined (or 0): energy of a far OOD sample, RG's product
  with a negative energy. Such a sample gets NONPOSITIVE_TOP + S_X (<= -747): below every sample
  with S_X > 0, whatever w and S_NAP, and ordered by S_X among themselves (to float resolution at
  747, about 1e-13). It is a fixed function of (S_X, S_NAP, w), so ID and OOD splits are scored
  alike. Why -747: for S_X > 0 and S_NAP > 0, both logs are at least log(2^-1074) = -744.44 (the
  smallest positive float64), and so is their weighted mean, so no positive sample goes below it.
- S_X > 0 but S_NAP = 0 (an all-zero map): S = 0 exactly. Score ZERO_PRODUCT = -746, one value
  for all of them as S ties them, between the two groups above.
The number of samples with S_X <= 0 is returned with the scores (`Output.nonpositive`) and written
by a sweep into its meta file, per configuration and split.

The score used for S_X is the method's own, plus its registered `nap_offset` (0 but for KNN, whose
minus distance is negative by construction; its positive form is 2 - d, see featcache.methods.knn).

`form: exp` is the log-domain form S_X' = exp(S_X): w S_X + (1 - w) log S_NAP, defined for any
sign. featcache used it for energy-like scores before; it changes what w means (the exponential
spans many orders of magnitude more than S_NAP), so the paper's w values do not apply to it.
Prediction and ID accuracy are those of X.
"""

from __future__ import annotations

import numpy as np

from featcache.methods.data import Output, original_predictions, shares
from featcache.methods.kernels import n_workers, row_reduce
from featcache.methods.registry import BENCHMARKS, REGISTRY, Method, every_benchmark, register

NAP_EPS = 1.0
LOG_TINY = float(np.log(np.nextafter(0.0, 1.0)))  # -744.44: no log of a positive float64 is lower
ZERO_PRODUCT = float(np.floor(LOG_TINY) - 1)  # -746: S_X > 0, S_NAP = 0
NONPOSITIVE_TOP = ZERO_PRODUCT - 1  # -747: S_X <= 0 scores NONPOSITIVE_TOP + S_X


NAP_PASS_BYTES = 1 << 19  # the float64 rows of one pass of `nap_score`: a buffer that stays in the core's cache


def nap_score(chan_max: np.ndarray, chan_mean: np.ndarray, eps: float = NAP_EPS) -> np.ndarray:
    """mean_c (max_c / (mean_c + eps))^2 per sample, in float64."""
    chan_max, chan_mean = np.asarray(chan_max), np.asarray(chan_mean)
    if not (chan_max.ndim == 2 and chan_max.shape == chan_mean.shape and np.ndim(eps) == 0
            and chan_max.flags.c_contiguous and chan_mean.flags.c_contiguous):
        # other layouts and broadcasting shapes or eps (the Python API): whole copies, whose layout
        # sets the order of the sum, as always
        ratio = np.asarray(chan_max, np.float64) / (np.asarray(chan_mean, np.float64) + eps)
        return np.mean(ratio**2, axis=1)
    n, c = chan_max.shape
    out = np.empty(n)
    # a few rows at a time in one float64 buffer, in place: the formula's own operations in its order
    # (the casts are exact), so the same numbers as whole float64 copies, without four (N, C) temporaries
    # that a ratio of the split's size would fault in and stream through memory
    step = max(1, NAP_PASS_BYTES // (8 * max(c, 1)))
    buffer = np.empty((min(step, n), c))
    for start in range(0, n, step):
        stop = min(start + step, n)
        ratio = buffer[: stop - start]
        np.add(chan_mean[start:stop], eps, out=ratio, dtype=np.float64)
        np.divide(chan_max[start:stop], ratio, out=ratio, dtype=np.float64)
        out[start:stop] = np.square(ratio, out=ratio).mean(axis=1)
    return out


def combine_scores(s_x: np.ndarray, s_nap: np.ndarray, w: float, form: str = "paper") -> np.ndarray:
    """The combined score of S_X and S_NAP in `form` (see the module docstring), float64."""
    s_x, s_nap = np.asarray(s_x, np.float64), np.asarray(s_nap, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_nap = np.log(s_nap)
        if form == "exp":
            return w * s_x + (1 - w) * log_nap
        positive = s_x > 0
        log_s = w * np.log(np.where(positive, s_x, 1.0)) + (1 - w) * log_nap
    return np.where(positive, np.where(s_nap > 0, log_s, ZERO_PRODUCT), NONPOSITIVE_TOP + s_x)


def shared_nap_score(data, eps):
    def compute():
        # the pre-pool maxima, and means other than the features (which every product method holds
        # anyway), are read for this alone: a run of rows at a time, never held whole
        if data.same_as("chan_mean") == "features":
            mean = data.features
            runs = ((start, stop, (mx, mean[start:stop])) for start, stop, mx in data.row_runs("chan_max"))
        else:
            runs = data.row_runs_together("chan_max", "chan_mean")
        score = np.empty(len(data))
        for start, stop, (mx, mn) in runs:
            score[start:stop] = row_reduce(lambda a, b: nap_score(mx[a:b], mn[a:b], eps), stop - start,
                                           block=-(-(stop - start) // n_workers()))  # a run on every core
        return score

    return data.memo(("nap", eps), compute)


# version 2: the stored chan_mean, not the features where only an attribute (unchecked) said they were equal
@register("nap", defaults={"eps": NAP_EPS}, paper=every_benchmark({"eps": NAP_EPS}), version=2)
def nap(data, head, fit, eps):
    return Output(shared_nap_score(data, eps), original_predictions(data))


def shared_output(base: Method, data, head, fit, params: dict) -> Output:
    """`base`'s output on `data`, computed once per split and parameters with the replay's head (it
    does not depend on w); with any other head, at each call (`shares`)."""
    if not shares(data, head):
        return base.fn(data, head, fit, **params)
    key = ("method", base.name, tuple(sorted(params.items())))
    return data.memo(key, lambda: base.fn(data, head, fit, **params))


def nap_input(base: Method, scores: np.ndarray, form: str) -> np.ndarray:
    """S_X as the combination takes it: the score plus the base's nap_offset in the paper form."""
    return scores + base.nap_offset if form == "paper" and base.nap_offset else scores


# NAP paper, appendix H, table 11 ("Optimal weight parameter w"), one column per benchmark. Its "ASH"
# row is ASH-S (tables 9 and 10: "NAP-A ... ASH-S"); methods the table does not list have no w.
PAPER_W = {
    "cifar10": {"msp": 0.5, "energy": 0.4, "ash_s": 0.5, "dice": 0.5, "scale": 0.4, "react": 0.4, "knn": 0.8},
    "cifar100": {"msp": 0.3, "energy": 0.4, "ash_s": 0.6, "dice": 0.6, "scale": 0.5, "react": 0.5, "knn": 0.8},
    "imagenet": {"msp": 0.3, "energy": 0.6, "ash_s": 0.8, "dice": 0.6, "scale": 0.4, "react": 0.8, "knn": 0.6},
}


COMBINATION_VERSION = 2  # raised when the combination's formula changes


def combine(base: Method) -> Method:
    """The method nap+<base>: parameters w (default 0.5), eps, form (paper | exp), plus all of base's.

    Its paper setting on a benchmark is table 11's w with the base method's own paper setting there;
    none where either is missing.
    """
    if {"w", "eps", "form"} & set(base.defaults):
        raise ValueError(f"{base.name}: parameter names clash with NAP's w, eps and form")

    def score(data, head, fit, w, eps, form, **params):
        out = shared_output(base, data, head, fit, params)
        s_x = nap_input(base, out.scores, form)
        nonpositive = int(np.count_nonzero(s_x <= 0)) if form == "paper" else None
        return Output(combine_scores(s_x, shared_nap_score(data, eps), w, form), out.predictions, nonpositive)

    paper = {}
    for benchmark in BENCHMARKS:
        w, own = PAPER_W[benchmark].get(base.name), base.paper.get(benchmark)
        if w is not None and own is not None:
            paper[benchmark] = {"w": w, "eps": NAP_EPS, "form": "paper", **own}
    # the combination's own revision (2: the paper's S_X^w * S_NAP^(1-w)), NAP's and the base's
    version = f"{COMBINATION_VERSION}:nap{REGISTRY['nap'].version}+{base.name}{base.version}"
    return Method(f"nap+{base.name}", score, {"w": 0.5, "eps": NAP_EPS, "form": "paper", **base.defaults},
                  0.0, base.one_of, paper, base.integer, base.qualifies, version)
