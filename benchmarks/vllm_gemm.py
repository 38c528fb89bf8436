"""Time one batch-1 GEMM per SmolLM2 shape with vLLM's CPU kernel (oneDNN) and with torch's F.linear.

Why: a low-rank layer replaces one GEMM by two to four smaller ones, and at batch 1 each call has a
fixed cost; this shows how large that cost is next to the bytes a matrix reads, per dtype. One
thread; the same weight is reused, so small factors sit in cache (the best case for them).

    OMP_NUM_THREADS=1 .venv-vllm/bin/python benchmarks/vllm_gemm.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
# (out, in): dense qkv / o / gate_up / down, then 40 %-uniform factors (rank 172 for q/o, 251 for the MLP)
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (172, 576), (576, 172), (251, 576), (1536, 251)]


def per_call_us(fn, n: int = 2000) -> float:
    for _ in range(50):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def main() -> int:
    from vllm import _custom_ops as ops

    torch.set_num_threads(1)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for out, inp in SHAPES:
            w, x = torch.randn(out, inp, dtype=dtype), torch.randn(1, inp, dtype=dtype)
            handle = ops.create_onednn_mm(w.t(), 32)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "out": out, "in": inp,
                         "f_linear_us": per_call_us(lambda w=w, x=x: torch.nn.functional.linear(x, w)),
                         "onednn_us": per_call_us(lambda h=handle, x=x: ops.onednn_mm(h, x, None))})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vllm_gemm.json").write_text(json.dumps(rows, indent=2))
    md = ["# One batch-1 GEMM (µs per call, one thread)", "", f"`{' '.join(['python', *sys.argv])}`", "",
          "| dtype | out × in | F.linear | vLLM oneDNN |", "|---|---|---|---|"]
    md += [f"| {r['dtype']} | {r['out']} × {r['in']} | {r['f_linear_us']:.1f} | {r['onednn_us']:.1f} |" for r in rows]
    (RESULTS / "vllm_gemm.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
