"""heal(): recover what truncation lost, by distillation into the factors or SVD-LLM's sequential LoRA.

Both train on windows of the calibration corpus only (never its evaluation part) and stop early on
held-out calibration windows; both leave an ordinary svdzip model at the same ranks. The learning rate
is found on those held-out windows unless one is given (`trainer.Backoff`); a heal that does not lower
the held-out loss below step 0's keeps the un-healed factors and says so (`HealReport.improved`).

* ``distill`` trains every low-rank factor itself (they are already small: no adapter is needed)
  to match the dense teacher's next-token distribution (KL, `losses.py`).
* ``seq-lora`` is SVD-LLM's recipe (`seq_lora.py`): LoRA from peft on the left factors, merged, then
  on the right factors, merged; the paper's objective is the text's next token (`objective=ce`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from svdzip.core.checkpoint import release_memory
from svdzip.core.precision import autocast_for, frozen_linears_in, frozen_linears_to
from svdzip.errors import SvdzipError
from svdzip.models.lowrank import LowRankLinear
from svdzip.models.sliced import slimmed_modules
from svdzip.recover.config import HealConfig, default_corpus
from svdzip.recover.losses import TopK, kl_full, kl_topk, next_token_ce, topk_of
from svdzip.recover.seq_lora import factor_targets, lora_on, low_rank_modules, phase_sides
from svdzip.recover.trainer import Backoff, Checkpoint, TrainResult, batch_order, train

log = logging.getLogger(__name__)


@dataclass
class HealReport:
    method: str
    config: dict[str, Any]
    phases: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = "completed"
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    trained_params: int = 0
    initial_heldout: float | None = None  # held-out loss at step 0 (the un-healed model)
    final_heldout: float | None = None  # held-out loss of the factors kept
    improved: bool = False  # False: the un-healed factors were kept, and the label does not claim a heal
    lr_auto: bool = False  # the learning rate was searched on the held-out windows
    lr: float | None = None  # the peak learning rate in force at the end (the last trained phase's)
    backoffs: int = 0  # learning-rate back-offs over all phases (each phase's are in `phases`)
    precision: str = "float32"  # the training matmuls' dtype (`HealConfig.precision` resolved on the device)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def brief(self) -> dict[str, Any]:
        """What a run summary shows of the heal."""
        return {"improved": self.improved, "heldout_step0": self.initial_heldout, "heldout_final": self.final_heldout,
                "lr": self.lr, "lr_auto": self.lr_auto, "backoffs": self.backoffs, "stopped": self.stopped,
                "precision": self.precision,
                "heldout_curve": [[h["step"], round(h["heldout"], 5)] for p in self.phases
                                  for h in p.get("history", ())]}


def load_teacher(source: str, config: HealConfig) -> nn.Module | None:
    """The dense model the kl objective distils from (None for ce, which needs none). Pass the result straight
    into `heal()` without keeping a name for it, so that heal() can free it once its top-k are cached."""
    if config.objective != "kl":
        return None
    from svdzip.output.loading import load_model

    return load_model(source, config.device)[0]


def heal_windows(tokenizer, config: HealConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint training and held-out windows, both from the calibration part of `config.corpus`."""
    from svdzip.data import calibration_tokens, load_corpus

    tokens = calibration_tokens(tokenizer, load_corpus(config.corpus or default_corpus("wiki")),
                                config.train_samples + config.heldout_samples, config.seq_len, config.seed)
    return tokens[: config.train_samples], tokens[config.train_samples :]


def state_digest(model: nn.Module) -> str:
    """A hash of every parameter: a checkpoint is only resumed onto the model it was trained from."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


class Objective:
    """The loss on a batch of window indices and on the held-out windows, teacher outputs cached lazily.

    With top-k the teacher runs once per distinct window (the cache holds k values per token); with
    the full distribution it runs on every batch, since 49k–262k floats per token do not fit a cache.
    """

    def __init__(self, teacher: nn.Module | None, train_windows: torch.Tensor, heldout: torch.Tensor,
                 config: HealConfig):
        if config.objective == "kl" and teacher is None:
            raise SvdzipError("the kl objective needs the dense teacher model")
        self.teacher, self.train_windows, self.heldout, self.config = teacher, train_windows, heldout, config
        self.dtype = config.compute_dtype()
        self._cache: dict[tuple[str, int], TopK] = {}

    @property
    def caches_teacher(self) -> bool:
        return self.config.objective == "kl" and bool(self.config.topk)

    @torch.no_grad()
    def precompute(self, train_indices: list[int]) -> None:
        """The teacher's top-k on every window the training will read and on the held-out ones, then the
        teacher is let go: a heal holds one model, not two, while it trains (2.5 GB on Qwen2.5-0.5B)."""
        todo = [("heldout", i) for i in range(len(self.heldout))] + [("train", i) for i in sorted(set(train_indices))]
        b = self.config.batch_size
        for start in tqdm(range(0, len(todo), b), desc="teacher top-k", unit="batch"):
            chunk = todo[start : start + b]
            for split in ("heldout", "train"):
                idx = [i for s, i in chunk if s == split]
                if idx:
                    self._teacher_topk(split, self.heldout if split == "heldout" else self.train_windows, idx)
        self.teacher = None

    @torch.no_grad()
    def _teacher_topk(self, split: str, windows: torch.Tensor, indices: list[int]) -> TopK:
        missing = [i for i in indices if (split, i) not in self._cache]
        if missing:
            if self.teacher is None:
                raise SvdzipError(f"internal: the teacher was released, but {split} window {missing[0]} has no "
                                  "precomputed top-k")
            with autocast_for(self.config.device, self.dtype):
                logits = self.teacher(input_ids=windows[missing].to(self.config.device), use_cache=False).logits
            top = topk_of(logits, self.config.topk, self.config.temperature).to("cpu")
            for j, i in enumerate(missing):
                self._cache[(split, i)] = top[j]
        parts = [self._cache[(split, i)] for i in indices]
        return TopK(torch.stack([p.logp for p in parts]), torch.stack([p.ids for p in parts]),
                    torch.stack([p.tail for p in parts])).to(self.config.device)

    def loss(self, student: nn.Module, split: str, indices: list[int]) -> torch.Tensor:
        windows = self.train_windows if split == "train" else self.heldout
        ids = windows[indices].to(self.config.device)
        logits = student(input_ids=ids, use_cache=False).logits
        if self.config.objective == "ce":
            return next_token_ce(logits, ids)
        if self.config.topk:
            return kl_topk(logits, self._teacher_topk(split, windows, indices), self.config.temperature)
        with torch.no_grad(), autocast_for(self.config.device, self.dtype):
            teacher_logits = self.teacher(input_ids=ids, use_cache=False).logits
        return kl_full(logits, teacher_logits, self.config.temperature)

    def heldout_loss(self, student: nn.Module) -> Callable[[], float]:
        def run() -> float:
            n, b = len(self.heldout), self.config.batch_size
            total = sum(float(self.loss(student, "heldout", list(range(i, min(i + b, n))))) * min(b, n - i)
                        for i in range(0, n, b))
            return total / n
        return run


def trained_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """What distillation trains: the low-rank factors' and the slimmed linears' weights (embeddings, norms,
    biases and the dense linears stay frozen)."""
    factors = factor_targets(model, "left") + factor_targets(model, "right") if _has_factors(model) else []
    return {f"{name}.weight": model.get_submodule(name).weight for name in factors + list(slimmed_modules(model))}


def trainable_factors(model: nn.Module) -> dict[str, nn.Parameter]:
    """`trained_weights`, made the only parameters that require a gradient."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = trained_weights(model)
    for p in params.values():
        p.requires_grad_(True)
    return params


def _has_factors(model: nn.Module) -> bool:
    return any(isinstance(m, LowRankLinear) for m in model.modules())


def _run_phase(model: nn.Module, params: dict[str, nn.Parameter], objective: Objective, config: HealConfig,
               steps: int, checkpoint: Checkpoint | None, desc: str) -> TrainResult:
    return train(
        model, params,
        micro_loss=lambda idx: objective.loss(model, "train", idx.tolist()),
        heldout_loss=objective.heldout_loss(model),
        n_windows=len(objective.train_windows), steps=steps, lr=config.start_lr(params.values()), warmup=config.warmup,
        batch_size=config.batch_size, grad_accum=config.grad_accum, eval_every=config.eval_every,
        patience=config.patience, seed=config.seed, device=config.device,
        weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm, checkpoint=checkpoint, desc=desc,
        backoff=Backoff(config.lr_backoff, config.max_backoffs, max(1, config.eval_every // 2))
        if config.auto_lr else None, dtype=objective.dtype,
    )


def heal(student: nn.Module, teacher: nn.Module | None, windows: tuple[torch.Tensor, torch.Tensor],
         config: HealConfig, resume_dir: str | os.PathLike | None = None) -> HealReport:
    """Train `student` (an svdzip model) in place on `windows` = (training, held-out) token windows
    (`heal_windows`); `teacher` is the dense model, needed for the kl objective, and used up: under a bfloat16
    heal its frozen linears keep 16-bit weights (`core.precision.frozen_linears_to`)."""
    config.validate()
    if config.layer_local:
        raise SvdzipError(f"--heal {config.method} runs inside the compression's layer walk, where each dense layer "
                          "is at hand; it cannot heal a finished model: `svdzip compress --heal layerwise …`")
    if not _has_factors(student) and not slimmed_modules(student):
        raise SvdzipError("the model has no factorised linears and no slimmed ones: nothing to recover")
    if config.method != "distill" and not _has_factors(student):
        low_rank_modules(student)  # seq-lora's adapters sit on factors: refuses a model without any
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    train_windows, heldout = windows
    objective = Objective(teacher, train_windows, heldout, config)
    if teacher is not None:
        teacher.eval().requires_grad_(False)
        frozen_linears_to(teacher, objective.dtype)  # the teacher is used up here: half its linears' memory
    base = {**config.fingerprint(), "student": state_digest(student)} if resume_dir else {}
    root = Path(resume_dir) if resume_dir else None
    report = HealReport(method=config.method, config=config.to_dict(),
                        precision=config.resolved_precision())

    def checkpoint(phase: str) -> Checkpoint | None:
        return Checkpoint(root / phase, {**base, "phase": phase}) if root else None

    if config.objective != "kl":  # the text's next token: no teacher at all
        teacher = objective.teacher = None
    if objective.caches_teacher and teacher is not None:
        # seq-lora's two phases replay the same seeded order: the longer phase's windows cover both
        steps = config.steps if config.method == "distill" else (config.steps + 1) // 2
        objective.precompute(batch_order(len(train_windows), config.batch_size, steps * config.grad_accum,
                                         config.seed).flatten().tolist())
        teacher = None  # the caller passed its only reference (`heal(student, load_model(...)[0], ...)`)
        release_memory()
    if config.method == "distill":
        flags = [(p, p.requires_grad) for p in student.parameters()]  # given back as they were
        try:
            params = trainable_factors(student)
            report.trained_params = sum(p.numel() for p in params.values())
            with frozen_linears_in(student, objective.dtype):
                result = _run_phase(student, params, objective, config, config.steps, checkpoint("distill"),
                                    "distill")
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
        report.phases.append({"phase": "distill", **result.to_dict()})
        report.stopped = result.stopped
    else:
        first = (config.steps + 1) // 2
        for index, side in enumerate(phase_sides(config.order)):
            name = f"seq-lora-{index + 1}-{side}"
            done = root / name / "merged.safetensors" if root else None
            if done is not None and done.is_file():
                _load_side(student, side, done)
                log.info("%s: merged factors restored from %s", name, done)
                record = done.with_name("result.json")
                restored = json.loads(record.read_text()) if record.is_file() else {}
                report.phases.append({"phase": name, **restored, "restored": str(done)})
                continue
            with lora_on(student, side, config.lora_r, config.lora_alpha, config.lora_dropout) as peft_model:
                params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
                report.trained_params += sum(p.numel() for p in params.values())
                with frozen_linears_in(student, objective.dtype):
                    result = _run_phase(peft_model, params, objective, config,
                                        first if index == 0 else config.steps - first, checkpoint(name), name)
            report.phases.append({"phase": name, **result.to_dict()})
            if done is not None:
                _save_side(student, side, done, result)
            if result.stopped == "nan":
                report.stopped = "nan"
                break
    student.eval()
    # glibc keeps what training freed (AdamW's moments, the best copy, bf16 casts: ~1.5 GiB on Qwen2.5-0.5B after
    # four steps) and later stages could not all reuse it
    release_memory()
    _conclude(report, config)
    report.seconds = time.perf_counter() - t0
    report.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return report


def _conclude(report: HealReport, config: HealConfig) -> None:
    """Step 0's and the final held-out loss, the learning rate used, and whether the heal helped at all.

    Every phase keeps its best held-out state, step 0's included, and the next phase starts from it on
    the same windows: when the last phase's best is not below the first phase's step 0, no phase
    improved, each kept its starting factors, and the model is the un-healed one."""
    trained = [p for p in report.phases if "best_heldout" in p]
    report.lr_auto = bool(config.auto_lr)
    if not trained:  # an older resume directory without the phase records
        return
    report.initial_heldout, report.final_heldout = trained[0]["initial_heldout"], trained[-1]["best_heldout"]
    report.improved = report.final_heldout < report.initial_heldout
    report.lr = trained[-1]["lr_final"]
    report.backoffs = sum(len(p["backoffs"]) for p in trained)
    start = trained[0].get("lr_start") or config.lr  # phases restored from before the start was recorded
    origin = f", {config.lr_per_rms:.3g} × the trained weights' median RMS" if config.lr is None else ""
    searched = f" (found on the held-out windows: {report.backoffs} back-off(s) from {start:.3g}{origin})" \
        if config.auto_lr and start else ""
    if report.improved:
        log.info("%s: held-out %s loss %.4f at step 0 → %.4f, lr %.3g%s", report.method, config.objective,
                 report.initial_heldout, report.final_heldout, report.lr, searched)
    else:
        log.warning("%s did not lower the held-out %s loss below step 0's (%.4f; best after it %.4f, last lr "
                     "%.3g%s): the un-healed factors are kept, and the output is not labelled +%s", report.method,
                     config.objective, report.initial_heldout,
                     min((h["heldout"] for p in trained for h in p["history"][1:]), default=float("nan")),
                     report.lr, searched, report.method)


def _save_side(model: nn.Module, side: str, path: Path, result: TrainResult) -> None:
    """The merged factors of a finished phase, and its record (written first: the factors mark it done)."""
    record = path.with_name("result.json")
    record.with_name(".result.json.tmp").write_text(json.dumps(result.to_dict(), indent=1))
    os.replace(record.with_name(".result.json.tmp"), record)
    tensors = {n: model.get_submodule(n).weight.detach().cpu().contiguous() for n in factor_targets(model, side)}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def _load_side(model: nn.Module, side: str, path: Path) -> None:
    tensors = load_file(path)
    for name in factor_targets(model, side):
        model.get_submodule(name).weight.copy_(tensors[name])
