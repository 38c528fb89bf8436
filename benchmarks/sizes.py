"""One table across model sizes: perplexity ÷ dense for uniform SVD-LLM(W), the best allocator without recovery,
and the recommended recipe, at every ratio measured, and a plot of it (issue 22).

    python benchmarks/sizes.py   # reads results/recovery_*.json, streamed_*.json and recommended_*_mem.json,
                                 # writes sizes.{json,md,png}

It computes nothing itself: every number comes from a `benchmarks/recovery.py` run (one JSON per model and
ratio set, e.g. `recovery.py --model qwen2.5-0.5b --ratios 0.2,0.4 --cells uniform:none,loss-aware:none,\
loss-aware:distill --name recovery_qwen05`) or a `benchmarks/streamed_recipes.py` one (the models too large for
recovery.py's in-memory cells, and the streamed recipe: local signal + layer-wise healing) or, for a recipe run
by the CLI itself, a `stage_memory.py --name recommended_<model>_<ratio>_mem -- compress …` run paired with the
`svdzip eval MODEL OUT --json` of its output saved beside it as `<name>_eval.json`, so a cell here can be
traced to the command that produced it. A ratio to dense is always taken within one file (one protocol).
Where several files measured the same cell the latest run wins. A model's size is its parameter count (the
float32 checkpoint's bytes / 4, `svdzip.assets.MODELS`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common import RESULTS, setup_logging, write_results

from svdzip.assets import MODELS
from svdzip.recover.config import METHOD_DEFAULTS

CORPORA = ("wiki", "austen")
RECOMMENDED = ("loss-aware", "distill")
#: the recipe's distillation steps (a cell healed with another number says so)
DEFAULT_STEPS = METHOD_DEFAULTS["distill"]["steps"]
STREAMED_RECIPE = ("loss-aware (local signal)", "layerwise")
#: streamed_recipes.py's allocator names → recovery.py's start names (uniform ranks streamed = in memory, tested)
STREAMED_STARTS = {"uniform": "uniform", "fisher": "loss-aware", "local": "loss-aware (local signal)"}


def params_of(model: str) -> float:
    spec = MODELS.get(model)
    return spec.float32_bytes / 4 if spec and spec.float32_bytes else float("nan")


def collect(files: list[Path]) -> dict[str, dict[str, Any]]:
    """model -> {"dense": ppl, "cells": {(ratio, start, recovery): ppl}, "sources": [...]}, later runs winning."""
    by_model: dict[str, dict[str, Any]] = {}
    runs = []
    for f in files:
        data = json.loads(f.read_text())
        if "dense" not in data or "cells" not in data:
            continue
        runs.append((data.get("provenance", {}).get("date", ""), f.name, data))
    for _date, name, data in sorted(runs, key=lambda r: (r[0], r[1])):
        entry = by_model.setdefault(data["model"], {"dense": None, "cells": {}, "sources": []})
        dense = data["dense"].get("ppl", data["dense"])  # recovery.py nests it; streamed_recipes.py does not
        entry["dense"] = entry["dense"] or dense  # the table's line of dense figures: the first run's protocol
        entry["sources"].append(name)
        for c in data["cells"]:
            ratios = {k: c["ppl"][k] / dense[k] for k in CORPORA if k in c["ppl"]}
            start, recovery = ((STREAMED_STARTS[c["allocator"]], c["heal"]) if "mode" in c
                               else (c["start"], c["recovery"]))
            entry["cells"][(round(c["ratio"], 2), start, recovery)] = {"ppl": c["ppl"], "x_dense": ratios,
                                                                       "file": name}
    return by_model


def collect_cli_runs(files: list[Path], by_model: dict[str, dict[str, Any]]) -> None:
    """Add the recipe runs of the CLI (`stage_memory.py … -- compress`, with `<name>_eval.json` beside them):
    one cell each, its ratio to dense taken within its evaluation file; runs without an evaluation are skipped."""
    for f in files:
        evaluation = f.with_name(f.stem + "_eval.json")
        if not evaluation.is_file():
            continue
        run = json.loads(f.read_text())
        summary, argv = run.get("summary") or {}, run.get("argv") or []
        if "--model" not in argv or "recipe" not in summary:
            continue
        model = argv[argv.index("--model") + 1]
        recipe = summary["recipe"]
        ppls = json.loads(evaluation.read_text())
        dense = {c: next(iter(v.values()))["ppl"] for c, v in ppls.get(model, {}).items()}
        out = next((k for k in ppls if k != model), None)
        if not dense or out is None:
            continue
        ppl = {c: next(iter(v.values()))["ppl"] for c, v in ppls[out].items()}
        entry = by_model.setdefault(model, {"dense": None, "cells": {}, "sources": []})
        entry["dense"] = entry["dense"] or dense
        entry["sources"].append(f.name)
        key = (round(recipe["ratio"], 2), recipe["allocator"], recipe.get("heal") or "none")
        entry["cells"][key] = {"ppl": ppl, "x_dense": {c: ppl[c] / dense[c] for c in CORPORA if c in ppl},
                               "file": f.name, "heal_steps": (recipe.get("healing") or {}).get("steps")}


def summarise(by_model: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows: model, ratio, and ×dense for uniform, the best allocator without recovery, the recommended recipe."""
    rows = []
    for model, entry in sorted(by_model.items(), key=lambda kv: params_of(kv[0])):
        for ratio in sorted({k[0] for k in entry["cells"]}):
            cells = {k[1:]: v for k, v in entry["cells"].items() if k[0] == ratio}
            unrecovered = {start: v for (start, rec), v in cells.items() if rec == "none" and start != "uniform"}
            best = min(unrecovered.items(), key=lambda kv: kv[1]["x_dense"].get("austen", float("inf")),
                       default=(None, None))
            rows.append({
                "model": model, "params": params_of(model), "ratio": ratio,
                "uniform": cells.get(("uniform", "none"), {}).get("x_dense"),
                "best_allocator": best[0], "best": best[1]["x_dense"] if best[1] else None,
                "recommended": cells.get(RECOMMENDED, {}).get("x_dense"),
                "recommended_steps": cells.get(RECOMMENDED, {}).get("heal_steps"),
                "streamed_recipe": cells.get(STREAMED_RECIPE, {}).get("x_dense"),
            })
    return rows


def markdown(rows: list[dict[str, Any]], by_model: dict[str, dict[str, Any]]) -> str:
    def fmt(x: dict[str, float] | None) -> str:
        return " / ".join(f"{x[c]:.2f}×" for c in CORPORA if c in x) if x else "—"

    lines = ["| model | params | removed | uniform SVD-LLM(W) | best allocator, no recovery | "
             "recommended (loss-aware + distill) | streamed recipe (local signal + layer-wise) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        best = f"{r['best_allocator']}: {fmt(r['best'])}" if r["best_allocator"] else "—"
        steps = r.get("recommended_steps")
        recommended = fmt(r["recommended"]) + (f" ({steps} heal steps)" if steps and steps != DEFAULT_STEPS else "")
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.0f} M | {100 * r['ratio']:.0f}% | {fmt(r['uniform'])} | "
                     f"{best} | {recommended} | {fmt(r['streamed_recipe'])} |")
    dense = "; ".join(f"{m}: " + " / ".join(f"{e['dense'][c]:.2f}" for c in CORPORA) for m, e in by_model.items())
    sources = "; ".join(f"{m}: {', '.join(e['sources'])}" for m, e in by_model.items())
    return ("### Perplexity ÷ dense across model sizes (`wiki` / `austen`)\n\n" + "\n".join(lines)
            + f"\n\nDense perplexity (`wiki` / `austen`): {dense}.\n\nFrom `benchmarks/results/`: {sources}.")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted({r["ratio"] for r in rows})
    fig, axes = plt.subplots(len(CORPORA), len(ratios), figsize=(5 * len(ratios), 3.6 * len(CORPORA)),
                             squeeze=False)
    for i, corpus in enumerate(CORPORA):
        for j, ratio in enumerate(ratios):
            ax = axes[i][j]
            for key, label, style in (("uniform", "uniform SVD-LLM(W)", "o--"),
                                      ("best", "best allocator, no recovery", "s-"),
                                      ("recommended", "recommended (+ distill)", "^-"),
                                      ("streamed_recipe", "streamed recipe (+ layer-wise)", "v:")):
                pts = [(r["params"], r[key][corpus]) for r in rows
                       if r["ratio"] == ratio and r[key] and corpus in r[key]]
                if pts:
                    ax.plot(*zip(*sorted(pts), strict=True), style, label=label)
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{corpus}, {100 * ratio:.0f}% removed")
            ax.set_xlabel("parameters")
            ax.set_ylabel("perplexity ÷ dense")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--glob", default="recovery_*.json,streamed_*.json",
                   help="result files to read in benchmarks/results/ (comma-separated patterns)")
    p.add_argument("--cli-glob", default="recommended_*_mem.json",
                   help="CLI recipe runs (stage_memory.py) whose `<name>_eval.json` lies beside them")
    p.add_argument("--name", default="sizes")
    args = p.parse_args()
    setup_logging()
    by_model = collect(sorted({f for pattern in args.glob.split(",") for f in RESULTS.glob(pattern)}))
    collect_cli_runs(sorted(RESULTS.glob(args.cli_glob)), by_model)
    rows = summarise(by_model)
    plot(rows, RESULTS / f"{args.name}.png")
    payload = {"rows": rows, "models": {m: {"dense": e["dense"], "sources": e["sources"],
                                            "cells": [{"ratio": k[0], "start": k[1], "recovery": k[2], **v}
                                                      for k, v in e["cells"].items()]}
                                        for m, e in by_model.items()}}
    write_results(args.name, payload, markdown(rows, by_model) + f"\n\n![sizes]({args.name}.png)")


if __name__ == "__main__":
    main()
