"""Recipes for streamed and distributed runs (issue 21): the layer-local allocator and layer-wise healing.

    python benchmarks/streamed_recipes.py --model smollm2-135m --ratios 0.2,0.4 \
        --cells memory:fisher:distill,memory:fisher:none,stream:uniform:none,stream:local:none,\
stream:uniform:layerwise,stream:local:layerwise --name streamed_smollm2

A cell is MODE:ALLOCATOR:HEAL — MODE `memory` (the model in memory) or `stream` (`--stream --resume-dir`: one
decoder layer in memory at a time); ALLOCATOR `uniform`, or loss-aware with its `fisher` signal (whole-model
backward, in memory only) or its layer-local `local` signal; HEAL `none`, `distill` (whole model) or
`layerwise`. Each cell is one `svdzip compress` command in its own process, exactly as a user runs it (the
command is in the results); its peak resident memory (the process tree, sampled every 0.2 s), its wall time
and the stage times of its own summary are recorded. Its output is then reloaded and its perplexity measured
on the evaluation parts of `wiki` (the calibration corpus) and `austen` (another domain), and `code` with
`--corpora`; the dense model is measured once. Results are rewritten after every cell.

`--share-run-dir` lets the streamed cells of one model share one run directory (calibration statistics and
spectra computed once, as a user resuming with other ratios or allocators would); their stage times then show
what was reused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from common import RESULTS, setup_logging, write_results

log = logging.getLogger("benchmarks.streamed_recipes")

MODES = ("memory", "stream")
ALLOCATORS = ("uniform", "fisher", "local")
HEALS = ("none", "distill", "layerwise")


def parse_cell(text: str) -> tuple[str, str, str]:
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in MODES or parts[1] not in ALLOCATORS or parts[2] not in HEALS:
        raise SystemExit(f"bad cell {text!r}: MODE:ALLOCATOR:HEAL with MODE in {MODES}, ALLOCATOR in {ALLOCATORS}, "
                         f"HEAL in {HEALS}")
    return parts[0], parts[1], parts[2]


def command(args, mode: str, allocator: str, heal: str, ratio: float, out: Path, run_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "svdzip", "compress", "--model", args.model, "--ratio", str(ratio), "--out",
           str(out), "--overwrite", "--no-plots", "--json", "--heal", heal, "--device", args.device]
    cmd += ["--allocator", "uniform"] if allocator == "uniform" else [
        "--allocator", "loss-aware", "--allocator-option", f"signal={allocator}"]
    if mode == "stream":
        cmd += ["--stream", "--resume-dir", str(run_dir)]
    if heal != "none" and args.heal_steps:
        cmd += ["--heal-steps", str(args.heal_steps)]
    if heal == "layerwise" and args.layerwise_lr:
        cmd += ["--heal-lr", str(args.layerwise_lr)]
    return cmd + args.extra


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[int, float, int, str, str]:
    """Run `cmd`; its exit code, wall seconds, peak RSS of its process tree, stdout and stderr."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak, stop = [0], threading.Event()

    def sample() -> None:
        ps = psutil.Process(proc.pid)
        while not stop.is_set():
            with contextlib.suppress(psutil.Error):
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]))
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    stdout, stderr = proc.communicate()
    stop.set()
    thread.join()
    return proc.returncode, time.perf_counter() - t0, peak[0], stdout, stderr


def perplexities(path: str, args) -> dict[str, float]:
    from svdzip.evaluate.perplexity import perplexity_on_corpora
    from svdzip.output.loading import load_model

    model, tokenizer, _ = load_model(path, args.device)
    res = perplexity_on_corpora(model, tokenizer, args.corpora.split(","), ("svdllm",), args.seq_len,
                                args.eval_tokens, args.device)
    del model
    return {c: round(by["svdllm"].ppl, 3) for c, by in res.items()}


STAGES = ("calibrate_s", "decompose_s", "allocate_s", "materialise_heal_s", "heal_s", "write_s")


def markdown(payload: dict[str, Any]) -> str:
    corpora = payload["corpora"]
    lines = [f"### Streamed and in-memory recipes on {payload['model']}", "",
             f"Perplexity on {payload['eval_tokens']} evaluation tokens per corpus in windows of {payload['seq_len']}; "
             "calibration (and every heal) on `wiki` calibration windows only. Times are wall seconds of the whole "
             f"command on this machine ({payload['threads']} thread(s)); peak RSS is the command's process tree. "
             "Streamed cells share one run directory: the first computes the calibration statistics (with the "
             "local gains) and the spectra, the others reuse them (their calibrate and decompose columns show "
             "it).", "",
             "| ratio | mode | allocator | heal | " + " | ".join(f"{c} ppl" for c in corpora) + " | "
             + " | ".join(f"×dense {c}" for c in corpora) + " | calibrate s | decompose s | heal/write s | total s "
             "| peak RSS GiB |",
             "|" + "---|" * (9 + 2 * len(corpora))]
    dense = payload.get("dense", {})
    lines.append("| 0% | dense | — | — | " + " | ".join(str(dense.get(c, "")) for c in corpora) + " | "
                 + " | ".join("1.00" for _ in corpora) + " | | | | | |")
    for cell in payload["cells"]:
        s = cell.get("summary", {})
        ppl = cell.get("ppl", {})
        ratio = [f"{ppl[c] / dense[c]:.2f}" if c in ppl and c in dense else "" for c in corpora]
        heal_s = sum(s.get(k, 0) or 0 for k in ("materialise_heal_s", "heal_s", "write_s"))
        lines.append(f"| {100 * cell['ratio']:.0f}% | {cell['mode']} | {cell['allocator']} | {cell['heal']}"
                     f"{'' if cell.get('heal_improved', True) else ' (not kept)'} | "
                     + " | ".join(str(ppl.get(c, cell.get('error', ''))) for c in corpora) + " | "
                     + " | ".join(ratio) + f" | {s.get('calibrate_s', '')} | {s.get('decompose_s', '')} | "
                     f"{round(heal_s, 1)} | {round(cell.get('wall_s', 0), 1)} | {cell.get('peak_rss_gib', '')} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratios", default="0.2,0.4")
    p.add_argument("--cells", required=True, help="comma-separated MODE:ALLOCATOR:HEAL")
    p.add_argument("--corpora", default="wiki,austen")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--heal-steps", type=int, default=0, help="--heal-steps for healing cells (0: the default)")
    p.add_argument("--layerwise-lr", type=float, default=0.0, help="--heal-lr for layerwise cells (0: the default)")
    p.add_argument("--share-run-dir", action="store_true", help="streamed cells share one run directory")
    p.add_argument("--work", default="/tmp/svdzip-streamed-recipes", help="outputs and run directories")
    p.add_argument("--name", default="streamed_recipes")
    p.add_argument("extra", nargs="*", help="further `svdzip compress` flags after --, for every cell")
    args = p.parse_args()
    setup_logging()
    cells = [parse_cell(c) for c in args.cells.split(",")]
    ratios = [float(r) for r in args.ratios.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    import torch

    torch.set_num_threads(args.threads)
    path = RESULTS / f"{args.name}.json"
    payload: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    payload.update(model=args.model, corpora=args.corpora.split(","), eval_tokens=args.eval_tokens,
                   seq_len=args.seq_len, threads=args.threads)
    payload.setdefault("cells", [])
    from svdzip.assets import resolve_model

    if set(payload.get("dense", {})) != set(payload["corpora"]):
        payload["dense"] = perplexities(str(resolve_model(args.model)), args)
        log.info("dense: %s", payload["dense"])
    for ratio in ratios:
        for mode, allocator, heal in cells:
            tag = f"{mode}-{allocator}-{heal}-{ratio}"
            out = work / f"out-{tag}"
            run_dir = work / ("run-shared" if args.share_run_dir else f"run-{tag}")
            if not args.share_run_dir:
                shutil.rmtree(run_dir, ignore_errors=True)
            cmd = command(args, mode, allocator, heal, ratio, out, run_dir)
            log.info("%s: %s", tag, " ".join(cmd[2:]))
            code, wall, peak, stdout, stderr = run_measured(cmd, env)
            cell: dict[str, Any] = {"ratio": ratio, "mode": mode, "allocator": allocator, "heal": heal,
                                    "command": " ".join(["svdzip", *cmd[3:]]), "wall_s": round(wall, 1),
                                    "peak_rss_gib": round(peak / 2**30, 2)}
            if code != 0:
                cell["error"] = (stderr.strip().splitlines() or ["?"])[-1][:300]
                log.error("%s failed: %s", tag, cell["error"])
            else:
                summary = json.loads(stdout[stdout.index("{"):])
                cell["summary"] = {k: summary.get(k) for k in (*STAGES, "seconds_total", "method", "ratio_achieved",
                                                                "heal", "size_bytes")}
                cell["heal_improved"] = (summary.get("heal") or {}).get("improved", True)
                cell["ppl"] = perplexities(str(out), args)
                log.info("%s: %s in %.0f s, peak %.2f GiB", tag, cell["ppl"], wall, peak / 2**30)
            if not args.share_run_dir:
                shutil.rmtree(run_dir, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            payload["cells"] = [c for c in payload["cells"] if (c["ratio"], c["mode"], c["allocator"], c["heal"])
                                != (ratio, mode, allocator, heal)] + [cell]
            payload["cells"].sort(key=lambda c: (c["ratio"], MODES.index(c["mode"]), c["allocator"], c["heal"]))
            write_results(args.name, payload, markdown(payload))


if __name__ == "__main__":
    main()
