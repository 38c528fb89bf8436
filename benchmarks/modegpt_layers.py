"""Which MoDeGPT module breaks a model: each module type alone at its own ratio, then each layer's MLP alone.

    python benchmarks/modegpt_layers.py --model qwen2.5-0.5b --ratio 0.2 --threads 2

Written to find why uniform MLP slimming breaks Qwen2.5-0.5B (issue 19). Perplexity on `eval-tokens` of wiki
(and austen for the module types), windows of 2048, against the dense model; `rel tail` is the module's own
in-sample output error at that width relative to its output energy (what the allocators see).
"""

from __future__ import annotations

import argparse
import copy
import logging

import torch
from common import Bench, setup_logging, write_results

from svdzip.methods.modegpt import MoDeGPT
from svdzip.models.adapter import ModelAdapter

log = logging.getLogger("benchmarks.modegpt_layers")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--name", default="modegpt_layers")
    args = p.parse_args()
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(args.model, samples=args.samples)
    base = bench.fresh()
    units = [u for u in MoDeGPT().build_units(ModelAdapter(base), bench.stats, tokens=bench.tokens) if u.slimmed]

    def ppl(units_on, corpora=("wiki", "austen")):
        model = copy.deepcopy(base)
        adapter = ModelAdapter(model)
        for u in units_on:
            u.materialise(adapter, u.normalise(u.uniform_rank(args.ratio)))
        return bench.perplexity(model, corpora, args.eval_tokens)

    rows = [{"what": "dense", "ppl": ppl([])}]
    for kind in ("mlp", "key-query", "value-output"):
        rows.append({"what": f"every {kind} at {args.ratio:.0%}", "ppl": ppl([u for u in units if u.role == kind])})
        log.info("%s", rows[-1])
    for u in (u for u in units if u.role == "mlp"):
        k = u.uniform_rank(args.ratio)
        rows.append({"what": f"mlp of layer {u.members[0].layer} alone", "ppl": ppl([u], ("wiki",)),
                     "rel_tail": round(u.spectrum.tail(k) / u.spectrum.energy, 5)})
        log.info("%s", rows[-1])
        lines = [f"# MoDeGPT's modules one at a time on {args.model} ({args.ratio:.0%} of each)\n",
                 "| what | wiki | austen | rel tail |", "|---|---|---|---|"]
        lines += [f"| {r['what']} | {r['ppl']['wiki']:.2f} | {r['ppl'].get('austen', float('nan')):.2f} | "
                  f"{r.get('rel_tail', '')} |" for r in rows]
        write_results(args.name, {"model": args.model, "ratio": args.ratio, "rows": rows}, "\n".join(lines),
                      bench.run)


if __name__ == "__main__":
    main()
