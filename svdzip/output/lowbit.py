"""Sub-8-bit weights (8/4/3/2 bits) through HQQ, packed for real, with an optional low-rank compensation.

Why HQQ (methods-spec §12.9, and tried on this machine): it is the one maintained library on PyPI that stores
4-, 3- and 2-bit weights genuinely packed (two 4-bit or four 2-bit values per byte, ten 3-bit values per
int32) *and* quantizes and runs them on a CPU; its optimiser needs no calibration data. torchao 0.18 keeps
sub-byte values one per byte on this CPU, optimum-quanto has packed int2/int4 but only int4 with a native CPU
kernel, and GPTQ needs calibration and CUDA for its fast kernels. HQQ's forward on a CPU dequantizes the
layer's weight and multiplies; svdzip's `LowBitLinear` serves bf16 inference on a CPU through torch's fused int4
kernel instead (`output.cpu_int4`: the codes at 4, 3 and 2 bits, and 8-bit codes as two 4-bit planes).

svdzip uses only HQQ's quantizer (`Quantizer.quantize` / `Quantizer.dequantize`: the packing, the scale and
zero-point optimiser, the unpacking) and keeps the packed tensors in its own module, `LowBitLinear`, as plain
buffers. The values may also be rounded onto HQQ's grid by another rule (`pack_codes`: GPTQ's error feedback
in `passes.quant_error`); the stored format is the same. So
`save_pretrained` writes them into `model.safetensors` like any tensor, the svdzip quantizer rebuilds the
skeletons before transformers loads them, and the same module carries the compensation `y += B (A x)` (EoRA:
the whitened truncation of the quantization error, `methods.compensation`).

Layout: groups of `group_size` consecutive weights along the input dimension (HQQ's axis 1), one scale and
one zero point per group stored in bfloat16 — 4.5 / 3.7 / 2.5 / 8.5 bits per weight at group 64.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from svdzip.errors import SvdzipError
from svdzip.models.lowrank import LowRankLinear
from svdzip.output import cpu_int4

log = logging.getLogger(__name__)

BACKEND = "hqq"
BITS = (8, 4, 3, 2)
GROUP_SIZE = 64
META_DTYPE = torch.bfloat16  # scale and zero point per group
INSTALL_HINT = "pip install 'svdzip[lowbit]'   (installs hqq)"
#: values per storage word, and the word's bytes, for each bit width (HQQ's packings)
_PACKING = {8: (1, 1), 4: (2, 1), 2: (4, 1), 3: (10, 4)}


def backend_installed() -> bool:
    return importlib.util.find_spec(BACKEND) is not None


def backend_version() -> str:
    from importlib.metadata import version

    return version(BACKEND)


def require_backend(bits: int, why: str = "") -> None:
    """Fail early, with how to fix it, when these weights cannot be made or read here."""
    if bits not in BITS:
        raise SvdzipError(f"{bits}-bit weights are not supported; choose from {', '.join(map(str, BITS))} bits")
    if not backend_installed():
        raise SvdzipError(f"{why or f'{bits}-bit weights'}: needs the HQQ library, which is not installed: "
                          f"{INSTALL_HINT}")


def _quantizer() -> Any:
    # hqq prints through termcolor and warns about CUDA at import on a CPU machine: harmless for this path
    quiet = logging.getLogger("hqq")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        from hqq.core.quantize import Quantizer
    finally:
        quiet.setLevel(level)
    return Quantizer


def supported(rows: int, cols: int, bits: int, group_size: int = GROUP_SIZE) -> bool:
    """Whether HQQ can pack a rows×cols weight at these bits: whole groups along each row, whole words."""
    if cols % group_size:
        return False
    groups = rows * cols // group_size
    per_word, _ = _PACKING[bits]
    return bits == 3 or groups % per_word == 0


def packed_bytes(rows: int, cols: int, bits: int, group_size: int = GROUP_SIZE) -> int:
    """Bytes a rows×cols weight takes packed: the words of the values plus a scale and a zero per group."""
    groups = rows * cols // group_size
    per_word, word_bytes = _PACKING[bits]
    meta = 2 * groups * torch.empty((), dtype=META_DTYPE).element_size()
    return math.ceil(groups / per_word) * group_size * word_bytes + meta


def packed_factor_bytes(rows: int, cols: int, rank: int, bits: int, group_size: int = GROUP_SIZE) -> int:
    """Bytes of a rank-`rank` factorisation of a rows×cols weight with both factors packed at `bits`."""
    return packed_bytes(rows, rank, bits, group_size) + packed_bytes(rank, cols, bits, group_size)


@dataclass
class Packed:
    """One weight packed by HQQ: the words, and per group the scale and zero point (dequantize: (q − z)·s)."""

    words: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    shape: tuple[int, int]
    group_size: int = GROUP_SIZE

    def meta(self, dtype: torch.dtype) -> dict[str, Any]:
        Quantizer = _quantizer()
        packing = Quantizer.bit_to_packing[self.bits]
        return {"nbits": self.bits, "group_size": self.group_size, "shape": torch.Size(self.shape), "axis": 1,
                "packing": packing, "unpack_view_dtype": Quantizer.unpack_view_dtype[packing],
                "view_as_float": False, "compute_dtype": dtype,
                "scale": self.scale.to(dtype), "zero": self.zero.to(dtype)}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return _quantizer().dequantize(self.words, self.meta(dtype))

    def codes(self) -> torch.Tensor:
        """The integer codes (rows × cols, uint8), unpacked from the words."""
        Quantizer = _quantizer()
        rows, cols = self.shape
        unpacked = Quantizer.unpack[Quantizer.bit_to_packing[self.bits]](self.words, dtype=torch.uint8)
        return unpacked[: rows * cols // self.group_size].reshape(rows, cols)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.words, self.scale, self.zero))


def quantize(weight: torch.Tensor, bits: int, group_size: int = GROUP_SIZE) -> Packed:
    """One weight packed at `bits` by HQQ alone: its half-quadratic optimiser of the zero points, each weight
    to its nearest grid point (calibration-free; `passes.quant_error.quantize_rounded` has GPTQ's rounding)."""
    rows, cols = _check_packable(weight.shape, bits, group_size)
    words, meta = _quantizer().quantize(weight.detach().float(), nbits=bits, group_size=group_size, axis=1,
                                        optimize=True, compute_dtype=torch.float32, device=weight.device.type)
    return Packed(words=words.contiguous(), scale=meta["scale"].to(META_DTYPE).contiguous(),
                  zero=meta["zero"].to(META_DTYPE).contiguous(), bits=bits, shape=(rows, cols),
                  group_size=group_size)


def pack_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
               group_size: int = GROUP_SIZE) -> Packed:
    """Integer codes (rows × cols, each in 0 … 2^bits − 1) with their grid (rows × groups) packed as HQQ packs
    its own: the same words, scales and zero points, so loading and the forward cannot tell them apart."""
    rows, cols = _check_packable(codes.shape, bits, group_size)
    quantizer = _quantizer()
    words = quantizer.pack[quantizer.bit_to_packing[bits]](codes.reshape(-1, group_size))
    return Packed(words=words.contiguous(), scale=scale.reshape(-1, 1).to(META_DTYPE).contiguous(),
                  zero=zero.reshape(-1, 1).to(META_DTYPE).contiguous(), bits=bits, shape=(rows, cols),
                  group_size=group_size)


def _empty_words(rows: int, cols: int, bits: int, group_size: int, device: Any = None) -> torch.Tensor:
    """Zeroed storage words for a rows×cols weight at `bits` (HQQ's packing), to be filled by a checkpoint."""
    per_word, word_bytes = _PACKING[bits]
    return torch.zeros(math.ceil(rows * cols // group_size / per_word), group_size,
                       dtype=torch.int32 if word_bytes == 4 else torch.uint8, device=device)


def _check_packable(shape: Sequence[int], bits: int, group_size: int) -> tuple[int, int]:
    require_backend(bits)
    rows, cols = shape
    if not supported(rows, cols, bits, group_size):
        raise SvdzipError(f"a {rows}×{cols} weight cannot be packed at {bits} bits in groups of {group_size}")
    return rows, cols


class LowBitLinear(nn.Module):
    """y = dequant(packed) x + b (+ B (A x), the compensation of the quantization error).

    The packed words, scales and zero points are buffers (saved, never trained); the compensation is a
    `LowRankLinear`, so recovery trains it like any factor pair.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, rank: int = 0, bias: bool = False,
                 group_size: int = GROUP_SIZE, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        if not supported(out_features, in_features, bits, group_size):
            raise SvdzipError(f"a {out_features}×{in_features} weight cannot be packed at {bits} bits in groups "
                              f"of {group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.rank = bits, group_size, rank
        groups = out_features * in_features // group_size
        self.register_buffer("packed", _empty_words(out_features, in_features, bits, group_size, device))
        self.register_buffer("scale", torch.zeros(groups, 1, dtype=META_DTYPE, device=device))
        self.register_buffer("zero", torch.zeros(groups, 1, dtype=META_DTYPE, device=device))
        # torch's CPU int4 layout of the same weight while it serves bf16 inference (`_kernel_serves`); not saved
        self.register_buffer("kernel_words", None, persistent=False)
        self.register_buffer("kernel_meta", None, persistent=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.compensation = (LowRankLinear(in_features, out_features, rank, device=device, dtype=dtype)
                             if rank > 0 else None)

    @property
    def weight_packed(self) -> Packed:
        self._restore_words()
        return Packed(self.packed, self.scale, self.zero, self.bits, (self.out_features, self.in_features),
                      self.group_size)

    @property
    def weight(self) -> torch.Tensor:
        """The dense equivalent (dequantized weight plus compensation), for inspection and checks."""
        w = self.weight_packed.dequantize(torch.float32)
        if self.compensation is not None:
            w = w + self.compensation.weight.float()
        return w

    @classmethod
    def from_linear(cls, linear: nn.Module, bits: int, compensation: LowRankLinear | None = None,
                    group_size: int = GROUP_SIZE, packed: Packed | None = None) -> LowBitLinear:
        """Quantize `linear`'s weight (or take `packed`, its quantization) and attach the compensation."""
        weight = linear.weight.detach()
        packed = packed or quantize(weight, bits, group_size)
        bias = getattr(linear, "bias", None)
        module = cls(weight.shape[1], weight.shape[0], bits, rank=0, bias=bias is not None, group_size=group_size,
                     device=weight.device, dtype=weight.dtype)
        module.packed, module.scale, module.zero = packed.words, packed.scale, packed.zero
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone())
        if compensation is not None:
            module.compensation, module.rank = compensation, compensation.rank
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel_serves(x):
            y = cpu_int4.matmul(x, self.kernel_words, self.kernel_meta, self.group_size).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
        else:
            w = self.weight_packed.dequantize(x.dtype)
            y = nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        if self.compensation is not None:
            y = y + self.compensation(x)
        return y

    # ---- torch's CPU int4 kernel: bf16 inference on a CPU reads the packed bytes (prompts: `cpu_int4.matmul`)

    def _kernel_serves(self, x: torch.Tensor) -> bool:
        """Inference in bf16 on a CPU (eval mode, no autocast, no gradient through x) with a shape the kernel
        takes: the kernel's planes serve, built from the words on first use, which are then released (the words
        and the planes are never both held; 2- and 3-bit codes take 4 bits a weight in the planes). Training and
        autocast stay on the dequantized path, so healing does not convert back and forth."""
        if (x.device.type != "cpu" or x.dtype != cpu_int4.DTYPE or self.training
                or torch.is_autocast_enabled("cpu") or (torch.is_grad_enabled() and x.requires_grad)
                or not cpu_int4.supported(self.out_features, self.in_features, self.bits, self.group_size)):
            return False
        if self.kernel_words is None:
            packed = self.weight_packed
            self.kernel_words, self.kernel_meta = cpu_int4.planes(packed.codes(), packed.scale, packed.zero,
                                                                  self.bits, self.group_size)
            self.packed = None
        return True

    def _restore_words(self) -> None:
        """Back from the kernel's planes to HQQ's words (exact: the same codes, scales and zeros)."""
        if self.packed is not None:
            return
        device = self.kernel_words.device
        codes = cpu_int4.codes(self.kernel_words.cpu(), self.bits)
        packed = pack_codes(codes, self.scale.cpu().float(), self.zero.cpu().float(), self.bits, self.group_size)
        self.packed = packed.words.to(device)
        self.kernel_words = self.kernel_meta = None

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        self._restore_words()  # the stored format is HQQ's, whichever form serves in memory
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        if self.packed is None:  # new words replace the planes: a slot for them, the planes dropped
            self.packed = _empty_words(self.out_features, self.in_features, self.bits, self.group_size,
                                       self.scale.device)
            self.kernel_words = self.kernel_meta = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def stored_bytes(self) -> int:
        """Bytes of the packed weight as stored (words, scales, zero points), whichever form is in memory."""
        return packed_bytes(self.out_features, self.in_features, self.bits, self.group_size)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, compensation_rank={self.rank}")


def lowbit_linears(model: nn.Module) -> dict[str, LowBitLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LowBitLinear)}


def check_packed(model: nn.Module) -> None:
    """Refuse packed tensors that cannot be what the manifest says (a tampered file loaded with checksums off):
    every scale and zero point finite, every 3-bit word within its 30 bits."""
    for name, m in lowbit_linears(model).items():
        if not (torch.isfinite(m.scale.float()).all() and torch.isfinite(m.zero.float()).all()):
            raise SvdzipError(f"{name}: its packed weight's scales or zero points are not finite (corrupt file?)")
        # ten 3-bit values fill 30 bits of a non-negative int32 (words absent: the kernel's planes serve)
        if m.bits == 3 and m.packed is not None and (m.packed < 0).any():
            raise SvdzipError(f"{name}: its packed 3-bit words are out of range (corrupt file?)")


def lowbit_record(model: nn.Module) -> dict[str, Any] | None:
    """The manifest's `lowbit` entry: the backend and every packed linear's bits, group and compensation rank."""
    found = lowbit_linears(model)
    if not found:
        return None
    return {"backend": BACKEND, "backend_version": backend_version(),
            "modules": {n: {"in": m.in_features, "out": m.out_features, "bits": m.bits, "group_size": m.group_size,
                            "rank": m.rank, "bias": m.bias is not None} for n, m in found.items()}}


def apply_lowbit(model: nn.Module, record: dict[str, Any]) -> None:
    """Replace every listed linear by an empty `LowBitLinear` of the recorded shape (then the checkpoint fills it)."""
    if not backend_installed():
        raise SvdzipError(f"this directory's weights are packed at low bits by HQQ, which is not installed: "
                          f"{INSTALL_HINT}")
    for name, spec in record["modules"].items():
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, child)
        except AttributeError as exc:
            raise SvdzipError(f"the manifest's low-bit entry lists {name}, which this model does not have") from exc
        weight = getattr(old, "weight", None)
        new = LowBitLinear(spec["in"], spec["out"], spec["bits"], rank=spec["rank"], bias=spec["bias"],
                           group_size=spec["group_size"], device=None if weight is None else weight.device,
                           dtype=None if weight is None else weight.dtype)
        setattr(parent, child, new)
