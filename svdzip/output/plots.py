"""Pictures of an allocation, written next to the saved model: where the budget went, and why.

* `ranks.png`: kept-parameter fraction per layer × type (a heatmap; dense modules show 1.0).
* `effective_rank.png`: D-Rank's effective rank of every unit per layer, one line per type.

matplotlib runs headless (Agg); it is an optional dependency, so a missing install only logs a warning.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from svdzip.models.adapter import ROLES

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
