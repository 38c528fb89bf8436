"""D-Rank (methods-spec §5): effective-rank Lagrangian allocation per matrix type, Q/K → V rebalancing.

Paper mode (default, `mode=paper`):

1. Per unit (a matrix, or a Basis-Sharing group with `--group-size n`): R_eff = exp(H(p)) of its
   whitened spectrum, ω = cost of one rank (rows + cols).
2. Per type t, with that type's kept budget T_t = ⌊(1 − ratio)·dense_t⌋, the closed form of
   min Σ R_eff/k s.t. Σ k·ω = T_t:   k_g = T_t / Σ_j √(R_j ω_j) · √(R_g/ω_g).
3. Round, keep dense where the rank would not save parameters, then the integer budget fix of
   the code (decrement the smallest R_eff/ω, increment the largest) inside each type.
4. Q/K → V: every Q and K unit gives β of its ranks (β = 0.3 by default, the paper's best);
   the freed **parameters** are split evenly over the V units and turned into V ranks at V's own
   cost per rank. With MHA this is exactly the paper's t = β/G·(ΣkQ + ΣkK) ranks; with GQA (V smaller
   than Q) rank units would overspend, parameter units stay correct. V is capped at dense; what V
   cannot use is refunded to Q and K (largest R_eff/ω first).
5. A last fill spends what the per-type floors left (less than a rank per type) so that the whole
   budget is used to within one rank's cost.

`mode=code` reproduces the released implementation's extra heuristics (§5.2, §5.4, §10.6):
* MHA: q/k/v always dynamic; o/up/down dynamic only if that lowers the type's whitened tail energy
  against uniform ranks, otherwise uniform; gate always uniform; rebalance tax β = 0.2;
* GQA (the commented-out LLaMA-3 path): q, k, gate uniform; v/o/up/down dynamic only if the
  whitened tail is lower; tax β = 0.1 in parameter units.
The code's rank-unit round-robin hand-out to V is replaced by the parameter-unit split (identical
for MHA up to rounding).

Options: beta (float; default 0.3 paper / 0.2 code-MHA / 0.1 code-GQA), mode (paper | code),
rebalance (true), tune_beta (false: choose β on held-out calibration text, see `tune`),
beta_grid (list, default [0, 0.1, 0.2, 0.3, 0.4]; `beta_grid=0,0.1` or `beta_grid=[0,0.1]` on the command
line); they are declared on `DRank` and parsed before any work. Group size n is `--group-size` (n = 1 default,
right for GQA; the paper uses n = 2 for MHA LLaMA-1/2).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from svdzip.allocate import options as opt
from svdzip.allocate.base import Allocation, AllocationContext, Allocator
from svdzip.allocate.common import (
    Rank,
    fill_budget,
    fit_budget,
    normalise,
    static_gain,
    step_down,
    total,
    tune_on_heldout,
)
from svdzip.budget import DENSE, keep_budget, uniform_rank
from svdzip.errors import SvdzipError
from svdzip.methods.decompose import Unit
from svdzip.methods.linalg import effective_rank
from svdzip.needs import NOTHING, Needs

log = logging.getLogger(__name__)

MODES = ("paper", "code")


def effective_ranks(units: Sequence[Unit]) -> list[float]:
    """R_eff of every unit (cached on the unit: the spectrum never changes)."""
    out = []
    for u in units:
        if "erank" not in u.extras:
            u.extras["erank"] = effective_rank(u.spectrum.sigma2)
        out.append(u.extras["erank"])
    return out


def lagrange_ranks(reff: Sequence[float], omega: Sequence[int], budget: float) -> list[float]:
    """Closed form of min Σ R/k s.t. Σ k·ω = budget: k_g = budget·√(R_g/ω_g) / Σ_j √(R_j ω_j)."""
    denom = sum(math.sqrt(max(r, 0.0) * w) for r, w in zip(reff, omega, strict=True))
    if denom <= 0:
        return [budget / (len(omega) * w) for w in omega]
    return [budget * math.sqrt(max(r, 0.0) / w) / denom for r, w in zip(reff, omega, strict=True)]


def is_gqa(units: Sequence[Unit]) -> bool:
    """K/V smaller than Q: parameter units matter for the rebalance, and code mode takes its LLaMA-3 path."""
    q = next((u for u in units if u.role == "q"), None)
    v = next((u for u in units if u.role == "v"), None)
    return q is not None and v is not None and v.rows < q.rows


def default_beta(mode: str, gqa: bool) -> float:
    if mode == "code":
        return 0.1 if gqa else 0.2
    return 0.3


def _roles(units: Sequence[Unit]) -> dict[str, list[int]]:
    by: dict[str, list[int]] = {}
    for i, u in enumerate(units):
        by.setdefault(u.role, []).append(i)
    return by


def rebalance_qk_to_v(units: Sequence[Unit], ranks: list[Rank], beta: float, reff: Sequence[float]) -> list[Rank]:
    """Q, K give β of their ranks; the freed parameters become V ranks (even split, capped at dense)."""
    by = _roles(units)
    donors = by.get("q", []) + by.get("k", [])
    takers = by.get("v", [])
    if beta <= 0 or not donors or not takers:
        return ranks
    attn = donors + takers
    budget = total([units[i] for i in attn], [ranks[i] for i in attn])
    for i in donors:
        r = ranks[i]
        k = r if r is not DENSE else (step_down(units[i], r) or (r, 0))[0]
        ranks[i] = normalise(units[i], max(1, k - round(beta * k)))
    pool = budget - total([units[i] for i in attn], [ranks[i] for i in attn])
    share = pool / len(takers)
    for i in takers:
        u, r = units[i], ranks[i]
        if r is DENSE:
            continue
        ranks[i] = normalise(u, r + math.floor(share / u.cost_per_rank))
    # what V could not absorb (capped at dense) goes back to Q and K, largest R_eff/ω first
    gain = static_gain([reff[i] / u.cost_per_rank for i, u in enumerate(units)])
    donor_budget = budget - total([units[i] for i in takers], [ranks[i] for i in takers])
    return fit_budget(units, ranks, donor_budget, gain, subset=donors)


def drank_ranks(units: Sequence[Unit], ratio: float, budget: int, beta: float | None = None,
                mode: str = "paper", rebalance: bool = True) -> list[Rank]:
    """Integer D-Rank ranks (DENSE = keep dense) spending `budget` to within one rank's cost."""
    if mode not in MODES:
        raise SvdzipError(f"D-Rank mode must be one of {', '.join(MODES)}, got '{mode}'")
    gqa = is_gqa(units)
    beta = default_beta(mode, gqa) if beta is None else float(beta)
    if not 0.0 <= beta < 1.0:
        raise SvdzipError(f"D-Rank β must be in [0, 1), got {beta}")
    reff = effective_ranks(units)
    gain = static_gain([r / u.cost_per_rank for r, u in zip(reff, units, strict=True)])
    ranks: list[Rank] = [None] * len(units)
    for role, idx in _roles(units).items():
        group = [units[i] for i in idx]
        type_budget = keep_budget(sum(u.dense_params for u in group), ratio)
        cont = lagrange_ranks([reff[i] for i in idx], [u.cost_per_rank for u in group], type_budget)
        dyn = [normalise(u, min(k, min(u.rows, u.cols))) for u, k in zip(group, cont, strict=True)]
        uni = [normalise(u, uniform_rank(u.rows, u.cols, ratio)) for u in group]
        choice = dyn
        if mode == "code":
            always_dynamic = () if gqa else ("q", "k", "v")
            if_lower = ("v", "o", "up", "down") if gqa else ("o", "up", "down")
            if role in if_lower:
                choice = dyn if _tail(group, dyn) < _tail(group, uni) else uni
            elif role not in always_dynamic:
                choice = uni
            log.debug("D-Rank code mode, %s: %s ranks", role, "dynamic" if choice is dyn else "uniform")
        for i, r in zip(idx, choice, strict=True):
            ranks[i] = r
        fit_budget(units, ranks, type_budget, gain, subset=idx)
    if rebalance:
        ranks = rebalance_qk_to_v(units, ranks, beta, reff)
    fill_budget(units, ranks, budget, gain)
    if total(units, ranks) > budget:  # only if the per-type budgets could not be met at rank 1
        fit_budget(units, ranks, budget, gain)
    return ranks


def _tail(group: Sequence[Unit], ranks: Sequence[Rank]) -> float:
    return sum(0.0 if r is DENSE else u.spectrum.tail(r) for u, r in zip(group, ranks, strict=True))


class DRank(Allocator):
    name = "drank"
    summary = "D-Rank: effective-rank Lagrangian per matrix type, Q/K → V rebalancing"
    options = (
        opt.number("beta", None, "Q/K → V rebalancing tax (default 0.3 paper, 0.2 code-MHA, 0.1 code-GQA)",
                   parse=opt.or_none(opt.between(opt.as_number, 0.0, 1.0)), kind="number in [0, 1) or auto"),
        opt.choice("mode", MODES, "paper", "paper's allocation, or the released code's extra heuristics"),
        opt.flag("rebalance", True, "move ranks from Q and K to V"),
        opt.flag("tune_beta", False, "choose β on held-out calibration windows (svdzip compress --tune-beta)"),
        opt.numbers("beta_grid", [0.0, 0.1, 0.2, 0.3, 0.4], "the β values tune_beta tries",
                    parse=opt.numbers_where(lambda b: 0.0 <= b < 1.0, "every β must lie in [0, 1)")),
    )

    def needs(self, options: Mapping[str, Any] | None = None) -> Needs:
        if self.parse_options(options or {})["tune_beta"]:
            return Needs(heldout=True, whole_model=True,
                         why=("D-Rank's tune_beta scores every β of the grid on held-out calibration windows "
                              "with the whole model",))
        return NOTHING

    def allocate(self, units: list[Unit], ctx: AllocationContext) -> Allocation:
        o = ctx.options
        beta, report = o["beta"], {}
        if o["tune_beta"]:
            beta = tune_on_heldout(units, ctx, "beta", o["beta_grid"],
                                   lambda b: drank_ranks(units, ctx.ratio, ctx.budget, b, o["mode"], o["rebalance"]))
            report["tuned_beta"] = beta
        ranks = drank_ranks(units, ctx.ratio, ctx.budget, beta, o["mode"], o["rebalance"])
        _log_shift(units, ranks, ctx.ratio)
        return Allocation(ranks, report)


def _log_shift(units: Sequence[Unit], ranks: Sequence[Rank], ratio: float) -> None:
    """Which types gained or lost parameters against uniform ranks (the first thing to look at)."""
    by = _roles(units)
    parts = []
    for role, idx in by.items():
        dense = sum(units[i].dense_params for i in idx)
        kept = total([units[i] for i in idx], [ranks[i] for i in idx])
        parts.append(f"{role} {kept / dense:.3f}")
    log.info("D-Rank kept fraction per type (uniform %.3f): %s", 1 - ratio, ", ".join(parts))
