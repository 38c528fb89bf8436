"""One definition of the budget, used by every allocator and every report.

The budget counts the parameters of the compressible decoder linears only (embeddings, lm_head and
norms excluded), as SVD-LLM, Basis Sharing and D-Rank do. `ratio` is the fraction of those
parameters *removed*; ARA's and ASVD's "kept" convention is converted at the boundary
(`ratio_from_kept`). A unit (one matrix, or a group sharing a basis) of shape M×n costs k·(M+n) at
rank k and M·n dense; a rank that would not save parameters means: keep it dense.
"""

from __future__ import annotations

import math

from svdzip.errors import SvdzipError

DENSE = None  # the rank value that means "keep this unit dense"


def check_ratio(ratio: float) -> float:
    if not isinstance(ratio, int | float) or math.isnan(ratio) or not 0.0 < ratio < 1.0:
        raise SvdzipError(f"ratio must be a fraction strictly between 0 and 1, got {ratio!r}")
    return float(ratio)


def ratio_from_kept(kept: float) -> float:
    """ARA / ASVD "param ratio kept" → svdzip's fraction removed."""
    if not isinstance(kept, int | float) or math.isnan(kept) or not 0.0 < kept < 1.0:
        raise SvdzipError(f"kept fraction must be strictly between 0 and 1, got {kept!r}")
    return 1.0 - float(kept)


def keep_budget(total_params: int, ratio: float) -> int:
    """Parameters that may remain after removing `ratio` of `total_params`."""
    return int(math.floor((1.0 - check_ratio(ratio)) * total_params))


def rank_cost(rows: int, cols: int) -> int:
    """Parameters one rank of a factorised rows×cols unit costs."""
    return rows + cols


def unit_params(rows: int, cols: int, rank: int | None) -> int:
    """Stored parameters of a unit at `rank` (None = dense)."""
    return rows * cols if rank is DENSE else rank * (rows + cols)


def max_useful_rank(rows: int, cols: int) -> int:
    """The largest rank that still stores fewer parameters than the dense matrix."""
    return min(min(rows, cols), (rows * cols - 1) // (rows + cols))


def uniform_rank(rows: int, cols: int, ratio: float) -> int:
    """The papers' per-matrix rank: k = floor((1 − r)·m·n / (m + n)) (SVD-LLM, Basis Sharing)."""
    return int(math.floor((1.0 - ratio) * rows * cols / (rows + cols)))


def normalise_rank(rows: int, cols: int, rank: int | None) -> int | None:
    """Dense when the rank would not save parameters; otherwise the rank, at least 1."""
    if rank is DENSE or rank > max_useful_rank(rows, cols):
        return DENSE
    return max(1, int(rank))
