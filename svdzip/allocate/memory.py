"""Memory budgets: the user budgets bytes of weights, and factors and dense matrices compete in bytes.

`--budget-bytes B` or `--budget-fraction f` (B = f × the dense model's weight bytes in bfloat16, embeddings
and norms included) replaces `--ratio`. What cannot be compressed — embeddings, lm_head, norms, biases, kept
at the saved dtype — is taken off first; the rest is the units' byte budget. Each unit is priced
(`budget.Pricing`): a rank-k factorisation costs k·(m+n) values at the factor precision plus the library's
per-row scale bytes, a dense matrix m·n values at the dense precision plus its row scales. A byte-aware
allocator (loss-aware) spends that budget directly, so "keep dense in int8" and "factorise deeper" compete in
one allocation. Any other allocator is run on parameters at the ratio whose result, once stored at those
precisions, just fits (bisection): "allocate parameters first, quantize after".
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from svdzip.allocate import Allocation, AllocationContext, allocate, parse_allocator_options, spent
from svdzip.budget import DENSE, Pricing, keep_budget
from svdzip.errors import InfeasibleBudget, SvdzipError
from svdzip.methods.decompose import Unit

log = logging.getLogger(__name__)

REFERENCE_DTYPE = torch.bfloat16  # a budget fraction is of the dense model's weight bytes in this dtype


@dataclass(frozen=True)
class MemoryPlan:
    budget_bytes: int  # weight bytes the whole model may take
    reference_bytes: int  # the dense model's weight bytes in bfloat16
    fixed_bytes: int  # embeddings, lm_head, norms, biases at the saved dtype: never compressed
    unit_budget: int  # what the factorisable matrices may spend
    pricing: Pricing

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in dataclasses.asdict(self).items() if k != "pricing"},
                "pricing": dataclasses.asdict(self.pricing)}


def unique_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def reference_bytes(model: nn.Module) -> int:
    """The dense model's weight bytes stored in bfloat16 (what --budget-fraction is a fraction of)."""
    return unique_params(model) * torch.empty((), dtype=REFERENCE_DTYPE).element_size()


def pricing_for(dtype: torch.dtype, precision: str | None, scope: str = "all") -> Pricing:
    """Byte costs of factors and of dense matrices for a saved dtype and an optional quantization."""
    from svdzip.output.quantize import row_overhead_bytes, value_bytes

    factor_q = precision if precision and scope in ("all", "factors") else None
    dense_q = precision if precision and scope in ("all", "dense") else None
    return Pricing(
        factor_value_bytes=value_bytes(factor_q, dtype), dense_value_bytes=value_bytes(dense_q, dtype),
        factor_row_bytes=row_overhead_bytes(factor_q, dtype) if factor_q else 0.0,
        dense_row_bytes=row_overhead_bytes(dense_q, dtype) if dense_q else 0.0,
    )


def minimum_cost(units: list[Unit]) -> int:
    """The cheapest the units can be: rank 1 each (dense where even rank 1 would not pay)."""
    return sum(u.cost(1 if u.max_rank >= 1 else DENSE) for u in units)


def plan(model: nn.Module, units: list[Unit], budget_bytes: int | None, budget_fraction: float | None,
         dtype: torch.dtype, precision: str | None, scope: str = "all",
         floor: tuple[int, str] | None = None) -> MemoryPlan:
    """Turn a byte budget or fraction into the units' byte budget; refuse one that cannot be met.

    `floor` is (the least the matrices can take, what that is); default: one rank per matrix at these prices.
    """
    ref = reference_bytes(model)
    budget = int(budget_bytes) if budget_bytes is not None else int(budget_fraction * ref)
    size = torch.empty((), dtype=dtype).element_size()
    fixed = (unique_params(model) - sum(u.dense_params for u in units)) * size
    pricing = pricing_for(dtype, precision, scope)
    priced = price(units, pricing)
    if budget <= fixed:
        raise SvdzipError(f"memory budget of {budget:,} bytes ({budget / ref:.1%} of the dense bf16 weights) is "
                          f"below what the embeddings, lm_head and norms alone take at {str(dtype)[6:]} "
                          f"({fixed:,} bytes, {fixed / ref:.1%})")
    least, what = floor or (minimum_cost(priced), "one rank per matrix")
    if budget - fixed < least:
        raise SvdzipError(f"memory budget of {budget:,} bytes ({budget / ref:.1%}) is below the embeddings and norms "
                          f"({fixed:,} bytes) plus {what} ({least:,} bytes): at least "
                          f"{fixed + least:,} bytes ({(fixed + least) / ref:.1%}) are needed")
    return MemoryPlan(budget_bytes=budget, reference_bytes=ref, fixed_bytes=fixed, unit_budget=budget - fixed,
                      pricing=pricing)


def price(units: list[Unit], pricing: Pricing) -> list[Unit]:
    """Copies of the units that cost bytes (spectra shared, not copied)."""
    return [dataclasses.replace(u, pricing=pricing) for u in units]


def equivalent_ratio(priced: list[Unit], budget: int) -> float:
    """The fraction of the units' dense bytes the budget removes (for logs and ratio-minded allocators)."""
    dense = sum(u.cost(DENSE) for u in priced)
    return min(max(1.0 - budget / max(dense, 1), 1e-6), 1.0 - 1e-6)


def allocate_bytes(name: str, priced: list[Unit], ctx: AllocationContext, budget: int) -> Allocation:
    """Run a byte-aware allocator on priced units with the byte budget."""
    ctx = dataclasses.replace(ctx, budget=budget, ratio=equivalent_ratio(priced, budget))
    return allocate(name, priced, ctx)


def allocate_params_first(name: str, units: list[Unit], priced: list[Unit], ctx: AllocationContext, budget: int,
                          iterations: int = 16) -> tuple[Allocation, float]:
    """Allocate parameters at the smallest ratio whose stored result fits `budget` bytes; (allocation, that ratio).

    A rank that would cost more bytes than the dense matrix at its precision (factors 16-bit, dense int8)
    is stored dense: the obvious thing to do after allocating parameters.
    """
    if spent(priced, [DENSE] * len(priced)) <= budget:
        return Allocation([DENSE] * len(priced), allocator=name), 0.0
    # malformed options fail here, not as "too deep" inside the bisection
    ctx = dataclasses.replace(ctx, options=parse_allocator_options(name, ctx.options))
    dense = sum(u.dense_params for u in units)
    lo, hi, best = 0.0, 1.0, None
    for _ in range(iterations):
        r = (lo + hi) / 2
        try:
            result = allocate(name, units, dataclasses.replace(ctx, ratio=r, budget=keep_budget(dense, r)))
        except InfeasibleBudget:  # below one rank per matrix: too deep; any other error is the caller's
            hi = r
            continue
        ranks = [p.normalise(k) for p, k in zip(priced, result.ranks, strict=True)]
        if spent(priced, ranks) <= budget:
            best, hi = (dataclasses.replace(result, ranks=ranks), r), r
        else:
            lo = r
    if best is None:
        raise SvdzipError(f"allocator '{name}' found no parameter ratio whose result fits {budget:,} bytes")
    log.info("params first: %s at ratio %.4f spends %d of %d bytes", name, best[1], spent(priced, best[0].ranks),
             budget)
    return best
