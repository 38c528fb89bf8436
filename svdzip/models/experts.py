"""MoE experts as real linears: the fused 3-D expert parameters of transformers 5, opened per expert.

transformers 5 keeps an MoE block's experts as two 3-D parameters (`gate_up_proj`: E×2I×H with gate
rows first, `down_proj`: E×H×I) and loops over them with `F.linear`. svdzip needs every expert's
projections to be modules: a forward pre-hook on one then sees exactly the tokens the router sends
that expert (its own Gram matrix), and a `LowRankLinear` can take its place. `RoutedExperts` is the
same computation (same routing, same weighting, same summation) over a list of `ExpertMLP`s of
`nn.Linear`, called with the same arguments as the module it replaces; the router stays untouched.

The per-expert linears carry the names of the original (pre-v5) checkpoints (`experts.3.gate_proj`,
Mixtral's `experts.3.w1`), so a saved directory lists them the way those checkpoints did.
"""

from __future__ import annotations

import torch
from torch import nn

from svdzip.errors import SvdzipError
from svdzip.models.families import FusedExperts


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) · up(x)), each projection an `nn.Linear` (or its low-rank replacement)."""

    def __init__(self, names: FusedExperts, gate: nn.Module, up: nn.Module, down: nn.Module, act_fn: nn.Module):
        super().__init__()
        self._names = (names.gate, names.up, names.down)
        for name, module in zip(self._names, (gate, up, down), strict=True):
            self.add_module(name, module)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self._names)
        return down(self.act_fn(gate(x)) * up(x))


class RoutedExperts(nn.ModuleList):
    """The experts of one MoE block as a list of `ExpertMLP`s, with the fused module's forward signature."""

    @property
    def num_experts(self) -> int:
        return len(self)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """Σ over the chosen experts of weight · expert(token), token by token (transformers' eager loop)."""
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            chosen = top_k_index.T  # top_k × tokens, visited as transformers does: by slot, then token
        for index, expert in enumerate(self):
            slot, token = torch.where(chosen == index)
            if token.numel() == 0:  # an expert no token chose is not called: its statistics hold only routed tokens
                continue
            y = expert(hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def _check_layout(fused: nn.Module, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    gate_up, down = getattr(fused, "gate_up_proj", None), getattr(fused, "down_proj", None)
    layout = {k: getattr(fused, k, d) for k, d in (("is_transposed", False), ("is_concatenated", True),
                                                   ("has_bias", False), ("has_gate", True),
                                                   ("has_post_expert_norm", False))}
    expected = {"is_transposed": False, "is_concatenated": True, "has_bias": False, "has_gate": True,
                "has_post_expert_norm": False}
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor) or gate_up.ndim != 3 \
            or down.ndim != 3 or layout != expected:
        raise SvdzipError(
            f"{where} ({type(fused).__name__}) is not an expert layout svdzip can open: it reads 3-D "
            f"gate_up_proj (experts × 2·intermediate × hidden, gate rows first) and down_proj "
            f"(experts × hidden × intermediate) without biases; this module has {layout}")
    experts, two_inter, hidden = gate_up.shape
    if two_inter % 2 or tuple(down.shape) != (experts, hidden, two_inter // 2):
        raise SvdzipError(f"{where}: gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} "
                          "do not describe the same experts")
    return gate_up, down


def _linear(weight: torch.Tensor) -> nn.Linear:
    """An `nn.Linear` owning a copy of `weight` (a copy, so no two saved tensors share storage)."""
    out, inp = weight.shape
    module = nn.Linear(inp, out, bias=False, device="meta", dtype=weight.dtype)
    module.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    return module


def open_experts(fused: nn.Module, names: FusedExperts, where: str = "experts") -> RoutedExperts:
    """The per-expert equivalent of a fused experts module (weights copied, or left on meta if they are)."""
    gate_up, down = _check_layout(fused, where)
    inter = gate_up.shape[1] // 2
    act_fn = fused.act_fn
    return RoutedExperts(
        ExpertMLP(names, _linear(gate_up[e, :inter]), _linear(gate_up[e, inter:]), _linear(down[e]), act_fn)
        for e in range(gate_up.shape[0]))


def open_fused_experts(layers: nn.ModuleList, names: FusedExperts, layers_path: str) -> int:
    """Open every layer's fused experts in place (idempotent); returns how many blocks were opened.

    Layers without an MoE block at `names.path` (Qwen3-MoE's mlp_only_layers) are left as they are.
    """
    parent_path, _, child = names.path.rpartition(".")
    opened = 0
    for index, layer in enumerate(layers):
        try:
            parent = layer.get_submodule(parent_path) if parent_path else layer
        except AttributeError:
            continue
        fused = getattr(parent, child, None)
        if fused is None or isinstance(fused, RoutedExperts):
            continue
        setattr(parent, child, open_experts(fused, names, f"{layers_path}.{index}.{names.path}"))
        opened += 1
    return opened
