"""SVD first, then the factors quantized: the loss of every prefix rank of a quantized factor pair at once.

The third order of low rank and low bits (methods-spec §12): truncate W to rank k in SVD-LLM's metric, W ≈ L R,
then store L and R at b bits. Pricing it for the byte planner needs its output error at every rank k:

    loss(k) = ‖(W − L̂[:, :k] R̂[:k]) G^{1/2}‖_F²
            = tr(W G Wᵀ) − 2 Σ_{j<k} ⟨W G R̂_jᵀ, L̂_j⟩ + Σ_{i,j<k} (L̂ᵀL̂)_{ij} (R̂ G R̂ᵀ)_{ij},

so one quantization of the widest pair and two k×k matrices give every prefix (a cumulative sum and the
leading blocks of a 2-D cumulative sum). Quantizing the widest factors once and reading their prefixes is exact
where the quantizer treats each group of weights on its own (HQQ does, up to its optimiser's global stopping
test); the stored factors are quantized at the chosen rank.
"""

from __future__ import annotations

import torch


def prefix_losses(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, gram: torch.Tensor,
                  weighted: torch.Tensor | None = None) -> torch.Tensor:
    """‖(W − L[:, :k] R[:k]) G^{1/2}‖_F² for k = 0 … K (float64, length K + 1); L: m×K, R: K×n, G: n×n.

    `weighted` may pass W G (the same for every bit width of one matrix) to save its product.
    """
    wg = (weight.float() @ gram.float()) if weighted is None else weighted
    energy = (wg.double() * weight.double()).sum()
    lf, rf = left.float(), right.float()
    cross = ((wg @ rf.T).double() * lf.double()).sum(0)  # ⟨W G R_jᵀ, L_j⟩ per component j
    quad = (lf.T @ lf).double() * (rf @ gram.float() @ rf.T).double()
    blocks = torch.diagonal(quad.cumsum(0).cumsum(1))  # sum of the leading k×k block, k = 1 … K
    zero = energy.new_zeros(1)
    losses = energy - 2 * torch.cat([zero, cross.cumsum(0)]) + torch.cat([zero, blocks])
    return losses.clamp_min(0)
