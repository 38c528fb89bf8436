"""Low-rank compensation of a quantization error, in the metric of the layer's inputs (EoRA = QERA-exact).

For a weight W, its quantization Q(W) and the Gram matrix G = XᵀX of the layer's calibration inputs, the
rank-r correction that minimises the output error is

    argmin_{rank(C) ≤ r} ‖X (W − Q(W) − C)ᵀ‖_F² = argmin ‖(ΔW − C) G^{1/2}‖_F²,   ΔW = W − Q(W),

the truncation of ΔW under the same metric SVD-LLM truncates W in (methods-spec §12.1): `linalg`'s
data-weighted truncation applied to the error instead of the weight. Its loss at every rank is the tail of
the error's weighted spectrum, so the byte planner prices "b bits + rank r" with no trial.
"""

from __future__ import annotations

import torch

from svdzip.methods.linalg import Spectrum, truncate, weighted_spectrum


def error_spectrum(weight: torch.Tensor, quantized: torch.Tensor, gram: torch.Tensor | None,
                   max_rank: int | None = 0, factor: torch.Tensor | None = None) -> Spectrum:
    """The weighted spectrum of ΔW = W − Q(W): `tail(r)` is the output error left after a rank-r compensation
    (`max_rank` basis vectors kept: 0 when only the losses are wanted)."""
    return weighted_spectrum(weight.double() - quantized.double(), gram, max_rank=max_rank, factor=factor)


def compensation_factors(weight: torch.Tensor, quantized: torch.Tensor, gram: torch.Tensor | None, rank: int,
                         factor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B: out×r, A: r×in) with Q(W) + B·A the best rank-r corrected weight on these inputs."""
    delta = weight.double() - quantized.double()
    spectrum = weighted_spectrum(delta, gram, max_rank=rank, factor=factor)
    b, a = truncate(delta, spectrum.basis, rank)
    return b.to(weight.dtype), a.to(weight.dtype)
