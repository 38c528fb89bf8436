"""`speedaware`: another allocator's ranks, but a matrix whose low-rank form is not faster stays dense.

Why: on a CPU at one token per step (decode), `LowRankLinear` runs two small matmuls where the
dense layer ran one; for small matrices (SmolLM2's 576→192 k/v projections) the second dispatch
costs more than the saved FLOPs, so at *every* rank the factorised layer is slower than the dense
one (benchmarks/results/speed_*.md). Keeping such a matrix dense costs parameters, so the budget
left for the other matrices shrinks and they are cut a little deeper; the achieved ratio is the
requested one. Timing-based, hence machine-dependent (and, on a loaded machine, noisy): the
measured speedups are logged, and the decision is cached per (shape, rank) within a process.

Options (`--allocator-option`): `base` (allocator to wrap, default uniform), `tokens` (input rows
the timing uses: 1 = decode, default), `min_speedup` (default 1.0), `clock` (cpu or wall; cpu).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from svdzip.allocate import AllocationContext, get_allocator, register
from svdzip.errors import SvdzipError
from svdzip.methods.decompose import Unit

log = logging.getLogger(__name__)

_CACHE: dict[tuple[int, int, int, int, int, str], float] = {}


def measured_speedup(rows: int, cols: int, rank: int, tokens: int, clock: str) -> float:
    """dense time / low-rank time of one rows×cols linear at `rank` on this machine (cached)."""
    from svdzip.evaluate.speed import linear_timing

    key = (rows, cols, rank, tokens, torch.get_num_threads(), clock)
    if key not in _CACHE:
        _CACHE[key] = linear_timing(cols, rows, [rank], tokens, clock=clock, repeats=5)["ranks"][0]["speedup"]
    return _CACHE[key]


@register("speedaware")
def allocate_speed_aware(units: list[Unit], ctx: AllocationContext) -> list[int | None]:
    base_name = str(ctx.option("base", "uniform"))
    if base_name == "speedaware":
        raise SvdzipError("speedaware cannot wrap itself")
    base = get_allocator(base_name)
    tokens, min_speedup = int(ctx.option("tokens", 1)), float(ctx.option("min_speedup", 1.0))
    clock = str(ctx.option("clock", "cpu"))
    dense: set[int] = set()
    ranks: list[int | None] = [None] * len(units)
    for _ in range(8):
        free = [i for i in range(len(units)) if i not in dense]
        budget = ctx.budget - sum(units[i].dense_params for i in dense)
        free_dense = sum(units[i].dense_params for i in free)
        if not free or budget <= 0 or budget >= free_dense:
            raise SvdzipError(f"speedaware: keeping {len(dense)} slow matrices dense leaves no feasible budget "
                              "for the others; lower the ratio or min_speedup")
        sub = dataclasses.replace(ctx, ratio=1.0 - budget / free_dense, budget=budget)
        sub_ranks = base([units[i] for i in free], sub)
        ranks = [None] * len(units)
        for i, r in zip(free, sub_ranks, strict=True):
            ranks[i] = r
        slow = []
        for i, r in zip(free, sub_ranks, strict=True):
            u = units[i]
            if r is None or len(u.members) != 1 or r > min(u.rows, u.cols):
                continue
            s = measured_speedup(u.rows, u.cols, r, tokens, clock)
            if s < min_speedup:
                slow.append(i)
                log.debug("speedaware: %s at rank %d is ×%.2f of dense at %d token(s): kept dense", u.name, r, s,
                          tokens)
        if not slow:
            break
        dense.update(slow)
        log.info("speedaware: %d more matrices kept dense (low rank not faster at %d token(s)); "
                 "re-allocating the rest with '%s' at ratio %.4f", len(slow), tokens, base_name,
                 1.0 - (ctx.budget - sum(units[i].dense_params for i in dense)) /
                 max(1, sum(units[i].dense_params for i in range(len(units)) if i not in dense)))
    return ranks
