"""Where a parameter of the model svdzip compresses lives in a checkpoint on disk (for readers by name).

A streamed run loads tensors by name from safetensors, but a module's name is not always its tensor's
name: transformers 5 renames some checkpoints' keys on load (Mixtral's `block_sparse_moe.` is
`mlp.`), and svdzip opens fused experts into per-expert linears, whose weights a checkpoint stores
either per expert (the original format, which `save_pretrained` writes back) or fused, as 3-D
tensors (`experts.gate_up_proj`, `experts.down_proj`); GPT-2's Conv1D weights are stored transposed.
`CheckpointNames.sources` lists the places to look, most likely first; `take` cuts an expert's matrix
out of a fused tensor (or transposes a Conv1D weight).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from svdzip.models.adapter import family_of


@dataclass(frozen=True)
class TensorSource:
    """A checkpoint tensor, and for a fused experts tensor which expert (and which half: gate 0, up 1)."""

    key: str
    expert: int | None = None
    half: int | None = None
    transpose: bool = False  # a Conv1D weight (in×out) read into the nn.Linear svdzip opened it into

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.transpose:
            return tensor.T.contiguous()
        if self.expert is None:
            return tensor
        matrix = tensor[self.expert]
        return matrix if self.half is None else matrix.chunk(2, dim=0)[self.half]


class CheckpointNames:
    """The checkpoint names of a model's parameters, from transformers' conversion mapping and the family table."""

    def __init__(self, model: nn.Module):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        conversions = get_model_conversion_mapping(model, add_legacy=False)
        self._renamings = [c.reverse_transform() for c in conversions[::-1] if isinstance(c, WeightRenaming)]
        _, spec = family_of(model)
        self._model = model
        self._conv1d_prefix = f"{spec.layers_path}." if spec is not None and spec.conv1d else None
        self._expert = None
        if spec is not None and spec.experts is not None:
            e = spec.experts
            names = "|".join(re.escape(n) for n in (e.gate, e.up, e.down))
            self._expert = (re.compile(rf"^(.*\.{re.escape(e.path)})\.(\d+)\.({names})\.weight$"), e)

    def original(self, name: str) -> str:
        """The name the checkpoint's own format gives `name` (what `save_pretrained` writes)."""
        from transformers.core_model_loading import apply_renamings

        return apply_renamings(name, self._renamings) if self._renamings else name

    def sources(self, name: str) -> list[TensorSource]:
        """Where to look for parameter `name`, most likely first."""
        if self._conv1d_prefix and name.startswith(self._conv1d_prefix) and name.endswith(".weight"):
            owner = self._model.get_submodule(name.removesuffix(".weight"))
            if isinstance(owner, nn.Linear):  # in a Conv1D family every linear of a layer was a Conv1D
                return [TensorSource(self.original(name), transpose=True)]
        found = [TensorSource(self.original(name))]
        if found[0].key != name:
            found.append(TensorSource(name))
        if self._expert is not None:
            pattern, names = self._expert
            match = pattern.match(name)
            if match:
                block, index, which = match.group(1), int(match.group(2)), match.group(3)
                if which == names.down:
                    found.append(TensorSource(f"{block}.down_proj", index))
                else:
                    found.append(TensorSource(f"{block}.gate_up_proj", index, 0 if which == names.gate else 1))
        return found
