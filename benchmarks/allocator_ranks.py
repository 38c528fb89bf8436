"""Ranks of every allocator on one real model, saved as JSON, to check a refactoring changed none of them.

    python benchmarks/allocator_ranks.py --out /tmp/before.json      # on the old tree
    python benchmarks/allocator_ranks.py --out /tmp/after.json       # on the new tree
    python benchmarks/allocator_ranks.py --compare /tmp/before.json /tmp/after.json

SmolLM2-135M, SVD-LLM spectra from 16 × 256 wiki calibration tokens (8 more windows held out for the
allocators that tune or guard on them), ratio 0.2. `speedaware` times matrices, which is machine noise,
so its timing is replaced by a fixed rule (k/v projections lose at every rank); everything else runs
as in `svdzip compress`. Not a timed test: it takes minutes on one CPU thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch


def _fake_timing(in_features, out_features, ranks, tokens, clock="cpu", repeats=5):
    """Deterministic stand-in for `linear_timing`: the 576→192 projections never pay off."""
    speed = 0.5 if out_features == 192 else 2.0
    return {"ranks": [{"rank": r, "speedup": speed} for r in ranks]}


def _cases() -> list[tuple[str, str, dict]]:
    return [
        ("uniform", "uniform", {}),
        ("svdllm-v2", "svdllm-v2", {}),
        ("drank", "drank", {}),
        ("drank code", "drank", {"mode": "code"}),
        ("drank tune_beta", "drank", {"tune_beta": True}),
        ("loss-aware", "loss-aware", {}),
        ("loss-aware relative", "loss-aware", {"signal": "relative"}),
        ("loss-aware guard", "loss-aware", {"guard": True}),
        ("speedaware", "speedaware", {}),
        ("speedaware drank", "speedaware", {"base": "drank"}),
        ("strs", "strs", {"samples": 2, "seq_len": 64, "candidates": [0.3, 0.6, 0.9], "cache": False}),
        ("ara", "ara", {"plot": False}),
        ("ara init drank", "ara", {"init": "drank", "steps": 32, "plot": False}),
    ]


def run(out: Path, only: list[str] | None) -> None:
    import svdzip.allocate.latency as speed_mod
    from svdzip import allocate as alloc
    from svdzip.allocate import memory
    from svdzip.budget import keep_budget
    from svdzip.data import calibration_tokens, load_corpus
    from svdzip.methods.decompose import decompose, group_linears
    from svdzip.models.adapter import ModelAdapter
    from svdzip.output.loading import load_model
    from svdzip.passes.calibrate import collect_statistics

    speed_mod.linear_timing = _fake_timing
    torch.manual_seed(0)
    model, tokenizer, _ = load_model("smollm2-135m")
    tokens = calibration_tokens(tokenizer, load_corpus("wiki"), 24, 256, 0)
    calib, held = tokens[:16], tokens[16:]
    stats = collect_statistics(model, calib, 8, "cpu")
    adapter = ModelAdapter(model)
    units = decompose(adapter, stats, "svdllm", group_linears(adapter))
    total = sum(u.dense_params for u in units)
    ratio = 0.2
    fields = {f.name for f in dataclasses.fields(alloc.AllocationContext)}

    def context(options: dict) -> alloc.AllocationContext:
        kw = dict(ratio=ratio, budget=keep_budget(total, ratio), options=dict(options), adapter=adapter, model=model,
                  calib_tokens=calib, seed=0)
        if "stats" in fields:  # the API before issue 12
            kw["stats"] = stats
        if "heldout_tokens" in fields:
            kw["heldout_tokens"] = held
        elif options.get("tune_beta") or options.get("guard"):  # the API before issue 12
            kw["options"]["heldout_tokens"] = held
        return alloc.AllocationContext(**kw)

    def ranks_of(result) -> list:
        return list(getattr(result, "ranks", result))

    results: dict[str, dict] = json.loads(out.read_text()) if only and out.is_file() else {}
    for label, name, options in _cases():
        if only and label not in only:
            continue
        t0 = time.perf_counter()
        ranks = ranks_of(alloc.allocate(name, units, context(options)))
        results[label] = {"seconds": round(time.perf_counter() - t0, 1),
                          "ranks": {u.name: r for u, r in zip(units, ranks, strict=True)}}
        logging.info("%s: %d dense, %.1f s", label, sum(r is None for r in ranks), results[label]["seconds"])
        out.write_text(json.dumps(results, indent=1))
    # memory budgets: a byte-aware allocator on priced units, and parameters first
    if not only or "memory" in only:
        mplan = memory.plan(model, units, None, 0.6, torch.float32, None)
        priced = memory.price(units, mplan.pricing)
        ranks = ranks_of(memory.allocate_bytes("loss-aware", priced, context({"signal": "relative"}),
                                               mplan.unit_budget))
        results["memory loss-aware bytes"] = {"ranks": {u.name: r for u, r in zip(units, ranks, strict=True)}}
        ranks, r = memory.allocate_params_first("drank", units, priced, context({}), mplan.unit_budget)
        results["memory drank params-first"] = {"ratio": r, "ranks": {u.name: k for u, k in
                                                                      zip(units, ranks_of(ranks), strict=True)}}
    out.write_text(json.dumps(results, indent=1))
    logging.info("wrote %s", out)


def compare(before: Path, after: Path) -> int:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    bad = 0
    for label in sorted(set(a) | set(b)):
        if label not in a or label not in b:
            print(f"{label}: only in {'after' if label in b else 'before'}")
            continue
        ra, rb = a[label]["ranks"], b[label]["ranks"]
        diff = [n for n in ra if ra[n] != rb.get(n)]
        print(f"{label}: {'identical' if not diff else f'{len(diff)} ranks differ, e.g. {diff[:3]}'}"
              f" ({sum(v is None for v in ra.values())} dense)")
        bad += bool(diff)
    return 1 if bad else 0


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--only", help="comma-separated case labels")
    p.add_argument("--compare", nargs=2, type=Path)
    args = p.parse_args()
    if args.compare:
        return compare(*args.compare)
    run(args.out, args.only.split(",") if args.only else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
