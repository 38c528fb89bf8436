"""`speedaware`: another allocator's ranks, but a matrix whose low-rank form is not faster stays dense.

Why: on a CPU at one token per step (decode), `LowRankLinear` runs two small matmuls where the
dense layer ran one; for small matrices (SmolLM2's 576→192 k/v projections) the second dispatch
costs more than the saved FLOPs, so at *every* rank the factorised layer is slower than the dense
one (benchmarks/results/speed_*.md). Keeping such a matrix dense costs parameters, so the budget
left for the other matrices shrinks and they are cut a little deeper; the achieved ratio is the
requested one. Timing-based, hence machine-dependent (and, on a loaded machine, noisy): the
measured speedups are logged and reported, and kept per (shape, rank) in the caller's
`AllocationCache`. Keeping matrices dense changes the budget of the others, whose new ranks may be
slow in turn: the loop runs until no factorised matrix is slow, so nothing logged as kept dense is
ever returned factorised.

Options (`--allocator-option`): `base` (allocator to wrap, default uniform), `tokens` (input rows
the timing uses: 1 = decode, default), `min_speedup` (default 1.0), `clock` (cpu or wall; cpu); any
other option is the base allocator's.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import torch

from svdzip.allocate import options as opt
from svdzip.allocate.base import Allocation, AllocationCache, AllocationContext, Allocator
from svdzip.errors import InfeasibleBudget, SvdzipError
from svdzip.methods.decompose import Unit
from svdzip.needs import Needs

log = logging.getLogger(__name__)


def measured_speedup(unit: Unit, rank: int, tokens: int, clock: str, cache: AllocationCache) -> float:
    """dense time / low-rank time of the unit's rows×cols linear at `rank` on this machine (cached)."""
    from svdzip.allocate.latency import linear_timing

    key = (unit.rows, unit.cols, rank, tokens, torch.get_num_threads(), clock)
    return cache.get("speedaware", key, lambda: linear_timing(unit.cols, unit.rows, [rank], tokens, clock=clock,
                                                              repeats=5)["ranks"][0]["speedup"])


class SpeedAware(Allocator):
    name = "speedaware"
    summary = "another allocator's ranks, but a matrix whose low-rank form is not faster stays dense"
    options = (
        opt.Option("base", "allocator name", "uniform", "the allocator whose ranks are checked",
                   opt.other_allocator("speedaware")),
        opt.integer("tokens", 1, "input rows the timing uses (1 = decode)", minimum=1),
        opt.number("min_speedup", 1.0, "a factorised matrix must be at least this much faster than dense",
                   parse=opt.at_least(opt.as_number, 0.0, strict=True), kind="number > 0"),
        opt.choice("clock", ("cpu", "wall"), "cpu", "the clock the timing reads"),
    )

    def _own(self) -> set[str]:
        return {o.name for o in self.options}

    def parse_options(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """Its own options, and every other key parsed by the base allocator."""
        from svdzip.allocate import get_allocator

        own = opt.parse_options(self.name, self.options, {k: v for k, v in raw.items() if k in self._own()})
        rest = {k: v for k, v in raw.items() if k not in self._own()}
        try:
            base = get_allocator(own["base"]).parse_options(rest)
        except SvdzipError as exc:
            raise SvdzipError(f"{exc} (speedaware passes every option but {', '.join(sorted(self._own()))} to its "
                              f"base allocator '{own['base']}')") from None
        return {**base, **own}

    def _base(self, options: dict[str, Any]) -> tuple[Allocator, dict[str, Any]]:
        from svdzip.allocate import get_allocator

        return get_allocator(options["base"]), {k: v for k, v in options.items() if k not in self._own()}

    def needs(self, options: Mapping[str, Any] | None = None) -> Needs:
        base, base_options = self._base(self.parse_options(options or {}))
        return base.needs(base_options)

    def allocate(self, units: list[Unit], ctx: AllocationContext) -> Allocation:
        o = ctx.options
        base, base_options = self._base(o)
        dense: set[int] = set()
        speedups: dict[str, float] = {}
        while True:  # every round keeps at least one more unit dense, so this ends within len(units) rounds
            free = [i for i in range(len(units)) if i not in dense]
            budget = ctx.budget - sum(units[i].dense_params for i in dense)
            free_dense = sum(units[i].dense_params for i in free)
            if not free or budget <= 0 or budget >= free_dense:
                raise InfeasibleBudget(f"speedaware: keeping {len(dense)} slow matrices dense leaves no feasible "
                                       "budget for the others; lower the ratio or min_speedup")
            sub = dataclasses.replace(ctx, ratio=1.0 - budget / free_dense, budget=budget, options=base_options)
            sub_ranks = base.allocate([units[i] for i in free], sub).ranks
            ranks: list[int | None] = [None] * len(units)
            for i, r in zip(free, sub_ranks, strict=True):
                ranks[i] = r
            slow = []
            for i, r in zip(free, sub_ranks, strict=True):
                u = units[i]
                if r is None or len(u.members) != 1 or r > min(u.rows, u.cols):
                    continue
                s = measured_speedup(u, r, o["tokens"], o["clock"], ctx.cache)
                speedups[u.name] = s
                if s < o["min_speedup"]:
                    slow.append(i)
                    log.debug("speedaware: %s at rank %d is ×%.2f of dense at %d token(s): kept dense", u.name, r,
                              s, o["tokens"])
            if not slow:
                break
            dense.update(slow)
            log.info("speedaware: %d more matrices kept dense (low rank not faster at %d token(s)); "
                     "re-allocating the rest with '%s' at ratio %.4f", len(slow), o["tokens"], base.name,
                     1.0 - (ctx.budget - sum(units[i].dense_params for i in dense)) /
                     max(1, sum(units[i].dense_params for i in range(len(units)) if i not in dense)))
        kept = sorted(units[i].name for i in dense)
        return Allocation(ranks, {"kept_dense_for_speed": kept, "speedups": speedups})
