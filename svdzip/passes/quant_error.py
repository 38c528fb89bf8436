"""The quantization pass: every compressible matrix packed at each candidate bit width, and what its error costs.

For each unit (one linear) and bit width b this runs HQQ's quantizer once and keeps the packed weight (the
planner's choice is then stored exactly as it was priced) and the weighted spectrum of the error
W − Q_b(W) under the layer's input Gram matrix: `tail(r)` is the output error left after a rank-r
compensation, on the same scale as the unit's own truncation spectrum (SVD-LLM's metric), so "factorise at
rank k" and "b bits + rank r" compete in one currency.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from svdzip.errors import SvdzipError
from svdzip.methods.compensation import error_spectrum
from svdzip.methods.decompose import Unit
from svdzip.methods.linalg import Spectrum
from svdzip.models.adapter import ModelAdapter
from svdzip.output.lowbit import GROUP_SIZE, Packed, quantize, supported


@dataclass
class QuantError:
    packed: Packed
    sigma2: torch.Tensor  # the error's weighted spectrum, descending (float64)

    def tail_curve(self) -> torch.Tensor:
        """Loss left after a rank-r compensation, for r = 0 … len(sigma2)."""
        return Spectrum(self.sigma2, self.sigma2.new_zeros(0, 0)).tail_curve()


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
                        done: dict[tuple[str, int], QuantError] | None = None) -> dict[tuple[str, int], QuantError]:
    """(unit name, bits) → its packed weight and error spectrum, for every bit width the unit's shape allows.

    `done` holds results of an earlier call (a sweep over budgets, or the benchmark) and is filled in place.
    """
    done = {} if done is None else done
    todo = [(u, b) for u in units for b in bits
            if (u.name, b) not in done and supported(u.rows, u.cols, b, group_size)]
    for unit, b in tqdm(todo, desc="quantizing (hqq) and measuring errors", unit="matrix", disable=not todo):
        weight = adapter.module(unit.name).weight.detach().to(device)
        packed = quantize(weight, b, group_size)
        spectrum = error_spectrum(weight, packed.dequantize(torch.float32), unit_gram(unit, stats).to(device))
        done[unit.name, b] = QuantError(packed=packed, sigma2=spectrum.sigma2.cpu())
    return done
