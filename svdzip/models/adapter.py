"""Architectures as data: where the decoder layers are, which linears they hold, which share an input.

The algorithms never name a module path themselves; they ask a `ModelAdapter`. A new family is one
`FamilySpec` entry in `FAMILIES`, not a new code path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from svdzip.errors import SvdzipError

ROLES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class FamilySpec:
    """Where one architecture family keeps its decoder layers and linears."""

    layers_path: str
    linears: dict[str, str]  # role -> path inside a decoder layer
    shared_inputs: tuple[tuple[str, ...], ...]  # roles that read the very same input tensor


_LLAMA_LIKE = FamilySpec(
    layers_path="model.layers",
    linears={
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    },
    shared_inputs=(("q", "k", "v"), ("gate", "up")),
)

_OPT = FamilySpec(
    layers_path="model.decoder.layers",
    linears={
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.out_proj",
        "up": "fc1",
        "down": "fc2",
    },
    shared_inputs=(("q", "k", "v"),),
)

FAMILIES: dict[str, FamilySpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "opt": _OPT,
}


@dataclass(frozen=True)
class LinearInfo:
    """One compressible linear of the decoder."""

    name: str  # full module path, e.g. "model.layers.3.self_attn.q_proj"
    layer: int
    role: str
    input_key: str  # linears with the same key read the same input (one Gram matrix)
    out_features: int
    in_features: int

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features


def _get(obj: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class ModelAdapter:
    """The one place that knows the architecture of a causal LM."""

    def __init__(self, model: nn.Module):
        self.model = model
        config = model.config
        self.model_type: str = getattr(config, "model_type", type(model).__name__)
        spec = FAMILIES.get(self.model_type)
        if spec is None:
            raise SvdzipError(
                f"unsupported architecture '{self.model_type}' ({type(model).__name__}); "
                f"supported: {', '.join(sorted(FAMILIES))}"
            )
        self.spec = spec
        try:
            self.layers: nn.ModuleList = _get(model, spec.layers_path)
        except AttributeError as exc:
            raise SvdzipError(
                f"model of type '{self.model_type}' has no decoder layers at '{spec.layers_path}'"
            ) from exc
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.num_heads: int = text_config.num_attention_heads
        self.num_kv_heads: int = getattr(text_config, "num_key_value_heads", None) or self.num_heads
        self.head_dim: int = getattr(text_config, "head_dim", None) or (
            text_config.hidden_size // self.num_heads
        )
        self._linears = [self._layer_linears(i) for i in range(len(self.layers))]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def is_gqa(self) -> bool:
        return self.num_kv_heads < self.num_heads

    def _layer_linears(self, index: int) -> list[LinearInfo]:
        layer = self.layers[index]
        prefix = f"{self.spec.layers_path}.{index}"
        found = []
        for role, path in self.spec.linears.items():
            try:
                module = _get(layer, path)
            except AttributeError as exc:
                raise SvdzipError(f"layer {index} of '{self.model_type}' has no '{path}'") from exc
            shape = _linear_shape(module)
            group = next((g for g in self.spec.shared_inputs if role in g), (role,))
            found.append(
                LinearInfo(
                    name=f"{prefix}.{path}",
                    layer=index,
                    role=role,
                    input_key=f"{prefix}:{'+'.join(group)}",
                    out_features=shape[0],
                    in_features=shape[1],
                )
            )
        return found

    def layer_linears(self, index: int) -> list[LinearInfo]:
        return list(self._linears[index])

    def linears(self) -> list[LinearInfo]:
        return [info for layer in self._linears for info in layer]

    def module(self, name: str) -> nn.Module:
        return _get(self.model, name)

    def set_module(self, name: str, new: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        setattr(_get(self.model, parent_name), child, new)

    def layer_of(self, info: LinearInfo) -> nn.Module:
        return self.layers[info.layer]

    def relative_name(self, info: LinearInfo) -> str:
        """Path of a linear inside its decoder layer (for hooks registered on the layer)."""
        return self.spec.linears[info.role]

    def decoder_linear_params(self) -> int:
        return sum(info.dense_params for info in self.linears())

    def describe(self) -> str:
        return (
            f"{self.model_type}: {self.num_layers} layers, {self.num_heads} heads, "
            f"{self.num_kv_heads} KV heads, head_dim {self.head_dim}"
        )


def _linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a dense or already low-rank linear."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if hasattr(module, "out_features") and hasattr(module, "in_features"):
        return module.out_features, module.in_features
    raise SvdzipError(f"expected a linear layer, found {type(module).__name__}")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
