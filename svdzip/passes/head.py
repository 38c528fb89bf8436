"""The untied output head as one more matrix for the byte planner: its input Gram and its spectrum.

On a model whose lm_head is not tied to the input embedding, the head is a large matrix the decoder
calibration never sees (Qwen2.5-0.5B: 136 M parameters, a fifth of the model's bf16 bytes). Under a memory
budget it competes like any decoder linear — low bits, a compensation, factors, or dense — so it needs the same
two things: the Gram matrix of its input (the final norm's output) and its weighted spectrum. One forward pass
over a few calibration windows gives the Gram; it is rescaled to the token count of the decoder's Grams, so
that every matrix's loss is on the same scale. A tied head is the embedding and stays as it is.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from svdzip.core.statistics import CalibrationStats
from svdzip.methods.decompose import BASIS_HEADROOM, Unit
from svdzip.methods.linalg import weighted_spectrum
from svdzip.models.adapter import LinearInfo, ModelAdapter

HEAD = "lm_head"
HEAD_SAMPLES = 8  # calibration windows whose final hidden states give the head's Gram


def untied_head(model: nn.Module) -> nn.Linear | None:
    """The output head when it is an `nn.Linear` of its own (not the input embedding's weight)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(head, nn.Linear) or embed is None or head.weight is embed.weight:
        return None
    if head is not getattr(model, HEAD, None):
        return None  # a head under another name: not planned
    return head


@torch.no_grad()
def head_gram(model: nn.Module, head: nn.Linear, tokens: torch.Tensor, samples: int = HEAD_SAMPLES) -> torch.Tensor:
    """Σ x xᵀ of the head's inputs over the first `samples` calibration windows (float64)."""
    gram = torch.zeros(head.in_features, head.in_features, dtype=torch.float64, device=head.weight.device)

    def hook(_mod: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
        gram.add_(x.T @ x)

    handle = head.register_forward_pre_hook(hook)
    try:
        for row in tokens[:samples]:
            model(input_ids=row[None].to(head.weight.device), use_cache=False)
    finally:
        handle.remove()
    return gram


def head_unit(model: nn.Module, adapter: ModelAdapter, tokens: torch.Tensor | None, stats: CalibrationStats | None,
              device: Any = "cpu") -> Unit | None:
    """The untied head as a unit, its input Gram in `extras["gram"]` (the statistics are not touched: they may
    be read-only, on disk), or None."""
    head = untied_head(model)
    if head is None or tokens is None or stats is None:
        return None
    windows = min(HEAD_SAMPLES, tokens.shape[0])
    gram = head_gram(model, head, tokens, windows)
    gram = (gram * (stats.tokens / (windows * tokens.shape[1]) if stats.tokens else 1.0)).cpu()
    rows, cols = head.weight.shape
    info = LinearInfo(name=HEAD, layer=adapter.num_layers, role="head", input_key=HEAD, out_features=rows,
                      in_features=cols)
    spectrum = weighted_spectrum(head.weight.detach().to(device), gram.to(device),
                                 max_rank=math.ceil(BASIS_HEADROOM * rows * cols / (rows + cols)))
    return Unit(members=[info], spectrum=type(spectrum)(spectrum.sigma2.cpu(), spectrum.basis.cpu()),
                extras={"gram": gram})
