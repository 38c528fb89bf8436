"""MoDeGPT and the hybrid against SVD-LLM(W) factorisation, from the same calibration statistics (issue 19).

    python benchmarks/modegpt.py --models smollm2-135m --ratios 0.2,0.4 \
        --cells svdllm:uniform,svdllm:loss-aware,modegpt:uniform,modegpt:block-influence,modegpt:loss-aware,\
hybrid:loss-aware

A cell is `method:allocator[:key=value,...][+distill[@corpus]]` (allocator options; `+distill`: healed with the
default distillation, on the calibration corpus or `@corpus`), e.g. `modegpt:block-influence:epsilon=0.05`,
`hybrid:loss-aware+distill`, `hybrid:loss-aware+distill@mix` or `hybrid:ara` (ARA from the hybrid's choice).
`--tasks all` adds zero-shot accuracy (first `--limit` documents of each task) with BoolQ's majority-label rate
and predicted label distribution.
MoDeGPT: MLPs slimmed by Nyström, query/key dimensions by CR scores, value-output products truncated
whitened; hybrid: per module the loss-aware choice between that and SVD-LLM factorisation. Perplexity
on wiki (the calibration's domain) and austen (another), ≥ 16k tokens each; compression wall time per
cell (the statistics are computed once per model, before the cells). `--append` adds cells to the
results file (the dense row is measured once); `--rewrite` redraws the Markdown from the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from typing import Any

import torch
from common import RESULTS, Bench, accuracies, setup_logging, write_results

log = logging.getLogger("benchmarks.modegpt")


def parse_cell(text: str) -> tuple[str, str, dict[str, Any], str, str | None]:
    """`method:allocator[:k=v,...][+distill[@corpus]]` → (method, allocator, options, heal, healing corpus)."""
    text, _, heal = text.partition("+")
    heal, _, heal_corpus = heal.partition("@")
    method, allocator, *rest = text.split(":")
    options = dict(kv.split("=", 1) for kv in ",".join(rest).split(",") if kv) if rest else {}
    return method, allocator, options, heal or "none", heal_corpus or None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m")
    p.add_argument("--ratios", default="0.2,0.4")
    p.add_argument("--cells", default="svdllm:uniform,svdllm:loss-aware,modegpt:uniform,modegpt:block-influence,"
                                      "modegpt:loss-aware")
    p.add_argument("--eval-tokens", type=int, default=16384, help="tokens per evaluation corpus")
    p.add_argument("--corpora", default="wiki,austen")
    p.add_argument("--samples", type=int, default=64, help="calibration windows (512 tokens)")
    p.add_argument("--tasks", default="", help="also zero-shot accuracy on these tasks ('all' = the 8 tasks)")
    p.add_argument("--limit", type=int, default=200, help="zero-shot documents per task")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--name", default="modegpt")
    p.add_argument("--heal-steps", type=int, default=None, help="distillation steps (default: the recipe's)")
    p.add_argument("--heal-eval-every", type=int, default=None, help="held-out evaluation every N steps")
    p.add_argument("--append", action="store_true", help="add to the cells of an earlier run of --name")
    p.add_argument("--speed", action="store_true",
                   help="instead of perplexity: time decode and prefill of every cell against dense (one process, "
                        "alternating; use --threads 1) and compare with the bytes bound (dense bytes / model bytes)")
    p.add_argument("--rewrite", action="store_true", help="only redraw the Markdown from the JSON")
    args = p.parse_args()
    setup_logging()
    path = RESULTS / f"{args.name}.json"
    if args.rewrite or args.append:
        earlier = json.loads(path.read_text())
        if args.rewrite:
            md = (RESULTS / f"{args.name}.md").read_text().split("\n\nProduced by", 1)[1]
            (RESULTS / f"{args.name}.md").write_text(markdown(args, earlier["cells"], tuple(args.corpora.split(",")))
                                                   + "\n\nProduced by" + md)
            return
    if args.threads:
        torch.set_num_threads(args.threads)
    corpora = tuple(args.corpora.split(","))
    if args.speed:
        return speed(args)
    cells: list[dict[str, Any]] = earlier["cells"] if args.append else []
    args.runs = earlier.get("runs", []) if args.append else []  # kept in the file: every run that added cells
    for model_name in args.models.split(","):
        bench = Bench(model_name, samples=args.samples)
        if not any(c["model"] == model_name and c["cell"] == "dense" for c in cells):
            dense = bench.fresh()
            cells.append({"model": model_name, "cell": "dense", "ratio": 0.0,
                          "ppl": bench.perplexity(dense, corpora, args.eval_tokens)})
            del dense
            _write(args, bench, cells, corpora)
        dense_cell = next(c for c in cells if c["model"] == model_name and c["cell"] == "dense")
        if args.tasks and "zero_shot" not in dense_cell:
            dense_cell["zero_shot"] = zero_shot(args, bench, bench.fresh())
            _write(args, bench, cells, corpora)
        for ratio in (float(r) for r in args.ratios.split(",")):
            for text in args.cells.split(","):
                method, allocator, options, heal, heal_corpus = parse_cell(text)
                t0 = time.perf_counter()
                healing = dataclasses.replace(bench.base.healing, corpus=heal_corpus, steps=args.heal_steps,
                                              eval_every=args.heal_eval_every or bench.base.healing.eval_every)
                result = bench.compress(method=method, allocator=allocator, allocator_options=options, ratio=ratio,
                                        heal=heal, healing=healing,
                                        tokenizer=bench.tokenizer if heal != "none" else None)
                seconds = time.perf_counter() - t0
                ppl = bench.perplexity(result.model, corpora, args.eval_tokens)
                scores = {"zero_shot": zero_shot(args, bench, result.model)} if args.tasks else {}
                cells.append({"model": model_name, "cell": text, "ratio": ratio, "ppl": ppl,
                              "ratio_achieved": round(result.summary["ratio_achieved"], 5),
                              "dense_modules": result.summary["dense_modules"],
                              "allocation": {k: v for k, v in result.allocation_report.items()
                                             if k in ("layer_sparsity", "block_influence", "guard_kept", "held_modules",
                                                       "refined_matrices", "train_s")},
                              "widths": [r.width for r in result.modules if r.role in ("down", "expert_down")],
                              "heal": result.summary.get("heal"), "seconds": round(seconds, 1), **scores})
                log.info("%s %s %.0f%%: %s", model_name, text, 100 * ratio, ppl)
                del result
                _write(args, bench, cells, corpora)


def zero_shot(args, bench: Bench, model) -> dict[str, Any]:
    """Accuracy per task, its average, and BoolQ's majority-label rate and predicted label distribution beside it
    (the arena found MoDeGPT's BoolQ collapsing to one label)."""
    scores = bench.zero_shot(model, args.tasks, args.limit)
    labels = {t: {k: s[k] for k in ("majority_rate", "predicted")} for t, s in scores.items()}
    return {**accuracies(scores), "labels": labels}


def speed(args) -> None:
    """Decode speed of each cell's model against dense and against its bytes bound (weights read per token)."""
    from svdzip.evaluate.speed import SpeedSetting, measure_speed, summary_row

    rows = []
    for model_name in args.models.split(","):
        bench = Bench(model_name, samples=args.samples)
        models = {"dense": bench.fresh()}
        for ratio in (float(r) for r in args.ratios.split(",")):
            for text in args.cells.split(","):
                method, allocator, options, *_ = parse_cell(text)
                models[f"{text}@{ratio:.0%}"] = bench.compress(method=method, allocator=allocator,
                                                               allocator_options=options, ratio=ratio).model
        result = measure_speed(models, [SpeedSetting(1, 128, 33)], repeats=5, clock="cpu")
        for label in models:
            row = summary_row(result, label)
            row["bytes_bound"] = 1.0 / row["weight_bytes_ratio"]
            rows.append({"model": model_name, "cell": label, **{k: round(v, 4) for k, v in row.items()}})
            log.info("%s %s: %s", model_name, label, rows[-1])
        lines = ["# Decode speed of MoDeGPT and the hybrid vs dense (transformers, CPU)\n",
                 f"Batch 1, a 128-token prompt, 32 new tokens; median of 5 alternating repeats, CPU time, "
                 f"{torch.get_num_threads()} thread(s). 'bytes bound' = dense weight bytes / the model's: the speedup "
                 "a decode limited by reading its weights would reach.\n",
                 "| model | cell | decode tok/s | decode ×dense | bytes bound | prefill ×dense |",
                 "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['cell']} | {r.get('decode_tokens_per_s', 0):.1f} | "
                  f"{r.get('decode_speedup', 1):.2f} | {r['bytes_bound']:.2f} | {r.get('prefill_speedup', 1):.2f} |"
                  for r in rows]
        write_results(args.name, {"cells": rows, "speed": result}, "\n".join(lines), bench.run)


def _write(args, bench: Bench, cells: list[dict[str, Any]], corpora) -> None:
    write_results(args.name, {"cells": cells, "runs": args.runs}, markdown(args, cells, corpora), bench.run)


def markdown(args, cells: list[dict[str, Any]], corpora) -> str:
    lines = ["# MoDeGPT and the hybrid vs SVD-LLM(W)\n",
             f"Perplexity (svdllm protocol, {args.eval_tokens} tokens per corpus in windows of 2048; calibration "
             f"{args.samples} × 512 wiki windows; a `+distill` cell is healed by the default distillation, on its "
             f"`@corpus` or svdzip's default: wiki for cells measured before 2026-12-06, mix since). "
             "'× dense' = perplexity / the dense model's; 'heal' = held-out KL of the "
             "healing corpus at step 0 → of the weights kept (best step).\n"]
    for model in dict.fromkeys(c["model"] for c in cells):
        mine = [c for c in cells if c["model"] == model]
        dense = next(c["ppl"] for c in mine if c["cell"] == "dense")
        header = ["cell", "removed", *(f"{c} ppl" for c in corpora), *(f"{c} × dense" for c in corpora),
                  "dense linears", "heal", "seconds"]
        lines += [f"\n## {model}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for c in mine:
            lines.append("| " + " | ".join([c["cell"], f"{c['ratio']:.0%}", *(f"{c['ppl'][k]:.2f}" for k in corpora),
                                            *(f"{c['ppl'][k] / dense[k]:.2f}" for k in corpora),
                                            str(c.get("dense_modules", "")), _heal_text(c.get("heal")),
                                            str(c.get("seconds", ""))]) + " |")
        lines += _zero_shot_table([c for c in mine if "zero_shot" in c])
    return "\n".join(lines)


def _zero_shot_table(cells: list[dict[str, Any]]) -> list[str]:
    """Zero-shot accuracy per cell, with BoolQ's label balance: its accuracy means little beside the rate of always
    answering the majority label, and a predicted distribution near one label is a collapse."""
    if not cells:
        return []
    tasks = [t for t in cells[0]["zero_shot"] if t not in ("average", "labels")]
    lines = ["", "Zero-shot accuracy (acc; BoolQ's majority-label rate and the share of each predicted label beside "
             "it; 0 = no, 1 = yes):", "",
             "| cell | removed | " + " | ".join(tasks)
             + " | average | without BoolQ | BoolQ majority | BoolQ predicted |",
             "|" + "---|" * (len(tasks) + 6)]
    others = [t for t in tasks if t != "boolq"]
    for c in cells:
        z = c["zero_shot"]
        boolq = z["labels"].get("boolq", {})
        predicted = ", ".join(f"{k}: {v:.2f}" for k, v in boolq.get("predicted", {}).items())
        lines.append("| " + " | ".join([c["cell"], f"{c['ratio']:.0%}", *(f"{z[t]:.3f}" for t in tasks),
                                        f"**{z['average']:.3f}**",
                                        f"{sum(z[t] for t in others) / max(len(others), 1):.3f}",
                                        f"{boolq.get('majority_rate', float('nan')):.3f}",
                                        predicted]) + " |")
    return lines


def _heal_text(heal: dict[str, Any] | None) -> str:
    if not heal:
        return ""
    return f"{heal['heldout_step0']:.3f} → {heal['heldout_final']:.3f}" + ("" if heal["improved"] else " (kept step 0)")


if __name__ == "__main__":
    main()
