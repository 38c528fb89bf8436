"""SVD-LLM V2 heterogeneous compression ratios (methods-spec §3.4 A, §10.9).

Per matrix type, at the target ratio R every unit's theoretical truncation loss at the uniform rank
is L_min,i = √tail_i(k(R)) = ‖WX − (WX)_k‖_F. With ℓ_i = 1/log L_min,i, unit i gets the ratio
R_i = R·ℓ_i / mean(ℓ), clamped to [0, 1): a higher loss means a smaller ℓ, so less compression,
and each type keeps the overall ratio R on average. Ranks k_i = ⌊(1 − R_i)·m·n/(m + n)⌋, dense where
that would not save, then the shared integer budget fix (priority log L_min / ω).

V2's second half, the loss-optimised truncation (Algorithm 2: eigh(XᵀX), SVD of W·Us·√Ss), is the
Cholesky-free optimum of the whitened truncation — which is exactly what `linalg.weighted_spectrum`
already computes for every method (`svdllm` metric) — so it is not duplicated here.

log L needs L > 1: losses are sums over all calibration tokens, so that holds for real models; where it
does not (tiny models, no data), every loss of the type is scaled by one common factor so that the
smallest is e (an assumption of ours; the paper does not say).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

from svdzip.allocate.base import Allocation, AllocationContext, Allocator
from svdzip.allocate.common import Rank, fit_budget, normalise, static_gain
from svdzip.budget import uniform_rank
from svdzip.methods.decompose import Unit


def v2_ratios(losses: Sequence[float], ratio: float) -> list[float]:
    """R_i = R·ℓ_i/mean(ℓ), ℓ = 1/log(L_min), clamped to [0, 1).

    A matrix that loses nothing at the uniform rank (L = 0, e.g. its rank is below it) needs no more
    rank: it keeps R, and the others share the mean among themselves.
    """
    ok = [math.isfinite(x) and x >= sys.float_info.min for x in losses]  # e/L stays finite
    pos = [x for x, good in zip(losses, ok, strict=True) if good]
    if not pos:
        return [ratio] * len(losses)
    lo = min(pos)
    scale = math.e / lo if lo <= math.e else 1.0
    ell = [1.0 / math.log(max(x * scale, math.e)) if good else 0.0 for x, good in zip(losses, ok, strict=True)]
    mean = sum(ell) / len(pos)
    return [min(max(ratio * e / mean, 0.0), 0.999) if good else ratio for e, good in zip(ell, ok, strict=True)]


def v2_ranks(units: Sequence[Unit], ratio: float, budget: int) -> list[Rank]:
    ranks: list[Rank] = [None] * len(units)
    prio = [0.0] * len(units)
    by: dict[str, list[int]] = {}
    for i, u in enumerate(units):
        by.setdefault(u.role, []).append(i)
    for idx in by.values():
        losses = []
        for i in idx:
            u = units[i]
            k = max(1, uniform_rank(u.rows, u.cols, ratio))
            losses.append(math.sqrt(max(u.spectrum.tail(k), 0.0)))
        for i, r_i, loss in zip(idx, v2_ratios(losses, ratio), losses, strict=True):
            u = units[i]
            if loss < sys.float_info.min:  # lossless at the uniform rank: its own rank is enough
                ranks[i] = normalise(u, int((u.spectrum.sigma2 > 0).sum()))
            else:
                ranks[i] = normalise(u, (1.0 - r_i) * u.rows * u.cols / (u.rows + u.cols))
            prio[i] = math.log(max(loss, 1e-300)) / u.cost_per_rank
    return fit_budget(units, ranks, budget, static_gain(prio))


class SVDLLMV2(Allocator):
    name = "svdllm-v2"
    summary = "SVD-LLM V2's heterogeneous ratios from each matrix's truncation loss"

    def allocate(self, units: list[Unit], ctx: AllocationContext) -> Allocation:
        return Allocation(v2_ranks(units, ctx.ratio, ctx.budget))
