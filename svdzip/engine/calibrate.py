"""Layer-sequential calibration: the statistics of every compressible linear's input.

In the style of GPTQ / llm-compressor: the inputs of every decoder layer are captured once (the
layers' own forwards are swapped for an identity that records their keyword arguments, so the
embedding and mask code of any family runs unchanged and no layer weight is touched), then the
layers run one at a time on the compute device while hooks accumulate, per shared input:

* the Gram matrix XᵀX in float64 (SVD-LLM whitening, D-Rank, ARA, Basis Sharing),
* Σ_batches mean_tokens |x| and max |x| per channel (ASVD's scaling).

Layer i sees the outputs of the *original* layers < i, as in SVD-LLM's and ARA's profiling.
The statistics are an artefact of their own: saved, checked and reused across methods and ratios.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from svdzip.assets import sha256_file
from svdzip.errors import SvdzipError
from svdzip.models.adapter import ModelAdapter

log = logging.getLogger(__name__)

STATS_FORMAT = 1


class _StopForward(Exception):
    """Raised by the last identity layer: nothing after the decoder needs computing."""


def _to(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _first_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


@dataclass
class LayerInputs:
    """The first decoder layer's hidden states and every layer's keyword arguments, per batch."""

    hidden: list[torch.Tensor]  # per batch, on the offload device
    kwargs: list[list[dict[str, Any]]]  # [layer][batch]


def _non_layer_modules(model: nn.Module, adapter: ModelAdapter) -> Iterator[nn.Module]:
    layer_ids = {id(m) for layer in adapter.layers for m in layer.modules()}
    for module in model.modules():
        if id(module) in layer_ids:
            continue
        yield module


@contextmanager
def _non_layers_on(model: nn.Module, adapter: ModelAdapter, device: torch.device) -> Iterator[None]:
    """Move everything but the decoder layers (embeddings, rotary, norm) to `device` for a while."""
    moved: list[tuple[nn.Module, str, torch.device]] = []
    for module in _non_layer_modules(model, adapter):
        for name, tensor in list(module.named_parameters(recurse=False)) + list(
            module.named_buffers(recurse=False)
        ):
            if tensor is not None and tensor.device != device:
                moved.append((module, name, tensor.device))
                if name in module._parameters:
                    module._parameters[name].data = tensor.data.to(device)
                else:
                    module._buffers[name] = tensor.to(device)
    try:
        yield
    finally:
        for module, name, original in moved:
            if name in module._parameters:
                module._parameters[name].data = module._parameters[name].data.to(original)
            else:
                module._buffers[name] = module._buffers[name].to(original)


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    adapter: ModelAdapter,
    tokens: torch.Tensor,
    batch_size: int,
    device: torch.device | str,
    offload: torch.device | str = "cpu",
) -> LayerInputs:
    """Run the model with identity decoder layers and record what each layer would receive."""
    device = torch.device(device)
    n_layers = adapter.num_layers
    kwargs: list[list[dict[str, Any]]] = [[] for _ in range(n_layers)]
    hidden: list[torch.Tensor] = []

    def make_identity(index: int) -> Callable[..., torch.Tensor]:
        def identity(*args: Any, **kw: Any) -> torch.Tensor:
            h = args[0] if args else kw.pop("hidden_states")
            kw.pop("hidden_states", None)
            kwargs[index].append(_to(kw, offload))
            if index == 0:
                hidden.append(h.detach().to(offload))
            if index == n_layers - 1:
                raise _StopForward
            return h

        return identity

    for i, layer in enumerate(adapter.layers):
        layer.forward = make_identity(i)
    try:
        with _non_layers_on(model, adapter, device):
            for start in range(0, tokens.shape[0], batch_size):
                batch = tokens[start : start + batch_size].to(device)
                with suppress(_StopForward):
                    model(input_ids=batch, use_cache=False)
    finally:
        for layer in adapter.layers:
            del layer.forward  # back to the class's forward
    return LayerInputs(hidden=hidden, kwargs=kwargs)


@torch.no_grad()
def run_layer(
    layer: nn.Module,
    hidden: list[torch.Tensor],
    layer_kwargs: list[dict[str, Any]],
    device: torch.device | str,
    offload: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """One decoder layer over every cached batch; returns its outputs (the next layer's inputs)."""
    outputs = []
    for h, kw in zip(hidden, layer_kwargs, strict=True):
        out = _first_output(layer(h.to(device), **_to(kw, device)))
        outputs.append(out.to(offload))
    return outputs


@dataclass
class CalibrationStats:
    """Per shared input: Gram matrix (fp64), Σ mean|x| and max|x| per channel; plus provenance."""

    grams: dict[str, torch.Tensor] = field(default_factory=dict)
    abs_mean: dict[str, torch.Tensor] = field(default_factory=dict)
    abs_max: dict[str, torch.Tensor] = field(default_factory=dict)
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)  # per linear name (FWSVD)
    tokens: int = 0
    batches: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def check_finite(self) -> None:
        for kind, table in (("Gram", self.grams), ("|x| mean", self.abs_mean), ("Fisher", self.fisher)):
            for key, value in table.items():
                if not torch.isfinite(value).all():
                    raise SvdzipError(
                        f"calibration statistics contain NaN/Inf ({kind} of {key}); "
                        "the model produces non-finite activations on this data"
                    )

    def save(self, path: str | os.PathLike) -> None:
        """safetensors file + sidecar JSON with provenance and a checksum, written atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for kind in ("grams", "abs_mean", "abs_max", "fisher"):
            for key, value in getattr(self, kind).items():
                tensors[f"{kind}/{key}"] = value.contiguous()
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp))
        digest = sha256_file(tmp)
        meta = {"format": STATS_FORMAT, "tokens": self.tokens, "batches": self.batches,
                "sha256": digest, "meta": self.meta}
        meta_tmp = _meta_path(path).with_name(_meta_path(path).name + ".tmp")
        meta_tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.replace(tmp, path)
        os.replace(meta_tmp, _meta_path(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationStats:
        path = Path(path)
        meta_path = _meta_path(path)
        if not path.is_file() or not meta_path.is_file():
            raise SvdzipError(f"no calibration statistics at {path} (expected {path.name} and {meta_path.name})")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise SvdzipError(f"statistics metadata {meta_path} is corrupted: {exc}") from exc
        if meta.get("format") != STATS_FORMAT:
            raise SvdzipError(f"statistics {path} have format {meta.get('format')}, expected {STATS_FORMAT}")
        if sha256_file(path) != meta.get("sha256"):
            raise SvdzipError(f"statistics file {path} is corrupted (checksum mismatch); delete it to recompute")
        stats = cls(tokens=meta["tokens"], batches=meta["batches"], meta=meta["meta"])
        for name, tensor in load_file(str(path)).items():
            kind, _, key = name.partition("/")
            getattr(stats, kind)[key] = tensor
        return stats


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


class _Accumulator:
    """Forward pre-hooks that add one batch's input statistics to `stats` (one hook per shared input)."""

    def __init__(self, stats: CalibrationStats, key: str):
        self.stats, self.key = stats, key

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1])
        xf = x.float()
        gram = (xf.T @ xf).double().cpu()  # one batch in fp32, the running sum in fp64
        absx = xf.abs()
        mean = absx.mean(0).double().cpu()
        amax = absx.amax(0).double().cpu()
        s = self.stats
        if self.key in s.grams:
            s.grams[self.key] += gram
            s.abs_mean[self.key] += mean
            s.abs_max[self.key] = torch.maximum(s.abs_max[self.key], amax)
        else:
            s.grams[self.key], s.abs_mean[self.key], s.abs_max[self.key] = gram, mean, amax


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    tokens: torch.Tensor,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    meta: dict[str, Any] | None = None,
) -> CalibrationStats:
    """Calibrate layer by layer; only one decoder layer sits on `device` at a time."""
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise SvdzipError("calibration needs a non-empty [samples, seq_len] token tensor")
    adapter = ModelAdapter(model)
    device = torch.device(device)
    inputs = capture_layer_inputs(model, adapter, tokens, batch_size, device)
    stats = CalibrationStats(tokens=int(tokens.numel()), batches=len(inputs.hidden), meta=dict(meta or {}))
    hidden = inputs.hidden
    for index in tqdm(range(adapter.num_layers), desc="calibrating layers", unit="layer"):
        layer = adapter.layers[index]
        home = next(layer.parameters()).device
        layer.to(device)
        handles = []
        seen: set[str] = set()
        for info in adapter.layer_linears(index):
            if info.input_key in seen:
                continue
            seen.add(info.input_key)
            module = adapter.module(info.name)
            handles.append(module.register_forward_pre_hook(_Accumulator(stats, info.input_key)))
        try:
            hidden = run_layer(layer, hidden, inputs.kwargs[index], device)
        finally:
            for h in handles:
                h.remove()
            layer.to(home)
    stats.check_finite()
    return stats
