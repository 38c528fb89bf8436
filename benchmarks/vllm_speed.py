"""Decode speed of svdzip models under vLLM (and transformers) against the bytes of weights they read.

Why: a low-rank model reads fewer weight bytes per decoded token, and batch-1 decoding on a CPU is
bound by reading weights, so its speed-up should approach dense bytes ÷ compressed bytes (lm_head
included). Each model runs in a fresh vLLM engine in its own process (one round = every model once;
rounds alternate models so that machine load hits them alike); inside it, the worker reports the
weight memory vLLM really holds (per layer, from the loaded layers) and its RSS. `--profile`
times every module class during one decode run with forward hooks, to show where the time goes.

    .venv-vllm/bin/python benchmarks/vllm_speed.py \
        --models dense=~/.cache/svdzip/models/smollm2-135m,svdllm-20=outputs/svdllm-20,svdllm-40=outputs/svdllm-40

A label `NAME@per-shard` serves NAME's directory with the per-shard layout (SVDZIP_VLLM_LAYOUT) instead of
the stacked one. Writes `benchmarks/results/<--name>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
log = logging.getLogger("benchmarks.vllm_speed")


def worker(path: str, dtype: str, prompt_len: int, new_tokens: int, repeats: int, profile: bool,
           cpu_clock: bool) -> dict[str, Any]:
    """One model in one fresh engine: load time, weight memory, decode and prefill times.

    The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so with `cpu_clock` the
    process CPU time measures the model's work alone, whatever else loads the machine."""
    import numpy as np
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from svdzip.serve.vllm_stats import install_profiler, read_profile, reset_profile, weight_accounting

    t0 = time.perf_counter()
    llm = LLM(model=path, dtype=dtype, enforce_eager=True, max_model_len=1024, enable_prefix_caching=False,
              seed=0, distributed_executor_backend="uni")
    load_s = time.perf_counter() - t0
    memory = llm.apply_model(weight_accounting)[0]
    vocab = llm.get_tokenizer().vocab_size
    ids = np.random.default_rng(0).integers(100, vocab - 100, prompt_len).tolist()
    prompt = TokensPrompt(prompt_token_ids=ids)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    full = SamplingParams(temperature=0, max_tokens=new_tokens + 1, ignore_eos=True)

    def timed(sp: SamplingParams) -> float:
        clock = time.process_time if cpu_clock else time.perf_counter
        t = clock()
        llm.generate([prompt], sp, use_tqdm=False)
        return clock() - t

    timed(one)
    timed(full)
    prefill, decode = [], []
    for _ in range(repeats):
        t_one, t_full = timed(one), timed(full)
        prefill.append(t_one)
        decode.append(max(t_full - t_one, 1e-9))
    out: dict[str, Any] = {"load_s": load_s, "memory": memory, "prefill_s": prefill, "decode_s": decode,
                           "decode_tokens_per_s": new_tokens / statistics.median(decode),
                           "prefill_tokens_per_s": prompt_len / statistics.median(prefill)}
    if profile:
        llm.apply_model(install_profiler)
        timed(full)
        llm.apply_model(reset_profile)
        t = timed(full)
        out["profile"] = {"wall_s": t, "modules": llm.apply_model(read_profile)[0], "new_tokens": new_tokens}
    return out


def run_worker(label: str, path: str, args: argparse.Namespace) -> dict[str, Any]:
    name, _, layout = label.partition("@")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
           "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0"),
           "VLLM_ALLOW_INSECURE_SERIALIZATION": "1", "SVDZIP_VLLM_LAYOUT": layout or "stacked",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    cmd = [sys.executable, __file__, "--worker", path, "--dtype", args.dtype, "--prompt-len", str(args.prompt_len),
           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
           "--clock", args.clock] + (["--profile"] * args.profile)
    log.info("%s: %s", label, " ".join(cmd))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.worker_timeout)
    marker = [line for line in proc.stdout.splitlines() if line.startswith("SVDZIP_RESULT ")]
    if proc.returncode != 0 or not marker:
        raise RuntimeError(f"{label} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(marker[-1].split(" ", 1)[1])


def bytes_per_token(path: str, bytes_per_value: int) -> dict[str, int]:
    """Weight bytes read to decode one token: every decoder linear as stored, plus lm_head (tied or not)."""
    from svdzip.serve.layout import expected_linears, weight_bytes

    cfg = json.loads((Path(path) / "config.json").read_text())
    manifest = cfg.get("quantization_config") or {}
    expected = expected_linears(cfg["architectures"][0], cfg)
    return weight_bytes(manifest.get("modules", {}), expected, cfg["vocab_size"] * cfg["hidden_size"],
                        bytes_per_value, slimmed=manifest.get("slimmed"))


def transformers_speed(models: dict[str, str], prompt_len: int, new_tokens: int, repeats: int,
                       clock: str) -> dict[str, Any]:
    """The same models in transformers (svdzip.load), batch 1, one thread, alternated within each repeat."""
    import torch

    import svdzip
    from svdzip.evaluate.speed import SpeedSetting, measure_speed

    torch.set_num_threads(1)
    loaded = {label: svdzip.load(path, with_tokenizer=False)[0] for label, path in models.items()}
    res = measure_speed(loaded, [SpeedSetting(1, prompt_len, new_tokens + 1)], repeats=repeats,
                        reference=next(iter(models)), clock=clock)
    key = f"b1_s{prompt_len}"
    return {label: r[key]["decode_tokens_per_s"] for label, r in res["results"].items()}


def markdown(res: dict[str, Any]) -> str:
    ref = res["reference"]
    lines = [f"# Decode speed under vLLM vs weight bytes read ({res['dtype']}, batch 1)", "",
             f"`{res['command']}`", "",
             f"{res['machine']}; prompt {res['prompt_len']} tokens, {res['new_tokens']} greedy tokens decoded, "
             f"median of {res['repeats']} per round over {res['rounds']} rounds (rounds alternate the models), "
             f"{res['clock']} clock; decode tok/s = new tokens ÷ (time(prompt + new tokens) − time(prompt + 1 token)). "
             "'weights in vLLM' = values the loaded layers hold (factors of low-rank layers, full matrices of dense "
             "ones, embedding/lm_head once). 'bytes ratio' = dense ÷ this model's weight bytes read per token "
             "(decoder linears as stored + lm_head).", "",
             "| model | weights in vLLM | worker RSS | bytes ratio | vLLM decode tok/s | × dense | "
             "target ≥ 0.9 × ratio | transformers tok/s | × dense |", "|---|---|---|---|---|---|---|---|---|"]
    for label, r in res["models"].items():
        m = r["memory"]
        w = (m["linear_bytes"] + m["embedding_bytes"]) / 2**20
        sp = r["decode_tokens_per_s"] / res["models"][ref]["decode_tokens_per_s"]
        hf = res.get("transformers", {}).get(label.partition("@")[0])
        hf_ref = res.get("transformers", {}).get(ref)
        target = "" if label == ref else ("yes" if sp >= 0.9 * r["bytes_ratio"] else "**no**")
        lines.append(f"| {label} | {w:.1f} MiB | {m['rss_bytes'] / 2**20:.0f} MiB | {r['bytes_ratio']:.2f} | "
                     f"{r['decode_tokens_per_s']:.1f} | {sp:.2f} | {target} | "
                     f"{'' if hf is None else f'{hf:.1f}'} | {'' if hf is None else f'{hf / hf_ref:.2f}'} |")
    for label, r in res["models"].items():
        if "profile" not in r:
            continue
        p = r["profile"]
        lines += ["", f"**Profile of {label}** (forward hooks summing CPU time, one run of {p['new_tokens'] + 1} "
                      f"tokens after a {res['prompt_len']}-token prompt, {p['wall_s']:.2f} s {res['clock']} clock):",
                  "",
                  "| module | calls | ms | share |", "|---|---|---|---|"]
        for k, v in sorted(p["modules"].items(), key=lambda kv: -kv[1]["seconds"]):
            lines.append(f"| {k} | {v['calls']} | {1e3 * v['seconds']:.0f} | {v['seconds'] / p['wall_s']:.0%} |")
        rest = p["wall_s"] - sum(v["seconds"] for v in p["modules"].values())
        lines.append(f"| (not in a hooked module: scheduler, sampler, rope, residuals, Python) | | {1e3 * rest:.0f} | "
                     f"{rest / p['wall_s']:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=f"dense={Path('~/.cache/svdzip/models/smollm2-135m').expanduser()},"
                    "svdllm-20=outputs/svdllm-20,svdllm-40=outputs/svdllm-40", help="label=dir,… (first = reference)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clock", default="cpu", choices=["cpu", "wall"],
                    help="cpu = process CPU time of the in-process engine (robust on a shared machine; default)")
    ap.add_argument("--profile", action="store_true", help="also profile each model's decode per module class")
    ap.add_argument("--transformers", action="store_true", help="also time the same models in transformers")
    ap.add_argument("--worker-timeout", type=float, default=400)
    ap.add_argument("--name", default="vllm_speed")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        res = worker(args.worker, args.dtype, args.prompt_len, args.new_tokens, args.repeats, args.profile,
                     args.clock == "cpu")
        print("SVDZIP_RESULT " + json.dumps(res), flush=True)
        return 0
    models = dict(item.split("=", 1) for item in args.models.split(","))
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for _ in range(args.rounds):
        for label, path in models.items():
            runs[label].append(run_worker(label, path, args))
    size = 2 if args.dtype in ("bfloat16", "float16") else 4
    out_models = {}
    for label, path in models.items():
        rs = runs[label]
        dense_b = bytes_per_token(path, size)
        out_models[label] = {**rs[-1], "runs": rs, "bytes_per_token": dense_b,
                             "bytes_ratio": dense_b["dense"] / dense_b["read_per_token"],
                             "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in rs),
                             "prefill_tokens_per_s": statistics.median(r["prefill_tokens_per_s"] for r in rs)}
    import torch
    import vllm

    res: dict[str, Any] = {
        "models": out_models, "reference": next(iter(models)), "dtype": args.dtype, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "repeats": args.repeats, "rounds": args.rounds, "clock": args.clock,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, vllm {vllm.__version__}, torch "
                   f"{torch.__version__}, OpenMP threads bound to {os.environ.get('VLLM_CPU_OMP_THREADS_BIND', '0')}",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if args.transformers:
        plain = {label.partition("@")[0]: path for label, path in models.items()}
        res["transformers"] = transformers_speed(plain, args.prompt_len, args.new_tokens, args.repeats, args.clock)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(res, indent=2))
    (RESULTS / f"{args.name}.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
