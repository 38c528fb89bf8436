"""Memory as the budget: SVD, int8 quantization, or both, at the same weight bytes (issue 14).

    python benchmarks/memory.py --model smollm2-135m --fractions 1.0,0.75,0.5,0.35,0.25 \
        --eval-tokens 8192 --seq-len 512 --threads 1

Budgets are fractions of the dense model's weight bytes in bfloat16 (embeddings and norms included; they
stay bfloat16 in every recipe). Every cell is compressed from the same calibration statistics, stored
(bfloat16, int8 through torchao), SAVED, and RELOADED from disk; bytes on disk, bytes in memory, perplexity
and speed are those of the reloaded model. Recipes:

* `dense-bf16`: the dense model (the reference of every speed ratio, measured alternately in the same process).
* `svd16`: SVD-LLM whitening + loss-aware allocation, every matrix bfloat16.
* `int8`: the dense model, every decoder linear int8 (torchao weight-only): one point, at its own size.
* `svd+int8`: loss-aware, factors and dense remainder int8, byte-aware allocation.
* `svd+int8 (params first)`: the same storage, loss-aware ranks allocated on parameters at the ratio that fits
  (factors and dense matrices both int8, so this differs from byte-aware only by the per-row scale bytes).
* `svd+int8 uniform (params first)`: SVD-LLM's usual stack: uniform ranks at the ratio that fits, then int8.
* `svd16+int8dense`: factors bfloat16, dense remainder int8, byte-aware: "keep dense in int8" and
  "factorise deeper in 16-bit" compete in one allocation.
* `svd16+int8dense (params first)`: the same storage, loss-aware ranks allocated on parameters at the ratio
  whose stored result fits, i.e. allocate first and quantize after.

int4 is not measured: torchao has no int4 layout that stores 4-bit values on this x86 CPU (see
svdzip/quantize.py). Results are rewritten after every cell.
"""

from __future__ import annotations

import argparse
import gc
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, Bench, rewrite_results, setup_logging, write_results

import svdzip
from svdzip.errors import SvdzipError
from svdzip.evaluate.speed import SpeedSetting, measure_speed, weight_bytes
from svdzip.output import io
from svdzip.output.loading import load_model
from svdzip.output.quantize import quantization_record
from svdzip.report.tables import human_bytes

log = logging.getLogger("benchmarks.memory")

STORAGE = torch.bfloat16
RECIPES: dict[str, dict[str, Any]] = {
    "int8": {"allocator": "uniform", "quantize": "int8", "byte_aware": False, "only": 1.0},
    "svd16": {"allocator": "loss-aware"},
    "svd+int8": {"allocator": "loss-aware", "quantize": "int8"},
    "svd+int8 (params first)": {"allocator": "loss-aware", "quantize": "int8", "byte_aware": False},
    "svd+int8 uniform (params first)": {"allocator": "uniform", "quantize": "int8", "byte_aware": False},
    "svd16+int8dense": {"allocator": "loss-aware", "quantize": "int8", "quantize_scope": "dense"},
    "svd16+int8dense (params first)": {"allocator": "loss-aware", "quantize": "int8", "quantize_scope": "dense",
                                       "byte_aware": False},
}


def measure(bench: Bench, model, dense, label: str, args) -> dict[str, Any]:
    """Perplexity and speed of a reloaded model (speed alternately with the dense bf16 model)."""
    t0 = time.perf_counter()
    ppl = bench.perplexity(model, max_tokens=args.eval_tokens, seq_len=args.seq_len)
    settings = [SpeedSetting(b, args.prompt, args.new_tokens) for b in args.batches]
    speed = measure_speed({"dense-bf16": dense, label: model} if model is not dense else {"dense-bf16": dense},
                          settings, repeats=args.repeats, reference="dense-bf16", clock="cpu")
    return {"ppl": ppl, "weight_bytes_in_memory": weight_bytes(model),
            "speed": {k: {m: speed["results"][label][k][m] for m in
                          ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_bytes")}
                      for k in speed["results"][label]},
            "speed_ratio": speed.get("ratios", {}).get(label, {}), "eval_s": round(time.perf_counter() - t0, 1)}


def stored_key(ranks: list[int | None], quantize: str | None, scope: str) -> tuple:
    """What identifies a stored model: its ranks and what is quantized (the scope is moot when all is dense)."""
    if all(r is None for r in ranks):
        return ("dense", quantize, None)
    return (tuple(ranks), quantize, scope if quantize else None)


def run_cell(bench: Bench, recipe: str, fraction: float, dense, tmp: Path, args,
             seen: dict[tuple, dict[str, Any]]) -> dict[str, Any]:
    overrides = {k: v for k, v in RECIPES[recipe].items() if k != "only"}
    overrides.update(budget_fraction=fraction, storage_dtype="bfloat16", allocator_options={})
    try:
        result = bench.compress(**overrides)
    except SvdzipError as exc:
        log.warning("%s at %.0f%%: %s", recipe, 100 * fraction, exc)
        return {"recipe": recipe, "fraction": fraction, "error": str(exc)}
    ranks = [r.rank for r in result.modules]
    stored = stored_key(ranks, result.config.quantize, result.config.quantize_scope)
    if stored in seen:  # the same stored model as an earlier cell (e.g. all dense int8): not measured twice
        same = seen[stored]
        log.info("%s at %.0f%%: the same model as %s at %s", recipe, 100 * fraction, same["recipe"], same["fraction"])
        return {**same, "recipe": recipe, "fraction": fraction, "same_model_as": f"{same['recipe']} at "
                f"{100 * same['fraction']:.0f}%", "budget_bytes": result.summary["memory"]["budget_bytes"]}
    quantized = result.quantized  # `compress` stored it already (bf16, or int8 through torchao)
    manifest = io.build_manifest(result.modules, result.summary, result.config.to_dict())
    if quantized:
        manifest.quantization = quantization_record(quantized, result.config.quantize, result.config.quantize_scope,
                                                    STORAGE)
    out = tmp / f"cell-{recipe.replace(' ', '_')}-{fraction}"
    io.save(result.model, None, out, manifest, overwrite=True)
    in_memory_before_save = weight_bytes(result.model)
    ranks = [r.rank for r in result.modules]
    del result.model
    gc.collect()
    model, _ = svdzip.load(out, dtype=STORAGE, with_tokenizer=False)
    mem = result.summary["memory"]
    cell = {"recipe": recipe, "fraction": fraction, "label": result.config.label,
            "budget_bytes": mem["budget_bytes"], "planned_bytes": mem["planned_bytes"],
            "disk_bytes": io.dir_size(out), "in_memory_before_save": in_memory_before_save,
            "params_first_ratio": mem.get("params_first_ratio"),
            "ratio_achieved": result.summary["ratio_achieved"], "dense_modules": result.summary["dense_modules"],
            "factorised_modules": sum(1 for r in ranks if r is not None), "ranks": ranks,
            "compress_s": result.summary.get("wall_s")}
    cell.update(measure(bench, model, dense, recipe, args))
    seen[stored] = cell
    log.info("%s at %.0f%%: %s on disk, %s in memory, wiki %.2f, austen %.2f", recipe, 100 * fraction,
             human_bytes(cell["disk_bytes"]), human_bytes(cell["weight_bytes_in_memory"]), cell["ppl"]["wiki"],
             cell["ppl"]["austen"])
    del model
    shutil.rmtree(out, ignore_errors=True)
    gc.collect()
    return cell


def fmt_ppl(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.3g}" if x >= 1e4 else f"{x:.2f}"


def markdown(data: dict[str, Any]) -> str:
    ref = data["reference_bytes"]
    lines = [f"#### {data['model']}: memory budgets (fractions of the dense bf16 weights, {human_bytes(ref)})", "",
             "| budget | recipe | on disk | in memory | wiki ppl↓ | austen ppl↓ | dense / factorised modules | "
             "decode ×dense b1 | decode ×dense b16 | prefill ×dense b1 | prefill ×dense b16 | peak b16 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    b1, b16 = f"b1_s{data['prompt']}", f"b16_s{data['prompt']}"
    for c in data["cells"]:
        budget = f"{100 * c['fraction']:.0f}%"
        if "error" in c:
            lines.append(f"| {budget} | {c['recipe']} | does not fit: {c['error']} |||||||||")
            continue
        sr, speed = c.get("speed_ratio") or {}, c.get("speed") or {}

        def ratio(key: str, metric: str, sr=sr, speed=speed) -> str:
            v = sr.get(key, {}).get(metric)  # none: the dense reference itself, or a batch size not timed
            return f"{v:.2f}" if v is not None else "1.00" if key in speed else "—"
        same = f" (= {c['same_model_as']})" if c.get("same_model_as") else ""
        dense = "all" if c.get("dense_modules") in (None, "all") else c["dense_modules"]
        lines.append(
            f"| {budget} | {c['recipe']}{same} | {human_bytes(c['disk_bytes'])} ({c['disk_bytes'] / ref:.1%}) | "
            f"{human_bytes(c['weight_bytes_in_memory'])} | {fmt_ppl(c['ppl']['wiki'])} | "
            f"{fmt_ppl(c['ppl']['austen'])} | {dense} / {c.get('factorised_modules', '—')} | "
            f"{ratio(b1, 'decode_speedup')} | {ratio(b16, 'decode_speedup')} | {ratio(b1, 'prefill_speedup')} | "
            f"{ratio(b16, 'prefill_speedup')} | "
            f"{human_bytes(speed[b16]['peak_bytes']) if b16 in speed else '—'} |")
    d = data["cells"][0]["speed"]
    timed = [(b, key) for b, key in ((1, b1), (16, b16)) if key in d]
    lines += ["", "Dense bf16 absolute (first cell): " + "; ".join(
        f"batch {b}: decode {d[key]['decode_tokens_per_s']:.1f} tok/s, prefill {d[key]['prefill_tokens_per_s']:.0f} "
        "tok/s" for b, key in timed) + " (— in the table: a batch size not timed in that run)."]
    lines += ["", f"- Perplexity: SVD-LLM protocol, windows of {data['seq_len']} tokens, the first "
              f"{data['eval_tokens']} evaluation tokens per corpus (fewer than the README's sweep: CPU time).",
              f"- Speed: transformers on CPU, {data['threads']} thread(s), cpu clock, prompt {data['prompt']} tokens, "
              f"{data['new_tokens']} greedy tokens, median of {data['repeats']}; every model timed alternately with "
              "the dense bf16 model in the same process; ×dense = that cell's ratio to the dense model (> 1 = faster; "
              "the CPU was shared, read differences under ~10 % as ties). Peak = weights + transient "
              "process RSS while decoding at batch 16 (a lower bound on a CPU).",
              "- On disk = the saved directory's safetensors files; in memory = the reloaded model's parameter and "
              "buffer bytes (int8 weights counted by their int8 values, scales and zero points).",
              "- int4: not measured; torchao stores no real 4-bit layout on this x86 CPU (CUDA/XPU only)."]
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ref = data["reference_bytes"]
    for ax, corpus in zip(axes, ("wiki", "austen"), strict=True):
        by: dict[str, list[tuple[float, float]]] = {}
        for c in data["cells"]:
            if "error" not in c:
                by.setdefault(c["recipe"], []).append((c["disk_bytes"] / ref, c["ppl"][corpus]))
        points = {"dense-bf16": ("*", 16), "int8": ("D", 9)}  # single models, drawn on top
        for recipe, pts in by.items():
            pts.sort()
            if recipe in points:
                marker, size = points[recipe]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, markersize=size, linestyle="none",
                        color="black" if recipe == "dense-bf16" else "tab:orange", label=recipe, zorder=5)
            else:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=recipe)
        dense_ppl = by.get("dense-bf16", [(1.0, None)])[0][1]
        if dense_ppl:
            ax.axhline(dense_ppl, color="black", linestyle=":", linewidth=0.8)
        ax.set_xscale("linear")
        ax.set_yscale("log")
        ax.set_xlabel("bytes on disk / dense bf16 weight bytes")
        ax.set_ylabel(f"{corpus} perplexity (log)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{data['model']}: SVD, int8, or both at a memory budget")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--fractions", default="1.0,0.75,0.5,0.35,0.25")
    p.add_argument("--recipes", default=",".join(r for r in RECIPES if r != "svd+int8 (params first)"),
                   help="comma-separated, from: " + ", ".join(RECIPES))
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batches", default="1,16")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default=None, help="result file name (default: memory_<model>)")
    p.add_argument("--append", action="store_true",
                   help="add cells to the existing JSON (its dense reference kept; cells already there skipped)")
    p.add_argument("--rewrite", action="store_true",
                   help="only rewrite the Markdown table and the plot from the existing JSON (no measuring)")
    args = p.parse_args()
    name = args.name or f"memory_{args.model.split('-')[0]}"
    if args.rewrite:
        rewrite_results(name, markdown, plot)
        return
    args.batches = [int(b) for b in args.batches.split(",") if b]
    torch.set_num_threads(args.threads)
    setup_logging()
    bench = Bench(args.model)
    dense, _, _ = load_model(bench.source, dtype=STORAGE)
    tmp = Path(tempfile.mkdtemp(prefix="svdzip-memory-"))
    try:
        dense.save_pretrained(tmp / "dense")
        previous = RESULTS / f"{name}.json"
        if args.append and previous.is_file():
            import json

            data = json.loads(previous.read_text())
        else:
            data = {"model": args.model, "reference_bytes": weight_bytes(dense), "eval_tokens": args.eval_tokens,
                    "seq_len": args.seq_len, "prompt": args.prompt, "new_tokens": args.new_tokens,
                    "repeats": args.repeats, "threads": args.threads, "cells": []}
            cell = {"recipe": "dense-bf16", "fraction": 1.0, "disk_bytes": io.dir_size(tmp / "dense"),
                    "dense_modules": "all", "factorised_modules": 0}
            cell.update(measure(bench, dense, dense, "dense-bf16", args))
            data["cells"].append(cell)
        fractions = [float(f) for f in args.fractions.split(",") if f]
        recipes = [r for r in args.recipes.split(",") if r]
        unknown = [r for r in recipes if r not in RECIPES]
        if unknown:
            raise SystemExit(f"unknown recipes {unknown}; choose from {', '.join(RECIPES)}")
        seen: dict[tuple, dict[str, Any]] = {}
        done = set()
        for c in data["cells"]:
            done.add((c["recipe"], c["fraction"]))
            if "ranks" in c and "same_model_as" not in c:
                recipe = RECIPES.get(c["recipe"], {})
                seen[stored_key(c["ranks"], recipe.get("quantize"), recipe.get("quantize_scope", "all"))] = c
        seen.setdefault(stored_key([None], None, "all"), data["cells"][0])
        for recipe in recipes:
            for fraction in fractions:
                if RECIPES[recipe].get("only", fraction) != fraction or (recipe, fraction) in done:
                    continue
                data["cells"].append(run_cell(bench, recipe, fraction, dense, tmp, args, seen))
                write_results(name, data, markdown(data), run=bench.run)
        plot(data, RESULTS / f"{name}.png")
        write_results(name, data, markdown(data), run=bench.run)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
