"""Decompose: the data-weighted spectrum of every compressible matrix (or shared-basis group), once.

A factorisation method is nothing but the metric it truncates under (see `linalg`):

| method  | metric G on a linear's inputs                        |
|---------|------------------------------------------------------|
| svd     | identity (no data)                                   |
| svdllm  | XᵀX, the Gram matrix (truncation-aware whitening)    |
| asvd    | diag(mean_tokens|x|)^(2α), α = 0.5 (or max|x|)        |
| fwsvd   | diag(Fisher information of the weight's columns)     |

Spectra give every unit's exact loss-vs-rank curve, which is all most allocators need; the stored
basis truncates it at any rank afterwards.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from svdzip.budget import DENSE, Pricing, max_useful_rank, rank_cost, unit_params
from svdzip.engine.statistics import CalibrationStats
from svdzip.errors import SvdzipError
from svdzip.methods.linalg import Spectrum, gram_factor, weighted_spectrum
from svdzip.models.adapter import LinearInfo, ModelAdapter
from svdzip.needs import Needs

log = logging.getLogger(__name__)

METHODS = ("svd", "svdllm", "asvd", "fwsvd")
DATA_FREE = ("svd",)

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

    @property
    def name(self) -> str:
        return self.members[0].name if len(self.members) == 1 else "+".join(m.name for m in self.members)

    @property
    def role(self) -> str:
        return self.members[0].role

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
        """The largest rank that still costs less than keeping the unit dense (0: never factorise)."""
        if self.pricing is None:
            return max_useful_rank(self.rows, self.cols)
        return self.pricing.max_useful_rank(self.rows, self.cols)

    def normalise(self, rank: int | None) -> int | None:
        """Dense when the rank would not save budget; otherwise the rank, at least 1."""
        if rank is DENSE or rank > self.max_rank or self.max_rank < 1:
            return DENSE
        return max(1, int(rank))


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


def metric_diagonal(method: str, key: str, name: str, stats: CalibrationStats, alpha: float,
                    scaling: str) -> torch.Tensor:
    """The diagonal metric of ASVD or FWSVD for one linear."""
    if method == "asvd":
        table = stats.abs_max if scaling == "abs_max" else stats.abs_mean
        if key not in table:
            raise SvdzipError(f"statistics have no activation scales for {key}")
        s = table[key].double()
        if scaling != "abs_max":
            s = s / max(stats.batches, 1)
        s = (s + 1e-6) ** alpha
        return s * s
    if method == "fwsvd":
        if name not in stats.fisher:
            raise SvdzipError(f"statistics have no Fisher information for {name}; recalibrate with fwsvd")
        return stats.fisher[name].double()
    raise SvdzipError(f"unknown factorisation method '{method}'; choose from {', '.join(METHODS)}")


def decompose(
    adapter: ModelAdapter,
    stats: CalibrationStats | None,
    method: str = "svdllm",
    units: list[list[LinearInfo]] | None = None,
    asvd_alpha: float = 0.5,
    asvd_scaling: str = "abs_mean",
    device: torch.device | str = "cpu",
) -> list[Unit]:
    """Spectrum of every unit under the method's metric (float64, on `device`)."""
    if method not in METHODS:
        raise SvdzipError(f"unknown factorisation method '{method}'; choose from {', '.join(METHODS)}")
    if method not in DATA_FREE and stats is None:
        raise SvdzipError(f"method '{method}' needs calibration statistics")
    units = units if units is not None else group_linears(adapter)
    factor_cache: dict[tuple[str, ...], torch.Tensor] = {}
    result = []
    for members in tqdm(units, desc=f"decomposing ({method})", unit="matrix"):
        t0 = time.perf_counter()
        weights = [adapter.module(m.name).weight.detach() for m in members]
        stacked = torch.cat(weights, 0).to(device)
        if not torch.isfinite(stacked).all():
            raise SvdzipError(f"weights of {members[0].name} contain NaN/Inf")
        rows, cols = stacked.shape
        metric: torch.Tensor | None = None
        factor: torch.Tensor | None = None
        if method == "svdllm":
            keys = tuple(m.input_key for m in members)
            missing = [k for k in keys if k not in stats.grams]
            if missing:
                raise SvdzipError(f"statistics have no Gram matrix for {missing[0]} (wrong model?)")
            metric = sum(stats.grams[k].to(device) for k in keys)
            if metric.shape[0] != cols:
                raise SvdzipError(f"statistics do not match the model: Gram of {keys[0]} is "
                                  f"{metric.shape[0]}-dim, the weight has {cols} inputs")
            if rows > cols:  # tall: needs a factor of G, shared by the linears reading this input
                if keys not in factor_cache:
                    if len(factor_cache) >= 8:
                        factor_cache.pop(next(iter(factor_cache)))
                    factor_cache[keys] = gram_factor(metric)
                factor = factor_cache[keys]
        elif method in ("asvd", "fwsvd"):
            diags = [metric_diagonal(method, m.input_key, m.name, stats, asvd_alpha, asvd_scaling)
                     for m in members]
            metric = torch.stack(diags).sum(0).to(device)
        headroom = math.ceil(BASIS_HEADROOM * rows * cols / (rows + cols))
        spectrum = weighted_spectrum(stacked, metric, max_rank=headroom, factor=factor)
        spectrum = Spectrum(sigma2=spectrum.sigma2.cpu(), basis=spectrum.basis.cpu())
        result.append(Unit(members=list(members), spectrum=spectrum, seconds=time.perf_counter() - t0))
    return result


def method_needs(config) -> Needs:
    """What a factorisation method needs from the run (its calibration statistics above all)."""
    if config.method not in METHODS:
        raise SvdzipError(f"unknown factorisation method '{config.method}'; choose from {', '.join(METHODS)}")
    if config.method == "svdllm":
        return Needs(statistics=frozenset({"grams"}))
    if config.method == "asvd":
        return Needs(statistics=frozenset({"abs_mean", "abs_max"}))
    if config.method == "fwsvd":
        return Needs(statistics=frozenset({"fisher"}), calib_tokens=True, whole_model=True, gradients=True,
                     distributable=False).because("its Fisher pass back-propagates through the whole model")
    return Needs()
