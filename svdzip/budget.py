"""One definition of the budget, used by every allocator and every report.

The budget counts the parameters of the compressible decoder linears only (embeddings, lm_head and
norms excluded), as SVD-LLM, Basis Sharing and D-Rank do. `ratio` is the fraction of those
parameters *removed*; ARA's and ASVD's "kept" convention is converted at the boundary
(`ratio_from_kept`). A unit (one matrix, or a group sharing a basis) of shape M×n costs k·(M+n) at
rank k and M·n dense; a rank that would not save parameters means: keep it dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Pricing:
    """What one unit costs in bytes when factors and dense matrices have their own storage precision.

    A rows×cols unit at rank k stores k·(rows+cols) factor values plus one per-row overhead (a
    quantization scale) for each of the rows + k rows of its two factors; dense it stores rows·cols
    values plus one overhead per row. With overheads 0 and values of equal size this is the
    parameter count times that size, so a byte budget reduces to the parameter budget.
    """

    factor_value_bytes: float = 1.0
    dense_value_bytes: float = 1.0
    factor_row_bytes: float = 0.0
    dense_row_bytes: float = 0.0

    def factored(self, rows: int, cols: int, rank: int) -> int:
        return math.ceil(rank * (rows + cols) * self.factor_value_bytes + (rows + rank) * self.factor_row_bytes)

    def dense(self, rows: int, cols: int) -> int:
        return math.ceil(rows * cols * self.dense_value_bytes + rows * self.dense_row_bytes)

    def cost(self, rows: int, cols: int, rank: int | None) -> int:
        return self.dense(rows, cols) if rank is DENSE else self.factored(rows, cols, rank)

    def max_useful_rank(self, rows: int, cols: int) -> int:
        """The largest rank whose factors cost less than the dense matrix (0: factorising never pays)."""
        dense = self.dense(rows, cols)
        per_rank = (rows + cols) * self.factor_value_bytes + self.factor_row_bytes
        k = int((dense - rows * self.factor_row_bytes) // per_rank) if per_rank > 0 else 0
        k = max(0, min(min(rows, cols), k + 1))
        while k > 0 and self.factored(rows, cols, k) >= dense:
            k -= 1
        return k
