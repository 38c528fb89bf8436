"""Factorisation methods: each is the metric it truncates under and the statistics that metric is built from.

| method  | metric G on a linear's inputs                        | statistics          |
|---------|------------------------------------------------------|---------------------|
| svd     | identity (no data)                                   | none                |
| svdllm  | XᵀX, the Gram matrix (truncation-aware whitening)    | grams               |
| asvd    | diag(mean_tokens|x|)^(2α), α = 0.5 (or max|x|)        | abs_mean or abs_max |
| fwsvd   | diag(Fisher information of the weight's columns)     | fisher              |

A method declares its `Needs` so that a run computes only those statistics (and refuses a mode that
cannot give them) before any work; `decompose` asks the method for each unit's metric and never
looks at its name. `get_method(name)` is the one registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from svdzip.errors import SvdzipError
from svdzip.methods.linalg import gram_factor
from svdzip.needs import NOTHING, Needs

if TYPE_CHECKING:
    from svdzip.core.statistics import CalibrationStats
    from svdzip.models.adapter import LinearInfo

ASVD_SCALINGS = ("abs_mean", "abs_max")
FACTOR_CACHE_SIZE = 8  # square-root factors of Gram matrices kept while decomposing (one per shared input)


class MethodSettings(Protocol):
    """What a method reads from the run's configuration (a `Recipe` has both)."""

    asvd_alpha: float
    asvd_scaling: str


class MethodChoice(MethodSettings, Protocol):
    """What a pass needs to know of a run's recipe to factorise: the method and its settings."""

    method: str


@dataclass(frozen=True)
class Settings:
    """Method settings outside a `Recipe` (`decompose`'s keyword arguments)."""

    asvd_alpha: float = 0.5
    asvd_scaling: str = "abs_mean"


@dataclass(frozen=True)
class Metric:
    """G for one unit: the full matrix (n×n), its diagonal (n,), or None for the identity; for a tall
    matrix under a full G, `factor` F with F Fᵀ = G (shared by the linears reading the same input)."""

    matrix: torch.Tensor | None = None
    factor: torch.Tensor | None = None


class FactorisationMethod(ABC):
    """One way of weighting the truncation error: its name, what it needs, and the metric it builds."""

    name: str = ""
    summary: str = ""
    #: builds its own units (whole modules, `build_units`) instead of one spectrum per matrix under `metric`
    structured: bool = False
    #: its modules choose between families (the hybrid's `ChoiceUnit`s)
    chooses: bool = False
    #: what `auto` (allocator, its options, heal) means with this method; None = the recipe's own default
    recommended: dict[str, Any] | None = None
    #: the only allocators that can allocate its units (None: any that `slims`, for a structured method)
    allocators: tuple[str, ...] | None = None

    def build_units(self, adapter: Any, stats: CalibrationStats, device: torch.device | str = "cpu") -> list[Any]:
        """The units of a structured method (whole modules); only called where `structured` is set."""
        raise NotImplementedError(f"method '{self.name}' factorises matrix by matrix (see `metric`)")

    @abstractmethod
    def needs(self, config: MethodSettings | None = None) -> Needs:
        """The statistics (and other resources) this method needs under `config`."""

    @abstractmethod
    def metric(self, members: Sequence[LinearInfo], cols: int, stats: CalibrationStats | None,
               config: MethodSettings, device: torch.device | str, factors: dict[tuple[str, ...], torch.Tensor]
               ) -> Metric:
        """The metric of the unit stacking `members` (each with `cols` inputs); `factors` is the
        caller's cache of Gram factors for the duration of one decomposition."""


class PlainSVD(FactorisationMethod):
    name = "svd"
    summary = "plain truncated SVD of the weight (no data)"

    def needs(self, config: MethodSettings | None = None) -> Needs:
        return NOTHING

    def metric(self, members, cols, stats, config, device, factors) -> Metric:
        return Metric()


class SVDLLM(FactorisationMethod):
    name = "svdllm"
    summary = "SVD-LLM's truncation-aware whitening: the Gram matrix XᵀX of each input"

    def needs(self, config: MethodSettings | None = None) -> Needs:
        return Needs(statistics=frozenset({"grams"}), why=("svdllm whitens with each input's Gram matrix",))

    def metric(self, members, cols, stats, config, device, factors) -> Metric:
        keys = tuple(m.input_key for m in members)
        missing = [k for k in keys if k not in stats.grams]
        if missing:
            hint = ("an MoE expert the router sent no calibration token: calibrate on more text "
                    "(--calib-samples) or keep experts out of this run" if ".experts." in missing[0]
                    else "statistics from another model?")
            raise SvdzipError(f"statistics have no Gram matrix for {missing[0]} ({hint})")
        gram = sum(stats.grams[k].to(device) for k in keys)
        if gram.shape[0] != cols:
            raise SvdzipError(f"statistics do not match the model: Gram of {keys[0]} is "
                              f"{gram.shape[0]}-dim, the weight has {cols} inputs")
        rows = sum(m.out_features for m in members)
        if rows <= cols:
            return Metric(matrix=gram)
        # tall: the eigen-route needs a factor of G, shared by the linears reading this input
        if keys not in factors:
            if len(factors) >= FACTOR_CACHE_SIZE:
                factors.pop(next(iter(factors)))
            factors[keys] = gram_factor(gram)
        return Metric(matrix=gram, factor=factors[keys])


class DiagonalMethod(FactorisationMethod):
    """A metric that is one weight per input channel, summed over the members of a unit."""

    def metric(self, members, cols, stats, config, device, factors) -> Metric:
        diags = [self.diagonal(m, stats, config) for m in members]
        return Metric(matrix=torch.stack(diags).sum(0).to(device))

    @abstractmethod
    def diagonal(self, member: LinearInfo, stats: CalibrationStats, config: MethodSettings) -> torch.Tensor:
        """G's diagonal for one linear (float64)."""


class ASVD(DiagonalMethod):
    name = "asvd"
    summary = "ASVD's activation-aware scaling: diag(mean|x|)^(2α) (or max|x| with asvd_scaling=abs_max)"

    def needs(self, config: MethodSettings | None = None) -> Needs:
        scaling = _scaling(config)
        return Needs(statistics=frozenset({scaling}), why=(f"asvd scales by each input channel's {scaling}",))

    def diagonal(self, member, stats, config) -> torch.Tensor:
        scaling = _scaling(config)
        table = stats.abs_max if scaling == "abs_max" else stats.abs_mean
        if member.input_key not in table:
            raise SvdzipError(f"statistics have no activation scales for {member.input_key}")
        s = table[member.input_key].double()
        if scaling == "abs_mean":  # Σ_batches mean|x| → mean over the batches that reached this input
            count = stats.abs_batches.get(member.input_key)
            s = s / (float(count) if count is not None else max(stats.batches, 1))
        s = (s + 1e-6) ** float(config.asvd_alpha)
        return s * s


class FWSVD(DiagonalMethod):
    name = "fwsvd"
    summary = "FWSVD's Fisher weighting: diag of the LM loss's squared gradients per input channel"

    def needs(self, config: MethodSettings | None = None) -> Needs:
        return Needs(statistics=frozenset({"fisher"}), calib_tokens=True, gradients=True, whole_model=True,
                     distributable=False,
                     why=("fwsvd's Fisher pass back-propagates the LM loss through the whole model, in one process",))

    def diagonal(self, member, stats, config) -> torch.Tensor:
        if member.name not in stats.fisher:
            raise SvdzipError(f"statistics have no Fisher information for {member.name}; recalibrate with fwsvd")
        return stats.fisher[member.name].double()


def _scaling(config: MethodSettings | None) -> str:
    scaling = getattr(config, "asvd_scaling", "abs_mean") if config is not None else "abs_mean"
    if scaling not in ASVD_SCALINGS:
        raise SvdzipError(f"asvd scaling must be one of {', '.join(ASVD_SCALINGS)}, got '{scaling}'")
    return scaling


def _registry() -> Mapping[str, FactorisationMethod]:
    """Every method by name (`methods.registry`: the module methods build on this module's base class)."""
    from svdzip.methods.registry import REGISTRY

    return REGISTRY


def available_methods() -> list[str]:
    return list(_registry())


def get_method(name: str | FactorisationMethod) -> FactorisationMethod:
    """The method called `name` (a method object passes through); a clear error listing the choices."""
    if isinstance(name, FactorisationMethod):
        return name
    registry = _registry()
    method = registry.get(name)
    if method is None:
        choices = ", ".join(f"{m.name} ({m.summary})" for m in registry.values())
        raise SvdzipError(f"unknown method '{name}'; choose a factorisation from: {choices}")
    return method


__all__ = ["FactorisationMethod", "Metric", "Settings", "available_methods", "get_method"]
