"""The hybrid: every module chooses between MoDeGPT's slimming and SVD-LLM factorisation of its matrices.

A `ChoiceUnit` is one module (an MLP, a key–query or value–output pair) with two families of
options: slim it (`methods.modegpt`, any width) or factorise each of its matrices (SVD-LLM, any
rank, each matrix possibly dense). The loss-aware allocator weighs every alternative's loss by
what it costs the model (the output Fisher of the linear where that loss appears: the MLP's
output for slimming, each matrix's own output for its factorisation), then `prepare` turns them
into one list of options sorted by cost, each cheaper than dense and better than every cheaper
one. The unit's "rank" is the index into that list, so the allocator's greedy over concave hulls
chooses, per module and globally under the budget, both the family and how deep.

Matrices that MoDeGPT cannot slim in a family (Gemma's q/k, with per-head norms; Phi-3's fused gate/up) are
ordinary factorisation units here, so nothing stays dense for lack of a method.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from svdzip.budget import DENSE
from svdzip.errors import SvdzipError
from svdzip.methods.decompose import Unit, decompose, hull_segments
from svdzip.methods.factorisations import FactorisationMethod, Metric
from svdzip.methods.linalg import Spectrum
from svdzip.methods.modegpt import KeptUnit, MoDeGPT, SlimUnit
from svdzip.models.adapter import ModelAdapter
from svdzip.needs import Needs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Option:
    cost: int
    loss: float  # weighted
    slim: int | None = None  # width, where the module is slimmed
    ranks: tuple[int | None, ...] = ()  # one per factorised matrix (None = that matrix dense), otherwise


def factorised_options(parts: Sequence[Unit], weights: Sequence[float]) -> list[Option]:
    """The factorisations' Pareto front: every matrix from rank 1 up its own concave hull, steps of all matrices
    merged by decreasing loss removed per parameter (each matrix may end dense)."""
    ranks: list[int | None] = [1 if p.max_rank >= 1 else DENSE for p in parts]
    cost = sum(p.cost(r) for p, r in zip(parts, ranks, strict=True))
    loss = sum(w * (p.spectrum.tail(r) if r is not DENSE else 0.0) for p, w, r in zip(parts, weights, ranks,
                                                                                       strict=True))
    steps = [(gain, i, reach, step) for i, (p, w) in enumerate(zip(parts, weights, strict=True))
             if ranks[i] is not DENSE for gain, reach, step in hull_segments(p, w)]
    steps.sort(key=lambda s: -s[0])
    options = [Option(cost, loss, ranks=tuple(ranks))]
    for gain, i, reach, step in steps:
        ranks[i] = reach
        cost += step
        loss = max(0.0, loss - gain * step)
        options.append(Option(cost, loss, ranks=tuple(ranks)))
    return options


def pareto(options: Sequence[Option], dense_cost: int) -> list[Option]:
    """Cheaper than dense, sorted by cost, each with less loss than every cheaper one."""
    front: list[Option] = []
    for o in sorted(options, key=lambda o: (o.cost, o.loss)):
        if o.cost < dense_cost and (not front or o.loss < front[-1].loss):
            front.append(o)
    return front


@dataclass
class ChoiceUnit(Unit):
    """A module whose rank is an index into its options: slimmed at some width, or its matrices factorised."""

    slim: SlimUnit | None = None
    parts: list[Unit] = field(default_factory=list)  # one factorisation unit per member, in member order
    options: list[Option] = field(default_factory=list)
    slimmed: ClassVar[bool] = True
    chooses: ClassVar[bool] = True

    @property
    def name(self) -> str:
        return self.slim.name

    @property
    def role(self) -> str:
        return self.slim.role

    @property
    def alternatives(self) -> list[Unit]:
        """The units whose losses `prepare` needs weights for."""
        return [self.slim, *self.parts]

    def prepare(self, weight: Callable[[Unit], float]) -> None:
        """Build the options under the allocator's weights; the unit's curve is their losses from then on."""
        w_slim = weight(self.slim)
        slim = [Option(self.slim.cost(k), w_slim * self.slim.spectrum.tail(k), slim=k)
                for k in range(1, self.slim.max_rank + 1)]
        self.options = pareto(slim + factorised_options(self.parts, [weight(p) for p in self.parts]),
                              self.dense_params)
        losses = torch.tensor([o.loss for o in self.options], dtype=torch.float64)
        sigma2 = torch.zeros(len(self.options) + 1, dtype=torch.float64)
        if len(self.options):
            sigma2[1:-1] = losses[:-1] - losses[1:]
            sigma2[-1] = losses[-1]
        self.spectrum = Spectrum(sigma2=sigma2, basis=torch.zeros(0, 0))

    def _ready(self) -> None:
        if not self.options:
            raise SvdzipError("the hybrid's options are built by the loss-aware allocator (--allocator loss-aware)")

    @property
    def dense_params(self) -> int:
        return sum(m.dense_params for m in self.members)

    @property
    def cost_per_rank(self) -> int:
        return self.slim.cost_per_rank

    def cost(self, rank: int | None) -> int:
        if rank is DENSE:
            return self.dense_params
        self._ready()
        return self.options[rank - 1].cost

    @property
    def max_rank(self) -> int:
        return len(self.options)

    def uniform_rank(self, ratio: float) -> int | None:
        """The best option within this module's share of a uniform budget (the guard's baseline)."""
        self._ready()
        fits = [i for i, o in enumerate(self.options) if o.cost <= (1.0 - ratio) * self.dense_params]
        return (fits[-1] + 1) if fits else 1

    def factorised_at(self, rank: int | None) -> list[tuple[Unit, int | None]] | None:
        """Each matrix's unit and rank where the option at `rank` factorises the module; None where it slims it or
        keeps it dense (what ARA, refining the factorised matrices of the hybrid's choice, holds fixed)."""
        if rank is DENSE:
            return None
        self._ready()
        option = self.options[rank - 1]
        return None if option.slim is not None else list(zip(self.parts, option.ranks, strict=True))

    def factorised_option(self, ranks: Sequence[int | None]) -> int | None:
        """The rank (option) that factorises the matrices at `ranks`; DENSE where that costs no less than dense. An
        option the Pareto menu pruned is added after it (its loss unknown: nan), so the menu's indices keep their
        meaning for every allocation made before."""
        ranks = tuple(ranks)
        self._ready()
        cost = sum(p.cost(r) for p, r in zip(self.parts, ranks, strict=True))
        if cost >= self.dense_params:
            return DENSE
        for i, o in enumerate(self.options):
            if o.slim is None and o.ranks == ranks:
                return i + 1
        self.options.append(Option(cost, math.nan, ranks=ranks))
        return len(self.options)

    def materialise(self, adapter: ModelAdapter, rank: int | None) -> list[Any]:
        if rank is DENSE:
            return self.slim.materialise(adapter, DENSE)
        self._ready()
        option = self.options[rank - 1]
        if option.slim is not None:
            return self.slim.materialise(adapter, option.slim)
        rows = []
        for part, r in zip(self.parts, option.ranks, strict=True):
            rows += part.materialise(adapter, r)
        return rows


class Hybrid(FactorisationMethod):
    name = "hybrid"
    summary = ("per module, the loss-aware choice between MoDeGPT's slimming and SVD-LLM factorisation of its "
               "matrices (or dense), under one budget")
    structured = True
    chooses = True
    allocators: ClassVar[tuple[str, ...]] = ("loss-aware", "ara")
    #: `auto`: the recommended recipe's loss-aware (guarded on held-out windows, as MoDeGPT's) and distillation
    recommended: ClassVar[dict[str, Any] | None] = {"allocator": "loss-aware", "allocator_options": {"guard": True},
                                                    "heal": "distill"}

    def needs(self, config: Any = None) -> Needs:
        return MoDeGPT().needs(config)

    def metric(self, members, cols, stats, config, device, factors) -> Metric:
        raise SvdzipError("hybrid chooses per module; it has no per-matrix metric")

    def build_units(self, adapter: ModelAdapter, stats: Any, device: torch.device | str = "cpu",
                    tokens: torch.Tensor | None = None) -> list[Unit]:
        slimmable = MoDeGPT().build_units(adapter, stats, device, tokens, skip_fused=True)
        members = [[m] for u in slimmable for m in u.members]
        spectra = {u.members[0].name: u for u in decompose(adapter, stats, "svdllm", members, device=device)}
        units: list[Unit] = []
        for u in slimmable:
            parts = [spectra[m.name] for m in u.members]
            if isinstance(u, KeptUnit):
                units += parts
            else:
                units.append(ChoiceUnit(members=u.members, spectrum=u.spectrum, seconds=u.seconds
                                        + sum(p.seconds for p in parts), slim=u, parts=parts))
        return units
