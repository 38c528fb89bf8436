"""Slimmed linears (MoDeGPT's MLPs): plain `nn.Linear`s of smaller shapes, recorded in the manifest so that
`from_pretrained` builds them at those shapes before the weights load."""

from __future__ import annotations

from typing import Any

from torch import nn

from svdzip.errors import SvdzipError


def slimmed_record(rows: list[Any], model: nn.Module) -> dict[str, dict[str, Any]]:
    """The manifest's `slimmed` section: every slimmed linear's stored shape (what `apply_slimmed` rebuilds)."""
    record = {}
    for row in rows:
        if getattr(row, "width", None) is None:
            continue
        module = model.get_submodule(row.name)
        record[row.name] = {"in": module.in_features, "out": module.out_features, "bias": module.bias is not None,
                            "width": row.width}
    return record


def apply_slimmed(model: nn.Module, record: dict[str, dict[str, Any]]) -> None:
    """Replace each listed linear by an empty `nn.Linear` of its stored shape, before the weights load."""
    for name, spec in record.items():
        try:
            old = model.get_submodule(name)
        except AttributeError as exc:
            raise SvdzipError(f"manifest lists the slimmed {name}, which this model does not have") from exc
        weight = getattr(old, "weight", None)
        new = nn.Linear(spec["in"], spec["out"], bias=spec.get("bias", False),
                        device=weight.device if weight is not None else None,
                        dtype=weight.dtype if weight is not None else None)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
