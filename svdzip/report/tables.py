"""Tables a person reads at a glance: per-matrix, per-layer × type ranks, and result summaries."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from svdzip.models.adapter import ROLES


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table (also readable as plain text)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v != v or v in (float("inf"), float("-inf")):
                return str(v)
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.4e}"
        return "" if v is None else str(v)

    body = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(list(headers)), sep, *(line(r) for r in body)])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def rank_grid(modules: Sequence[dict[str, Any]], value: str = "rank") -> tuple[list[str], list[list[Any]]]:
    """Layers × roles: the rank (or kept fraction) of every module; 'dense' where kept dense, '4b+r12' where
    stored at 4 bits with a compensation of rank 12, 'w48' where slimmed (MoDeGPT) to 48 neurons or head dims.

    Several modules of one role in a layer (the experts of an MoE block) show as their range, "lo–hi".
    """
    cells: dict[int, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
    roles_seen: list[str] = []
    for m in modules:
        if m["role"] not in roles_seen:
            roles_seen.append(m["role"])
        v = m.get(value)
        if value == "rank":
            v = storage_cell(m)
        cells[m["layer"]][m["role"]].append(v)
    grid = {layer: {role: _cell(values) for role, values in by_role.items()} for layer, by_role in cells.items()}
    roles = [r for r in ROLES if r in roles_seen] + [r for r in roles_seen if r not in ROLES]
    rows = [[layer, *(grid[layer].get(r, "") for r in roles)] for layer in sorted(grid)]
    return ["layer", *roles], rows


def storage_cell(m: dict[str, Any]) -> Any:
    """How one module is stored: its rank, 'dense', '4b' / '4b+r12' (4 bits with a rank-12 correction),
    'r128@4b' (rank-128 factors at 4 bits), or 'w1024' (slimmed by MoDeGPT to 1024 neurons, or to 48 dimensions
    per head)."""
    if m.get("width") is not None:
        return f"w{m['width']}"
    if m.get("bits") and m.get("rank") is not None:
        return f"r{m['rank']}@{m['bits']}b"
    if m.get("bits"):
        return f"{m['bits']}b" + (f"+r{m['compensation_rank']}" if m.get("compensation_rank") else "")
    return "dense" if m.get("rank") is None else m["rank"]


def _cell(values: list[Any]) -> Any:
    if len(values) == 1:
        return values[0]
    numbers = [v for v in values if isinstance(v, int | float)]
    dense = len(values) - len(numbers)
    if not numbers:
        return "dense"
    lo, hi = min(numbers), max(numbers)
    fmt = (lambda x: f"{x:.2f}") if any(isinstance(v, float) for v in numbers) else str
    text = fmt(lo) if lo == hi else f"{fmt(lo)}–{fmt(hi)}"
    return text + (f" ({dense} dense)" if dense else "")


def role_summary(modules: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Per role: modules, how many dense (16/32-bit), how many at low bits, kept parameter fraction (a low-bit
    matrix as its bytes / 2), mean relative whitened loss."""
    acc: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for m in modules:
        a = acc[m["role"]]
        a["n"] += 1
        a["dense"] += m["rank"] is None and not m.get("bits")
        a["lowbit"] += bool(m.get("bits"))
        a["params"] += m["params"]
        a["dense_params"] += m["out_features"] * m["in_features"]
        a["loss"] += m["loss"]
    rows = []
    for role in [r for r in ROLES if r in acc] + [r for r in acc if r not in ROLES]:
        a = acc[role]
        rows.append([role, int(a["n"]), int(a["dense"]), int(a["lowbit"]), a["params"] / a["dense_params"],
                     a["loss"] / a["n"]])
    return ["type", "modules", "dense", "low-bit", "kept params", "mean rel. loss"], rows


def module_table(modules: Sequence[dict[str, Any]]) -> str:
    rows = [[m["name"], storage_cell(m), f"{m['kept']:.3f}",
             f"{m['loss']:.4f}", f"{m['seconds']:.2f}"] for m in modules]
    return table(["module", "rank", "kept", "rel. loss", "time s"], rows)


def provenance(command: str | None = None) -> dict[str, Any]:
    """Which command, commit and machine produced a result (for every benchmark and sweep table)."""
    import os
    import platform
    import subprocess
    import sys
    import time
    from pathlib import Path

    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    return {"command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "commit": commit,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                       f"threads {torch.get_num_threads()}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
