"""The dtype of the matmuls of a pass over the model: float32, or a bfloat16 autocast where the device has it.

Every pass that runs the model — calibration, the Fisher signal, healing — takes a precision: "float32",
"bfloat16", or "auto" (bfloat16 where the device multiplies it natively, else float32). Under bfloat16 only
the matmuls are 16-bit (torch's autocast); weights, statistics' sums, gradients and optimiser moments stay
float32 or wider, so a pass reads the activations a bfloat16 deployment of the model produces.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

PRECISIONS = ("auto", "float32", "bfloat16")
#: torch.cpu's own CPUID probes for a CPU that multiplies bfloat16 natively (AVX512-BF16, AMX)
CPU_BF16_PROBES = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def native_bf16(device: str | torch.device) -> bool:
    """Whether `device` multiplies bfloat16 natively: a CUDA card of compute capability 8 or more (Ampere on;
    older cards emulate it, slower than float32), or a CPU with AVX512-BF16 or AMX (on this project's
    2-core AMD EPYC, AVX512-BF16, one thread: Qwen2.5-0.5B's MLP GEMM 3.8× float32's speed, its forward without
    gradients 2.9×, a training micro-batch 2.4×; `benchmarks/results/heal_precision.md`)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(torch.device(device))[0] >= 8
    return kind == "cpu" and any(getattr(torch.cpu, probe, lambda: False)() for probe in CPU_BF16_PROBES)


def compute_dtype(device: str | torch.device, precision: str) -> torch.dtype:
    """The matmuls' dtype for `precision` ("auto": bfloat16 where the device multiplies it natively)."""
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[precision]


def dtype_name(dtype: torch.dtype) -> str:
    """"float32" | "bfloat16", as reports, recipes and results record a resolved precision."""
    return str(dtype).removeprefix("torch.")


def autocast_for(device: str | torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` (weights and what is summed or trained stay float32), or nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def full_precision(device: str | torch.device) -> contextlib.AbstractContextManager:
    """No autocast inside: for the sums a pass accumulates (a Gram's products stay float32 under a bf16 pass)."""
    return torch.autocast(torch.device(device).type, enabled=False)


def _frozen_linears(model: nn.Module) -> list[nn.Linear]:
    """The linears whose float32 weight (and bias) nothing trains; a weight shared with the input embedding (a tied
    head) is left alone, since the embedding's lookup would then hand the residual stream 16-bit values."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = id(embedding.weight) if embedding is not None else None
    return [m for m in model.modules() if isinstance(m, nn.Linear) and not m.weight.requires_grad
            and (m.bias is None or not m.bias.requires_grad) and m.weight.dtype == torch.float32
            and type(m.weight.data) is torch.Tensor and id(m.weight) != tied]


def frozen_linears_to(model: nn.Module, dtype: torch.dtype, keep: bool = False
                      ) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Frozen linears' float32 weights and biases turned to `dtype` in place, one at a time; with `keep`,
    returns (parameter, its float32 tensor) pairs for `frozen_linears_in` to put back, else frees each float32
    tensor as it goes (a model used up: half its linears' memory, and never both copies at once).

    Under an autocast to `dtype` a linear multiplies in `dtype` whatever its weight's dtype, so the results
    are bit for bit the same; but autocast casts a weight that is not a trained leaf again at every forward.
    Held in `dtype`, the cast is done once (Qwen2.5-0.5B at 20 % removed, four bf16 training micro-batches
    on two threads: 7.1 → 6.0 s).
    """
    kept: list[tuple[nn.Parameter, torch.Tensor]] = []
    if dtype == torch.float32:
        return kept
    for module in _frozen_linears(model):
        for param in (module.weight, module.bias):
            if param is not None and param.dtype == torch.float32:
                if keep:
                    kept.append((param, param.data))
                param.data = param.data.to(dtype)
    return kept


@contextmanager
def frozen_linears_in(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """`frozen_linears_to` for a while, the float32 tensors put back afterwards (2 bytes an element more
    meanwhile: the size of the 16-bit copies autocast would save for each backward anyway)."""
    kept = frozen_linears_to(model, dtype, keep=True)
    try:
        yield
    finally:
        for param, original in kept:
            param.data = original
