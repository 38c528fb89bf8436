"""MoDeGPT's Type I maths (methods-spec §11.2.1): an MLP slimmed to k neurons by Nyström, in closed form.

The MLP is f(X) = H(X) W_D with H the activations entering `down_proj` (m neurons). Keeping the
neurons S means H ≈ H_S, and the best `down_proj` for them is the least-squares refit
X_S = argmin ‖H W_D − H_S X‖² = C[S,S]⁻¹ C[S,:] W_D, with C = HᵀH/N the activation correlation.
Which neurons: MoDeGPT's ridge leverage scores τ_i = [C (C + λI)⁻¹]_ii, top k, deterministic.

The leverage order is fixed for every k, so one Cholesky factor of C permuted into that order gives
the whole loss-vs-width curve: with P C Pᵀ = L Lᵀ and G = Lᵀ P W_D, the error of keeping the first k
neurons is Σ_{j ≥ k} ‖G_j‖² (the refit L[:k,:k]⁻ᵀ G[:k] would come from the same factor). That curve
plays the role a spectrum plays for a factorisation: the allocators read it the same way. The refit at
the chosen width is solved from the Gram matrix again, so that no m×m factor per MLP stays in memory.

Pure functions on tensors (float64); `methods.modegpt` builds the units and the modules from them.
"""

from __future__ import annotations

import torch

from svdzip.errors import SvdzipError

#: MoDeGPT's Nyström ridge λ, here relative to the mean diagonal of C (the mean squared activation), so that
#: the selection does not change when the activations are rescaled (the re-implementations use 1e-2 absolute)
LEVERAGE_RIDGE = 1e-2
#: regularisation of the refit's normal equations, relative to the mean diagonal (the arena: 1e-6 absolute)
REFIT_JITTER = 1e-6


def _sym(c: torch.Tensor) -> torch.Tensor:
    c = c.double()
    return 0.5 * (c + c.T)


def scale_of(c: torch.Tensor) -> float:
    """The mean diagonal of C (mean squared activation); 1 for an all-zero C."""
    mean = float(torch.diagonal(c).double().mean())
    return mean if mean > 0 else 1.0


def robust_cholesky(a: torch.Tensor, jitter: float) -> torch.Tensor:
    """Cholesky factor of the SPD matrix `a` + jitter·I, the jitter raised tenfold until it succeeds."""
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(a + jitter * eye)
        if int(info) == 0:
            return factor
        jitter = jitter * 10 if jitter > 0 else 1e-12 * scale_of(a)
    raise SvdzipError("the MLP activation correlation is not positive semi-definite even with a ridge; "
                      "the calibration statistics may be corrupt")


def ridge_leverage_scores(c: torch.Tensor, ridge: float = LEVERAGE_RIDGE) -> torch.Tensor:
    """τ_i = [C (C + λI)⁻¹]_ii = 1 − λ [(C + λI)⁻¹]_ii with λ = ridge · mean(diag C); each in [0, 1)."""
    c = _sym(c)
    lam = ridge * scale_of(c)
    factor = robust_cholesky(c, lam)
    inverse_diag = torch.diagonal(torch.cholesky_inverse(factor))
    return (1.0 - lam * inverse_diag).clamp(0.0, 1.0)


def leverage_order(c: torch.Tensor, ridge: float = LEVERAGE_RIDGE) -> torch.Tensor:
    """Neurons by decreasing ridge leverage (ties by index): the top k are kept at width k."""
    scores = ridge_leverage_scores(c, ridge)
    return torch.sort(-scores, stable=True).indices


def nystrom_curve(c: torch.Tensor, down_weight: torch.Tensor, order: torch.Tensor,
                  jitter: float = REFIT_JITTER) -> torch.Tensor:
    """sigma2[j]: the output error keeping the j-th neuron of `order` removes (refit included), float64.

    `down_weight` is torch's (d, m) `down_proj.weight`. The factor is not kept: `nystrom_refit` solves for the
    width the allocation chose from the Gram matrix again, so no m×m matrix per MLP waits in memory.
    """
    c = _sym(c)
    if down_weight.shape[1] != c.shape[0]:
        raise SvdzipError(f"the down projection reads {down_weight.shape[1]} neurons, the statistics have "
                          f"{c.shape[0]}")
    factor = robust_cholesky(c[order][:, order], jitter * scale_of(c))
    return (factor.T @ down_weight.double().T[order]).pow(2).sum(1)


def nystrom_refit(c: torch.Tensor, down_weight: torch.Tensor, kept: torch.Tensor,
                  jitter: float = REFIT_JITTER) -> torch.Tensor:
    """The least-squares down projection (d, k) for the neurons `kept` (its columns follow them).

    X = W_S + (C + δI)[S,S]⁻¹ C[S,R] W_R: the dropped neurons' contribution, predicted from the kept ones —
    the same solution as the curve's (the ridge δ only on the kept block), so the error is its tail.
    """
    c = _sym(c)
    m = c.shape[0]
    if not 1 <= kept.numel() <= m:
        raise SvdzipError(f"an MLP of {m} neurons cannot keep {kept.numel()}")
    dropped = torch.ones(m, dtype=torch.bool, device=c.device)
    dropped[kept] = False
    w = down_weight.double().T  # (m, d)
    factor = robust_cholesky(c[kept][:, kept], jitter * scale_of(c))
    rows = w[kept] + torch.cholesky_solve(c[kept][:, dropped] @ w[dropped], factor)
    return rows.T.contiguous()
