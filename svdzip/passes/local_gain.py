"""The layer-local gain: how much of a linear's output error reaches its decoder layer's output.

Loss-aware allocation weighs each unit's whitened truncation loss ‖X(W − W_k)ᵀ‖² (the error of the
linear's *own* output) by what that error costs. Its `fisher` signal back-propagates the language-model
loss through the whole model, which a streamed or distributed run cannot do. This is the part of that
chain one decoder layer can measure on its own:

    gain_u = mean over tokens and channels of (J_uᵀ r)²,   r_t = z_t / rms(h_t),  z ~ N(0, I)

J_u = ∂h/∂y_u is the Jacobian of the layer's output h (residual stream included) with respect to
linear u's output y_u. For a random cotangent z, E_z[(J_uᵀ z)²] is the diagonal of J_uᵀJ_u, so
gain_u·‖δ‖² is the first-order error a perturbation δ of y_u puts into the layer's output, each output
token's error divided by that token's own mean square: the next layers read the residual stream through a
per-token norm, so an error counts by its size against the token's stream. Measured against the whole
model's Fisher (`fisher` signal) on SmolLM2-135M the per-token scaling matters: a global mean square is
dominated by the few tokens with huge activations that appear in the middle layers.
down_proj writes straight into the layer's output (J = I); o_proj's error also passes through the MLP.

It is computed with the other statistics during calibration, one layer at a time, on a stream of its own:
the first `PROBE_WINDOWS` calibration windows, carried by rank 0 only (one more forward and one backward
through each layer), each window's cotangent drawn from its own seeded generator, so the sums are the same
however the calibration windows are split over processes.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from svdzip.core.layerwise import first_output, to_device
from svdzip.models.adapter import LinearInfo

log = logging.getLogger(__name__)

#: calibration windows the gain is measured on (a forward and a backward through each layer)
PROBE_WINDOWS = 8
#: windows per probe batch: the backward keeps one window's activations, not a calibration batch's (the sums do
#: not depend on it). With calibration's inputs dropped as they are consumed, a streamed Qwen2.5-1.5B's first two
#: calibrated layers peak at 2.47 GiB instead of 2.94 (benchmarks/calibration_memory.py)
PROBE_BATCH = 1


def cotangent(shape: torch.Size, first_window: int, layer: int, seed: int = 0) -> torch.Tensor:
    """The random r of a batch [windows, …], each window's from its own generator (split-invariant)."""
    rows = []
    for w in range(shape[0]):
        gen = torch.Generator().manual_seed(1_000_003 * (seed + 1) + 7919 * layer + first_window + w)
        rows.append(torch.randn(tuple(shape[1:]), generator=gen))
    return torch.stack(rows)


def probe_layer(layer: nn.Module, modules: dict[str, nn.Module], hidden: list[torch.Tensor],
                kwargs: list[dict[str, Any]], batch_size: int, index: int, device: torch.device
                ) -> dict[str, torch.Tensor]:
    """[Σ g², count] per linear (float64) over the probe stream's batches (window b·batch_size onwards) of one
    layer; zeros for every linear with no batch (the ranks other than 0).

    g = J_uᵀ r is taken with `torch.autograd.grad` on the captured outputs: no parameter gradient is
    computed or stored.
    """
    sums = {name: torch.zeros(2, dtype=torch.float64) for name in modules}
    for b in range(len(hidden)):
        outputs: list[tuple[str, torch.Tensor]] = []
        handles = [mod.register_forward_hook(_capture(name, outputs)) for name, mod in modules.items()]
        try:
            with torch.enable_grad():
                x = hidden[b].to(device).detach().requires_grad_(True)
                out = first_output(layer(x, **to_device(kwargs[b], device)))
                z = cotangent(out.shape, b * batch_size, index).to(device=out.device, dtype=out.dtype)
                rms = out.detach().float().pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
                r = z / rms.to(out.dtype)
                live = [(n, y) for n, y in outputs if y.requires_grad]
                if not live:  # a layer with nothing compressible
                    continue
                grads = torch.autograd.grad((out * r).sum(), [y for _, y in live], allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        for (name, _), g in zip(live, grads, strict=True):
            if g is None:
                continue
            s = sums[name]
            s[0] += float(g.double().pow(2).sum())
            s[1] += g.numel()
    return sums


def _capture(name: str, outputs: list[tuple[str, torch.Tensor]]):
    def hook(_module: nn.Module, _args: Any, out: Any) -> None:
        outputs.append((name, first_output(out)))

    return hook


def gain(sums: torch.Tensor) -> float:
    """E g² from one linear's [Σ g², count] (0 if it saw no probe token)."""
    s = sums.double()
    return float(s[0] / s[1]) if s[1] > 0 else 0.0


def unit_gain(members: list[LinearInfo], stats: Any) -> float | None:
    """A unit's gain: its members' gains weighted by their output width (a stacked unit's loss sums theirs);
    None if no probe token reached any of them (an MoE expert the probe windows were never routed to)."""
    seen = [m for m in members if float(stats.local[m.name][1]) > 0]
    if not seen:
        return None
    return sum(gain(stats.local[m.name]) * m.out_features for m in seen) / sum(m.out_features for m in seen)


def attach_gains(units: list[Any], stats: Any) -> None:
    """Each unit's layer-local gain into `unit.extras["local_gain"]`, where the allocator reads it.

    A unit the probe never reached gets the mean gain of the units of its role in its layer (else of its role):
    a gain of 0 would make its truncation look free."""
    gains = [unit_gain(unit.members, stats) for unit in units]
    for unit, value in zip(units, gains, strict=True):
        if value is None:
            layer = unit.members[0].layer
            same = [g for u, g in zip(units, gains, strict=True) if g is not None and u.role == unit.role]
            here = [g for u, g in zip(units, gains, strict=True)
                    if g is not None and u.role == unit.role and u.members[0].layer == layer]
            value = sum(here or same or [0.0]) / max(len(here or same), 1)
            log.info("%s saw no probe token: it takes the mean gain of its role (%.3g)", unit.name, value)
        unit.extras["local_gain"] = value
