"""Uniform ranks, the papers' baseline: every matrix keeps k = floor((1 − r)·m·n/(m + n))."""

from __future__ import annotations

from svdzip.allocate import AllocationContext, register
from svdzip.budget import uniform_rank
from svdzip.methods.decompose import Unit


@register("uniform")
def allocate_uniform(units: list[Unit], ctx: AllocationContext) -> list[int | None]:
    return [uniform_rank(u.rows, u.cols, ctx.ratio) for u in units]
