"""MoDeGPT's Type III maths (methods-spec §11.2.3): each KV group's value–output product, truncated whitened.

Per KV head i with query heads j (GQA group), the module's output is Σ_j A_j X W_{V,i} W_{O,j}; with the
attention weights fixed, the error to minimise is Σ_j ‖C^{1/2} W_{V,i}(W_{O,j} − …)‖², C = XᵀX. It is
the best rank-k approximation of the whitened concatenation C^{1/2} W_V [W_{O,1} … W_{O,g}] (the spec's
recommended GQA rule; for g = 1 the paper's MHA formula). Two small SVDs give it without a d×d one:
FᵀW_V = U Σ Vᵀ (F Fᵀ = C), then M = Σ Vᵀ [W_O…] = U' Σ' V'ᵀ. Keeping k:
W_V' = W_V V Σ⁻¹ U'_k (d×k) and W_O' = U'_kᵀ M (k × g·d); the loss is Σ_{t ≥ k} σ'_t².

Layouts here are the paper's (row vectors): W_V is d×d_h, W_{O,j} is d_h×d.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from svdzip.methods.linalg import gram_factor

#: ridge added to C's eigenvalues, relative to their mean (the arena: 1e-4 absolute on a token-averaged C)
VALUE_OUTPUT_RIDGE = 1e-4


@dataclass
class ValueOutputBasis:
    """One group's value–output product in its whitened singular basis, truncatable at any k."""

    value: torch.Tensor  # (d, d_h): W_V V Σ⁻¹ U', its first k columns are W_V'
    output: torch.Tensor  # (d_h, g·d): Σ' V'ᵀ, its first k rows are W_O' (head after head)
    sigma2: torch.Tensor  # (d_h,) σ'², descending


def whitening_factor(gram: torch.Tensor, ridge: float = VALUE_OUTPUT_RIDGE) -> torch.Tensor:
    """F with F Fᵀ = C + λI, λ = ridge · mean eigenvalue (one eigen-decomposition, float64)."""
    gram = gram.double()
    lam = ridge * float(torch.diagonal(gram).mean().clamp_min(1e-300))
    return gram_factor(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))


def value_output_basis(factor: torch.Tensor, w_value: torch.Tensor, w_outputs: torch.Tensor) -> ValueOutputBasis:
    """`w_value` (d, d_h) of one KV head, `w_outputs` (g, d_h, d) of its query heads; `factor` F (d, d)."""
    w_value = w_value.double()
    _, s, vh = torch.linalg.svd(factor.T @ w_value, full_matrices=False)  # (d_h,), (d_h, d_h)
    s = s.clamp_min(s.max() * 1e-12 if s.numel() else 0.0)
    outputs = torch.cat(list(w_outputs.double()), dim=1)  # (d_h, g·d)
    m = s[:, None] * (vh @ outputs)
    u2, s2, vh2 = torch.linalg.svd(m, full_matrices=False)
    value = w_value @ (vh.T / s) @ u2
    return ValueOutputBasis(value=value, output=s2[:, None] * vh2, sigma2=s2.pow(2))
