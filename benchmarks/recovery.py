"""Recovery after truncation (issue 11): none · SVD-LLM update · sequential LoRA · distillation · update + distillation.

    python benchmarks/recovery.py --model smollm2-135m --ratios 0.2,0.4 --steps 40 \
        --cells loss-aware:none,loss-aware:update,loss-aware:seq-lora,loss-aware:distill,\
loss-aware:update+distill,uniform:none,uniform:distill

Every cell starts from a fresh compression (SVD-LLM(W) whitening, the given allocator) with the same
calibration statistics; recoveries train on windows of `--heal-corpus` (`wiki`, the calibration's, by default:
this table's protocol; svdzip's own default heals on `mix` since) only, and
perplexity is measured on the evaluation parts of `wiki` and `austen`, which no step ever saw. The
wall time and the peak resident memory of the recovery step itself (sampled every 0.2 s) are
recorded beside the quality. Results are rewritten after every cell.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import threading
import time
from typing import Any

import psutil
import torch
from common import Bench, accuracies, setup_logging, write_results

from svdzip.core.precision import PRECISIONS
from svdzip.recover.config import HealConfig
from svdzip.recover.heal import heal, heal_windows

log = logging.getLogger("benchmarks.recovery")


class PeakRSS:
    """Peak resident memory of this process while the block runs (a sampling thread)."""

    def __enter__(self) -> PeakRSS:
        self.peak, self._stop = 0, threading.Event()
        proc = psutil.Process(os.getpid())

        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, proc.memory_info().rss)
                time.sleep(0.2)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def allocator_of(start: str) -> tuple[str, dict[str, Any]]:
    """A start's allocator and options: `loss-aware` (its Fisher signal), or `NAME@key=value;key=value`
    (e.g. `ara@init=loss-aware;steps=64`: ARA's masks trained from loss-aware ranks)."""
    if start == "loss-aware":
        return "loss-aware", {"signal": "fisher"}
    name, _, spec = start.partition("@")
    return name, dict(kv.split("=", 1) for kv in spec.split(";") if kv)


def evaluate(bench: Bench, model, args) -> dict[str, Any]:
    out: dict[str, Any] = {"ppl": bench.perplexity(model, max_tokens=args.eval_tokens, seq_len=args.eval_seq_len)}
    if args.tasks:
        out["zero_shot"] = accuracies(bench.zero_shot(model, args.tasks, args.limit))
    return out


def markdown(data: dict[str, Any]) -> str:
    dense = data["dense"]["ppl"]
    zs = "zero_shot" in data["dense"]
    head = "| ratio | start | recovery | wiki ppl | austen ppl | ×dense wiki | ×dense austen |"
    head += " zero-shot avg |" if zs else ""
    head += " recovery s | peak RSS GiB |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    row = f"| 0% | dense | — | {dense['wiki']:.2f} | {dense['austen']:.2f} | 1.00 | 1.00 |"
    row += f" {data['dense']['zero_shot']['average']:.3f} |" if zs else ""
    lines.append(row + " — | — |")
    for c in data["cells"]:
        p = c["ppl"]
        row = (f"| {100 * c['ratio']:.0f}% | {c['start']} | {c['recovery']} | {p['wiki']:.2f} | {p['austen']:.2f} | "
               f"{p['wiki'] / dense['wiki']:.2f} | {p['austen'] / dense['austen']:.2f} |")
        if zs:
            row += f" {c['zero_shot']['average']:.3f} |" if "zero_shot" in c else " — |"
        rss = f"{c['recovery_peak_rss'] / 2**30:.1f}" if c.get("recovery_peak_rss") else "—"
        lines.append(row + f" {c.get('recovery_s', 0):.0f} | {rss} |")
    cfg = data["heal_config"]
    lr = cfg["lr"] if cfg["lr"] is not None else f"{cfg.get('lr_per_rms')} × the trained weights' median RMS"
    return (f"### Recovery on {data['model']}\n\nPerplexity on {data['eval_tokens']} evaluation tokens per corpus "
            f"in windows of {data['eval_seq_len']}; calibration on `wiki`, healing on "
            f"`{data['heal_config'].get('corpus') or 'wiki'}` calibration text only. "
            f"Healing: {cfg['steps']} steps of {cfg['batch_size'] * cfg.get('grad_accum', 1)}×{cfg['seq_len']} tokens, "
            f"lr {lr}"
            f"{' (start of the held-out search)' if cfg.get('auto_lr') else ''}, "
            f"top-k {cfg['topk']} (distill), LoRA r={cfg['lora_r']} (seq-lora, lr {data['seq_lora_lr']}), matmuls in "
            f"{data.get('heal_precision', 'float32')}.\n\n"
            + "\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratios", default="0.2,0.4")
    p.add_argument("--cells", default="uniform:none,uniform:distill,loss-aware:none,loss-aware:distill",
                   help="start:recovery pairs; start = the allocator compression starts from (uniform, loss-aware, "
                        "drank, …, with options as NAME@key=value;key=value), recovery = none | update | seq-lora | "
                        "distill | update+distill")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="distillation learning rate (default: HealConfig's)")
    p.add_argument("--seq-lora-lr", type=float, default=None, help="(default: HealConfig's, the paper's 1e-4)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=HealConfig.batch_size, help="windows per micro-batch")
    p.add_argument("--grad-accum", type=int, default=HealConfig.grad_accum, help="micro-batches per step")
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--heal-corpus", default="wiki", help="healing text (calibration part only)")
    p.add_argument("--precision", default="auto", choices=list(PRECISIONS), help="heal matmuls")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--tasks", default="", help="zero-shot tasks ('all' = the 8 tasks)")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default=None)
    args = p.parse_args()
    setup_logging()
    torch.set_num_threads(args.threads)
    name = args.name or f"recovery_{args.model.split('-')[0]}"
    bench = Bench(args.model)
    heal_cfg = HealConfig(method="distill", steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size,
                          grad_accum=args.grad_accum, topk=args.topk, precision=args.precision,
                          corpus=args.heal_corpus, **({"lr": args.lr} if args.lr else {}))
    lora_cfg = HealConfig(method="seq-lora", steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size,
                          grad_accum=args.grad_accum, precision=args.precision,
                          **({"lr": args.seq_lora_lr} if args.seq_lora_lr else {}))
    windows = heal_windows(bench.tokenizer, heal_cfg)
    teacher = bench.fresh()  # shared by every heal: `heal` turns its linears to the heals' one precision for good
    data: dict[str, Any] = {"model": args.model, "eval_tokens": args.eval_tokens, "eval_seq_len": args.eval_seq_len,
                            "heal_config": heal_cfg.to_dict(), "seq_lora_lr": lora_cfg.lr,
                            "heal_precision": heal_cfg.resolved_precision(),
                            "dense": evaluate(bench, teacher, args), "cells": []}
    cells = [c.split(":") for c in args.cells.split(",") if c]
    for ratio in [float(r) for r in args.ratios.split(",")]:
        compressed: dict[tuple[str, bool], Any] = {}
        for start, recovery in cells:
            allocator, options = allocator_of(start)
            update = recovery.startswith("update")
            if (start, update) not in compressed:
                t0 = time.perf_counter()
                with PeakRSS() as mem:
                    result = bench.compress(ratio=ratio, allocator=allocator, allocator_options=options,
                                            update="svdllm" if update else None)
                compressed[(start, update)] = (result, time.perf_counter() - t0, mem.peak)
            result, compress_s, compress_rss = compressed[(start, update)]
            cell: dict[str, Any] = {"ratio": ratio, "start": start, "recovery": recovery,
                                    "ratio_achieved": result.summary["ratio_achieved"],
                                    "update_s": result.summary.get("update_s")}
            heal_kind = recovery.split("+")[-1] if recovery not in ("none", "update") else None
            model = result.model if heal_kind is None else copy.deepcopy(result.model)
            if heal_kind:
                cfg = heal_cfg if heal_kind == "distill" else lora_cfg
                t0 = time.perf_counter()
                with PeakRSS() as mem:
                    report = heal(model, teacher, windows, cfg)
                cell.update(recovery_s=time.perf_counter() - t0, recovery_peak_rss=mem.peak,
                            heal=report.to_dict())
            elif update:
                cell.update(recovery_s=result.summary.get("update_s", 0.0), recovery_peak_rss=compress_rss)
            cell.update(evaluate(bench, model, args))
            log.info("%s", {k: v for k, v in cell.items() if k != "heal"})
            data["cells"].append(cell)
            write_results(name, data, markdown(data), run=bench.run)
            del model


if __name__ == "__main__":
    main()
