"""Rank allocators against uniform SVD-LLM(W), all from the same calibration statistics (issue 3).

    python benchmarks/allocators.py --models smollm2-135m --ratios 0.1,0.2,0.4,0.6 \
        --methods uniform,share2,svdllm-v2,drank,loss-aware --eval-tokens 8192

Methods: uniform · shareN (Basis Sharing over N layers, uniform ranks) · svdllm-v2 · drank
(paper mode, β = 0.3) · drank-code (the released code's heuristics) · drank-n2 (D-Rank with
Basis Sharing groups of 2) · drank-tuned (β chosen on held-out calibration windows) · loss-aware[:signal]
(signal = fisher | relative | whitened | erank) · loss-aware-guard (checked against uniform on
held-out calibration windows, keeps the better).

Spectra are computed once per grouping and reused for every allocator and ratio (they do not depend
on either); each cell materialises a fresh copy of the dense model. Results are rewritten after every
cell, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from collections import defaultdict
from typing import Any

import torch
from common import Bench, setup_logging, write_results

from svdzip.allocate import AllocationContext, allocate, spent
from svdzip.allocate.drank import effective_ranks
from svdzip.budget import keep_budget
from svdzip.data import calibration_tokens, load_corpus
from svdzip.methods.decompose import decompose, group_linears
from svdzip.methods.materialise import materialise
from svdzip.models.adapter import ModelAdapter
from svdzip.recipe import SHAREABLE_ROLES

log = logging.getLogger("benchmarks.allocators")


def parse_method(name: str) -> tuple[str, int, dict[str, Any]]:
    """Method name → (allocator, group size, allocator options)."""
    if name == "uniform":
        return "uniform", 1, {}
    if name.startswith("share"):
        return "uniform", int(name[5:] or 2), {}
    if name == "svdllm-v2":
        return "svdllm-v2", 1, {}
    if name == "drank":
        return "drank", 1, {}
    if name == "drank-code":
        return "drank", 1, {"mode": "code"}
    if name == "drank-n2":
        return "drank", 2, {}
    if name == "drank-norebalance":
        return "drank", 1, {"rebalance": False}
    if name == "drank-tuned":
        return "drank", 1, {"tune_beta": True}
    if name == "loss-aware-guard":
        return "loss-aware", 1, {"signal": "fisher", "guard": True}
    if name.startswith("loss-aware"):
        signal = name.partition(":")[2] or "fisher"
        return "loss-aware", 1, {"signal": signal}
    raise SystemExit(f"unknown method {name}")


def type_shares(units, ranks) -> dict[str, float]:
    """Kept fraction of parameters per type: where an allocator moved the budget."""
    acc: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for u, r in zip(units, ranks, strict=True):
        acc[u.role][0] += spent([u], [r])
        acc[u.role][1] += u.dense_params
    return {role: round(k / d, 4) for role, (k, d) in acc.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m")
    p.add_argument("--ratios", default="0.1,0.2,0.4,0.6")
    p.add_argument("--methods", default="uniform,share2,svdllm-v2,drank,loss-aware")
    p.add_argument("--eval-tokens", type=int, default=8192, help="tokens per evaluation corpus")
    p.add_argument("--corpora", default="wiki,austen")
    p.add_argument("--seq-len", type=int, default=2048, help="evaluation window")
    p.add_argument("--samples", type=int, default=64, help="calibration windows (512 tokens)")
    p.add_argument("--heldout", type=int, default=8, help="held-out calibration windows for drank-tuned")
    p.add_argument("--name", default="allocators")
    args = p.parse_args()
    setup_logging()
    torch.manual_seed(0)
    ratios = [float(r) for r in args.ratios.split(",")]
    methods = args.methods.split(",")
    corpora = tuple(args.corpora.split(","))
    cells: list[dict[str, Any]] = []
    analysis: dict[str, Any] = {}

    for model_name in args.models.split(","):
        bench = Bench(model_name, samples=args.samples)
        dense = bench.fresh()
        dense_ppl = bench.perplexity(dense, corpora, args.eval_tokens, args.seq_len)
        cells.append({"model": model_name, "method": "dense", "ratio": 0.0, "ppl": dense_ppl})
        heldout = calibration_tokens(bench.tokenizer, load_corpus(bench.base.corpus),
                                     args.samples + args.heldout, bench.base.calib_seq_len,
                                     bench.base.seed)[args.samples:]
        adapter = ModelAdapter(dense)
        spectra: dict[int, list] = {}
        for ratio in ratios:  # every method at one ratio first: an interrupted run stays comparable
            for method in methods:
                allocator, group, options = parse_method(method)
                if group not in spectra:
                    t0 = time.perf_counter()
                    spectra[group] = decompose(adapter, bench.stats, "svdllm",
                                               group_linears(adapter, SHAREABLE_ROLES, group))
                    log.info("spectra for group size %d in %.0f s", group, time.perf_counter() - t0)
                units = spectra[group]
                if group == 1 and model_name not in analysis:
                    analysis[model_name] = {"effective_rank": _erank_by_type(units)}
                t0 = time.perf_counter()
                budget = keep_budget(sum(u.dense_params for u in units), ratio)
                ctx = AllocationContext(ratio=ratio, budget=budget, options=options, adapter=adapter, model=dense,
                                        calib_tokens=bench.tokens, heldout_tokens=heldout,
                                        cache=bench.allocation_cache)
                ranks = allocate(allocator, units, ctx).ranks
                model = copy.deepcopy(dense)
                materialise(ModelAdapter(model), units, ranks)
                ppl = bench.perplexity(model, corpora, args.eval_tokens, args.seq_len)
                del model
                cell = {"model": model_name, "method": method, "ratio": ratio, "ppl": ppl,
                        "ratio_achieved": round(1 - spent(units, ranks) / sum(u.dense_params for u in units), 5),
                        "dense_units": sum(r is None for r in ranks), "kept_by_type": type_shares(units, ranks),
                        "seconds": round(time.perf_counter() - t0, 1)}
                cells.append(cell)
                log.info("%s %s %.0f%%: %s", model_name, method, 100 * ratio, ppl)
                _write(args, cells, analysis, corpora)
        del dense
    _write(args, cells, analysis, corpora)


def _erank_by_type(units) -> dict[str, list[float]]:
    out: dict[str, list[float]] = defaultdict(list)
    for u, r in zip(units, effective_ranks(units), strict=True):
        out[u.role].append(round(r, 1))
    return dict(out)


def _write(args, cells, analysis, corpora) -> None:
    lines = [f"# Rank allocators vs uniform SVD-LLM(W)\n\nPerplexity (svdllm protocol, "
             f"{args.eval_tokens} tokens per corpus in windows of {args.seq_len}; "
             f"calibration {args.samples} × 512 wiki windows). "
             f"'× uni' = perplexity / uniform's at the same ratio (< 1 is better).\n"]
    for model in dict.fromkeys(c["model"] for c in cells):
        mine = [c for c in cells if c["model"] == model]
        uni = {c["ratio"]: c["ppl"] for c in mine if c["method"] == "uniform"}
        header = ["method", "ratio", *(f"{c} ppl" for c in corpora), *(f"{c} × uni" for c in corpora),
                  "dense units", "achieved"]
        lines.append(f"\n## {model}\n")
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for c in sorted(mine, key=lambda c: (c["ratio"], c["method"] != "uniform", c["method"])):
            rel = [f"{c['ppl'][k] / uni[c['ratio']][k]:.3f}" if c["ratio"] in uni else "" for k in corpora]
            lines.append("| " + " | ".join([c["method"], f"{c['ratio']:.0%}", *(f"{c['ppl'][k]:.2f}" for k in corpora),
                                            *rel, str(c.get("dense_units", "")),
                                            str(c.get("ratio_achieved", ""))]) + " |")
    write_results(args.name, {"cells": cells, "analysis": analysis}, "\n".join(lines))


if __name__ == "__main__":
    main()
