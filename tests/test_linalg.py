"""The maths against brute force on small matrices."""

import pytest
import torch

from svdzip.methods.linalg import data_loss, effective_rank, gram_factor, truncate, weighted_spectrum


def _problem(m=12, n=9, tokens=40, seed=0, rank_deficient=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) * torch.logspace(0, 2, n, dtype=torch.float64)
    if rank_deficient:
        x[:, -3:] = x[:, :3]  # duplicated channels: XᵀX is singular
    return w, x


@pytest.mark.parametrize("shape", [(12, 9), (9, 12), (10, 10)])
@pytest.mark.parametrize("k", [1, 4, 8])
def test_loss_equals_dropped_whitened_energy(shape, k):
    w, x = _problem(*shape)
    gram = x.T @ x
    spec = weighted_spectrum(w, gram)
    a, b = truncate(w, spec.basis, k)
    approx = a.double() @ b.double()
    direct = float(((x @ w.T - x @ approx.T) ** 2).sum())
    assert direct == pytest.approx(spec.tail(k), rel=1e-8)
    assert data_loss(w, approx, gram) == pytest.approx(direct, rel=1e-8)


def test_matches_cholesky_route_when_it_succeeds():
    """SVD-LLM: svd(W L), W_u = U_k Σ_k, W_v = V_kᵀ L⁻¹ gives the same W' and singular values."""
    w, x = _problem(10, 8, tokens=60)
    gram = x.T @ x
    chol = torch.linalg.cholesky(gram)
    u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
    k = 5
    ref = (u[:, :k] * s[:k]) @ torch.linalg.solve_triangular(chol, vh[:k], upper=False, left=False)
    spec = weighted_spectrum(w, gram)
    a, b = truncate(w, spec.basis, k)
    assert torch.allclose(a.double() @ b.double(), ref, atol=1e-8)
    assert torch.allclose(spec.sigma2, s**2, rtol=1e-8)


def test_rank_deficient_gram_never_fails():
    w, x = _problem(12, 9, rank_deficient=True)
    gram = x.T @ x
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(gram - 1e-9 * torch.eye(9, dtype=torch.float64))
    spec = weighted_spectrum(w, gram)
    for k in range(0, 10):
        a, b = truncate(w, spec.basis, k)
        approx = a.double() @ b.double()
        assert torch.isfinite(approx).all()
        assert data_loss(w, approx, gram) == pytest.approx(spec.tail(k), rel=1e-6, abs=1e-6 * spec.energy)
    assert spec.tail(6) == pytest.approx(0.0, abs=1e-8 * spec.energy)  # rank of XᵀX is 6


def test_optimal_against_random_rank_k():
    w, x = _problem(8, 6)
    gram = x.T @ x
    spec = weighted_spectrum(w, gram)
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        rand = torch.randn(8, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 6, generator=g, dtype=torch.float64)
        assert data_loss(w, rand, gram) >= spec.tail(3) - 1e-9


def test_diagonal_and_identity_metrics():
    w, x = _problem(7, 5)
    d = x.abs().mean(0) ** 2
    spec = weighted_spectrum(w, d)
    a, b = truncate(w, spec.basis, 2)
    assert data_loss(w, a.double() @ b.double(), d) == pytest.approx(spec.tail(2), rel=1e-8)
    plain = weighted_spectrum(w, None)
    assert torch.allclose(plain.sigma2.sqrt(), torch.linalg.svdvals(w), rtol=1e-8)


def test_tail_curve_and_effective_rank():
    w, x = _problem()
    spec = weighted_spectrum(w, x.T @ x)
    curve = spec.tail_curve()
    assert all(curve[k] == pytest.approx(spec.tail(k)) for k in range(len(spec.sigma2) + 1))
    assert effective_rank(torch.ones(5, dtype=torch.float64)) == pytest.approx(5.0, rel=1e-6)
    assert effective_rank(torch.tensor([1.0, 0, 0], dtype=torch.float64)) == pytest.approx(1.0, rel=1e-6)


def test_stacked_matrices_share_a_right_basis():
    """Basis Sharing: truncating the vertical stack gives per-member left factors and one shared basis."""
    w1, x = _problem(6, 8, seed=1)
    w2, _ = _problem(6, 8, seed=2)
    stack = torch.cat([w1, w2])
    gram = x.T @ x
    spec = weighted_spectrum(stack, gram)
    a, b = truncate(stack, spec.basis, 4)
    approx = a.double() @ b.double()
    loss = data_loss(w1, approx[:6], gram) + data_loss(w2, approx[6:], gram)
    assert loss == pytest.approx(spec.tail(4), rel=1e-8)


def test_tall_matrix_with_a_reused_factor():
    w, x = _problem(15, 6)
    gram = x.T @ x
    f = gram_factor(gram)
    assert torch.allclose(f @ f.T, gram, rtol=1e-9, atol=1e-9 * float(gram.abs().max()))
    a = weighted_spectrum(w, gram)
    b = weighted_spectrum(w, gram, factor=f)
    assert torch.allclose(a.sigma2, b.sigma2)
    assert torch.allclose(a.sigma2, torch.linalg.svdvals(w @ torch.linalg.cholesky(gram)) ** 2, rtol=1e-8)
