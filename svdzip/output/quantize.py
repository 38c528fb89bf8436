"""Weight-only quantization of chosen linears through torchao, stored for real (int8 bytes on disk and in memory).

Why torchao: it is the PyTorch team's own quantization library, released in step with torch (0.18 for torch
2.13), its int8 weight-only tensor (`Int8WeightOnlyConfig` → `Int8Tensor`: int8 values, one float32 scale and
int8 zero point per row) runs on any CPU, and it serialises to plain safetensors through its own
`flatten_tensor_state_dict` / `unflatten_tensor_state_dict`. optimum-quanto is in maintenance mode; HQQ would
add a second serialisation format for one more precision.

int4 is refused on a CPU: torchao's int4 layouts need CUDA (tile-packed, tinygemm), XPU (plain int32) or the
mslk kernels; the one layout that runs on this x86 CPU (`IntxUnpackedToInt8Tensor`) keeps each 4-bit value in
a whole byte, so it would cost as much memory as int8 while losing more — no memory saving to report.

What a saved directory holds: the quantized weights go to `svdzip_quantized.safetensors` (torchao's flattened
tensors, its JSON metadata in the file header); `model.safetensors` holds everything else. The svdzip
transformers quantizer puts a weightless `QuantizedSlot` where each quantized linear was, lets transformers load
the rest, then rebuilds the linears from the quantized file.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import itertools
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svdzip.errors import SvdzipError

log = logging.getLogger(__name__)

BACKEND = "torchao"
PRECISIONS = ("int8", "int4")
SCOPES = ("all", "dense", "factors")  # what is quantized: every stored matrix, the dense remainder, the factors
QUANT_FILE = "svdzip_quantized.safetensors"
INSTALL_HINT = "pip install 'svdzip[quant]'   (installs torchao)"


@contextlib.contextmanager
def quiet_backend_import() -> Iterator[None]:
    """Import torchao (directly, or through transformers' quantizer registry) without its import-time noise on a
    CPU machine: CUDA kernels it cannot load and a torch deprecation notice, harmless for the CPU int8 path."""
    noisy = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [n.level for n in noisy]
    for n in noisy:
        n.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in zip(noisy, levels, strict=True):
            n.setLevel(level)


def _import_backend() -> Any:
    with quiet_backend_import():
        return importlib.import_module(BACKEND)


def backend_installed() -> bool:
    return importlib.util.find_spec(BACKEND) is not None


def require_backend(precision: str, device: str | torch.device = "cpu", why: str = "") -> None:
    """Fail early, with how to fix it, when this precision cannot be stored for real here."""
    if precision not in PRECISIONS:
        raise SvdzipError(f"unknown quantization '{precision}'; choose from {', '.join(PRECISIONS)}")
    if not backend_installed():
        raise SvdzipError(f"{why or f'{precision} quantization'} needs the torchao backend, which is not installed: "
                          f"{INSTALL_HINT}")
    if precision == "int4" and torch.device(device).type == "cpu":
        raise SvdzipError("int4 weight-only quantization is not supported on this CPU by torchao: its int4 layouts "
                          "need CUDA, XPU or the mslk kernels, and its only CPU layout stores every 4-bit value in a "
                          "full byte (no memory saving over int8). Use --quantize int8, or int4 on a CUDA device")


def _config(precision: str) -> Any:
    _import_backend()
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    if precision == "int8":
        return Int8WeightOnlyConfig()
    return Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")


def quantize_linears(model: nn.Module, names: Iterable[str], precision: str) -> list[str]:
    """Quantize the named `nn.Linear`s of `model` in place; returns the names actually quantized.

    A linear with a single input (the left factor at rank 1) stays unquantized: torchao's per-row int8
    rejects that shape, and its m values in 16-bit cost less than m int8 values plus m row scales anyway.
    """
    _import_backend()
    from torchao.quantization import quantize_

    wanted = set(names)
    modules = dict(model.named_modules())
    missing = sorted(n for n in wanted if not isinstance(modules.get(n), nn.Linear))
    if missing:
        raise SvdzipError(f"cannot quantize {missing[0]}: not a linear of this model")
    narrow = {n for n in wanted if modules[n].in_features < 2}
    if narrow:
        log.debug("not quantizing %d single-input linears (rank-1 left factors)", len(narrow))
        wanted -= narrow
    quantize_(model, _config(precision), filter_fn=lambda mod, fqn: fqn in wanted and isinstance(mod, nn.Linear))
    return sorted(wanted)


def storage_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really occupies: a tensor subclass (torchao) is the sum of the plain tensors it holds."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is None or type(t) in (torch.Tensor, nn.Parameter):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(storage_bytes(getattr(t, n)) for n in names if getattr(t, n) is not None)


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's unique parameters as stored, plus the packed low-bit weights (buffers of
    `LowBitLinear`): what a memory budget counts. Other buffers, such as rotary frequencies, are recomputed on
    load, not saved."""
    from svdzip.output.lowbit import lowbit_linears

    packed = sum(m.stored_bytes for m in lowbit_linears(model).values())
    return sum(storage_bytes(p) for p in model.parameters()) + packed


def is_quantized(t: torch.Tensor) -> bool:
    return type(t) not in (torch.Tensor, nn.Parameter) and hasattr(type(t), "__tensor_flatten__")


def quantized_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linears of `model` whose weight is a quantized tensor."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and is_quantized(m.weight)}


def row_overhead_bytes(precision: str, dtype: torch.dtype) -> float:
    """Bytes per row the library stores beside the quantized values (scale, zero point), measured, not assumed."""
    rows, cols = 4, 256
    probe = nn.Sequential(nn.Linear(cols, rows, bias=False, dtype=dtype))
    quantize_linears(probe, ["0"], precision)
    return (storage_bytes(probe[0].weight) - rows * cols * value_bytes(precision, dtype)) / rows


def value_bytes(precision: str | None, dtype: torch.dtype) -> float:
    """Bytes of one stored weight value: int8 → 1, int4 → 0.5, unquantized → the dtype's size."""
    if precision is None:
        return torch.empty((), dtype=dtype).element_size()
    return {"int8": 1.0, "int4": 0.5}[precision]


class QuantizedSlot(nn.Module):
    """Stands where a quantized linear was while transformers loads the checkpoint: holds only its bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device: Any = None, dtype: Any = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise SvdzipError("this linear's quantized weight was never loaded (svdzip_quantized.safetensors missing?)")


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


def swap_in_slots(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """Replace each named linear by a `QuantizedSlot`; returns the originals (for `restore`)."""
    originals = {}
    for name in names:
        old = model.get_submodule(name)
        weight = getattr(old, "weight", None)
        slot = QuantizedSlot(old.in_features, old.out_features, getattr(old, "bias", None) is not None,
                             device=None if weight is None else weight.device,
                             dtype=None if weight is None else (old.bias.dtype if old.bias is not None else None))
        if old.bias is not None and old.bias.device.type != "meta":
            slot.bias = old.bias
        parent, child = _parent(model, name)
        setattr(parent, child, slot)
        originals[name] = old
    return originals


def restore(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    for name, module in originals.items():
        parent, child = _parent(model, name)
        setattr(parent, child, module)


def save_quantized(model: nn.Module, names: Sequence[str], path: Path) -> None:
    """Write the named linears' quantized weights (torchao's flattened form) to one safetensors file."""
    _import_backend()
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    weights = {f"{n}.weight": model.get_submodule(n).weight.detach() for n in names}
    tensors, metadata = flatten_tensor_state_dict(weights)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def load_quantized(model: nn.Module, path: Path) -> list[str]:
    """Rebuild every `QuantizedSlot` of `model` as a linear whose weight comes from the quantized file."""
    _import_backend()
    from safetensors import safe_open
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    if not path.is_file():
        raise SvdzipError(f"{path.parent} lists quantized linears but has no {path.name}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    weights, leftover = unflatten_tensor_state_dict(tensors, metadata)
    if leftover:
        raise SvdzipError(f"{path} has tensors no quantized weight uses: {sorted(leftover)[:3]}")
    slots = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedSlot)}
    for name, slot in slots.items():
        key = f"{name}.weight"
        if key not in weights:
            raise SvdzipError(f"{path} has no quantized weight for {name}")
        device = slot.bias.device if slot.bias is not None else _device_near(model, name)
        linear = nn.Linear(slot.in_features, slot.out_features, bias=slot.bias is not None, device="meta")
        linear.weight = nn.Parameter(weights[key].to(device), requires_grad=False)
        if slot.bias is not None:
            linear.bias = slot.bias
        parent, child = _parent(model, name)
        setattr(parent, child, linear)
    return sorted(slots)


def _device_near(model: nn.Module, name: str) -> torch.device:
    """Where the module `name` lives when it holds no tensor: the device of its nearest enclosing tensors."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        module = model.get_submodule(".".join(parts[:depth]))
        for t in itertools.chain(module.parameters(), module.buffers()):
            return t.device
    return torch.device("cpu")


def quantization_record(names: Sequence[str], precision: str, scope: str, dtype: torch.dtype) -> dict[str, Any]:
    """The manifest's `quantization` entry: enough to rebuild the model and to tell a user what it needs."""
    torchao = _import_backend()
    return {"backend": BACKEND, "backend_version": torchao.__version__, "precision": precision, "scope": scope,
            "dtype": str(dtype).removeprefix("torch."), "file": QUANT_FILE, "modules": list(names)}
