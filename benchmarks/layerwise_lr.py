"""Layer-wise healing's learning rate and steps per layer (issue 21): what its defaults rest on.

    python benchmarks/layerwise_lr.py --model smollm2-135m --ratio 0.2 --cells 1e-4:40,1e-3:40,1e-3:10,3e-3:10

Every cell compresses the model afresh in memory (SVD-LLM whitening, loss-aware ranks on the layer-local
signal, the same calibration statistics and spectra) and heals it layer by layer with that learning rate and
number of steps per layer (`--heal layerwise --heal-lr LR --heal-steps N`); a cell `none` is the same without
healing. Perplexity on the evaluation parts of `wiki` (the calibration corpus) and `austen`.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from common import Bench, setup_logging, write_results

from svdzip.recover.config import HealConfig

log = logging.getLogger("benchmarks.layerwise_lr")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--cells", default="none,1e-4:40,1e-3:40,1e-3:10,3e-3:10", help="none or LR:STEPS, comma-separated")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="layerwise_lr")
    args = p.parse_args()
    setup_logging()
    torch.set_num_threads(args.threads)
    bench = Bench(args.model)
    dense = bench.perplexity(bench.fresh(), max_tokens=args.eval_tokens, seq_len=args.seq_len)
    rows = []
    for cell in args.cells.split(","):
        options = {} if cell == "none" else {
            "heal": "layerwise", "healing": HealConfig(lr=float(cell.split(":")[0]), steps=int(cell.split(":")[1]))}
        t0 = time.perf_counter()
        result = bench.compress(ratio=args.ratio, allocator="loss-aware", allocator_options={"signal": "local"},
                                **options)
        seconds = time.perf_counter() - t0
        ppl = bench.perplexity(result.model, max_tokens=args.eval_tokens, seq_len=args.seq_len)
        heal = result.summary.get("heal") or {}
        rows.append({"cell": cell, "ppl": ppl, "x_dense": {c: ppl[c] / dense[c] for c in ppl},
                     "compress_s": round(seconds, 1), "heldout_before": heal.get("heldout_step0"),
                     "heldout_after": heal.get("heldout_final")})
        log.info("%s: %s", cell, rows[-1])
        md = [f"### Layer-wise healing on {args.model} at {100 * args.ratio:.0f} % removed (loss-aware, local signal)",
              "", f"Perplexity on {args.eval_tokens} evaluation tokens per corpus in windows of {args.seq_len}; "
              "calibration and healing on the 64 × 512 `wiki` calibration windows. 'held-out error' is the mean "
              "over layers of each layer's relative output error on the held-out calibration windows, before → "
              "after its heal. Seconds: the whole compression (statistics and spectra reused).", "",
              "| lr : steps per layer | wiki ppl | austen ppl | ×dense wiki | ×dense austen | held-out error | s |",
              "|---|---|---|---|---|---|---|",
              f"| dense | {dense['wiki']:.2f} | {dense['austen']:.2f} | 1.00 | 1.00 | | |"]
        for r in rows:
            held = (f"{r['heldout_before']:.4f} → {r['heldout_after']:.4f}" if r["heldout_before"] is not None
                    else "")
            md.append(f"| {r['cell']} | {r['ppl']['wiki']:.2f} | {r['ppl']['austen']:.2f} | "
                      f"{r['x_dense']['wiki']:.2f} | {r['x_dense']['austen']:.2f} | {held} | {r['compress_s']} |")
        write_results(args.name, {"model": args.model, "ratio": args.ratio, "dense": dense, "rows": rows},
                      "\n".join(md))


if __name__ == "__main__":
    main()
