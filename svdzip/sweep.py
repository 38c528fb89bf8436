"""`svdzip sweep`: methods × ratios × models → one JSON, a paper-style Markdown table and PNG plots.

Why resumable: a cell (one model, one method, one ratio) costs minutes on a CPU, and a sweep is
run again whenever a method lands or a task is added. Each finished part of a cell (perplexity per
corpus, accuracy per task, speed) is written to `results.json` as soon as it is measured and is
never recomputed; a rerun only compresses the cells that still miss something. The evaluation
settings that change a number (tokens, window, limit, calibration) are stored beside the results,
and a rerun with different ones is refused rather than mixed into one table.

A sweep is a list of recipes × ratios × models. A cell's recipe is named by a spec string, the inverse of
`Recipe.label` (`svdllm`, `svd`, `svdllm+drank`, `svdllm+share2`, `svdllm+update`, `svdllm+drank+update`,
`svdllm+share2+update-coef`: the papers' protocol, uniform unless an allocator is named, no recovery), or
by a recipe file (`recipes/mine.yaml`, any recipe `svdzip compress` wrote), whose ratio the sweep sets.
Every cell is compressed by the runner (`engine.driver`), like `svdzip compress`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from svdzip.allocate import AllocationCache
from svdzip.errors import SvdzipError
from svdzip.methods.factorisations import get_method
from svdzip.passes.update import get_update
from svdzip.recipe import Recipe

log = logging.getLogger(__name__)

DENSE_LABEL = "dense"
RESULTS_FILE = "results.json"


# --------------------------------------------------------------------------- method specs


def parse_label(label: str) -> dict[str, Any]:
    """`svdllm+share2+drank+update` → Recipe fields; inverts `Recipe.label`.

    Parts after the method, in any order: `shareN` (Basis Sharing over N layers), `update`
    (SVD-LLM's closed-form update), `update-coef`, anything else is the allocator's name.
    """
    parts = [p.strip() for p in label.strip().split("+")]
    if not parts or not parts[0]:
        raise SvdzipError(f"empty method spec '{label}'")
    method, rest = parts[0], parts[1:]
    try:
        get_method(method)
    except SvdzipError as exc:
        raise SvdzipError(f"method spec '{label}': {exc}") from None
    fields: dict[str, Any] = {"method": method, "allocator": "uniform", "group_size": 1, "update": None}
    seen_allocator = False
    for part in rest:
        if part.startswith("share") and part[5:].isdigit():
            fields["group_size"] = int(part[5:])
        elif part == "update" or part.startswith("update-"):
            upd = "svdllm" if part == "update" else part[len("update-"):]
            try:
                get_update(upd)
            except SvdzipError as exc:
                raise SvdzipError(f"method spec '{label}': {exc}") from None
            fields["update"] = upd
        elif part and not seen_allocator:
            fields["allocator"], seen_allocator = part, True
        else:
            raise SvdzipError(f"method spec '{label}': cannot read '{part}' (one allocator per spec)")
    return fields


def is_recipe_file(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml"))


def config_from_label(label: str, ratio: float, base: Recipe | None = None) -> Recipe:
    """The validated recipe of a cell: a recipe file's, or the label's fields over `base`, at `ratio`."""
    if is_recipe_file(label):
        recipe = Recipe.load(label)
        return replace(recipe, ratio=ratio, budget_bytes=None, budget_fraction=None,
                       device=(base or recipe).device).validate()
    base = base or Recipe.plain()
    return replace(base, **parse_label(label), ratio=ratio).validate()


# --------------------------------------------------------------------------- spec and store


@dataclass
class SweepSpec:
    models: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    methods: list[str] = field(default_factory=lambda: ["svdllm"])
    ratios: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.6])
    corpora: list[str] = field(default_factory=lambda: ["wiki", "austen"])
    eval_tokens: int = 16384
    seq_len: int = 2048
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None
    zs_batch_size: int = 16
    speed: bool = False
    speed_batches: list[int] = field(default_factory=lambda: [1, 4])
    speed_seq_lens: list[int] = field(default_factory=lambda: [128])
    speed_new_tokens: int = 32
    speed_repeats: int = 3
    speed_clock: str = "wall"
    calib_corpus: str = "wiki"
    calib_samples: int = 64
    calib_seq_len: int = 512
    seed: int = 0
    device: str = "cpu"
    metric: str = "acc"  # zero-shot column of the table: acc or acc_norm

    def fixed(self) -> dict[str, Any]:
        """The settings every stored number depends on: a rerun must agree on them."""
        keys = ("eval_tokens", "seq_len", "limit", "calib_corpus", "calib_samples", "calib_seq_len", "seed",
                "speed_batches", "speed_seq_lens", "speed_new_tokens", "speed_clock")
        return {k: getattr(self, k) for k in keys}

    def cells(self) -> list[tuple[str, str, float]]:
        out = []
        for model in self.models:
            out.append((model, DENSE_LABEL, 0.0))
            out.extend((model, method, float(r)) for method in self.methods for r in self.ratios)
        return out


def cell_key(model: str, method: str, ratio: float) -> str:
    return f"{model}|{method}|{ratio:.4g}"


class ResultStore:
    """`results.json` in the output directory, rewritten atomically after every measured part."""

    def __init__(self, out_dir: str | os.PathLike, spec: SweepSpec):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / RESULTS_FILE
        self.data: dict[str, Any] = {"fixed": spec.fixed(), "cells": {}}
        if self.path.exists():
            stored = json.loads(self.path.read_text())
            if stored.get("fixed") != spec.fixed():
                diff = {k: (stored.get("fixed", {}).get(k), v) for k, v in spec.fixed().items()
                        if stored.get("fixed", {}).get(k) != v}
                raise SvdzipError(f"{self.path} was produced with other settings (stored, now): {diff}; "
                                  "use another --out or the same settings")
            self.data = stored
            log.info("resuming %s: %d cells stored", self.path, len(self.data["cells"]))

    def cell(self, key: str) -> dict[str, Any]:
        return self.data["cells"].setdefault(key, {})

    def save(self, provenance: dict[str, Any] | None = None) -> None:
        if provenance is not None:
            self.data["provenance"] = provenance
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


def missing_parts(cell: dict[str, Any], spec: SweepSpec, method: str) -> dict[str, list[str] | bool]:
    """What a cell still lacks: corpora, tasks, speed."""
    ppl = cell.get("perplexity", {})
    acc = cell.get("zero_shot", {})
    return {
        "corpora": [c for c in spec.corpora if c not in ppl],
        "tasks": [t for t in spec.tasks if t not in acc],
        "speed": bool(spec.speed and method != DENSE_LABEL and "speed" not in cell),
        "compress": method != DENSE_LABEL and "summary" not in cell,
    }


def _needs_work(parts: dict[str, Any]) -> bool:
    return bool(parts["corpora"] or parts["tasks"] or parts["speed"] or parts["compress"])


# --------------------------------------------------------------------------- the work (patchable in tests)


def provenance() -> dict[str, Any]:
    """Commit and machine that produced the sweep."""
    import sys

    from svdzip.report.tables import provenance as run_provenance

    return run_provenance(" ".join(["svdzip", *sys.argv[1:]]))


def load(model: str, device: str) -> tuple[nn.Module, Any, str]:
    from svdzip.output.loading import load_model

    return load_model(model, device)


def calibration(model: nn.Module, tokenizer: Any, source: str, base: Recipe
                ) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """Calibration tokens, (cached on disk by prepare_statistics) statistics and the held-out calibration windows
    that parts tuning or guarding on them use (the statistics never see them), once per model."""
    from svdzip.data import calibration_tokens, load_corpus
    from svdzip.engine.pipeline import prepare_statistics

    drawn = calibration_tokens(tokenizer, load_corpus(base.corpus), base.calib_samples + base.heldout_samples,
                               base.calib_seq_len, base.seed)  # the first calib_samples: the same as drawn alone
    tokens = drawn[: base.calib_samples]
    return tokens, prepare_statistics(model, tokens, source, base), drawn[base.calib_samples :]


@dataclass
class SweepCache:
    """What the cells of one model share, owned by `run_sweep`: spectra (they depend on the model, statistics
    and factorisation, not on the ratio or the allocator) and the allocators' reusable results."""

    spectra: dict[tuple, Any] = field(default_factory=dict)
    allocation: AllocationCache = field(default_factory=AllocationCache)


def compress_cell(model: nn.Module, config: Recipe, stats: Any, tokens: torch.Tensor,
                  cache: SweepCache | None = None, tokenizer: Any = None,
                  heldout: torch.Tensor | None = None) -> dict[str, Any]:
    """Compress `model` in place through the runner; the summary of the run."""
    from svdzip.engine.driver import compress

    cache = cache if cache is not None else SweepCache()
    key = (repr(sorted(getattr(stats, "meta", {}).items())), config.method, config.group_size,
           tuple(config.share_roles), config.asvd_alpha, config.asvd_scaling)
    t0 = time.perf_counter()
    uses_stats = bool(get_method(config.method).needs(config).statistics)
    result = compress(model, config, stats=stats if uses_stats else None, calib_tokens=tokens, heldout_tokens=heldout,
                      tokenizer=tokenizer, units=cache.spectra.get(key), allocation_cache=cache.allocation)
    if result.units is not None:
        cache.spectra[key] = result.units
    summary = dict(result.summary)
    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    summary["dense_modules"] = sum(1 for r in result.ranks.values() if r is None)
    return summary


def perplexities(model: nn.Module, tokenizer: Any, corpora: list[str], spec: SweepSpec, label: str
                 ) -> dict[str, float]:
    from svdzip.evaluate.perplexity import perplexity_on_corpora

    res = perplexity_on_corpora(model, tokenizer, corpora, ("svdllm",), spec.seq_len, spec.eval_tokens or None,
                                spec.device, label=label)
    return {c: by["svdllm"].ppl for c, by in res.items()}


def zero_shot(model: nn.Module, tokenizer: Any, tasks: list[str], spec: SweepSpec) -> dict[str, dict[str, Any]]:
    from svdzip.evaluate.zeroshot import evaluate_zero_shot

    return evaluate_zero_shot(model, tokenizer, tasks, limit=spec.limit, batch_size=spec.zs_batch_size,
                              device=spec.device)


def speed(dense: nn.Module, model: nn.Module, label: str, spec: SweepSpec) -> dict[str, Any]:
    """Dense and compressed alternately in this process; ratios to dense."""
    from svdzip.evaluate.speed import measure_speed, parse_settings, summary_row

    settings = parse_settings(spec.speed_batches, spec.speed_seq_lens, spec.speed_new_tokens)
    res = measure_speed({DENSE_LABEL: dense, label: model}, settings, repeats=spec.speed_repeats,
                        reference=DENSE_LABEL, clock=spec.speed_clock)
    return {"summary": summary_row(res, label), "dense": summary_row(res, DENSE_LABEL), **res}


# --------------------------------------------------------------------------- the sweep


def run_sweep(spec: SweepSpec, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Run (or finish) every cell, then write results.json, results.md and the plots."""
    for m in spec.methods:
        config_from_label(m, spec.ratios[0] if spec.ratios else 0.2)
    for r in spec.ratios:
        Recipe(ratio=r).validate()
    store = ResultStore(out_dir, spec)
    prov = provenance()
    store.data.setdefault("runs", []).append(prov)
    todo = [(m, meth, r) for m, meth, r in spec.cells()
            if _needs_work(missing_parts(store.data["cells"].get(cell_key(m, meth, r), {}), spec, meth))]
    log.info("sweep: %d cells, %d to compute", len(spec.cells()), len(todo))
    base = Recipe.plain(corpus=spec.calib_corpus, calib_samples=spec.calib_samples,
                        calib_seq_len=spec.calib_seq_len, seed=spec.seed, device=spec.device)
    by_model: dict[str, list[tuple[str, float]]] = {}
    for m, meth, r in todo:
        by_model.setdefault(m, []).append((meth, r))
    bar = tqdm(total=len(todo), desc="sweep", unit="cell")
    for model_name, cells in by_model.items():
        dense, tokenizer, source = load(model_name, spec.device)
        calib: tuple[torch.Tensor, Any] | None = None
        cache = SweepCache()
        for method, ratio in cells:
            key = cell_key(model_name, method, ratio)
            cell = store.cell(key)
            cell.update({"model": model_name, "method": method, "ratio": ratio, "commit": prov.get("commit")})
            parts = missing_parts(cell, spec, method)
            t0 = time.perf_counter()
            if method == DENSE_LABEL:
                model = dense
                cell.setdefault("summary", {"model_params": sum(p.numel() for p in dense.parameters())})
            else:
                if calib is None:
                    calib = calibration(dense, tokenizer, source, base)
                config = config_from_label(method, ratio, base)
                model = copy.deepcopy(dense)
                summary = compress_cell(model, config, calib[1], calib[0], cache, tokenizer, heldout=calib[2])
                cell["summary"] = summary
            store.save(prov)
            if parts["corpora"]:
                cell.setdefault("perplexity", {}).update(
                    perplexities(model, tokenizer, parts["corpora"], spec, f"{method}@{ratio:g}"))
                store.save(prov)
            if parts["tasks"]:
                cell.setdefault("zero_shot", {}).update(zero_shot(model, tokenizer, parts["tasks"], spec))
                store.save(prov)
            if parts["speed"]:
                cell["speed"] = speed(dense, model, method, spec)
                store.save(prov)
            cell["seconds"] = round(cell.get("seconds", 0.0) + time.perf_counter() - t0, 1)
            store.save(prov)
            if model is not dense:
                del model
            bar.update()
        del dense
    bar.close()
    write_reports(store.data, spec, Path(out_dir), redraw=bool(todo))
    return store.data


# --------------------------------------------------------------------------- reports


def _selected(data: dict[str, Any], spec: SweepSpec) -> list[dict[str, Any]]:
    cells = data["cells"]
    return [cells[k] for k in (cell_key(*c) for c in spec.cells()) if k in cells]


def _avg(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if len(vals) == len(values) and vals else None


def _row_values(cell: dict[str, Any], spec: SweepSpec) -> dict[str, Any]:
    ppl = cell.get("perplexity", {})
    zs = cell.get("zero_shot", {})
    accs = [zs[t][spec.metric] if t in zs else None for t in spec.tasks]
    sp = cell.get("speed", {}).get("summary", {})
    is_dense = cell["method"] == DENSE_LABEL
    return {"ppl": [ppl.get(c) for c in spec.corpora], "acc": accs, "avg": _avg(accs) if spec.tasks else None,
            "decode": 1.0 if is_dense and spec.speed else sp.get("decode_speedup"),
            "prefill": 1.0 if is_dense and spec.speed else sp.get("prefill_speedup"),
            "achieved": cell.get("summary", {}).get("ratio_achieved")}


def markdown(data: dict[str, Any], spec: SweepSpec) -> str:
    """The papers' layout: ratio, method, perplexity per corpus, accuracy per task, average, speed."""
    from svdzip.report.tables import table

    prov = data.get("provenance", {})
    parts = []
    for model in spec.models:
        cells = [c for c in _selected(data, spec) if c["model"] == model]
        if not cells:
            continue
        headers = ["ratio", "method", *(f"{c} ppl↓" for c in spec.corpora), *(f"{t}↑" for t in spec.tasks)]
        if spec.tasks:
            headers.append("average↑")
        if spec.speed:
            headers += ["decode ×dense", "prefill ×dense"]
        rows = []
        for c in sorted(cells, key=lambda c: (c["ratio"], spec.methods.index(c["method"])
                                              if c["method"] in spec.methods else -1)):
            v = _row_values(c, spec)
            ratio = "0% (dense)" if c["method"] == DENSE_LABEL else f"{100 * c['ratio']:.0f}%"
            if v["achieved"] is not None and abs(v["achieved"] - c["ratio"]) > 0.005:
                ratio += f" ({100 * v['achieved']:.1f}%)"
            row = [ratio, c["method"], *(_fmt(x, 2) for x in v["ppl"]), *(_fmt(x, 3) for x in v["acc"])]
            if spec.tasks:
                row.append(_fmt(v["avg"], 3))
            if spec.speed:
                row += [_fmt(v["decode"], 2), _fmt(v["prefill"], 2)]
            rows.append(row)
        parts.append(f"### {model}\n\n{table(headers, rows)}")
    notes = [f"Perplexity: non-overlapping windows of {spec.seq_len} tokens (SVD-LLM protocol), at most "
             f"{spec.eval_tokens or 'all'} evaluation tokens per corpus, disjoint from the calibration text "
             f"({spec.calib_samples} × {spec.calib_seq_len} tokens of '{spec.calib_corpus}')."]
    if spec.tasks:
        notes.append(f"Zero-shot: `{spec.metric}`, 0-shot log-likelihood scoring (lm-evaluation-harness "
                     f"protocol), {'first ' + str(spec.limit) if spec.limit else 'all'} validation documents "
                     "per task; average over the tasks shown.")
    if spec.speed:
        notes.append(f"Speed: throughput relative to the dense model measured alternately in the same process "
                     f"(geometric mean over batch {spec.speed_batches} × prompt {spec.speed_seq_lens}, "
                     f"{spec.speed_new_tokens} greedy new tokens, median of {spec.speed_repeats}, "
                     f"{spec.speed_clock} clock); on a shared CPU differences under ~10 % are noise.")
    notes.append("Ratio = fraction of decoder-linear parameters removed; the achieved ratio is shown in "
                 "brackets where it differs from the request.")
    commits = sorted({str(c.get("commit")) for c in _selected(data, spec) if c.get("commit")})
    if len(commits) > 1:
        notes.append(f"Cells were computed at several commits: {', '.join(commits)} (see results.json).")
    if prov:
        notes.append(f"Produced by `{prov.get('command')}` at commit {prov.get('commit')} on {prov.get('machine')}, "
                     f"{prov.get('date')}.")
    return "\n\n".join(parts) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def _fmt(x: float | None, digits: int) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and (math.isinf(x) or math.isnan(x)):
        return str(x)
    return f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.3g}"


def plots(data: dict[str, Any], spec: SweepSpec, out_dir: Path) -> list[Path]:
    """ppl vs ratio per method (log), average accuracy vs ratio, decode speed vs ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for model in spec.models:
        cells = [c for c in _selected(data, spec) if c["model"] == model]
        if not cells:
            continue
        dense = next((c for c in cells if c["method"] == DENSE_LABEL), None)
        safe = model.replace("/", "_")
        panels: list[tuple[str, str, Any]] = [(f"{c} perplexity", "log", ("ppl", i))
                                              for i, c in enumerate(spec.corpora)]
        if spec.tasks:
            panels.append((f"average zero-shot {spec.metric}", "linear", ("avg", None)))
        if spec.speed:
            panels.append(("decode throughput × dense", "linear", ("decode", None)))
            panels.append(("prefill throughput × dense", "linear", ("prefill", None)))
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
        for ax, (title, scale, (what, idx)) in zip(axes[0], panels, strict=True):
            def value(c: dict[str, Any], what: str = what, idx: int | None = idx) -> float | None:
                v = _row_values(c, spec)[what]
                return v[idx] if idx is not None else v

            for method in spec.methods:
                pts = sorted((c["ratio"], value(c)) for c in cells if c["method"] == method)
                pts = [(r, y) for r, y in pts if y is not None and math.isfinite(y)]
                if pts:
                    ax.plot([100 * r for r, _ in pts], [y for _, y in pts], marker="o", label=method)
            if dense is not None and value(dense) is not None:
                ax.axhline(value(dense), color="gray", linestyle="--", label="dense")
            ax.set_yscale(scale)
            ax.set_xlabel("parameters removed (%)")
            ax.set_title(title, fontsize=10)
            ax.grid(True, alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(model, fontsize=11)
        fig.subplots_adjust(left=0.06, right=0.98, bottom=0.15, top=0.82, wspace=0.3)
        path = out_dir / f"sweep_{safe}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_reports(data: dict[str, Any], spec: SweepSpec, out_dir: Path, redraw: bool = True) -> None:
    """results.md always; the plots when a number changed or a plot is missing (drawing is slow)."""
    md = markdown(data, spec)
    (out_dir / "results.md").write_text(md)
    missing = any(not (out_dir / f"sweep_{m.replace('/', '_')}.png").exists() for m in spec.models)
    pngs = plots(data, spec, out_dir) if redraw or missing else []
    log.info("wrote %s and %s", out_dir / "results.md", ", ".join(str(p) for p in pngs) or "no plots")


README_START, README_END = "<!-- sweep:start -->", "<!-- sweep:end -->"


def check_readme(readme: str | os.PathLike) -> Path:
    """Refuse a README without exactly one marker pair *before* a long sweep starts, not after."""
    path = Path(readme)
    if not path.is_file():
        raise SvdzipError(f"--readme {path}: no such file")
    text = path.read_text()
    if text.count(README_START) != 1 or text.count(README_END) != 1 or text.index(README_START) > text.index(
            README_END):
        raise SvdzipError(f"--readme {path}: needs one '{README_START}' line followed by one '{README_END}' line; "
                          "the sweep's table replaces what lies between them")
    return path


def update_readme(readme: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Replace the README's marked block with the sweep's results.md and links to its plots."""
    path = check_readme(readme)
    out = Path(out_dir)
    body = (out / "results.md").read_text().replace("### ", "#### ")
    pngs = sorted(out.glob("sweep_*.png"))
    links = [f"![{p.stem}]({os.path.relpath(p, path.parent)})" for p in pngs]
    block = "\n".join([README_START, "", body.strip(), "", *links, "", README_END])
    text = path.read_text()
    start, end = text.index(README_START), text.index(README_END) + len(README_END)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text[:start] + block + text[end:])
    tmp.replace(path)
    log.info("updated the results block of %s", path)
    return path


__all__ = ["SweepSpec", "check_readme", "config_from_label", "markdown", "parse_label", "run_sweep", "update_readme"]
