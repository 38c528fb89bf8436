"""Decode HQQ-packed weights on a CPU with torch's own int4 matmul, instead of dequantizing them per token.

Why: HQQ's forward on a CPU unpacks and dequantizes the whole weight at every call, so a low-bit model decoded
at 0.10× the dense model's speed on Qwen2.5-0.5B. torch ships a fused CPU kernel for 4-bit weights in groups
(`aten._weight_int4pack_mm_for_cpu`, bf16 activations, w = (q − 8)·scale + zero per group, two codes per byte in
its own tiled layout). HQQ's codes at 4, 3 and 2 bits fit its 4 bits as they are; an 8-bit code q = 16h + l is
two 4-bit planes whose products add up. The layout is torch's and CPU-specific, so it is built in memory from
the stored HQQ words (which stay the format on disk) and turned back into them when needed (`codes`).

The kernel has no backward and needs bf16 activations: it serves inference only (`LowBitLinear` decides).
"""

from __future__ import annotations

import torch

#: group sizes the kernel accepts, and the row multiple its layout tiles by
GROUP_SIZES = (32, 64, 128, 256)
ROW_MULTIPLE = 16
DTYPE = torch.bfloat16
_OFFSET = 8  # the kernel's codes are centred: (q − 8)·scale + zero


def available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def supported(rows: int, cols: int, bits: int, group_size: int) -> bool:
    """Whether a rows×cols weight packed at `bits` in groups of `group_size` can run through the kernel."""
    return (available() and bits in (2, 3, 4, 8) and group_size in GROUP_SIZES and rows % ROW_MULTIPLE == 0
            and cols % group_size == 0)


def _shift(bits: int) -> int:
    """The code stored as the kernel's centre 8: the middle of a narrower code's range (0 … 2^bits − 1)."""
    return 1 << (bits - 1) if bits < 8 else _OFFSET


def planes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
           group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HQQ's integer codes (rows × cols) and its per-group scale and zero (w = (q − z)·s, groups along each row)
    as the kernel's planes: (words [P, rows, cols/2] uint8, meta [P, cols/group, rows, 2] bf16), P = 2 at 8 bits
    (high nibble first), else 1. The sum over planes of (q_p − 8)·scale_p + zero_p is (q − z)·s."""
    rows, cols = codes.shape
    s = scale.float().reshape(rows, cols // group_size).t()
    z = zero.float().reshape(rows, cols // group_size).t()
    codes = codes.to(torch.int32)
    if bits == 8:
        nibbles, scales = [codes >> 4, codes & 15], [16 * s, s]
        offset = (_OFFSET * 16 + _OFFSET - z) * s  # (16h + l − z)s = (h − 8)·16s + (l − 8)·s + (136 − z)s
        high = offset.to(DTYPE)
        offsets = [high.float(), offset - high.float()]  # the bf16 rounding of the first carried by the second
    else:  # codes shifted to centre on the kernel's 8, so the offset is small and bf16 keeps it precisely
        mid = _shift(bits)
        nibbles, scales, offsets = [codes + _OFFSET - mid], [s], [(mid - z) * s]
    words = torch.stack([torch.ops.aten._convert_weight_to_int4pack_for_cpu(n.contiguous(), 1) for n in nibbles])
    meta = torch.stack([torch.stack([sc, off], dim=-1) for sc, off in zip(scales, offsets, strict=True)])
    return words, meta.to(DTYPE).contiguous()


def matmul(x: torch.Tensor, words: torch.Tensor, meta: torch.Tensor, group_size: int) -> torch.Tensor:
    """x (…, cols) times the weight the planes hold, transposed: (…, rows), in bf16."""
    flat = x.reshape(-1, x.shape[-1]).to(DTYPE).contiguous()  # the kernel reads rows densely (a last-token slice)
    meta = meta.to(DTYPE)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, words[0], group_size, meta[0])
    for p in range(1, words.shape[0]):
        y = y + torch.ops.aten._weight_int4pack_mm_for_cpu(flat, words[p], group_size, meta[p])
    return y.reshape(*x.shape[:-1], y.shape[-1])


def codes(words: torch.Tensor, bits: int, group_size: int, chunk: int = 256) -> torch.Tensor:
    """The integer codes (rows × cols, uint8) the planes hold: the kernel applied to the identity with unit
    scales and zeros of 8 returns each code exactly (small integers are exact in bf16)."""
    planes_, rows, half = words.shape
    cols = 2 * half
    unit = torch.empty(cols // group_size, rows, 2, dtype=DTYPE, device=words.device)
    unit[..., 0], unit[..., 1] = 1, _OFFSET
    out = torch.zeros(rows, cols, dtype=torch.int32, device=words.device)
    for start in range(0, cols, chunk):
        stop = min(start + chunk, cols)
        eye = torch.zeros(stop - start, cols, dtype=DTYPE, device=words.device)
        eye[:, start:stop] = torch.eye(stop - start, dtype=DTYPE, device=words.device)
        for p in range(planes_):
            nib = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, words[p], group_size, unit)
            out[:, start:stop] += nib.t().round().to(torch.int32) << (4 * (planes_ - 1 - p))
    if bits < 8:
        out -= _OFFSET - _shift(bits)
    return out.to(torch.uint8)
