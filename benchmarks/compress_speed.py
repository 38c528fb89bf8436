"""Calibration speed against its floor: one decoder-only forward plus the Gram products, on the same tokens.

Why: SVD-LLM(W) needs nothing from calibration but XᵀX once per shared input (q/k/v, gate/up, o,
down). Whatever svdzip spends above "run the dense decoder once and multiply each shared input by
itself" is overhead the engine can remove; this benchmark measures that floor in plain torch, runs
the real `python -m svdzip compress` at the official SVD-LLM code's settings (32 × 512 wiki tokens,
`--method svdllm --allocator uniform --heal none`, ratio 0.2, fresh statistics) and reports svdzip's
calibration as a multiple of the floor. A cProfile of svdzip's calibration says where the rest goes.

    OMP_NUM_THREADS=1 /work/tools/heavy .venv/bin/python -m benchmarks.compress_speed --clock cpu

Every timing is CPU time of one thread (`time.process_time`, OMP_NUM_THREADS=1) unless `--clock wall`:
the machine is shared, and CPU seconds do not grow when another process takes the core.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import setup_logging, write_results
from svdzip.data import calibration_tokens, load_corpus
from svdzip.output.loading import load_model
from svdzip.report.tables import table

log = logging.getLogger("benchmarks.compress_speed")

#: The official SVD-LLM code on the same kind of machine, as quoted in issue 12 (not re-measured here).
OFFICIAL = {"calibrate_s": 45.0, "decompose_allocate_materialise_s": 13.0}
#: svdzip before this benchmark, as quoted in issue 12 (wall clock).
QUOTED_SVDZIP = {"calibrate_s": 54.0, "decompose_allocate_materialise_s": 15.0}


def clock_of(kind: str) -> Callable[[], float]:
    return time.process_time if kind == "cpu" else time.perf_counter


# --------------------------------------------------------------------------------------------- floor
def shared_inputs(layer: nn.Module) -> dict[str, nn.Module]:
    """The first linear reading each distinct input of a LLaMA decoder layer (q/k/v share one, gate/up one)."""
    return {"qkv": layer.self_attn.q_proj, "o": layer.self_attn.o_proj, "gate_up": layer.mlp.gate_proj,
            "down": layer.mlp.down_proj}


@torch.no_grad()
def floor_pass(model: nn.Module, tokens: torch.Tensor, batch_size: int, clock: Callable[[], float],
               with_grams: bool = True) -> dict[str, float]:
    """One decoder-only forward (no lm_head) over every batch, plus XᵀX per shared input (fp32 product,
    fp64 running sum, as svdzip's README promises). Returns the seconds spent in total and in the Grams."""
    grams: dict[tuple[int, str], torch.Tensor] = {}
    gram_seconds = [0.0]
    handles = []

    def hook_for(key: tuple[int, str]):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            t = clock()
            x = args[0].reshape(-1, args[0].shape[-1])
            g = x.T @ x
            if key in grams:
                grams[key].add_(g)
            else:
                grams[key] = g.double()
            gram_seconds[0] += clock() - t
        return hook

    if with_grams:
        for i, layer in enumerate(model.model.layers):
            for name, module in shared_inputs(layer).items():
                handles.append(module.register_forward_pre_hook(hook_for((i, name))))
    try:
        t0 = clock()
        for start in range(0, tokens.shape[0], batch_size):
            model.model(input_ids=tokens[start:start + batch_size], use_cache=False)
        total = clock() - t0
    finally:
        for h in handles:
            h.remove()
    return {"total_s": total, "grams_s": gram_seconds[0], "n_grams": len(grams)}


def measure_floor(model: nn.Module, tokens: torch.Tensor, batch_size: int, clock: Callable[[], float],
                  repeats: int) -> dict[str, Any]:
    floor_pass(model, tokens[:batch_size, :64], batch_size, clock)  # warm-up: allocator, MKL kernels
    runs = [floor_pass(model, tokens, batch_size, clock) for _ in range(repeats)]
    bare = [floor_pass(model, tokens, batch_size, clock, with_grams=False)["total_s"] for _ in range(repeats)]
    floor = statistics.median(r["total_s"] for r in runs)
    return {"floor_s": round(floor, 2), "floor_runs_s": [round(r["total_s"], 2) for r in runs],
            "grams_s": round(statistics.median(r["grams_s"] for r in runs), 2),
            "forward_only_s": round(statistics.median(bare), 2), "forward_only_runs_s": [round(b, 2) for b in bare],
            "grams_per_pass": runs[0]["n_grams"], "repeats": repeats}


# ------------------------------------------------------------------------------------- svdzip's CLI
_RUNNER = r"""
import json, sys, time
clock = time.process_time if sys.argv[1] == "cpu" else time.perf_counter
time.perf_counter = clock  # every timer svdzip reports (calibrate_s, decompose_s, ...) now reads this clock
import svdzip.engine.pipeline as pipeline
def timed(owner, name, mark):  # the CLI path does not report calibrate_s yet: time its parts here
    real = getattr(owner, name, None)
    if real is None:
        return
    def wrapper(*a, **k):
        t = clock()
        out = real(*a, **k)
        print(mark, clock() - t, file=sys.stderr, flush=True)
        return out
    setattr(owner, name, wrapper)
timed(pipeline, "prepare_statistics", "BENCH_CALIBRATE_S")
timed(pipeline, "collect_statistics", "BENCH_COLLECT_S")
if hasattr(pipeline, "CalibrationStats"):
    timed(pipeline.CalibrationStats, "save", "BENCH_SAVE_STATS_S")
from svdzip.cli import main
sys.argv = ["svdzip", *sys.argv[2:]]
t = clock()
rc = main()
print("BENCH_CLI_S", clock() - t, file=sys.stderr, flush=True)
raise SystemExit(rc)
"""


def cli_args(model: str, samples: int, seq_len: int, batch_size: int, out: Path, stats: Path) -> list[str]:
    return ["compress", "--model", model, "--out", str(out), "--method", "svdllm", "--allocator", "uniform",
            "--heal", "none", "--ratio", "0.2", "--corpus", "wiki", "--calib-samples", str(samples),
            "--calib-seq-len", str(seq_len), "--calib-batch-size", str(batch_size), "--stats", str(stats),
            "--no-plots", "--json"]


def run_svdzip(model: str, samples: int, seq_len: int, batch_size: int, clock: str) -> dict[str, Any]:
    """The real `svdzip compress` in a fresh process with fresh statistics; its JSON summary, timed by `clock`."""
    with tempfile.TemporaryDirectory(prefix="svdzip-speed-") as work:
        args = cli_args(model, samples, seq_len, batch_size, Path(work) / "out", Path(work) / "stats.safetensors")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
        proc = subprocess.run([sys.executable, "-c", _RUNNER, clock, *args], capture_output=True, text=True,
                              env=env, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode:
        raise RuntimeError(f"svdzip compress failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    marks = {ln.split()[0]: float(ln.split()[1]) for ln in proc.stderr.splitlines() if ln.startswith("BENCH_")}
    calibrate = summary.get("calibrate_s", marks.get("BENCH_CALIBRATE_S"))
    rest = sum(summary.get(k, 0.0) for k in ("decompose_s", "allocate_s", "materialise_s"))
    return {"command": "python -m svdzip " + " ".join(args).replace(str(Path(work)), "$TMP"),
            "calibrate_s": round(calibrate, 2) if calibrate is not None else None,
            "calibrate_source": "JSON summary" if "calibrate_s" in summary else "timer around prepare_statistics",
            "collect_statistics_s": marks.get("BENCH_COLLECT_S"), "save_statistics_s": marks.get("BENCH_SAVE_STATS_S"),
            **{k: summary.get(k) for k in ("decompose_s", "allocate_s", "materialise_s", "seconds_total")},
            "decompose_allocate_materialise_s": round(rest, 2), "cli_s": round(marks.get("BENCH_CLI_S", 0.0), 2),
            "ratio_achieved": summary.get("ratio_achieved")}


# ---------------------------------------------------------------------------------------- profile
def _short(func: tuple[str, int, str]) -> str:
    file, line, name = func
    if file == "~":
        return name
    parts = Path(file).parts
    where = "/".join(parts[parts.index("svdzip"):]) if "svdzip" in parts else Path(file).name
    return f"{where}:{line}({name})"


def profile_calibration(model: nn.Module, tokens: torch.Tensor, batch_size: int, clock: Callable[[], float],
                        out_file: Path | None) -> dict[str, Any]:
    """cProfile (on `clock`) of svdzip's calibration: where its time goes, by function and inside the Gram hook."""
    from svdzip.passes import calibrate

    profiler = cProfile.Profile(clock)
    t0 = clock()
    profiler.enable()
    calibrate.collect_statistics(model, tokens, batch_size, "cpu", kinds={"grams"})  # what SVD-LLM(W) needs
    profiler.disable()
    total = clock() - t0
    stats = pstats.Stats(profiler)
    if out_file is not None:
        stats.dump_stats(str(out_file))
    table_ = stats.stats  # func -> (cc, nc, tottime, cumtime, callers)

    def cum(name: str) -> float:
        return sum(v[3] for f, v in table_.items() if f[2] == name and "svdzip" in f[0])

    hook_keys = [f for f in table_ if f[2] == "__call__" and f[0].endswith(("statistics.py", "calibrate.py"))]
    inside_hook: dict[str, float] = {}
    for func, (_cc, _nc, _tt, _ct, callers) in table_.items():
        for caller, (_c, _n, _t, ct) in callers.items():
            if caller in hook_keys:
                inside_hook[_short(func)] = inside_hook.get(_short(func), 0.0) + ct
    hook_total = sum(table_[k][3] for k in hook_keys)
    inside_hook["(the hook's own Python lines)"] = sum(table_[k][2] for k in hook_keys)
    top = sorted(table_.items(), key=lambda kv: -kv[1][2])[:15]
    return {
        "profiled_total_s": round(total, 2),
        "capture_pass_s": round(cum("capture_layer_inputs"), 2),
        "run_layer_s": round(cum("run_layer"), 2),
        "statistics_hooks_s": round(hook_total, 2),
        "layer_forward_without_hooks_s": round(cum("run_layer") - hook_total, 2),
        "check_finite_s": round(cum("check_finite"), 2),
        "inside_hook_s": {k: round(v, 3) for k, v in sorted(inside_hook.items(), key=lambda kv: -kv[1])},
        "top_tottime": [{"function": _short(f), "calls": v[1], "tottime_s": round(v[2], 3),
                         "cumtime_s": round(v[3], 3)} for f, v in top],
    }


def op_profile_calibration(model: nn.Module, tokens: torch.Tensor, batch_size: int, top: int = 15) -> dict[str, Any]:
    """torch.profiler of svdzip's calibration: self time per aten op (the profiler's own clock is wall time;
    with one thread on an idle core it matches CPU time, so read it as shares)."""
    from torch.profiler import ProfilerActivity, profile

    from svdzip.passes import calibrate

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        calibrate.collect_statistics(model, tokens, batch_size, "cpu", kinds={"grams"})
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    return {"total_self_s": round(total, 2),
            "ops": [{"op": e.key, "calls": e.count, "self_s": round(e.self_cpu_time_total / 1e6, 3),
                     "share": round(e.self_cpu_time_total / 1e6 / total, 4)} for e in events[:top]]}


def measure_patched(engine_root: Path, model: nn.Module, tokens: torch.Tensor, batch_size: int,
                    clock: Callable[[], float], repeats: int) -> dict[str, Any]:
    """A proposed svdzip/passes/calibrate.py (from a patched checkout at `engine_root`), Grams only, timed
    alternately with the floor so machine load hits both alike; its Grams must equal today's bit for bit."""
    import importlib.util

    from svdzip.passes import calibrate as today

    spec = importlib.util.spec_from_file_location("patched_calibrate", engine_root / "svdzip/passes/calibrate.py")
    patched = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = patched  # dataclasses look their module up there
    spec.loader.exec_module(patched)
    small = tokens[:batch_size, :128]
    a = today.collect_statistics(model, small, batch_size)
    b = patched.collect_statistics(model, small, batch_size, kinds=frozenset({"grams"}))
    identical = a.grams.keys() == b.grams.keys() and all(torch.equal(a.grams[k], b.grams[k]) for k in a.grams)
    runs, floors = [], []
    for _ in range(repeats):
        t = clock()
        patched.collect_statistics(model, tokens, batch_size, kinds=frozenset({"grams"}))
        runs.append(clock() - t)
        floors.append(floor_pass(model, tokens, batch_size, clock)["total_s"])
    return {"grams_identical_to_today": identical, "abs_stats_computed": bool(b.abs_mean),
            "collect_s": [round(x, 2) for x in runs], "floor_s": [round(x, 2) for x in floors],
            "over_floor": round(statistics.median(runs) / statistics.median(floors), 3)}


def findings(p: dict[str, Any]) -> list[str]:
    """Where the time above the floor goes, in numbers from this run."""
    out = []
    f, s = p["floor"], p.get("svdzip", {})
    if s.get("calibrate_s"):
        out.append(f"svdzip's calibration is {s['calibrate_s'] / f['floor_s']:.2f}× the floor "
                   f"({s['calibrate_s'] - f['floor_s']:.1f} s above it); collect_statistics alone "
                   f"{s['collect_statistics_s'] / f['floor_s']:.2f}×, and writing the statistics cache "
                   f"(safetensors + sha256) {s['save_statistics_s']:.1f} s.")
    if "profile" in p:
        h = p["profile"]["inside_hook_s"]
        absx = sum(v for k, v in h.items() if any(n in k for n in ("'abs'", "'amax'", "'mean'", "maximum")))
        dbl = sum(v for k, v in h.items() if "'double'" in k or "'cpu'" in k)
        own = h.get("(the hook's own Python lines)", 0.0)
        out += [f"|x| statistics (abs, mean, amax, maximum) take {absx:.1f} s of the hooks; SVD-LLM never reads "
                "them — only ASVD does.",
                f"per-batch fp64 conversions and .cpu() of the Grams and |x| vectors: {dbl:.1f} s; the Gram can "
                "be added in place into the fp64 sum (`add_`), which is bit-identical.",
                f"the Gram products themselves (the hook's own lines, {own:.1f} s: cProfile does not see the `@` "
                f"operator apart) match the floor's {f['grams_s']} s: they are not the overhead.",
                f"the capture pass costs {p['profile']['capture_pass_s']} s; the finite check of every fp64 Gram "
                f"{p['profile']['check_finite_s']} s (checking the diagonals suffices: a NaN/Inf input makes Σx² "
                "non-finite and |G_ij| ≤ √(G_ii G_jj)).",
                f"layer forwards without hooks: {p['profile']['layer_forward_without_hooks_s']} s under cProfile vs "
                f"the floor's bare forward {f['forward_only_s']} s (cProfile's per-call overhead included)."]
    if "patched" in p:
        q = p["patched"]
        out.append(f"with the proposed calibrate.py (/work/notes/issue12-calibration-speed.diff: Grams only, in-place "
                   f"fp64 sum, one device transfer per layer, diagonal finite check) collect_statistics takes "
                   f"{', '.join(map(str, q['collect_s']))} s vs the floor's {', '.join(map(str, q['floor_s']))} s in "
                   f"alternation: {q['over_floor']:.2f}× the floor; Grams bit-identical to today's: "
                   f"{q['grams_identical_to_today']}.")
    return out


# ---------------------------------------------------------------------------------------- report
def markdown(p: dict[str, Any]) -> str:
    f, s = p["floor"], p["svdzip"]
    clock = f"{p['clock']} clock, {p['threads']} thread"
    mult = (f"{s['calibrate_s'] / f['floor_s']:.2f}×" if s.get("calibrate_s") else "n/a")
    rows = [["floor: decoder forward + XᵀX per shared input (plain torch)", f["floor_s"], "1.00×", ""],
            ["  of which the Gram products", f["grams_s"], "", ""],
            ["  decoder forward alone (no hooks)", f["forward_only_s"], "", ""],
            [f"svdzip calibration ({s['calibrate_source']})", s["calibrate_s"], mult, ""],
            ["  of which collect_statistics (layer walk + hooks)", s.get("collect_statistics_s"), "", ""],
            ["  of which writing the statistics file (safetensors + sha256)", s.get("save_statistics_s"), "", ""],
            ["svdzip decompose + allocate + materialise", "", "", s["decompose_allocate_materialise_s"]],
            ["official SVD-LLM code (quoted from issue 12, not re-measured)", OFFICIAL["calibrate_s"],
             f"{OFFICIAL['calibrate_s'] / f['floor_s']:.2f}×", OFFICIAL["decompose_allocate_materialise_s"]],
            ["svdzip before (quoted from issue 12, wall clock)", QUOTED_SVDZIP["calibrate_s"], "",
             QUOTED_SVDZIP["decompose_allocate_materialise_s"]]]
    lines = [f"## Calibration vs its floor on {p['model']} ({clock})", "",
             f"{p['samples']} × {p['seq_len']} wiki calibration tokens, batch {p['batch_size']}, fp32; floor: median "
             f"of {f['repeats']} ({', '.join(map(str, f['floor_runs_s']))} s). svdzip: `{s['command']}` in a fresh "
             "process, its timers switched to the same clock.", "",
             table(["what", "calibrate s", "× floor", "decompose+allocate+materialise s"], rows), ""]
    if "profile" in p:
        pr = p["profile"]
        lines += [f"### Where svdzip's calibration goes (cProfile, {clock}; profiled total {pr['profiled_total_s']} s,"
                  " cProfile's own overhead included)", "",
                  table(["part", "s"], [["capture pass (embeddings, layer inputs)", pr["capture_pass_s"]],
                                        ["layer forwards, hooks excluded", pr["layer_forward_without_hooks_s"]],
                                        ["statistics hooks", pr["statistics_hooks_s"]],
                                        ["finite check", pr["check_finite_s"]]]), "",
                  "Inside the statistics hook:", "",
                  table(["callee", "s"], [[k, v] for k, v in pr["inside_hook_s"].items()]), ""]
    if "op_profile" in p:
        op = p["op_profile"]
        lines += [f"### Self time per op (torch.profiler, wall clock of one thread; total {op['total_self_s']} s)", "",
                  table(["op", "calls", "self s", "share"],
                        [[o["op"], o["calls"], o["self_s"], f"{100 * o['share']:.1f}%"] for o in op["ops"]]), ""]
    lines += ["### Findings", "", *[f"- {x}" for x in findings(p)], "",
              "The official code's and the earlier svdzip figures are quoted from issue 12: wall-clock seconds with "
              "an unstated thread count, so they compare with each other (official = "
              f"{OFFICIAL['calibrate_s'] / QUOTED_SVDZIP['calibrate_s']:.2f}× svdzip-before), not with the CPU "
              "seconds of one thread measured here.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=None, help="default: svdzip's calibration batch size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clock", default="cpu", choices=["cpu", "wall"])
    ap.add_argument("--no-cli", action="store_true", help="skip the svdzip compress run")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--name", default="compress_speed")
    ap.add_argument("--patched-engine", type=Path, default=None,
                    help="a checkout with a proposed svdzip/passes/calibrate.py: time it against the floor")
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md from the saved .json")
    args = ap.parse_args()
    setup_logging()
    torch.set_num_threads(1)
    from svdzip.recipe import Recipe

    saved = Path(__file__).parent / "results" / f"{args.name}.json"
    if args.report_only or args.patched_engine:
        payload = json.loads(saved.read_text())
        if args.patched_engine:
            model, tokenizer, _ = load_model(payload["model"], "cpu")
            tokens = calibration_tokens(tokenizer, load_corpus("wiki"), payload["samples"], payload["seq_len"], 0)
            payload["patched"] = measure_patched(args.patched_engine, model, tokens, payload["batch_size"],
                                                 clock_of(payload["clock"]), 2)
            log.info("patched engine: %s", payload["patched"])
        write_results(args.name, payload, markdown(payload))
        return

    batch = args.batch_size or Recipe.plain().calib_batch_size
    clock = clock_of(args.clock)
    model, tokenizer, _ = load_model(args.model, "cpu")
    tokens = calibration_tokens(tokenizer, load_corpus("wiki"), args.samples, args.seq_len, 0)
    payload: dict[str, Any] = {"model": args.model, "samples": args.samples, "seq_len": args.seq_len,
                               "batch_size": batch, "clock": args.clock, "threads": torch.get_num_threads()}
    payload["floor"] = measure_floor(model, tokens, batch, clock, args.repeats)
    log.info("floor: %s", payload["floor"])
    if not args.no_profile:
        prof = Path(tempfile.gettempdir()) / f"{args.name}.prof"
        payload["profile"] = profile_calibration(model, tokens, batch, clock, prof)
        log.info("profile: %s (pstats dump in %s)", payload["profile"], prof)
        payload["op_profile"] = op_profile_calibration(model, tokens, batch)
        log.info("op profile: %s", payload["op_profile"])
    del model
    if not args.no_cli:
        payload["svdzip"] = run_svdzip(args.model, args.samples, args.seq_len, batch, args.clock)
        log.info("svdzip: %s", payload["svdzip"])
        s, f = payload["svdzip"], payload["floor"]
        if s.get("calibrate_s"):
            payload["calibrate_over_floor"] = round(s["calibrate_s"] / f["floor_s"], 3)
    payload["official_quoted"] = OFFICIAL
    payload["svdzip_before_quoted"] = QUOTED_SVDZIP
    if "svdzip" in payload:
        write_results(args.name, payload, markdown(payload))
    else:
        print(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
