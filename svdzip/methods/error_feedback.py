"""Rounding with error feedback (GPTQ / OBQ): quantize a weight column by column on the layer's input Gram.

Rounding every weight to its nearest grid point ignores what the layer's inputs do with the error. With the
Gram matrix H = XᵀX of the calibration inputs, the output error of a quantized weight Q is

    ‖X (W − Q)ᵀ‖_F² = tr((W − Q) H (W − Q)ᵀ),

and Optimal Brain Quantization's greedy answer (GPTQ, Frantar et al. 2023, in its fixed column order) rounds
input column j, then moves its rounding error onto the columns not yet rounded, the move that keeps the
output error of what is left least: w_{>j} −= (w_j − q_j) · [H_j⁻¹]_{j,>j} / [H_j⁻¹]_{jj}, with H_j⁻¹ the
inverse Hessian restricted to the columns from j on. The upper Cholesky factor U of H⁻¹ holds every such
row at once (row j of U ∝ row j of H_j⁻¹), so the whole pass is one factorisation plus rank-one updates,
done lazily in blocks.

The grid (a scale and a zero point per group of `group_size` consecutive inputs in a row) is the caller's
(`grid`): it is computed on a group's columns when the pass reaches them, from the weights as the earlier
columns' errors left them (GPTQ's grouping). svdzip takes the grid from HQQ's optimiser (`output.lowbit`), so
this module only decides the integer codes, never how they are stored.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from svdzip.errors import SvdzipError

#: a group's (rows × group_size) weights → its dequantization scale and zero point, each rows × 1,
#: already rounded to how they are stored (so the feedback sees the error the stored weight makes)
Grid = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


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


def error_feedback_codes(weight: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int, grid: Grid,
                         block: int = 128, damp: float = 0.01
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ's codes for `weight` (rows × cols) on `grid`: (codes rows × cols, scale and zero rows × groups).

    Dequantized, (codes − zero)·scale per group, the result's output error on the inputs whose Gram is `gram`
    is what the greedy leaves; with a diagonal Gram nothing is fed back and it is plain rounding on the grid.
    """
    rows, cols = weight.shape
    if cols % group_size or block % group_size:
        raise ValueError(f"{cols} inputs and blocks of {block} must be whole groups of {group_size}")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32  # float64 in: exact checks
    u = inverse_hessian_factor(gram, damp)
    u = u.to(device=weight.device, dtype=dtype)
    w = weight.detach().to(dtype).clone()
    codes = torch.empty_like(w)
    scales = w.new_empty(rows, cols // group_size)
    zeros = w.new_empty(rows, cols // group_size)
    for start in range(0, cols, block):
        stop = min(start + block, cols)
        part, u_part = w[:, start:stop].clone(), u[start:stop, start:stop]
        errors = torch.empty_like(part)
        for i in range(stop - start):
            col = start + i
            if col % group_size == 0:
                g = col // group_size
                s, z = grid(part[:, i:i + group_size].contiguous())
                scales[:, g], zeros[:, g] = s.reshape(-1), z.reshape(-1)
            s, z = scales[:, col // group_size], zeros[:, col // group_size]
            q = round_to_grid(part[:, i], s, z, bits)
            codes[:, col] = q
            err = (part[:, i] - (q - z) * s) / u_part[i, i]
            part[:, i:] -= err[:, None] * u_part[i, i:][None, :]
            errors[:, i] = err
        w[:, stop:] -= errors @ u[start:stop, stop:]
    return codes, scales, zeros


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """(codes − zero)·scale with one scale and zero per group of `group_size` inputs (rows × cols)."""
    return (codes - zero.repeat_interleave(group_size, dim=1)) * scale.repeat_interleave(group_size, dim=1)
