"""What an allocator is: an object that declares its options and needs, and turns spectra into ranks.

An allocator receives the decomposed units (spectrum, cost of one rank `rows + cols`, dense cost
`rows·cols`) and an `AllocationContext` (budget, ratio, its parsed options and — for allocators that
evaluate or train, like ARA and ASVD's search — the model and calibration tokens). It returns an
`Allocation`: one rank per unit, or `DENSE` (None) to keep the unit dense, plus whatever it wants
reported (ARA's training history). It must never spend more than the budget.

It declares, before any work, what it needs (`needs(options) -> Needs`): the driver unions that
with the method's and the update's needs and refuses a mode that cannot give it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch

from svdzip.allocate.options import Option, parse_options
from svdzip.budget import DENSE
from svdzip.methods.decompose import Unit
from svdzip.needs import NOTHING, Needs

T = TypeVar("T")
Rank = int | None


@dataclass
class AllocationCache:
    """Results an allocator may reuse across calls: owned and passed in by the caller.

    A sweep compresses one model at many ratios and a byte budget bisects over ratios; loss-aware's
    Fisher sensitivities and speedaware's timings are the same every time. Keys say exactly what
    the cached value depends on.
    """

    entries: dict[tuple[str, Hashable], Any] = field(default_factory=dict)

    def get(self, owner: str, key: Hashable, compute: Callable[[], T]) -> T:
        if (owner, key) not in self.entries:
            self.entries[owner, key] = compute()
        return self.entries[owner, key]


@dataclass
class AllocationContext:
    ratio: float  # fraction of the units' dense parameters to remove
    budget: int  # what the units may keep in total: parameters, or bytes for priced units
    options: dict[str, Any] = field(default_factory=dict)  # the allocator's options (parsed by `allocate`)
    adapter: Any = None
    model: Any = None
    calib_tokens: Any = None
    heldout_tokens: Any = None  # calibration-corpus windows the statistics never saw (tuning, guards)
    device: Any = "cpu"
    dtype: torch.dtype = torch.float32  # the matmuls of a pass an allocator runs over the model (`core.precision`)
    seed: int = 0
    cache: AllocationCache = field(default_factory=AllocationCache)


@dataclass
class Allocation:
    """An allocator's answer: ranks (None = dense), and what it wants reported (JSON-able; may be empty)."""

    ranks: list[Rank]
    report: dict[str, Any] = field(default_factory=dict)
    allocator: str = ""
    #: matrices the byte planner stores quantized: name → (bits, compensation rank); their rank is DENSE
    lowbit: dict[str, tuple[int, int]] = field(default_factory=dict)


class Allocator(ABC):
    """Subclasses set `name`, `summary`, `options` (and `byte_aware`), and implement `allocate`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: spends `ctx.budget` through `Unit.cost`, so it can spend bytes of priced units directly; the
    #: others are run on parameters and fitted to a byte budget from outside (`memory.py`)
    byte_aware: ClassVar[bool] = False
    #: allocates widths of slimmed modules (MoDeGPT's MLPs) as well as ranks: it reads only `Unit`'s own costs,
    #: curves and `uniform_rank`, never a factorisation's shape
    slims: ClassVar[bool] = False
    #: allocates units that choose between families (the hybrid's `ChoiceUnit`): builds their options
    #: (`ChoiceUnit.prepare`), or starts from an allocator that does (ARA)
    chooses: ClassVar[bool] = False
    options: ClassVar[tuple[Option, ...]] = ()

    def parse_options(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """Every option typed, defaults filled in; a clear `SvdzipError` for unknown keys or bad values."""
        return parse_options(self.name, self.options, raw)

    def needs(self, options: Mapping[str, Any] | None = None) -> Needs:
        """What this allocator needs with these options (raw or parsed)."""
        return NOTHING

    @abstractmethod
    def allocate(self, units: Sequence[Unit], ctx: AllocationContext) -> Allocation:
        """Ranks for `units` within `ctx.budget`; `ctx.options` are already parsed."""


def spent(units: Sequence[Unit], ranks: Sequence[Rank]) -> int:
    """Budget spent: parameters, or bytes for priced units."""
    return sum(u.cost(r) for u, r in zip(units, ranks, strict=True))


__all__ = ["DENSE", "Allocation", "AllocationCache", "AllocationContext", "Allocator", "Rank", "spent"]
