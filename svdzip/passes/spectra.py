"""Spectra of every unit, spread over ranks by cost, checkpointed per unit, broadcast back.

Units reading the same inputs form one job (their metric's factor is computed once); jobs go to ranks
by estimated cost (`assign_by_cost`), each finished spectrum is a file of the run directory when the
run is resumable, and every rank ends with every unit. One process and no run directory is the trivial
case of the same loop.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from tqdm.auto import tqdm

from svdzip.core.checkpoint import placeholder, release_memory
from svdzip.core.distributed import DistContext, assign_by_cost, eigen_cost
from svdzip.core.layerwise import WeightSource
from svdzip.core.resume import RunState, fault
from svdzip.methods.decompose import Unit, decompose
from svdzip.methods.factorisations import MethodChoice
from svdzip.methods.linalg import Spectrum
from svdzip.models.adapter import LinearInfo, ModelAdapter

log = logging.getLogger(__name__)


def _jobs(groups: list[list[LinearInfo]]) -> list[list[int]]:
    """Units reading the same inputs go together: their metric's square root is computed once."""
    by_key: dict[tuple[str, ...], list[int]] = {}
    for i, members in enumerate(groups):
        by_key.setdefault(tuple(m.input_key for m in members), []).append(i)
    return list(by_key.values())


def _job_cost(groups: list[list[LinearInfo]], job: list[int]) -> float:
    cols = groups[job[0]][0].in_features
    return float(cols) ** 3 + sum(eigen_cost(sum(m.out_features for m in groups[u]), cols) for u in job)


def decompose_units(adapter: ModelAdapter, stats: Any, config: MethodChoice, groups: list[list[LinearInfo]],
                    *, weights: WeightSource | None = None, on_disk: bool = False,
                    state: RunState | None = None, ctx: DistContext | None = None,
                    device: str = "cpu") -> list[Unit]:
    """Spectra of every unit: this rank's share computed (or restored), then everyone's broadcast.

    With `on_disk` (streaming) every basis waits in the run directory and the units carry placeholders.
    """
    ctx = ctx or DistContext()
    if weights is None:
        from svdzip.core.layerwise import ResidentWeights

        weights = ResidentWeights(adapter.model, adapter)
    jobs = _jobs(groups)
    owners = assign_by_cost([_job_cost(groups, j) for j in jobs], ctx.world_size)
    owner_of = {u: owners[j] for j, job in enumerate(jobs) for u in job}
    done: dict[int, Unit] = {}
    mine = [job for job, owner in zip(jobs, owners, strict=True) if owner == ctx.rank]
    log.info("spectra of %d units (%s)%s", len(groups), config.method,
             f", restored from {state.root} where finished" if state is not None else "")
    for job in tqdm(mine, desc=f"decomposing ({config.method})" + (f", rank {ctx.rank}" if ctx.enabled else ""),
                    unit="group"):
        todo = []
        for u in job:
            # streaming: a restored basis stays on disk (the writer reads it again when its layer is written)
            restored = state.load_unit(u, _unit_name(groups[u]), basis=not on_disk) if state else None
            if restored is not None:
                sigma2, basis, secs = restored
                done[u] = Unit(members=list(groups[u]), spectrum=Spectrum(sigma2, basis), seconds=secs)
            else:
                todo.append(u)
        if not todo:
            continue
        names = [m.name for u in todo for m in groups[u]]
        with weights.linears(names):
            units = decompose(adapter, stats, config.method, [groups[u] for u in todo], config.asvd_alpha,
                              config.asvd_scaling, device=device, progress=False)
        for u, unit in zip(todo, units, strict=True):
            if state is not None:
                state.save_unit(u, unit.name, unit.spectrum.sigma2, unit.spectrum.basis, unit.seconds)
                if on_disk:  # streaming: the basis waits on disk, not in memory
                    unit.spectrum = Spectrum(unit.spectrum.sigma2, placeholder(tuple(unit.spectrum.basis.shape)))
            done[u] = unit
            fault("unit", u)
        if on_disk:
            release_memory()
    return _gather(groups, done, owner_of, ctx, state, keep_basis=not on_disk)


def _unit_name(members: list[LinearInfo]) -> str:
    return members[0].name if len(members) == 1 else "+".join(m.name for m in members)


def _gather(groups: list[list[LinearInfo]], done: dict[int, Unit], owner_of: dict[int, int], ctx: DistContext,
            state: RunState | None, keep_basis: bool) -> list[Unit]:
    """Every unit's spectrum on every rank, in unit order (owner broadcasts shape, σ² + time, basis)."""
    result: list[Unit] = []
    for u, members in enumerate(groups):
        unit = done.get(u)
        if ctx.enabled:
            src = owner_of[u]
            mine = ctx.rank == src
            r = min(sum(m.out_features for m in members), members[0].in_features)
            shape = torch.tensor(list(unit.spectrum.basis.shape) if mine else [0, 0], dtype=torch.int64)
            shape = ctx.broadcast(shape, src)
            head = torch.zeros(r + 1, dtype=torch.float64)
            if mine:
                head[:r], head[r] = unit.spectrum.sigma2.double(), unit.seconds
            head = ctx.broadcast(head, src)
            if mine and unit.spectrum.basis.device.type == "meta":  # streamed: read back from the run dir
                unit.spectrum = Spectrum(unit.spectrum.sigma2, state.load_unit(u, unit.name)[1])
            basis = unit.spectrum.basis.float() if mine else torch.zeros(*shape.tolist(), dtype=torch.float32)
            basis = ctx.broadcast(basis, src)
            if not mine:
                unit = Unit(members=list(members), spectrum=Spectrum(head[:r].clone(), basis),
                            seconds=float(head[r]))
                if state is not None and ctx.is_main and not keep_basis:
                    state.save_unit(u, unit.name, unit.spectrum.sigma2, basis, unit.seconds)
        if not keep_basis:
            unit.spectrum = Spectrum(unit.spectrum.sigma2, placeholder(tuple(unit.spectrum.basis.shape)))
        result.append(unit)
    return result
