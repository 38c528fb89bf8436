"""Decode and prefill throughput of SVD-LLM(W) at several ratios relative to dense, on this machine.

Why a benchmark of its own: the parameter ratio promises a speedup that two matmuls per linear may
not deliver on a CPU. All models live in one process and are timed alternately (dense, 20 %, 40 %,
60 %, and each with its slow low-rank modules made dense again), so machine load hits them alike.
It also times single linears at SmolLM2's shapes to show which ranks pay off.

    .venv/bin/python -m benchmarks.speed --threads 1 --clock cpu
"""

from __future__ import annotations

import argparse
import copy
import logging

import torch

from benchmarks.common import Bench, setup_logging, write_results
from svdzip.budget import max_useful_rank, uniform_rank
from svdzip.evaluate.speed import (
    densify,
    linear_timing,
    measure_speed,
    parse_settings,
    slow_low_rank_modules,
    speed_table,
    summary_row,
)
from svdzip.report.tables import table

log = logging.getLogger("benchmarks.speed")

SHAPES = {"q/o": (576, 576), "k/v": (576, 192), "gate/up": (576, 1536), "down": (1536, 576)}


def module_timings(ratios: list[float], tokens: list[int], clock: str) -> tuple[list[dict], str]:
    """Dense vs LowRankLinear per SmolLM2 shape at the uniform rank of each ratio."""
    out, rows = [], []
    for t in tokens:
        for role, (i, o) in SHAPES.items():
            ranks = [uniform_rank(o, i, r) for r in ratios] + [max_useful_rank(o, i)]
            res = linear_timing(i, o, ranks, t, clock=clock)
            out.append({"role": role, **res})
            rows.append([t, f"{role} {i}→{o}", round(1e6 * res["dense_seconds"], 1),
                         *(f"k={r['rank']}: ×{r['speedup']:.2f}" for r in res["ranks"])])
    heads = ["tokens", "linear", "dense µs", *(f"{100 * r:.0f}% removed" for r in ratios), "param parity"]
    return out, table(heads, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratios", default="0.2,0.4,0.6")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--seq-lens", default="128")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", default="cpu", choices=["wall", "cpu"])
    p.add_argument("--no-densify", action="store_true", help="skip the speed-aware (densified) variants")
    p.add_argument("--name", default="speed")
    args = p.parse_args()
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]

    per_module, module_md = module_timings(ratios, [1, 4, 512], args.clock)
    log.info("per-module timings:\n%s", module_md)

    bench = Bench(args.model)
    models = {"dense": bench.fresh()}
    extra: dict[str, dict] = {}
    for r in ratios:
        res = bench.compress(ratio=r, method="svdllm")
        label = f"svdllm@{100 * r:.0f}%"
        models[label] = res.model
        extra[label] = {"ratio_achieved": res.summary["ratio_achieved"]}
        if not args.no_densify:
            slow = slow_low_rank_modules(res.model, tokens=1, clock=args.clock)
            fast = copy.deepcopy(res.model)
            added = densify(fast, [s["name"] for s in slow])
            models[f"{label} speed-aware"] = fast
            extra[f"{label} speed-aware"] = {"densified": len(slow), "params_added": added,
                                            "roles": sorted({s["name"].rsplit(".", 1)[-1] for s in slow})}
            log.info("%s: %d low-rank modules slower than dense at decode: %s (+%d params when densified)",
                     label, len(slow), extra[f"{label} speed-aware"]["roles"], added)
    settings = parse_settings(args.batches, args.seq_lens, args.new_tokens)
    speed = measure_speed(models, settings, repeats=args.repeats, reference="dense", clock=args.clock)
    rows = []
    for label in models:
        s = summary_row(speed, label)
        rows.append([label, extra.get(label, {}).get("ratio_achieved"), s.get("decode_speedup"),
                     s.get("prefill_speedup"), s.get("weight_bytes_ratio"), extra.get(label, {}).get("densified", "")])
    summary = table(["model", "removed", "decode ×dense", "prefill ×dense", "weights ×dense", "densified"], rows)
    md = (f"## Speed of SVD-LLM(W) vs dense on {args.model} ({speed['clock']} clock, {speed['threads']} "
          f"threads, median of {args.repeats})\n\n{summary}\n\n### Per setting\n\n{speed_table(speed)}\n\n"
          f"### Single linears at SmolLM2 shapes (speedup = dense time / low-rank time)\n\n{module_md}\n\n"
          "'speed-aware' = the compressed model with every LowRankLinear that times slower than its dense "
          "equivalent at one token made dense again (more parameters; same function).")
    log.info("\n%s", md)
    write_results(args.name, {"speed": speed, "models": extra, "per_module": per_module}, md)


if __name__ == "__main__":
    main()
