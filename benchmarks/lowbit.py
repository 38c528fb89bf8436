"""Low bits plus low rank at a memory budget: HQQ 4/3/2-bit alone, with EoRA compensation, and the byte planner.

    python benchmarks/lowbit.py --model smollm2-135m --fractions 0.25,0.30,0.35,0.40,0.50,0.61 \
        --eval-tokens 16384 --seq-len 512 --threads 2

Budgets are fractions of the dense model's weight bytes in bfloat16 (embeddings, lm_head and norms stay
bfloat16 in every recipe). Every cell is compressed from the same calibration statistics (64 × 512 wiki
tokens), SAVED, RELOADED with `svdzip.load` (transformers' `from_pretrained` through svdzip's quantizer), and
measured there: bytes on disk, bytes in memory, perplexity on wiki and austen (bf16 weights, float32 compute). Recipes:

* `dense-bf16`: the dense model.
* `int8`: every decoder linear int8 (torchao, per row): one point, at its own size.
* `hqq{b}`: every decoder linear at b bits (HQQ, groups of 64, bf16 scale and zero; HQQ's own rounding, to the
  nearest point of its optimised grid, calibration-free): one point each.
* `gptq{b}`: the same grid and storage, the values rounded by GPTQ's error feedback on the calibration Grams,
  loudest inputs first (`--rounding gptq`, the default of every low-bit recipe below).
* `plan@hqq{b}`: the byte planner (`--quantize plan`) at exactly the bytes of `hqq{b}`: equal-bytes comparison.
* `hqq{b}+eora`: b bits everywhere plus compensations whose ranks the planner allocates within the budget, for
  the widest b that fits the budget (`--quantize int{b} --compensate auto`).
* `hqq{b}+eora-uniform`: the same bits with one compensation rank for every matrix, the largest that fits.
* `hqq{b}+caldera`, `hqq{b}+caldera-uniform`: the same ranks, fitted in CALDERA's order (truncate W, quantize
  the residual, refit the correction once: `--compensate-order truncate-first`).
* `svd+q4`: SVD first, then both factors at 4 bits, ranks planned in bytes (`--quantize int4
  --quantize-scope factors`; 8-bit factors are `memory.py`'s SVD + int8).
* `plan`: `svdzip compress --budget-fraction F` with no other flag (quantize auto = plan, loss-aware weights).
* `plan-packed`: the same with packed factors on the menu too (`--allocator-option packed_factors=true`).
* `plan-relative`: the planner weighing every matrix's relative error alike instead of by the Fisher signal
  (`--allocator-option signal=relative`).

Every recipe above that rounds onto HQQ's grid has a `-nearest` twin (`plan-nearest@0.40`): the same with HQQ's
nearest rounding (`--rounding nearest`; what every low-bit cell measured before GPTQ's rounding existed), and an
`-auto` twin: GPTQ's rounding from 3 bits up, nearest at 2 bits (`--rounding auto`).

Results are rewritten after every cell; `--rewrite` redraws the table and plot from the JSON.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
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
from svdzip.output.lowbit import lowbit_record, packed_bytes
from svdzip.output.quantize import quantization_record
from svdzip.report.tables import human_bytes

log = logging.getLogger("benchmarks.lowbit")

STORAGE = torch.bfloat16  # what every recipe stores (and the reference of the budgets)
COMPUTE = torch.float32  # what the reloaded models compute perplexity in (the reference every table used)
# what every model, the dense one included, is timed in: torch's CPU int4 kernel (which serves svdzip's packed
# weights) needs bf16 activations, and this CPU's bf16 matmuls are as fast as float32 at batch 1 and faster beyond
SPEED_DTYPE = torch.bfloat16
DENSE, DENSE_BF16 = "dense-bf16", "dense-bf16 (bf16 compute)"  # the dense model timed in float32 and in bf16
# default-named cells round with gptq (what they were measured with before `choose` became svdzip's default);
# their twins `-nearest`, `-auto` and `-choose` round as named
BASE = {"allocator": "loss-aware", "storage_dtype": "bfloat16", "allocator_options": {}, "rounding": "gptq"}


def save_and_reload(result, out: Path):
    quantized = result.quantized  # `compress` stored it already (bf16, int8 or packed low bits)
    manifest = io.build_manifest(result.modules, result.summary, result.config.to_dict())
    if quantized:
        manifest.quantization = quantization_record(quantized, result.config.quantize, result.config.quantize_scope,
                                                    STORAGE)
    manifest.lowbit = lowbit_record(result.model)
    io.save(result.model, None, out, manifest, overwrite=True)
    del result.model
    gc.collect()
    model, _ = svdzip.load(out, dtype=COMPUTE, with_tokenizer=False)
    return model


def measure(bench: Bench, model, args, timed: dict[str, Any] | None = None, label: str = "",
            perplexity: bool = True) -> dict[str, Any]:
    """Bytes, perplexity and (with `timed`, the dense model in each compute dtype) speed and peak memory; the
    cell's model is timed in SPEED_DTYPE, alternately with the dense model in both dtypes."""
    t0 = time.perf_counter()
    cell: dict[str, Any] = {"weight_bytes_in_memory": weight_bytes(model)}
    if perplexity:
        cell["ppl"] = bench.perplexity(model, max_tokens=args.eval_tokens, seq_len=args.seq_len)
    if label in args.zeroshot_cells or "all" in args.zeroshot_cells:
        from svdzip.evaluate.zeroshot import evaluate_zero_shot

        # only the continuation positions' logits: a 151k-word head over every context position costs a third of
        # the time on Qwen and changes log-likelihoods in the last bits only
        zs = evaluate_zero_shot(model, bench.tokenizer, None, limit=args.zeroshot_limit, batch_size=16,
                                trim_logits=True)
        cell["zeroshot"] = zs
        cell["zeroshot_trim_logits"] = True
        cell["zeroshot_avg"] = sum(r["acc"] for r in zs.values()) / len(zs)
    if timed is not None:
        settings = [SpeedSetting(b, args.prompt, args.new_tokens) for b in args.batches]
        models = {DENSE: timed["float32"], DENSE_BF16: timed["bfloat16"]}
        if label != DENSE:
            models[label] = model.to(SPEED_DTYPE)  # last: its perplexity and zero-shot are computed in COMPUTE
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # speed is timed at one thread (the CPU is shared), whatever the run uses
        try:
            speed = measure_speed(models, settings, repeats=args.repeats, reference=DENSE, clock="cpu")
        finally:
            torch.set_num_threads(threads)
        picked = ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_bytes")
        for key, name in (("speed", label or DENSE), ("dense_speed", DENSE), ("dense_bf16_speed", DENSE_BF16)):
            cell[key] = {k: {m: speed["results"][name][k][m] for m in picked} for k in speed["results"][name]}
        cell["speed_ratio"] = speed.get("ratios", {}).get(label, {})
        cell["speed_dtype"] = str(SPEED_DTYPE).removeprefix("torch.")
        cell["weight_bytes_served"] = weight_bytes(models[label or DENSE])  # as it decoded (kernel planes)
    cell["eval_s"] = round(time.perf_counter() - t0, 1)
    return cell


def run_cell(bench: Bench, name: str, overrides: dict[str, Any], tmp: Path, args, timed) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        result = bench.compress(**{**BASE, **overrides})
    except SvdzipError as exc:
        log.warning("%s: %s", name, exc)
        return {"recipe": name, **overrides, "error": str(exc)}
    compress_s = round(time.perf_counter() - t0, 1)
    summary = result.summary
    out = tmp / f"cell-{name}"
    model = save_and_reload(result, out)
    cell = {"recipe": name, "label": result.config.label, "compensate": overrides.get("compensate"),
            "fraction": overrides.get("budget_fraction"),
            "budget_bytes": overrides.get("budget_bytes") or summary.get("memory", {}).get("budget_bytes"),
            "planned_bytes": summary.get("memory", {}).get("planned_bytes"), "disk_bytes": io.dir_size(out),
            "lowbit": summary.get("lowbit"), "factorised_modules": sum(1 for r in result.modules if r.rank),
            "compress_s": compress_s}
    cell["compensate_order"] = overrides.get("compensate_order", "quantize-first")
    cell["rounding"] = result.config.rounding if result.config.lowbit else None
    cell.update(measure(bench, model, args, timed if name in args.speed_cells else None, name))
    log.info("%s: %s on disk, wiki %.2f, austen %.2f", name, human_bytes(cell["disk_bytes"]), cell["ppl"]["wiki"],
             cell["ppl"]["austen"])
    del model
    shutil.rmtree(out, ignore_errors=True)
    gc.collect()
    return cell


def planned_shapes(model) -> list[tuple[int, int]]:
    """(out, in) of every matrix the low-bit recipes store: the decoder linears and an untied head."""
    from svdzip.models.adapter import ModelAdapter
    from svdzip.passes.head import untied_head

    shapes = [(i.out_features, i.in_features) for i in ModelAdapter(model).linears()]
    head = untied_head(model)
    return shapes + ([tuple(head.weight.shape)] if head is not None else [])


def alone_bytes(bench: Bench, bits: int, fixed: int) -> int:
    """Weight bytes of the model with every planned matrix at `bits` bits (the planner's prices)."""
    return fixed + sum(packed_bytes(o, i, bits) for o, i in planned_shapes(bench.fresh()))


def uniform_rank(bench: Bench, bits: int, budget: int, fixed: int) -> int:
    """The largest compensation rank that, given to every matrix, keeps b-bit storage within `budget`."""
    per_rank = sum(2 * (o + i) for o, i in planned_shapes(bench.fresh()))
    return max(0, (budget - alone_bytes(bench, bits, fixed)) // per_rank)


def cells_for(bench: Bench, fractions: list[float], reference: int, fixed: int) -> list[tuple[str, dict[str, Any]]]:
    cells: list[tuple[str, dict[str, Any]]] = [
        ("int8", {"allocator": "uniform", "quantize": "int8", "byte_aware": False, "budget_fraction": 1.0})]
    sizes = {b: alone_bytes(bench, b, fixed) for b in (4, 3, 2)}
    for b, size in sizes.items():
        cells.append((f"hqq{b}", {"quantize": f"int{b}", "compensate": 0, "rounding": "nearest"}))
        cells.append((f"gptq{b}", {"quantize": f"int{b}", "compensate": 0, "rounding": "gptq"}))
        cells.append((f"plan@hqq{b}", {"quantize": "plan", "budget_bytes": size}))
        cells.append((f"plan-packed@hqq{b}", {"quantize": "plan", "budget_bytes": size,
                                              "allocator_options": {"packed_factors": True}}))
    for f in fractions:
        budget = int(f * reference)
        cells.append((f"plan@{f:.2f}", {"budget_fraction": f}))
        cells.append((f"plan-packed@{f:.2f}", {"budget_fraction": f,
                                               "allocator_options": {"packed_factors": True}}))
        cells.append((f"plan-relative@{f:.2f}", {"budget_fraction": f, "allocator_options": {"signal": "relative"}}))
        fits = [b for b, size in sizes.items() if size <= budget]
        if fits:
            b = max(fits)
            cells.append((f"hqq{b}+eora@{f:.2f}", {"quantize": f"int{b}", "compensate": "auto",
                                                   "budget_fraction": f}))
            rank = uniform_rank(bench, b, budget, fixed)
            cells.append((f"hqq{b}+eora-uniform@{f:.2f}", {"quantize": f"int{b}", "compensate": int(rank)}))
            caldera = {"compensate_order": "truncate-first"}
            cells.append((f"hqq{b}+caldera@{f:.2f}", {"quantize": f"int{b}", "compensate": "auto",
                                                     "budget_fraction": f, **caldera}))
            cells.append((f"hqq{b}+caldera-uniform@{f:.2f}", {"quantize": f"int{b}", "compensate": int(rank),
                                                             **caldera}))
        cells.append((f"svd+q4@{f:.2f}", {"quantize": "int4", "quantize_scope": "factors", "budget_fraction": f}))
    # every recipe that rounds onto HQQ's grid, also with HQQ's own nearest rounding (calibration-free), with
    # GPTQ's from 3 bits up only (auto: 2-bit matrices rounded to nearest) and with svdzip's default (choose: gptq or
    # auto, whichever model loses less on held-out calibration windows)
    twins = [(_twin_name(n, r), {**o, "rounding": r}) for r in ("nearest", "auto", "choose") for n, o in cells
             if o.get("quantize") in (None, "plan", "int4", "int3", "int2") and "rounding" not in o
             and o.get("quantize_scope") != "factors"]
    return cells + twins


def _twin_name(name: str, rounding: str) -> str:
    """`plan@0.40` → `plan-nearest@0.40`: the same recipe with another rounding than the default (gptq)."""
    head, at, tail = name.partition("@")
    return f"{head}-{rounding}{at}{tail}"


def markdown(data: dict[str, Any]) -> str:
    ref, dense = data["reference_bytes"], data["dense"]["ppl"]
    lines = [f"#### {data['model']}: low bits + low rank (fractions of the dense bf16 weights, {human_bytes(ref)})",
             "", f"Dense bf16: wiki {dense['wiki']:.2f}, austen {dense['austen']:.2f}.", "",
             "| recipe | budget | on disk | wiki ppl↓ (×dense) | austen ppl↓ (×dense) | storage chosen | "
             "compensation ranks |", "|---|---|---|---|---|---|---|"]
    for c in sorted(data["cells"], key=lambda c: (c.get("disk_bytes") or 0, c["recipe"])):
        if "error" in c:
            lines.append(f"| {c['recipe']} | — | does not fit: {c['error']} |||||")
            continue
        budget = (f"{c['budget_bytes'] / ref:.1%}" if c.get("budget_bytes") else
                  f"its own size (rank {c['compensate']} each)" if c.get("compensate") else "its own size")
        low = c.get("lowbit") or {}
        storage = ", ".join(f"{v} {k}" for k, v in sorted((low.get("storage") or {}).items()))
        if c.get("factorised_modules") and "factor" not in storage:
            storage = (storage + ", " if storage else "") + f"{c['factorised_modules']} factorised"
        ppl = c["ppl"]
        lines.append(f"| {c['recipe']} | {budget} | {human_bytes(c['disk_bytes'])} ({c['disk_bytes'] / ref:.1%}) | "
                     f"{ppl['wiki']:.2f} ({ppl['wiki'] / dense['wiki']:.2f}×) | "
                     f"{ppl['austen']:.2f} ({ppl['austen'] / dense['austen']:.2f}×) | {storage or '—'} | "
                     f"{low.get('compensation_ranks', '—')} |")
    scored = [c for c in [data["dense"], *data["cells"]] if c.get("zeroshot")]
    if scored:
        tasks = list(scored[0]["zeroshot"])
        lines += ["", f"Zero-shot accuracy (first {data.get('zeroshot_limit', 200)} documents per task):", "",
                  "| recipe | on disk | " + " | ".join(tasks) + " | average |", "|---|---|" + "---|" * (len(tasks) + 1)]
        for c in scored:
            disk = human_bytes(c["disk_bytes"]) if c.get("disk_bytes") else human_bytes(ref)
            lines.append(f"| {c['recipe']} | {disk} | " + " | ".join(f"{c['zeroshot'][t]['acc']:.3f}" for t in tasks)
                         + f" | {c['zeroshot_avg']:.3f} |")
    lines += ["", f"- Perplexity: SVD-LLM protocol, bf16 weights computed in float32, windows of {data['seq_len']} "
              "tokens, the first "
              f"{data['eval_tokens']} evaluation tokens per corpus; calibration on wiki (austen is another domain).",
              "- On disk: the reloaded directory's files (model.safetensors holds the packed words, the bf16 scales "
              "and zero points, the compensations and everything else).",
              "- Storage chosen: matrices per storage (HQQ bits, 16-bit dense, factorised: 16-bit factors; "
              "'4-bit factors': factorised with both factors packed) as the planner chose."]
    notes = sorted({c["note"] for c in data["cells"] if c.get("note")})
    lines += [f"- {', '.join(c['recipe'] for c in data['cells'] if c.get('note') == n)}: {n}." for n in notes]
    speed = [c for c in data["cells"] if c.get("speed")]
    if speed:
        lines += ["", "| model | computed in | decode tok/s b1 | decode tok/s b16 | prefill tok/s b1 | "
                  "prefill tok/s b16 | peak b16 | ×dense decode b1 (float32 / bf16) |",
                  "|---|---|---|---|---|---|---|---|"]
        first = speed[0]
        rows = [(DENSE, "float32", data["dense"].get("speed") or first.get("dense_speed"))]
        if first.get("dense_bf16_speed"):
            rows.append((DENSE, "bfloat16", first["dense_bf16_speed"]))
        rows += [(c["recipe"], c.get("speed_dtype") or "float32", c["speed"]) for c in speed]
        ref = {dtype: s for name, dtype, s in rows if name == DENSE}
        for name, dtype, s in rows:
            b1 = next(k for k in sorted(s) if k.startswith("b1_"))
            b16 = next((k for k in sorted(s) if k.startswith("b16_")), b1)
            ratios = " / ".join(f"{s[b1]['decode_tokens_per_s'] / r[b1]['decode_tokens_per_s']:.2f}"
                                for r in ref.values())
            lines.append(f"| {name} | {dtype} | {s[b1]['decode_tokens_per_s']:.1f} | "
                         f"{s[b16]['decode_tokens_per_s']:.1f} | {s[b1]['prefill_tokens_per_s']:.1f} | "
                         f"{s[b16]['prefill_tokens_per_s']:.1f} | "
                         f"{human_bytes(s[b16].get('peak_bytes') or 0)} | {ratios} |")
        lines += ["", "- Speed: transformers on CPU, one thread, cpu clock, each model timed alternately with the "
                  "dense model (in float32 and in bfloat16 compute, from the same bf16 weights). In float32, HQQ's "
                  "packed weights are dequantized per forward (the bytes are saved at rest, not per token); in "
                  "bfloat16 they run through torch's CPU int4 kernel (`svdzip.output.cpu_int4`: 4/3/2-bit codes "
                  "as they are, 8-bit codes as two 4-bit planes)."]
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = data["reference_bytes"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, corpus in zip(axes, ("wiki", "austen"), strict=True):
        curves: dict[str, list[tuple[float, float]]] = {}
        for c in data["cells"]:
            if "error" in c:
                continue
            family = c["recipe"].split("@")[0]
            rounding = next((r for r in ("nearest", "auto") if family.endswith(f"-{r}")), "")
            family = family.removesuffix(f"-{rounding}")
            family = "hqq+eora (planned ranks)" if family.endswith("+eora") else family
            family = "hqq+eora (uniform ranks)" if "eora-uniform" in family else family
            family = {"caldera": "hqq+caldera (planned ranks)", "caldera-uniform": "hqq+caldera (uniform ranks)"}.get(
                family.partition("+")[2], family)
            family += f", {rounding} rounding" if rounding else ""
            curves.setdefault(family, []).append((c["disk_bytes"] / ref, c["ppl"][corpus]))
        for family, pts in sorted(curves.items()):
            pts.sort()
            single = len(pts) == 1
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="D" if single else "o",
                    linestyle="none" if single else "-", label=family)
        ax.axhline(data["dense"]["ppl"][corpus], color="black", linestyle=":", linewidth=0.8, label="dense bf16")
        ax.set_yscale("log")
        ax.set_xlabel("bytes on disk / dense bf16 weight bytes")
        ax.set_ylabel(f"{corpus} perplexity (log)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{data['model']}: HQQ low bits, EoRA compensation and the byte planner")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--fractions", default="0.25,0.30,0.35,0.40,0.50,0.61")
    p.add_argument("--only", default="", help="comma-separated cell names to run (default: all)")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--speed-cells", default="", help="cells whose decode speed and peak memory are measured")
    p.add_argument("--zeroshot-cells", default="", help="cells (and dense-bf16) whose zero-shot accuracy is measured "
                   "on the 8 tasks; 'all' for every cell")
    p.add_argument("--zeroshot-limit", type=int, default=200, help="documents per zero-shot task")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default=None, help="result file name (default: lowbit_<model>)")
    p.add_argument("--append", action="store_true", help="keep the cells of an earlier run; skip those already there")
    p.add_argument("--redo", default="", help="with --append: cells to measure again (a recipe that changed)")
    p.add_argument("--rewrite", action="store_true", help="only redraw the Markdown and plot from the JSON")
    args = p.parse_args()
    name = args.name or f"lowbit_{args.model.split('-')[0]}"
    if args.rewrite:
        rewrite_results(name, markdown, plot)
        return
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.speed_cells = {c for c in args.speed_cells.split(",") if c}
    args.zeroshot_cells = {c for c in args.zeroshot_cells.split(",") if c}
    torch.set_num_threads(args.threads)
    setup_logging()
    bench = Bench(args.model, samples=args.calib_samples)
    dense, _, _ = load_model(bench.source, dtype=STORAGE)
    reference = weight_bytes(dense)
    bf16 = copy.deepcopy(dense) if args.speed_cells else None
    dense = dense.to(COMPUTE)  # the bf16 weights, computed in float32 like every cell
    timed = {"float32": dense, "bfloat16": bf16} if bf16 is not None else None  # speed: the dense model in both

    fixed = reference - 2 * sum(o * i for o, i in planned_shapes(dense))  # embeddings, norms: kept bf16
    previous = RESULTS / f"{name}.json"
    if args.append and previous.is_file():
        data = json.loads(previous.read_text())
        redo = {c for c in args.redo.split(",") if c}
        data["cells"] = [c for c in data["cells"] if c["recipe"] not in redo]
        if "dense-bf16" in args.zeroshot_cells and not data["dense"].get("zeroshot"):
            scored = measure(bench, dense, args, None, "dense-bf16", perplexity=False)
            data["dense"].update({k: v for k, v in scored.items() if k.startswith("zeroshot")})
            data["zeroshot_limit"] = args.zeroshot_limit
    else:
        # not timed on its own: every speed cell times the dense model alternately with itself
        dense_cell = {"recipe": "dense-bf16", **measure(bench, dense, args, None, "dense-bf16")}
        data = {"model": args.model, "reference_bytes": reference, "fixed_bytes": fixed,
                "eval_tokens": args.eval_tokens, "seq_len": args.seq_len, "zeroshot_limit": args.zeroshot_limit,
                "dense": dense_cell, "cells": []}
    fractions = [float(f) for f in args.fractions.split(",") if f]
    only = {c for c in args.only.split(",") if c}
    done = {c["recipe"] for c in data["cells"]}
    tmp = Path(tempfile.mkdtemp(prefix="svdzip-lowbit-"))
    try:
        for cell_name, overrides in cells_for(bench, fractions, reference, fixed):
            if cell_name in done or (only and cell_name not in only):
                continue
            data["cells"].append(run_cell(bench, cell_name, overrides, tmp, args, timed))
            write_results(name, data, markdown(data), bench.run)
            plot(data, RESULTS / f"{name}.png")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
