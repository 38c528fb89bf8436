"""Rounding with error feedback (GPTQ / OBQ): quantize a weight column by column on the layer's input Gram.

Rounding every weight to its nearest grid point ignores what the layer's inputs do with the error. With the
Gram matrix H = XᵀX of the calibration inputs, the output error of a quantized weight Q is

    ‖X (W − Q)ᵀ‖_F² = tr((W − Q) H (W − Q)ᵀ),

and Optimal Brain Quantization's greedy answer (GPTQ, Frantar et al. 2023) rounds one input column, then moves
its rounding error onto the columns not yet rounded, the move that keeps the output error of what is left
least: w_{F} −= (w_j − q_j) · [H_F⁻¹]_{j,F} / [H_F⁻¹]_{jj}, with F the columns from j on. The upper Cholesky
factor U of H⁻¹ holds every such row at once, so the whole pass is one factorisation plus rank-one updates,
done lazily in blocks.

Two choices GPTQ's authors made after the paper, both measured here to matter (the natural column order with
each group's grid refitted as the pass reaches it made 3-bit SmolLM2-135M worse than nearest rounding on text
of another domain; README, "Rounding"):
* the columns go in decreasing order of their input energy diag(H) ("act order"): the loud inputs are rounded
  first, while every other column can still absorb their error;
* the grid is fixed before the pass (`scale`, `zero`: one per group of `group_size` consecutive inputs of a
  row, "static groups"), so activation order and contiguous groups go together. svdzip takes it from HQQ's
  optimiser on W itself (`passes.quant_error.quantize_rounded`), so this module only decides the integer
  codes, never how they are stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from svdzip.errors import SvdzipError


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer codes of `w` on the grid (q − zero)·scale, q ∈ {0 … 2^bits − 1}."""
    return (w / scale + zero).round_().clamp_(0, 2 ** bits - 1)


def inverse_hessian_factor(gram: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """U upper triangular with Uᵀ U = (H + λ I)⁻¹, λ = `damp` × mean diag(H). Inputs the calibration never
    excited (zero diagonal) get a diagonal of 1 so H is invertible; their rows and columns of U stay zero off
    the diagonal, so their weights are rounded to the nearest point and feed nothing back (GPTQ zeroes them;
    kept here, as other text may excite them)."""
    h = gram.detach().double().clone()
    if not torch.isfinite(h).all():
        raise SvdzipError("the input Gram matrix has non-finite entries (calibration overflowed?): GPTQ's "
                          "rounding needs a finite one (--rounding nearest needs none)")
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    lam = damp * float(torch.diagonal(h).mean())
    h.diagonal().add_(lam)
    try:  # two n×n copies at most: each step replaces the last
        h = torch.linalg.cholesky(h)
        h = torch.cholesky_inverse(h)
        return torch.linalg.cholesky(h, upper=True)
    except torch.linalg.LinAlgError as exc:
        raise SvdzipError(f"the damped input Gram matrix is not positive definite ({exc}); GPTQ's rounding "
                          "cannot use it (--rounding nearest needs none)") from None


@dataclass(frozen=True)
class Hessian:
    """What the pass needs of a Gram matrix: its activation order and the inverse-Hessian factor in that order
    (one per matrix, shared by every bit width it is rounded at)."""
    order: torch.Tensor
    factor: torch.Tensor


def prepare_hessian(gram: torch.Tensor, damp: float = 0.01) -> Hessian:
    order = activation_order(gram)
    return Hessian(order, inverse_hessian_factor(gram[order][:, order], damp))


def error_feedback_codes(weight: torch.Tensor, gram: torch.Tensor, bits: int, scale: torch.Tensor,
                         zero: torch.Tensor, group_size: int, block: int = 128, damp: float = 0.01,
                         hessian: Hessian | None = None) -> torch.Tensor:
    """GPTQ's integer codes for `weight` (rows × cols) on the fixed grid (`scale`, `zero`: rows × groups), the
    columns taken in decreasing order of diag(`gram`).

    Dequantized, (codes − zero)·scale per group, the result's output error on the inputs whose Gram is `gram`
    is what the greedy leaves; with a diagonal Gram nothing is fed back and it is plain rounding on the grid.
    `hessian`: `prepare_hessian(gram, damp)` where the caller rounds the same matrix at several widths.
    """
    rows, cols = weight.shape
    if cols % group_size or scale.shape != (rows, cols // group_size) or zero.shape != scale.shape:
        raise ValueError(f"a {rows}×{cols} weight needs whole groups of {group_size} inputs and a scale and zero "
                         f"point per group (rows × {cols // group_size}), not {tuple(scale.shape)}")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32  # float64 in: exact checks
    hessian = hessian or prepare_hessian(gram, damp)
    order = hessian.order.to(weight.device)
    u = hessian.factor.to(device=weight.device, dtype=dtype)
    w = weight.detach().to(dtype)[:, order].clone()
    s = scale.to(w).repeat_interleave(group_size, dim=1)[:, order]
    z = zero.to(w).repeat_interleave(group_size, dim=1)[:, order]
    codes = torch.empty_like(w)
    for start in range(0, cols, block):
        stop = min(start + block, cols)
        part, u_part = w[:, start:stop].clone(), u[start:stop, start:stop]
        errors = torch.empty_like(part)
        for i in range(stop - start):
            col = start + i
            q = round_to_grid(part[:, i], s[:, col], z[:, col], bits)
            codes[:, col] = q
            err = (part[:, i] - (q - z[:, col]) * s[:, col]) / u_part[i, i]
            part[:, i:] -= err[:, None] * u_part[i, i:][None, :]
            errors[:, i] = err
        w[:, stop:] -= errors @ u[start:stop, stop:]
    out = torch.empty_like(codes)
    out[:, order] = codes
    return out


def activation_order(gram: torch.Tensor) -> torch.Tensor:
    """Input columns by decreasing energy diag(H) (ties in index order): GPTQ's "act order"."""
    return torch.argsort(torch.diagonal(gram), descending=True, stable=True)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """(codes − zero)·scale with one scale and zero per group of `group_size` inputs (rows × cols)."""
    return (codes - zero.repeat_interleave(group_size, dim=1)) * scale.repeat_interleave(group_size, dim=1)
