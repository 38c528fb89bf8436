"""Decompose: the data-weighted spectrum of every compressible matrix (or shared-basis group), once.

A factorisation method is nothing but the metric it truncates under: `methods.factorisations` holds
one object per method (svd, svdllm, asvd, fwsvd), each building its metric from the statistics it
declares it needs; this module never looks at a method's name.

Spectra give every unit's exact loss-vs-rank curve, which is all most allocators need; the stored
basis truncates it at any rank afterwards.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from svdzip.budget import DENSE, Pricing, max_useful_rank, rank_cost, uniform_rank, unit_params
from svdzip.core.statistics import CalibrationStats
from svdzip.errors import SvdzipError
from svdzip.methods.factorisations import FactorisationMethod, Settings, get_method
from svdzip.methods.linalg import Spectrum, weighted_spectrum
from svdzip.models.adapter import LinearInfo, ModelAdapter

log = logging.getLogger(__name__)

#: ARA factorises over-complete (ρ₀ = 1.2), so spectra keep a basis up to that many parameters.
BASIS_HEADROOM = 1.2


@dataclass
class Unit:
    """What an allocator gives one rank to: a linear, or several sharing one right factor (basis).

    The unit's matrix is the vertical stack of its members' weights (rows = outputs).
    """

    members: list[LinearInfo]
    spectrum: Spectrum
    seconds: float = 0.0
    extras: dict = field(default_factory=dict)
    pricing: Pricing | None = None  # byte costs (memory budgets); None = the budget counts parameters
    #: a unit whose rank is a module's width (MoDeGPT's slimmed MLP) rather than a factorisation's rank
    slimmed: ClassVar[bool] = False
    #: a unit whose options are built by the allocator's weights (the hybrid's `ChoiceUnit`)
    chooses: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return self.members[0].name if len(self.members) == 1 else "+".join(m.name for m in self.members)

    @property
    def role(self) -> str:
        return self.members[0].role

    @property
    def loss_members(self) -> list[LinearInfo]:
        """The linears at whose outputs the unit's loss is measured (what weighs it for the model)."""
        return self.members

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(m.layer for m in self.members)

    @property
    def rows(self) -> int:
        return sum(m.out_features for m in self.members)

    @property
    def cols(self) -> int:
        return self.members[0].in_features

    @property
    def cost_per_rank(self) -> int:
        return rank_cost(self.rows, self.cols)

    @property
    def dense_params(self) -> int:
        return self.rows * self.cols

    def cost(self, rank: int | None) -> int:
        """What the unit spends of the budget at `rank` (None = dense): parameters, or bytes when priced."""
        if self.pricing is None:
            return unit_params(self.rows, self.cols, rank)
        return self.pricing.cost(self.rows, self.cols, rank)

    @property
    def max_rank(self) -> int:
        """The largest rank that still costs less than keeping the unit dense (0: never factorise).

        Priced in bytes, factors cheaper per value than the dense matrix (int8 factors beside a 16-bit remainder)
        would pay up to twice the parameter break-even; the ranks offered stop at the basis the spectrum keeps.
        """
        if self.pricing is None:
            return max_useful_rank(self.rows, self.cols)
        return min(self.pricing.max_useful_rank(self.rows, self.cols), self.spectrum.basis.shape[1])

    def uniform_rank(self, ratio: float) -> int | None:
        """The papers' rank at `ratio` removed (the uniform allocator's): k = floor((1 − r)·m·n/(m + n))."""
        return uniform_rank(self.rows, self.cols, ratio)

    def materialise(self, adapter: ModelAdapter, rank: int | None) -> list[Any]:
        """Build the unit at `rank` in the adapter's model; its report rows (`methods.materialise`)."""
        from svdzip.methods.materialise import factorise_units

        return factorise_units(adapter, [self], [rank])

    def normalise(self, rank: int | None) -> int | None:
        """Dense when the rank would not save budget; otherwise the rank, at least 1."""
        if rank is DENSE or rank > self.max_rank or self.max_rank < 1:
            return DENSE
        return max(1, int(rank))


def hull_segments(unit: Unit, weight: float) -> list[tuple[float, int | None, int]]:
    """Upper concave hull of (parameters, weighted loss removed) from rank 1 up to dense.

    Returns segments (gain per parameter, rank reached, cost) in decreasing-gain order. Ranks alone
    give a concave curve (σ² descends); the dense point can lie above it, in which case the hull jumps
    straight to dense from the rank where that is the better buy — the "one big step" of going dense.
    """
    kmax = unit.max_rank
    tail = unit.spectrum.tail_curve()
    base = float(tail[1]) if tail.numel() > 1 else 0.0
    pts: list[tuple[int, float, int | None]] = []
    for k in range(1, kmax + 1):
        reached = float(tail[k]) if k < tail.numel() else 0.0
        pts.append((unit.cost(k), weight * (base - reached), k))
    pts.append((unit.cost(DENSE), weight * base, DENSE))
    hull: list[tuple[int, float, int | None]] = []
    for p in pts:
        while len(hull) >= 2:
            (x1, y1, _), (x2, y2, _) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) <= (p[1] - y1) * (x2 - x1):  # hull[-1] lies under the chord
                hull.pop()
            else:
                break
        hull.append(p)
    segs = []
    for (x1, y1, _), (x2, y2, r2) in zip(hull, hull[1:], strict=False):
        segs.append(((y2 - y1) / max(x2 - x1, 1), r2, x2 - x1))
    return segs


def group_linears(
    adapter: ModelAdapter, share_roles: tuple[str, ...] = (), group_size: int = 1
) -> list[list[LinearInfo]]:
    """Units: each linear alone, except roles in `share_roles`, grouped over `group_size` consecutive layers."""
    if group_size < 1:
        raise SvdzipError(f"group size must be at least 1, got {group_size}")
    units: list[list[LinearInfo]] = []
    by_role: dict[str, list[LinearInfo]] = {}
    for info in adapter.linears():
        if group_size > 1 and info.role in share_roles:
            by_role.setdefault(info.role, []).append(info)
        else:
            units.append([info])
    for infos in by_role.values():
        for start in range(0, len(infos), group_size):
            units.append(infos[start : start + group_size])
    return units


def decompose(
    adapter: ModelAdapter,
    stats: CalibrationStats | None,
    method: str | FactorisationMethod = "svdllm",
    units: list[list[LinearInfo]] | None = None,
    asvd_alpha: float = 0.5,
    asvd_scaling: str = "abs_mean",
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> list[Unit]:
    """Spectrum of every unit under the method's metric (float64, on `device`); `progress`: a bar of its own."""
    method = get_method(method)
    settings = Settings(asvd_alpha=asvd_alpha, asvd_scaling=asvd_scaling)
    if method.needs(settings).statistics and stats is None:
        raise SvdzipError(f"method '{method.name}' needs calibration statistics")
    units = units if units is not None else group_linears(adapter)
    factors: dict[tuple[str, ...], torch.Tensor] = {}
    result = []
    for members in tqdm(units, desc=f"decomposing ({method.name})", unit="matrix", disable=not progress):
        t0 = time.perf_counter()
        weights = [adapter.module(m.name).weight.detach() for m in members]
        stacked = torch.cat(weights, 0).to(device)
        if not torch.isfinite(stacked).all():
            raise SvdzipError(f"weights of {members[0].name} contain NaN/Inf")
        rows, cols = stacked.shape
        metric = method.metric(members, cols, stats, settings, device, factors)
        headroom = math.ceil(BASIS_HEADROOM * rows * cols / (rows + cols))
        spectrum = weighted_spectrum(stacked, metric.matrix, max_rank=headroom, factor=metric.factor)
        spectrum = Spectrum(sigma2=spectrum.sigma2.cpu(), basis=spectrum.basis.cpu())
        result.append(Unit(members=list(members), spectrum=spectrum, seconds=time.perf_counter() - t0))
    return result

