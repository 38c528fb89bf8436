"""MoDeGPT's global allocation (methods-spec §11.3): layers that change the residual least lose the most.

Each decoder layer ℓ gets a sparsity φ_ℓ from its block influence s_ℓ (`passes.block_influence`):
maximising Σ s_ℓ(1 − φ_ℓ) + ε·H(φ) at a mean sparsity φ̄ gives φ = L·φ̄·softmax(−s/ε), water-filled
under the cap (a layer whose share would pass it is clamped and the rest re-shared). Every unit of
the layer then keeps its `uniform_rank(φ_ℓ)` (an MLP: that fraction of its neurons). φ̄ is bisected so
that the units meet the budget (where some linears stay dense the others carry more), and the integer
leftover goes to the most influential layers first.

Options: epsilon (the temperature ε; → ∞ is uniform), cap (the largest sparsity of a layer), samples
(calibration windows the influence is measured on).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence

import torch

from svdzip.allocate import options as opt
from svdzip.allocate.base import Allocation, AllocationContext, Allocator, Rank
from svdzip.allocate.common import fit_budget, static_gain, total
from svdzip.errors import SvdzipError
from svdzip.methods.decompose import Unit
from svdzip.needs import Needs

log = logging.getLogger(__name__)


def layer_sparsities(scores: Sequence[float], mean: float, epsilon: float, cap: float) -> list[float]:
    """φ = L·mean·softmax(−s/ε), water-filled under `cap`: Σφ = L·mean (or L·cap when that is less)."""
    n = len(scores)
    if n == 0:
        return []
    s = torch.tensor(list(scores), dtype=torch.float64)
    phi = torch.zeros(n, dtype=torch.float64)
    active = torch.ones(n, dtype=torch.bool)
    remaining = min(n * mean, n * cap)
    while active.any():
        share = remaining * torch.softmax(-s[active] / epsilon, dim=0)
        over = share > cap
        if not over.any():
            phi[active] = share
            break
        idx = active.nonzero().flatten()[over]
        phi[idx] = cap
        active[idx] = False
        remaining -= cap * len(idx)
    return phi.tolist()


def _ranks(units: Sequence[Unit], layer_of: Sequence[int], phi: Sequence[float]) -> list[Rank]:
    return [u.normalise(u.uniform_rank(phi[layer])) for u, layer in zip(units, layer_of, strict=True)]


class BlockInfluence(Allocator):
    name = "block-influence"
    summary = "MoDeGPT's allocation: per-layer sparsity from the block influence, softmax with temperature ε"
    slims = True
    options = (
        opt.number("epsilon", 0.1, "temperature ε of the softmax over −influence (larger = more uniform)",
                   parse=opt.at_least(opt.as_number, 0.0, strict=True)),
        opt.number("cap", 0.8, "the largest fraction any layer may lose", parse=opt.between(opt.as_number, 0.0, 1.0)),
        opt.integer("samples", 8, "calibration windows the block influence is measured on", minimum=1),
    )

    def needs(self, options=None) -> Needs:
        return Needs(calib_tokens=True, whole_model=True,
                     why=("block-influence runs the model over calibration windows to score its layers",))

    def allocate(self, units: list[Unit], ctx: AllocationContext) -> Allocation:
        from svdzip.passes.block_influence import block_influence

        o = ctx.options
        if ctx.model is None or ctx.calib_tokens is None:
            raise SvdzipError("block-influence needs the model and calibration tokens")
        tokens = ctx.calib_tokens[: o["samples"]]
        key = hashlib.sha256(tokens.to(torch.int64).numpy().tobytes()).hexdigest()
        scores = ctx.cache.get("block-influence", (key, id(ctx.model)), lambda: block_influence(ctx.model, tokens))
        layer_of = [u.members[0].layer for u in units]
        lo, hi = 0.0, o["cap"]
        if total(units, _ranks(units, layer_of, layer_sparsities(scores, hi, o["epsilon"], o["cap"]))) > ctx.budget:
            raise SvdzipError(f"block-influence: even {o['cap']:.0%} removed from every layer (the cap) does not meet "
                              f"the budget; raise --allocator-option cap=… or ask for a smaller ratio")
        for _ in range(60):  # the smallest mean sparsity that meets the budget
            mid = 0.5 * (lo + hi)
            used = total(units, _ranks(units, layer_of, layer_sparsities(scores, mid, o["epsilon"], o["cap"])))
            lo, hi = (mid, hi) if used > ctx.budget else (lo, mid)
        phi = layer_sparsities(scores, hi, o["epsilon"], o["cap"])
        ranks = fit_budget(units, _ranks(units, layer_of, phi), ctx.budget,
                           static_gain([scores[layer] for layer in layer_of]))
        log.info("block-influence: mean layer sparsity %.3f (ε %g), from %.3f to %.3f", hi, o["epsilon"], min(phi),
                 max(phi))
        return Allocation(ranks, {"block_influence": [round(s, 6) for s in scores],
                                  "layer_sparsity": [round(p, 6) for p in phi],
                                  "mean_sparsity": round(hi, 6) if math.isfinite(hi) else None})
