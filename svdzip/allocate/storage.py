"""The byte planner: for every matrix, factorise, keep dense, or store at b bits (+ a compensation of rank r).

Each matrix gets a menu of options priced in bytes with their predicted loss — the loss-aware allocator's
currency, w_u · (whitened output error):

* factorise at rank k (16-bit factors): the tail of the unit's own spectrum, as loss-aware prices ranks;
* keep dense at the storage dtype: loss 0;
* HQQ at b ∈ {8, 4, 3, 2} bits with a compensation of rank r: the tail of the quantization error's spectrum
  (`passes.quant_error`), i.e. what is left after EoRA's closed-form correction of rank r;
* factorise at rank k with both factors at b bits (SVD first, then the factors quantized; k a multiple of the
  group size): the measured error of the quantized factors at every such rank (`passes.quant_error.factor_errors`).

`menu.greedy_menu` picks one option per matrix under the byte budget. What `--quantize` and `--compensate`
allow decides the menu: `plan` offers all of it (packed factors only with loss-aware's `packed_factors`);
`int4`/`int3`/`int2` only that width (with ranks r chosen by the planner under `--compensate auto`, or one
fixed r), or with `--quantize-scope factors` only factors at that width (the ranks chosen by the planner).
The choice follows the measured losses: no rule says which width suits which size.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from svdzip.allocate.base import Allocation, AllocationContext
from svdzip.allocate.menu import greedy_menu
from svdzip.budget import DENSE
from svdzip.errors import InfeasibleBudget, SvdzipError
from svdzip.methods.decompose import Unit
from svdzip.output.lowbit import BITS, GROUP_SIZE, packed_bytes, packed_factor_bytes

log = logging.getLogger(__name__)

#: compensation ranks offered per matrix at most (beyond this the next bit width is the better buy on every
#: matrix measured: SmolLM2-135M, Qwen2.5-0.5B)
MAX_COMPENSATION_RANK = 128


@dataclass(frozen=True)
class Option:
    """One way to store one matrix: rank k factors (16-bit, or at `bits` bits), dense, or `bits` bits with a
    compensation of rank `comp`."""

    cost: int
    loss: float
    rank: int | None = DENSE  # factor rank (None: not factorised)
    bits: int | None = None  # quantized at these bits (None: 16/32-bit); with a rank: the factors' width
    comp: int = 0

    @property
    def kind(self) -> str:
        """How the matrix is stored, for the planner's counts: '4-bit', '4-bit factors', 'dense', 'factorised'."""
        if self.bits is not None:
            return f"{self.bits}-bit" + ("" if self.rank is DENSE else " factors")
        return "dense" if self.rank is DENSE else "factorised"


@dataclass(frozen=True)
class StorageMenu:
    """Which options the recipe allows."""

    bits: tuple[int, ...]  # quantized widths offered
    comp: int | None  # a fixed compensation rank, or None: the planner chooses 0 … MAX_COMPENSATION_RANK
    factorise: bool  # offer factorisation (and 16-bit dense)
    value_bytes: int  # bytes of one unquantized value (factors, dense, compensation) at the storage dtype
    factor_bits: tuple[int, ...] = ()  # widths the factors of a factorisation may be stored at


def menu_for(quantize: str, compensate: int | str, value_bytes: int, scope: str = "all",
             packed_factors: bool = False) -> StorageMenu:
    """The menu of a recipe's `--quantize plan|int4|int3|int2`, `--compensate auto|R` and `--quantize-scope`
    (`packed_factors`: loss-aware's option of that name, whether the planner may pack factors too)."""
    comp = None if compensate == "auto" else int(compensate)
    if quantize == "plan":
        return StorageMenu(bits=BITS, comp=comp, factorise=True, value_bytes=value_bytes,
                           factor_bits=BITS if packed_factors else ())
    bits = (int(quantize.removeprefix("int")),)
    if scope == "factors":  # SVD first, then the factors at that width
        return StorageMenu(bits=(), comp=0, factorise=False, value_bytes=value_bytes, factor_bits=bits)
    return StorageMenu(bits=bits, comp=comp, factorise=False, value_bytes=value_bytes)


def least_bytes(units: Sequence[Unit], menu: StorageMenu) -> tuple[int, str]:
    """The fewest bytes the menu can store the matrices in, from their shapes alone (before any quantization):
    one bit per weight when factorising is offered (below that no low-bit model is worth having), else each
    matrix at the narrowest width with the fixed compensation, or factorised at one group's rank with the
    factors at the narrowest width. Returns (bytes, what that is)."""
    if menu.factorise:
        return sum(u.dense_params for u in units) // 8, "one bit per weight of the matrices"
    if not menu.bits:
        bits = min(menu.factor_bits)
        return (sum(packed_factor_bytes(u.rows, u.cols, GROUP_SIZE, bits) for u in units),
                f"every matrix factorised at rank {GROUP_SIZE} with {bits}-bit factors")
    comp = menu.comp or 0
    bits = min(menu.bits)
    return (sum(packed_bytes(u.rows, u.cols, bits) + comp * (u.rows + u.cols) * menu.value_bytes for u in units),
            f"every matrix at {bits} bits" + (f" with rank-{comp} compensations" if comp else ""))


def unit_options(unit: Unit, weight: float, errors: dict[tuple[str, int], Any], menu: StorageMenu,
                 factor_errors: dict[tuple[str, int], Any] | None = None) -> list[Option]:
    """Every option the menu allows for one matrix, with its bytes and weighted loss."""
    rows, cols = unit.rows, unit.cols
    per_rank = (rows + cols) * menu.value_bytes
    options: list[Option] = []
    if menu.factorise:
        tail = unit.spectrum.tail_curve()
        dense_cost = rows * cols * menu.value_bytes
        options.append(Option(cost=dense_cost, loss=0.0))
        for k in range(1, min(unit.spectrum.basis.shape[1], tail.numel() - 1) + 1):
            if k * per_rank >= dense_cost:
                break
            options.append(Option(cost=k * per_rank, loss=weight * float(tail[k]), rank=k))
    for b in menu.bits:
        err = errors.get((unit.name, b))
        if err is None:
            continue  # this shape cannot be packed at b bits
        tail = err.tail_curve()
        base = packed_bytes(rows, cols, b)
        ranks = [menu.comp] if menu.comp is not None else range(min(MAX_COMPENSATION_RANK, tail.numel() - 1) + 1)
        for r in ranks:
            if r > tail.numel() - 1:
                raise SvdzipError(f"compensation rank {r} exceeds {unit.name}'s smaller side ({tail.numel() - 1})")
            options.append(Option(cost=base + r * per_rank, loss=weight * float(tail[r]), bits=b, comp=r))
    for b in menu.factor_bits:
        measured = (factor_errors or {}).get((unit.name, b))
        for k in measured.ranks if measured is not None else ():
            options.append(Option(cost=packed_factor_bytes(rows, cols, k, b),
                                  loss=weight * float(measured.losses[k]), rank=k, bits=b))
    if not options:
        raise SvdzipError(f"{unit.name} ({rows}×{cols}) cannot be stored at {menu.bits or menu.factor_bits} bits "
                          f"in groups of {GROUP_SIZE}{' (nor its factors)' if menu.factor_bits else ''} and the "
                          "recipe offers nothing else")
    return options


def plan_storage(units: Sequence[Unit], weights: Sequence[float], errors: dict[tuple[str, int], Any],
                 menu: StorageMenu, budget: int | None,
                 factor_errors: dict[tuple[str, int], Any] | None = None) -> Allocation:
    """The cheapest-loss choice per matrix within `budget` bytes (None: every matrix at its cheapest option).

    Returns an `Allocation` whose ranks say which matrices are factorised and whose `lowbit` maps the quantized
    ones (whole, or their factors where they also have a rank) to (bits, compensation rank).
    """
    options = [unit_options(u, w, errors, menu, factor_errors) for u, w in zip(units, weights, strict=True)]
    if budget is None:
        choice = [min(range(len(o)), key=lambda i, o=o: (o[i].cost, o[i].loss)) for o in options]
    else:
        try:
            choice = greedy_menu([[(o.cost, o.loss) for o in opts] for opts in options], budget)
        except InfeasibleBudget:
            least = sum(min(o.cost for o in opts) for opts in options)
            exc = InfeasibleBudget(f"the matrices need at least {least:,} bytes with this menu "
                                   f"({menu.bits} bits{', factorised' if menu.factorise else ''}); the budget "
                                   f"leaves them {budget:,}")
            exc.least_bytes = least
            raise exc from None
    picked = [opts[i] for opts, i in zip(options, choice, strict=True)]
    lowbit = {u.name: (p.bits, p.comp) for u, p in zip(units, picked, strict=True) if p.bits is not None}
    counts: dict[str, int] = {}
    for p in picked:
        counts[p.kind] = counts.get(p.kind, 0) + 1
    report = {"storage": counts, "planned_matrix_bytes": sum(p.cost for p in picked),
              "compensation_ranks": sum(p.comp for p in picked),
              "predicted_loss": sum(p.loss for p in picked)}
    log.info("byte planner: %s; %d bytes for the matrices", ", ".join(f"{v} {k}" for k, v in sorted(counts.items())),
             report["planned_matrix_bytes"])
    return Allocation(ranks=[p.rank for p in picked], report=report,
                      allocator="loss-aware", lowbit=lowbit)


def planner_weights(units: Sequence[Unit], ctx: AllocationContext) -> list[float]:
    """What converts each matrix's output error into model loss: loss-aware's signal (its `signal` option)."""
    from svdzip.allocate.loss_aware import unit_weights

    return unit_weights(units, ctx, ctx.options.get("signal", "fisher"))


def matrix_bytes(units: Sequence[Unit], allocation: Allocation, value_bytes: int) -> int:
    """Bytes the planned matrices take (the same prices the planner used)."""
    total = 0
    for u, r in zip(units, allocation.ranks, strict=True):
        if u.name in allocation.lowbit and r is not DENSE:
            b, _ = allocation.lowbit[u.name]
            total += packed_factor_bytes(u.rows, u.cols, r, b)
        elif u.name in allocation.lowbit:
            b, comp = allocation.lowbit[u.name]
            total += packed_bytes(u.rows, u.cols, b) + comp * (u.rows + u.cols) * value_bytes
        else:
            total += (u.rows * u.cols if r is DENSE else r * (u.rows + u.cols)) * value_bytes
    return total


def storage_value_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
