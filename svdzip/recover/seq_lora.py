"""SVD-LLM's parameter update with sequential low-rank approximation (methods-spec §3.3), with peft.

Each factorised linear is W' = W_u W_v (`left` = W_u, out×k; `right` = W_v, k×in). Phase one puts a
LoRA adapter on every W_u with every W_v frozen, trains it and merges it (W_u ← W_u + B_u A_u);
phase two does the same for every W_v. Merged, every factor keeps its shape, so the result is an
ordinary svdzip model at the same ranks. A shared Basis-Sharing basis is one module used by several
linears: it gets one adapter, and every linear that shares it is pointed at the adapted module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from svdzip.errors import SvdzipError
from svdzip.models.lowrank import LowRankLinear


def phase_sides(order: str) -> list[str]:
    """The factor trained in each phase: `u-first` (the released code) or `v-first` (the paper's Table 5)."""
    return ["left", "right"] if order == "u-first" else ["right", "left"]


def low_rank_modules(model: nn.Module) -> dict[str, LowRankLinear]:
    """Every LowRankLinear by its name (named_modules lists a shared basis only under its first owner)."""
    found = {name: m for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, LowRankLinear)}
    if not found:
        raise SvdzipError("the model has no factorised linears: nothing to recover")
    return found


def factor_targets(model: nn.Module, side: str) -> list[str]:
    """Module names of the `side` factors, each distinct module once (a shared basis under its owner); factors
    stored packed at low bits (not an `nn.Linear`) are left out: they stay as quantized."""
    seen: set[int] = set()
    names = []
    for name, module in low_rank_modules(model).items():
        factor = getattr(module, side)
        if isinstance(factor, nn.Linear) and id(factor) not in seen:
            seen.add(id(factor))
            names.append(f"{name}.{side}")
    return names


def _repoint_shared(model: nn.Module, side: str) -> None:
    """Make every linear that shares a basis use its owner's (possibly adapter-wrapped) module."""
    modules = low_rank_modules(model)
    for module in modules.values():
        leader = getattr(module, "_tied_weights_keys", {}).get(f"{side}.weight")
        if leader:
            owner = modules[leader.rsplit(".", 2)[0]]
            setattr(module, side, getattr(owner, side))


@contextmanager
def lora_on(model: nn.Module, side: str, r: int, alpha: float, dropout: float) -> Iterator[nn.Module]:
    """Yield the model with LoRA adapters on every `side` factor (only they train); merge on exit, every
    other parameter's `requires_grad` as it was."""
    from peft import LoraConfig, get_peft_model

    flags = [(p, p.requires_grad) for p in model.parameters()]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=factor_targets(model, side))
    peft_model = get_peft_model(model, config)
    _repoint_shared(model, side)
    try:
        yield peft_model
    finally:
        merged = peft_model.merge_and_unload()
        _repoint_shared(merged, side)
        for p, flag in flags:
            p.requires_grad_(flag)
