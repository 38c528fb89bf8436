"""Peak resident memory of a streamed calibration over a model's first layers, fresh and reusing its run directory.

    python benchmarks/calibration_memory.py --model qwen2.5-1.5b --layers 2 --kinds grams,local

The calibration stage is where a streamed run peaks (`stage_memory.py` on the whole run of Qwen2.5-1.5B: 3.07 GiB,
no other stage within 60 % of it); its memory does not grow with depth, so its first layers show the peak in
minutes where the whole run takes 25. The run's own code (`passes.calibrate.calibrate` with the checkpoint read
layer by layer, the statistics written to a run directory, bf16 matmuls as on this CPU), the model cut to its
first `--layers` decoder layers; then the same call again, which finds every layer done and only checks the run
directory (what a second `--stream --resume-dir` run with another ratio or allocator does). The resident set is
sampled by `common.PeakRSS`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from common import PeakRSS, setup_logging, write_results

from svdzip.assets import resolve_model
from svdzip.core.checkpoint import CheckpointReader, StreamedWeights, skeleton
from svdzip.core.resume import RunState
from svdzip.data import calibration_tokens, load_corpus
from svdzip.models.adapter import ModelAdapter
from svdzip.models.checkpoint_names import CheckpointNames
from svdzip.output.loading import load_tokenizer
from svdzip.passes.calibrate import calibrate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-1.5b")
    p.add_argument("--layers", type=int, default=2, help="decoder layers calibrated (the first ones)")
    p.add_argument("--kinds", default="grams,local", help="statistics asked (grams: SVD-LLM; local: the probe)")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="the layers' matmuls")
    p.add_argument("--name", default=None, help="results file name (default: calibration_memory_<model>)")
    args = p.parse_args()
    setup_logging()
    meter = PeakRSS()
    meter.enter("load the skeleton, tokenizer and calibration text")
    source = resolve_model(args.model)
    model = skeleton(source, torch.float32)
    adapter = ModelAdapter(model)
    adapter.layers = adapter.layers[: args.layers]  # the capture stops inside the last of them
    weights = StreamedWeights(model, adapter, CheckpointReader(source, CheckpointNames(model)), torch.float32)
    tokens = calibration_tokens(load_tokenizer(source), load_corpus("wiki"), args.samples, args.seq_len, 0)
    kinds = set(args.kinds.split(","))
    seconds: dict[str, float] = {}
    root = Path(tempfile.mkdtemp(prefix="svdzip-calibration-memory-"))
    try:
        for step, restart in (("calibrate (fresh)", True), ("calibrate again (reusing the run directory)", False)):
            meter.enter(step)
            t0 = time.perf_counter()
            state = RunState(root, {"model": args.model, "layers": args.layers, "kinds": sorted(kinds)},
                             restart=restart)
            calibrate(model, adapter, tokens, args.batch_size, "cpu", kinds, weights=weights, state=state,
                      on_disk=True, dtype=getattr(torch, args.dtype))
            seconds[step] = round(time.perf_counter() - t0, 1)
    finally:
        peaks = meter.stop()
        shutil.rmtree(root, ignore_errors=True)
    rows = [{"step": step, "peak_rss": peak, "s": seconds.get(step)} for step, peak in peaks.items()
            if step not in ("start", "end")]
    lines = [f"### Streamed calibration memory: {args.model}, first {args.layers} layers, {args.samples} × "
             f"{args.seq_len} tokens, kinds {', '.join(sorted(kinds))}, {args.dtype} matmuls", "",
             "| step | peak RSS GiB | s |", "|---|---|---|"]
    lines += [f"| {r['step']} | {r['peak_rss'] / 2**30:.2f} | {r['s'] if r['s'] is not None else '—'} |" for r in rows]
    write_results(args.name or f"calibration_memory_{args.model.split('-')[0]}",
                  {"model": args.model, "layers": args.layers, "kinds": sorted(kinds), "samples": args.samples,
                   "seq_len": args.seq_len, "batch_size": args.batch_size, "dtype": args.dtype, "rows": rows},
                  "\n".join(lines))


if __name__ == "__main__":
    main()
