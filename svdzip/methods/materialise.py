"""Materialise: replace each unit's linears by low-rank modules at the allocated rank."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from svdzip.budget import DENSE
from svdzip.methods.decompose import Unit
from svdzip.methods.linalg import truncate
from svdzip.models.adapter import ModelAdapter
from svdzip.models.lowrank import LowRankLinear


@dataclass
class ModuleReport:
    """One line of the per-matrix table users read in the log and in `svdzip info`."""

    name: str
    role: str
    layer: int
    out_features: int
    in_features: int
    rank: int | None  # None = kept dense
    params: int  # stored parameters of this module (a shared basis is counted once, at its leader)
    kept: float  # params / dense params
    loss: float  # relative data-weighted truncation loss tail(k) / energy of its unit
    seconds: float
    shared_with: str | None = None
    bits: int | None = None  # stored at these bits (HQQ, packed); None = 16/32-bit
    compensation_rank: int = 0  # rank of the low-rank correction of its quantization error
    width: int | None = None  # neurons its slimmed MLP keeps (MoDeGPT); None = not slimmed

    def to_dict(self) -> dict:
        return asdict(self)


def materialise(adapter: ModelAdapter, units: list[Unit], ranks: list[int | None]) -> list[ModuleReport]:
    """Every unit built at its rank, by the unit itself (factors, or a slimmed module); the report rows."""
    rows: list[ModuleReport] = []
    for unit, rank in zip(units, ranks, strict=True):
        rows += unit.materialise(adapter, rank)
    return rows


@torch.no_grad()
def factorise_units(adapter: ModelAdapter, units: list[Unit], ranks: list[int | None]) -> list[ModuleReport]:
    """Replace each unit's linears by low-rank modules at its rank (a shared basis for a group)."""
    rows: list[ModuleReport] = []
    for unit, rank in zip(units, ranks, strict=True):
        energy = unit.spectrum.energy
        loss = 0.0 if rank is DENSE or energy <= 0 else unit.spectrum.tail(rank) / energy
        if rank is DENSE:
            for m in unit.members:
                rows.append(ModuleReport(m.name, m.role, m.layer, m.out_features, m.in_features, None,
                                         m.dense_params, 1.0, 0.0, unit.seconds / len(unit.members)))
            continue
        modules = [adapter.module(m.name) for m in unit.members]
        dtype = modules[0].weight.dtype
        stacked = torch.cat([mod.weight.detach() for mod in modules], 0)
        a, b = truncate(stacked, unit.spectrum.basis.to(stacked.device), rank)
        a, b = a.to(dtype), b.to(dtype)
        shared: nn.Linear | None = None
        if len(modules) > 1:
            shared = nn.Linear(unit.cols, rank, bias=False, device=b.device, dtype=dtype)
            shared.weight.copy_(b)
        offset = 0
        leader = unit.members[0].name
        for i, (info, mod) in enumerate(zip(unit.members, modules, strict=True)):
            a_i = a[offset : offset + info.out_features]
            offset += info.out_features
            bias = mod.bias.detach() if getattr(mod, "bias", None) is not None else None
            if shared is None:
                new = LowRankLinear.from_factors(a_i, b, bias)
            else:
                new = LowRankLinear(info.in_features, info.out_features, rank, bias=bias is not None,
                                    shared_right=shared, device=a.device, dtype=dtype)
                new.left.weight.copy_(a_i)
                if i > 0:
                    new.share_basis_of(leader)
                if bias is not None:
                    new.left.bias.copy_(bias)
            adapter.set_module(info.name, new)
            params = rank * info.out_features + (rank * info.in_features if i == 0 else 0)
            rows.append(ModuleReport(info.name, info.role, info.layer, info.out_features, info.in_features,
                                     rank, params, params / info.dense_params, loss,
                                     unit.seconds / len(unit.members),
                                     shared_with=None if shared is None or i == 0 else leader))
    return rows
