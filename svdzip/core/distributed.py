"""torch.distributed for svdzip: split the calibration data, reduce statistics, spread decompositions.

Under `torchrun` (WORLD_SIZE > 1) every rank loads the model, calibrates its contiguous slice of
the calibration sequences, and the per-layer statistics are summed (max for max|x|) with
`all_reduce`, so every rank holds the same Gram matrices. The per-unit eigen-problems are
independent: they are grouped by shared input (one matrix square root per group), assigned to
ranks by their cost (greedy longest-first, deterministic), and each finished spectrum is broadcast
from its owner, so every rank ends with identical spectra. Rank 0 allocates, materialises and
writes the output. `gloo` on CPU, `nccl` when the device is CUDA.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    """Rank, world size and where collectives must place tensors (CUDA for nccl)."""

    rank: int = 0
    world_size: int = 1
    backend: str = "none"
    comm_device: str = "cpu"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce in place (on the backend's device) and return the tensor on its original device."""
        if not self.enabled:
            return tensor
        moved = tensor.to(self.comm_device)
        dist.all_reduce(moved, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return moved.to(tensor.device)

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        if not self.enabled:
            return tensor
        moved = tensor.to(self.comm_device).contiguous()
        dist.broadcast(moved, src=src)
        return moved.to(tensor.device)

    def min_int(self, value: int) -> int:
        """The smallest `value` over ranks (where all ranks can resume from)."""
        if not self.enabled:
            return value
        t = torch.tensor([-value], dtype=torch.int64)
        return -int(self.all_reduce(t, "max").item())


def init_from_env(device: str = "cpu") -> DistContext:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR …); a no-op alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    cuda = torch.device(device).type == "cuda"
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    rank = dist.get_rank()
    comm_device = "cpu"
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        comm_device = f"cuda:{local}"
    log.info("rank %d of %d (%s)", rank, dist.get_world_size(), backend)
    return DistContext(rank=rank, world_size=dist.get_world_size(), backend=backend, comm_device=comm_device)


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def device_for_rank(device: str, ctx: DistContext) -> str:
    """`cuda` means this rank's own GPU under torchrun."""
    if ctx.enabled and device == "cuda":
        return ctx.comm_device
    return device


def data_slice(n: int, ctx: DistContext) -> slice:
    """Contiguous, near-equal share of `n` calibration sequences for this rank."""
    base, extra = divmod(n, ctx.world_size)
    start = ctx.rank * base + min(ctx.rank, extra)
    return slice(start, start + base + (1 if ctx.rank < extra else 0))


def eigen_cost(rows: int, cols: int) -> float:
    """Flops-like cost of one unit's spectrum: the small-side eigen-solve plus forming it."""
    small = min(rows, cols)
    return float(small) ** 3 + float(rows) * cols * small


def assign_by_cost(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank of each job: longest job first onto the least-loaded rank (ties → lowest rank)."""
    load = [0.0] * world_size
    owners = [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[job] = rank
        load[rank] += costs[job]
    return owners
