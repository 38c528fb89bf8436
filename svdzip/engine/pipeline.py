"""The runner's in-memory stages: statistics (cached by content), allocate → materialise (→ update), store.

`engine.driver` is the only caller: it computes the statistics and spectra in its mode and hands them here.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from svdzip.allocate import Allocation, AllocationCache, AllocationContext, allocate, spent
from svdzip.budget import keep_budget
from svdzip.core.statistics import CalibrationStats, default_stats_path, statistics_key
from svdzip.errors import InfeasibleBudget, SvdzipError
from svdzip.methods.decompose import Unit
from svdzip.methods.factorisations import get_method
from svdzip.methods.materialise import ModuleReport, materialise
from svdzip.models.adapter import ModelAdapter
from svdzip.passes.calibrate import collect_statistics
from svdzip.recipe import Recipe

log = logging.getLogger(__name__)


def count_params(model: nn.Module) -> int:
    """Unique parameters (a shared basis or tied embedding counted once)."""
    return sum(p.numel() for p in model.parameters())


@dataclass
class CompressionResult:
    model: nn.Module
    config: Recipe
    modules: list[ModuleReport]
    summary: dict[str, Any]
    ranks: dict[str, int | None] = field(default_factory=dict)
    effective_ranks: list[dict[str, Any]] = field(default_factory=list)  # per unit, for plots and reports
    units: list[Unit] | None = None  # the spectra, reusable for another ratio or allocator of the same method
    allocation_report: dict[str, Any] = field(default_factory=dict)  # what the allocator reported (ARA's history)
    quantized: list[str] = field(default_factory=list)  # the linears stored quantized (the recipe's --quantize)


def check_weights_finite(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise SvdzipError(f"model weight {name} contains NaN/Inf; refusing to compress it")


def factorise(
    model: nn.Module,
    config: Recipe,
    units: list[Unit],
    stats: CalibrationStats | None = None,
    calib_tokens: torch.Tensor | None = None,
    out_dir: Any = None,
    heldout_tokens: torch.Tensor | None = None,
    allocation_cache: AllocationCache | None = None,
    timings: dict[str, float] | None = None,
    healer: Any = None,
) -> CompressionResult:
    """Allocate ranks to the spectra, materialise them in `model` (in place), then the update; the runner's stage.

    The runner (`engine.driver`) computed the statistics and spectra in its mode and checked every part's
    needs before the model was touched. `healer(ranks)`, if given, makes the layer-wise heal that the
    materialisation walks through, one layer at a time (`recover.layerwise`).
    """
    adapter = ModelAdapter(model)
    timings = dict(timings or {})
    params_before = count_params(model)
    dense_linear = adapter.decoder_linear_params()

    t0 = time.perf_counter()
    given, units = units, list(units)  # the planner may add the untied head; the caller's spectra stay as given
    allocation, memory_plan, options = allocate_units(units, config, adapter, model=model,
                                                 calib_tokens=calib_tokens, heldout_tokens=heldout_tokens,
                                                 cache=allocation_cache, stats=stats)
    ranks = allocation.ranks
    timings["allocate_s"] = time.perf_counter() - t0
    if out_dir is not None:
        from svdzip.report.plots import write_allocation_report

        write_allocation_report(out_dir, units, allocation)

    # the update's target is the ORIGINAL weight's output: keep the dense modules (no copy) until then
    originals = {m.name: adapter.module(m.name) for u in units for m in u.members} if config.update else None
    check = BreakageCheck.before(model, heldout_tokens if heldout_tokens is not None else calib_tokens,
                                 config) if get_method(config.method).structured else None
    t0 = time.perf_counter()
    if healer is None:
        rows = materialise(adapter, units, ranks)
        timings["materialise_s"] = time.perf_counter() - t0
    else:
        rows = materialise_layers(adapter, units, ranks, healer(ranks), config.device)
        timings["materialise_heal_s"] = time.perf_counter() - t0

    if allocation.lowbit:
        t0 = time.perf_counter()
        rows = store_lowbit(adapter, units, allocation, rows, stats, options, config)
        timings["lowbit_s"] = time.perf_counter() - t0

    if config.update:
        from svdzip.passes.update import apply_update

        if calib_tokens is None:
            raise SvdzipError(f"the '{config.update}' update needs calibration tokens")
        t0 = time.perf_counter()
        apply_update(config.update, model, adapter, units, ranks, calib_tokens, config, stats,
                     originals=originals)
        del originals
        timings["update_s"] = time.perf_counter() - t0

    if check is not None:
        timings["check_s"] = check.after(model)
    # a low-bit matrix counts as its bytes / 2: the bf16 parameters that would take the same memory
    kept_linear = (sum(r.params for r in rows if r.role != "head") if allocation.lowbit
                   else spent(units, ranks))
    params_after = count_params(model) + sum(r.params - r.compensation_rank * (r.in_features + r.out_features)
                                             for r in rows if r.bits is not None)
    summary = {
        "method": config.label,
        "ratio_requested": None if config.memory_budget else config.ratio,
        "ratio_achieved": 1.0 - kept_linear / dense_linear,
        "decoder_linear_params_before": dense_linear,
        "decoder_linear_params_after": kept_linear,
        "model_params_before": params_before,
        "model_params_after": params_after,
        "model_ratio_achieved": 1.0 - params_after / params_before,
        "dense_modules": sum(1 for r in rows if r.rank is None and r.bits is None and r.width is None),
        "slimmed_modules": sum(1 for r in rows if r.width is not None),
        "lowbit_modules": sum(1 for r in rows if r.bits is not None),
        "calibration_tokens": stats.tokens if stats is not None else 0,
        **{k: round(v, 3) for k, v in timings.items()},
    }
    if memory_plan is not None:
        from svdzip.allocate.memory import price

        planned = (allocation.report["planned_matrix_bytes"] if config.lowbit
                   else spent(price(units, memory_plan.pricing), ranks))
        summary["memory"] = {**memory_plan.to_dict(), "planned_bytes": memory_plan.fixed_bytes + planned,
                             "params_first_ratio": options.get("params_first_ratio")}
    if allocation.lowbit:
        summary["lowbit"] = {k: v for k, v in allocation.report.items() if k != "predicted_loss"}
    if check is not None and check.result:
        summary["breakage_check"] = check.result
    if config.quantize:
        summary["quantize"] = {"precision": config.quantize, "scope": config.quantize_scope}
    log.info("%s: removed %.4f of decoder linear parameters (asked %s); model %d → %d parameters",
             config.label, summary["ratio_achieved"], "a memory budget" if config.memory_budget else
             f"{config.ratio:.4f}", params_before, params_after)
    return CompressionResult(model=model, config=config, modules=rows, summary=summary,
                             ranks={r.name: r.rank for r in rows}, effective_ranks=unit_effective_ranks(units),
                             units=given, allocation_report=allocation.report)


#: calibration windows the breakage check runs, and the perplexity ratio above which it warns
CHECK_WINDOWS = 4
BROKEN_RATIO = 2.0


@dataclass
class BreakageCheck:
    """The whole model's next-token perplexity on a few calibration windows, before and after the modules change.

    MoDeGPT's closed forms minimise each module's own output error; on Qwen2.5-0.5B a module whose error is small
    in that metric (an early MLP that writes the massive activations) still breaks the model when slimmed. This is
    the check that sees it: held-out windows where the run drew them, otherwise calibration windows.
    """

    tokens: torch.Tensor | None
    dense: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def before(cls, model: nn.Module, tokens: torch.Tensor | None, config: Recipe) -> BreakageCheck:
        check = cls(tokens[:CHECK_WINDOWS] if tokens is not None else None)
        if check.tokens is not None:
            check.dense = check._ppl(model)
        return check

    def _ppl(self, model: nn.Module) -> float:
        from svdzip.evaluate.perplexity import perplexity

        return perplexity(model, self.tokens.reshape(1, -1), seq_len=self.tokens.shape[1],
                          desc="breakage check").ppl

    def after(self, model: nn.Module) -> float:
        """Measure the compressed model (seconds spent); warn when it lost more than `BROKEN_RATIO`× dense."""
        if self.tokens is None:
            return 0.0
        t0 = time.perf_counter()
        ppl = self._ppl(model)
        ratio = ppl / self.dense
        self.result = {"windows": int(self.tokens.shape[0]), "dense_ppl": round(self.dense, 4),
                       "compressed_ppl": round(ppl, 4), "ratio": round(ratio, 4)}
        if not ratio <= BROKEN_RATIO:
            log.warning("the compressed model's perplexity on %d calibration windows is %.1f× the dense model's "
                        "(%.2f → %.2f): it may be broken. Try --allocator loss-aware or --method hybrid, a smaller "
                        "--ratio, or --heal distill", self.tokens.shape[0], ratio, self.dense, ppl)
        return time.perf_counter() - t0


def units_by_layer(units: list[Unit]) -> dict[int, list[int]]:
    """The indices of the units of each decoder layer (a unit belongs to its first member's layer)."""
    by_layer: dict[int, list[int]] = {}
    for u, unit in enumerate(units):
        by_layer.setdefault(unit.members[0].layer, []).append(u)
    return by_layer


def materialise_layer(adapter: ModelAdapter, index: int, layer: nn.Module, units: list[Unit],
                      ranks: list[int | None], mine: list[int], healer: Any = None) -> list[ModuleReport]:
    """Materialise the units `mine` of decoder layer `index` (through the layer-wise heal, if any)."""
    def build() -> list[ModuleReport]:
        return materialise(adapter, [units[u] for u in mine], [ranks[u] for u in mine])

    return build() if healer is None else healer.layer(index, layer, build)


def materialise_layers(adapter: ModelAdapter, units: list[Unit], ranks: list[int | None], healer: Any,
                       device: str | torch.device) -> list[ModuleReport]:
    """The in-memory model materialised layer by layer, each layer healed before the next (`recover.layerwise`)."""
    from svdzip.core.layerwise import layer_on

    if any(len({m.layer for m in u.members}) > 1 for u in units):
        raise SvdzipError("layer-wise healing trains each layer's own factors: a basis shared across layers "
                          "(--group-size > 1) is not supported")
    by_layer = units_by_layer(units)
    rows: list[ModuleReport] = []
    for index in tqdm(range(adapter.num_layers), desc="materialising and healing layers", unit="layer"):
        with layer_on(adapter.layers[index], device) as layer:
            rows += materialise_layer(adapter, index, layer, units, ranks, by_layer.get(index, []), healer)
    return rows


def allocate_units(units: list[Unit], config: Recipe, adapter: ModelAdapter, *, model: nn.Module | None,
                   calib_tokens: torch.Tensor | None = None, heldout_tokens: torch.Tensor | None = None,
                   cache: AllocationCache | None = None, stats: CalibrationStats | None = None
                   ) -> tuple[Allocation, Any, dict[str, Any]]:
    """The allocation of the units under the config's budget (parameters, or bytes); the same for every mode.

    Returns (the allocation, the memory plan or None, the options the allocator saw).
    """
    unit_dense = sum(u.dense_params for u in units)
    ctx = AllocationContext(
        ratio=config.ratio, budget=keep_budget(unit_dense, config.ratio),
        options=dict(config.allocator_options), adapter=adapter, model=model, calib_tokens=calib_tokens,
        heldout_tokens=heldout_tokens, device=config.device, dtype=config.calib_dtype(), seed=config.seed,
        cache=cache if cache is not None else AllocationCache(),
    )
    if config.lowbit:
        return _plan_lowbit(model, units, ctx, config, adapter, stats)
    if config.memory_budget:
        allocation, memory_plan = _allocate_memory(model, units, ctx, config)
        return allocation, memory_plan, ctx.options
    return allocate(config.allocator, units, ctx), None, ctx.options


def _plan_lowbit(model: nn.Module, units: list[Unit], ctx: AllocationContext, config: Recipe, adapter: ModelAdapter,
                 stats: CalibrationStats | None) -> tuple[Allocation, Any, dict[str, Any]]:
    """The byte planner's storage of every matrix (`allocate.storage`): low bits, compensation, factors, dense."""
    from svdzip.allocate import parse_allocator_options
    from svdzip.allocate.memory import plan
    from svdzip.allocate.storage import least_bytes, menu_for, plan_storage, planner_weights, storage_value_bytes
    from svdzip.output.loading import parse_dtype
    from svdzip.passes.head import head_unit
    from svdzip.passes.quant_error import CHOOSE_BETWEEN, PACKINGS, factor_errors, quantization_errors, rounding_at

    if config.allocator != "loss-aware":
        raise SvdzipError(f"low-bit storage is planned by loss-aware's byte planner; --allocator {config.allocator} "
                          "cannot choose bits (leave --allocator auto)")
    dtype = parse_dtype(config.storage_dtype)
    ctx.options = parse_allocator_options("loss-aware", ctx.options)
    menu = menu_for(config.quantize, config.compensate, storage_value_bytes(dtype), config.quantize_scope,
                    ctx.options["packed_factors"])
    # the untied head competes too, where its weight can be priced (the local signal has no gain for it)
    head = head_unit(model, adapter, ctx.calib_tokens, stats, config.device) if ctx.options.get(
        "signal") != "local" else None
    if head is not None and all(u.name != head.name for u in units):
        units.append(head)  # factorise's own copy of the list: materialised and reported with the rest
    mplan = None
    budget = None
    if config.memory_budget:
        mplan = plan(model, units, config.budget_bytes, config.budget_fraction, dtype, None,
                     floor=least_bytes(units, menu))
        budget = mplan.unit_budget
    # filled per (matrix, bits), reused across budgets of the same weights and statistics
    key = str((stats.meta.get("key") if stats is not None else None) or id(stats))
    factored = ctx.cache.get("quant-factor-errors", key, dict)
    factor_errors(adapter, units, stats, menu.factor_bits, config.device, done=factored)
    weights = planner_weights(units, ctx) if budget is not None else [1.0] * len(units)

    def planned(rounding: str) -> dict[str, Any]:
        """The plan with every option priced (and later stored) as `rounding` packs it."""
        errors = ctx.cache.get(f"quant-errors-{rounding}", key, dict)
        for other in PACKINGS:  # a packing another rounding makes the same way is reused, not redone
            earlier = ctx.cache.entries.get((f"quant-errors-{other}", key), {}) if other != rounding else {}
            errors.update({k: v for k, v in earlier.items()
                           if k not in errors and rounding_at(other, k[1]) == rounding_at(rounding, k[1])})
        quantization_errors(adapter, units, stats, menu.bits, config.device, done=errors, rounding=rounding)
        try:
            allocation = plan_storage(units, weights, errors, menu, budget, factored)
        except InfeasibleBudget as exc:
            least, ref = mplan.fixed_bytes + exc.least_bytes, mplan.reference_bytes
            raise SvdzipError(f"memory budget of {mplan.budget_bytes:,} bytes ({mplan.budget_bytes / ref:.1%} of the"
                              f" dense bf16 weights) cannot be met with --quantize {config.quantize}: the smallest "
                              f"it can store is {least:,} bytes ({least / ref:.1%}; embeddings and "
                              f"norms {mplan.fixed_bytes:,})") from None
        allocation.report["rounding"] = rounding
        return {"allocation": allocation, "quant_errors": errors, "factor_errors": factored, "rounding": rounding}

    plan_ = planned(CHOOSE_BETWEEN[0] if config.rounding == "choose" else config.rounding)
    if config.chooses_rounding and any(bits == 2 for bits, _ in plan_["allocation"].lowbit.values()):
        plan_ = _choose_rounding([plan_, planned(CHOOSE_BETWEEN[1])], model, units, stats, config,
                                 ctx.heldout_tokens)
    return plan_.pop("allocation"), mplan, {**ctx.options, **plan_}


def _choose_rounding(plans: list[dict[str, Any]], model: nn.Module, units: list[Unit],
                     stats: CalibrationStats | None, config: Recipe, heldout: torch.Tensor | None) -> dict[str, Any]:
    """`--rounding choose` (the default): of plans priced with different roundings, the one whose stored model
    loses least on held-out calibration windows (the first unless another is better by more than CHOOSE_MARGIN).
    Each matrix's price is its own output error; where many 2-bit errors compound, GPTQ's smaller per-matrix errors
    can still make the worse model (SmolLM2-135M at 35 % of the bytes), or the better one (Qwen2.5-0.5B at 35 %):
    only the whole model on text it was not fitted to tells."""
    import copy
    import math

    from svdzip.allocate.common import heldout_nll
    from svdzip.passes.quant_error import CHOOSE_MARGIN

    if heldout is None:
        raise SvdzipError("--rounding choose compares roundings on held-out calibration windows: pass heldout_tokens "
                          "with calib_tokens (or choose --rounding gptq|nearest|auto)")
    ppl = {}
    for plan_ in plans:
        trial = copy.deepcopy(model)
        adapter = ModelAdapter(trial)
        rows = materialise(adapter, units, plan_["allocation"].ranks)
        store_lowbit(adapter, units, plan_["allocation"], rows, stats, plan_, config)
        ppl[plan_["rounding"]] = math.exp(min(heldout_nll(trial, heldout), 700))
        del trial
    best = plans[0]  # kept unless another is better by more than the held-out windows can resolve
    for plan_ in plans[1:]:
        if ppl[plan_["rounding"]] < (1 - CHOOSE_MARGIN) * ppl[best["rounding"]]:
            best = plan_
    counts = {p["rounding"]: sum(b == 2 for b, _ in p["allocation"].lowbit.values()) for p in plans}
    log.info("rounding: held-out calibration perplexity %s (2-bit matrices: %s); keeping %s",
             ", ".join(f"{r} {v:.3f}" for r, v in ppl.items()), ", ".join(f"{r} {n}" for r, n in counts.items()),
             best["rounding"])
    best["allocation"].report["rounding_heldout_ppl"] = {r: round(v, 4) for r, v in ppl.items()}
    return best


def store_lowbit(adapter: ModelAdapter, units: list[Unit], allocation: Allocation, rows: list[ModuleReport],
                 stats: CalibrationStats | None, measured: dict[str, Any], config: Recipe) -> list[ModuleReport]:
    """Replace the planner's low-bit matrices by packed `LowBitLinear`s with their compensation (EoRA's closed
    form on the calibration Grams, or CALDERA's order: `passes.quant_error.truncate_then_quantize`), and
    the factors of the planner's low-bit factorisations by packed ones; their report rows say bits and rank."""
    from svdzip.output.lowbit import LowBitLinear, packed_bytes, packed_factor_bytes

    by_name = {u.name: u for u in units}
    out = []
    for row in tqdm(rows, desc="storing low-bit matrices", unit="matrix"):
        if row.name not in allocation.lowbit:
            out.append(row)
            continue
        bits, comp = allocation.lowbit[row.name]
        unit, module = by_name[row.name], adapter.module(row.name)
        energy = unit.spectrum.energy or 1.0
        if row.rank is not None:  # SVD first, then both factors at `bits` bits
            module.left = LowBitLinear.from_linear(module.left, bits)
            module.right = LowBitLinear.from_linear(module.right, bits)
            stored = packed_factor_bytes(row.out_features, row.in_features, row.rank, bits)
            loss = float(measured["factor_errors"][row.name, bits].losses[row.rank])
            out.append(dataclasses.replace(row, bits=bits, loss=loss / energy, params=stored // 2,
                                           kept=stored / 2 / (row.out_features * row.in_features)))
            continue
        packed, compensation, loss = _quantize_with_compensation(module, unit, measured["quant_errors"][row.name, bits],
                                                                 comp, stats, config, measured["rounding"])
        adapter.set_module(row.name, LowBitLinear.from_linear(module, bits, compensation, packed=packed))
        stored = packed_bytes(row.out_features, row.in_features, bits)
        extra = comp * (row.out_features + row.in_features)
        out.append(dataclasses.replace(row, bits=bits, compensation_rank=comp, loss=loss / energy,
                                       params=stored // 2 + extra,
                                       kept=(stored / 2 + extra) / (row.out_features * row.in_features)))
    return out


def _quantize_with_compensation(module: nn.Module, unit: Unit, err: Any, comp: int, stats: CalibrationStats | None,
                                config: Recipe, rounding: str) -> tuple[Any, Any, float]:
    """One matrix at low bits with its rank-`comp` correction, in the recipe's order: (packed, compensation, loss).

    quantize-first (EoRA): the packing priced by the planner, corrected by the whitened truncation of its error;
    truncate-first (CALDERA, one alternation): truncate W, quantize the residual, refit the correction to it.
    """
    from svdzip.methods.compensation import compensation_factors
    from svdzip.methods.linalg import data_loss
    from svdzip.models.lowrank import LowRankLinear
    from svdzip.passes.quant_error import truncate_then_quantize, unit_gram

    if not comp:
        return err.packed, None, float(err.tail_curve()[0])
    device = config.device
    with torch.no_grad():
        weight = module.weight.detach().to(device)
        gram = unit_gram(unit, stats).to(device)
        if config.compensate_order == "truncate-first":
            packed, (b, a) = truncate_then_quantize(weight, gram, comp, err.packed.bits, err.packed.group_size,
                                                    basis=unit.spectrum.basis.to(device), rounding=rounding)
            loss = data_loss(weight, packed.dequantize(torch.float32).to(device) + b @ a, gram)
        else:
            packed = err.packed
            b, a = compensation_factors(weight, packed.dequantize(torch.float32).to(device), gram, comp)
            loss = float(err.tail_curve()[comp])
    return packed, LowRankLinear.from_factors(b.to(module.weight), a.to(module.weight)), loss


def _allocate_memory(model: nn.Module, units: list[Unit], ctx: AllocationContext, config: Recipe):
    """Ranks for a byte budget: byte-aware allocators spend bytes, the others are fitted by their ratio."""
    from svdzip.allocate import is_byte_aware
    from svdzip.allocate.memory import allocate_bytes, allocate_params_first, plan, price
    from svdzip.output.loading import parse_dtype

    mplan = plan(model, units, config.budget_bytes, config.budget_fraction, parse_dtype(config.storage_dtype),
                 config.quantize, config.quantize_scope)
    priced = price(units, mplan.pricing)
    if config.byte_aware and is_byte_aware(config.allocator):
        allocation = allocate_bytes(config.allocator, priced, ctx, mplan.unit_budget)
    else:
        allocation, ratio = allocate_params_first(config.allocator, units, priced, ctx, mplan.unit_budget)
        ctx.options["params_first_ratio"] = ratio
    log.info("memory budget %d bytes: %d fixed (embeddings, norms), %d of %d for the matrices", mplan.budget_bytes,
             mplan.fixed_bytes, spent(priced, allocation.ranks), mplan.unit_budget)
    return allocation, mplan


def store(result: CompressionResult, dtype: torch.dtype) -> list[str]:
    """Cast the compressed model to its storage dtype and quantize what the config asks; the names quantized.

    Only parameters are cast: buffers such as rotary frequencies stay as the model computed them, exactly
    as `from_pretrained(dir, dtype=...)` rebuilds them, so the saved model reloads to identical logits.
    """
    with torch.no_grad():
        for p in result.model.parameters():
            p.data = p.data.to(dtype)
    if not result.config.quantize or result.config.lowbit:  # low-bit matrices were packed by `store_lowbit`
        return []
    from svdzip.output.quantize import quantize_linears, require_backend

    require_backend(result.config.quantize, result.config.device)
    scope = result.config.quantize_scope
    names = []
    for row in result.modules:
        if row.rank is None and scope in ("all", "dense"):
            names.append(row.name)
        elif row.rank is not None and scope in ("all", "factors"):
            names += [f"{row.name}.left", f"{row.name}.right"]
    return quantize_linears(result.model, names, result.config.quantize)


def unit_effective_ranks(units: list[Unit]) -> list[dict[str, Any]]:
    """D-Rank's information density of every unit (cheap: the spectra are already there)."""
    from svdzip.methods.linalg import effective_rank

    return [{"name": u.name, "role": u.role, "layers": list(u.layers),
             "effective_rank": u.extras.get("erank") or effective_rank(u.spectrum.sigma2)} for u in units]


def calibration_meta(source: str, config: Recipe) -> dict[str, Any]:
    """Where the statistics came from (provenance only; the cache key is their content, `statistics_key`)."""
    return {"model": str(source), "corpus": config.corpus, "samples": config.calib_samples,
            "seq_len": config.calib_seq_len, "seed": config.seed, "precision": config.resolved_calib_precision()}


def complete_statistics(stats: CalibrationStats | None, model: nn.Module, calib_tokens: torch.Tensor,
                         config: Recipe, wanted: frozenset[str] | set[str],
                         timings: dict[str, float] | None = None) -> CalibrationStats:
    """`stats` with every wanted kind: the missing input kinds calibrated, Fisher from its backward pass.

    Statistics handed in that record the precision they multiplied in must match the recipe's: the kinds added
    would otherwise be of another precision, and `recipe.yaml` would name one the statistics were not."""
    timings = {} if timings is None else timings
    key = stats.meta.get("key") if stats is not None else None
    recorded = key.get("precision") if isinstance(key, dict) else None
    precision = config.resolved_calib_precision()
    if recorded is not None and recorded != precision:
        raise SvdzipError(f"the statistics given were computed in {recorded}, but this recipe calibrates in "
                          f"{precision}: pass calib_precision='{recorded}', or let svdzip "
                          "compute the statistics")
    stats = stats or CalibrationStats(tokens=int(calib_tokens.numel()))
    missing = set(wanted) - stats.kinds
    inputs = missing - {"fisher"}
    if inputs:
        t0 = time.perf_counter()
        fresh = collect_statistics(model, calib_tokens, config.calib_batch_size, config.device, kinds=inputs,
                                   dtype=config.calib_dtype())
        stats.tokens, stats.batches = fresh.tokens, fresh.batches
        stats.merge(fresh)
        timings["calibrate_s"] = time.perf_counter() - t0
    if "fisher" in missing:
        timings["fisher_s"] = add_fisher(stats, model, calib_tokens, config)
    return stats


def prepare_statistics(model: nn.Module, calib_tokens: torch.Tensor, source: str, config: Recipe,
                       stats_path: str | Path | None = None, kinds: frozenset[str] | set[str] | None = None
                       ) -> CalibrationStats:
    """Load the statistics of these weights and tokens (batch size included) or compute and save them.

    The default file is keyed by a hash of the weights' and the tokens' content, so a changed model or
    corpus can never reuse stale statistics. A kind the file lacks (Gram matrices for an ASVD-only file,
    FWSVD's Fisher information) is computed and added to it, so the next run at any ratio skips it.
    """
    kinds = set(kinds if kinds is not None else get_method(config.method).needs(config).statistics)
    key = statistics_key(model, calib_tokens, config.calib_batch_size, config.resolved_calib_precision())
    path = Path(stats_path) if stats_path else default_stats_path(key)
    stats = None
    if path.exists():
        try:
            stats = CalibrationStats.load(path)
        except SvdzipError as exc:
            if stats_path:
                raise
            log.warning("%s; recomputing", exc)
        else:
            if stats.meta.get("key") != key:
                raise SvdzipError(f"statistics at {path} were computed for other weights, tokens, batch size or "
                                  f"precision ({stats.meta.get('source', stats.meta)}); use another --stats path")
            log.info("reusing calibration statistics from %s", path)
    missing = kinds - (stats.kinds if stats is not None else set())
    if stats is None or missing:
        t0 = time.perf_counter()
        stats = complete_statistics(stats, model, calib_tokens, config, kinds)
        stats.meta = {"key": key, "source": calibration_meta(source, config)}
        stats.save(path)
        log.info("calibration statistics (%s, %.0f s) saved to %s", ", ".join(sorted(missing)),
                 time.perf_counter() - t0, path)
    return stats


def add_fisher(stats: CalibrationStats, model: nn.Module, calib_tokens: torch.Tensor, config: Recipe) -> float:
    """FWSVD's per-input-channel Fisher information into `stats` (one backward pass); returns the seconds spent."""
    from svdzip.passes.fisher import collect_fisher

    t0 = time.perf_counter()
    stats.fisher = collect_fisher(model, calib_tokens, config.calib_batch_size, config.device,
                                  dtype=config.calib_dtype())
    return time.perf_counter() - t0
