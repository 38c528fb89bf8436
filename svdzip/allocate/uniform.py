"""Uniform ranks, the papers' baseline: every matrix keeps k = floor((1 − r)·m·n/(m + n))."""

from __future__ import annotations

from svdzip.allocate.base import Allocation, AllocationContext, Allocator
from svdzip.methods.decompose import Unit


class Uniform(Allocator):
    name = "uniform"
    summary = "the same ratio for every matrix (the papers' baseline)"
    slims = True

    def allocate(self, units: list[Unit], ctx: AllocationContext) -> Allocation:
        return Allocation([u.uniform_rank(movable_ratio(units, ctx)) for u in units])


def movable_ratio(units: list[Unit], ctx: AllocationContext) -> float:
    """The ratio the units that can be compressed must remove so that all units meet the budget (the run's
    ratio itself when every unit can be; more where a method keeps some linears dense, as MoDeGPT's attention)."""
    fixed = sum(u.dense_params for u in units if u.max_rank < 1)
    if not fixed:
        return ctx.ratio
    total = sum(u.dense_params for u in units)
    if total == fixed:
        return 0.0
    return min(1.0, max(0.0, (total - ctx.budget) / (total - fixed)))
