"""ARA's mask machinery (arXiv 2510.19389, spec §6.2–6.3): staircase masks over over-complete factors.

Every unit is factorised once at ρ₀ = 1.2 times its dense parameter count (`rank_max` components),
so that a mask can express "better left dense". A unit's mask is a distribution over 101 retention
candidates c = 1.00, 0.99, …, 0.00 (fractions of rank_max). Its soft mask πᵀM is a monotone
staircase (m_soft[j] = P(rank > j)), so every logit receives gradient from the whole spectrum; the
forward uses the hard prefix mask through a straight-through estimator. These pieces are pure
tensors and small modules; the training loop lives in `svdzip.allocate.ara`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from svdzip.methods.linalg import Spectrum

RHO0 = 1.2  # ARA's over-complete base ratio
NUM_CANDIDATES = 101  # c = 1.00 … 0.00 in steps of 0.01


def candidates() -> torch.Tensor:
    """The retention candidates c_i = (100 − i)/100, float32, descending."""
    return torch.arange(NUM_CANDIDATES - 1, -1, -1, dtype=torch.float64).div(NUM_CANDIDATES - 1).float()


def over_complete_rank(rows: int, cols: int, rho0: float = RHO0) -> int:
    """ARA's rank_max = int(m·n·ρ₀/(m+n)): more parameters than the dense matrix when ρ₀ > 1."""
    return int(rows * cols * rho0 / (rows + cols))


def init_logits(target: float) -> torch.Tensor:
    """Logits whose softmax has expected retention cᵀπ = `target` exactly (ARA's initialisation).

    δ on every candidate ≥ t and 0 elsewhere, with e^δ = (S₂ − t·n₂)/(t·n₁ − S₁) (n, S: count and sum
    of the candidates above / below t). Computed in float64 so the float32 logits hit t to ~1e-7.
    """
    c = candidates().double()
    t = float(min(max(target, 0.005), 0.995))  # both sides non-empty, finite δ
    above = c >= t - 1e-12
    n1, s1 = float(above.sum()), float(c[above].sum())
    n2, s2 = float((~above).sum()), float(c[~above].sum())
    delta = math.log((s2 - t * n2) / (t * n1 - s1))
    logits = torch.zeros(NUM_CANDIDATES, dtype=torch.float64)
    logits[above] = delta
    return logits.float()


def staircase(rank_max: int) -> torch.Tensor:
    """M ∈ {0,1}^{101×rank_max}: row i keeps its first int(rank_max·c_i) entries (integer arithmetic)."""
    steps = NUM_CANDIDATES - 1
    lengths = torch.tensor([rank_max * (steps - i) // steps for i in range(NUM_CANDIDATES)])
    return (torch.arange(rank_max)[None, :] < lengths[:, None]).float()


def bonus_table(spectrum: Spectrum, rows: int, cols: int) -> torch.Tensor:
    """bonus(r) = sqrt(tail(k(r)) / energy) for r = 0.01 … 0.99, k(r) = int(m·n·r/(m+n)).

    The normalised whitened truncation error at parameter ratio r: the guidance loss compares it with
    the saving 1 − r to decide whether a module should rather stay dense.
    """
    energy = max(spectrum.energy, 1e-300)
    tail = spectrum.tail_curve()
    out = []
    for step in range(1, NUM_CANDIDATES - 1):
        k = min(int(rows * cols * (step / 100) / (rows + cols)), tail.numel() - 1)
        out.append(math.sqrt(max(float(tail[k]), 0.0) / energy))
    return torch.tensor(out, dtype=torch.float32)


class StaircaseMask(nn.Module):
    """One unit's trainable logits θ ∈ R^101 (fp32) and the mask it induces over rank_max components.

    `refresh()` is called once per training step; every member module of the unit then reads the
    same `current` mask and `dense` branch flag, so a shared basis sees one mask.
    """

    def __init__(self, rank_max: int, target: float, rho0: float = RHO0, sticky_dense: bool = False):
        super().__init__()
        self.rank_max = rank_max
        self.rho0 = rho0
        self.sticky_dense = sticky_dense
        self.logits = nn.Parameter(init_logits(target))
        self.register_buffer("cands", candidates(), persistent=False)
        self.register_buffer("stairs", staircase(rank_max), persistent=False)
        self.current: torch.Tensor | None = None
        self.dense = False

    def retention(self) -> torch.Tensor:
        """r̂ = cᵀ softmax(θ): expected kept fraction of rank_max (differentiable)."""
        return torch.softmax(self.logits, 0) @ self.cands

    def hard_rank(self, r_hat: torch.Tensor | float) -> int:
        return int(round(self.rank_max * float(torch.as_tensor(r_hat).detach())))

    def refresh(self) -> torch.Tensor:
        """Recompute r̂, the branch (dense iff ρ₀·r̂ ≥ 1) and the STE mask; returns r̂."""
        probs = torch.softmax(self.logits, 0)
        r_hat = probs @ self.cands
        dense_now = self.rho0 * float(r_hat.detach()) >= 1.0
        # The reference code's quirk (optional): once dense, a module never returns to low rank.
        self.dense = (self.dense and self.sticky_dense) or dense_now
        if self.dense:
            self.current = None
        else:
            soft = probs @ self.stairs  # monotone non-increasing, P(rank > j)
            hard = (torch.arange(self.rank_max, device=soft.device) < self.hard_rank(r_hat)).to(soft.dtype)
            self.current = hard + (soft - soft.detach())  # straight-through: forward hard, gradient soft
        return r_hat


class MaskedLinear(nn.Module):
    """Training-time stand-in for one linear: `W_u (m ⊙ (W_v x)) + b`, or the dense `W x + b`.

    `left` (out×rank_max) and `right` (rank_max×in, shared within a unit) are frozen buffers; only the
    unit's mask logits train. The dense module is kept as is and restored afterwards.
    """

    def __init__(self, dense: nn.Module, left: torch.Tensor, right: torch.Tensor, mask: StaircaseMask):
        super().__init__()
        self.dense = dense
        self.register_buffer("left", left, persistent=False)
        self.register_buffer("right", right, persistent=False)
        self.mask_ref = [mask]  # a list, so the mask is not registered once per member

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.mask_ref[0]
        if mask.dense or mask.current is None:
            return self.dense(x)
        h = F.linear(x, self.right) * mask.current.to(x.dtype)
        return F.linear(h, self.left, getattr(self.dense, "bias", None))
