"""`svdzip compress | eval | info`: the command line over the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from svdzip.errors import SvdzipError
from svdzip.passes.quant_error import ROUNDINGS

log = logging.getLogger("svdzip")

PAPER_CALIBRATION = (256, 2048)
#: flags that set a recipe field carry `dest="recipe.FIELD"` (or `healing.FIELD` for a recovery option) and no
#: argparse default: what a flag leaves out comes from the recipe file (--recipe) or from `Recipe`'s defaults,
#: which the help texts quote, so the command line and the Python API share one set of defaults
RECIPE, HEALING = "recipe.", "healing."


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SvdzipError(f"allocator option must look like key=value, got '{text}'")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _corpora(text: str) -> list[str]:
    return [c for c in text.split(",") if c]


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpora", default="wiki,austen",
                   help="evaluation corpora, comma-separated: wiki, austen, code (Python sources) or a path to .txt "
                        "(default: %(default)s)")
    p.add_argument("--protocol", default="svdllm", choices=["svdllm", "hf_stride", "both"],
                   help="perplexity protocol (methods-spec §1.5; default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=2048, help="evaluation window, capped to the model's limit")
    p.add_argument("--eval-tokens", type=int, default=32768,
                   help="evaluate on at most this many tokens per corpus (0 = all; default: %(default)s)")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _add_task_speed_args(p: argparse.ArgumentParser, default_tasks: str = "") -> None:
    """Zero-shot accuracy and speed options shared by `eval` and `sweep`."""
    p.add_argument("--tasks", default=default_tasks,
                   help="zero-shot tasks, comma-separated (piqa,arc_easy,…; 'all' = every task; default: none)")
    p.add_argument("--limit", type=int, default=None, help="zero-shot: first N documents per task (default: all)")
    p.add_argument("--zs-batch-size", type=int, default=16, help="zero-shot batch size (default: %(default)s)")
    p.add_argument("--speed", action="store_true",
                   help="measure prefill/decode throughput, latency and peak memory against the first/dense model")
    p.add_argument("--speed-batches", default="1,4", help="batch sizes for --speed (default: %(default)s)")
    p.add_argument("--speed-seq-lens", default="128", help="prompt lengths for --speed (default: %(default)s)")
    p.add_argument("--speed-new-tokens", type=int, default=32, help="greedy tokens decoded (default: %(default)s)")
    p.add_argument("--speed-repeats", type=int, default=3, help="timed repeats, median kept (default: %(default)s)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="speed clock: wall, or cpu = process CPU time (robust on a shared CPU; use with --threads 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _add_heal_args(p: argparse.ArgumentParser, heal_dest: str, heal_default: Any, with_none: bool) -> None:
    """Recovery options shared by `compress --heal` and `svdzip heal` (defaults: HealConfig's, quoted in the help)."""
    from svdzip.core.precision import PRECISIONS
    from svdzip.recover.config import HEAL_METHODS, LAYER_LOCAL, ORDERS
    from svdzip.recover.config import HealConfig as H

    g = p.add_argument_group("recovery (train the factors after truncation, on calibration text only)")
    # a layer-local heal runs inside compression's layer walk (it needs each dense layer): not on a saved directory
    methods = HEAL_METHODS if with_none else [m for m in HEAL_METHODS if m not in LAYER_LOCAL]
    g.add_argument("--heal", "--finetune", dest=heal_dest, default=heal_default,
                   choices=[*(("auto", "none") if with_none else ()), *methods],
                   help="distill: train the factors to match the dense model's next-token distribution; seq-lora: "
                        "SVD-LLM's sequential LoRA (peft) on the left, then the right factors"
                        + ("; layerwise: each layer's factors against its dense output on the calibration windows, "
                           "one layer at a time (runs with --stream and torchrun; --heal-steps are per layer); "
                           "auto (default): distill in memory, layerwise for --stream, --resume-dir and torchrun runs"
                           if with_none else " (default: distill)"))

    def option(flag: str, name: str, help: str, **kw: Any) -> None:
        default = getattr(H, name, None)
        if "choices" not in kw:
            kw["metavar"] = flag.lstrip("-").replace("-", "_").upper()
        g.add_argument(flag, dest=HEALING + name, default=argparse.SUPPRESS,
                       help=f"{help} (default: {default})" if default is not None else help, **kw)

    option("--heal-steps", "steps", "optimiser steps (layerwise: per layer; default: distill and seq-lora 40, "
           "layerwise 10)", type=int)
    g.add_argument("--heal-lr", dest=HEALING + "lr", type=float, default=argparse.SUPPRESS, metavar="LR",
                   help="peak learning rate, used as given (default: found on the held-out windows, starting at "
                        "2.57e-3 × the median RMS of the trained factors for distill (3e-4 on SmolLM2-135M), "
                        "1.17e-2 × the first healed layer's for layerwise, the paper's 1e-4 for seq-lora, divided by "
                        "3 on each held-out check that is no better than the best, at most 3 times)")
    g.add_argument("--heal-objective", dest=HEALING + "objective", default=argparse.SUPPRESS, choices=["kl", "ce"],
                   help="kl: the dense teacher's distribution; ce: the text's next token (default: distill kl, "
                        "seq-lora ce as in the paper)")
    option("--heal-warmup", "warmup", "warm-up fraction of the steps", type=float)
    option("--heal-batch-size", "batch_size", "windows per micro-batch", type=int)
    option("--heal-grad-accum", "grad_accum", "micro-batches per optimiser step", type=int)
    option("--heal-seq-len", "seq_len", "window length in tokens", type=int)
    option("--heal-samples", "train_samples", "distinct training windows of the calibration corpus", type=int)
    option("--heal-heldout", "heldout_samples", "held-out calibration windows for early stopping", type=int)
    option("--heal-eval-every", "eval_every", "steps between held-out checks and checkpoints", type=int)
    option("--heal-patience", "patience", "held-out checks without improvement before stopping", type=int)
    option("--heal-temperature", "temperature", "distillation temperature", type=float)
    option("--heal-topk", "topk", "teacher kept as its top-k log-probabilities + tail (0 = full distribution)",
           type=int)
    option("--heal-weight-decay", "weight_decay", "AdamW weight decay", type=float)
    option("--heal-precision", "precision", "distill's and seq-lora's matmuls: auto = bfloat16 autocast where the "
           "device multiplies bf16 natively (CUDA, a CPU with AVX512-BF16 or AMX), else float32; the weights and "
           "the optimiser stay float32", choices=list(PRECISIONS))
    g.add_argument("--heal-corpus", dest=HEALING + "corpus", default=argparse.SUPPRESS, metavar="CORPUS",
                   help="training text: wiki, austen, code, mix or a .txt path (default: mix when calibrating on wiki, "
                        "else the calibration corpus)")
    option("--lora-r", "lora_r", "seq-lora rank", type=int)
    option("--lora-alpha", "lora_alpha", "seq-lora α", type=float)
    option("--lora-dropout", "lora_dropout", "seq-lora dropout", type=float)
    option("--seq-lora-order", "order", "which factor seq-lora trains first (the released code's)",
           choices=list(ORDERS))


def _lowbit_counts(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The manifest's low-bit entry in brief: how many matrices at each width, how many compensated."""
    if not record:
        return None
    specs = list(record["modules"].values())
    bits: dict[str, int] = {}
    for name, spec in record["modules"].items():
        kind = f"{spec['bits']} bits" + (" (factors)" if name.endswith((".left", ".right")) else "")
        bits[kind] = bits.get(kind, 0) + 1
    return {"backend": record["backend"], "backend_version": record.get("backend_version", ""), "bits": bits,
            "compensated": sum(1 for s in specs if s["rank"]), "compensation_rank": sum(s["rank"] for s in specs)}


def _rank_or_auto(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a rank (a whole number ≥ 0) or auto, got '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a rank must be ≥ 0, got {value}")
    return value


def _given(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    """The recipe fields (or recovery options) given on the command line, by field name."""
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix)}


def _heal_config(args: argparse.Namespace, corpus: str, device: str):
    """`svdzip heal`'s HealConfig: the flags given, HealConfig's defaults for the rest."""
    from svdzip.recover.config import HealConfig

    options = {"corpus": corpus, **_given(args, HEALING)}
    return HealConfig(method=args.heal, seed=args.seed, device=device, **options).validate()


def _tasks(text: str) -> list[str]:
    if text.strip() == "all":
        from svdzip.evaluate.zeroshot import ZERO_SHOT_TASKS

        return list(ZERO_SHOT_TASKS)
    return [t for t in text.split(",") if t]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svdzip", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (per-matrix table)")
    sub = parser.add_subparsers(dest="command", required=True)

    from svdzip.core.precision import PRECISIONS
    from svdzip.recipe import Recipe

    d = Recipe()  # the defaults, quoted in the help texts
    c = sub.add_parser("compress", help="compress a model to a parameter or memory budget and save it")
    c.add_argument("--model", default="smollm2-135m",
                   help="alias (smollm2-135m, gemma3-270m, qwen2.5-0.5b, qwen2.5-1.5b), local directory or hub id "
                        "(default: %(default)s)")
    c.add_argument("--out", required=True, help="output directory (refused if it exists, unless --overwrite)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    c.add_argument("--recipe", default=None, metavar="FILE",
                   help="a recipe.yaml (every output directory holds the one it was made with; a directory works "
                        "too): rerun it exactly; flags given beside it override its settings")

    def field(flag: str, name: str, help: str, quote: bool = True, **kw: Any) -> None:
        default = f" (default: {getattr(d, name)})" if quote else ""
        if "choices" not in kw:
            kw["metavar"] = flag.lstrip("-").replace("-", "_").upper()
        c.add_argument(flag, dest=RECIPE + name, default=argparse.SUPPRESS, help=help + default, **kw)

    ratio = c.add_mutually_exclusive_group()
    ratio.add_argument("--ratio", dest=RECIPE + "ratio", type=float, default=argparse.SUPPRESS, metavar="RATIO",
                       help=f"fraction of decoder-linear parameters REMOVED (SVD-LLM/D-Rank convention; "
                            f"default {d.ratio})")
    ratio.add_argument("--kept", type=float, default=None,
                       help="fraction KEPT instead (ARA/ASVD convention): --kept 0.8 == --ratio 0.2")
    c.add_argument("--budget-bytes", default=None, metavar="BYTES",
                   help="memory budget instead of --ratio: weight bytes of the whole saved model (e.g. 80MB, 64MiB)")
    field("--budget-fraction", "budget_fraction", "memory budget as a fraction of the dense model's bfloat16 weight "
          "bytes (e.g. 0.35)", quote=False, type=float)
    field("--quantize", "quantize", "weight-only quantization of the stored matrices: int8 (torchao, pip install "
          "'svdzip[quant]'); int4, int3, int2 (HQQ, packed, every matrix at that width; pip install 'svdzip[lowbit]'); "
          "plan: the byte planner chooses per matrix among factorised, dense and 8/4/3/2 bits with a compensation; "
          "none; auto: plan for a memory budget, none for a ratio", choices=["auto", "none", "int8", "int4", "int3",
                                                                            "int2", "plan"])
    field("--compensate", "compensate", "rank of the low-rank correction of each low-bit matrix's quantization error "
          "(EoRA's closed form on the calibration inputs); auto: chosen per matrix by the planner within a memory "
          "budget, 0 without one", type=_rank_or_auto)
    field("--compensate-order", "compensate_order", "how a low-bit matrix and its compensation are fitted: "
          "quantize-first (EoRA: pack W, correct the error) or truncate-first (CALDERA, one alternation: pack the "
          "residual of W's truncation, then refit the correction)", choices=["quantize-first", "truncate-first"])
    field("--rounding", "rounding", "how low-bit weights are rounded onto HQQ's grid: choose (gptq, "
          "unless the plan stores 2-bit matrices and auto's model loses more than 1 %% less on --tune-samples "
          "held-out calibration windows), gptq (error feedback on the calibration inputs' Gram, GPTQ's greedy: the "
          "output error, not each weight's), nearest (HQQ alone) or auto (gptq at 3 bits and up, nearest at 2); "
          "packed factors (--quantize-scope factors, packed_factors=true) are always rounded to nearest",
          choices=list(ROUNDINGS))
    field("--quantize-scope", "quantize_scope", "what --quantize stores quantized: all matrices, the dense "
          "remainder only (int8), or the factors only (int8; with int4/int3/int2 and a memory budget: SVD first, "
          "every matrix factorised and its factors packed at that width)", choices=["all", "dense", "factors"])
    c.add_argument("--params-first", action="store_true",
                   help="with a memory budget: allocate parameters first and fit the bytes by the ratio, instead of "
                        "a byte-aware allocation (for comparison)")
    field("--method", "method", "factorisation: svd, svdllm, asvd, fwsvd; or modules: modegpt (MoDeGPT), hybrid "
          "(per module, slimmed or factorised, chosen by loss-aware; --allocator ara refines its factorised matrices)")
    field("--allocator", "allocator", "rank allocator (see `svdzip info --allocators`); auto: loss-aware in memory "
          "(the recommended recipe, with --heal auto), loss-aware on its layer-local signal (signal=local) for "
          "--stream, --resume-dir and torchrun runs; the "
          "papers' plain SVD-LLM(W) is --allocator uniform --heal none")
    c.add_argument("--allocator-option", action="append", default=[], metavar="KEY=VALUE",
                   help="allocator hyperparameter, repeatable (e.g. beta=0.3)")
    field("--group-size", "group_size", "Basis Sharing: share q/k/v/up/gate bases over this many consecutive layers",
          type=int)
    field("--update", "update", "weight update after truncation: svdllm (closed-form, layer-wise) or coef "
          "(shared bases)", quote=False, choices=["svdllm", "coef"])
    field("--update-samples", "update_samples", "calibration sequences the update refits on (0 = all; SVD-LLM "
          "uses 16 x 2048 tokens)", type=int)
    field("--asvd-alpha", "asvd_alpha", "ASVD's activation-scaling exponent", type=float)
    field("--asvd-scaling", "asvd_scaling", "ASVD's per-channel statistic", choices=["abs_mean", "abs_max"])
    field("--corpus", "corpus", "calibration corpus: wiki, austen, code, mix (wiki + other tasks' text) or a .txt path")
    field("--calib-samples", "calib_samples", "calibration sequences", type=int)
    field("--calib-seq-len", "calib_seq_len", "calibration sequence length", type=int)
    field("--calib-batch-size", "calib_batch_size", "calibration sequences per forward", type=int)
    field("--calib-precision", "calib_precision", "the calibration's and the Fisher pass's matmuls: auto = "
          "bfloat16 autocast where the device has it natively (CUDA, AVX512-BF16, AMX), else float32; the "
          "statistics are summed in float32 either way", choices=list(PRECISIONS))
    c.add_argument("--paper-calibration", action="store_true",
                   help="the papers' 256 x 2048 calibration tokens (slow on a CPU)")
    c.add_argument("--stats", default=None,
                   help="calibration statistics file of an in-memory run: reused if present, written otherwise "
                        "(default: a cache keyed by the weights and tokens)")
    field("--seed", "seed", "seed of the calibration draw and of training", type=int)
    c.add_argument("--stream", action="store_true",
                   help="models larger than memory: read one decoder layer at a time from the safetensors "
                        "(automatic when the model exceeds 60%% of the available memory)")
    c.add_argument("--resume-dir", default=None,
                   help="run directory: per-layer statistics and per-matrix spectra are checkpointed there, and "
                        "rerunning the same command continues a killed run (torchrun: a shared directory)")
    c.add_argument("--restart", action="store_true",
                   help="discard a --resume-dir written with another configuration instead of refusing it")
    c.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 … (default: %(default)s)")
    field("--dtype", "storage_dtype", "dtype of the saved model (computation of the factors is float64)",
          choices=["float32", "float16", "bfloat16"])
    c.add_argument("--tune-beta", action="store_true",
                   help="D-Rank: choose the Q/K→V rebalancing β on held-out CALIBRATION windows "
                        "(never evaluation text); implies --allocator drank")
    field("--tune-samples", "heldout_samples", "held-out calibration windows for --tune-beta, loss-aware's "
          "guard=true and --rounding choose", type=int)
    c.add_argument("--no-plots", action="store_true",
                   help="do not write ranks.png / effective_rank.png next to the model")
    c.add_argument("--eval", action="store_true",
                   help="then reload the saved model and compare its perplexity with the dense model's")
    _add_heal_args(c, heal_dest=RECIPE + "heal", heal_default=argparse.SUPPRESS, with_none=True)
    _add_eval_args(c)
    c.add_argument("--json", action="store_true", help="print a JSON summary on stdout")

    h = sub.add_parser("heal", help="recover an already compressed directory (distillation or sequential LoRA)")
    h.add_argument("dir", help="a directory written by `svdzip compress`")
    h.add_argument("--out", required=True, help="output directory (refused if it exists, unless --overwrite)")
    h.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    h.add_argument("--teacher", default=None,
                   help="the dense model (default: the one the manifest says DIR was compressed from)")
    h.add_argument("--corpus", default=None,
                   help="training text: wiki, austen, code, mix or a .txt path (default: mix where the directory was "
                        "calibrated on wiki or its recipe is unknown, else its calibration corpus)")
    h.add_argument("--resume-dir", default=None,
                   help="checkpoints go there; rerunning the same command continues a killed heal")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 … (default: %(default)s)")
    h.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the saved model (training follows --heal-precision)")
    _add_heal_args(h, heal_dest="heal", heal_default="distill", with_none=False)
    _add_eval_args(h)
    h.add_argument("--eval", action="store_true",
                   help="then compare the healed model's perplexity with the dense one's")
    h.add_argument("--json", action="store_true", help="print a JSON summary on stdout")

    e = sub.add_parser("eval", help="perplexity of a model (svdzip directory, alias, local dir or hub id)")
    e.add_argument("model", nargs="+", help="one or more models to compare")
    e.add_argument("--device", default="cpu")
    e.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="compute dtype the models are loaded in (default: %(default)s); bfloat16 on a CPU runs "
                        "low-bit weights through torch's int4 kernel instead of dequantizing them per forward")
    _add_eval_args(e)
    _add_task_speed_args(e)
    e.add_argument("--json", action="store_true")

    w = sub.add_parser("sweep", help="methods × ratios × models → results.json, results.md and plots (resumable)")
    w.add_argument("--models", default="smollm2-135m",
                   help="comma-separated models: aliases (smollm2-135m, gemma3-270m, qwen2.5-0.5b, qwen2.5-1.5b), "
                        "directories or hub ids (default: %(default)s)")
    w.add_argument("--methods", default="svdllm",
                   help="comma-separated method specs, e.g. svd,svdllm,svdllm+drank,svdllm+share2,svdllm+update")
    w.add_argument("--ratios", default="0.2,0.4,0.6", help="fractions removed, comma-separated (default: %(default)s)")
    w.add_argument("--corpora", default="wiki,austen",
                   help="perplexity corpora: wiki, austen, code or .txt paths (default: %(default)s)")
    w.add_argument("--eval-tokens", type=int, default=16384, help="evaluation tokens per corpus (0 = all)")
    w.add_argument("--seq-len", type=int, default=2048, help="perplexity window (default: %(default)s)")
    w.add_argument("--metric", default="acc", choices=["acc", "acc_norm"], help="zero-shot column of the table")
    w.add_argument("--corpus", default="wiki", help="calibration corpus: wiki, austen, code, mix (wiki + other "
                   "tasks' text) or a .txt path (default: %(default)s)")
    w.add_argument("--calib-samples", type=int, default=64)
    w.add_argument("--calib-seq-len", type=int, default=512)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--device", default="cpu")
    _add_task_speed_args(w)
    w.add_argument("--out", required=True, help="results directory (reused: finished cells are not recomputed)")
    w.add_argument("--readme", help="also write the table and plots into this Markdown file, between the lines "
                   "'<!-- sweep:start -->' and '<!-- sweep:end -->'")

    i = sub.add_parser("info", help="what a compressed directory holds: ranks per layer and type, sizes")
    i.add_argument("dir", nargs="?", help="a directory written by `svdzip compress`")
    i.add_argument("--modules", action="store_true", help="list every module")
    i.add_argument("--allocators", action="store_true", help="list the registered allocators")
    i.add_argument("--json", action="store_true")
    return parser


def _protocols(name: str) -> tuple[str, ...]:
    return ("svdllm", "hf_stride") if name == "both" else (name,)


def _ppl_rows(label: str, results: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {f"{corpus}/{proto}": r.ppl for corpus, by in results.items() for proto, r in by.items()}


def recipe_from_args(args: argparse.Namespace):
    """The recipe the flags ask for: the --recipe file (or `Recipe`'s defaults), then every flag given on top."""
    from dataclasses import replace

    from svdzip.budget import ratio_from_kept
    from svdzip.recipe import Recipe

    base = Recipe.load(args.recipe) if args.recipe else Recipe()
    given = _given(args, RECIPE)
    memory = args.budget_bytes is not None or "budget_fraction" in given
    if memory and ("ratio" in given or args.kept is not None):
        raise SvdzipError("give either a parameter ratio (--ratio/--kept) or a memory budget "
                          "(--budget-bytes/--budget-fraction), not both")
    if args.budget_bytes is not None and "budget_fraction" in given:
        raise SvdzipError("give --budget-bytes or --budget-fraction, not both")
    if given.get("quantize") == "none":
        given["quantize"] = None
    if given.get("quantize") in ("int4", "int3", "int2") and ("ratio" in given or args.kept is not None):
        raise SvdzipError(f"--quantize {given['quantize']} stores every matrix whole at that width: a parameter ratio "
                          "does not apply (give a memory budget to let the planner add compensations or factorise)")
    if args.kept is not None:
        given["ratio"] = ratio_from_kept(args.kept)
    if "ratio" in given:  # a ratio given on the command line replaces a recipe file's memory budget
        given.update(budget_bytes=None, budget_fraction=None)
    if memory:
        given.update(budget_bytes=parse_bytes(args.budget_bytes), budget_fraction=given.get("budget_fraction"))
    if args.params_first:
        if not (memory or base.memory_budget):
            raise SvdzipError("--params-first only applies to a memory budget (--budget-bytes/--budget-fraction)")
        given["byte_aware"] = False
    if args.paper_calibration:
        given["calib_samples"], given["calib_seq_len"] = PAPER_CALIBRATION
    options = {**(base.allocator_options if "allocator" not in given else {}),
               **dict(_parse_option(o) for o in args.allocator_option)}
    if args.tune_beta:
        allocator = given.get("allocator", base.allocator)
        if allocator not in ("auto", "uniform", "drank"):
            raise SvdzipError(f"--tune-beta tunes D-Rank's β; it does not apply to --allocator {allocator}")
        given["allocator"], options["tune_beta"] = "drank", True
    healing = _given(args, HEALING)
    if "lr" in healing:  # an explicit learning rate is used as it is (HealConfig derives auto_lr from it)
        healing["auto_lr"] = None
    recipe = replace(base, **given, allocator_options=options,
                     healing=replace(base.healing, **healing) if healing else base.healing)
    from svdzip.output.loading import check_device

    return replace(recipe, device=check_device(args.device)).validate()


def cmd_compress(args: argparse.Namespace) -> dict[str, Any]:
    recipe = recipe_from_args(args)
    from svdzip.engine.driver import CompressRequest, run

    request = CompressRequest(
        model=args.model, recipe=recipe, out=Path(args.out), overwrite=args.overwrite,
        stream=True if args.stream else (None if _wants_scaled(args) else False),
        resume_dir=Path(args.resume_dir) if args.resume_dir else None, restart=args.restart,
        stats_path=args.stats, plots=not args.no_plots,
    )
    result = run(request)
    if result is None:  # a torchrun rank other than 0: rank 0 writes and reports
        args.json = False
        return {}
    summary = {**result.summary, "peak_rss_bytes": _peak_rss(), "dense_size_bytes": _dense_size(args.model),
               "recipe": result.recipe.to_file_dict()}
    budget = summary.get("memory", {}).get("budget_bytes")
    if budget is not None and summary.get("weight_bytes_in_memory", 0) > budget:
        log.warning("weights take %d bytes in memory, over the budget of %d (planned %d)",
                    summary["weight_bytes_in_memory"], budget, summary["memory"]["planned_bytes"])
    _log_compress_report(result, summary)
    if args.eval:
        summary["evaluation"] = _eval_dense_vs_compressed(args, summary.get("source", args.model), request.out)
    return summary


def _wants_scaled(args: argparse.Namespace) -> bool:
    """--stream, --resume-dir or torchrun (WORLD_SIZE > 1): the runs whose point is not holding the whole model."""
    return bool(args.stream or args.resume_dir or int(os.environ.get("WORLD_SIZE", "1")) > 1)


def parse_bytes(text: str | None) -> int | None:
    """'80000000', '80MB', '64MiB', '1.5G' → bytes (decimal for kB/MB/GB, binary for KiB/MiB/GiB)."""
    if text is None:
        return None
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?)(i?)[bB]?\s*", str(text))
    if not m:
        raise SvdzipError(f"--budget-bytes must be a number of bytes such as 80000000, 80MB or 64MiB, got '{text}'")
    base = 1024 if m.group(3) else 1000
    power = {"": 0, "k": 1, "m": 2, "g": 3}[m.group(2).lower()]
    value = int(float(m.group(1)) * base**power)
    if value <= 0:
        raise SvdzipError(f"--budget-bytes must be positive, got '{text}'")
    return value


def cmd_heal(args: argparse.Namespace) -> dict[str, Any]:
    from dataclasses import replace

    from svdzip.engine.driver import heal_check, warn_if_stopped
    from svdzip.output import io
    from svdzip.output.loading import check_device, parse_dtype
    from svdzip.recover.directory import heal_directory, teacher_source

    config = _heal_config(args, args.corpus or _default_heal_corpus(Path(args.dir)), check_device(args.device))
    out = Path(args.out)
    manifest = io.read_manifest(args.dir)
    if manifest is None:
        raise SvdzipError(f"{args.dir} is a dense model directory: compress it first (`svdzip compress`)")
    teacher = teacher_source(manifest, args.teacher)
    t0 = time.perf_counter()
    report, out = heal_directory(args.dir, out, config, teacher=teacher, resume_dir=args.resume_dir,
                                 overwrite=args.overwrite, dtype=parse_dtype(args.dtype), fit=heal_check(teacher))
    warn_if_stopped(report)
    _carry_recipe(Path(args.dir), out, replace(config, precision=report.config["precision"]))  # as the check chose
    healed = io.read_manifest(out)["details"]
    summary = {**healed.get("summary", {}), "out": str(out), "seconds_total": round(time.perf_counter() - t0, 2),
               "heal": report.to_dict(), "size_bytes": io.dir_size(out), "peak_rss_bytes": _peak_rss()}
    phases = [p for p in report.phases if "best_heldout" in p]
    log.info("%s: %s in %.0f s (%s); held-out loss %s; lr %s; peak RSS %.1f GiB; saved to %s%s", args.dir,
             report.method, report.seconds, report.stopped,
             ", ".join(f"{p['initial_heldout']:.4f} → {p['best_heldout']:.4f}" for p in phases),
             ", ".join(f"{p['lr_final']:.3g}" for p in phases), summary["peak_rss_bytes"] / 2**30, out,
             "" if report.improved else " (not improved: the un-healed factors)")
    if args.eval:
        summary["evaluation"] = _eval_dense_vs_compressed(args, teacher, out)
    return summary


def _default_heal_corpus(src: Path) -> str:
    """The directory's own calibration corpus (its recipe.yaml; wiki when it has none), as the default heal uses it."""
    from svdzip.recipe import RECIPE_FILE, Recipe
    from svdzip.recover.config import default_corpus

    return default_corpus(Recipe.load(src / RECIPE_FILE).corpus if (src / RECIPE_FILE).is_file() else "wiki")


def _carry_recipe(src: Path, out: Path, heal_config) -> None:
    """The healed directory's recipe: its source's, with this recovery (a directory without one gets none)."""
    from dataclasses import replace

    from svdzip.recipe import RECIPE_FILE, Recipe

    if (src / RECIPE_FILE).is_file():
        recipe = Recipe.load(src / RECIPE_FILE)
        replace(recipe, heal=heal_config.method, healing=heal_config).save(out / RECIPE_FILE)


def _dense_size(model: str) -> int:
    from svdzip.assets import resolve_model
    from svdzip.output.io import dir_size

    path = Path(str(resolve_model(model)))
    return dir_size(path) if path.is_dir() else 0


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _log_compress_report(result, summary: dict[str, Any]) -> None:
    from svdzip.report.tables import human_bytes, module_table, rank_grid, role_summary, table

    rows = result.modules
    log.debug("per-matrix report:\n%s", module_table(rows))
    headers, body = role_summary(rows)
    log.info("per-type report:\n%s", table(headers, body))
    headers, body = rank_grid(rows)
    log.info("ranks per layer and type ('dense' = kept dense):\n%s", table(headers, body))
    if summary.get("memory"):
        mem = summary["memory"]
        log.info("memory budget %s (%.1f%% of the dense bf16 weights %s): planned %s, in memory %s, on disk %s",
                 human_bytes(mem["budget_bytes"]), 100 * mem["budget_bytes"] / mem["reference_bytes"],
                 human_bytes(mem["reference_bytes"]), human_bytes(mem["planned_bytes"]),
                 human_bytes(summary["weight_bytes_in_memory"]), human_bytes(summary["size_bytes"]))
    asked = summary["ratio_requested"]
    params = (f"; model {summary['model_params_before']:,} → {summary['model_params_after']:,} parameters"
              if "model_params_after" in summary else "")
    log.info(
        "%s%s: removed %.2f%% of decoder-linear parameters (asked %s), %d dense modules%s; %s on disk (dense %s); "
        "%.1f s with %d process(es)",
        summary["method"], " (streamed)" if summary.get("streamed") else "", 100 * summary["ratio_achieved"],
        "a memory budget" if asked is None else f"{100 * asked:.2f}%", summary["dense_modules"], params,
        human_bytes(summary["size_bytes"]), human_bytes(summary["dense_size_bytes"]), summary["seconds_total"],
        summary.get("world_size", 1),
    )


def _eval_dense_vs_compressed(args: argparse.Namespace, source: str, out: Path) -> dict[str, Any]:
    from svdzip.assets import resolve_model
    from svdzip.evaluate.perplexity import perplexity_on_corpora
    from svdzip.output import io
    from svdzip.output.loading import load_model

    corpora, protocols = _corpora(args.corpora), _protocols(args.protocol)
    max_tokens = args.eval_tokens or None
    report: dict[str, Any] = {}
    source = str(resolve_model(source))  # an alias names the converted directory (its size is reported)
    for label, path in (("dense", source), ("compressed", str(out))):
        t0 = time.perf_counter()
        model, tokenizer, _ = load_model(path, args.device)
        results = perplexity_on_corpora(model, tokenizer, corpora, protocols, args.seq_len, max_tokens,
                                        args.device, label=label)
        report[label] = {
            "params": sum(p.numel() for p in model.parameters()),
            "size_bytes": io.dir_size(path) if Path(path).is_dir() else None,
            "perplexity": {c: {p: r.to_dict() for p, r in by.items()} for c, by in results.items()},
            "eval_seconds": round(time.perf_counter() - t0, 1),
        }
        del model
    return report


def _print_eval_table(summary: dict[str, Any]) -> None:
    from svdzip.report.tables import human_bytes, table

    ev = summary["evaluation"]
    cols = [f"{c} ppl ({p})" for c, by in ev["dense"]["perplexity"].items() for p in by]
    rows = []
    for label in ("dense", "compressed"):
        r = ev[label]
        ppl = [v["ppl"] for by in r["perplexity"].values() for v in by.values()]
        rows.append([label if label == "dense" else summary["method"], f"{r['params']:,}",
                     human_bytes(r["size_bytes"] or 0), *ppl, r["eval_seconds"]])
    print(table(["model", "params", "on disk", *cols, "eval s"], rows))
    first = next(iter(ev["dense"]["perplexity"].values()))
    any_r = next(iter(first.values()))
    print(f"\nremoved {100 * summary['ratio_achieved']:.2f}% of decoder-linear parameters "
          f"(asked {_asked(summary)}); compression took {summary['seconds_total']:.0f} s; "
          f"perplexity over {any_r['tokens_evaluated']} tokens per corpus in windows of {any_r['seq_len']}.")


def _asked(summary: dict[str, Any]) -> str:
    asked = summary["ratio_requested"]
    if asked is None:
        mem = summary["memory"]
        return f"a memory budget of {100 * mem['budget_bytes'] / mem['reference_bytes']:.0f}% of dense bf16 weights"
    return f"{100 * asked:.0f}%"


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from svdzip.evaluate.perplexity import perplexity_on_corpora
    from svdzip.output.loading import check_device, load_model, parse_dtype
    from svdzip.report.tables import table

    check_device(args.device)
    if args.limit is not None and args.limit < 1:
        raise SvdzipError(f"--limit must be ≥ 1 documents per task (leave it out for all of them), got {args.limit}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    corpora, protocols = _corpora(args.corpora), _protocols(args.protocol)
    tasks = _tasks(args.tasks)
    report: dict[str, Any] = {}
    zero_shot: dict[str, Any] = {}
    for name in args.model:
        model, tokenizer, _ = load_model(name, args.device, parse_dtype(args.dtype))
        results = perplexity_on_corpora(model, tokenizer, corpora, protocols, args.seq_len,
                                        args.eval_tokens or None, args.device, label=name)
        report[name] = {c: {p: r.to_dict() for p, r in by.items()} for c, by in results.items()}
        if tasks:
            from svdzip.evaluate.zeroshot import evaluate_zero_shot

            zero_shot[name] = evaluate_zero_shot(model, tokenizer, tasks, limit=args.limit,
                                                 batch_size=args.zs_batch_size, device=args.device)
        del model
    if not args.json and corpora:
        cols = [f"{c} ({p})" for c in corpora for p in protocols]
        rows = [[name, *(report[name][c][p]["ppl"] for c in corpora for p in protocols)] for name in args.model]
        print(table(["model", *cols], rows))
    if tasks:
        report["zero_shot"] = zero_shot
        if not args.json:
            rows = [[name, *(zero_shot[name][t]["acc"] for t in tasks),
                     sum(zero_shot[name][t]["acc"] for t in tasks) / len(tasks), zero_shot[name][tasks[0]]["n"]]
                    for name in args.model]
            print(table(["model (acc)", *tasks, "average", "n"], rows))
    if args.speed:
        report["speed"] = _eval_speed(args)
    return report


def _eval_speed(args: argparse.Namespace) -> dict[str, Any]:
    """All models loaded together and timed alternately; ratios to the first one given."""
    from svdzip.evaluate.speed import measure_speed, parse_settings, speed_table
    from svdzip.output.loading import load_model, parse_dtype

    models = {name: load_model(name, args.device, parse_dtype(args.dtype))[0] for name in args.model}
    settings = parse_settings(args.speed_batches, args.speed_seq_lens, args.speed_new_tokens)
    result = measure_speed(models, settings, repeats=args.speed_repeats, reference=args.model[0], clock=args.clock)
    if not args.json:
        print(f"\nspeed ({result['clock']} clock, {result['threads']} threads, median of {result['repeats']}; "
              f"ratios to {args.model[0]}):")
        print(speed_table(result))
    return result


def cmd_sweep(args: argparse.Namespace) -> dict[str, Any]:
    from svdzip.output.loading import check_device
    from svdzip.sweep import SweepSpec, check_readme, run_sweep, update_readme

    if args.readme:
        check_readme(args.readme)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    spec = SweepSpec(
        models=[m for m in args.models.split(",") if m], methods=[m for m in args.methods.split(",") if m],
        ratios=[float(r) for r in args.ratios.split(",") if r], corpora=_corpora(args.corpora),
        eval_tokens=args.eval_tokens, seq_len=args.seq_len, tasks=_tasks(args.tasks), limit=args.limit,
        zs_batch_size=args.zs_batch_size, speed=args.speed, speed_batches=_ints(args.speed_batches),
        speed_seq_lens=_ints(args.speed_seq_lens), speed_new_tokens=args.speed_new_tokens,
        speed_repeats=args.speed_repeats, speed_clock=args.clock, calib_corpus=args.corpus,
        calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, seed=args.seed,
        device=check_device(args.device), metric=args.metric,
    )
    data = run_sweep(spec, args.out)
    if args.readme:
        update_readme(args.readme, args.out)
    if not args.json:
        print((Path(args.out) / "results.md").read_text())
    return data


def cmd_info(args: argparse.Namespace) -> dict[str, Any]:
    from svdzip.allocate import available
    from svdzip.output import io
    from svdzip.report.tables import human_bytes, rank_grid, table

    if args.allocators:
        names = available()
        if not args.json:
            print("\n".join(names))
        return {"allocators": names}
    if not args.dir:
        raise SvdzipError("svdzip info needs a directory (or --allocators)")
    manifest = io.read_manifest(args.dir)
    if manifest is None:
        raise SvdzipError(f"{args.dir} is a dense model directory, not one written by svdzip")
    details = manifest.get("details", {})
    summary = details.get("summary", {})
    report_path = Path(args.dir) / "svdzip_report.json"
    modules = []
    if report_path.is_file():
        modules = json.loads(report_path.read_text()).get("modules", [])
    info = {"method": manifest.get("method"), "ratio": manifest.get("ratio"),
            "quantization": {k: v for k, v in (manifest.get("quantization") or {}).items() if k != "modules"} or None,
            "ratio_convention": manifest.get("ratio_convention"), "svdzip_version": manifest.get("svdzip_version"),
            "size_bytes": io.dir_size(args.dir), "summary": summary, "factorised_modules": len(manifest["modules"]),
            "lowbit": _lowbit_counts(manifest.get("lowbit")), "slimmed_modules": len(manifest.get("slimmed") or {})}
    if not args.json:
        at = "a memory budget" if info["ratio"] is None else f"ratio {info['ratio']} ({info['ratio_convention']})"
        print(f"{args.dir}: {info['method']} at {at}, "
              f"svdzip {info['svdzip_version']}, {human_bytes(info['size_bytes'])} of weights")
        q = manifest.get("quantization")
        if q:
            print(f"{q['precision']} weight-only ({q['backend']} {q.get('backend_version', '')}, scope {q['scope']}) "
                  f"for {len(q['modules'])} linears; the rest {q['dtype']}")
        if info["lowbit"]:
            low = info["lowbit"]
            print(f"low-bit weights ({low['backend']} {low['backend_version']}, packed): "
                  + ", ".join(f"{n} at {b}" for b, n in low["bits"].items())
                  + f"; {low['compensated']} with a compensation (total rank {low['compensation_rank']}); "
                  "per layer below: '4b+r12' = 4 bits with a rank-12 correction")
        if info["slimmed_modules"]:
            print(f"{info['slimmed_modules']} linears slimmed (MoDeGPT): per layer below, 'w1024' = an MLP of 1024 "
                  "neurons, or attention heads keeping 48 of their dimensions")
        if summary.get("memory"):
            mem = summary["memory"]
            print(f"memory budget {human_bytes(mem['budget_bytes'])} "
                  f"({100 * mem['budget_bytes'] / mem['reference_bytes']:.1f}% of the dense bf16 weights), "
                  f"planned {human_bytes(mem['planned_bytes'])}")
        if summary:
            print(f"decoder-linear parameters {summary['decoder_linear_params_before']:,} → "
                  f"{summary['decoder_linear_params_after']:,} (removed {100 * summary['ratio_achieved']:.2f}%); "
                  f"model {summary['model_params_before']:,} → {summary['model_params_after']:,}")
        if modules:
            headers, rows = rank_grid(modules)
            print("\nranks per layer and type ('dense' = kept dense):")
            print(table(headers, rows))
            if args.modules:
                from svdzip.report.tables import module_table

                print(module_table(modules))
    info["modules"] = modules
    return info


COMMANDS = {"compress": cmd_compress, "heal": cmd_heal, "eval": cmd_eval, "info": cmd_info, "sweep": cmd_sweep}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "urllib3", "filelock", "httpx", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        result = COMMANDS[args.command](args)
    except SvdzipError as exc:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank refuses alike; one says so
            print(f"svdzip: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("svdzip: interrupted; nothing was written to the output directory", file=sys.stderr)
        return 130
    except OSError as exc:  # a file system error no stage turned into its own message: one line, not a traceback
        if args.verbose:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"svdzip: error: {exc.strerror or exc}{where} (-v shows where it happened)", file=sys.stderr)
        return 1
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, default=str))
    elif args.command in ("compress", "heal") and "evaluation" in result:
        _print_eval_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
