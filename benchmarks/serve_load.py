"""Does `vllm serve` hold under load on an svdzip directory? 64 greedy completions at once, then one at a time.

For each model (a compressed svdzip directory and the dense model it came from) this starts vLLM's
OpenAI-compatible server on 127.0.0.1 (a free port, with `benchmarks/vllm_serve.py`'s start/stop helpers:
same flags, same environment, same readiness wait, the svdzip plugin loaded through its entry point),
sends the same N prompts (default 64) all at once — every request greedy, `max_tokens` fixed and
`ignore_eos` so each one decodes exactly that many tokens, each with its own timeout, and the whole phase
under a total time bound — and then the same prompts one at a time. It reports:

* failed requests (HTTP error, timeout, wrong token count) in either phase — must be 0;
* whether every text is identical between the concurrent and the sequential phase (greedy decoding: batching
  must not change the answer; a difference is reported with the first diverging token);
* throughput (completion tokens per second of wall time) under the concurrent load and one at a time, and
  the compressed model's against the dense model's under the same load;
* the SIGINT shutdown (clean or not).

    .venv-vllm/bin/python benchmarks/serve_load.py /tmp/sl/smollm2-20 \
        --dense ~/.cache/svdzip/models/smollm2-135m --name smollm2_20

Writes `benchmarks/results/serve_load_<name>.json` and `.md`; exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vllm_serve import RESULTS, free_port, post, start_server, stop_server, wait_healthy

log = logging.getLogger("benchmarks.serve_load")

SUBJECTS = ("the ocean", "a small village", "the moon", "an old library", "the railway", "a mountain lake",
            "the city market", "a winter storm")
FRAMES = ("Tell me about {}:", "Once upon a time, near {},", "The history of {} begins", "Q: What is {}?\nA:",
          "A short poem about {}:\n", "Scientists studying {} found that", "My favourite thing about {} is",
          "def describe(): # {}\n")


def prompts(n: int) -> list[str]:
    """n distinct prompts (8 subjects x 8 frames, then numbered if more are asked)."""
    base = [f.format(s) for f in FRAMES for s in SUBJECTS]
    return [base[i % len(base)] + ("" if i < len(base) else f" ({i // len(base)})") for i in range(n)]


def one_request(base: str, prompt: str, max_tokens: int, timeout: float) -> dict[str, Any]:
    body = {"model": "svdzip-model", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "logprobs": 0, "return_tokens_as_token_ids": True}
    t0 = time.monotonic()
    try:
        r = post(f"{base}/v1/completions", body, timeout)
        choice = r["choices"][0]
        ids = [int(t.split(":", 1)[1]) for t in choice["logprobs"]["tokens"]]
        n = r.get("usage", {}).get("completion_tokens", len(ids))
        err = None if n == max_tokens else f"{n} tokens instead of {max_tokens}"
        return {"ok": err is None, "error": err, "text": choice["text"], "ids": ids, "tokens": n,
                "latency_s": time.monotonic() - t0}
    except Exception as e:  # noqa: BLE001 - every failure is a result to count, not a crash
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:300], "text": None, "ids": [], "tokens": 0,
                "latency_s": time.monotonic() - t0}


def phase(base: str, ps: list[str], max_tokens: int, req_timeout: float, bound: float,
          concurrent: bool) -> dict[str, Any]:
    """All prompts at once (one thread each) or one after another, under a total bound of `bound` seconds."""
    deadline = time.monotonic() + bound
    t0 = time.monotonic()
    if concurrent:
        with ThreadPoolExecutor(max_workers=len(ps)) as ex:
            futs = [ex.submit(one_request, base, p, max_tokens, min(req_timeout, bound)) for p in ps]
            out = [f.result() for f in futs]
    else:
        out = []
        for p in ps:
            left = deadline - time.monotonic()
            if left <= 0:
                out.append({"ok": False, "error": "total time bound reached before it was sent", "text": None,
                            "ids": [], "tokens": 0, "latency_s": 0.0})
                continue
            out.append(one_request(base, p, max_tokens, min(req_timeout, left)))
    wall = time.monotonic() - t0
    lat = sorted(r["latency_s"] for r in out if r["ok"])
    tokens = sum(r["tokens"] for r in out if r["ok"])
    return {"requests": out, "wall_s": round(wall, 2), "tokens": tokens,
            "tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
            "failed": sum(not r["ok"] for r in out),
            "latency_p50_s": round(statistics.median(lat), 2) if lat else None,
            "latency_max_s": round(lat[-1], 2) if lat else None,
            "over_bound": wall > bound}


def serve_one(label: str, model_dir: str, ps: list[str], args: argparse.Namespace,
              extra: list[str]) -> dict[str, Any]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server_log = Path(os.environ.get("TMPDIR", "/tmp")) / f"serve_load_{label}.log"
    proc = start_server(model_dir, port, args.dtype, server_log, extra)
    try:
        ready_s = wait_healthy(base, proc, time.monotonic() + args.startup_timeout)
        log.info("%s: healthy after %.1f s", label, ready_s)
        # One warm-up request so neither phase pays for the first call's lazy initialisation.
        one_request(base, "Hello", args.max_tokens, args.request_timeout)
        rounds = []
        for i in range(args.repeats):
            rounds.append(phase(base, ps, args.max_tokens, args.request_timeout, args.phase_bound, concurrent=True))
            log.info("%s: %d at once (round %d): %.1f s, %.1f tok/s, %d failed", label, len(ps), i + 1,
                     rounds[-1]["wall_s"], rounds[-1]["tokens_per_s"] or 0, rounds[-1]["failed"])
        # the median round by throughput stands for the concurrent phase; every round's texts are compared
        conc = sorted(rounds, key=lambda r: r["tokens_per_s"] or 0)[len(rounds) // 2]
        seq = phase(base, ps, args.max_tokens, args.request_timeout, args.phase_bound, concurrent=False)
        log.info("%s: one at a time: %.1f s, %.1f tok/s, %d failed", label, seq["wall_s"],
                 seq["tokens_per_s"] or 0, seq["failed"])
    finally:
        shutdown = stop_server(proc)
    log.info("%s: server stopped: %s", label, shutdown)
    rows, differ = [], 0
    for i, (p, s) in enumerate(zip(ps, seq["requests"], strict=True)):
        c = next((r["requests"][i] for r in rounds if r["requests"][i]["ids"] != s["ids"]), conc["requests"][i])
        same = c["ok"] and s["ok"] and all(r["requests"][i]["ids"] == s["ids"] for r in rounds)
        first = None
        if c["ok"] and s["ok"] and not same:
            first = next((i for i, (a, b) in enumerate(zip(c["ids"], s["ids"], strict=False)) if a != b),
                         min(len(c["ids"]), len(s["ids"])))
        differ += not same
        rows.append({"prompt": p, "concurrent": c["text"], "sequential": s["text"], "identical": same,
                     "first_divergence": first, "concurrent_error": c["error"], "sequential_error": s["error"],
                     "concurrent_latency_s": round(c["latency_s"], 2),
                     "sequential_latency_s": round(s["latency_s"], 2)})
    strip = ("requests",)
    return {"model": model_dir, "ready_s": round(ready_s, 1), "server_log": str(server_log),
            "concurrent": {k: v for k, v in conc.items() if k not in strip},
            "concurrent_rounds_tokens_per_s": [r["tokens_per_s"] for r in rounds],
            "concurrent_failed_all_rounds": sum(r["failed"] for r in rounds),
            "sequential": {k: v for k, v in seq.items() if k not in strip},
            "texts_differ": differ, "shutdown": shutdown, "rows": rows,
            "ok": all(r["failed"] == 0 and not r["over_bound"] for r in rounds) and seq["failed"] == 0
            and differ == 0 and shutdown["clean"] and not seq["over_bound"]}


def markdown(res: dict[str, Any]) -> str:
    n = res["n_requests"]
    lines = [f"# vllm serve under load: {n} greedy completions at once, then one at a time", "",
             f"`{res['command']}` — {res['machine']}; dtype {res['dtype']}, {res['max_tokens']} tokens per request "
             f"(`ignore_eos`, greedy), request timeout {res['request_timeout']} s, each phase bounded by "
             f"{res['phase_bound']} s. Overall: **{'pass' if res['ok'] else 'FAIL'}**.", "",
             f"The concurrent phase runs {res['repeats']} times (the median round by throughput is shown, every "
             "round's texts are compared with the sequential ones); tokens/s = completion tokens / wall time.", "",
             "| model | ready (s) | at once: wall (s) | at once: tok/s (each round) | at once: p50 / max latency (s) | "
             "one at a time: wall (s) | one at a time: tok/s | failed | texts differ | SIGINT shutdown |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    loads = ", ".join(f"{k} {m.get('load_avg_1min_before')}" for k, m in res["models"].items())
    for label, m in res["models"].items():
        c, s = m["concurrent"], m["sequential"]
        each = ", ".join(f"{x}" for x in m["concurrent_rounds_tokens_per_s"])
        lines.append(f"| {label} (`{m['model']}`) | {m['ready_s']} | {c['wall_s']} | {c['tokens_per_s']} ({each}) | "
                     f"{c['latency_p50_s']} / {c['latency_max_s']} | {s['wall_s']} | {s['tokens_per_s']} | "
                     f"{m['concurrent_failed_all_rounds']} + {s['failed']} | {m['texts_differ']} / {n} | "
                     f"{'clean' if m['shutdown']['clean'] else 'NOT clean'} ({m['shutdown']['seconds']} s) |")
    if res.get("speedup_concurrent") is not None:
        lines += ["", f"Compressed / dense throughput under the same concurrent load: "
                      f"**{res['speedup_concurrent']:.3f}x**; one at a time: {res['speedup_sequential']:.3f}x. "
                      f"The machine is shared (1-minute load average before each server: {loads}), so "
                      "differences of a few percent are noise."]
    for label, m in res["models"].items():
        bad = [r for r in m["rows"] if not r["identical"]]
        if bad:
            lines += ["", f"## {label}: texts that differ between the two phases", "",
                      "| prompt | first diverging token | at once | one at a time |", "|---|---|---|---|"]
            for r in bad:
                err = r["concurrent_error"] or r["sequential_error"]
                lines.append(f"| {r['prompt'][:40]!r} | {r['first_divergence']} | "
                             f"{(r['concurrent'] or err or '')[:60]!r} | {(r['sequential'] or '')[:60]!r} |")
    label = next(iter(res["models"]))
    lines += ["", f"First three answers ({label}):", ""]
    for r in res["models"][label]["rows"][:3]:
        lines.append(f"- {r['prompt']!r} → {r['concurrent']!r}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="the compressed svdzip directory")
    ap.add_argument("--dense", default=str(Path("~/.cache/svdzip/models/smollm2-135m").expanduser()),
                    help="the dense model's directory ('' to skip it)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the concurrent phase (median kept)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--request-timeout", type=float, default=180, help="seconds per request")
    ap.add_argument("--phase-bound", type=float, default=300, help="seconds for all requests of one phase")
    ap.add_argument("--startup-timeout", type=float, default=300)
    ap.add_argument("--name", default=None, help="result file name suffix (default: the directory's name)")
    args, extra = ap.parse_known_args(argv)
    ps = prompts(args.requests)
    models = {"compressed": args.model}
    if args.dense:
        models["dense"] = args.dense
    res: dict[str, Any] = {"n_requests": len(ps), "max_tokens": args.max_tokens, "dtype": args.dtype,
                           "request_timeout": args.request_timeout, "repeats": args.repeats,
                           "phase_bound": args.phase_bound,
                           "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, vLLM CPU backend",
                           "command": " ".join([Path(sys.executable).name, *sys.argv]), "models": {}}
    for label, d in models.items():
        load = os.getloadavg()[0]
        res["models"][label] = serve_one(label, d, ps, args, extra)
        res["models"][label]["load_avg_1min_before"] = round(load, 2)
    if "dense" in res["models"]:
        c, d = res["models"]["compressed"], res["models"]["dense"]
        if c["concurrent"]["tokens_per_s"] and d["concurrent"]["tokens_per_s"]:
            res["speedup_concurrent"] = c["concurrent"]["tokens_per_s"] / d["concurrent"]["tokens_per_s"]
            res["speedup_sequential"] = c["sequential"]["tokens_per_s"] / d["sequential"]["tokens_per_s"]
    res["ok"] = all(m["ok"] for m in res["models"].values())
    name = args.name or Path(args.model).name
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"serve_load_{name}.json").write_text(json.dumps(res, indent=2))
    (RESULTS / f"serve_load_{name}.md").write_text(markdown(res))
    print(markdown(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
