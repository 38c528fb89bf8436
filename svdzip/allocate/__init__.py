"""Rank allocators: plug-ins registered by name that turn spectra and a budget into integer ranks.

An allocator receives the decomposed units (spectrum, cost of one rank `rows + cols`, dense cost
`rows·cols`) and an `AllocationContext` (budget, ratio, and — for allocators that evaluate or
train, like ARA and ASVD's search — the model, statistics and calibration tokens). It returns one
rank per unit, or `DENSE` (None) to keep the unit dense. It must never spend more than the budget.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from svdzip.budget import DENSE
from svdzip.errors import SvdzipError
from svdzip.methods.decompose import Unit
from svdzip.needs import Needs


@dataclass
class AllocationContext:
    ratio: float  # fraction of the units' dense parameters to remove
    budget: int  # parameters the units may keep in total
    options: dict[str, Any] = field(default_factory=dict)
    adapter: Any = None
    model: Any = None
    stats: Any = None
    calib_tokens: Any = None
    device: Any = "cpu"
    seed: int = 0
    out_dir: Any = None  # where an allocator may write its plots

    def option(self, key: str, default: Any) -> Any:
        return self.options.get(key, default)


Allocator = Callable[[list[Unit], AllocationContext], list[int | None]]
ALLOCATORS: dict[str, Allocator] = {}


def register(name: str, byte_aware: bool = False) -> Callable[[Allocator], Allocator]:
    """`byte_aware`: the allocator spends `ctx.budget` through `Unit.cost`, so it can spend bytes of
    priced units directly; the others are run on parameters and fitted to a byte budget from outside."""
    def wrap(fn: Allocator) -> Allocator:
        fn.byte_aware = byte_aware
        ALLOCATORS[name] = fn
        return fn

    return wrap


def _load_plugins() -> None:
    """Import every module of this package: each file registers its allocator(s)."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def available() -> list[str]:
    _load_plugins()
    return sorted(ALLOCATORS)


def get_allocator(name: str) -> Allocator:
    _load_plugins()
    if name not in ALLOCATORS:
        raise SvdzipError(f"unknown allocator '{name}'; choose from {', '.join(sorted(ALLOCATORS))}")
    return ALLOCATORS[name]


def allocator_needs(name: str, options: dict[str, Any]) -> Needs:
    """What the allocator `name` needs with these options."""
    from svdzip.allocate.common import truthy

    get_allocator(name)
    needs = Needs()
    if name in ("ara", "strs"):
        needs = Needs(calib_tokens=True, whole_model=True).because("it evaluates the model")
    if name == "loss-aware":
        needs = Needs(calib_tokens=True)
        if str(options.get("signal", "fisher")) == "fisher":
            needs = Needs(calib_tokens=True, whole_model=True, gradients=True).because(
                "its fisher signal back-propagates through the model; --allocator-option signal=relative does not")
    if any(truthy(options.get(k, False)) for k in ("tune_beta", "guard")):
        needs = needs | Needs(heldout=True, whole_model=True).because("it checks itself on held-out windows")
    return needs


def spent(units: list[Unit], ranks: list[int | None]) -> int:
    """Budget spent: parameters, or bytes for priced units."""
    return sum(u.cost(r) for u, r in zip(units, ranks, strict=True))


def is_byte_aware(name: str) -> bool:
    return bool(getattr(get_allocator(name), "byte_aware", False))


def allocate(name: str, units: list[Unit], ctx: AllocationContext) -> list[int | None]:
    """Run an allocator, normalise its ranks (dense where factorising would not save) and check the budget."""
    ranks = get_allocator(name)(units, ctx)
    if len(ranks) != len(units):
        raise RuntimeError(f"allocator '{name}' returned {len(ranks)} ranks for {len(units)} units")
    ranks = [u.normalise(r) for u, r in zip(units, ranks, strict=True)]
    used = spent(units, ranks)
    if used > ctx.budget:
        unit = "bytes" if any(u.pricing is not None for u in units) else "parameters"
        raise RuntimeError(f"allocator '{name}' spent {used} {unit}, over the budget of {ctx.budget}")
    return ranks


__all__ = ["DENSE", "AllocationContext", "allocate", "available", "get_allocator", "is_byte_aware", "register",
           "spent"]
