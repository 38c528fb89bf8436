"""One training loop for every recovery: AdamW, warm-up + cosine, accumulation, early stopping, resume.

What is trained and on which loss is the caller's business (a `micro_loss` over a batch of window
indices, a `heldout_loss`); the loop owns what every recovery needs alike: a deterministic batch
order from the seed, held-out checks with early stopping and the best parameters kept, a stop on a
non-finite loss that keeps the last good parameters, and checkpoints that a killed run resumes from
bit for bit (parameters, optimiser moments, the CPU's RNG state and CUDA's when training there; the
batch order and the learning rate are functions of the step and of the back-offs recorded).
Checkpoints are safetensors plus a JSON record: no pickles.

The learning rate can find itself (`backoff`): a held-out check that is not better than the best so
far (step 0 included) rolls the parameters back to the best, starts the optimiser afresh with a new
warm-up, and divides the learning rate by `backoff.factor`, at most `backoff.limit` times; the first
check at each learning rate comes early (`backoff.first_check`), so a step too large costs a few
steps, not `eval_every`. The rolled-back state is the best copy the loop keeps anyway, and fresh
moments (instead of a copy of the best ones) cost no memory: the search adds nothing to the peak.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from svdzip.core.precision import autocast_for
from svdzip.errors import SvdzipError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2  # 2: the learning-rate search's state and the running loss


def lr_at(step: int, steps: int, base: float, warmup: float, restart: int = 0) -> float:
    """Learning rate of optimiser step `step` (0-based): linear warm-up, then cosine decay to 0 over
    the run; after a back-off at step `restart` the warm-up starts again from there."""
    warm = int(round(warmup * steps))
    decay = 1.0 if step < warm else 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
    since = step - restart
    if since < warm:
        return base * decay * (since + 1) / warm
    return base * decay


@dataclass(frozen=True)
class Backoff:
    """The learning-rate search: divide by `factor` on a held-out check that is no better, `limit` times."""

    factor: float = 3.0
    limit: int = 3
    first_check: int = 5  # steps from a (re)start to the first held-out check at that learning rate


def batch_order(n_windows: int, batch_size: int, n_batches: int, seed: int) -> torch.Tensor:
    """`[n_batches, batch_size]` window indices: seeded epochs over all windows, each a new permutation."""
    gen = torch.Generator().manual_seed(seed)
    need = n_batches * batch_size
    epochs = [torch.randperm(n_windows, generator=gen) for _ in range(-(-need // n_windows))]
    return torch.cat(epochs)[:need].view(n_batches, batch_size)


@dataclass
class TrainResult:
    steps_done: int
    stopped: str  # completed | early-stop | nan
    initial_heldout: float
    best_heldout: float
    best_step: int
    history: list[dict[str, float]] = field(default_factory=list)  # {"step", "heldout", "train", "lr"}
    seconds: float = 0.0
    resumed_at: int | None = None
    lr_start: float = 0.0
    lr_final: float = 0.0  # the peak learning rate in force at the end (after the back-offs)
    backoffs: list[dict[str, float]] = field(default_factory=list)  # {"step", "heldout", "best", "lr", "new_lr"}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Checkpoint:
    """A directory holding the latest resumable state of one training phase, refused for another run."""

    def __init__(self, path: str | os.PathLike, fingerprint: dict[str, Any]):
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))

    @property
    def record(self) -> Path:
        return self.path / "state.json"

    def load(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        if not self.record.is_file():
            return None
        try:
            state = json.loads(self.record.read_text())
            tensors = load_file(self.path / state["tensors"])
        except (OSError, ValueError, KeyError) as exc:
            raise SvdzipError(f"checkpoint in {self.path} is unreadable ({exc}); remove it to start over") from exc
        if state.get("fingerprint") != self.fingerprint:
            raise SvdzipError(f"{self.path} holds a checkpoint of another configuration or model; use another "
                              "--resume-dir, or remove it to start over")
        return state, tensors

    def save(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Tensors under a new name first, then the record that points at them (an atomic rename)."""
        self.path.mkdir(parents=True, exist_ok=True)
        name = f"ckpt-{state['step']:06d}.safetensors"
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, self.path / f".{name}.tmp")
        except (OSError, SafetensorError) as exc:
            from svdzip.output.io import write_failure

            (self.path / f".{name}.tmp").unlink(missing_ok=True)
            raise SvdzipError(f"cannot write the heal checkpoint in {self.path}: {write_failure(exc)} (the previous "
                              "checkpoint, if any, is intact: rerun the same command once there is space)") from exc
        os.replace(self.path / f".{name}.tmp", self.path / name)
        tmp = self.path / ".state.json.tmp"
        tmp.write_text(json.dumps({**state, "tensors": name, "fingerprint": self.fingerprint,
                                   "format": CHECKPOINT_FORMAT}, indent=1))
        os.replace(tmp, self.record)
        for old in self.path.glob("ckpt-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors = {f"opt.{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items()}
    return tensors, {"param_groups": sd["param_groups"], "state_ids": sorted(sd["state"])}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    device = opt.param_groups[0]["params"][0].device
    state = {i: {k.split(".", 2)[2]: v.to(device) if k.split(".", 2)[2] != "step" else v
                 for k, v in tensors.items() if k.startswith(f"opt.{i}.")} for i in meta["state_ids"]}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def train(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    micro_loss: Callable[[torch.Tensor], torch.Tensor],
    heldout_loss: Callable[[], float],
    *,
    n_windows: int,
    steps: int,
    lr: float,
    warmup: float,
    batch_size: int,
    grad_accum: int,
    eval_every: int,
    patience: int,
    seed: int,
    device: str,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    checkpoint: Checkpoint | None = None,
    backoff: Backoff | None = None,
    desc: str = "heal",
    dtype: torch.dtype = torch.float32,
) -> TrainResult:
    """Minimise `micro_loss` over `params` for `steps` optimiser steps; the best held-out state is kept.

    With `backoff` the learning rate `lr` is where the search starts; without it, it is fixed. `dtype`: the
    forward's matmuls (`autocast_for`); the parameters, their gradients and AdamW's moments stay float32."""
    t0 = time.perf_counter()
    names = list(params)

    def optimizer() -> torch.optim.Optimizer:
        return torch.optim.AdamW([params[n] for n in names], lr=lr, weight_decay=weight_decay)

    opt = optimizer()
    order = batch_order(n_windows, batch_size, steps * grad_accum, seed)
    start, resumed = 0, None
    history: list[dict[str, float]] = []
    best: dict[str, torch.Tensor] = {}
    # the search's state: the peak lr now, the step its warm-up restarted at, whether a check at it improved
    search: dict[str, Any] = {"lr": lr, "restart": 0, "confirmed": backoff is None, "backoffs": []}
    saved = checkpoint.load() if checkpoint else None
    if saved is not None:
        state, tensors = saved
        with torch.no_grad():
            for n in names:
                params[n].copy_(tensors[f"param.{n}"])
        best = {n: tensors[f"best.{n}"].to(params[n].device) for n in names}
        _restore_optimizer(opt, tensors, state["optimizer"])
        _restore_rng(tensors)
        start = resumed = state["step"]
        history, best_loss, best_step, initial, bad = (state["history"], state["best_heldout"],
                                                       state["best_step"], state["initial_heldout"], state["bad"])
        search, running = state["search"], state["running"]
        log.info("%s: resumed from the checkpoint at step %d in %s", desc, start, checkpoint.path)
    else:
        initial = best_loss = _evaluate(model, heldout_loss, device, dtype)
        best_step, bad = 0, 0
        best = {n: p.detach().clone() for n, p in params.items()}
        history.append({"step": 0, "heldout": initial, "lr": lr})
        running = None  # the training loss's moving average, as the history shows it
    stopped = "completed"
    if saved is not None and bad >= patience:  # the run had already stopped early when it was saved
        start, stopped = steps, "early-stop"
    bar = tqdm(range(start, steps), desc=desc, unit="step", initial=start, total=steps, leave=False)
    step = start
    for step in bar:
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, search["lr"], warmup, search["restart"])
        opt.zero_grad(set_to_none=True)
        total = 0.0
        finite = True
        for m in range(grad_accum):
            with autocast_for(device, dtype):
                loss = micro_loss(order[step * grad_accum + m])
            if not torch.isfinite(loss):
                finite = False
                break
            (loss / grad_accum).backward()
            total += loss.item() / grad_accum
        norm = torch.nn.utils.clip_grad_norm_([params[n] for n in names], max_grad_norm) if finite else None
        if not finite or not torch.isfinite(norm):
            log.error("%s: the loss or its gradient is not finite at step %d; stopping and keeping the "
                      "parameters of step %d (held-out %.4f)", desc, step, best_step, best_loss)
            stopped = "nan"
            break
        opt.step()
        running = total if running is None else 0.9 * running + 0.1 * total
        bar.set_postfix(loss=f"{running:.4f}", best=f"{best_loss:.4f}")
        done = step + 1
        early = not search["confirmed"] and done - search["restart"] == backoff.first_check
        if early or done % eval_every == 0 or done == steps:
            h = _evaluate(model, heldout_loss, device, dtype)
            history.append({"step": done, "heldout": h, "train": running, "lr": search["lr"]})
            log.info("%s: step %d/%d, lr %.3g, train loss %.4f, held-out %.4f", desc, done, steps, search["lr"],
                     running, h)
            if h < best_loss:
                best_loss, best_step, bad = h, done, 0
                _copy_into(best, params)  # into the kept copy: a fresh clone beside it would hold two at once
                search["confirmed"] = True
            elif backoff is not None and len(search["backoffs"]) < backoff.limit and done < steps:
                new_lr = search["lr"] / backoff.factor
                log.info("%s: held-out %.4f at step %d is no better than %.4f (step %d): back to step %d's "
                         "parameters, lr %.3g → %.3g", desc, h, done, best_loss, best_step, best_step,
                         search["lr"], new_lr)
                search["backoffs"].append({"step": done, "heldout": h, "best": best_loss, "best_step": best_step,
                                           "lr": search["lr"], "new_lr": new_lr})
                search.update(lr=new_lr, restart=done, confirmed=False)
                _copy_into(params, best)
                opt = optimizer()  # fresh moments, warmed up again: no copy of the best ones to keep
                running = None
            else:
                bad += 1
            if checkpoint is not None:
                _save(checkpoint, params, best, opt, done, history, best_loss, best_step, initial, bad, search,
                      running, device)
            if bad >= patience and done < steps:
                log.info("%s: no held-out improvement in %d checks; stopping at step %d", desc, bad, done)
                stopped = "early-stop"
                step = done
                break
    else:
        step = steps if stopped == "completed" else resumed
    bar.close()
    _copy_into(params, best)
    model.eval()
    opt.zero_grad(set_to_none=True)
    return TrainResult(steps_done=step, stopped=stopped, initial_heldout=initial, best_heldout=best_loss,
                       best_step=best_step, history=history, seconds=time.perf_counter() - t0, resumed_at=resumed,
                       lr_start=lr, lr_final=search["lr"], backoffs=search["backoffs"])


@torch.no_grad()
def _copy_into(targets: dict[str, torch.Tensor], sources: dict[str, torch.Tensor]) -> None:
    """Every target tensor overwritten in place by the source of the same name (no new storage)."""
    for n, t in targets.items():
        t.copy_(sources[n])


@torch.no_grad()
def _evaluate(model: nn.Module, heldout_loss: Callable[[], float], device: str, dtype: torch.dtype) -> float:
    model.eval()
    with autocast_for(device, dtype):
        return float(heldout_loss())


def _rng_tensors(device: str) -> dict[str, torch.Tensor]:
    """The CPU generator's state, and every CUDA device's when training on CUDA (dropout draws there)."""
    tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return tensors


def _restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                       key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():  # a CUDA run resumed on the CPU has no CUDA draws to replay
        torch.cuda.set_rng_state_all(cuda)


def _save(checkpoint: Checkpoint, params, best, opt, step, history, best_loss, best_step, initial, bad,
          search, running, device) -> None:
    opt_tensors, opt_meta = _optimizer_tensors(opt)
    tensors = {**{f"param.{n}": p for n, p in params.items()}, **{f"best.{n}": p for n, p in best.items()},
               **opt_tensors, **_rng_tensors(device)}
    checkpoint.save({"step": step, "history": history, "best_heldout": best_loss, "best_step": best_step,
                     "initial_heldout": initial, "bad": bad, "optimizer": opt_meta, "search": search,
                     "running": running}, tensors)
