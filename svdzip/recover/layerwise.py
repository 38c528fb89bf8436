"""Layer-wise healing (`--heal layerwise`): train each layer's factors to give its dense output, one layer at a time.

Distillation trains the whole compressed model against the whole dense one, which a streamed or distributed
run never holds. Here (in the spirit of Lillama, arXiv 2412.16719) the walk that materialises the factors
carries two streams of hidden states over the calibration windows: the dense model's and the compressed
model's. At layer i, with the dense layer still at hand:

    targets  = dense layer i (dense stream)          ← what the layer should give
    materialise layer i at its ranks (SVD-LLM's start)
    train the layer's factors so that layer i (compressed stream) ≈ targets
    compressed stream = healed layer i (compressed stream);  dense stream = targets

so each layer also learns to undo the error the compressed layers before it pass on. The loss is the
per-token relative error ‖o_t − t_t‖² / ‖t_t‖², the same per-token scale as the layer-local allocation
signal (`passes.local_gain`). The windows are the run's calibration windows (at most `train_samples` +
`heldout_samples` of them); the last `heldout_samples` are held out: a heal that does not lower the layer's
error there is undone and, unless `--heal-lr` was given, retried at a third of the rate (at most
`max_backoffs` times; the next layer starts at the rate that last worked); a layer that still does not
improve keeps its un-healed factors, the log says so, and the next layer starts at this one's first rate.
A step is `grad_accum` micro-batches of `batch_size` windows, `steps` steps per layer. Only one decoder layer
is ever in memory.

With a run directory every healed layer's factors and both streams are checkpointed, keyed by what they
depend on (ranks, options, tokens), so a killed run resumes at the layer it stopped in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svdzip.core.layerwise import LayerInputs, first_output, run_layer, to_device
from svdzip.core.resume import fault, read_checked, write_checked
from svdzip.errors import SvdzipError
from svdzip.models.lowrank import LowRankLinear
from svdzip.recover.config import HealConfig
from svdzip.recover.heal import HealReport

log = logging.getLogger(__name__)


def relative_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ‖o_t − t_t‖² / ‖t_t‖² (the layer's error against its dense output, per token)."""
    o, t = output.float(), target.float()
    return ((o - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12)).mean()


def factor_parameters(layer: nn.Module) -> list[nn.Parameter]:
    """The trainable factors of a layer: every low-rank module's left and right weights (each once)."""
    seen: dict[int, nn.Parameter] = {}
    for module in layer.modules():
        if isinstance(module, LowRankLinear):
            for p in (module.left.weight, module.right.weight):
                seen.setdefault(id(p), p)
    return list(seen.values())


def heal_key(ranks: list[int | None], config: HealConfig, tokens: torch.Tensor) -> str:
    """What a checkpointed layer-wise heal depends on: the ranks, the options and the calibration tokens."""
    what = {"ranks": ranks, "config": config.fingerprint()}
    h = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode())
    h.update(tokens.to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:32]


class LayerwiseHealer:
    """The two streams and the per-layer training; `layer()` is called once per decoder layer, in order."""

    def __init__(self, inputs: LayerInputs, config: HealConfig, device: torch.device | str,
                 state_dir: Path | None = None, key: str = ""):
        self.config, self.device = config, torch.device(device)
        self.kwargs = inputs.kwargs
        self.dense = list(inputs.hidden)
        self.compressed = list(inputs.hidden)
        n = len(self.dense)  # micro-batches of `config.batch_size` windows
        per_batch = max(1, int(self.dense[0].shape[0])) if n else 1
        held = min(max(1, math.ceil(config.heldout_samples / per_batch)), n - 1) if n > 1 else 0
        self.check = list(range(n - held, n)) if held else [0]  # the last windows, held out from training
        self.train = list(range(n - held)) if held else [0]
        if not held:
            log.warning("layer-wise healing: one calibration batch only, so its check is on the training windows")
        self.state_dir, self.key = state_dir, key
        self.lr: float | None = config.lr  # where the next layer's heal starts (searched downwards unless given;
        # None: from the first healed layer's factors, `HealConfig.start_lr`)
        self.layers: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()
        self.resumed_through = self._restore_streams()

    # ------------------------------------------------------------------ the walk

    def layer(self, index: int, layer: nn.Module, materialise: Callable[[], Any]) -> Any:
        """Materialise layer `index` (through `materialise()`, which returns its rows) and heal it."""
        if index <= self.resumed_through:
            rows = materialise()
            self._restore_layer(index, layer)
            return rows
        t0 = time.perf_counter()
        kwargs = self.kwargs[index]
        targets = run_layer(layer, self.dense, kwargs, self.device)  # the dense layer, before materialising
        rows = materialise()
        record = self._heal(index, layer, targets)
        self.compressed = run_layer(layer, self.compressed, kwargs, self.device)
        self.dense = targets
        record["seconds"] = round(time.perf_counter() - t0, 2)
        self.layers.append(record)
        self._checkpoint(index, layer)
        fault("heal", index)
        if index == len(self.kwargs) - 1:  # the walk is done: the streams are not needed any more
            self.dense, self.compressed = [], []
        return rows

    def _heal(self, index: int, layer: nn.Module, targets: list[torch.Tensor]) -> dict[str, Any]:
        """Train the layer's factors; with a searched learning rate (no `--heal-lr`), a heal that does not lower
        the held-out error is undone and retried at lr / lr_backoff (at most max_backoffs times), and the next
        layer starts at the rate that last worked."""
        params = factor_parameters(layer)
        record: dict[str, Any] = {"layer": index, "steps": 0, "params": sum(p.numel() for p in params)}
        if not params:
            record.update(before=None, after=None, kept=False)
            return record
        before = self._error(layer, index, targets)
        if self.lr is None:  # the first layer healed: the rate from its factors' scale
            self.lr = self.config.start_lr(params)
        unhealed = [p.detach().clone() for p in params]
        flags = {id(p): p.requires_grad for p in layer.parameters()}
        for p in layer.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        backoffs, best, start_lr = 0, before, self.lr
        try:
            while True:
                best, state, steps = self._train(index, layer, params, targets, self.lr, before)
                record["steps"] += steps
                if best < before or not self.config.auto_lr or backoffs >= self.config.max_backoffs:
                    break
                with torch.no_grad():
                    for p, kept in zip(params, unhealed, strict=True):
                        p.copy_(kept)
                self.lr /= self.config.lr_backoff
                backoffs += 1
                log.info("layer %d: no better on the held-out windows; trying again at lr %.3g", index, self.lr)
        finally:
            for p in layer.parameters():
                p.requires_grad_(flags[id(p)])
                p.grad = None
        with torch.no_grad():
            for p, kept in zip(params, state if best < before else unhealed, strict=True):
                p.copy_(kept)
        # the rate this layer last trained at, and the next layer's start: where this one started if no rate helped
        record.update(before=before, after=min(best, before), kept=best < before, lr=self.lr, backoffs=backoffs,
                      lr_next=self.lr if best < before else start_lr)
        self.lr = record["lr_next"]
        if best >= before:
            log.warning("layer %d: healing did not lower its held-out output error (%.4g); its un-healed factors "
                        "are kept", index, before)
        else:
            log.info("layer %d healed: held-out relative output error %.4g → %.4g", index, before, best)
        return record

    def _train(self, index: int, layer: nn.Module, params: list[nn.Parameter], targets: list[torch.Tensor],
               lr: float, before: float) -> tuple[float, list[torch.Tensor], int]:
        """One heal of the layer at `lr`: (best held-out error, its factors, steps run). Checked twice a heal."""
        steps, accum = self.config.steps, self.config.grad_accum
        every = max(1, min(self.config.eval_every, steps // 2))
        optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=self.config.weight_decay)
        warm = max(1, int(self.config.warmup * steps))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimiser, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm)
                                                                                 / max(1, steps - warm))))
        best, state, done = before, [p.detach().clone() for p in params], 0
        for step in range(steps):
            optimiser.zero_grad(set_to_none=True)
            finite = True
            for micro in range(accum):  # each step: grad_accum micro-batches of batch_size windows
                b = self.train[(step * accum + micro) % len(self.train)]
                with torch.enable_grad():
                    out = first_output(layer(self.compressed[b].to(self.device),
                                             **to_device(self.kwargs[index][b], self.device)))
                    loss = relative_error(out, targets[b].to(self.device)) / accum
                finite = finite and bool(torch.isfinite(loss))
                loss.backward()
            if not finite:
                log.warning("layer %d: non-finite healing loss at step %d; stopping its heal", index, step)
                break
            torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
            optimiser.step()
            schedule.step()
            done = step + 1
            if done % every == 0 or done == steps:
                error = self._error(layer, index, targets)
                if error < best:
                    best, state = error, [p.detach().clone() for p in params]
        return best, state, done

    @torch.no_grad()
    def _error(self, layer: nn.Module, index: int, targets: list[torch.Tensor]) -> float:
        """The layer's relative output error on the held-out batches of the compressed stream."""
        total = 0.0
        for b in self.check:
            out = first_output(layer(self.compressed[b].to(self.device), **to_device(self.kwargs[index][b],
                                                                                     self.device)))
            total += float(relative_error(out, targets[b].to(self.device)))
        return total / len(self.check)

    # ------------------------------------------------------------------ the report

    def report(self) -> HealReport:
        """The heal as a `HealReport`: per-layer records, mean held-out error before and after, kept or not."""
        done = [r for r in self.layers if r.get("before") is not None]
        before = sum(r["before"] for r in done) / len(done) if done else None
        after = sum(r["after"] for r in done) / len(done) if done else None
        kept = sum(1 for r in done if r["kept"])
        if done and kept < len(done):
            log.warning("layer-wise healing kept the un-healed factors of %d of %d layers", len(done) - kept,
                        len(done))
        return HealReport(method="layerwise", config=self.config.to_dict(), phases=self.layers,
                          seconds=time.perf_counter() - self.t0,
                          trained_params=sum(r.get("params", 0) for r in self.layers),
                          initial_heldout=before, final_heldout=after, improved=kept > 0, lr=self.lr,
                          lr_auto=bool(self.config.auto_lr), backoffs=sum(r.get("backoffs", 0) for r in done))

    # ------------------------------------------------------------------ resume

    def _path(self, name: str) -> Path:
        assert self.state_dir is not None
        return self.state_dir / name

    def _checkpoint(self, index: int, layer: nn.Module) -> None:
        if self.state_dir is None:
            return
        factors = {name: p for name, p in layer.named_parameters() if name.endswith(("left.weight", "right.weight"))}
        write_checked(self._path(f"layer_{index:05d}.safetensors"), factors,
                      {"key": self.key, "layer": index, "record": self.layers[-1]})
        streams = {**{f"d{i:06d}": h for i, h in enumerate(self.dense)},
                   **{f"c{i:06d}": h for i, h in enumerate(self.compressed)}}
        write_checked(self._path("streams.safetensors"), streams,
                      {"key": self.key, "layer": index, "batches": len(self.dense)})

    def _restore_streams(self) -> int:
        """The last layer a killed run finished (its streams loaded), or -1."""
        if self.state_dir is None:
            return -1
        got = read_checked(self._path("streams.safetensors"))
        if got is None or got[1].get("key") != self.key:
            return -1
        tensors, info = got
        last = int(info["layer"])
        for i in range(last + 1):
            layer_file = read_checked(self._path(f"layer_{i:05d}.safetensors"))
            if layer_file is None or layer_file[1].get("key") != self.key:
                log.warning("layer-wise healing: the checkpoint of layer %d is missing; healing starts again", i)
                return -1
        n = int(info["batches"])
        self.dense = [tensors[f"d{i:06d}"] for i in range(n)]
        self.compressed = [tensors[f"c{i:06d}"] for i in range(n)]
        log.info("layer-wise healing resumes after layer %d (restored from %s)", last, self.state_dir)
        return last

    @torch.no_grad()
    def _restore_layer(self, index: int, layer: nn.Module) -> None:
        got = read_checked(self._path(f"layer_{index:05d}.safetensors"))
        if got is None:
            raise SvdzipError(f"the layer-wise heal checkpoint of layer {index} vanished from {self.state_dir} "
                              "during the run; rerun the same command")
        tensors, info = got
        record = info.get("record", {})
        lr = record.get("lr_next", record.get("lr"))  # the rate the next layer starts at
        self.lr = self.lr if lr is None else float(lr)
        params = dict(layer.named_parameters())
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name]))
        self.layers.append({**record, "restored": True})
