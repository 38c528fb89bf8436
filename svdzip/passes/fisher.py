"""FWSVD's Fisher information per input channel, from squared gradients of the LM loss.

As ASVD's `calib_fisher_info` (methods-spec §2.2): for every calibration batch, the gradient of the
batch's mean next-token cross-entropy w.r.t. each compressible weight W (m×n) is squared and
averaged over its rows, giving one value per input channel; the values are averaged over batches.
The result is the diagonal metric G = s² of the weighted SVD (`s_c = sqrt(F_c)`, exponent 1).

Memory: the backward runs layer by layer, like calibration. The inputs of every decoder layer are
recorded without grad (one batch at a time), the loss's gradient w.r.t. the final hidden state is
taken one sequence at a time (the T×vocab logits of a whole batch never exist together), then each
layer is recomputed with grad and back-propagated on its own — layer-granular gradient
checkpointing that keeps one layer's activations and only the compressible weights' gradients
(each reduced to an n-vector by a hook the moment it is accumulated, then freed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from svdzip.core.layerwise import capture_layer_inputs, first_output, layer_on, non_layers_on, to_device
from svdzip.core.precision import autocast_for
from svdzip.errors import SvdzipError
from svdzip.models.adapter import ModelAdapter

log = logging.getLogger(__name__)


@contextmanager
def _layers_replaced(adapter: ModelAdapter, final: torch.Tensor):
    """Every decoder layer passes its input through, except the last, which returns `final`.

    Running the model then computes only embeddings (discarded), final norm and head on `final`,
    for any family, without knowing where its norm or head live.
    """
    n = adapter.num_layers

    def make(index: int) -> Callable[..., torch.Tensor]:
        def fake(*args: Any, **kw: Any) -> torch.Tensor:
            h = args[0] if args else kw["hidden_states"]
            return final if index == n - 1 else h

        return fake

    for i, layer in enumerate(adapter.layers):
        layer.forward = make(i)
    try:
        yield
    finally:
        for layer in adapter.layers:
            del layer.forward


def logits_from_final_hidden(model: nn.Module, adapter: ModelAdapter, input_ids: torch.Tensor,
                             final: torch.Tensor) -> torch.Tensor:
    """The model's logits for `input_ids` given the last decoder layer's output `final` (grad flows)."""
    with _layers_replaced(adapter, final):
        return model(input_ids=input_ids, use_cache=False).logits


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of a batch (the HF `labels=input_ids` loss times its count)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           input_ids[:, 1:].reshape(-1), reduction="sum")


def _grad_at_final(model: nn.Module, adapter: ModelAdapter, input_ids: torch.Tensor,
                   final: torch.Tensor, count: int) -> torch.Tensor:
    """d(mean batch loss)/d(final hidden), one sequence at a time to bound the logits' memory."""
    grads = []
    for j in range(final.shape[0]):
        leaf = final[j : j + 1].detach().requires_grad_(True)
        logits = logits_from_final_hidden(model, adapter, input_ids[j : j + 1], leaf)
        loss = next_token_nll(logits, input_ids[j : j + 1]) / count
        (g,) = torch.autograd.grad(loss, leaf)
        grads.append(g)
    return torch.cat(grads)


def collect_fisher(
    model: nn.Module,
    calib_tokens: torch.Tensor,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    offload: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Per compressible linear (by module name): mean over batches of mean_rows((∂L/∂W)²), float64 (n,).

    `dtype`: the matmuls' precision (`core.precision`); the gradients reach the float32 weights as float32."""
    if calib_tokens.ndim != 2 or calib_tokens.shape[0] == 0 or calib_tokens.shape[1] < 2:
        raise SvdzipError("Fisher information needs a [samples, seq_len ≥ 2] token tensor")
    adapter = ModelAdapter(model)
    device = torch.device(device)
    infos = adapter.linears()
    weights = {info.name: adapter.module(info.name).weight for info in infos}
    fisher = {name: torch.zeros(w.shape[1], dtype=torch.float64) for name, w in weights.items()}

    def reducer(name: str) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            fisher[name] += param.grad.detach().double().pow(2).mean(0).cpu()
            param.grad = None  # reduced to n values; the m×n gradient is freed at once

        return hook

    was_training = model.training
    requires = {p: p.requires_grad for p in model.parameters()}
    handles = []
    try:
        model.eval()  # no dropout: the gradient of the deterministic loss
        for p in model.parameters():
            p.requires_grad_(False)
        for name, w in weights.items():
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(reducer(name)))
        inputs = capture_layer_inputs(model, adapter, calib_tokens, batch_size, device, offload)
        n_batches = len(inputs.hidden)
        with non_layers_on(model, adapter, device), autocast_for(device, dtype):
            for b in tqdm(range(n_batches), desc="Fisher (layer-wise backward)", unit="batch"):
                ids = calib_tokens[b * batch_size : (b + 1) * batch_size].to(device)
                count = ids.shape[0] * (ids.shape[1] - 1)
                # forward without grad, keeping every layer's input of this batch
                layer_in: list[torch.Tensor] = []
                h = inputs.hidden[b]
                with torch.no_grad():
                    for i, layer in enumerate(adapter.layers):
                        layer_in.append(h)
                        with layer_on(layer, device):
                            h = first_output(layer(h.to(device), **to_device(inputs.kwargs[i][b], device))).to(offload)
                grad = _grad_at_final(model, adapter, ids, h.to(device), count)
                # backward, one layer at a time (recomputed with grad)
                for i in reversed(range(adapter.num_layers)):
                    layer = adapter.layers[i]
                    with layer_on(layer, device), torch.enable_grad():
                        x = layer_in[i].to(device).requires_grad_(True)
                        out = first_output(layer(x, **to_device(inputs.kwargs[i][b], device)))
                        out.backward(grad)
                        grad = x.grad
                    layer_in[i] = None  # type: ignore[call-overload]
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in requires.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    for name in fisher:
        fisher[name] /= max(n_batches, 1)
        if not torch.isfinite(fisher[name]).all():
            raise SvdzipError(f"Fisher information of {name} is not finite (the loss overflowed)")
    log.info("Fisher information of %d linears from %d tokens in %d batches", len(fisher),
             calib_tokens.numel(), n_batches)
    return fisher


__all__ = ["collect_fisher", "logits_from_final_hidden", "next_token_nll"]
