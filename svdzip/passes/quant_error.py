"""The quantization pass: every compressible matrix packed at each candidate bit width, and what its error costs.

For each unit (one linear) and bit width b this packs the weight once on HQQ's grid — each value rounded to
its nearest point (HQQ alone) or by GPTQ's error feedback on the layer's input Gram (`quantize_rounded`;
`auto`: GPTQ's from 3 bits up and nearest at 2, `rounding_at`) —
and keeps the packed weight (the planner's choice is then stored exactly as it was priced) and the weighted
spectrum of the error W − Q_b(W) under the layer's input Gram matrix: `tail(r)` is the output error left
after a rank-r compensation, on the same scale as the unit's own truncation spectrum (SVD-LLM's metric), so
"factorise at rank k" and "b bits + rank r" compete in one currency. Factorisations with packed factors
(`factor_errors`) are rounded to the nearest point.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from svdzip.budget import max_useful_rank
from svdzip.errors import SvdzipError
from svdzip.methods.compensation import compensation_factors, error_spectrum
from svdzip.methods.decompose import Unit
from svdzip.methods.error_feedback import Hessian, error_feedback_codes, prepare_hessian
from svdzip.methods.linalg import Spectrum, truncate, weighted_spectrum
from svdzip.methods.quantized_factors import prefix_losses
from svdzip.models.adapter import ModelAdapter
from svdzip.output.lowbit import GROUP_SIZE, Packed, pack_codes, quantize, supported

#: how low-bit values are rounded onto HQQ's grid: GPTQ's error feedback on the input Gram, or each to its nearest;
#: `auto` is GPTQ's from `AUTO_GPTQ_MIN_BITS` up and nearest below (`rounding_at`); `choose` plans
#: with GPTQ's and, where that plan stores 2-bit matrices, also with `auto`'s, and keeps whichever model loses less
#: on held-out calibration windows (`engine.pipeline`)
PACKINGS = ("gptq", "nearest", "auto")  # the roundings that pack (`choose` picks one of them per run)
ROUNDINGS = ("choose", *PACKINGS)
#: measured on SmolLM2-135M and Qwen2.5-0.5B (README "Rounding"): at 35 % of the bytes each model needs the other
#: 2-bit rounding (choose kept auto on SmolLM2, gptq on Qwen: 2.4x and 3.6x better than the other on wiki)
DEFAULT_ROUNDING = "choose"
#: the roundings `choose` compares; the first is planned first (the second differs from it below 3 bits only) and
#: is kept unless another's held-out perplexity is lower by more than CHOOSE_MARGIN: 8 held-out windows do not
#: separate plans closer than that (Qwen2.5-0.5B at 40 %: 37.53 vs 37.62 held out, the other order on wiki/austen)
CHOOSE_BETWEEN = ("gptq", "auto")
CHOOSE_MARGIN = 0.01
#: below this width `auto` rounds to nearest. On SmolLM2-135M GPTQ's 2-bit prices led the planner at 35 % of the
#: bytes to 112 2-bit matrices and a model 2.4x / 3.6x worse than `auto`'s (wiki / austen); on Qwen2.5-0.5B the
#: same budget is 3.6x better with GPTQ at 2 bits too (benchmarks/lowbit.py, README "Rounding"): a choice per
#: model, hence `choose`, not `auto`, is the default.
AUTO_GPTQ_MIN_BITS = 3


def rounding_at(rounding: str, bits: int) -> str:
    """The rounding a `rounding` setting gives a matrix stored at `bits`: gptq or nearest."""
    if rounding not in ROUNDINGS:
        raise SvdzipError(f"unknown rounding '{rounding}'; choose from {', '.join(ROUNDINGS)}")
    if rounding == "choose":
        raise SvdzipError("rounding 'choose' is decided by the planner on held-out windows before anything is packed; "
                          f"pack with one of {', '.join(CHOOSE_BETWEEN)}")
    if rounding == "auto":
        return "gptq" if bits >= AUTO_GPTQ_MIN_BITS else "nearest"
    return rounding


@dataclass
class QuantError:
    packed: Packed
    sigma2: torch.Tensor  # the error's weighted spectrum, descending (float64)

    def tail_curve(self) -> torch.Tensor:
        """Loss left after a rank-r compensation, for r = 0 … len(sigma2)."""
        return Spectrum(self.sigma2, self.sigma2.new_zeros(0, 0)).tail_curve()


@dataclass
class FactorError:
    """SVD-then-quantize at one bit width: `losses[k]` for every prefix rank k = 0 … K (read at `ranks` only,
    the ranks whose factors pack in whole groups)."""

    losses: torch.Tensor  # float64, length K + 1
    ranks: tuple[int, ...]


def factor_ranks(rows: int, cols: int, kept: int, bits: int, group_size: int = GROUP_SIZE) -> tuple[int, ...]:
    """Ranks k whose factors (rows×k, k×cols) HQQ packs at these bits and that store fewer values than W."""
    top = min(kept, max_useful_rank(rows, cols))
    return tuple(k for k in range(group_size, top + 1, group_size)
                 if supported(rows, k, bits, group_size) and supported(k, cols, bits, group_size))


def quantize_rounded(weight: torch.Tensor, bits: int, gram: torch.Tensor, rounding: str = "gptq",
                     group_size: int = GROUP_SIZE, hessian: Hessian | None = None) -> Packed:
    """`weight` packed at `bits` on HQQ's grid (its optimised scale and zero point per group), rounded as
    `rounding` says (`rounding_at`): `nearest` is HQQ alone; `gptq` keeps that grid and rounds the input columns
    in turn, loudest first, feeding each one's error to those not yet rounded (`methods.error_feedback`), which
    keeps the output error on inputs with Gram `gram` small rather than each weight's (`hessian`: `gram` prepared
    once for a matrix rounded at several widths)."""
    how = rounding_at(rounding, bits)
    packed = quantize(weight, bits, group_size)
    if how == "nearest":
        return packed
    rows, cols = weight.shape
    scale, zero = (t.float().reshape(rows, cols // group_size) for t in (packed.scale, packed.zero))
    codes = error_feedback_codes(weight, gram.to(weight.device), bits, scale, zero, group_size, hessian=hessian)
    return pack_codes(codes, packed.scale, packed.zero, bits, group_size)


def unit_gram(unit: Unit, stats: Any) -> torch.Tensor:
    """The Gram matrix of a unit's input (a single linear: the byte planner does not share bases)."""
    if "gram" in unit.extras:  # a matrix outside the decoder (the untied head) carries its own
        return unit.extras["gram"]
    if len(unit.members) != 1:
        raise SvdzipError("low-bit storage is planned per matrix: shared bases (--group-size > 1) are not supported")
    key = unit.members[0].input_key
    if stats is None or key not in stats.grams:
        raise SvdzipError(f"low-bit storage needs the Gram matrix of {unit.name}'s input (calibration statistics "
                          f"of kind 'grams'); none was computed")
    return stats.grams[key]


def quantization_errors(adapter: ModelAdapter, units: Sequence[Unit], stats: Any, bits: Sequence[int],
                        device: str | torch.device = "cpu", group_size: int = GROUP_SIZE,
                        done: dict[tuple[str, int], QuantError] | None = None,
                        rounding: str = "gptq") -> dict[tuple[str, int], QuantError]:
    """(unit name, bits) → its packed weight and error spectrum, for every bit width the unit's shape allows.

    `rounding`: gptq (error feedback on the unit's input Gram), nearest (HQQ alone) or auto (`rounding_at`).
    `done` holds results of an earlier call with the same rounding (a sweep over budgets, or the benchmark) and is
    filled in place.
    """
    done = {} if done is None else done
    rounding_at(rounding, 8)  # an unknown or undecided rounding fails before any packing
    todo = [(u, [b for b in bits if (u.name, b) not in done and supported(u.rows, u.cols, b, group_size)])
            for u in units]
    todo = [(u, widths) for u, widths in todo if widths]
    with tqdm(total=sum(len(w) for _, w in todo), desc=f"quantizing (hqq, {rounding}) and measuring errors",
              unit="matrix", disable=not todo) as bar:
        for unit, widths in todo:  # the weight, its Gram and GPTQ's Hessian once for all its widths
            weight = adapter.module(unit.name).weight.detach().to(device)
            gram = unit_gram(unit, stats).to(device)
            hessian = None
            for b in widths:
                try:
                    if hessian is None and rounding_at(rounding, b) == "gptq":
                        hessian = prepare_hessian(gram)
                    packed = quantize_rounded(weight, b, gram, rounding, group_size, hessian=hessian)
                except SvdzipError as exc:
                    raise SvdzipError(f"{unit.name} at {b} bits: {exc}") from None
                spectrum = error_spectrum(weight, packed.dequantize(torch.float32), gram)
                done[unit.name, b] = QuantError(packed=packed, sigma2=spectrum.sigma2.cpu())
                bar.update()
    return done


def factor_errors(adapter: ModelAdapter, units: Sequence[Unit], stats: Any, bits: Sequence[int],
                  device: str | torch.device = "cpu", group_size: int = GROUP_SIZE,
                  done: dict[tuple[str, int], FactorError] | None = None) -> dict[tuple[str, int], FactorError]:
    """(unit name, bits) → the loss of its SVD-LLM factors quantized at those bits, at every packable rank.

    The widest factors are truncated once (balanced, as stored), quantized once per width, and every prefix
    priced from them. `done` is filled in place, as in `quantization_errors`.
    """
    done = {} if done is None else done
    todo = [u for u in units if any((u.name, b) not in done for b in bits)]
    for unit in tqdm(todo, desc="quantizing factors (hqq) and measuring errors", unit="matrix", disable=not todo):
        ranks = {b: factor_ranks(unit.rows, unit.cols, unit.spectrum.basis.shape[1], b, group_size) for b in bits}
        widest = max((r[-1] for r in ranks.values() if r), default=0)
        if not widest:
            continue
        weight = adapter.module(unit.name).weight.detach().to(device)
        gram = unit_gram(unit, stats).to(device)
        left, right = truncate(weight, unit.spectrum.basis.to(device), widest)
        weighted = weight.float() @ gram.float()
        for b, offered in ranks.items():
            if not offered or (unit.name, b) in done:
                continue
            top = offered[-1]
            q_left = quantize(left[:, :top], b, group_size).dequantize(torch.float32)
            q_right = quantize(right[:top], b, group_size).dequantize(torch.float32)
            losses = prefix_losses(weight, q_left, q_right, gram, weighted=weighted)
            done[unit.name, b] = FactorError(losses=losses.cpu(), ranks=offered)
    return done


def truncate_then_quantize(weight: torch.Tensor, gram: torch.Tensor, rank: int, bits: int,
                           group_size: int = GROUP_SIZE, basis: torch.Tensor | None = None, rounding: str = "gptq"
                           ) -> tuple[Packed, tuple[torch.Tensor, torch.Tensor]]:
    """CALDERA's order, one alternation: W ≈ Q(W − L R) + L' R'.

    L R is W's rank-r truncation in SVD-LLM's metric (`basis`: W's whitened left basis where the caller has it,
    the unit's spectrum's; computed here if it is missing or has fewer than r columns); the residual W − L R
    (its top components gone, so a narrower range to quantize) is packed at `bits`; then the correction is
    refitted to what that packing missed, W − Q(W − L R), by the same whitened truncation EoRA uses (never
    worse on the calibration inputs than keeping L R). The residual is rounded as `rounding` says
    (`quantization_errors`). Returns (the packing, (B, A) of the correction).
    """
    if basis is None or basis.shape[1] < rank:
        basis = weighted_spectrum(weight, gram, max_rank=rank).basis
    left, right = truncate(weight, basis, rank)
    packed = quantize_rounded(weight - (left.double() @ right.double()).to(weight.dtype), bits, gram, rounding,
                              group_size)
    return packed, compensation_factors(weight, packed.dequantize(torch.float32).to(weight.device), gram, rank)
