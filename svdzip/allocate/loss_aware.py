"""Loss-aware allocation: spend the budget where truncation hurts the model least (issue 3, part 8).

Minimise Σ_u w_u·tail_u(k_u) under the budget, where tail_u(k) = ‖X(W − W_k)ᵀ‖² is the exact
whitened loss of unit u at rank k and w_u converts it into what it costs the model. The optimiser is
a global greedy over each unit's concave hull of (parameters, loss removed), rank 1 … dense, so
"keep this one dense" is a single big step competing with every other unit's next ranks
(`common.greedy_loss_allocation`). Signals (`signal=` option):

* `fisher` (default): w_u = mean over the unit's output channels and calibration tokens of (∂L/∂y)²,
  the empirical-Fisher (diagonal, output-side) estimate of the calibration loss's curvature, so
  w_u·tail_u ≈ 2·ΔL. One forward+backward over `fisher_samples` calibration windows, kept in the
  caller's `AllocationCache` (`ctx.cache`) across calls (ratios) for the same model, units and tokens.
* `local`: w_u = the layer-local gain (`passes.local_gain`): how much of the unit's output error reaches
  its decoder layer's output, relative to each token's residual stream. Measured during calibration, one layer
  at a time, so it runs streamed, resumed and under torchrun, where `fisher` cannot; on SmolLM2-135M its
  log correlates with `fisher`'s at 0.98 across all 210 linears.
* `whitened`: w_u = 1, the raw output error (layers with large activations dominate).
* `relative`: w_u = 1/energy_u, the relative whitened loss (the reference run of the issue).
* `erank`: w_u = R_eff/energy: D-Rank's information density as the weight (for comparison).

Options: signal, fisher_samples (8), fisher_batch (2), guard (false).

`guard=true` checks the result against uniform ranks (and, where modules are slimmed, MoDeGPT's block-influence
allocation) on held-out *calibration* windows and keeps whichever loses least there. The greedy trusts first-order
sensitivities measured on the dense model; when a budget forces many matrices deep at once (Gemma-3-270M at 60 %,
MoDeGPT's modules of Gemma-3-270M at 40 %) their damage stops adding up and another allocation can win. The check
costs a forward pass over the held-out windows per candidate and never sees evaluation text (`svdzip compress
--allocator loss-aware --allocator-option guard=true` draws them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from svdzip.allocate import options as opt
from svdzip.allocate.base import Allocation, AllocationContext, Allocator
from svdzip.allocate.common import greedy_loss_allocation, tune_on_heldout
from svdzip.core.precision import autocast_for
from svdzip.errors import SvdzipError
from svdzip.methods.decompose import Unit
from svdzip.methods.linalg import effective_rank
from svdzip.needs import NOTHING, Needs

log = logging.getLogger(__name__)

SIGNALS = ("fisher", "local", "whitened", "relative", "erank")


def output_fisher(model: torch.nn.Module, names: Sequence[str], tokens: torch.Tensor,
                  batch_size: int = 2, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Mean squared gradient of the next-token loss w.r.t. each named linear's output; the forward and
    backward multiply in `dtype` (`core.precision`), the squares are summed in float64."""
    modules = dict(model.named_modules())
    acc = {n: 0.0 for n in names}
    counts = {n: 0 for n in names}
    handles = []

    def watch(name: str):
        def hook(_mod, _inp, out):
            if out.requires_grad:
                def grad_hook(g):
                    acc[name] += float(g.double().pow(2).sum())
                    counts[name] += g.numel()
                out.register_hook(grad_hook)
        return hook

    for n in names:
        handles.append(modules[n].register_forward_hook(watch(n)))
    embed = model.get_input_embeddings()
    handles.append(embed.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True)))
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    try:
        with torch.enable_grad():
            for start in range(0, tokens.shape[0], batch_size):
                batch = tokens[start : start + batch_size]
                count = batch.shape[0] * (batch.shape[1] - 1)
                # the batch's mean loss, back-propagated one window at a time: a window's outputs get gradient
                # from its own tokens only, so every output gradient is the batch's, with one window's activations
                # and logits in memory instead of the batch's
                for row in batch:
                    ids = row[None].to(device)
                    with autocast_for(device, dtype):
                        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
                    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                             ids[:, 1:].reshape(-1), reduction="sum") / count
                    loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
    return {n: acc[n] / max(counts[n], 1) for n in names}


def fisher_key(units: Sequence[Unit], tokens: torch.Tensor, batch_size: int, dtype: torch.dtype = torch.float32
               ) -> str:
    """What the output Fisher depends on: the tokens, the batching of the loss, the matmuls' dtype and the model
    (through the units' names and leading spectra, which fix its weights and statistics)."""
    h = hashlib.sha256(tokens.to(torch.int64).numpy().tobytes())
    h.update(f"{batch_size} {dtype}".encode())
    for u in units:
        h.update(u.name.encode())
        h.update(u.spectrum.sigma2[:4].double().numpy().tobytes())
    return h.hexdigest()


def unit_weights(units: Sequence[Unit], ctx: AllocationContext, signal: str) -> list[float]:
    if signal == "whitened":
        return [1.0] * len(units)
    if signal == "relative":
        return [1.0 / max(u.spectrum.energy, 1e-300) for u in units]
    if signal == "erank":
        return [effective_rank(u.spectrum.sigma2) / max(u.spectrum.energy, 1e-300) for u in units]
    if signal == "local":
        missing = [u.name for u in units if "local_gain" not in u.extras]
        if missing:
            raise SvdzipError(f"the local signal needs the layer-local gains of the calibration (statistics kind "
                              f"'local'); {missing[0]} has none: compute the spectra with them")
        return [float(u.extras["local_gain"]) for u in units]
    if signal != "fisher":
        raise SvdzipError(f"unknown loss-aware signal '{signal}'; choose from {', '.join(SIGNALS)}")
    if ctx.model is None or ctx.calib_tokens is None:
        raise SvdzipError("the fisher signal needs the model and calibration tokens")
    tokens = ctx.calib_tokens[: ctx.options["fisher_samples"]]
    batch = ctx.options["fisher_batch"]
    names = [m.name for u in units for m in u.loss_members]
    fisher = ctx.cache.get("loss-aware", fisher_key(units, tokens, batch, ctx.dtype),
                           lambda: output_fisher(ctx.model, names, tokens, batch, ctx.dtype))
    # a shared unit's stacked loss sums its members' output errors: weight by their mean Fisher
    return [sum(fisher[m.name] * m.out_features for m in u.loss_members)
            / max(sum(m.out_features for m in u.loss_members), 1) for u in units]


def choice_weights(units: Sequence[Unit], ctx: AllocationContext, signal: str) -> list[float]:
    """`unit_weights`, where a unit that chooses between families (`ChoiceUnit`) first builds its options from
    the weights of its alternatives and then counts with weight 1 (its losses are weighted already)."""
    inner = [a for u in units if u.chooses for a in u.alternatives]
    plain = [u for u in units if not u.chooses]
    weights = dict(zip(map(id, inner + plain), unit_weights(inner + plain, ctx, signal), strict=True))
    for u in units:
        if u.chooses:
            u.prepare(lambda a: weights[id(a)])
    return [1.0 if u.chooses else weights[id(u)] for u in units]


def guard_baselines(units: list[Unit], ctx: AllocationContext) -> dict[str, list]:
    """What the guard compares loss-aware's choice with: uniform ranks (a module that chooses takes its best option
    within its uniform share) and, where modules are slimmed, MoDeGPT's own block-influence allocation — measured
    better than loss-aware on Gemma-3-270M, whose attention MoDeGPT keeps dense. The allocators' classes are called
    directly: `allocate()` refuses modules that choose, for a user who names these allocators."""
    from svdzip.allocate import get_allocator

    out = {}
    for name in ("uniform", "block-influence") if any(u.slimmed for u in units) else ("uniform",):
        allocator = get_allocator(name)
        out[name] = allocator.allocate(units, dataclasses.replace(ctx, options=allocator.parse_options({}))).ranks
    return out


class LossAware(Allocator):
    name = "loss-aware"
    summary = "greedy over every unit's loss-vs-parameters hull, weighted by what the loss costs the model"
    slims = True
    chooses = True
    byte_aware = True
    options = (
        opt.choice("signal", SIGNALS, "fisher", "what converts a unit's whitened loss into model loss"),
        opt.integer("fisher_samples", 8, "calibration windows the fisher signal back-propagates", minimum=1),
        opt.integer("fisher_batch", 2, "windows per backward pass of the fisher signal", minimum=1),
        opt.flag("guard", False, "keep uniform ranks (or, for slimmed modules, block-influence's) instead if they "
                 "lose less on held-out calibration windows"),
        opt.flag("packed_factors", False, "byte planner (--quantize plan): also offer factorisations with their "
                 "factors packed at 8/4/3/2 bits (off: on Qwen2.5-0.5B they lost on both corpora, README)"),
    )

    def needs(self, options: Mapping[str, Any] | None = None) -> Needs:
        o = self.parse_options(options or {})
        needs = NOTHING
        if o["signal"] == "local":
            needs = needs | Needs(statistics=frozenset({"local"}),
                                  why=("loss-aware's local signal measures each layer's gain during calibration",))
        if o["signal"] == "fisher":
            needs = needs | Needs(calib_tokens=True, gradients=True, whole_model=True,
                                  why=("loss-aware's fisher signal back-propagates the LM loss through the whole "
                                       "model (signal=relative does not)",))
        if o["guard"]:
            needs = needs | Needs(heldout=True, calib_tokens=True, whole_model=True,
                                  why=("loss-aware's guard compares with uniform (and block-influence) "
                                       "allocations on held-out calibration windows with the whole model",))
        return needs

    def allocate(self, units: list[Unit], ctx: AllocationContext) -> Allocation:
        o = ctx.options
        weights = choice_weights(units, ctx, o["signal"])
        ranks = greedy_loss_allocation(units, weights, ctx.budget)
        if not o["guard"]:
            return Allocation(ranks)
        if any(u.pricing is not None for u in units):
            raise SvdzipError("loss-aware's guard=true compares with uniform ranks at a parameter ratio; it does not "
                              "support a byte budget yet (drop guard=true)")
        candidates = {"loss-aware": ranks, **guard_baselines(units, ctx)}
        names = list(candidates)
        choice = tune_on_heldout(units, ctx, "guard (" + ", ".join(f"{i} = {n}" for i, n in enumerate(names)) + ")",
                                 range(len(names)), lambda i: candidates[names[i]])
        if choice:
            log.warning("loss-aware: %s allocation loses less on held-out calibration text at ratio %.2f; using it",
                        names[choice], ctx.ratio)
        return Allocation(candidates[names[choice]], {"guard_kept": names[choice]})
