"""Gram matrix of one calibration batch: plain `xᵀx` against the blocks on and above the diagonal only.

Calibration adds each batch's XᵀX (fp32 product) into a float64 running sum. XᵀX is symmetric, so
`svdzip.core.statistics.add_gram_` splits the columns into b blocks and computes only the b(b+1)/2 block
products X_iᵀX_j (i ≤ j), mirroring the off-diagonal ones: (b+1)/(2b) of the flops. Both sides are timed as
what `Accumulator` does per batch (product + in-place add into the float64 sum); the bare product `xᵀx` is
listed too. One thread, CPU clock (`time.process_time`: the machine is shared), median of `--repeats`,
the variants interleaved.

    .venv/bin/python benchmarks/gram_speed.py

n = 896 is Qwen2.5-0.5B's hidden size (q/k/v, gate/up, o_proj inputs), 4864 its down_proj input.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cpu_seconds, setup_logging, write_results  # noqa: E402
from svdzip.core.statistics import GRAM_BLOCKED_MIN, GRAM_BLOCKED_MIN_OTHER, GRAM_BLOCKS, add_gram_  # noqa: E402


def measure(n: int, rows: int, blocks: list[int], repeats: int, seed: int) -> dict:
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(seed))
    acc = torch.zeros(n, n, dtype=torch.float64)
    variants = {"product": lambda: x.T @ x, "plain": lambda: acc.add_(x.T @ x)}
    variants.update({f"blocked{b}": (lambda b=b: add_gram_(acc, x, b)) for b in blocks})
    for fn in variants.values():  # warm-up, not timed
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for k, fn in variants.items():
            times[k].append(cpu_seconds(fn))
    ref = x.double().T @ x.double()
    cell = {"n": n, "rows": rows, "gflop_plain": round(2 * rows * n * n / 1e9, 2),
            "times_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
            "median_s": {k: round(statistics.median(v), 4) for k, v in times.items()}}
    plain = statistics.median(times["plain"])
    cell["blocked"] = {}
    for b in blocks:
        got = add_gram_(torch.zeros(n, n, dtype=torch.float64), x, b)
        med = statistics.median(times[f"blocked{b}"])
        cell["blocked"][b] = {"flop_fraction": round((b + 1) / (2 * b), 4), "median_s": round(med, 4),
                              "speedup": round(plain / med, 2),
                              "max_rel_err": float((got - ref).abs().max() / ref.abs().max()),
                              "exactly_symmetric": bool(torch.equal(got, got.T))}
    return cell


def markdown(payload: dict) -> str:
    blocks = payload["blocks"]
    head = ("| n | GFLOP | `xᵀx` s | `acc += xᵀx` s | "
            + " | ".join(f"blocked b={b} s ({100 * (b + 1) / (2 * b):.0f} % flops) | speedup b={b}" for b in blocks)
            + " |")
    sep = "|" + "---|" * (4 + 2 * len(blocks))
    rows = []
    for c in payload["cells"]:
        m = c["median_s"]
        rows.append(f"| {c['n']} | {c['gflop_plain']} | {m['product']:.3f} | {m['plain']:.3f} | "
                    + " | ".join(f"{c['blocked'][b]['median_s']:.3f} | {c['blocked'][b]['speedup']:.2f}×"
                                 for b in blocks) + " |")
    return "\n".join([
        f"# Gram matrix of one batch: plain vs blocked upper triangle ({payload['rows']} rows, float32 products, "
        "float64 sum)",
        "",
        f"One thread, CPU seconds (`time.process_time`), median of {payload['repeats']}; the speedup is "
        "`acc += xᵀx` (what calibration did per batch) ÷ `add_gram_(acc, x, b)`. Both the product and the "
        "in-place add into the float64 sum are timed.",
        "",
        head, sep, *rows, "",
        f"Calibration (`Accumulator`) uses b = {payload['accumulator_blocks']} from n ≥ "
        f"{payload['accumulator_min']['cpu']} on the CPU and n ≥ {payload['accumulator_min']['other']} elsewhere.",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="896,1536,4864")
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--blocks", default=f"4,{GRAM_BLOCKS}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="gram_speed")
    args = ap.parse_args()
    setup_logging()
    torch.set_num_threads(1)
    blocks = sorted({int(b) for b in args.blocks.split(",")})
    cells = []
    for n in (int(s) for s in args.sizes.split(",")):
        cells.append(measure(n, args.rows, blocks, args.repeats, args.seed))
        c = cells[-1]
        print(f"n={n}: acc += xᵀx {c['median_s']['plain']:.3f} s; "
              + ", ".join(f"b={b} {v['median_s']:.3f} s ({v['speedup']:.2f}×)" for b, v in c["blocked"].items()),
              flush=True)
    payload = {"rows": args.rows, "blocks": blocks, "repeats": args.repeats, "threads": torch.get_num_threads(),
               "clock": "process_time", "torch": torch.__version__,
               "accumulator_blocks": GRAM_BLOCKS,
               "accumulator_min": {"cpu": GRAM_BLOCKED_MIN["cpu"], "other": GRAM_BLOCKED_MIN_OTHER},
               "cells": cells}
    write_results(args.name, payload, markdown(payload))


if __name__ == "__main__":
    main()
