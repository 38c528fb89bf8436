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

import functools

import torch

#: group sizes the kernel accepts, and the row block its layout tiles by (rows in blocks of 64: for each block
#: and input column, 32 bytes, the low nibbles rows 0–31 of the block, the high nibbles rows 32–63)
GROUP_SIZES = (32, 64, 128, 256)
BLOCK_ROWS = 64
DTYPE = torch.bfloat16
_OFFSET = 8  # the kernel's codes are centred: (q − 8)·scale + zero
#: from this many activation rows on (prompts, a batch's prefill), dequantizing once (about 30 ms for a 4864×896
#: weight at one thread here) and a bf16 matmul (1.9 ms per 128 rows) beat the kernel, which is made for a few
#: rows (0.3 ms at 1 row, 15 ms at 128)
DEQUANTIZE_FROM_ROWS = 256


@functools.cache
def available() -> bool:
    """torch has the kernel, and its layout is the one `unpack` reads (checked once on a random block: a torch
    build that tiles otherwise keeps the dequantized path rather than computing with misread codes)."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return False
    codes = torch.randint(0, 16, (2 * BLOCK_ROWS, 128), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    except RuntimeError:
        return False
    return packed.shape == (2 * BLOCK_ROWS, 64) and torch.equal(unpack(packed).to(torch.int32), codes)


def supported(rows: int, cols: int, bits: int, group_size: int) -> bool:
    """Whether a rows×cols weight packed at `bits` in groups of `group_size` can run through the kernel."""
    return (bits in (2, 3, 4, 8) and group_size in GROUP_SIZES and rows % BLOCK_ROWS == 0
            and cols % group_size == 0 and available())


def unpack(words: torch.Tensor) -> torch.Tensor:
    """One plane's 4-bit codes (rows × cols, uint8) from the kernel's layout [rows, cols/2]."""
    rows, cols = words.shape[0], 2 * words.shape[1]
    blocks = words.reshape(rows // BLOCK_ROWS, cols, BLOCK_ROWS // 2)
    nibbles = torch.cat([blocks & 15, blocks >> 4], dim=2)  # [block, col, 64 rows]
    return nibbles.transpose(1, 2).reshape(rows, cols)


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
    """x (…, cols) times the weight the planes hold, transposed: (…, rows), in bf16. A few rows go through the
    kernel; many (DEQUANTIZE_FROM_ROWS) through the weight dequantized once and a bf16 matmul."""
    flat = x.reshape(-1, x.shape[-1]).to(DTYPE).contiguous()  # the kernel reads rows densely (a last-token slice)
    meta = meta.to(DTYPE)
    if flat.shape[0] >= DEQUANTIZE_FROM_ROWS:
        y = torch.nn.functional.linear(flat, dequantize(words, meta, group_size))
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, words[0], group_size, meta[0])
        for p in range(1, words.shape[0]):
            y = y + torch.ops.aten._weight_int4pack_mm_for_cpu(flat, words[p], group_size, meta[p])
    return y.reshape(*x.shape[:-1], y.shape[-1])


def dequantize(words: torch.Tensor, meta: torch.Tensor, group_size: int) -> torch.Tensor:
    """The weight (rows × cols, bf16) the planes hold: Σ_p (q_p − 8)·scale_p + zero_p per group."""
    rows, cols = words.shape[1], 2 * words.shape[2]
    weight = None
    for p in range(words.shape[0]):
        q = unpack(words[p]).reshape(rows, cols // group_size, group_size).to(DTYPE)
        scale, zero = meta[p, ..., 0].t().unsqueeze(-1), meta[p, ..., 1].t().unsqueeze(-1)
        part = (q - _OFFSET) * scale + zero
        weight = part if weight is None else weight + part
    return weight.reshape(rows, cols)


def codes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer codes (rows × cols, uint8) the planes hold, exactly (the inverse of `planes`)."""
    out = unpack(words[0]).to(torch.int32)
    if words.shape[0] == 2:  # 8 bits: the high nibble's plane first
        return ((out << 4) | unpack(words[1]).to(torch.int32)).to(torch.uint8)
    return (out - (_OFFSET - _shift(bits))).to(torch.uint8)
