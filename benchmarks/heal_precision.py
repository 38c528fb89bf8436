"""Distillation's matmuls in float32 or under a bfloat16 autocast: speed and what the rounding changes.

    python benchmarks/heal_precision.py --teacher qwen2.5-0.5b --student outputs/qwen05-recommended-20 --threads 1

What a heal repeats, timed per window of `--seq-len` tokens on real calibration text: the teacher's forward
without gradients (its top-k cache), the student's forward and backward of the top-k KL with only its factors
trainable (a training micro-batch), and one GEMM of the MLP's shape. CPU seconds (`time.process_time`), median
of `--repeats`, the precisions interleaved. Rounding: the student's top-k KL to the teacher (what the held-out
checks read) and the teacher's top-k log-probabilities, bf16 against float32, on the same windows.
`svdzip.core.precision.native_bf16` decides "auto" from the CPU's features; this measures whether it pays.
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
from common import cpu_seconds, setup_logging, write_results

from svdzip.core.precision import autocast_for, native_bf16
from svdzip.data import calibration_tokens, load_corpus
from svdzip.output.loading import load_model
from svdzip.recover.heal import trainable_factors
from svdzip.recover.losses import kl_topk, topk_of

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="qwen2.5-0.5b", help="the dense model (alias or directory)")
    p.add_argument("--student", required=True, help="an svdzip output directory of that model")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--windows", type=int, default=4, help="windows for the rounding comparison")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--name", default="heal_precision")
    args = p.parse_args()
    setup_logging()
    torch.set_num_threads(args.threads)
    teacher, tokenizer, _ = load_model(args.teacher, "cpu")
    student = load_model(args.student, "cpu")[0]
    teacher.eval().requires_grad_(False)
    trained = trainable_factors(student)
    windows = calibration_tokens(tokenizer, load_corpus("wiki"), args.windows, args.seq_len, 0)
    one = windows[:1]
    hidden = teacher.config.hidden_size
    inter = teacher.config.intermediate_size
    a, b = torch.randn(args.seq_len, hidden), torch.randn(hidden, inter)

    def teacher_forward(dtype):
        with torch.no_grad(), autocast_for("cpu", dtype):
            return teacher(input_ids=one, use_cache=False).logits

    target = topk_of(teacher_forward(torch.float32), args.topk)

    def train_step(dtype):
        with autocast_for("cpu", dtype):
            loss = kl_topk(student(input_ids=one, use_cache=False).logits, target)
        loss.backward()
        for t in trained.values():
            t.grad = None

    def gemm(dtype):
        x, w = a.to(dtype), b.to(dtype)
        return lambda: x @ w

    cases = {f"{kind}/{name}": fn for name, dtype in PRECISIONS.items() for kind, fn in (
        ("gemm", gemm(dtype)), ("teacher forward", lambda d=dtype: teacher_forward(d)),
        ("student step", lambda d=dtype: train_step(d)))}
    for fn in cases.values():  # warm-up, not timed
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.repeats):
        for k, fn in cases.items():
            times[k].append(cpu_seconds(fn))
    median = {k: statistics.median(v) for k, v in times.items()}

    rounding = {}
    with torch.no_grad():
        for name, dtype in PRECISIONS.items():
            with autocast_for("cpu", dtype):
                t_logits = teacher(input_ids=windows, use_cache=False).logits
                s_logits = student(input_ids=windows, use_cache=False).logits
            top = topk_of(t_logits, args.topk)
            reference = topk_of(teacher(input_ids=windows, use_cache=False).logits, args.topk)
            rounding[name] = {
                "student_kl": float(kl_topk(s_logits, top)),  # both at this precision, as a held-out check
                "student_kl_to_float32_teacher": float(kl_topk(s_logits, reference)),
                "teacher_top1_agreement": float((top.ids[..., 0] == reference.ids[..., 0]).float().mean()),
                "teacher_top1_logp_max_abs_diff": float((top.logp[..., 0] - reference.logp[..., 0]).abs().max()),
                "teacher_top1_logp_mean_abs_diff": float((top.logp[..., 0] - reference.logp[..., 0]).abs().mean()),
            }
    payload = {"teacher": args.teacher, "student": args.student, "seq_len": args.seq_len, "windows": args.windows,
               "threads": args.threads, "repeats": args.repeats, "clock": "process_time",
               "cpu": platform.processor() or platform.machine(), "native_bf16": native_bf16("cpu"),
               "torch": torch.__version__, "trained_params": sum(t.numel() for t in trained.values()),
               "median_s": median, "times_s": times, "rounding": rounding}
    write_results(args.name, payload, markdown(payload))


def markdown(payload: dict) -> str:
    m = payload["median_s"]
    rows = [f"| {kind} | {m[kind + '/float32']:.3f} | {m[kind + '/bfloat16']:.3f} | "
            f"{m[kind + '/float32'] / m[kind + '/bfloat16']:.2f}× |"
            for kind in ("gemm", "teacher forward", "student step")]
    r = payload["rounding"]
    return "\n".join([
        f"# Healing's matmuls: float32 against a bfloat16 autocast ({payload['teacher']} → {payload['student']})",
        "",
        f"CPU seconds per window of {payload['seq_len']} tokens (the GEMM: {payload['seq_len']} × hidden × "
        f"intermediate), {payload['threads']} thread(s), median of {payload['repeats']}; this CPU multiplies bf16 "
        f"natively: {payload['native_bf16']} (so `--heal-precision auto` is "
        f"{'bfloat16' if payload['native_bf16'] else 'float32'} here).",
        "",
        "| what | float32 s | bfloat16 s | speed-up |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Rounding, on {payload['windows']} calibration windows: the student's top-k KL to the teacher (what a "
        f"held-out check reads) {r['float32']['student_kl']:.4f} in float32, {r['bfloat16']['student_kl']:.4f} "
        f"with both in bfloat16 ({r['bfloat16']['student_kl_to_float32_teacher']:.4f} against the float32 "
        "teacher); the "
        f"bf16 teacher's top word agrees with float32's on {100 * r['bfloat16']['teacher_top1_agreement']:.1f} % of "
        f"the tokens, its log-probability off by {r['bfloat16']['teacher_top1_logp_mean_abs_diff']:.3f} nats on "
        f"average and {r['bfloat16']['teacher_top1_logp_max_abs_diff']:.3f} at most.",
    ])


if __name__ == "__main__":
    main()
