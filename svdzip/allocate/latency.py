"""What a rank costs in time on this machine: one dense linear against its two-matmul low-rank form.

The speed-aware allocator's price list; `evaluate.speed` reports the same measurement per module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from svdzip.core.timing import median_time
from svdzip.models.lowrank import LowRankLinear


@torch.inference_mode()
def linear_timing(
    in_features: int,
    out_features: int,
    ranks: Sequence[int],
    tokens: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 5,
    clock: str = "cpu",
) -> dict[str, Any]:
    """Time one dense `nn.Linear` against `LowRankLinear` at each rank, for `tokens` rows of input.

    Why: FLOPs scale with k·(m+n) against m·n, but two small matmuls pay two dispatches and, at
    decode (one token), two weight reads with less work each; a rank can save parameters and still
    lose time. Returns seconds per call and `speedup = dense / low-rank` per rank.
    """
    dev = torch.device(device)
    x = torch.randn(tokens, in_features, device=dev, dtype=dtype)
    dense = nn.Linear(in_features, out_features, bias=False, device=dev, dtype=dtype)
    t_dense = median_time(lambda: dense(x), dev, repeats, clock)
    rows = []
    for k in ranks:
        lr = LowRankLinear(in_features, out_features, k, device=dev, dtype=dtype)
        t = median_time(lambda lr=lr: lr(x), dev, repeats, clock)
        rows.append({"rank": k, "kept_params": k * (in_features + out_features) / (in_features * out_features),
                     "seconds": t, "speedup": t_dense / t})
    return {"in": in_features, "out": out_features, "tokens": tokens, "dense_seconds": t_dense, "ranks": rows,
            "threads": torch.get_num_threads(), "clock": clock}


def break_even_rank(timing: dict[str, Any]) -> int | None:
    """Largest measured rank that is still at least as fast as dense (None if none is)."""
    fast = [r["rank"] for r in timing["ranks"] if r["speedup"] >= 1.0]
    return max(fast) if fast else None
