"""Rank allocators: objects in one registry that turn spectra and a budget into integer ranks.

Each allocator (see `base.Allocator`) declares its options, whether it spends bytes directly, and
what it needs (`needs(options)`: model, calibration tokens, held-out windows, gradients). The
functions here are what a driver calls:

* `get_allocator(name)` / `available()` — the registry (`registry.py`);
* `parse_allocator_options(name, raw)` — typed options, or a clear error, before any work;
* `allocator_needs(name, options)` — the allocator's `Needs` under those options;
* `allocate(name, units, ctx)` — an `Allocation` (ranks + report), normalised and checked against the budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from svdzip.allocate.base import DENSE, Allocation, AllocationCache, AllocationContext, Allocator, spent
from svdzip.errors import InfeasibleBudget, SvdzipError
from svdzip.methods.decompose import Unit
from svdzip.needs import Needs


def _registry() -> Mapping[str, Allocator]:
    from svdzip.allocate.registry import REGISTRY  # imports every allocator; done on first use

    return REGISTRY


def available() -> list[str]:
    return sorted(_registry())


def get_allocator(name: str | Allocator) -> Allocator:
    """The allocator called `name` (an allocator object passes through); a clear error listing the choices."""
    if isinstance(name, Allocator):
        return name
    registry = _registry()
    if name not in registry:
        raise SvdzipError(f"unknown allocator '{name}'; choose from {', '.join(sorted(registry))}")
    return registry[name]


def slimming_allocators() -> list[str]:
    """The allocators that can give slimmed modules their widths."""
    return sorted(name for name, a in _registry().items() if a.slims)


def is_byte_aware(name: str) -> bool:
    return get_allocator(name).byte_aware


def parse_allocator_options(name: str, raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """`key=value` options (text from the command line, or typed) → typed options with defaults filled in."""
    return get_allocator(name).parse_options(dict(raw or {}))


def allocator_needs(name: str, options: Mapping[str, Any] | None = None) -> Needs:
    """What the allocator needs with these options (raw or parsed), for the driver's check before any work."""
    allocator = get_allocator(name)
    return allocator.needs(allocator.parse_options(dict(options or {})))


def allocate(name: str | Allocator, units: Sequence[Unit], ctx: AllocationContext) -> Allocation:
    """Run an allocator on its parsed options; normalise its ranks (dense where factorising would not
    save) and check the budget."""
    allocator = get_allocator(name)
    if not allocator.slims and any(u.slimmed and not u.chooses for u in units):
        raise SvdzipError(f"allocator '{allocator.name}' allocates factorisation ranks; slimmed modules (--method "
                          f"modegpt) need one of: {', '.join(slimming_allocators())}")
    if not allocator.chooses and any(getattr(u, "chooses", False) for u in units):
        raise SvdzipError(f"allocator '{allocator.name}' cannot choose between slimming and factorising "
                          "(--method hybrid): use loss-aware or ara")
    ctx = dataclasses.replace(ctx, options=allocator.parse_options(ctx.options))
    result = allocator.allocate(list(units), ctx)
    if len(result.ranks) != len(units):
        raise RuntimeError(f"allocator '{allocator.name}' returned {len(result.ranks)} ranks for {len(units)} units")
    ranks = [u.normalise(r) for u, r in zip(units, result.ranks, strict=True)]
    used = spent(units, ranks)
    if used > ctx.budget:
        unit = "bytes" if any(u.pricing is not None for u in units) else "parameters"
        floor = spent(units, [u.normalise(1) for u in units])
        if floor > ctx.budget:  # no allocator could: the budget, not the allocator, is at fault
            raise InfeasibleBudget(f"budget of {ctx.budget} {unit} is below one rank per matrix ({floor})")
        raise RuntimeError(f"allocator '{allocator.name}' spent {used} {unit}, over the budget of {ctx.budget}")
    return Allocation(ranks=ranks, report=result.report, allocator=allocator.name)


__all__ = ["DENSE", "Allocation", "AllocationCache", "AllocationContext", "Allocator", "allocate", "allocator_needs",
           "available", "get_allocator", "is_byte_aware", "slimming_allocators", "parse_allocator_options", "spent"]
