"""The layer-wise walk every stage shares: capture the first layer's inputs, then one decoder layer at a time.

In the style of GPTQ / llm-compressor: the inputs of every decoder layer are captured once (the layers'
own forwards are swapped for an identity that records their keyword arguments, so the embedding and mask
code of any family runs unchanged and no layer weight is touched); then each layer runs on the compute
device over the cached batches, with whatever hooks the stage needs, and its outputs feed the next.

Where a layer's weights come from is a `WeightSource`: resident in memory (the layer is moved to the
device for its turn and back) or streamed from safetensors (read for its turn, back to the meta device
after). Calibration, the weight updates, Fisher, ASVD's search and the streamed writer all walk through
these few functions; none moves a layer by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from svdzip.models.adapter import ModelAdapter


class _StopForward(Exception):
    """Raised by the last identity layer: nothing after the decoder needs computing."""


def to_device(obj: Any, device: torch.device | str, memo: dict[int, tuple[Any, Any]] | None = None) -> Any:
    """Tensors anywhere inside tuples, lists and dicts moved to `device` (everything else as is).

    With `memo` a tensor already moved (the same object) is not copied again: its first copy is reused."""
    if isinstance(obj, torch.Tensor):
        if memo is None:
            return obj.to(device)
        if id(obj) not in memo:
            memo[id(obj)] = (obj, obj.to(device))  # the original is held so that its id stays its own
        return memo[id(obj)][1]
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(o, device, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device, memo) for k, v in obj.items()}
    return obj


def first_output(out: Any) -> torch.Tensor:
    """A decoder layer's hidden states, whether it returns a tensor or a tuple."""
    return out[0] if isinstance(out, tuple | list) else out


@dataclass
class LayerInputs:
    """The first decoder layer's hidden states and every layer's keyword arguments, per batch."""

    hidden: list[torch.Tensor]  # per batch, on the offload device
    kwargs: list[list[dict[str, Any]]]  # [layer][batch]


def _non_layer_modules(model: nn.Module, adapter: ModelAdapter) -> Iterator[nn.Module]:
    layer_ids = {id(m) for layer in adapter.layers for m in layer.modules()}
    for module in model.modules():
        if id(module) not in layer_ids:
            yield module


@contextmanager
def non_layers_on(model: nn.Module, adapter: ModelAdapter, device: torch.device | str) -> Iterator[None]:
    """Everything but the decoder layers (embeddings, rotary, norm, head) on `device` for a while."""
    device = torch.device(device)
    moved: list[tuple[nn.Module, str, torch.device]] = []
    for module in _non_layer_modules(model, adapter):
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if tensor is not None and tensor.device != device and tensor.device.type != "meta":
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


@contextmanager
def layer_on(layer: nn.Module, device: torch.device | str) -> Iterator[nn.Module]:
    """One resident decoder layer on `device` for a while, then back where it lived (no-op if already there)."""
    device = torch.device(device)
    first = next(layer.parameters(), None)
    home = first.device if first is not None else device
    if home != device:
        layer.to(device)
    try:
        yield layer
    finally:
        if home != device:
            layer.to(home)


@contextmanager
def forward_pre_hooks(hooks: dict[nn.Module, Callable[..., Any]]) -> Iterator[None]:
    """Register forward pre-hooks for the duration of a block; always removed."""
    handles = [module.register_forward_pre_hook(fn) for module, fn in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class WeightSource(Protocol):
    """Where a decoder layer's weights are during its turn."""

    def layer(self, index: int, device: torch.device | str) -> Any: ...  # context manager → the layer
    def non_layers(self, device: torch.device | str) -> Any: ...  # context manager: embeddings, norm, head
    def linears(self, names: list[str]) -> Any: ...  # context manager: just these linears' weights


class ResidentWeights:
    """The whole model is in memory: a layer is moved to the compute device for its turn."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter):
        self.model, self.adapter = model, adapter

    @contextmanager
    def layer(self, index: int, device: torch.device | str) -> Iterator[nn.Module]:
        with layer_on(self.adapter.layers[index], device) as layer:
            yield layer

    @contextmanager
    def non_layers(self, device: torch.device | str) -> Iterator[None]:
        with non_layers_on(self.model, self.adapter, device):
            yield

    @contextmanager
    def linears(self, names: list[str]) -> Iterator[None]:
        yield


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    adapter: ModelAdapter,
    tokens: torch.Tensor,
    batch_size: int,
    device: torch.device | str,
    offload: torch.device | str = "cpu",
    weights: WeightSource | None = None,
) -> LayerInputs:
    """Run the model with identity decoder layers and record what each layer would receive."""
    device = torch.device(device)
    weights = weights or ResidentWeights(model, adapter)
    n_layers = adapter.num_layers
    kwargs: list[list[dict[str, Any]]] = [[] for _ in range(n_layers)]
    hidden: list[torch.Tensor] = []
    memo: dict[int, tuple[Any, Any]] = {}  # this batch's masks and position embeddings, offloaded once

    def make_identity(index: int) -> Callable[..., torch.Tensor]:
        def identity(*args: Any, **kw: Any) -> torch.Tensor:
            h = args[0] if args else kw.pop("hidden_states")
            kw.pop("hidden_states", None)
            if index == 0:  # a new batch
                memo.clear()
                hidden.append(h.detach().to(offload))
            kwargs[index].append(to_device(kw, offload, memo))
            if index == n_layers - 1:
                raise _StopForward
            return h

        return identity

    for i, layer in enumerate(adapter.layers):
        layer.forward = make_identity(i)
    try:
        with weights.non_layers(device):
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
    consume: bool = False,
) -> list[torch.Tensor]:
    """One decoder layer over every cached batch; returns its outputs (the next layer's inputs).

    With `consume` each input is dropped from `hidden` once its output exists, so that a layer's inputs and
    outputs are not all held at once (a streamed Qwen2.5-1.5B's 64 calibration windows: 0.2 GB each way)."""
    if len(hidden) != len(layer_kwargs):
        raise ValueError(f"run_layer: {len(hidden)} batches but {len(layer_kwargs)} sets of layer arguments")
    outputs = []
    for i, kw in enumerate(layer_kwargs):
        h = hidden[i]
        if consume:
            hidden[i] = None
        out = first_output(layer(h.to(device), **to_device(kw, device)))
        del h
        outputs.append(out.to(offload))
    return outputs
