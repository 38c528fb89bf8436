"""Dense vs plain SVD vs SVD-LLM(W) at several ratios: perplexity, time, peak memory, size on disk.

Each compression runs as its own `svdzip compress --json` process (so its wall time and peak RSS are
its own, and the saved directory is reloaded from disk for evaluation, as a user would). A second
table shows what the small default calibration costs against a larger one.

    python benchmarks/foundation.py --ratios 0.2 0.4 0.6 --eval-tokens 16384
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import RESULTS, setup_logging, write_results

from svdzip.data import eval_tokens, load_corpus
from svdzip.evaluate.perplexity import bos_for, perplexity
from svdzip.output.io import dir_size
from svdzip.output.loading import load_model
from svdzip.report.tables import human_bytes, table

SVDZIP = [sys.executable, "-m", "svdzip.cli"]


def run_compress(model: str, out: Path, extra: list[str]) -> dict:
    cmd = [*SVDZIP, "compress", "--model", model, "--out", str(out), "--overwrite", "--json", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def evaluate(path: str, corpora: list[str], max_tokens: int, seq_len: int) -> dict[str, float]:
    model, tokenizer, _ = load_model(path)
    out = {}
    for c in corpora:
        toks = eval_tokens(tokenizer, load_corpus(c), max_tokens)
        out[c] = perplexity(model, toks, seq_len, "svdllm", bos_for(tokenizer), desc=f"ppl {c}").ppl
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    p.add_argument("--methods", nargs="+", default=["svd", "svdllm"])
    p.add_argument("--corpora", nargs="+", default=["wiki", "austen"])
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--calib-sizes", nargs="*", default=["32x512", "64x512", "256x1024"],
                   help="calibration settings compared for svdllm at the first ratio")
    p.add_argument("--name", default="foundation")
    args = p.parse_args()
    setup_logging()
    work = Path(tempfile.mkdtemp(prefix="svdzip-bench-"))
    _, _, source = load_model(args.model)
    rows, cells = [], []
    dense = evaluate(source, args.corpora, args.eval_tokens, args.seq_len)
    dense_size = dir_size(source)
    rows.append(["dense", "0 %", *(dense[c] for c in args.corpora), "", "", human_bytes(dense_size)])
    cells.append({"method": "dense", "ratio": 0.0, "ppl": dense, "size_bytes": dense_size})
    try:
        for ratio in args.ratios:
            for method in args.methods:
                out = work / f"{method}-{ratio}"
                s = run_compress(args.model, out, ["--ratio", str(ratio), "--method", method])
                ppl = evaluate(str(out), args.corpora, args.eval_tokens, args.seq_len)
                cells.append({"method": method, "ratio": ratio, "ppl": ppl, "summary": s})
                rows.append([s["method"], f"{100 * s['ratio_achieved']:.1f} %", *(ppl[c] for c in args.corpora),
                             f"{s['seconds_total']:.0f}", human_bytes(s["peak_rss_bytes"]),
                             human_bytes(s["size_bytes"])])
                shutil.rmtree(out, ignore_errors=True)
        calib_rows = []
        for setting in args.calib_sizes:
            n, length = (int(v) for v in setting.split("x"))
            out = work / f"calib-{setting}"
            s = run_compress(args.model, out, ["--ratio", str(args.ratios[0]), "--calib-samples", str(n),
                                               "--calib-seq-len", str(length)])
            ppl = evaluate(str(out), args.corpora, args.eval_tokens, args.seq_len)
            cells.append({"method": "svdllm", "ratio": args.ratios[0], "calibration": setting, "ppl": ppl,
                          "summary": s})
            calib_rows.append([setting, n * length, *(ppl[c] for c in args.corpora), f"{s['seconds_total']:.0f}"])
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    headers = ["method", "removed", *(f"{c} ppl" for c in args.corpora), "compress s", "peak RSS", "on disk"]
    md = [f"## {args.model}: dense vs SVD vs SVD-LLM(W)\n",
          f"Perplexity over {args.eval_tokens} evaluation tokens per corpus, windows of {args.seq_len} "
          "(SVD-LLM protocol). Compression time includes loading and calibration (cached after the first run) "
          "and saving; peak RSS is the compressing process's.\n", table(headers, rows)]
    if args.calib_sizes:
        md += [f"\n### What the calibration size costs (SVD-LLM(W), {100 * args.ratios[0]:.0f} %)\n",
               table(["samples x length", "tokens", *(f"{c} ppl" for c in args.corpora), "compress s"],
                     calib_rows)]
    RESULTS.mkdir(exist_ok=True)
    write_results(args.name, {"model": args.model, "cells": cells}, "\n".join(md))


if __name__ == "__main__":
    main()
