"""Shared plumbing of the benchmark scripts: one model load, cached statistics, one evaluation routine.

Every benchmark writes `benchmarks/results/<name>.json` and `.md` and records the command, the
commit and the machine, so a number in the README can be traced to a re-runnable command.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from svdzip.allocate import AllocationCache
from svdzip.data import calibration_tokens, load_corpus
from svdzip.engine.driver import compress
from svdzip.engine.pipeline import prepare_statistics
from svdzip.evaluate.perplexity import perplexity_on_corpora
from svdzip.output.loading import load_model
from svdzip.recipe import Recipe
from svdzip.report.tables import provenance

RESULTS = Path(__file__).parent / "results"
log = logging.getLogger("benchmarks")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("transformers").setLevel(logging.ERROR)


class Bench:
    """One model with its calibration tokens and statistics, compressed afresh for every cell."""

    def __init__(self, model: str = "smollm2-135m", corpus: str = "wiki", samples: int = 64, seq_len: int = 512,
                 seed: int = 0, device: str = "cpu"):
        self.model_name, self.device = model, device
        self.base = Recipe.plain(corpus=corpus, calib_samples=samples, calib_seq_len=seq_len, seed=seed,
                                   device=device)
        model_, self.tokenizer, self.source = load_model(model, device)
        drawn = calibration_tokens(self.tokenizer, load_corpus(corpus), samples + self.base.heldout_samples, seq_len,
                                   seed)  # its first `samples` windows are the same as drawn alone
        # the held-out calibration windows a recipe may tune or guard on (--rounding choose); never evaluation text
        self.tokens, self.heldout = drawn[:samples], drawn[samples:]
        self.stats = prepare_statistics(model_, self.tokens, self.source, self.base)
        self._spectra: dict[tuple, list] = {}  # spectra depend on the factorisation, not on ratio or allocator
        self.allocation_cache = AllocationCache()  # loss-aware's Fisher, speedaware's timings: the same every cell
        self.run = provenance()  # this process's provenance record, however often it writes results
        del model_

    def fresh(self):
        return load_model(self.source, self.device)[0]

    def compress(self, tokenizer: Any = None, **overrides: Any):
        """The model compressed with the base recipe and `overrides`; give `tokenizer` where the recipe heals."""
        cfg = dataclasses.replace(self.base, **overrides)
        model = self.fresh()
        key = (cfg.method, cfg.group_size, tuple(cfg.share_roles), cfg.asvd_alpha, cfg.asvd_scaling)
        t0 = time.perf_counter()
        result = compress(model, cfg, stats=self.stats, calib_tokens=self.tokens, heldout_tokens=self.heldout,
                          units=self._spectra.get(key), allocation_cache=self.allocation_cache, tokenizer=tokenizer)
        result.summary["wall_s"] = round(time.perf_counter() - t0, 2)
        if result.units is not None:
            self._spectra[key] = result.units
        return result

    def zero_shot(self, model, tasks: str, limit: int) -> dict[str, dict]:
        """`evaluate_zero_shot` on `tasks` ('all' = the 8 tasks, else comma-separated), first `limit` documents."""
        from svdzip.evaluate.zeroshot import ZERO_SHOT_TASKS, evaluate_zero_shot

        names = list(ZERO_SHOT_TASKS) if tasks == "all" else tasks.split(",")
        return evaluate_zero_shot(model, self.tokenizer, names, limit=limit, batch_size=16, device=self.device)

    def perplexity(self, model, corpora=("wiki", "austen"), max_tokens: int = 16384, seq_len: int = 2048,
                   protocols=("svdllm",)) -> dict[str, float]:
        res = perplexity_on_corpora(model, self.tokenizer, list(corpora), protocols, seq_len, max_tokens,
                                    self.device)
        return {c: by[protocols[0]].ppl for c, by in res.items()}


def accuracies(scores: dict[str, dict]) -> dict[str, float]:
    """acc per task of `Bench.zero_shot`'s scores, and their average."""
    out = {t: s["acc"] for t, s in scores.items()}
    return {**out, "average": sum(out.values()) / len(out)}


def cpu_seconds(fn) -> float:
    """This process's CPU time for `fn()` (robust on a shared machine; with one thread, its cost)."""
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def write_results(name: str, payload: dict[str, Any], markdown: str, run: dict[str, Any] | None = None) -> None:
    """Write <name>.json and .md; a benchmark that adds cells to an earlier file keeps every run's provenance.

    `run` is this run's provenance (`provenance()`, e.g. `Bench.run`): a benchmark that writes after every
    cell passes the same record each time, so it is listed once.
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    run = dict(run) if run is not None else provenance()
    earlier = payload.get("runs") or ([payload["provenance"]] if "provenance" in payload else [])
    runs = [r for r in earlier if r != run] + [run]
    payload = {**payload, "provenance": run, "runs": runs}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))
    lines = [f"`{r['command']}` at commit {r['commit']} on {r['machine']}, {r['date']}" for r in runs]
    footer = ("Produced by " + lines[0] + "." if len(lines) == 1 else
              "Produced by these runs, later ones adding or replacing cells:\n\n" + "\n".join(f"- {x}" for x in lines))
    (RESULTS / f"{name}.md").write_text(f"{markdown}\n\n{footer}\n")
    log.info("wrote %s", RESULTS / f"{name}.md")


def rewrite_results(name: str, markdown, plot) -> None:
    """Redraw <name>.md (keeping its provenance footer) and <name>.png from <name>.json, without measuring."""
    data = json.loads((RESULTS / f"{name}.json").read_text())
    plot(data, RESULTS / f"{name}.png")
    footer = (RESULTS / f"{name}.md").read_text().split("\n\nProduced by", 1)[1]
    (RESULTS / f"{name}.md").write_text(f"{markdown(data)}\n\nProduced by{footer}")


class PeakRSS:
    """Peak resident memory per phase, sampled by a background thread."""

    def __init__(self) -> None:
        self.phase, self.peaks, self._stop = "start", {}, False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop:
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.rss())
            time.sleep(0.005)

    def enter(self, phase: str) -> None:
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.rss())
        self.phase = phase

    def stop(self) -> dict[str, int]:
        self.enter("end")
        self._stop = True
        self.thread.join()
        return self.peaks
