"""The low-rank replacement for `nn.Linear`: `W ≈ A·B`, run as two matmuls, bias kept.

`right` (n→k, weight B) may be shared by several `LowRankLinear`s: that is Basis Sharing's shared
basis, stored once.
"""

from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """y = A (B x) + b, with A = `left.weight` (out×rank) and B = `right.weight` (rank×in)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        shared_right: nn.Linear | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        if shared_right is not None:
            if shared_right.in_features != in_features or shared_right.out_features != rank:
                raise ValueError("shared basis has the wrong shape")
            self.right = shared_right
        else:
            self.right = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.left = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dense equivalent A·B (for inspection; the forward never builds it)."""
        return self.left.weight @ self.right.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.left.bias

    @classmethod
    def from_factors(
        cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None
    ) -> LowRankLinear:
        """Build from A (out×k) and B (k×in); dtype and device follow A."""
        module = cls(b.shape[1], a.shape[0], a.shape[1], bias=bias is not None, device=a.device, dtype=a.dtype)
        with torch.no_grad():
            module.left.weight.copy_(a)
            module.right.weight.copy_(b.to(a))
            if bias is not None:
                module.left.bias.copy_(bias.to(a))
        return module

    def share_basis_of(self, leader_name: str) -> None:
        """Declare `right.weight` an alias of the leader's, so transformers saves the basis once
        and does not re-initialise the alias on load."""
        self._tied_weights_keys = {"right.weight": f"{leader_name}.right.weight"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.left(self.right(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
