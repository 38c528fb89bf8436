"""Uniform ranks, the papers' baseline: every matrix keeps k = floor((1 − r)·m·n/(m + n))."""

from __future__ import annotations

from svdzip.allocate.base import Allocation, AllocationContext, Allocator
from svdzip.budget import uniform_rank
from svdzip.methods.decompose import Unit


class Uniform(Allocator):
    name = "uniform"
    summary = "the same ratio for every matrix (the papers' baseline)"

    def allocate(self, units: list[Unit], ctx: AllocationContext) -> Allocation:
        return Allocation([uniform_rank(u.rows, u.cols, ctx.ratio) for u in units])
