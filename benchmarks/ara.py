"""ARA vs uniform vs D-Rank from the same statistics: perplexity on both corpora and ARA's training time.

    SVDZIP_CACHE=... python benchmarks/ara.py --ratios 0.2,0.4 --steps 128 --seq-len 256 --eval-tokens 8192

The paper's anchor (spec §9.9): LLaMA-2-7B at 20 % removed, uniform 8.38 → ARA 6.42 WikiText-2 (0.77×).
Plots of every ARA run go to `benchmarks/results/ara_plots/<ratio>_<variant>/`.
"""

from __future__ import annotations

import argparse
import logging
import resource
import time
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, Bench, setup_logging, write_results

from svdzip.allocate import AllocationContext, allocate, available, spent
from svdzip.budget import keep_budget
from svdzip.methods.decompose import Unit, decompose, group_linears
from svdzip.methods.linalg import Spectrum
from svdzip.methods.materialise import materialise
from svdzip.models.adapter import ModelAdapter
from svdzip.report.plots import write_allocation_report

log = logging.getLogger("benchmarks.ara")


def decomposed_units(bench: Bench, cache: Path | None) -> list:
    """The spectra, computed once and shared by every cell (decomposition dominates on a busy CPU)."""
    model = bench.fresh()
    adapter = ModelAdapter(model)
    groups = group_linears(adapter)
    if cache is not None and cache.exists():
        blob = torch.load(cache, weights_only=True)
        units = [Unit(members=list(g), spectrum=Spectrum(sigma2=blob[f"{i}.s"], basis=blob[f"{i}.b"]))
                 for i, g in enumerate(groups)]
        log.info("reusing spectra from %s", cache)
        return units
    units = decompose(adapter, bench.stats, "svdllm", groups)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({**{f"{i}.s": u.spectrum.sigma2 for i, u in enumerate(units)},
                    **{f"{i}.b": u.spectrum.basis for i, u in enumerate(units)}}, cache)
    return units


def run_cell(bench: Bench, units: list, ratio: float, allocator: str, options: dict[str, Any],
             plot_dir: Path | None) -> dict[str, Any]:
    """Allocate from the shared spectra, materialise a fresh model, evaluate."""
    model = bench.fresh()
    adapter = ModelAdapter(model)
    budget = keep_budget(sum(u.dense_params for u in units), ratio)
    ctx = AllocationContext(ratio=ratio, budget=budget, options=dict(options), adapter=adapter, model=model,
                            calib_tokens=bench.tokens, device=bench.device, seed=bench.base.seed,
                            cache=bench.allocation_cache)
    t0 = time.perf_counter()
    allocation = allocate(allocator, units, ctx)
    ranks, report = allocation.ranks, allocation.report
    alloc_s = time.perf_counter() - t0
    if plot_dir is not None:
        write_allocation_report(plot_dir, units, allocation)
    materialise(adapter, units, ranks)
    used = spent(units, ranks)
    ppl = bench.perplexity(model, max_tokens=bench_eval_tokens)
    row = {"ratio": ratio, "allocator": allocator, "options": options, "ppl": ppl,
           "ratio_achieved": 1 - used / sum(u.dense_params for u in units),
           "dense_modules": sum(r is None for r in ranks), "allocate_s": round(alloc_s, 1)}
    if "history" in report:
        row["train_s"] = round(report["train_s"], 1)
        hist = report["history"]
        row["ce_first_last"] = [round(hist[0]["ce"], 4), round(hist[-1]["ce"], 4)]
        row["kept_expected_last"] = round(hist[-1]["kept"], 5)
        row["lr"] = report["lr"]
    log.info("%s", row)
    return row


bench_eval_tokens = 8192


def main() -> None:
    global bench_eval_tokens
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratios", default="0.2,0.4")
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", default="auto")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--variants", default="uniform,drank,loss-aware,ara,ara-init-drank",
                   help="which cells to run: registered allocators, 'ara', and 'ara-init-<allocator>'")
    p.add_argument("--spectra-cache", default="/tmp/svdzip-ara-spectra-{model}.pt",
                   help="file the shared spectra are saved to / reused from ('' = none)")
    p.add_argument("--name", default="ara", help="results file name (default: %(default)s)")
    p.add_argument("--no-init-drank", action="store_true", help="skip the ARA run started from D-Rank's ranks")
    args = p.parse_args()
    setup_logging()
    bench_eval_tokens = args.eval_tokens
    bench = Bench(args.model)
    ara_opts = {"steps": args.steps, "seq_len": args.seq_len, "lr": args.lr}
    wanted = args.variants.split(",")
    variants: list[tuple[str, str, dict[str, Any]]] = [("uniform", "uniform", {})]
    variants += [(w, w, {}) for w in wanted if w in available() and w not in ("uniform", "ara")]
    if "ara" in wanted:
        variants.append(("ara", "ara", ara_opts))
    for w in wanted:  # ara-init-<allocator>: ARA's logits start from that allocator's ranks
        init = w.removeprefix("ara-init-")
        if w.startswith("ara-init-") and init in available() and not (init == "drank" and args.no_init_drank):
            variants.append((f"ara init={init}", "ara", {**ara_opts, "init": init}))
    cache = Path(args.spectra_cache.format(model=args.model.replace("/", "_"))) if args.spectra_cache else None
    units = decomposed_units(bench, cache)
    dense = bench.perplexity(bench.fresh(), max_tokens=args.eval_tokens)
    rows = []
    for ratio in (float(r) for r in args.ratios.split(",")):
        for label, allocator, opts in variants:
            plot_dir = RESULTS / f"{args.name}_plots" / f"{ratio:g}_{label.replace(' ', '_').replace('=', '-')}"
            row = run_cell(bench, units, ratio, allocator, opts, plot_dir if allocator == "ara" else None)
            row["label"] = label
            rows.append(row)
    for row in rows:
        base = next(r for r in rows if r["ratio"] == row["ratio"] and r["label"] == "uniform")
        row["vs_uniform"] = {c: round(row["ppl"][c] / base["ppl"][c], 3) for c in row["ppl"]}
    lines = [f"# ARA vs uniform vs D-Rank — {args.model}, SVD-LLM whitening, same statistics",
             "", f"Dense perplexity: wiki {dense['wiki']:.2f}, austen {dense['austen']:.2f} "
             f"({args.eval_tokens} eval tokens per corpus, svdllm protocol, 2048-token windows).",
             f"ARA: {args.steps} steps × 1 × {args.seq_len} tokens, lr {args.lr} (auto = 1e-3·2560/steps).", "",
             "| removed | allocator | wiki ppl | austen ppl | wiki ×uniform | austen ×uniform | dense units "
             "| achieved | alloc s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['ratio']:.0%} | {r['label']} | {r['ppl']['wiki']:.2f} | {r['ppl']['austen']:.2f} | "
                     f"{r['vs_uniform']['wiki']:.3f} | {r['vs_uniform']['austen']:.3f} | {r['dense_modules']} | "
                     f"{r['ratio_achieved']:.4f} | {r['allocate_s']:.0f} |")
    lines += ["", "Paper anchor (LLaMA-2-7B, 20 % removed, WikiText-2): uniform 8.38 → ARA 6.42 (0.77×).",
              f"Peak RSS of this run: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB."]
    write_results(args.name, {"model": args.model, "dense_ppl": dense, "eval_tokens": args.eval_tokens,
                          "ara_options": ara_opts, "rows": rows,
                          "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20},
                  "\n".join(lines))


if __name__ == "__main__":
    main()
