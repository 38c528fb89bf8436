"""The papers' baselines and the weight updates on one model, at several ratios (issue 5).

Cells: SVD, FWSVD, ASVD, ASVD+STRS, SVD-LLM(W), SVD-LLM(W)+update, D-Rank, D-Rank+update (D-Rank only
when its allocator `drank` is registered). Perplexity (SVD-LLM protocol) on both corpora and the
compression wall time of each cell. Results merge into `results/baselines.json` cell by cell, so the
slow STRS cells can run in a separate invocation.

    .venv/bin/python benchmarks/baselines.py --ratios 0.2,0.4,0.6 --eval-tokens 8192
    .venv/bin/python benchmarks/baselines.py --methods asvd+strs --strs-samples 2 --strs-seq-len 256
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

from common import RESULTS, Bench, setup_logging, write_results

from svdzip.allocate import available

log = logging.getLogger("benchmarks.baselines")

#: cell name → Recipe overrides (allocator options for STRS are filled in from the CLI)
CELLS: dict[str, dict[str, Any]] = {
    "svd": {"method": "svd"},
    "fwsvd": {"method": "fwsvd"},
    "asvd": {"method": "asvd"},
    "asvd+strs": {"method": "asvd", "allocator": "strs"},
    "svdllm": {"method": "svdllm"},
    "svdllm+update": {"method": "svdllm", "update": "svdllm"},
    "svdllm+drank": {"method": "svdllm", "allocator": "drank"},
    "svdllm+drank+update": {"method": "svdllm", "allocator": "drank", "update": "svdllm"},
}
PAPER_ORDER = ["svd", "fwsvd", "asvd", "asvd+strs", "svdllm", "svdllm+update", "svdllm+drank",
               "svdllm+drank+update"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratios", default="0.2,0.4,0.6")
    p.add_argument("--methods", default=",".join(PAPER_ORDER))
    p.add_argument("--eval-tokens", type=int, default=8192, help="tokens per corpus (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=2048, help="evaluation window")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--fisher-samples", type=int, default=16, help="calibration sequences for FWSVD's Fisher")
    p.add_argument("--update-samples", type=int, default=16, help="calibration sequences the updates refit on")
    p.add_argument("--strs-samples", type=int, default=2)
    p.add_argument("--strs-seq-len", type=int, default=256)
    p.add_argument("--strs-stop-factor", type=float, default=3.0)
    p.add_argument("--name", default="baselines")
    args = p.parse_args()
    setup_logging()

    ratios = [float(r) for r in args.ratios.split(",") if r]
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in CELLS]
    if unknown:
        raise SystemExit(f"unknown cells {unknown}; choose from {', '.join(CELLS)}")
    registered = set(available())
    skipped = [m for m in methods if CELLS[m].get("allocator", "uniform") not in registered]
    if skipped:
        log.warning("skipping %s: allocator not registered yet", skipped)
    methods = [m for m in methods if m not in skipped]

    bench = Bench(args.model, samples=args.calib_samples, seq_len=args.calib_seq_len)
    path = RESULTS / f"{args.name}.json"
    payload: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    cells: dict[str, Any] = payload.get("cells", {})
    settings = {"model": args.model, "calibration": f"wiki {args.calib_samples} x {args.calib_seq_len}",
                "eval_tokens_per_corpus": args.eval_tokens, "eval_seq_len": args.seq_len,
                "protocol": "svdllm", "fisher_samples": args.fisher_samples,
                "update_samples": args.update_samples,
                "strs": {"samples": args.strs_samples, "seq_len": args.strs_seq_len,
                         "stop_factor": args.strs_stop_factor, "candidates": "0.1..0.9"}}

    if "dense" not in cells:
        t0 = time.perf_counter()
        cells["dense"] = {"0": {"ppl": bench.perplexity(bench.fresh(), max_tokens=args.eval_tokens,
                                                        seq_len=args.seq_len),
                                "eval_s": round(time.perf_counter() - t0, 1)}}
    fisher_s = None
    if "fwsvd" in methods:
        from svdzip.passes.fisher import collect_fisher

        t0 = time.perf_counter()
        bench.stats.fisher = collect_fisher(bench.fresh(), bench.tokens[: args.fisher_samples], 4, "cpu")
        fisher_s = round(time.perf_counter() - t0, 1)
        log.info("Fisher information in %.1f s (shared by every fwsvd cell)", fisher_s)

    for ratio in ratios:
        for m in methods:
            overrides = dict(CELLS[m], ratio=ratio, update_samples=args.update_samples)
            if overrides.get("allocator") == "strs":
                overrides["allocator_options"] = {"samples": args.strs_samples, "seq_len": args.strs_seq_len,
                                                  "stop_factor": args.strs_stop_factor}
            log.info("=== %s at %.0f%% ===", m, 100 * ratio)
            result = bench.compress(**overrides)
            wall = result.summary["wall_s"] + (fisher_s if m == "fwsvd" else 0.0)
            t0 = time.perf_counter()
            ppl = bench.perplexity(result.model, max_tokens=args.eval_tokens, seq_len=args.seq_len)
            cells.setdefault(m, {})[f"{ratio:g}"] = {
                "label": result.config.label, "ppl": ppl, "compress_s": round(wall, 1),
                "ratio_achieved": round(result.summary["ratio_achieved"], 4),
                "dense_modules": result.summary["dense_modules"],
                "timings": {k: v for k, v in result.summary.items() if k.endswith("_s")},
                "eval_s": round(time.perf_counter() - t0, 1)}
            log.info("%s at %g: %s", m, ratio, ppl)
            payload.update(settings=settings, cells=cells, fisher_s=fisher_s or payload.get("fisher_s"))
            write_results(args.name, payload, markdown(cells, settings), run=bench.run)


def markdown(cells: dict[str, Any], settings: dict[str, Any]) -> str:
    ratios = sorted({r for m, by in cells.items() if m != "dense" for r in by}, key=float)
    head = "| method | label | " + " | ".join(f"{100 * float(r):.0f}%: wiki / austen (s)" for r in ratios) + " |"
    lines = [f"# Baselines and updates on {settings['model']}", "",
             f"Perplexity ({settings['protocol']} protocol, {settings['eval_tokens_per_corpus']} tokens per "
             f"corpus, windows of {settings['eval_seq_len']}); compression wall time in seconds in brackets. "
             f"Calibration {settings['calibration']}; FWSVD Fisher on {settings['fisher_samples']} sequences; "
             f"updates refit on {settings['update_samples']} sequences; STRS sensitivity {settings['strs']}.", "",
             head, "|" + "---|" * (len(ratios) + 2)]
    dense = cells.get("dense", {}).get("0", {}).get("ppl")
    if dense:
        lines.append(f"| dense | – | {dense['wiki']:.2f} / {dense['austen']:.2f} |" + " |" * (len(ratios) - 1))
    for m in [m for m in PAPER_ORDER if m in cells]:
        row = [m, next(iter(cells[m].values()))["label"]]
        for r in ratios:
            c = cells[m].get(r)
            row.append(f"{_fmt(c['ppl']['wiki'])} / {_fmt(c['ppl']['austen'])} ({c['compress_s']:.0f})" if c else "–")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _fmt(x: float) -> str:
    return f"{x:.1f}" if x < 1e4 else f"{x:.2e}"


if __name__ == "__main__":
    main()
