"""The options of a recovery run (`--heal …` flags map onto them one to one)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from svdzip.core.precision import PRECISIONS, compute_dtype, dtype_name
from svdzip.errors import SvdzipError

HEAL_METHODS = ("distill", "seq-lora", "layerwise")
OBJECTIVES = ("kl", "ce", "mse")
ORDERS = ("u-first", "v-first")
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    # Recoveries that train the model's own weights start their learning-rate search at `lr_per_rms` × the
    # median RMS of the weights they train (`HealConfig.start_lr`): AdamW moves every weight by about lr a step,
    # so the same relative step needs rates as far apart as the weights' scales (the dense linears' RMS is
    # 0.19 on SmolLM2-135M, 0.017 on Qwen2.5-0.5B, 0.035 on Gemma-3-270M).
    # distillation trains every factor directly: lr 3e-4 was measured best over 1e-4..1e-3 on SmolLM2-135M,
    # whose factors' median RMS is 0.117 at 20 % removed (3e-4 / 0.117 = 2.57e-3); on Qwen2.5-0.5B a fixed 3e-4
    # raised the held-out KL and the search fell back to 3.3e-5
    "distill": {"lr_per_rms": 2.57e-3, "objective": "kl", "steps": 40},
    # SVD-LLM §3.3 / LLM-Pruner's recipe: LoRA r=8, α=16, dropout 0.05, lr 1e-4, next-token cross-entropy (the
    # adapters start at zero or at random: their scale says nothing about the rate)
    "seq-lora": {"lr": 1e-4, "objective": "ce", "steps": 40},
    # each layer's factors against its dense output on the calibration windows (`recover.layerwise`): the
    # per-token relative error of the layer's output; `steps` are per layer. Measured on SmolLM2-135M at 20 %
    # (benchmarks/results/layerwise_lr.md): lr 1e-3 beat 1e-4 and 3e-3; 40 steps a layer gain a little more
    # than 10 at four times the training, and 10 keep a 1.5B model's streamed run within its time target
    # The start comes from the first healed layer's factors (the next layer starts at the rate that last worked):
    # 1e-3 / 0.0858, the median RMS of SmolLM2-135M's layer-0 factors at 20 % = 1.17e-2 (on Qwen2.5-1.5B a fixed
    # 1e-3 made every layer worse and 1.1e-4 healed 27 of 28)
    "layerwise": {"lr_per_rms": 1.17e-2, "objective": "mse", "steps": 10},
}
#: recoveries that need only one decoder layer at a time: they run streamed and under torchrun
LAYER_LOCAL = ("layerwise",)


def default_corpus(calibration: str) -> str:
    """The healing text when none is named: `mix` (wiki's calibration passages with ten other tasks' text) where the
    run calibrates on the default `wiki` — measured on two models, it heals as well on wiki and 3–4 % better on text
    of other domains (README, "Healing on a broader text") — else the corpus the user chose for its domain."""
    return "mix" if calibration == "wiki" else calibration


@dataclass
class HealConfig:
    """What to train, on which calibration windows, for how long.

    `steps` counts optimiser steps (each `batch_size × grad_accum` windows of `seq_len` tokens); for
    sequential LoRA they are split evenly between its two phases. Training windows and held-out windows
    are disjoint draws from the calibration part of `corpus`, never its evaluation part.

    `method` "auto" (the default) is a set of options for whichever recovery a recipe names: what is left
    None (steps, lr, objective) then takes that recovery's defaults (`Recipe.heal_config`). Training needs
    a named method.
    """

    method: str = "auto"
    steps: int | None = None  # None: the method's default (METHOD_DEFAULTS: distill 40, ~5 CPU-minutes on SmolLM2)
    # None: searched downwards (auto_lr) from the method's start (METHOD_DEFAULTS): a fixed rate, or (lr left None)
    # lr_per_rms × the median RMS of the trained weights (`start_lr`)
    lr: float | None = None
    lr_per_rms: float | None = None
    # True: `lr` is only where the search starts; a held-out check no better than the best so far rolls the
    # factors back to the best and divides the learning rate by `lr_backoff`, at most `max_backoffs` times.
    # None: True unless `lr` is given (an explicit learning rate is used as it is)
    auto_lr: bool | None = None
    lr_backoff: float = 3.0
    max_backoffs: int = 3
    objective: str | None = None  # kl (teacher's next-token distribution) | ce (the text's next token)
    warmup: float = 0.1  # fraction of the steps with a linear warm-up; cosine decay to 0 after it
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 1  # windows per micro-batch; 4 accumulated: the same 4-window step, a quarter of the activations
    grad_accum: int = 4
    seq_len: int = 256
    train_samples: int = 256  # distinct training windows (epochs cycle through them)
    heldout_samples: int = 8  # held-out calibration windows for early stopping
    eval_every: int = 10  # a check reads the 8 held-out windows forward, a step 4 windows forward and backward
    patience: int = 2  # evaluations without improvement before stopping
    temperature: float = 1.0
    topk: int = 64  # teacher kept as its top-k log-probabilities + tail mass; 0 = full distribution
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    order: str = "u-first"
    corpus: str | None = None  # None: `default_corpus` of the run's calibration corpus (of wiki when healing alone)
    # the matmuls of distillation and sequential LoRA (student and teacher): "auto" = bfloat16 autocast where the
    # device multiplies bf16 natively (`core.precision.native_bf16`), else float32; weights and AdamW stay float32.
    # Layer-wise healing trains in float32
    precision: str = "auto"
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.lr == "auto":
            self.lr = None
        if self.auto_lr is None:
            self.auto_lr = self.lr is None
        if self.method in METHOD_DEFAULTS:
            defaults = METHOD_DEFAULTS[self.method]
            if self.lr is not None or "lr_per_rms" not in defaults:  # a rate given, or one for every model
                self.lr, self.lr_per_rms = defaults["lr"] if self.lr is None else self.lr, None
            elif self.lr_per_rms is None:
                self.lr_per_rms = defaults["lr_per_rms"]
            self.objective = defaults["objective"] if self.objective is None else self.objective
            self.steps = defaults["steps"] if self.steps is None else self.steps

    def validate(self) -> HealConfig:
        if self.method not in HEAL_METHODS:
            raise SvdzipError(f"unknown recovery '{self.method}'; name one of {', '.join(HEAL_METHODS)}")
        if self.objective not in OBJECTIVES:
            raise SvdzipError(f"unknown heal objective '{self.objective}'; choose from {', '.join(OBJECTIVES)}")
        if self.precision not in PRECISIONS:
            raise SvdzipError(f"unknown heal precision '{self.precision}'; choose from {', '.join(PRECISIONS)}")
        if self.order not in ORDERS:
            raise SvdzipError(f"unknown sequential-LoRA order '{self.order}'; choose from {', '.join(ORDERS)}")
        positive = ("steps", "batch_size", "grad_accum", "train_samples", "heldout_samples", "eval_every",
                    "patience", "lora_r")
        for name in positive:
            if getattr(self, name) < 1:
                raise SvdzipError(f"heal {name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")
        if (self.objective == "mse") != (self.method in LAYER_LOCAL):
            raise SvdzipError("the mse objective is layer-wise healing's (each layer against its dense output), and "
                              f"layer-wise healing has no other; --heal {self.method} cannot use '{self.objective}'")
        if self.method == "seq-lora" and self.steps < 2:
            raise SvdzipError("sequential LoRA needs at least 2 steps (one per phase)")
        if self.seq_len < 2:
            raise SvdzipError(f"heal seq-len must be ≥ 2, got {self.seq_len}")
        if self.lr is not None and not self.lr > 0:
            raise SvdzipError(f"heal learning rate must be > 0, got {self.lr}")
        if self.lr is None and not (self.lr_per_rms is not None and self.lr_per_rms > 0):
            raise SvdzipError(f"heal learning rate per weight RMS (lr_per_rms) must be > 0, got {self.lr_per_rms}")
        if self.lr_backoff <= 1 or self.max_backoffs < 0:
            raise SvdzipError(f"heal lr back-off must be > 1 and its count ≥ 0, got {self.lr_backoff} and "
                              f"{self.max_backoffs}")
        if not 0 <= self.warmup < 1:
            raise SvdzipError(f"heal warm-up is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.temperature <= 0:
            raise SvdzipError(f"distillation temperature must be > 0, got {self.temperature}")
        if self.topk < 0:
            raise SvdzipError(f"heal top-k must be ≥ 0 (0 = full teacher distribution), got {self.topk}")
        if not 0 <= self.lora_dropout < 1:
            raise SvdzipError(f"LoRA dropout must be in [0, 1), got {self.lora_dropout}")
        if self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise SvdzipError("heal weight decay must be ≥ 0 and max grad norm > 0")
        return self

    def start_lr(self, weights: Iterable[torch.Tensor]) -> float:
        """The learning rate training starts at: `lr` when set, else `lr_per_rms` × the median RMS of `weights`
        (the tensors to train, before training), so that a step moves the weights by the same fraction on
        models whose weights differ tenfold in scale."""
        if self.lr is not None:
            return float(self.lr)
        rms = [float(w.detach().float().pow(2).mean().sqrt()) for w in weights if w.numel()]
        scale = float(torch.tensor(rms).median()) if rms else 0.0
        if not (math.isfinite(scale) and scale > 0):
            raise SvdzipError(f"no learning rate from the trained weights' scale (median RMS {scale:g} over {len(rms)} "
                              "weights): nothing to train, or weights of zeros; give --heal-lr")
        return self.lr_per_rms * scale

    def compute_dtype(self) -> torch.dtype:
        """The dtype of the training matmuls on this config's device (`precision` resolved)."""
        return compute_dtype(self.device, self.precision)

    def resolved_precision(self) -> str:
        """`compute_dtype` by name ("float32" | "bfloat16"), as reports and results record it."""
        return dtype_name(self.compute_dtype())

    @property
    def layer_local(self) -> bool:
        """Needs only one decoder layer at a time (runs inside the layer walk, streamed or in memory)."""
        return self.method in LAYER_LOCAL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint depends on (the device does not change the run's result on resume)."""
        # the precision as resolved: a resume on a device that would multiply otherwise is a different run
        return {**{k: v for k, v in self.to_dict().items() if k != "device"}, "precision": self.resolved_precision()}
