"""Where transformers' batch-1 decode time goes, dense vs compressed: torch.profiler's top operators.

Why: the compressed models read 1.2–1.5× fewer weight bytes per token but decode only ~1.0–1.1× faster in
transformers on this CPU (benchmarks/results/vllm_speed.md); this names the operators that take the time.

    OMP_NUM_THREADS=1 python benchmarks/transformers_profile.py --models dense=DIR,svdllm-40=DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import svdzip

RESULTS = Path(__file__).parent / "results"


def top_ops(model: torch.nn.Module, prompt_len: int, new_tokens: int, n: int = 10) -> dict:
    ids = torch.randint(100, 40000, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    kw = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, **kw)
        prefill = profile(activities=[ProfilerActivity.CPU])
        with prefill:
            model.generate(ids, **{**kw, "min_new_tokens": 1, "max_new_tokens": 1})
        full = profile(activities=[ProfilerActivity.CPU])
        with full:
            model.generate(ids, **kw)

    def table(p):
        return {e.key: (e.self_cpu_time_total, e.count) for e in p.key_averages()}

    pre, tot = table(prefill), table(full)
    decode = {k: (us - pre.get(k, (0, 0))[0], c - pre.get(k, (0, 0))[1]) for k, (us, c) in tot.items()}
    total = sum(max(us, 0) for us, _ in decode.values())
    rows = sorted(decode.items(), key=lambda kv: -kv[1][0])[:n]
    return {"decode_self_cpu_ms": total / 1e3,
            "ops": [{"op": k, "self_cpu_ms": us / 1e3, "calls": c, "share": us / total} for k, (us, c) in rows]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", required=True, help="label=dir,…")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=33)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = {}
    for item in args.models.split(","):
        label, path = item.split("=", 1)
        model = svdzip.load(path, with_tokenizer=False)[0]
        res[label] = top_ops(model, args.prompt_len, args.new_tokens)
        del model
    cmd = " ".join(["python", *sys.argv])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "transformers_profile.json").write_text(json.dumps({"command": cmd, "models": res}, indent=2))
    md = ["# transformers batch-1 decode: top operators by self CPU time (torch.profiler, one thread)", "",
          f"`{cmd}` — decode = profile(prompt + {args.new_tokens} tokens) − profile(prompt + 1 token)", ""]
    for label, r in res.items():
        md += [f"**{label}**: {r['decode_self_cpu_ms']:.0f} ms of operator time for {args.new_tokens - 1} decode steps",
               "", "| op | calls | ms | share |", "|---|---|---|---|"]
        md += [f"| {o['op']} | {o['calls']} | {o['self_cpu_ms']:.0f} | {o['share']:.0%} |" for o in r["ops"]]
        md.append("")
    (RESULTS / "transformers_profile.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
