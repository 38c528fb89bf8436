"""Architectures as data: where the decoder layers are, which linears they hold, which share an input.

The algorithms never name a module path themselves; they ask a `ModelAdapter`. A new family is one
`FamilySpec` entry in `svdzip.models.families.FAMILIES`, not a new code path. Opening a model whose
MoE experts are fused 3-D parameters replaces them, in place, by per-expert linears (same logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from svdzip.errors import SvdzipError
from svdzip.models.experts import open_fused_experts
from svdzip.models.families import FAMILIES, ROLES, FamilySpec

__all__ = ["FAMILIES", "ROLES", "FamilySpec", "LinearInfo", "ModelAdapter", "family_of", "model_device",
           "open_structure"]

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


def _expand(root: nn.Module, pattern: str) -> list[tuple[str, str]]:
    """Every (path, scope) under `root` that `pattern` names, in module order; a `*` segment is each child
    of the container there. `scope` is the path up to the last wildcard's child ('' without wildcards):
    the linears of one scope read their own inputs (one expert's gate and up)."""
    found: list[tuple[nn.Module, str, str]] = [(root, "", "")]
    for part in pattern.split("."):
        step = []
        for module, path, scope in found:
            if part == "*":
                for name, child in module.named_children():
                    step.append((child, f"{path}{name}.", f"{path}{name}"))
            elif isinstance(getattr(module, part, None), nn.Module):
                step.append((getattr(module, part), f"{path}{part}.", scope))
        found = step
    return [(path.rstrip("."), scope) for _, path, scope in found]


def family_of(model: nn.Module) -> tuple[str, FamilySpec | None]:
    """The model's type and its family entry (None when svdzip does not know it)."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    return model_type, FAMILIES.get(model_type)


def open_structure(model: nn.Module) -> int:
    """Give a known family the module structure svdzip compresses: fused 3-D experts become per-expert
    linears, GPT-2's Conv1D become nn.Linear. Idempotent; also what the reload path does before a
    checkpoint's weights load."""
    _, spec = family_of(model)
    if spec is None:
        return 0
    layers = _get(model, spec.layers_path)
    opened = open_fused_experts(layers, spec.experts, spec.layers_path) if spec.experts else 0
    return opened + (_open_conv1d(layers) if spec.conv1d else 0)


def _open_conv1d(layers: nn.Module) -> int:
    """Replace transformers' Conv1D (y = x W + b, W in×out) by the equivalent nn.Linear (W out×in)."""
    from transformers.pytorch_utils import Conv1D

    opened = 0
    for name, module in list(layers.named_modules()):
        if isinstance(module, Conv1D):
            linear = nn.Linear(module.nx, module.nf, device="meta", dtype=module.weight.dtype)
            linear.weight = nn.Parameter(module.weight.detach().T.contiguous())
            linear.bias = nn.Parameter(module.bias.detach().clone())
            parent, _, child = name.rpartition(".")
            setattr(layers.get_submodule(parent) if parent else layers, child, linear)
            opened += 1
    return opened


class ModelAdapter:
    """The one place that knows the architecture of a causal LM."""

    def __init__(self, model: nn.Module):
        self.model = model
        config = model.config
        self.model_type, spec = family_of(model)
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
        open_structure(model)
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

    @property
    def is_moe(self) -> bool:
        return self.spec.experts is not None

    def _input_key(self, prefix: str, role: str, scope: str) -> str:
        """One key per tensor read: the layer (or one expert of it) and the roles that read it."""
        group = next((g for g in self.spec.shared_inputs if role in g), (role,))
        return f"{prefix}.{scope}:{'+'.join(group)}" if scope else f"{prefix}:{'+'.join(group)}"

    def _layer_linears(self, index: int) -> list[LinearInfo]:
        layer = self.layers[index]
        prefix = f"{self.spec.layers_path}.{index}"
        found = []
        for role, patterns in self.spec.linears.items():
            matches = [m for pattern in patterns for m in _expand(layer, pattern)]
            if not matches and role not in self.spec.optional_roles:
                raise SvdzipError(f"layer {index} of '{self.model_type}' has no '{' or '.join(patterns)}'")
            for path, scope in matches:
                shape = _linear_shape(_get(layer, path), f"{prefix}.{path}")
                found.append(
                    LinearInfo(
                        name=f"{prefix}.{path}",
                        layer=index,
                        role=role,
                        input_key=self._input_key(prefix, role, scope),
                        out_features=shape[0],
                        in_features=shape[1],
                    )
                )
        if not found:
            raise SvdzipError(f"layer {index} of '{self.model_type}' has none of the linears svdzip compresses")
        return found

    def layer_linears(self, index: int) -> list[LinearInfo]:
        return list(self._linears[index])

    def linears(self) -> list[LinearInfo]:
        return [info for layer in self._linears for info in layer]

    def module(self, name: str) -> nn.Module:
        return _get(self.model, name)

    def set_module(self, name: str, new: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        setattr(_get(self.model, parent_name) if parent_name else self.model, child, new)

    def layer_of(self, info: LinearInfo) -> nn.Module:
        return self.layers[info.layer]

    def relative_name(self, info: LinearInfo) -> str:
        """Path of a linear inside its decoder layer (for hooks registered on the layer)."""
        return info.name.removeprefix(f"{self.spec.layers_path}.{info.layer}.")

    def decoder_linear_params(self) -> int:
        return sum(info.dense_params for info in self.linears())

    def describe(self) -> str:
        experts = ""
        if self.is_moe:
            counts = {sum(1 for i in layer if i.role == "expert_down") for layer in self._linears}
            experts = f", {'/'.join(str(c) for c in sorted(counts))} experts per layer (router dense)"
        return (
            f"{self.model_type}: {self.num_layers} layers, {self.num_heads} heads, "
            f"{self.num_kv_heads} KV heads, head_dim {self.head_dim}{experts}"
        )


def _linear_shape(module: nn.Module, name: str) -> tuple[int, int]:
    """(out, in) of a dense or already low-rank linear."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if hasattr(module, "out_features") and hasattr(module, "in_features"):
        return module.out_features, module.in_features
    raise SvdzipError(f"expected a linear layer at {name}, found {type(module).__name__}")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
