"""The blocked Gram matrix (only the blocks on and above the diagonal) against the plain xᵀx."""

import pytest
import torch

from svdzip.core.statistics import (
    GRAM_BLOCKED_MIN,
    Accumulator,
    CalibrationStats,
    add_gram_,
    gram_blocked,
    symmetric_gram,
)
from svdzip.errors import SvdzipError


def _x(tokens, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, n, generator=g) * torch.logspace(0, 1, n)  # channels of different scales


def _close(got: torch.Tensor, x: torch.Tensor) -> None:
    """Equal to the float64 xᵀx up to float32 rounding of the products (|error| ≲ ε·tokens·|x_i||x_j|)."""
    ref = x.double().T @ x.double()
    norms = x.double().norm(dim=0)
    bound = 4 * torch.finfo(torch.float32).eps * x.shape[0] ** 0.5 * torch.outer(norms, norms)
    assert ((got.double() - ref).abs() <= bound).all()


@pytest.mark.parametrize("tokens,n", [(50, 1), (7, 3), (64, 13), (33, 40), (200, 97), (128, 256)])
@pytest.mark.parametrize("blocks", [1, 2, 3, 4, 8])
def test_symmetric_gram_equals_xtx(tokens, n, blocks):
    x = _x(tokens, n)
    got = symmetric_gram(x, blocks, dtype=torch.float64)
    assert got.dtype == torch.float64 and got.shape == (n, n)
    _close(got, x)
    assert torch.equal(got, got.T)  # exactly symmetric
    f32 = symmetric_gram(x, blocks)
    assert f32.dtype == torch.float32 and torch.equal(f32, f32.T)
    _close(f32, x)


def test_more_blocks_than_columns_and_exact_in_float64():
    x = _x(20, 5).double()
    for blocks in (5, 6, 100):
        got = symmetric_gram(x, blocks)
        assert torch.allclose(got, x.T @ x, rtol=1e-13, atol=1e-12)
        assert torch.equal(got, got.T)


@pytest.mark.parametrize("n,blocks", [(97, 8), (64, 4), (1, 8)])
def test_add_in_place_into_running_sum(n, blocks):
    batches = [_x(40, n, seed=s) for s in range(3)]
    acc = batches[0].double().T @ batches[0].double()
    acc = (acc + acc.T) / 2  # an existing symmetric float64 sum
    start = acc.clone()
    ptr = acc.data_ptr()
    for x in batches[1:]:
        assert add_gram_(acc, x, blocks) is acc
    assert acc.data_ptr() == ptr and acc.dtype == torch.float64
    ref = start + sum(x.double().T @ x.double() for x in batches[1:])
    stacked = torch.cat(batches[1:])
    bound = 8 * torch.finfo(torch.float32).eps * 40 ** 0.5 * torch.outer(stacked.double().norm(dim=0),
                                                                            stacked.double().norm(dim=0))
    assert ((acc - ref).abs() <= bound).all()
    assert torch.equal(acc, acc.T)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match=r"x must be tokens × n and acc n × n, got \(3, 5\), \(4, 4\)"):
        add_gram_(torch.zeros(4, 4, dtype=torch.float64), torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"got \(2, 3, 5\), \(5, 5\)"):
        add_gram_(torch.zeros(5, 5, dtype=torch.float64), torch.randn(2, 3, 5))


def test_non_finite_input_reaches_the_diagonal():
    x = _x(30, 20)
    x[3, 17] = float("nan")
    x[5, 2] = float("inf")
    g = symmetric_gram(x, 4, dtype=torch.float64)
    assert not torch.isfinite(g.diagonal()[17]) and not torch.isfinite(g.diagonal()[2])
    stats = CalibrationStats(grams={"k": g})
    with pytest.raises(SvdzipError, match="NaN/Inf"):
        stats.check_finite()


def test_accumulator_blocked_path_same_statistics():
    """A wide input takes the blocked path: float64 running sum, equal to the plain sum, |x| stats untouched."""
    n = GRAM_BLOCKED_MIN["cpu"] + 3  # not divisible by the block count
    batches = [_x(48, n, seed=s).reshape(2, 24, n) for s in range(3)]  # (batch, seq, n), as a hook sees it
    assert gram_blocked(batches[0].reshape(-1, n)) and not gram_blocked(torch.zeros(4, 64))
    stats = CalibrationStats()
    acc = Accumulator(stats, "k", ("grams", "abs_mean", "abs_max"))
    for b in batches:
        acc(torch.nn.Identity(), (b,))
    g = stats.grams["k"]
    assert g.dtype == torch.float64 and g.shape == (n, n) and torch.equal(g, g.T)
    flat = torch.cat([b.reshape(-1, n) for b in batches])
    _close(g, flat)
    plain = sum(b.reshape(-1, n).T @ b.reshape(-1, n) for b in batches).double()  # fp32 products, as before
    assert torch.allclose(g, plain, rtol=1e-4, atol=1e-3)
    assert torch.equal(stats.abs_batches["k"], torch.tensor(3.0, dtype=torch.float64))
    assert torch.allclose(stats.abs_mean["k"], sum(b.reshape(-1, n).abs().mean(0).double() for b in batches))
