"""Weight updates after truncation: refit each factorised linear's left factor on deviated inputs.

Truncating every layer against the *original* model's activations lets errors pile up: layer i of
the compressed model sees inputs X' ≠ X. Both updates here walk the decoder layer by layer on the
compressed model's own hidden states (so each layer is fitted to what it will really receive, and
the updated layer feeds the next), keep every right factor B (a shared basis included) fixed, and
refit the left factor A by least squares against the original weight's output on X':

    A = argmin ‖X' Bᵀ Aᵀ − X' Wᵀ‖_F  =  W H Bᵀ (B H Bᵀ)⁻¹,   H = X'ᵀX'   (fp64, a solve, no inverse)

* ``svdllm`` — SVD-LLM's closed-form layer-wise update (methods-spec §3.2, the code's target W X'):
  X' of every sublayer is captured by running the *original* (dense) layer on the deviated hidden
  states, as `SVDLLM.py --step 2` does.
* ``coef`` — Basis Sharing's coefficient update (§4): X' is what the *compressed* layer feeds each
  sublayer; the stages of a layer (q/k/v, o, gate/up, down) are refitted in execution order, so o
  sees the already-refitted q/k/v. With a shared basis every member gets its own coefficients
  from its own layer's H' (the exact least-squares optimum of each member's output error).

A refit is kept only if it lowers the fitted loss tr((W − AB) H (W − AB)ᵀ) — it always does in exact
arithmetic; the check guards round-off on ill-conditioned H. Any allocator composes with either.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from contextlib import suppress
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from svdzip.core.layerwise import (
    capture_layer_inputs,
    first_output,
    forward_pre_hooks,
    layer_on,
    run_layer,
    to_device,
)
from svdzip.core.statistics import Accumulator, CalibrationStats
from svdzip.errors import SvdzipError
from svdzip.methods.decompose import Unit
from svdzip.models.adapter import LinearInfo, ModelAdapter
from svdzip.models.lowrank import LowRankLinear
from svdzip.needs import Needs

log = logging.getLogger(__name__)


class _Captured(Exception):
    """Raised by a capture hook: the rest of the layer's forward is not needed."""


def refit_left(weight: torch.Tensor, right: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """A = W H Bᵀ (B H Bᵀ)⁻¹ in float64 via a Cholesky solve (a relative ridge only if singular)."""
    w, b, h = weight.double(), right.double(), gram.double()
    hb = h @ b.T  # n×k
    lhs = b @ hb  # k×k, B H Bᵀ
    lhs = 0.5 * (lhs + lhs.T)
    rhs = (w @ hb).T  # k×m, (W H Bᵀ)ᵀ
    chol, info = torch.linalg.cholesky_ex(lhs)
    if info != 0:
        ridge = 1e-8 * float(lhs.diagonal().mean().clamp_min(1e-30))
        chol, info = torch.linalg.cholesky_ex(lhs + ridge * torch.eye(lhs.shape[0], dtype=lhs.dtype,
                                                                       device=lhs.device))
        if info != 0:
            return torch.linalg.lstsq(lhs, rhs).solution.T
    return torch.cholesky_solve(rhs, chol).T


def fitted_loss(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, gram: torch.Tensor) -> float:
    """‖X'(W − AB)ᵀ‖_F² = tr(E H Eᵀ), the output error on the data H = X'ᵀX' was built from."""
    e = weight.detach().double() - left.detach().double() @ right.detach().double()
    return float(((e @ gram.double()) * e).sum())


def _gram_hook(stats: CalibrationStats, key: str, stop: bool):
    """Calibration's own Gram accumulator (fp32 product, fp64 sum); `stop` ends the layer's forward there."""
    accumulate = Accumulator(stats, key, ("grams",))

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        accumulate(module, args)
        if stop:
            raise _Captured

    return hook


@torch.no_grad()
def _capture_grams(layer: nn.Module, hooked: dict[str, nn.Module], hidden: list[torch.Tensor],
                   kwargs: list[dict[str, Any]], device: torch.device, stop: bool) -> dict[str, torch.Tensor]:
    """H = X'ᵀX' of the input of each hooked module (one per input key), over every batch."""
    stats = CalibrationStats()
    with forward_pre_hooks({m: _gram_hook(stats, key, stop) for key, m in hooked.items()}):
        for h, kw in zip(hidden, kwargs, strict=True):
            with suppress(_Captured):
                first_output(layer(h.to(device), **to_device(kw, device)))
    return stats.grams


def _refit(info: LinearInfo, module: LowRankLinear, weight: torch.Tensor, gram: torch.Tensor | None,
           report: dict[str, tuple[float, float]]) -> None:
    if gram is None:  # an MoE expert the router sent no update token to: nothing to fit on
        log.info("%s received no tokens in the update pass; its factors are kept", info.name)
        return
    w = weight.detach().to(gram.device)
    left, right = module.left.weight.detach().to(gram.device), module.right.weight.detach().to(gram.device)
    before = fitted_loss(w, left, right, gram)
    new = refit_left(w, right, gram)
    after = fitted_loss(w, new, right, gram)
    if after <= before:
        module.left.weight.data.copy_(new.to(module.left.weight))
    else:  # only round-off on a singular H can get here
        after = before
    report[info.name] = (before, after)


def _stages(infos: list[LinearInfo]) -> list[list[LinearInfo]]:
    """The layer's linears grouped by shared input, in execution order (q/k/v, o, gate/up, down)."""
    order: dict[str, list[LinearInfo]] = {}
    for info in infos:
        order.setdefault(info.input_key, []).append(info)
    return list(order.values())


class WeightUpdate(ABC):
    """A refit of the left factors after truncation; it re-runs the model's layers on calibration tokens."""

    name: str = ""
    summary: str = ""

    def needs(self) -> Needs:
        return Needs(calib_tokens=True, whole_model=True,
                     why=(f"the '{self.name}' update re-runs every layer of the compressed model on the "
                          "calibration tokens",))

    @abstractmethod
    def refit_layer(self, layer: nn.Module, infos: list[LinearInfo], adapter: ModelAdapter,
                    originals: dict[str, nn.Module], hidden: list[torch.Tensor], kwargs: list[dict[str, Any]],
                    device: torch.device, report: dict[str, tuple[float, float]]) -> None:
        """Refit the factorised linears `infos` of one layer on its deviated inputs `hidden`."""


class SVDLLMUpdate(WeightUpdate):
    name = "svdllm"
    summary = "SVD-LLM's closed-form layer-wise update: X' from the original layer on the deviated inputs"

    def refit_layer(self, layer, infos, adapter, originals, hidden, kwargs, device, report) -> None:
        # X' from the ORIGINAL layer on the deviated inputs (SVD-LLM's code): swap the dense
        # linears back in (on the layer's device) for one capture pass
        low_rank = {info.name: adapter.module(info.name) for info in infos}
        homes = {info.name: originals[info.name].weight.device for info in infos}
        for info in infos:
            adapter.set_module(info.name, originals[info.name].to(device))
        try:
            hooked = {s[0].input_key: originals[s[0].name] for s in _stages(infos)}
            grams = _capture_grams(layer, hooked, hidden, kwargs, device, stop=False)
        finally:
            for info in infos:
                adapter.set_module(info.name, low_rank[info.name])
                originals[info.name].to(homes[info.name])
        for info in infos:
            _refit(info, low_rank[info.name], originals[info.name].weight, grams.get(info.input_key), report)


class CoefficientUpdate(WeightUpdate):
    name = "coef"
    summary = "Basis Sharing's coefficient update: X' from the compressed layer, stage by stage"

    def refit_layer(self, layer, infos, adapter, originals, hidden, kwargs, device, report) -> None:
        for stage in _stages(infos):
            hooked = {stage[0].input_key: adapter.module(stage[0].name)}
            grams = _capture_grams(layer, hooked, hidden, kwargs, device, stop=True)
            for info in stage:
                _refit(info, adapter.module(info.name), originals[info.name].weight, grams.get(info.input_key),
                       report)


REGISTRY: Mapping[str, WeightUpdate] = MappingProxyType({u.name: u for u in (SVDLLMUpdate(), CoefficientUpdate())})


def available_updates() -> list[str]:
    return list(REGISTRY)


def get_update(name: str) -> WeightUpdate:
    """The update called `name`; a clear error listing the choices."""
    update = REGISTRY.get(name)
    if update is None:
        choices = ", ".join(f"{u.name} ({u.summary})" for u in REGISTRY.values())
        raise SvdzipError(f"unknown update '{name}'; choose from: {choices}")
    return update


def apply_update(
    name: str,
    model: nn.Module,
    adapter: ModelAdapter,
    units: list[Unit],
    ranks: list[int | None],
    calib_tokens: torch.Tensor,
    config: Any,
    stats: Any = None,
    originals: dict[str, nn.Module] | None = None,
) -> dict[str, tuple[float, float]]:
    """Refit the left factors layer by layer; returns {linear: (fitted loss before, after)}.

    `originals` maps each factorised linear's name to its dense module from before materialisation
    (the target W X' needs W; `compress()` passes them).
    """
    update = get_update(name)
    if originals is None:
        raise SvdzipError("the update needs the dense linears from before materialisation (originals=...)")
    factorised = {m.name for u, r in zip(units, ranks, strict=True) if r is not None for m in u.members}
    missing = [n for n in factorised if n not in originals]
    if missing:
        raise SvdzipError(f"no original weight for {missing[0]}")
    samples = getattr(config, "update_samples", 0) or calib_tokens.shape[0]
    tokens = calib_tokens[:samples]
    device = torch.device(getattr(config, "device", "cpu"))
    batch_size = getattr(config, "calib_batch_size", 8)
    inputs = capture_layer_inputs(model, adapter, tokens, batch_size, device)
    hidden = inputs.hidden
    report: dict[str, tuple[float, float]] = {}
    for index in tqdm(range(adapter.num_layers), desc=f"{update.name} update", unit="layer"):
        kwargs = inputs.kwargs[index]
        infos = [i for i in adapter.layer_linears(index) if i.name in factorised]
        with layer_on(adapter.layers[index], device) as layer:
            if infos:
                update.refit_layer(layer, infos, adapter, originals, hidden, kwargs, device, report)
            hidden = run_layer(layer, hidden, kwargs, device)
    if report:
        before = sum(b for b, _ in report.values())
        after = sum(a for _, a in report.values())
        log.info("%s update refitted %d linears on %d tokens: fitted output error %.4g → %.4g (%.1f%%)",
                 update.name, len(report), tokens.numel(), before, after, 100 * (after / before - 1) if before else 0)
    return report

