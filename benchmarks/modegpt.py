"""MoDeGPT's slimmed MLPs against SVD-LLM(W) factorisation, from the same calibration statistics (issue 19).

    python benchmarks/modegpt.py --models smollm2-135m --ratios 0.2,0.4 \
        --cells svdllm:uniform,svdllm:loss-aware,modegpt:uniform,modegpt:block-influence,modegpt:loss-aware

A cell is `method:allocator[:key=value,...]` (allocator options), e.g. `modegpt:block-influence:epsilon=0.05`.
MoDeGPT here is its Type I module only (MLPs slimmed by Nyström, attention kept dense), so at a ratio
of the decoder linears its MLPs carry the whole reduction. Perplexity on wiki (the calibration's
domain) and austen (another), ≥ 16k tokens each; compression wall time per cell.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import torch
from common import Bench, setup_logging, write_results

log = logging.getLogger("benchmarks.modegpt")


def parse_cell(text: str) -> tuple[str, str, dict[str, Any]]:
    method, allocator, *rest = text.split(":")
    options = dict(kv.split("=", 1) for kv in ",".join(rest).split(",") if kv) if rest else {}
    return method, allocator, options


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m")
    p.add_argument("--ratios", default="0.2,0.4")
    p.add_argument("--cells", default="svdllm:uniform,svdllm:loss-aware,modegpt:uniform,modegpt:block-influence,"
                                      "modegpt:loss-aware")
    p.add_argument("--eval-tokens", type=int, default=16384, help="tokens per evaluation corpus")
    p.add_argument("--corpora", default="wiki,austen")
    p.add_argument("--samples", type=int, default=64, help="calibration windows (512 tokens)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--name", default="modegpt")
    args = p.parse_args()
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    corpora = tuple(args.corpora.split(","))
    cells: list[dict[str, Any]] = []
    for model_name in args.models.split(","):
        bench = Bench(model_name, samples=args.samples)
        dense = bench.fresh()
        cells.append({"model": model_name, "cell": "dense", "ratio": 0.0,
                      "ppl": bench.perplexity(dense, corpora, args.eval_tokens)})
        del dense
        _write(args, bench, cells, corpora)
        for ratio in (float(r) for r in args.ratios.split(",")):
            for text in args.cells.split(","):
                method, allocator, options = parse_cell(text)
                t0 = time.perf_counter()
                result = bench.compress(method=method, allocator=allocator, allocator_options=options, ratio=ratio)
                seconds = time.perf_counter() - t0
                ppl = bench.perplexity(result.model, corpora, args.eval_tokens)
                cells.append({"model": model_name, "cell": text, "ratio": ratio, "ppl": ppl,
                              "ratio_achieved": round(result.summary["ratio_achieved"], 5),
                              "dense_modules": result.summary["dense_modules"],
                              "allocation": {k: v for k, v in result.allocation_report.items()
                                             if k in ("layer_sparsity", "block_influence", "guard_kept")},
                              "widths": [r.width for r in result.modules if r.role in ("down", "expert_down")],
                              "seconds": round(seconds, 1)})
                log.info("%s %s %.0f%%: %s", model_name, text, 100 * ratio, ppl)
                del result
                _write(args, bench, cells, corpora)


def _write(args, bench: Bench, cells: list[dict[str, Any]], corpora) -> None:
    lines = ["# MoDeGPT (Type I: MLPs slimmed by Nyström) vs SVD-LLM(W)\n",
             f"Perplexity (svdllm protocol, {args.eval_tokens} tokens per corpus in windows of 2048; calibration "
             f"{args.samples} × 512 wiki windows; no healing). '× dense' = perplexity / the dense model's.\n"]
    for model in dict.fromkeys(c["model"] for c in cells):
        mine = [c for c in cells if c["model"] == model]
        dense = next(c["ppl"] for c in mine if c["cell"] == "dense")
        header = ["cell", "removed", *(f"{c} ppl" for c in corpora), *(f"{c} × dense" for c in corpora),
                  "dense linears", "seconds"]
        lines += [f"\n## {model}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for c in mine:
            lines.append("| " + " | ".join([c["cell"], f"{c['ratio']:.0%}", *(f"{c['ppl'][k]:.2f}" for k in corpora),
                                            *(f"{c['ppl'][k] / dense[k]:.2f}" for k in corpora),
                                            str(c.get("dense_modules", "")), str(c.get("seconds", ""))]) + " |")
    write_results(args.name, {"cells": cells}, "\n".join(lines), bench.run)


if __name__ == "__main__":
    main()
