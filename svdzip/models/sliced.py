"""Linears that keep a subset of their outputs or inputs (MoDeGPT's attention modules), at the original shapes.

MoDeGPT's key–query and value–output modules give every head fewer dimensions. Instead of a copied
attention with per-layer head sizes, the kept dimensions stay at their places inside the original
head: `RowSubsetLinear` computes only the kept outputs of q/k/v and leaves zeros in the others, and
`ColumnSubsetLinear` reads only the kept inputs of o_proj. A zero query/key dimension adds nothing
to a score, and RoPE rotates a pair of zeros into zeros, so the stock attention (its softmax scale
1/√d_h included, as the maths asks) computes exactly what a slimmed attention would, and every
transformers release and family keeps working. The weights stored are the kept rows/columns only,
with the index list as a buffer inside the safetensors file; what is not saved is the KV cache, which
keeps the full head size. A bias is stored at the full output width, zero where no row is kept (a handful
of values), so that a serving engine's own bias loading takes it as it is. A slimmed MLP's linears are
`SlimLinear`s: plain linears of fewer neurons.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class SlimLinear(nn.Linear):
    """An `nn.Linear` of a slimmed MLP (fewer neurons): the same module, marked as what healing may train."""


class _SubsetLinear(nn.Module):
    """A linear that stores `kept` rows (outputs) or columns (inputs) and the index list that places them."""

    def __init__(self, in_features: int, out_features: int, kept: int, weight_shape: tuple[int, int], bias: bool,
                 device: torch.device | str | None, dtype: torch.dtype | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(*weight_shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.register_buffer("index", torch.zeros(kept, dtype=torch.int64, device=device))

    @classmethod
    def holding(cls, weight: torch.Tensor, bias: torch.Tensor | None, full: int, index: torch.Tensor):
        """The module with these kept weights (and the kept rows' bias), placed at `index` of its `full`-wide side."""
        kept = index.numel()
        shape = (full, weight.shape[1]) if cls is RowSubsetLinear else (weight.shape[0], full)
        module = cls(shape[1], shape[0], kept, bias is not None, weight.device, weight.dtype)
        with torch.no_grad():
            module.weight.copy_(weight)
            module.index.copy_(index)
            if bias is not None and cls is RowSubsetLinear:  # at the full width, zero where no row is kept
                module.bias.zero_().index_copy_(0, index, bias)
            elif bias is not None:
                module.bias.copy_(bias)
        return module


class RowSubsetLinear(_SubsetLinear):
    """y[..., index] = W x, 0 elsewhere, plus b: an `out_features`-wide output that computes `len(index)` rows."""

    def __init__(self, in_features: int, out_features: int, kept: int, bias: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, kept, (kept, in_features), bias, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        out = y.new_zeros(*y.shape[:-1], self.out_features).index_copy_(-1, self.index, y)
        return out if self.bias is None else out + self.bias


class ColumnSubsetLinear(_SubsetLinear):
    """y = W x[..., index] + b: an `in_features`-wide input of which `len(index)` entries are read."""

    def __init__(self, in_features: int, out_features: int, kept: int, bias: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, kept, (out_features, kept), bias, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.index_select(-1, self.index), self.weight, self.bias)


def row_subset(weight: torch.Tensor, bias: torch.Tensor | None, out_features: int, index: torch.Tensor
               ) -> RowSubsetLinear:
    """A `RowSubsetLinear` holding `weight` (kept × in) for the outputs `index`."""
    return RowSubsetLinear.holding(weight, bias, out_features, index)


def column_subset(weight: torch.Tensor, bias: torch.Tensor | None, in_features: int, index: torch.Tensor
                  ) -> ColumnSubsetLinear:
    """A `ColumnSubsetLinear` holding `weight` (out × kept) for the inputs `index`."""
    return ColumnSubsetLinear.holding(weight, bias, in_features, index)


#: the modules a slimmed (MoDeGPT) model is built of: what healing trains besides low-rank factors
SLIMMED = (SlimLinear, RowSubsetLinear, ColumnSubsetLinear)


def slimmed_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every slimmed linear of `model`, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SLIMMED)}
