"""Pictures of an allocation, written next to the saved model: where the budget went, and why.

* `ranks.png`: kept-parameter fraction per layer × type (a heatmap; dense modules show 1.0).
* `effective_rank.png`: D-Rank's effective rank of every unit per layer, one line per type.
* `<allocator>_loss.png`, `<allocator>_ratios.png`, `<allocator>_history.json`: for an allocator that
  trains (ARA), drawn from the training history in its `Allocation.report` (`write_allocation_report`).

matplotlib runs headless (Agg); it is an optional dependency, so a missing install only logs a warning.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from svdzip.models.adapter import ROLES

if TYPE_CHECKING:
    from svdzip.allocate.base import Allocation
    from svdzip.methods.decompose import Unit

log = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _roles(seen: Sequence[str]) -> list[str]:
    return [r for r in ROLES if r in seen] + [r for r in dict.fromkeys(seen) if r not in ROLES]


def rank_heatmap(modules: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Layers × types heatmap of the kept fraction (params / dense params) of every module."""
    plt = _pyplot()
    roles = _roles([m["role"] for m in modules])
    layers = sorted({m["layer"] for m in modules})
    grid = [[float("nan")] * len(roles) for _ in layers]
    # a shared basis is counted at its leader: show the group's fraction on every member instead
    group_params: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for m in modules:
        g = group_params[m.get("shared_with") or m["name"]]
        g[0] += m["params"]
        g[1] += m["out_features"] * m["in_features"]
    for m in modules:
        kept, dense = group_params[m.get("shared_with") or m["name"]]
        grid[layers.index(m["layer"])][roles.index(m["role"])] = kept / dense
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(roles), 1.0 + 0.22 * len(layers)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(len(roles)), roles)
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax.set_xlabel("matrix type")
    ax.set_ylabel("layer")
    ax.set_title(title or "kept parameter fraction (1 = dense)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def effective_rank_plot(entries: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Effective rank per layer, one line per type (a group's value is drawn at each of its layers)."""
    plt = _pyplot()
    by: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for e in entries:
        for layer in e["layers"]:
            by[e["role"]].append((layer, float(e["effective_rank"])))
    fig, ax = plt.subplots(figsize=(7, 4))
    for role in _roles(list(by)):
        pts = sorted(by[role])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=role)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("effective rank exp(H(σ²/Σσ²))")
    ax.set_title(title or "effective rank of the whitened spectrum", fontsize=9)
    ax.legend(fontsize=8, ncol=4)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(out_dir: str | Path, modules: Sequence[dict[str, Any]],
                effective_ranks: Sequence[dict[str, Any]] = (), title: str = "") -> list[Path]:
    """Both plots into `out_dir`; returns what was written (nothing, with a warning, without matplotlib)."""
    try:
        _pyplot()
    except ImportError:
        log.warning("matplotlib is not installed; no allocation plots written")
        return []
    out = Path(out_dir)
    written = [rank_heatmap(modules, out / "ranks.png", title)]
    if effective_ranks:
        written.append(effective_rank_plot(effective_ranks, out / "effective_rank.png", title))
    log.info("allocation plots: %s", ", ".join(str(p) for p in written))
    return written


def training_curve(history: Sequence[dict[str, float]], path: str | Path, title: str) -> Path:
    """Total loss and LM cross-entropy per step, with the expected kept ratio on a second axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["loss"] for h in history], label="total loss", lw=1)
    ax.plot(steps, [h["ce"] for h in history], label="LM cross-entropy", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(steps, [h["kept"] for h in history], color="k", ls="--", lw=1, label="expected kept ratio")
    ax2.set_ylabel("kept ratio R_tot")
    ax.legend(loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def kept_ratio_per_layer(units: Sequence[Unit], ranks: Sequence[int | None], path: str | Path, title: str) -> Path:
    """Kept parameter ratio of every unit per layer, one line per type (1 = dense)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    by_role: dict[str, list[tuple[int, float]]] = {}
    for u, r in zip(units, ranks, strict=True):
        ratio = 1.0 if r is None else r * u.cost_per_rank / u.dense_params
        by_role.setdefault(u.role, []).append((u.layers[0], ratio))
    for role, pts in by_role.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=1, label=role)
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("kept parameter ratio (1 = dense)")
    ax.set_title(title)
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_allocation_report(out_dir: str | Path, units: Sequence[Unit], allocation: Allocation) -> list[Path]:
    """What a training allocator reported, into `out_dir`: its history as JSON and, unless the report says
    `plots: false`, the training curve and the learned ratio per layer. Nothing for other allocators."""
    report = allocation.report
    if "history" not in report:
        return []
    name = allocation.allocator or "allocator"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    history_path = out / f"{name}_history.json"
    history_path.write_text(json.dumps({k: v for k, v in report.items() if k != "plots"}, indent=1, default=str))
    written = [history_path]
    if not report.get("plots", True):
        return written
    try:
        _pyplot()
    except ImportError:
        log.warning("matplotlib is not installed; %s plots skipped", name)
        return written
    written.append(training_curve(report["history"], out / f"{name}_loss.png", f"{name.upper()} mask training"))
    written.append(kept_ratio_per_layer(units, allocation.ranks, out / f"{name}_ratios.png",
                                        f"{name.upper()}: learned ratio per layer"))
    return written
