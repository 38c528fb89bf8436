"""MoDeGPT (methods-spec §11): modules compressed as a whole, each shared inner dimension made smaller.

Built so far: Type I, the MLP slimmed by Nyström (`methods.nystrom`): gate/up keep the rows of the
kept neurons, `down_proj` is refitted to them in closed form. An MLP is one `SlimUnit` whose "rank"
is its width, so the allocators that understand widths (uniform, loss-aware, block-influence) spend
the budget over slimmed MLPs exactly as over factorised matrices. The attention's key–query (Type II)
and value–output (Type III) modules need per-layer head dimensions inside the attention; until they
exist the attention is kept dense (`KeptUnit`), and `--ratio` still counts every decoder linear, so the
MLPs carry the whole reduction. The slimmed linears are plain `nn.Linear`s of the new shapes
(`output.slimmed` records them in the manifest and rebuilds them on reload).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from svdzip.budget import DENSE
from svdzip.errors import SvdzipError
from svdzip.methods.decompose import Unit
from svdzip.methods.factorisations import FactorisationMethod, Metric
from svdzip.methods.linalg import Spectrum
from svdzip.methods.nystrom import (
    LEVERAGE_RIDGE,
    REFIT_JITTER,
    NystromCurve,
    leverage_order,
    nystrom_curve,
    nystrom_refit,
)
from svdzip.models.adapter import LinearInfo, ModelAdapter
from svdzip.needs import Needs

log = logging.getLogger(__name__)

#: the roles that read the MLP's input (their rows are the neurons) and the one that reads the neurons
NEURON_ROLES = ("gate", "up", "expert_gate", "expert_up")
DOWN_ROLES = ("down", "expert_down")


def _empty_spectrum(sigma2: torch.Tensor) -> Spectrum:
    return Spectrum(sigma2=sigma2, basis=torch.zeros(0, 0))


@dataclass
class KeptUnit(Unit):
    """A linear this method keeps dense: it counts in the budget and never takes a rank."""

    @property
    def max_rank(self) -> int:
        return 0

    def uniform_rank(self, ratio: float) -> int | None:
        return DENSE


@dataclass
class SlimUnit(Unit):
    """One MLP (gate/up + down, or up + down) whose rank is the number of neurons it keeps."""

    curve: NystromCurve | None = None
    width: int = 0  # neurons of the dense MLP
    path: str = ""  # the module holding the MLP's linears
    neuron_params: int = 0  # weights one neuron costs: its gate/up rows and its down column
    slimmed: ClassVar[bool] = True

    @property
    def name(self) -> str:
        return self.path

    @property
    def role(self) -> str:
        return "mlp"

    @property
    def loss_members(self) -> list[LinearInfo]:
        return [m for m in self.members if m.role in DOWN_ROLES]  # the error is measured at the MLP's output

    @property
    def cost_per_rank(self) -> int:
        return self.neuron_params

    @property
    def dense_params(self) -> int:
        return sum(m.dense_params for m in self.members)

    def cost(self, rank: int | None) -> int:
        if self.pricing is not None:
            raise SvdzipError("slimmed MLPs are priced in parameters; a memory budget is not supported with them yet")
        return self.dense_params if rank is DENSE else rank * self.neuron_params

    @property
    def max_rank(self) -> int:
        return self.width - 1

    def uniform_rank(self, ratio: float) -> int | None:
        """The same fraction of neurons as of parameters (MoDeGPT's `floor(m · keep)`)."""
        return max(1, int((1.0 - ratio) * self.width))

    def materialise(self, adapter: ModelAdapter, rank: int | None) -> list[Any]:
        return slim_mlp(adapter, self, rank)


class MoDeGPT(FactorisationMethod):
    name = "modegpt"
    summary = ("MoDeGPT's modular decomposition: each MLP slimmed by Nyström (ridge leverage scores, down_proj "
               "refitted); attention kept dense (its key-query and value-output modules are not built yet)")
    structured = True
    #: what `auto` means with this method: the paper's block-influence allocation, no training
    recommended: ClassVar[dict[str, Any] | None] = {"allocator": "block-influence", "allocator_options": {},
                                                    "heal": "none"}

    def needs(self, config: Any = None) -> Needs:
        return Needs(statistics=frozenset({"grams"}), whole_model=True,
                     why=("modegpt refits each MLP's down projection on its input's Gram matrix, in memory",))

    def metric(self, members, cols, stats, config, device, factors) -> Metric:
        raise SvdzipError("modegpt slims whole modules; it has no per-matrix metric")

    def build_units(self, adapter: ModelAdapter, stats: Any, device: torch.device | str = "cpu",
                    ridge: float = LEVERAGE_RIDGE, jitter: float = REFIT_JITTER) -> list[Unit]:
        """Every MLP as a `SlimUnit` (its Nyström curve computed), every other linear as a `KeptUnit`."""
        mlps, kept = mlp_blocks(adapter)
        units: list[Unit] = [KeptUnit(members=[info], spectrum=_empty_spectrum(torch.zeros(1, dtype=torch.float64)))
                             for info in kept]
        for path, members in tqdm(mlps.items(), desc="MoDeGPT: Nyström curves of the MLPs", unit="mlp"):
            t0 = time.perf_counter()
            down = next(m for m in members if m.role in DOWN_ROLES)
            if down.input_key not in stats.grams:
                raise SvdzipError(f"statistics have no Gram matrix for {down.input_key} (the input of {down.name})")
            gram = stats.grams[down.input_key].to(device)
            weight = adapter.module(down.name).weight.detach().to(device)
            curve = nystrom_curve(gram, weight, leverage_order(gram, ridge), jitter, dtype=torch.float32)
            curve = NystromCurve(curve.order.cpu(), curve.factor.cpu(), curve.whitened.cpu())
            # the budget counts weights (as for a factorisation's): a neuron's rows and its down column
            per_neuron = sum(m.in_features for m in members if m.role in NEURON_ROLES) + down.out_features
            units.append(SlimUnit(members=members, spectrum=_empty_spectrum(curve.sigma2),
                                  seconds=time.perf_counter() - t0, curve=curve, width=down.in_features, path=path,
                                  neuron_params=per_neuron,
                                  extras={"ridge": ridge, "jitter": jitter}))
        return units


def mlp_blocks(adapter: ModelAdapter) -> tuple[dict[str, list[LinearInfo]], list[LinearInfo]]:
    """The MLPs ({module path: [neuron linears…, down]}) and the linears outside them, in model order."""
    by_parent: dict[str, list[LinearInfo]] = {}
    others: list[LinearInfo] = []
    for info in adapter.linears():
        if info.role in NEURON_ROLES or info.role in DOWN_ROLES:
            by_parent.setdefault(info.name.rpartition(".")[0], []).append(info)
        elif info.role in ("gate_up",):
            raise SvdzipError(f"modegpt slims an MLP's neurons in separate gate/up projections; {info.name} fuses "
                              "them (Phi-3), which is not supported yet")
        else:
            others.append(info)
    for path, members in by_parent.items():
        downs = [m for m in members if m.role in DOWN_ROLES]
        if len(downs) != 1 or len(members) < 2:
            raise SvdzipError(f"modegpt found no complete MLP at {path} (roles {[m.role for m in members]})")
        width = downs[0].in_features
        bad = [m.name for m in members if m.role in NEURON_ROLES and m.out_features != width]
        if bad:
            raise SvdzipError(f"{bad[0]} has a different width than {downs[0].name} reads ({width})")
    return by_parent, others


@torch.no_grad()
def slim_mlp(adapter: ModelAdapter, unit: SlimUnit, rank: int | None) -> list[Any]:
    """Replace the unit's linears by the MLP slimmed to `rank` neurons (dense: unchanged); their report rows."""
    from svdzip.methods.materialise import ModuleReport

    share = unit.seconds / len(unit.members)
    if rank is DENSE:
        return [ModuleReport(m.name, m.role, m.layer, m.out_features, m.in_features, None, m.dense_params, 1.0,
                             0.0, share) for m in unit.members]
    kept, down = nystrom_refit(unit.curve, rank)
    energy = unit.spectrum.energy
    loss = unit.curve.tail(rank) / energy if energy > 0 else 0.0
    rows = []
    for info in unit.members:
        old = adapter.module(info.name)
        weight, bias = old.weight.detach(), getattr(old, "bias", None)
        if info.role in DOWN_ROLES:
            new = nn.Linear(rank, info.out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
            new.weight.copy_(down.to(weight))
            if bias is not None:
                new.bias.copy_(bias)
        else:
            index = kept.to(weight.device)
            new = nn.Linear(info.in_features, rank, bias=bias is not None, device=weight.device, dtype=weight.dtype)
            new.weight.copy_(weight[index])
            if bias is not None:
                new.bias.copy_(bias[index])
        adapter.set_module(info.name, new)
        params = new.weight.numel()
        rows.append(ModuleReport(info.name, info.role, info.layer, info.out_features, info.in_features, None, params,
                                 params / info.dense_params, loss, share, width=rank))
    return rows
