"""Weights from disk: a model skeleton on the meta device, filled one tensor at a time from safetensors.

A `CheckpointReader` reads each tensor of a HF checkpoint (`safe_open`, single file or sharded index)
just when its layer or unit is processed; `StreamedWeights` is the `WeightSource` the layer-wise walk
uses for such a skeleton: a layer is read for its turn and goes back to the meta device after, so no
more than one decoder layer's weights is ever in memory.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from svdzip.errors import SvdzipError
from svdzip.models.adapter import ModelAdapter
from svdzip.models.checkpoint_names import CheckpointNames, TensorSource


class CheckpointReader:
    """Tensor by tensor access to a HF checkpoint's safetensors (single file or sharded index).

    With `names` (the model's `CheckpointNames`) a parameter is found under the checkpoint's own key
    (renamed MoE blocks, one expert of a fused 3-D tensor, a transposed Conv1D weight).
    """

    def __init__(self, directory: str | os.PathLike, names: CheckpointNames | None = None):
        self.dir = Path(directory)
        self.names = names
        index = self.dir / "model.safetensors.index.json"
        self.where: dict[str, Path] = {}
        if index.is_file():
            for name, file in json.loads(index.read_text())["weight_map"].items():
                self.where[name] = self.dir / file
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise SvdzipError(f"{self.dir} has no safetensors weights to stream from")
            for file in files:
                with safe_open(str(file), "pt") as f:
                    for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                        self.where[name] = file

    def resolve(self, name: str) -> str | None:
        for candidate in (name, name.removeprefix("model."), f"model.{name}"):
            if candidate in self.where:
                return candidate
        return None

    def get(self, name: str) -> torch.Tensor:
        sources = self.names.sources(name) if self.names is not None else [TensorSource(name)]
        for source in sources:
            key = self.resolve(source.key)
            if key is not None:
                with safe_open(str(self.where[key]), "pt") as f:
                    return source.take(f.get_tensor(key))
        raise SvdzipError(f"checkpoint {self.dir} has no tensor for {name} (looked for "
                          f"{', '.join(s.key for s in sources)})")

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in set(self.where.values()))


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner_name, _, leaf = name.rpartition(".")
    return (module.get_submodule(owner_name) if owner_name else module), leaf


def _skipped(full: str, skip: tuple[str, ...]) -> bool:
    return any(full.startswith(s) for s in skip)


def load_weights(module: nn.Module, prefix: str, reader: CheckpointReader, dtype: torch.dtype | None,
                 device: torch.device | str = "cpu", skip: tuple[str, ...] = ()) -> None:
    """Fill a meta module's parameters from the checkpoint (`prefix` + name = checkpoint name).

    Tied parameters (embedding and head) stay one object: the first name read fills both.
    """
    loaded: dict[int, nn.Parameter] = {}
    for name, param in list(module.named_parameters(remove_duplicate=False)):
        if _skipped(prefix + name, skip):
            continue
        owner, leaf = _owner(module, name)
        if id(param) in loaded:
            owner._parameters[leaf] = loaded[id(param)]
            continue
        if param.device.type != "meta":
            continue
        value = reader.get(prefix + name)
        if tuple(value.shape) != tuple(param.shape):
            raise SvdzipError(f"checkpoint tensor for {prefix + name} has shape {tuple(value.shape)}, the model "
                              f"expects {tuple(param.shape)}")
        value = value.to(device=device, dtype=dtype if dtype and value.is_floating_point() else value.dtype)
        loaded[id(param)] = owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def unload_weights(module: nn.Module, skip: tuple[str, ...] = (), prefix: str = "") -> None:
    """Back to the meta device (ties kept): the memory of these weights is released."""
    gone: dict[int, nn.Parameter] = {}
    for name, param in list(module.named_parameters(remove_duplicate=False)):
        if _skipped(prefix + name, skip):
            continue
        owner, leaf = _owner(module, name)
        if id(param) not in gone:
            gone[id(param)] = nn.Parameter(param.detach().to("meta"), requires_grad=False)
        owner._parameters[leaf] = gone[id(param)]


def skeleton(source: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """The model's modules with every parameter on the meta device (no weight memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    return model.eval()


class StreamedWeights:
    """A skeleton's weights read from the checkpoint for their turn, and released after."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, reader: CheckpointReader, dtype: torch.dtype | None):
        self.model, self.adapter, self.reader, self.dtype = model, adapter, reader, dtype

    def prefix(self, index: int) -> str:
        return f"{self.adapter.spec.layers_path}.{index}."

    @contextmanager
    def layer(self, index: int, device: torch.device | str) -> Iterator[nn.Module]:
        layer = self.adapter.layers[index]
        load_weights(layer, self.prefix(index), self.reader, self.dtype, device)
        try:
            yield layer
        finally:
            unload_weights(layer)
            release_memory()

    @contextmanager
    def non_layers(self, device: torch.device | str) -> Iterator[None]:
        """What the capture pass runs before the first layer (embeddings, their norms) in memory for it only.

        The head stays on disk: the pass stops inside the last layer and never reaches it, and an untied head of a
        bfloat16 checkpoint would be copied to float32 for nothing (Qwen2.5-0.5B in bf16: the capture's peak
        1.70 → 1.19 GiB; a float32 checkpoint's head is a memory map that was never touched)."""
        model = self.model
        skip = (self.adapter.spec.layers_path + ".",)
        head = model.get_output_embeddings()
        tied = head is not None and getattr(model.config.get_text_config(), "tie_word_embeddings", False)
        head_names = tuple(f"{n}." for n, mod in model.named_modules() if mod is head) if head is not None else ()
        load_weights(model, "", self.reader, self.dtype, device, skip=skip + head_names)
        if tied:  # a tied checkpoint stores the embedding once
            head.weight = model.get_input_embeddings().weight
        try:
            yield
        finally:
            unload_weights(model, skip=skip)

    @contextmanager
    def linears(self, names: list[str]) -> Iterator[None]:
        for name in names:
            load_weights(self.adapter.module(name), f"{name}.", self.reader, self.dtype)
        try:
            yield
        finally:
            for name in names:
                unload_weights(self.adapter.module(name))
            release_memory()


def placeholder(shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor with its shape but no memory (streaming: the real one waits on disk)."""
    return torch.empty(shape, device="meta")


def release_memory() -> None:
    """Hand freed memory back to the OS after a layer (glibc keeps it otherwise, and RSS would creep)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return None


def memory_limit_bytes() -> int:
    """Available memory: the cgroup limit if one is set, else MemAvailable."""
    limit = _cgroup_limit()
    if limit is not None:
        return limit
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def resident_bytes() -> int:
    """This process's resident memory now (0 where /proc cannot tell)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def page_in(module: nn.Module) -> None:
    """Read one value per memory page of every parameter, so that weights a load left mapped from their file (a
    safetensors checkpoint is mapped, and read only when used) count in `resident_bytes` as they will once used."""
    with torch.no_grad():
        for p in module.parameters():
            if p.device.type == "cpu" and p.numel():
                p.detach().reshape(-1)[:: max(1, os.sysconf("SC_PAGE_SIZE") // p.element_size())].sum()


def process_memory_limit_bytes() -> int:
    """What this process can grow to now: the cgroup limit if one is set, else what it holds plus MemAvailable
    (`memory_limit_bytes` is the same before a run has loaded anything)."""
    limit = _cgroup_limit()
    return limit if limit is not None else memory_limit_bytes() + resident_bytes()


def checkpoint_elements(source: str | os.PathLike) -> int:
    """Values in a local safetensors checkpoint, read from its headers (0 for anything else)."""
    path = Path(source)
    if not path.is_dir() or not any(path.glob("*.safetensors")):
        return 0
    reader = CheckpointReader(path)
    elements = 0
    for name, file in reader.where.items():
        with safe_open(str(file), "pt") as f:
            elements += math.prod(f.get_slice(name).get_shape())
    return elements


def should_stream(source: str | os.PathLike, dtype_bytes: int = 4, fraction: float = 0.6) -> bool:
    """Stream when the float model would take more than `fraction` of the available memory."""
    return checkpoint_elements(source) * dtype_bytes > fraction * memory_limit_bytes()
