"""Scale benchmark: peak memory vs model size (streamed and in memory), 1 vs 2 processes, faults tried.

    .venv/bin/python benchmarks/scale.py            # all three parts (a few minutes on 2 cores)
    .venv/bin/python benchmarks/scale.py --only memory|procs|faults

Models are synthetic LLaMA-shaped checkpoints (GQA, untied head) written here, so sizes can grow
without a download. Every measurement runs in a fresh process: its peak resident memory is sampled
every 5 ms per phase (calibration, decomposition, write) by a thread reading /proc/self/statm.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PeakRSS, provenance, write_results  # noqa: E402

log = logging.getLogger("benchmarks.scale")
SAMPLES, SEQ = 8, 128


def write_checkpoint(path: Path, hidden: int, inter: int, layers: int, vocab: int = 4096) -> int:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                      max_position_embeddings=512, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def _tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 4096, (SAMPLES, SEQ), generator=g)


def _warm_up() -> None:
    """Load the code paths once on a tiny model, so the baseline includes libraries, not weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig


    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1)
    with torch.no_grad():
        AutoModelForCausalLM.from_config(cfg)(torch.ones(1, 8, dtype=torch.long))
    torch.linalg.eigh(torch.eye(64, dtype=torch.float64))


def stream(source: str | Path, tokens: torch.Tensor, config: Any, out: str | Path, run_dir: str | Path | None,
           **kw: Any) -> Any:
    """`svdzip compress --stream` through the driver, on given calibration tokens."""
    from svdzip.core.distributed import DistContext
    from svdzip.engine.driver import CompressRequest, run

    request = CompressRequest(model=str(source), recipe=config, out=Path(out), stream=True,
                              resume_dir=None if run_dir is None else Path(run_dir), tokens=tokens, plots=False, **kw)
    return run(request, ctx=DistContext())


def measure_child(source: str, mode: str, out: str) -> dict[str, Any]:
    """Runs inside a fresh process: one compression, peak RSS per phase."""
    import svdzip.engine.writer as writer_mod
    import svdzip.passes.calibrate as calibrate_mod
    import svdzip.passes.spectra as spectra_mod
    from svdzip import Recipe
    from svdzip.engine.driver import compress
    from svdzip.methods.decompose import decompose, group_linears
    from svdzip.models.adapter import ModelAdapter
    from svdzip.output import io

    torch.set_num_threads(1)
    _warm_up()
    meter = PeakRSS()
    config = Recipe.plain(ratio=0.3, calib_samples=SAMPLES, calib_seq_len=SEQ, calib_batch_size=4)
    base = PeakRSS.rss()
    t0 = time.perf_counter()
    if mode == "stream":
        real_cal, real_dec, real_write = calibrate_mod.calibrate, spectra_mod.decompose_units, writer_mod.write_streamed

        def cal(*a, **k):
            meter.enter("calibrate")
            return real_cal(*a, **k)

        def dec(*a, **k):
            meter.enter("decompose")
            return real_dec(*a, **k)

        def wr(*a, **k):
            meter.enter("write")
            return real_write(*a, **k)

        calibrate_mod.calibrate, spectra_mod.decompose_units, writer_mod.write_streamed = cal, dec, wr
        stream(source, _tokens(), config, out, None)
    else:
        from transformers import AutoModelForCausalLM

        from svdzip.passes.calibrate import collect_statistics

        meter.enter("load")
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        meter.enter("calibrate")
        stats = collect_statistics(model, _tokens(), 4)
        meter.enter("decompose")
        units = decompose(ModelAdapter(model), stats, "svdllm", group_linears(ModelAdapter(model)))
        result = compress(model, config, stats=stats, units=units)
        meter.enter("write")
        io.save(model, None, out, io.build_manifest(result.modules, result.summary, config.to_dict()))
    wall = time.perf_counter() - t0
    peaks = meter.stop()
    return {"baseline_rss": base, "peaks": peaks, "wall_s": round(wall, 2)}


def run_child(source: Path, mode: str, out: Path) -> dict[str, Any]:
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); import scale; "
            f"print('RESULT', json.dumps(scale.measure_child({str(source)!r}, {mode!r}, {str(out)!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[7:])


def part_memory(work: Path, sizes: list[tuple[int, int, int]]) -> list[dict[str, Any]]:
    rows = []
    for hidden, inter, layers in sizes:
        src = work / f"llama-{hidden}-{layers}"
        params = write_checkpoint(src, hidden, inter, layers)
        size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        for mode in ("stream", "memory"):
            out = work / f"out-{mode}-{hidden}-{layers}"
            r = run_child(src, mode, out)
            base = r["baseline_rss"]
            peaks = r["peaks"]
            row = {"hidden": hidden, "intermediate": inter, "layers": layers, "params": params,
                   "checkpoint_mib": round(size / 2**20, 1), "mode": mode, "wall_s": r["wall_s"],
                   "baseline_mib": round(base / 2**20, 1),
                   **{f"{ph}_peak_above_baseline_mib": round((peaks.get(ph, base) - base) / 2**20, 1)
                      for ph in ("calibrate", "decompose", "write")}}
            rows.append(row)
            log.info("%s", row)
            shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)
    return rows


# ------------------------------------------------------------------------------- 1 vs 2 processes
def _proc_worker(rank: int, world: int, port: int, source: str, result_dir: str) -> None:
    import torch.distributed as dist

    from svdzip import Recipe
    from svdzip.core.distributed import DistContext
    from svdzip.engine.driver import compress
    from svdzip.methods.decompose import group_linears
    from svdzip.models.adapter import ModelAdapter
    from svdzip.passes.calibrate import calibrate
    from svdzip.passes.spectra import decompose_units

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ctx = DistContext(rank=rank, world_size=world, backend="gloo" if world > 1 else "none")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    config = Recipe.plain(ratio=0.3, calib_samples=SAMPLES, calib_seq_len=SEQ, calib_batch_size=4)
    ctx.barrier()
    t0 = time.perf_counter()
    adapter = ModelAdapter(model)
    stats = calibrate(model, adapter, _tokens(), config.calib_batch_size, "cpu", ctx=ctx)
    units = decompose_units(adapter, stats, config, group_linears(adapter), ctx=ctx)
    t1 = time.perf_counter()
    if ctx.is_main:
        result = compress(model, config, stats=stats, units=units)
        t2 = time.perf_counter()
        probe = _tokens()[:2, :32]
        with torch.no_grad():
            logits = model(probe).logits
        torch.save(logits, Path(result_dir) / f"logits{world}.pt")
        Path(result_dir, f"time{world}.json").write_text(json.dumps(
            {"calibrate_decompose_s": round(t1 - t0, 2), "allocate_materialise_s": round(t2 - t1, 2),
             "total_s": round(t2 - t0, 2), "ranks": result.ranks}))
    if world > 1:
        dist.destroy_process_group()


def part_procs(work: Path) -> dict[str, Any]:
    import torch.multiprocessing as mp

    src = work / "llama-procs"
    write_checkpoint(src, 768, 1024, 8)
    out: dict[str, Any] = {}
    for world in (1, 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_proc_worker, args=(world, port, str(src), str(work)), nprocs=world,
                           start_method="spawn", join=True)
        out[world] = json.loads((work / f"time{world}.json").read_text())
    l1, l2 = torch.load(work / "logits1.pt"), torch.load(work / "logits2.pt")
    result = {"model": "synthetic LLaMA hidden 768, intermediate 1024, 8 layers",
              "one_process_s": out[1]["total_s"], "two_processes_s": out[2]["total_s"],
              "speedup": round(out[1]["total_s"] / out[2]["total_s"], 2),
              "phases": {1: out[1], 2: out[2]}, "same_ranks": out[1]["ranks"] == out[2]["ranks"],
              "max_logit_diff": float((l1 - l2).abs().max())}
    for w in (1, 2):
        result["phases"][w].pop("ranks")
    log.info("%s", result)
    return result


# ----------------------------------------------------------------------------------------- faults
def part_faults(work: Path) -> list[dict[str, str]]:
    import svdzip.engine.writer as writer_mod
    from svdzip import Recipe, SvdzipError, load
    from svdzip.core.statistics import CalibrationStats

    src = work / "llama-faults"
    write_checkpoint(src, 128, 256, 4, vocab=512)
    config = Recipe.plain(ratio=0.3, calib_samples=SAMPLES, calib_seq_len=32, calib_batch_size=4)
    toks = _tokens()[:, :32] % 512
    probe = toks[:2, :16]

    def run(out: str, run_dir: str | None, **kw: Any):
        return stream(src, toks, kw.pop("config", config), work / out, None if run_dir is None else work / run_dir,
                      **kw)

    def logits(out: str) -> torch.Tensor:
        with torch.no_grad():
            return load(work / out, with_tokenizer=False)[0](probe).logits

    run("ref", None)
    ref = logits("ref")

    def same(out: str) -> str:
        d = float((logits(out) - ref).abs().max())
        return "identical to an uninterrupted run" if d == 0 else f"max logit difference {d:.2e}"

    rows = []

    def child(run_dir: str, fault: str) -> int:
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import scale; "
                f"scale._fault_child({str(src)!r}, {str(work / 'o')!r}, {str(work / run_dir)!r})")
        env = {**os.environ, "SVDZIP_FAULT": fault, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode

    rc = child("r1", "calib:1:kill")
    hidden = json.loads((work / "r1/calib/hidden_r0.safetensors.json").read_text())["info"]["layer"]
    run("o", "r1")
    rows.append({"fault": "process killed (os._exit, like SIGKILL) after calibrating layer 1 of 4",
                 "what happened": f"exit {rc}; no output written; state had layers 0–{hidden}; rerun of the same "
                                  f"command resumed at layer {hidden + 1}; {same('o')}"})
    shutil.rmtree(work / "o")
    rc = child("r2", "unit:12:kill")
    n_units = len(list((work / "r2/units").glob("*.safetensors")))
    run("o", "r2")
    rows.append({"fault": "process killed during decomposition (after unit 12 of 28)",
                 "what happened": f"exit {rc}; {n_units} spectra on disk were reused, the rest computed; {same('o')}"})
    # corruption
    for rel, label in (("units/u000005.safetensors", "a spectrum file"),
                       ("calib/layer_00002.safetensors", "a layer's statistics"),
                       ("calib/hidden_r0.safetensors", "the saved activations")):
        path = work / "r2" / rel
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        run("o", "r2", overwrite=True)
        rows.append({"fault": f"{label} corrupted on disk (one byte flipped)",
                     "what happened": f"checksum mismatch logged, file deleted and recomputed; {same('o')}"})
    path = work / "r2/units/u000007.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    run("o", "r2", overwrite=True)
    rows.append({"fault": "a spectrum file truncated (write cut short)",
                 "what happened": f"checksum mismatch, recomputed; {same('o')}"})
    # changed configuration
    other = dataclasses.replace(config, calib_samples=4)
    try:
        run("o2", "r2", config=other)
        msg = "NOT refused"
    except SvdzipError as exc:
        msg = f"refused: {str(exc)[:160]}…"
    rows.append({"fault": "rerun with a changed configuration (--calib-samples 8 → 4) on the same run directory",
                 "what happened": msg})
    run("o2", "r2", config=other, restart=True)
    rows.append({"fault": "the same with --restart", "what happened": "old state discarded, run recomputed "
                 f"from scratch; output written ({len(list((work / 'o2').glob('*.safetensors')))} shards)"})
    # a different ratio reuses the spectra
    t0 = time.perf_counter()
    run("o3", "r2", config=dataclasses.replace(other, ratio=0.5))
    rows.append({"fault": "(not a fault) rerun with another --ratio on the same run directory",
                 "what happened": f"statistics and spectra reused, {time.perf_counter() - t0:.1f} s"})
    # disk full during the write
    before = {p.name: p.stat().st_mtime_ns for p in (work / "o").iterdir()}
    real = writer_mod.save_file
    calls = {"n": 0}

    def disk_full(*a: Any, **k: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        real(*a, **k)

    writer_mod.save_file = disk_full
    try:
        run("o", "r1", overwrite=True)
        msg = "no error?"
    except OSError as exc:
        after = {p.name: p.stat().st_mtime_ns for p in (work / "o").iterdir()}
        leftovers = [p.name for p in work.iterdir() if p.name.startswith(".o.")]
        msg = (f"OSError '{exc.strerror}' raised; previous output {'intact' if after == before else 'CHANGED'}; "
               f"temporary directories left: {len(leftovers)}")
    finally:
        writer_mod.save_file = real
    rows.append({"fault": "disk full (ENOSPC) while writing the 3rd shard over an existing output",
                 "what happened": msg})
    # calibration statistics cache (the ordinary, non-streamed path)
    stats = CalibrationStats(grams={"k": torch.eye(3, dtype=torch.float64)}, tokens=1, batches=1)
    p = work / "stats.safetensors"
    stats.save(p)
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF
    p.write_bytes(bytes(data))
    try:
        CalibrationStats.load(p)
        msg = "NOT detected"
    except SvdzipError as exc:
        msg = f"detected: {exc}; `compress` recomputes a cached file"
    rows.append({"fault": "statistics file (--stats / cache) corrupted", "what happened": msg})
    for r in rows:
        log.info("%s → %s", r["fault"], r["what happened"])
    return rows


def _fault_child(src: str, out: str, run_dir: str) -> None:
    from svdzip import Recipe

    config = Recipe.plain(ratio=0.3, calib_samples=SAMPLES, calib_seq_len=32, calib_batch_size=4)
    stream(src, _tokens()[:, :32] % 512, config, out, run_dir)


def markdown(payload: dict[str, Any]) -> str:
    lines = ["# Scale: streaming, processes, faults", "", f"`{payload['provenance']['command']}` — "
             f"{payload['provenance']['machine']}, {payload['provenance']['date']}.", ""]
    if "memory" in payload:
        lines += ["## Peak resident memory vs model size",
                  "", f"Synthetic LLaMA-shaped checkpoints (fp32, GQA, untied head), {SAMPLES}×{SEQ} calibration "
                  "tokens, svdllm + uniform at ratio 0.3. Peak RSS above the process's baseline after imports "
                  "(torch + transformers), per phase; in memory, the model load is part of every phase's peak.", "",
                  "| layers | hidden | params | checkpoint MiB | mode | calibrate MiB | decompose MiB | write MiB "
                  "| wall s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in payload["memory"]:
            lines.append(f"| {r['layers']} | {r['hidden']} | {r['params']:,} | {r['checkpoint_mib']} | {r['mode']} "
                         f"| {r['calibrate_peak_above_baseline_mib']} | {r['decompose_peak_above_baseline_mib']} "
                         f"| {r['write_peak_above_baseline_mib']} | {r['wall_s']} |")
        lines.append("")
    if "procs" in payload:
        p = payload["procs"]
        lines += ["## Wall time, 1 vs 2 processes (gloo, CPU)", "", f"{p['model']}, calibration + decomposition + "
                  "allocation + materialisation, imports and model load excluded.", "",
                  "| processes | calibrate + decompose s | allocate + materialise s | total s |", "|---|---|---|---|"]
        for w in ("1", "2"):
            ph = p["phases"][w] if w in p["phases"] else p["phases"][int(w)]
            lines.append(f"| {w} | {ph['calibrate_decompose_s']} | {ph['allocate_materialise_s']} | {ph['total_s']} |")
        lines += ["", f"Speed-up {p['speedup']}×; same ranks: {p['same_ranks']}; max |Δlogit| between the two "
                  f"compressed models: {p['max_logit_diff']:.2e}.", ""]
    if "faults" in payload:
        lines += ["## Faults tried", "", "| fault | what happened |", "|---|---|"]
        lines += [f"| {r['fault']} | {r['what happened']} |" for r in payload["faults"]]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", choices=["memory", "procs", "faults"], default=None)
    parser.add_argument("--layers", default="4,8,16", help="layer counts of the memory sweep")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TQDM_DISABLE", "1")
    work = Path(tempfile.mkdtemp(prefix="svdzip-scale-"))
    path = Path(__file__).parent / "results" / "scale.json"
    payload: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    payload["provenance"] = provenance()
    try:
        if args.only in (None, "memory"):
            payload["memory"] = part_memory(work, [(768, 1024, int(n)) for n in args.layers.split(",")])
        if args.only in (None, "procs"):
            payload["procs"] = part_procs(work)
        if args.only in (None, "faults"):
            payload["faults"] = part_faults(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_results("scale", payload, markdown(payload))


if __name__ == "__main__":
    main()
