"""Head products of mostly-zero operands: only their nonzero terms are multiplied.

A dense float32 product costs the same whatever the zeros. ASH keeps k = D - round(D p / 100) entries
of each row (10% at p = 90, 5% at p = 95) and DICE keeps that share of the head's weights; at such
densities a product over the nonzero terms (scipy's CSR product) costs a fraction of the dense one:
with both cores busy, a block of 1,024 x 2,048 @ 2,048 x 1,000 costs about 0.45 of the dense product
at 5% density, 0.7 at 10% and 0.93 at 15%, finding the nonzeros included.

The numbers: each logit is a float32 sum of the row's nonzero terms, CHUNK_COLUMNS columns at a time
in column order, the partial sums then added in order, where the dense product sums all D terms in
BLAS's own blocked order. Both lie within the standard bound |computed - exact| <= gamma_m
sum_j |x_j w_j|, gamma_m = m u / (1 - m u), u = 2**-24, m the number of terms summed (at most the
row's nonzeros here, D for the dense product); the last bits differ. A sum in one piece would be
about twice as far from the exact one as BLAS's; in pieces of 256 columns it comes within 2 to 15%
of BLAS's mean error (7.97e-9 of sum_j |x_j w_j| against 7.85e-9 dense, ReLU features at 10%
density; one piece 1.64e-8; more at 1%), for about 2 ms a block more.
Which operands go this way depends only on the method and its parameters (ASH's k, DICE's kept
weights), never on the grid, the split or timing, so a configuration gets the same numbers in any
grid. Only finite heads go this way: a product skipping zero features would drop 0 * inf = NaN.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse

# Largest share of nonzero entries multiplied sparsely. With both cores busy, a 1,024-row block
# costs about 0.45 of a dense product at 5%, 0.7 at 10%, 0.78 at 12% and 0.93 at 15%.
SPARSE_MAX_DENSITY = 0.125
CHUNK_COLUMNS = 256  # columns summed in one float32 sum before the partial sums are added


def worth_sparse(kept: int, width: int) -> bool:
    """Whether rows keeping `kept` of `width` entries multiply sparsely (float32 heads only)."""
    return width > 0 and 0 <= kept <= SPARSE_MAX_DENSITY * width


def column_pieces(width: int) -> list[slice]:
    return [slice(start, min(start + CHUNK_COLUMNS, width)) for start in range(0, width, CHUNK_COLUMNS)]


def csr_rows(block: np.ndarray) -> scipy.sparse.csr_matrix:
    """The nonzero entries of a 2-d block as a float32 CSR matrix (a bool block gives ones)."""
    block = np.ascontiguousarray(block)
    n, d = block.shape
    # numpy finds the True entries of a bool array several times faster than a float array's nonzeros
    flat = np.flatnonzero(block if block.dtype == bool else block != 0)
    # the flat indices are sorted: one search finds where every row starts
    indptr = np.searchsorted(flat, np.arange(n + 1, dtype=np.int64) * d)
    columns = flat - np.repeat(np.arange(n, dtype=np.int64) * d, np.diff(indptr))
    values = block.reshape(-1)[flat].astype(np.float32, copy=False)
    index = np.int32 if flat.size < 2**31 and d < 2**31 else np.int64
    return scipy.sparse.csr_matrix((values, columns.astype(index), indptr.astype(index)), shape=(n, d))


def _summed(parts, shape) -> np.ndarray:
    """The partial products added in order, in float32 (zeros when there are none)."""
    out = None
    for part in parts:
        part = np.asarray(part, dtype=np.float32)
        out = part if out is None else np.add(out, part, out=out)
    return np.zeros(shape, np.float32) if out is None else out


def sparse_rows_product(block: np.ndarray, weight_t: np.ndarray) -> np.ndarray:
    """block @ weight_t in float32 over block's nonzero entries, a piece of columns at a time;
    weight_t a C-contiguous (D, K) float32 array."""
    return _summed((csr_rows(block[:, piece]) @ weight_t[piece] for piece in column_pieces(block.shape[1])),
                   (len(block), weight_t.shape[1]))


def sparse_weight(weight: np.ndarray) -> list:
    """The (K, D) head weight's nonzeros, a CSR matrix per piece of columns, for `sparse_weight_product`."""
    weight = np.asarray(weight, dtype=np.float32)
    return [(piece, csr_rows(weight[:, piece])) for piece in column_pieces(weight.shape[1])]


def sparse_weight_product(block: np.ndarray, weight_pieces: list, weight_t: np.ndarray) -> np.ndarray:
    """block @ W.T in float32 over W's nonzero entries, W given as `sparse_weight` gives it: each
    logit sums the terms of its row of W a piece of columns at a time, in column order.

    Rows holding a non-finite feature are multiplied densely by weight_t (W.T), as the dense product
    would: there a feature in a column whose weights are all zero makes NaN (0 * inf), which a
    product skipping those weights would drop. Non-finite results do not depend on the order of
    summation, so those rows' numbers do not depend on the others in the block.
    """
    block = np.asarray(block, dtype=np.float32)
    k = weight_t.shape[1]
    parts = (csr @ np.ascontiguousarray(block[:, piece].T) for piece, csr in weight_pieces)
    out = np.ascontiguousarray(_summed(parts, (k, len(block))).T)
    if not np.isfinite(block.sum()):  # a finite total: every entry is finite (the usual case, one pass)
        bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
        if bad.size:
            out[bad] = block[bad] @ weight_t
    return out
