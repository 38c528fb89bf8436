"""Slimmed linears (MoDeGPT's modules): `nn.Linear`s of smaller shapes, and linears that keep a subset of their
rows or columns (`models.sliced`), recorded in the manifest so that `from_pretrained` builds them at those
shapes before the weights (and the index lists, stored as buffers) load."""

from __future__ import annotations

from typing import Any

from torch import nn

from svdzip.errors import SvdzipError
from svdzip.models.sliced import ColumnSubsetLinear, RowSubsetLinear, SlimLinear

KINDS = {"linear": SlimLinear, "rows": RowSubsetLinear, "cols": ColumnSubsetLinear}


def _kind(module: nn.Module) -> str:
    for kind, cls in KINDS.items():
        if type(module) is cls:
            return kind
    raise SvdzipError(f"{type(module).__name__} is not a slimmed linear")


def slimmed_record(rows: list[Any], model: nn.Module) -> dict[str, dict[str, Any]]:
    """The manifest's `slimmed` section: every slimmed linear's kind and stored shape (what `apply_slimmed` builds)."""
    record = {}
    for row in rows:
        if getattr(row, "width", None) is None:
            continue
        module = model.get_submodule(row.name)
        kind = _kind(module)
        entry = {"kind": kind, "in": module.in_features, "out": module.out_features, "bias": module.bias is not None,
                 "width": row.width}
        if kind != "linear":
            entry["kept"] = int(module.index.numel())
        record[row.name] = entry
    return record


def apply_slimmed(model: nn.Module, record: dict[str, dict[str, Any]]) -> None:
    """Replace each listed linear by an empty module of its stored kind and shape, before the weights load."""
    for name, spec in record.items():
        try:
            old = model.get_submodule(name)
        except AttributeError as exc:
            raise SvdzipError(f"manifest lists the slimmed {name}, which this model does not have") from exc
        kind = spec.get("kind", "linear")
        if kind not in KINDS:
            raise SvdzipError(f"manifest gives {name} the unknown slimmed kind '{kind}' (a newer svdzip?)")
        weight = getattr(old, "weight", None)
        where = {"device": weight.device if weight is not None else None,
                 "dtype": weight.dtype if weight is not None else None}
        if kind == "linear":
            new = SlimLinear(spec["in"], spec["out"], bias=spec.get("bias", False), **where)
        else:
            new = KINDS[kind](spec["in"], spec["out"], spec["kept"], bias=spec.get("bias", False), **where)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
