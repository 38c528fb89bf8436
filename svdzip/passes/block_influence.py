"""Block influence (ShortGPT; MoDeGPT's allocation signal): how much each decoder layer changes the residual.

s_ℓ = 1 − mean over tokens of cos(x_ℓ, x_ℓ₊₁), with x_ℓ the layer's input and x_ℓ₊₁ its output, both taken by
hooks on the layer itself (not HF's `output_hidden_states`, whose last entry is after the final norm).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from svdzip.models.adapter import ModelAdapter, model_device


def _hidden(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple | list) else value


@torch.no_grad()
def block_influence(model: nn.Module, tokens: torch.Tensor, batch_size: int = 2) -> list[float]:
    """One score per decoder layer from a forward pass over `tokens` (windows × length)."""
    adapter = ModelAdapter(model)
    sums = [0.0] * adapter.num_layers
    counts = [0] * adapter.num_layers
    inputs: dict[int, torch.Tensor] = {}
    handles = []

    def before(index: int):
        def hook(_module, args, kwargs):
            inputs[index] = _hidden(args[0] if args else kwargs["hidden_states"])
        return hook

    def after(index: int):
        def hook(_module, _args, _kwargs, output):
            x, y = inputs.pop(index).float(), _hidden(output).float()
            cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
            sums[index] += float(cos.sum())
            counts[index] += cos.numel()
        return hook

    for index, layer in enumerate(adapter.layers):
        handles.append(layer.register_forward_pre_hook(before(index), with_kwargs=True))
        handles.append(layer.register_forward_hook(after(index), with_kwargs=True))
    device = model_device(model)
    try:
        for start in tqdm(range(0, tokens.shape[0], batch_size), desc="block influence", unit="batch",
                          leave=False):
            model(input_ids=tokens[start : start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [1.0 - s / max(c, 1) for s, c in zip(sums, counts, strict=True)]
