"""The shared maths of every factorisation: data-weighted truncation of a matrix.

Every method in svdzip truncates `W` (m×n, rows = outputs) under a metric `G` on its inputs:

    min_{rank W' ≤ k} ‖(W − W') G^{1/2}‖_F²

* plain SVD: G = I;  ASVD: G = diag(mean|x|^{2α});  FWSVD: G = diag(Fisher);
* SVD-LLM truncation-aware whitening: G = XᵀX (the Gram matrix of the layer's inputs).

The optimum is `W' = U_k U_kᵀ W`, where `U_k` are the top-k left singular vectors of `D = W G^{1/2}`,
and its loss is the sum of the dropped `σ_i(D)²` (for G = XᵀX that is exactly ‖X Wᵀ − X W'ᵀ‖_F²).
This route needs no Cholesky factor and no inverse, so it cannot fail on a singular or badly
conditioned Gram matrix — the classic failure of the reference code. It equals SVD-LLM's
`svd(W L)`, `L⁻¹` construction wherever that one succeeds.

The same function serves Basis Sharing: stacking the weights of several layers vertically makes the
right factor `U_kᵀ W` a basis shared by all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Spectrum:
    """Data-weighted spectrum of one matrix (or a vertical stack of matrices).

    `sigma2[i]` is σ_i(W G^{1/2})², descending; `basis[:, :k]` spans the optimal rank-k output space.
    `basis` may hold fewer columns than `sigma2` has entries (only what any allocation can use).
    """

    sigma2: torch.Tensor  # (r,) float64, descending, ≥ 0
    basis: torch.Tensor  # (m, r_kept) float32

    @property
    def energy(self) -> float:
        return float(self.sigma2.sum())

    def tail(self, k: int) -> float:
        """Data-weighted loss ‖(W − W_k) G^{1/2}‖_F² of truncating to rank k."""
        return float(self.sigma2[k:].sum())

    def tail_curve(self) -> torch.Tensor:
        """tail(k) for k = 0..r, as one float64 tensor of length r + 1."""
        rev = torch.flip(self.sigma2, dims=[0]).cumsum(0)
        return torch.cat([torch.flip(rev, dims=[0]), rev.new_zeros(1)])


def gram_factor(gram: torch.Tensor) -> torch.Tensor:
    """A factor F with F Fᵀ = G (float64, from one eigen-decomposition; never a Cholesky)."""
    evals, evecs = torch.linalg.eigh(_sym(gram))
    return evecs * evals.clamp_min(0).sqrt()


def _sym(a: torch.Tensor) -> torch.Tensor:
    a = a.double()
    return 0.5 * (a + a.T)


def _top_eigen(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    evals, evecs = torch.linalg.eigh(_sym(c))
    order = torch.argsort(evals, descending=True)
    return evals[order].clamp_min(0), evecs[:, order]


def weighted_spectrum(
    weight: torch.Tensor,
    metric: torch.Tensor | None,
    max_rank: int | None = None,
    factor: torch.Tensor | None = None,
) -> Spectrum:
    """Spectrum of `W` under a metric G, via the eigen-problem of the smaller side (float64).

    `metric` is the full G (n×n), its diagonal (n,), or None for the identity. A wide or square
    matrix (m ≤ n) needs only `W G Wᵀ` (m×m); a tall one needs a factor F F ᵀ = G (pass `factor`
    to reuse one across matrices that share an input).
    """
    w = weight.double()
    m, n = w.shape
    r = min(m, n)
    keep = r if max_rank is None else max(0, min(r, max_rank))
    if m <= n:
        if metric is None:
            c = w @ w.T
        elif metric.ndim == 1:
            c = (w * metric.double().clamp_min(0)) @ w.T
        else:
            c = w @ metric.double() @ w.T
        sigma2, evecs = _top_eigen(c)
        basis = evecs[:, :keep]
    else:
        if metric is None:
            d = w
        elif metric.ndim == 1:
            d = w * metric.double().clamp_min(0).sqrt()
        else:
            d = w @ (factor.double() if factor is not None else gram_factor(metric))
        sigma2, evecs = _top_eigen(d.T @ d)
        # left singular vectors U = D V / σ; a QR keeps every prefix's span and orthonormality
        # even where σ is (numerically) zero.
        basis = torch.linalg.qr(d @ evecs[:, :keep]).Q if keep else d.new_zeros(m, 0)
    return Spectrum(sigma2=sigma2[:r].contiguous(), basis=basis.float().contiguous())


def truncate(weight: torch.Tensor, basis: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors `(A, B)` with `A @ B = U_k U_kᵀ W`, A: m×k, B: k×n, norms balanced between them.

    Balancing (each component's scale split evenly) keeps both factors in a range that
    half-precision storage represents well.
    """
    if rank > basis.shape[1]:
        raise ValueError(f"rank {rank} exceeds the {basis.shape[1]} stored basis vectors")
    u = basis[:, :rank].double()
    b = u.T @ weight.double()
    scale = b.norm(dim=1).clamp_min(1e-30).sqrt()
    a = u * scale
    b = b / scale[:, None]
    return a.to(weight.dtype), b.to(weight.dtype)


def data_loss(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor | None) -> float:
    """‖(W − W') G^{1/2}‖_F² = tr((W − W') G (W − W')ᵀ) computed directly (a brute-force check)."""
    e = (weight.double() - approx.double())
    if gram is None:
        return float((e * e).sum())
    if gram.ndim == 1:
        return float((e * e * gram.double()).sum())
    return float(torch.einsum("ij,jk,ik->", e, gram.double(), e))


def effective_rank(sigma2: torch.Tensor) -> float:
    """Roy & Vetterli effective rank exp(H(p)), p_i = σ_i² / Σσ² — D-Rank's information density."""
    s = sigma2.double().clamp_min(0)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    return float(torch.exp(-(p * torch.log(p + 1e-12)).sum()))
