"""ASVD's sensitivity-based truncation rank search (STRS, methods-spec §2.3) as the allocator `strs`.

1. Sensitivity: for every unit ℓ and candidate kept ratio ρ (default 0.1 … 0.9, so that high removal
   ratios are reachable), factorise *only* ℓ at `rank = int(m·n·ρ)/(m+n)` under the run's metric
   (ASVD's scaling with `--method asvd`; any method works) and measure perplexity on calibration text.
2. Flatten (ℓ, ρ, ppl), sort by ppl descending; the entries from `mid` on are the allowed choices,
   each unit takes its smallest allowed ρ (dense if none). Binary search for the largest `mid`
   (least damage) whose parameters fit the budget — ASVD's search, but never over budget.

Cost is what makes STRS slow (ASVD: 5.5 A100-hours on LLaMA-7B), so here:

* the dense model's hidden states before every layer are computed once; one measurement only runs
  the layers from the unit's first layer onward (and the head), on those cached inputs;
* `samples` / `seq_len` (options) choose how much calibration text the sensitivity uses;
* `stop_factor` (option, 0 = off): scanning ρ downwards, once ppl exceeds stop_factor × dense ppl the
  smaller ρ of that unit are taken as +inf without measuring (they sort first and are never chosen
  unless the budget forces it, when the search fails loudly instead);
* the table is cached on disk, keyed by the units' spectra (which fix model, statistics and method),
  the tokens used and the candidates: a second run, at any ratio, skips straight to the search.

Options (declared on `STRS`): candidates (list of kept ratios), samples (8), seq_len (0 = calibration
length), batch_size (samples), stop_factor (0), cache (true | false | a directory).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from svdzip.allocate import options as opt
from svdzip.allocate.base import Allocation, AllocationContext, Allocator
from svdzip.budget import DENSE, max_useful_rank
from svdzip.core.layerwise import capture_layer_inputs, layer_on, non_layers_on, run_layer, to_device
from svdzip.errors import InfeasibleBudget, SvdzipError
from svdzip.methods.decompose import Unit
from svdzip.methods.linalg import truncate
from svdzip.needs import Needs

log = logging.getLogger(__name__)

DEFAULT_CANDIDATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CACHE_FORMAT = 1


def candidate_rank(unit: Unit, kept: float) -> int:
    """ASVD's per-layer rank at param ratio `kept`: floor(int(m·n·ρ) / (m + n)), at least 1."""
    return max(1, int(int(unit.rows * unit.cols * kept) / (unit.rows + unit.cols)))


def _params(unit: Unit, kept: float) -> int:
    if kept >= 1.0:
        return unit.dense_params
    rank = candidate_rank(unit, kept)
    return unit.dense_params if rank > max_useful_rank(unit.rows, unit.cols) else rank * unit.cost_per_rank


def _cache_key(units: list[Unit], tokens: torch.Tensor, candidates: tuple[float, ...], stop: float,
               model_type: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": CACHE_FORMAT, "model_type": model_type, "candidates": candidates,
                         "stop": stop, "tokens": list(tokens.shape)}).encode())
    h.update(tokens.to(torch.int64).numpy().tobytes())
    for u in units:
        h.update(u.name.encode())
        h.update(u.spectrum.sigma2.double().numpy().tobytes())
    return h.hexdigest()[:20]


def _cache_path(where: bool | str, key: str) -> Path | None:
    if where is False:
        return None
    if where is True:
        from svdzip.assets import cache_dir

        return cache_dir() / "strs" / f"{key}.json"
    return Path(where) / f"{key}.json"


class _SuffixEvaluator:
    """Calibration perplexity of the model, re-running only the layers from `start` onward."""

    def __init__(self, ctx: AllocationContext, tokens: torch.Tensor, batch_size: int):
        from svdzip.passes.fisher import logits_from_final_hidden, next_token_nll

        self.model, self.adapter, self.device = ctx.model, ctx.adapter, torch.device(ctx.device)
        self.tokens, self.batch_size = tokens, batch_size
        self._logits, self._nll = logits_from_final_hidden, next_token_nll
        self.count = tokens.shape[0] * (tokens.shape[1] - 1)
        inputs = capture_layer_inputs(self.model, self.adapter, tokens, batch_size, self.device)
        self.kwargs = inputs.kwargs
        self.hidden = [inputs.hidden]  # hidden[i] = dense inputs of layer i, per batch
        for i in tqdm(range(self.adapter.num_layers), desc="STRS: dense layer inputs", unit="layer"):
            self.hidden.append(self._layer(i, self.hidden[i]))
        self.dense_ppl = self._head(self.hidden[-1])

    def _layer(self, index: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        with layer_on(self.adapter.layers[index], self.device) as layer:
            return run_layer(layer, hidden, self.kwargs[index], self.device)

    @torch.no_grad()
    def _head(self, hidden: list[torch.Tensor]) -> float:
        total = 0.0
        with non_layers_on(self.model, self.adapter, self.device):
            for b, h in enumerate(hidden):
                ids = to_device(self.tokens[b * self.batch_size : (b + 1) * self.batch_size], self.device)
                total += float(self._nll(self._logits(self.model, self.adapter, ids, h.to(self.device)), ids))
        mean = total / self.count
        return math.exp(mean) if mean < 700 else math.inf

    def ppl_from(self, start: int) -> float:
        hidden = self.hidden[start]
        for i in range(start, self.adapter.num_layers):
            hidden = self._layer(i, hidden)
        return self._head(hidden)


@torch.no_grad()
def sensitivity_table(units: list[Unit], ctx: AllocationContext, candidates: tuple[float, ...],
                      tokens: torch.Tensor, batch_size: int, stop_factor: float) -> tuple[float, list[dict]]:
    """(dense ppl, [{ρ: ppl} per unit]): calibration perplexity with only that unit factorised."""
    evaluator = _SuffixEvaluator(ctx, tokens, batch_size)
    dense = evaluator.dense_ppl
    table: list[dict[float, float]] = [{} for _ in units]
    order = sorted(range(len(units)), key=lambda j: min(units[j].layers))
    bar = tqdm(total=len(units) * len(candidates), desc="STRS sensitivity", unit="eval")
    for j in order:
        unit = units[j]
        modules = [ctx.adapter.module(m.name) for m in unit.members]
        originals = [mod.weight.data for mod in modules]
        stacked = torch.cat(originals, 0)
        start = min(unit.layers)
        exploded = False
        for kept in sorted(candidates, reverse=True):
            bar.update(1)
            if exploded:
                table[j][kept] = math.inf
                continue
            a, b = truncate(stacked, unit.spectrum.basis.to(stacked.device), candidate_rank(unit, kept))
            approx = (a.double() @ b.double()).to(stacked.dtype)
            offset = 0
            for mod, info in zip(modules, unit.members, strict=True):
                mod.weight.data = approx[offset : offset + info.out_features]
                offset += info.out_features
            try:
                ppl = evaluator.ppl_from(start)
            finally:
                for mod, w in zip(modules, originals, strict=True):
                    mod.weight.data = w
            table[j][kept] = ppl
            exploded = stop_factor > 0 and ppl > stop_factor * dense
        bar.set_postfix(unit=unit.name.split("layers.")[-1], refresh=False)
    bar.close()
    return dense, table


def search(units: list[Unit], table: list[dict[float, float]], budget: int) -> list[float]:
    """ASVD's binary search: the largest cut-off `mid` whose choices fit the budget; kept ratio per unit."""
    entries = sorted(((ppl, j, kept) for j, row in enumerate(table) for kept, ppl in row.items()),
                     key=lambda e: -e[0])

    def choice(mid: int) -> list[float]:
        kept = [1.0] * len(units)
        for _, j, rho in entries[mid:]:
            kept[j] = min(kept[j], rho)
        return kept

    def cost(mid: int) -> int:
        return sum(_params(u, k) for u, k in zip(units, choice(mid), strict=True))

    if cost(0) > budget:
        raise InfeasibleBudget(f"STRS cannot meet the budget even at the smallest candidate ratio "
                          f"({cost(0)} > {budget} parameters); add smaller candidates")
    lo, hi = 0, len(entries)  # invariant: cost(lo) ≤ budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return choice(lo)


class STRS(Allocator):
    name = "strs"
    summary = "ASVD's sensitivity-based truncation rank search (calibration perplexity per matrix and ratio)"
    options = (
        opt.numbers("candidates", list(DEFAULT_CANDIDATES), "kept ratios each matrix is measured at",
                    parse=opt.numbers_where(lambda c: 0.0 < c < 1.0,
                                            "candidates are kept ratios strictly between 0 and 1")),
        opt.integer("samples", 8, "calibration rows the perplexity uses", minimum=1),
        opt.integer("seq_len", 0, "tokens per row (0 = the calibration length)", minimum=0),
        opt.Option("batch_size", "whole number ≥ 1 or auto", None, "rows per forward (auto = samples)",
                   opt.or_none(opt.at_least(opt.as_integer, 1))),
        opt.number("stop_factor", 0.0, "stop measuring a matrix once ppl exceeds this × dense (0 = off)",
                   parse=opt.at_least(opt.as_number, 0.0), kind="number ≥ 0"),
        opt.Option("cache", "true, false or a directory", True, "keep the sensitivity table on disk",
                   opt.flag_or_path),
    )

    def needs(self, options: Mapping[str, Any] | None = None) -> Needs:
        return Needs(calib_tokens=True, whole_model=True,
                     why=("STRS measures calibration perplexity of the whole model with one matrix factorised at a "
                          "time",))

    def allocate(self, units: list[Unit], ctx: AllocationContext) -> Allocation:
        if ctx.model is None or ctx.adapter is None or ctx.calib_tokens is None:
            raise SvdzipError("the strs allocator measures perplexity: it needs the model and calibration tokens")
        o = ctx.options
        candidates = tuple(sorted(o["candidates"]))
        seq_len = o["seq_len"] or ctx.calib_tokens.shape[1]
        tokens = ctx.calib_tokens[: o["samples"], :seq_len].cpu()
        if tokens.shape[1] < 2:
            raise SvdzipError("STRS needs calibration sequences of at least 2 tokens")
        batch_size = o["batch_size"] or tokens.shape[0]
        stop_factor = o["stop_factor"]

        key = _cache_key(units, tokens, candidates, stop_factor, ctx.adapter.model_type)
        path = _cache_path(o["cache"], key)
        table: list[dict[float, float]] | None = None
        if path is not None and path.is_file():
            try:
                saved: dict[str, Any] = json.loads(path.read_text())
                rows = saved["table"]
                table = [{float(k): float(v) for k, v in rows[u.name].items()} for u in units]
                log.info("STRS: reusing the sensitivity table %s (dense calibration ppl %.3f)", path,
                         saved["dense_ppl"])
            except (OSError, KeyError, ValueError) as exc:
                log.warning("STRS: ignoring unreadable sensitivity cache %s (%s)", path, exc)
                table = None
        if table is None:
            log.info("STRS: measuring %d units × %d candidates on %d × %d calibration tokens", len(units),
                     len(candidates), tokens.shape[0], tokens.shape[1])
            dense, table = sensitivity_table(units, ctx, candidates, tokens, batch_size, stop_factor)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text(json.dumps({"dense_ppl": dense, "candidates": candidates,
                                           "table": {u.name: {str(k): v for k, v in row.items()}
                                                     for u, row in zip(units, table, strict=True)}}, indent=1))
                tmp.replace(path)
                log.info("STRS: sensitivity table cached at %s", path)
        kept = search(units, table, ctx.budget)
        ranks = [DENSE if k >= 1.0 else candidate_rank(u, k) for u, k in zip(units, kept, strict=True)]
        log.info("STRS: %d of %d units kept dense; kept ratios %s", sum(r is DENSE for r in ranks), len(units),
                 {k: kept.count(k) for k in sorted(set(kept))})
        return Allocation(ranks, {"kept_ratios": dict(zip((u.name for u in units), kept, strict=True))})
