"""Measurements taken inside a vLLM worker (via `LLM.apply_model`): weight memory held, time per module.

Functions sent to a worker must be importable there by name, hence a library module and not a script.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

PROFILED = ("QKVParallelLinear", "MergedColumnParallelLinear", "RowParallelLinear", "Attention", "LogitsProcessor",
            "RMSNorm", "SiluAndMul", "VocabParallelEmbedding")


def weight_accounting(model: Any) -> dict[str, Any]:
    """Runs inside the vLLM worker: weight values each layer holds, and the process RSS."""
    import psutil
    import torch
    from vllm.model_executor.layers.linear import LinearBase

    held = dense = 0
    low_rank_layers = dense_layers = 0
    for module in model.modules():
        layout = getattr(module, "svdzip_layout", None)
        if layout is not None:
            held += layout.weight_elements()
            dense += layout.dense_elements()
            low_rank_layers += 1
        elif isinstance(module, LinearBase):
            n = module.input_size_per_partition * module.output_size_per_partition
            held += n
            dense += n
            dense_layers += 1
    tables = {id(m.weight): m.weight.numel() for m in model.modules()
              if type(m).__name__ in ("VocabParallelEmbedding", "ParallelLMHead")}  # a tied lm_head counts once
    emb_values = sum(tables.values())
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    size = torch.finfo(dtype).bits // 8
    return {"linear_bytes": held * size, "linear_dense_bytes": dense * size, "embedding_bytes": emb_values * size,
            "low_rank_layers": low_rank_layers, "dense_layers": dense_layers, "dtype": str(dtype),
            "rss_bytes": psutil.Process().memory_info().rss}


def install_profiler(model: Any) -> None:
    """Runs inside the worker: forward hooks summing the thread's CPU time per module class.

    CPU time, not wall time: on a shared machine other processes' load would otherwise land on
    whichever module happened to be running. The engine must run in the calling thread with one
    OpenMP thread (the benchmark's setting) for this to cover the module's whole work."""
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    model.svdzip_profile = (totals, counts)
    for module in model.modules():
        kind = type(module).__name__
        if kind not in PROFILED:
            continue

        def pre(mod: Any, args: Any, kind: str = kind) -> None:
            mod.svdzip_t0 = time.thread_time()

        def post(mod: Any, args: Any, out: Any, kind: str = kind) -> None:
            totals[kind] += time.thread_time() - mod.svdzip_t0
            counts[kind] += 1

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def reset_profile(model: Any) -> None:
    for d in model.svdzip_profile:
        d.clear()


def read_profile(model: Any) -> dict[str, Any]:
    totals, counts = model.svdzip_profile
    return {k: {"seconds": totals[k], "calls": counts[k]} for k in totals}
