"""The runner: the one way a compression runs, for every caller and every mode.

    plan (resolve the recipe, refuse what the mode or the inputs cannot give) → load or skeleton →
    calibration tokens → statistics → spectra → [rank 0] allocate → materialise (+ update, + recovery)
    or the streamed writer → output

The Python API (`svdzip.compress`), the CLI, `svdzip sweep` and the benchmarks all come here. A mode changes
where weights live (`ResidentWeights` or `StreamedWeights`), whether each step is checkpointed (`RunState`)
and how work is split (`DistContext`); the steps are the same functions. What each part needs
(`svdzip.needs`) is checked against the mode and the given inputs before any weight is read or changed.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from svdzip.core.distributed import DistContext
from svdzip.core.resume import RunState
from svdzip.errors import SvdzipError
from svdzip.needs import Mode, Needs, refuse_unsupported
from svdzip.recipe import RECIPE_FILE, Recipe

if TYPE_CHECKING:
    from svdzip.engine.footprint import Footprint

log = logging.getLogger(__name__)


@dataclass
class CompressRequest:
    """Everything a run is asked: the CLI fills it from its flags, `compress()` from its arguments."""

    model: str | nn.Module  # alias, local directory or hub id; or a model object, compressed in place
    recipe: Recipe = field(default_factory=Recipe)
    out: Path | None = None  # where to save; None: keep the result in memory (a model object only)
    overwrite: bool = False
    stream: bool | None = False  # None: stream when the model would not fit in memory
    resume_dir: Path | None = None
    restart: bool = False
    stats_path: str | None = None  # in memory, one process: where the statistics are cached
    plots: bool = True
    tokens: torch.Tensor | None = None  # calibration tokens given directly (tests, the Python API)
    heldout_tokens: torch.Tensor | None = None  # with `tokens`: the held-out windows, for parts that declare them
    tokenizer: Any = None  # a model object's tokenizer (recovery draws its windows with it; saved with the model)
    stats: Any = None  # calibration statistics given directly (a `CalibrationStats`); missing kinds are added
    units: list[Any] | None = None  # spectra given directly (a sweep reuses them across ratios and allocators)
    allocation_cache: Any = None  # an `AllocationCache` shared across runs of one model (a sweep)


@dataclass
class RunResult:
    out: Path | None
    summary: dict[str, Any]
    ranks: dict[str, int | None] = field(default_factory=dict)
    modules: list[dict[str, Any]] = field(default_factory=list)  # one row per compressible linear
    recipe: Recipe | None = None  # as it ran: `auto` resolved
    compression: Any = None  # the `CompressionResult` of an in-memory run (model, module reports, spectra)


def part_needs(config: Recipe, asked: Recipe | None = None) -> dict[str, Needs]:
    """What every part of this run declares, by label (the labels name them in error messages); `asked` is the
    recipe as given, so that a part `auto` chose is named as such."""
    from svdzip.allocate import allocator_needs
    from svdzip.methods.factorisations import get_method
    from svdzip.passes.update import get_update

    heal = config.heal_config()
    parts = {f"--method {config.method}": get_method(config.method).needs(config),
             f"--allocator {config.allocator}": allocator_needs(config.allocator, config.allocator_options)}
    if config.update:
        parts[f"--update {config.update}"] = get_update(config.update).needs()
    if config.group_size > 1:
        parts["Basis Sharing across layers (--group-size)"] = Needs(whole_model=True).because(
            "a shared basis stacks matrices of several layers")
    if config.memory_budget or config.quantize:
        parts["memory budgets and --quantize"] = Needs(whole_model=True).because(
            "bytes are planned and quantized on the model in memory")
    if config.lowbit:
        chosen = asked is not None and asked.quantize == "auto"
        label = f"--quantize {config.quantize}" + (" (what --quantize auto means for a memory budget)" if chosen
                                                   else "")
        parts[label] = Needs(statistics=frozenset({"grams"}), whole_model=True).because(
            "low-bit errors and their compensations are measured with each input's Gram matrix")
        if config.chooses_rounding:
            parts[f"--rounding {config.rounding}"] = Needs(heldout=True).because(
                "it compares GPTQ's 2-bit rounding with nearest rounding on held-out calibration windows")
    if heal is not None and heal.layer_local:  # inside the layer walk: streamed, resumed, on rank 0 of torchrun
        parts[f"--heal {heal.method}"] = Needs(calib_tokens=True).because(
            "layer-wise healing trains each layer on the calibration windows")
    elif heal is not None:
        parts[f"--heal {heal.method}"] = Needs(calib_tokens=True, distributable=False).because(
            "healing trains on one process; under torchrun compress first, then run `svdzip heal OUT`")
    return parts


def union(parts: dict[str, Needs]) -> Needs:
    total = Needs()
    for needs in parts.values():
        total = total | needs
    return total


def state_key(source: str, config: Recipe, ctx: DistContext, streamed: bool) -> dict[str, Any]:
    """What calibration statistics and spectra depend on (ratio and allocator are not part of it)."""
    return {"model": str(source), "corpus": config.corpus, "samples": config.calib_samples,
            "seq_len": config.calib_seq_len, "seed": config.seed, "batch_size": config.calib_batch_size,
            "method": config.method, "group_size": config.group_size, "share_roles": list(config.share_roles),
            "asvd_alpha": config.asvd_alpha, "asvd_scaling": config.asvd_scaling,
            "world_size": ctx.world_size, "streamed": streamed, "precision": config.resolved_calib_precision()}


def open_state(root: str | Path, key: dict[str, Any], restart: bool, ctx: DistContext) -> RunState:
    """Rank 0 checks (and with `restart` wipes) the run directory first; the others follow."""
    state = RunState(root, key, restart=restart, writer=True) if ctx.is_main else None
    ctx.barrier()
    return state or RunState(root, key, restart=False, writer=False)


def calibration_tokens_for(tokenizer: Any, config: Recipe, needs: Needs, given: torch.Tensor | None = None,
                           given_heldout: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The calibration windows (and held-out ones) if any part needs text; a seeded, disjoint draw."""
    if not needs.data:
        return None, None
    if given is not None:  # (the runner checked that held-out windows come with them where a part needs them)
        return given, given_heldout
    from svdzip.data import calibration_tokens, load_corpus

    extra = config.heldout_samples if needs.heldout else 0
    tokens = calibration_tokens(tokenizer, load_corpus(config.corpus), config.calib_samples + extra,
                                config.calib_seq_len, config.seed)
    return tokens[: config.calib_samples], (tokens[config.calib_samples :] if extra else None)


def compress(model: str | nn.Module, recipe: Recipe | None = None, *, out: str | Path | None = None,
             calib_tokens: torch.Tensor | None = None, heldout_tokens: torch.Tensor | None = None,
             tokenizer: Any = None, stats: Any = None, units: list[Any] | None = None,
             allocation_cache: Any = None, overwrite: bool = False, plots: bool = False, **options: Any):
    """The Python API: compress `model` with `recipe` (default: the recommended recipe) through the runner.

    `model` is an alias, a directory or hub id, or a model object (compressed in place; give its `tokenizer`
    when the recipe heals, and `calib_tokens` when it has no tokenizer). With `out` the result is saved there
    (with its `recipe.yaml`); the returned `CompressionResult` holds the model and its report either way.
    Further `CompressRequest` options (`stream`, `resume_dir`, `stats_path`, …) pass through `options`.
    """
    request = CompressRequest(model=model, recipe=recipe if recipe is not None else Recipe(),
                              out=Path(out) if out is not None else None, overwrite=overwrite, plots=plots,
                              tokens=calib_tokens, heldout_tokens=heldout_tokens, tokenizer=tokenizer, stats=stats,
                              units=units, allocation_cache=allocation_cache, **options)
    result = run(request)
    if result is None:
        return None
    if result.compression is None:
        raise SvdzipError("this run was streamed or checkpointed: its result is the directory it wrote "
                          f"({result.out}); load it with svdzip.load")
    result.compression.model.eval()  # as from_pretrained returns the saved one: the same forward, the same logits
    return result.compression


def run(request: CompressRequest, ctx: DistContext | None = None) -> RunResult | None:
    """Compress `request.model` in whatever mode was asked; the result on rank 0 (None on the others)."""
    from svdzip.core.distributed import device_for_rank, init_from_env, shutdown

    owned = ctx is None
    ctx = ctx or init_from_env(request.recipe.device)
    # the caller's recipe is never changed: this run's copy has this rank's device
    request = replace(request, recipe=replace(request.recipe, device=device_for_rank(request.recipe.device, ctx)))
    try:
        return _run(request, ctx)
    finally:
        if owned:
            shutdown(ctx)


def _run(request: CompressRequest, ctx: DistContext) -> RunResult | None:
    from svdzip.core.checkpoint import should_stream

    given = isinstance(request.model, nn.Module)
    out = Path(request.out) if request.out is not None else None
    if out is None and not given:
        raise SvdzipError("a model given by name or path needs an output directory (out=...)")
    if out is not None and out.exists() and not request.overwrite:
        raise SvdzipError(f"output directory {out} already exists; pass --overwrite to replace it")
    source = _source_of(request.model)
    if out is not None:
        from svdzip.output.io import refuse_overlap

        refuse_overlap(out, source, "the source model")
    streamed = bool(request.stream)
    if given and (streamed or request.resume_dir is not None or ctx.enabled):
        raise SvdzipError("a model object is compressed in memory by one process: pass its name or directory "
                          "to stream it, resume it or split it over processes")
    if request.stream is None and not given and should_stream(source):
        log.warning("the model is larger than 60%% of the available memory: streaming it layer by layer")
        streamed = True
    mode = Mode(streamed=streamed, resumable=request.resume_dir is not None, world_size=ctx.world_size)
    asked = request.recipe
    recipe = asked.validate().resolved(scaled=streamed or mode.resumable or ctx.enabled)
    if recipe.memory_budget and request.recipe.quantize == "auto" and not recipe.quantize:
        from svdzip.output.lowbit import INSTALL_HINT, backend_installed

        if not backend_installed():
            log.warning("HQQ is not installed: this memory budget is met without low-bit weights (the byte planner "
                        "needs it: %s)", INSTALL_HINT)
    request = replace(request, recipe=recipe)
    parts = part_needs(recipe, asked)
    refuse_unsupported(parts, mode)
    needs = union(parts)
    _refuse_missing_inputs(request, parts, mode, given)
    if recipe.lowbit:  # before any expensive step
        from svdzip.output.lowbit import BITS
        from svdzip.output.lowbit import require_backend as require_hqq

        require_hqq(BITS[0] if recipe.quantize == "plan" else int(recipe.quantize.removeprefix("int")),
                    why=f"--quantize {recipe.quantize}")
    elif recipe.quantize:
        from svdzip.output.quantize import require_backend

        require_backend(recipe.quantize, recipe.device)
    heal = recipe.heal_config()
    if not streamed and not given:
        precision = fit_in_memory(source, recipe, needs, heal, ctx.world_size)
        if heal is not None and precision != heal.precision:
            recipe = replace(recipe, healing=replace(recipe.healing, precision=precision))
            request, heal = replace(request, recipe=recipe), recipe.heal_config()
    if heal is not None and not heal.layer_local and mode.streamed:
        if not given:
            refuse_staged_heal(source, recipe, heal)
        return _compress_then_heal(request, ctx)
    return _compress(request, source, mode, needs, ctx)


def _source_of(model: str | nn.Module) -> str:
    """Where a model comes from: its resolved path or hub id (a model object: the path it was loaded from)."""
    if isinstance(model, nn.Module):
        return str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "")
    from svdzip.assets import resolve_model

    return str(resolve_model(model))


def _refuse_missing_inputs(request: CompressRequest, parts: dict[str, Needs], mode: Mode, given: bool) -> None:
    """What the parts need from the caller, checked before the model is touched."""
    recipe, needs = request.recipe, union(parts)
    if request.tokens is not None and needs.heldout and request.heldout_tokens is None:
        which = "; ".join(f"{label}: {' '.join(n.why)}" for label, n in parts.items() if n.heldout)
        raise SvdzipError(f"this run tunes or guards on held-out calibration windows ({which}): pass heldout_tokens "
                          "with tokens")
    if mode.streamed and mode.world_size > 1 and request.resume_dir is None:
        raise SvdzipError("distributed streaming needs a shared --resume-dir for the per-layer statistics")
    if request.stats_path is not None and (mode.streamed or mode.resumable or mode.world_size > 1):
        raise SvdzipError("--stats caches the statistics of an in-memory run in one process; a streamed, "
                          "resumable or distributed run keeps them in its run directory (--resume-dir) instead")
    if not given:
        return
    if needs.data and request.tokens is None and request.tokenizer is None:
        raise SvdzipError("this recipe needs calibration text: pass calib_tokens, or the model's tokenizer")
    heal = recipe.heal_config()
    if heal is not None and not heal.layer_local and request.tokenizer is None:
        raise SvdzipError(f"recovery ({heal.method}) draws its training windows with the model's tokenizer: pass "
                          "tokenizer=..., or heal='none' in the recipe")
    if request.out is not None and request.tokenizer is None:
        log.warning("saving a model object without its tokenizer (tokenizer=...): the directory will need one to be "
                    "evaluated or healed")


def _compress(request: CompressRequest, source: str, mode: Mode, needs: Needs, ctx: DistContext
              ) -> RunResult | None:
    recipe, out = request.recipe, request.out
    t_start = time.perf_counter()
    model, tokenizer, weights = _open_model(request, source, mode.streamed)
    adapter = weights.adapter
    heal = recipe.heal_config()
    # a model object's teacher is its own dense copy, taken before anything changes it
    teacher_box = [copy.deepcopy(model)] if heal is not None and heal.objective == "kl" and isinstance(
        request.model, nn.Module) else []
    torch.manual_seed(recipe.seed)
    tokens, heldout = calibration_tokens_for(tokenizer, recipe, needs, request.tokens, request.heldout_tokens)
    # (a distributed run needs a shared --resume-dir for that: each rank's temporary directory is its own)
    stats_on_disk = request.units is None and (mode.streamed or (
        request.stats_path is None and request.stats is None and (request.resume_dir is not None or not ctx.enabled)
        and _grams_too_large(adapter, needs)))
    temp_state = stats_on_disk and request.resume_dir is None
    # beside the output, not in /tmp: gigabytes of statistics on a disk the user chose, never in a RAM-backed tmpfs
    root = (Path(tempfile.mkdtemp(prefix=f".{_stem(out)}.run-", dir=_parent(out))) if temp_state
            else request.resume_dir)
    timings: dict[str, float] = {}
    try:
        state = None
        if root is not None:
            state = open_state(root, {**state_key(source, recipe, ctx, mode.streamed),
                                      **({"tokens_given": True} if request.tokens is not None else {})},
                               request.restart, ctx)
        units = request.units
        stats = None
        if units is not None and recipe.lowbit:  # given spectra, but low-bit errors are measured on the Grams
            stats = _statistics(request, model, adapter, tokens, source, Needs(statistics=frozenset({"grams"})),
                                weights, state, ctx, stats_on_disk, timings)
        if units is None:  # given spectra need no statistics (the update captures its own inputs)
            t0 = time.perf_counter()
            stats = _statistics(request, model, adapter, tokens, source, needs, weights, state, ctx, stats_on_disk,
                                timings)
            timings.setdefault("calibrate_s", time.perf_counter() - t0)
            t0 = time.perf_counter()
            from svdzip.methods.decompose import group_linears
            from svdzip.methods.factorisations import get_method
            from svdzip.passes.spectra import decompose_units

            method = get_method(recipe.method)
            if method.structured:  # whole modules (MoDeGPT's MLPs), in memory: their needs refuse the other modes
                units = method.build_units(adapter, stats, device=recipe.device, tokens=tokens)
            else:
                groups = group_linears(adapter, recipe.share_roles, recipe.group_size)
                units = decompose_units(adapter, stats, recipe, groups, weights=weights, on_disk=mode.streamed,
                                        state=state, ctx=ctx, device=recipe.device)
            timings["decompose_s"] = time.perf_counter() - t0
        if "local" in needs.statistics and any("local_gain" not in u.extras for u in units):
            from svdzip.passes.local_gain import attach_gains

            if stats is None:  # spectra given without their gains (a sweep's, made for another allocator)
                stats = _statistics(request, model, adapter, tokens, source, Needs(statistics=frozenset({"local"})),
                                    weights, state, ctx, stats_on_disk, timings)
            attach_gains(units, stats)
        ctx.barrier()
        if not ctx.is_main:
            return None
        # the spectra are handed over, not kept here, so that the finishing step can free them before the Fisher pass
        # and the heal; the statistics are done with (on Qwen2.5-0.5B: 1 GB of bases, 5 GB of Gram matrices)
        analysis = Analysis(units=units, calibration_tokens=int(stats.tokens) if stats is not None else 0,
                            stats=stats if request.recipe.lowbit else None)
        del stats, units
        staging = Path(tempfile.mkdtemp(prefix=f".{_stem(out)}.alloc-", dir=_parent(out)))
        try:
            if mode.streamed:
                result = _write_streamed(request, weights, analysis.take_units(), tokenizer, state, staging, timings,
                                         tokens)
            else:
                result = _finish_in_memory(request, model, tokenizer, source, analysis, tokens, heldout, staging,
                                           timings, ctx.world_size, teacher_box)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        if temp_state:
            shutil.rmtree(root, ignore_errors=True)
    result.summary.update(seconds_total=round(time.perf_counter() - t_start, 2), world_size=ctx.world_size,
                          streamed=mode.streamed)
    return result


@dataclass
class Analysis:
    """The spectra of a run, owned by whoever finishes it, so that they can be freed early."""

    units: list[Any] | None
    calibration_tokens: int = 0
    stats: Any = None  # kept only where the storage stage needs them (low-bit errors and compensations)

    def take_units(self) -> list[Any]:
        units, self.units = self.units, None
        return units


#: Gram matrices (float64) above this size stay on disk, one layer at a time, even for a model held in memory
#: (Qwen2.5-0.5B's are 5 GB, the 1.5B's 18 GB; SmolLM2-135M's 0.8 GB stay in memory and in the statistics cache)
GRAMS_IN_MEMORY_BYTES = 2 * 2**30


def gram_bytes(adapter) -> int:
    """Bytes of every float64 Gram matrix calibration would hold (one per distinct linear input)."""
    sizes = {info.input_key: info.in_features for info in adapter.linears()}
    return sum(8 * n * n for n in sizes.values())


def _grams_too_large(adapter, needs: Needs) -> bool:
    if "grams" not in needs.statistics:
        return False
    size = gram_bytes(adapter)
    if size <= GRAMS_IN_MEMORY_BYTES:
        return False
    log.info("the Gram matrices take %.1f GiB: calibrated layer by layer into a run directory instead of memory "
             "(and not cached for another run; --stats FILE keeps them, in memory)", size / 2**30)
    return True


def _checkpoint_shape(source: str) -> tuple[dict[str, Any], int] | None:
    """The checkpoint's config and element count, read before loading; None where they cannot be read (a hub id)."""
    from svdzip.core.checkpoint import checkpoint_elements
    from svdzip.engine.footprint import read_config

    model_config, elements = read_config(source), checkpoint_elements(source)
    return (model_config, elements) if model_config is not None and elements else None


def in_memory_footprint(source: str, config: Recipe, needs: Needs, heal: Any,
                        world_size: int = 1, trained: float = 1.0) -> Footprint | None:
    """The estimated peak of an in-memory run on this machine's memory (`engine.footprint`), read from the
    checkpoint's config and size before loading; None where it cannot be read (a hub id) or does not apply (the
    model and its activations live on an accelerator). `trained`: the share of the kept decoder linears the heal
    trains (1: every one, the bound before the allocation; 0: none, what any allocation needs)."""
    if torch.device(config.device).type != "cpu":
        return None
    from svdzip.engine import footprint
    from svdzip.methods.factorisations import get_method

    shape = _checkpoint_shape(source)
    if shape is None:
        return None
    model_config, elements = shape
    grams = footprint.gram_bytes_of(model_config) if "grams" in needs.statistics else 0
    return footprint.estimate(
        4 * elements, model_config, gram_bytes=grams, grams_in_memory=0 < grams <= GRAMS_IN_MEMORY_BYTES,
        fisher_tokens=footprint.fisher_tokens(config), guard_tokens=footprint.guard_tokens(config),
        ara_window=footprint.ara_window(config), ara_trial=get_method(config.method).chooses,
        heal=None if heal is None or heal.layer_local else heal, grams_freed_after_calibration=True,
        kept=1.0 if config.memory_budget else 1.0 - config.ratio, trained=trained,
        calib_tokens=config.calib_samples * config.calib_seq_len // max(world_size, 1))


def fit_in_memory(source: str, config: Recipe, needs: Needs, heal: Any, world_size: int = 1) -> str | None:
    """Refuse, before loading anything, an in-memory run that cannot fit in the available memory whatever the
    allocation (its heal training none of the kept weights), and return the heal's precision to run it at: "auto"
    resolved to float32 when only a bfloat16 heal's 16-bit weight copies would not fit (float32 is slower on a CPU
    with bf16 units, not worse); otherwise the one asked. What the heal trains is known once the model is
    compressed: `fit_heal` checks it then."""
    from svdzip.core.checkpoint import memory_limit_bytes
    from svdzip.engine.footprint import human

    asked = heal.precision if heal is not None else None
    floor = in_memory_footprint(source, config, needs, heal, world_size, trained=0.0)
    if floor is None:
        return asked
    available = memory_limit_bytes()
    if floor.peak > available and asked == "auto" and heal.compute_dtype() != torch.float32:
        full = in_memory_footprint(source, config, needs, replace(heal, precision="float32"), world_size, 0.0)
        if full.peak <= available:
            log.warning("a bfloat16 heal would need at least %s of memory (%s) and %s are available: healing in "
                        "float32 (%s at its peak; --heal-precision float32 says so up front)",
                        human(floor.peak), floor.describe(), human(available), human(full.peak))
            floor, asked = full, "float32"
    if floor.peak > available:
        raise SvdzipError(
            f"this run would need at least {human(floor.peak)} of memory at its peak "
            f"({floor.describe()}) and {human(available)} are available: compress it streamed "
            "instead (--stream [--resume-dir DIR]: one decoder layer in memory at a time), or with fewer "
            "windows per micro-batch (--heal-batch-size 1 --heal-grad-accum N)")
    bound = in_memory_footprint(source, config, needs, heal if heal is None else replace(heal, precision=asked),
                                world_size)
    log.info("estimated peak memory of this in-memory run: %s to %s (%s, if the heal trains every kept weight); "
             "%s available", human(floor.peak), human(bound.peak), bound.describe(), human(available))
    if bound.peak > available:
        log.warning("the heal could need up to %s if it trained every kept weight, more than the %s available: it "
                    "is checked again once the compressed model says what it trains", human(bound.peak),
                    human(available))
    return asked


def refuse_staged_heal(source: str, config: Recipe, heal: Any) -> None:
    """Before a streamed compression whose heal needs the whole model (`_compress_then_heal`): refuse it where even
    the smallest heal cannot fit — the compressed student with its kept linears, the dense teacher beside it for
    its top-k, training none of the kept weights, in float32 where `auto` may fall back to it (no 16-bit casts) —
    so that the streamed compression is not spent first. What the heal really trains is checked once the student is
    loaded (`heal_check`)."""
    shape = _checkpoint_shape(source) if torch.device(config.device).type == "cpu" else None
    if shape is None:
        return
    from svdzip.core.checkpoint import memory_limit_bytes
    from svdzip.engine import footprint

    model_config, elements = shape
    dense = 4 * elements
    linears = footprint.decoder_linear_bytes(model_config, dense)
    kept = int(linears * (1.0 if config.memory_budget else 1.0 - config.ratio))
    floor, available = footprint.Footprint(), memory_limit_bytes()
    footprint.add_heal(floor, model_config, replace(heal, precision="float32" if heal.precision == "auto"
                                                    else heal.precision),
                       student=dense - linears + kept, teacher=dense, linears=kept, trained=0)
    if floor.peak > available:
        raise SvdzipError(
            f"the heal after this streamed compression needs the whole model: at least {footprint.human(floor.peak)} "
            f"({floor.describe()}), and {footprint.human(available)} are available. Heal layer by layer instead "
            "(--heal layerwise, the streamed default), or compress with --heal none here and `svdzip heal` the "
            "result where that much memory is free")


def heal_footprint(model: nn.Module, heal: Any, teacher_bytes: int, held_teacher: int = 0) -> Footprint:
    """The heal's stages once the model is compressed: what the process holds now (the student and whatever the
    compression left behind: measured, not modelled; less a `held_teacher` the heal frees), the weights the heal
    trains (`recover.heal.trained_weights`; seq-lora's adapters are fewer), the dense teacher of `teacher_bytes`."""
    from svdzip.core.checkpoint import page_in, release_memory, resident_bytes
    from svdzip.engine import footprint
    from svdzip.output.quantize import parameter_bytes
    from svdzip.recover.heal import trained_weights

    release_memory()
    page_in(model)  # a student loaded from a directory is mapped from its file until trained
    config, weights = model.config.to_dict(), parameter_bytes(model)
    fp = footprint.Footprint(overhead=footprint.HEAL_SLACK_BYTES)
    footprint.add_heal(fp, config, heal, student=max(resident_bytes() - held_teacher, weights),
                       teacher=teacher_bytes, linears=footprint.decoder_linear_bytes(config, weights),
                       trained=sum(4 * p.numel() for p in trained_weights(model).values()))
    return fp


def fit_heal(model: nn.Module, heal: Any, teacher_bytes: int, held_teacher: int = 0) -> tuple[Any, str | None]:
    """The heal's need once the model is compressed (`heal_footprint`), against what this process can grow to:
    the heal's config to run (an "auto" precision resolved to float32 where only that fits) and, where even that
    does not fit, why (None where it fits or cannot be told: an accelerator, an unknown teacher size)."""
    from svdzip.core.checkpoint import process_memory_limit_bytes
    from svdzip.engine.footprint import TRAINER_COPIES, human

    if torch.device(heal.device).type != "cpu" or not teacher_bytes:
        return heal, None
    available, need = process_memory_limit_bytes(), heal_footprint(model, heal, teacher_bytes, held_teacher)
    trained = f"{need.stages['heal (training)']['optimizer'] // (4 * TRAINER_COPIES):,}"  # float32 parameters
    if need.peak > available and heal.precision == "auto" and heal.compute_dtype() != torch.float32:
        full = heal_footprint(model, replace(heal, precision="float32"), teacher_bytes, held_teacher)
        if full.peak <= available:
            log.warning("a bfloat16 heal of %s trained parameters would need about %s (%s) and this process can "
                        "have %s: healing in float32 (%s)", trained, human(need.peak), need.describe(),
                        human(available), human(full.peak))
            return replace(heal, precision="float32"), None
    log.info("the heal trains %s parameters: estimated peak %s (%s); %s available", trained, human(need.peak),
             need.describe(), human(available))
    if need.peak <= available:
        return heal, None
    return heal, (f"the heal would train {trained} parameters and need about {human(need.peak)} of memory "
                  f"({need.describe()}), and this process can have {human(available)}")


class HealDoesNotFit(SvdzipError):
    """The heal of a saved directory would need more memory than this process can have (`heal_check`)."""


def heal_check(source: str) -> Callable[[nn.Module, Any], Any]:
    """`recover.directory.heal_directory`'s `fit`: `fit_heal` against the dense teacher at `source`, once the
    student and its windows are loaded; where the heal cannot fit, `HealDoesNotFit` before the teacher loads and
    before anything is written."""
    def fit(student: nn.Module, heal: Any) -> Any:
        heal, unhealed = fit_heal(student, heal, _teacher_bytes(_source_of(source), []))
        if unhealed is not None:
            raise HealDoesNotFit(f"{unhealed}: heal it where that much memory is free, or with fewer windows per "
                                 "micro-batch (--heal-batch-size 1 --heal-grad-accum N)")
        return heal

    return fit


def _parent(out: Path | None) -> Path | None:
    """Where a run's temporary directories go: beside the output (None: the system's temporary directory)."""
    if out is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent


def _stem(out: Path | None) -> str:
    return out.name if out is not None else "svdzip"


def _open_model(request: CompressRequest, source: str, streamed: bool):
    """The model in memory (given, or loaded), or (streaming) a meta-device skeleton with a checkpoint reader.

    With calibration tokens given directly a bare checkpoint is enough: no tokenizer is loaded.
    """
    from svdzip.core.layerwise import ResidentWeights
    from svdzip.models.adapter import ModelAdapter
    from svdzip.output.loading import load_model, load_tokenizer

    device = request.recipe.device
    if isinstance(request.model, nn.Module):
        from svdzip.engine.pipeline import check_weights_finite

        model = request.model.to(device)
        check_weights_finite(model)
        return model, request.tokenizer, ResidentWeights(model, ModelAdapter(model))
    with_tokenizer = request.tokens is None or request.recipe.heal_config() is not None or request.out is not None
    if not streamed:
        model, tokenizer, _ = load_model(source, device, with_tokenizer=with_tokenizer)
        return model, tokenizer, ResidentWeights(model, ModelAdapter(model))
    from svdzip.core.checkpoint import CheckpointReader, StreamedWeights, skeleton
    from svdzip.models.checkpoint_names import CheckpointNames

    model = skeleton(source, torch.float32)
    adapter = ModelAdapter(model)  # opens fused experts / Conv1D into the linears svdzip compresses
    reader = CheckpointReader(source, CheckpointNames(model))
    tokenizer = load_tokenizer(source) if with_tokenizer else None
    return model, tokenizer, StreamedWeights(model, adapter, reader, torch.float32)


def _statistics(request: CompressRequest, model, adapter, tokens, source: str, needs: Needs, weights, state, ctx,
                on_disk: bool, timings: dict[str, float]):
    """Only the statistics the parts declare: given ones completed; cached by content in memory (a model named
    by path, or --stats); checkpointed in a run directory (`on_disk`: each layer's stay there, read back lazily)."""
    config = request.recipe
    kinds = set(needs.statistics) - {"fisher"}
    if not needs.statistics:
        return None
    from svdzip.engine.pipeline import calibration_meta, complete_statistics

    if request.stats is not None or (isinstance(request.model, nn.Module) and request.stats_path is None):
        return complete_statistics(request.stats, model, tokens, config, needs.statistics, timings)
    if state is None and not ctx.enabled and not on_disk:
        from svdzip.engine.pipeline import prepare_statistics

        return prepare_statistics(model, tokens, source, config, request.stats_path, kinds=needs.statistics)
    from svdzip.passes.calibrate import calibrate

    stats = None
    if kinds:
        stats = calibrate(model, adapter, tokens, config.calib_batch_size, config.device, kinds, weights=weights,
                          state=state, ctx=ctx, meta=calibration_meta(source, config), on_disk=on_disk,
                          dtype=config.calib_dtype())
    if "fisher" in needs.statistics:  # declared non-streamable and non-distributable: in memory, one process
        from svdzip.core.statistics import CalibrationStats
        from svdzip.engine.pipeline import add_fisher

        stats = stats or CalibrationStats(tokens=int(tokens.numel()), meta=calibration_meta(source, config))
        timings["fisher_s"] = add_fisher(stats, model, tokens, config)
    return stats


def _finish_in_memory(request: CompressRequest, model, tokenizer, source: str, analysis: Analysis, tokens, heldout,
                      staging: Path, timings: dict[str, float], world_size: int, teacher_box: list[nn.Module]
                      ) -> RunResult:
    """Allocate, materialise (+ update), recover, store and save — artefacts in place before the output appears."""
    from svdzip.core.layerwise import ResidentWeights
    from svdzip.engine.pipeline import factorise, store
    from svdzip.models.adapter import ModelAdapter
    from svdzip.output import io
    from svdzip.output.loading import parse_dtype

    recipe = request.recipe
    heal_config = recipe.heal_config()
    layerwise = heal_config is not None and heal_config.layer_local
    healers = []

    def healer(ranks):  # created once the ranks are known (they are part of its checkpoints' key)
        healers.append(layerwise_healer(ResidentWeights(model, ModelAdapter(model)), tokens, recipe, ranks,
                                        request.resume_dir))
        return healers[-1]

    result = factorise(model, recipe, analysis.take_units(), stats=analysis.stats, calib_tokens=tokens,
                       heldout_tokens=heldout,
                       out_dir=staging, allocation_cache=request.allocation_cache, timings=timings,
                       healer=healer if layerwise else None)
    if heal_config is not None:
        result.units = None  # the bases are in the factors now; the heal needs the memory
    result.summary["calibration_tokens"] = analysis.calibration_tokens
    heal_report = healers.pop().report() if healers else None
    unhealed = None
    if heal_config is not None and not layerwise:
        from svdzip.recover.heal import heal_windows

        windows = heal_windows(tokenizer, heal_config)  # first: its corpus is part of what the process holds
        teacher = _teacher_bytes(source, teacher_box)
        heal_config, unhealed = fit_heal(model, heal_config, teacher, held_teacher=teacher if teacher_box else 0)
        if unhealed is not None:  # saved as what it is, and said so once it is saved
            recipe = replace(recipe, heal="none")
        else:
            recipe = replace(recipe, healing=replace(recipe.healing, precision=heal_config.precision))
            # with --resume-dir the heal checkpoints beside the run's statistics and spectra: a rerun of the same
            # command restores those, rebuilds the same factors and continues the heal from its last checkpoint
            heal_report = _heal_in_memory(model, windows, source, heal_config, teacher_box,
                                          resume_dir=Path(request.resume_dir) / "heal" if request.resume_dir else None)
    save_dtype = parse_dtype(recipe.storage_dtype)
    quantized = result.quantized = store(result, save_dtype)  # after healing: the factors train in float32
    manifest = io.build_manifest(result.modules, result.summary, recipe.to_dict())
    manifest.details["source_model"] = str(source)
    manifest.details["provenance"]["world_size"] = world_size
    if quantized:
        from svdzip.output.quantize import quantization_record

        manifest.quantization = quantization_record(quantized, recipe.quantize, recipe.quantize_scope, save_dtype)
    if recipe.lowbit:
        from svdzip.output.lowbit import lowbit_record

        manifest.lowbit = lowbit_record(model)
    if any(r.width is not None for r in result.modules):
        from svdzip.output.slimmed import slimmed_record

        manifest.slimmed = slimmed_record(result.modules, model)
    if heal_report is not None:
        from svdzip.recover.directory import record_recovery

        record_recovery(manifest, heal_report)
        result.summary["heal_s"] = round(heal_report.seconds, 2)
        result.summary["method"] = manifest.method
    result.summary["heal"] = heal_report.brief() if heal_report is not None else None
    rows = [r.to_dict() for r in result.modules]
    from svdzip.output.quantize import parameter_bytes

    summary = {**result.summary, "weight_bytes_in_memory": parameter_bytes(model)}
    if request.out is None:
        if unhealed is not None:
            raise SvdzipError(f"{unhealed}: the model object is compressed but not healed (save it with "
                              "svdzip.save and heal it where that much memory is free: `svdzip heal DIR --out DIR2`)")
        return RunResult(out=None, summary=summary, ranks=result.ranks, modules=rows, recipe=recipe,
                         compression=result)

    def artefacts(tmp: Path) -> None:
        _move_artefacts(staging, tmp)
        recipe.for_output().save(tmp / RECIPE_FILE)
        if request.plots:
            _plots(tmp, rows, result.effective_ranks, source, recipe)

    io.save(model, tokenizer, request.out, manifest, overwrite=request.overwrite,
            report={"modules": rows, "effective_ranks": result.effective_ranks}, artefacts=artefacts)
    summary.update(out=str(request.out), size_bytes=io.dir_size(request.out))
    if unhealed is not None:
        raise SvdzipError(f"{unhealed}: the compressed model is saved unhealed in {request.out}; heal it where that "
                          f"much memory is free (`svdzip heal {request.out} --out DIR`), or compress streamed "
                          "(--stream), or with fewer windows per micro-batch (--heal-batch-size 1 --heal-grad-accum N)")
    return RunResult(out=Path(request.out), summary=summary, ranks=result.ranks, modules=rows, recipe=recipe,
                     compression=result)


def _teacher_bytes(source: str, teacher_box: list[nn.Module]) -> int:
    """The dense teacher's float32 bytes: the given model's copy, else its checkpoint's (0: unknown)."""
    from svdzip.core.checkpoint import checkpoint_elements
    from svdzip.output.quantize import parameter_bytes

    return parameter_bytes(teacher_box[0]) if teacher_box else 4 * checkpoint_elements(source)


def layerwise_healer(weights, tokens: torch.Tensor, recipe: Recipe, ranks: list[int | None],
                     resume_dir: Path | None):
    """The layer-wise heal of this run on its calibration windows (at most the heal's training and held-out
    windows, in its micro-batches), checkpointed in RUN/layerwise with --resume-dir."""
    from svdzip.core.layerwise import capture_layer_inputs
    from svdzip.recover.layerwise import LayerwiseHealer, heal_key

    config = recipe.heal_config()
    tokens = tokens[: config.train_samples + config.heldout_samples]
    inputs = capture_layer_inputs(weights.model, weights.adapter, tokens, config.batch_size, config.device,
                                  weights=weights)
    return LayerwiseHealer(inputs, config, config.device,
                           state_dir=Path(resume_dir) / "layerwise" if resume_dir is not None else None,
                           key=heal_key(list(ranks), config, tokens))


def _write_streamed(request: CompressRequest, weights, units, tokenizer, state: RunState, staging: Path,
                    timings: dict[str, float], tokens: torch.Tensor | None = None) -> RunResult:
    from svdzip.engine.pipeline import allocate_units, unit_effective_ranks
    from svdzip.engine.writer import write_streamed
    from svdzip.output import io
    from svdzip.output.loading import parse_dtype

    recipe = request.recipe
    t0 = time.perf_counter()
    allocation, _, _ = allocate_units(units, recipe, weights.adapter, model=None)
    ranks = allocation.ranks
    from svdzip.report.plots import write_allocation_report

    write_allocation_report(staging, units, allocation)
    timings["allocate_s"] = time.perf_counter() - t0
    from svdzip.allocate import spent

    dense, kept = sum(u.dense_params for u in units), spent(units, ranks)
    effective = unit_effective_ranks(units)

    def artefacts(tmp: Path, rows: list[Any]) -> None:
        _move_artefacts(staging, tmp)
        recipe.for_output().save(tmp / RECIPE_FILE)
        if request.plots:
            _plots(tmp, [r.to_dict() for r in rows], effective, str(weights.reader.dir), recipe)

    heal_config = recipe.heal_config()
    healer = (layerwise_healer(weights, tokens, recipe, ranks, request.resume_dir)
              if heal_config is not None and heal_config.layer_local else None)
    t0 = time.perf_counter()
    rows = write_streamed(weights, units, ranks, state, tokenizer, Path(request.out), recipe,
                          parse_dtype(recipe.storage_dtype), healer=healer,
                          summary_extra={"ratio_achieved": 1.0 - kept / dense, "decoder_linear_params_after": kept,
                                         "effective_ranks": effective, "timings": timings},
                          artefacts=artefacts)
    timings["write_s"] = time.perf_counter() - t0
    summary = {**io.read_manifest(request.out)["details"]["summary"], **{k: round(v, 3) for k, v in timings.items()},
               "out": str(request.out), "size_bytes": io.dir_size(request.out)}
    summary.pop("effective_ranks", None)
    return RunResult(out=Path(request.out), summary=summary, ranks={r.name: r.rank for r in rows},
                     modules=[r.to_dict() for r in rows], recipe=recipe)


def _move_artefacts(staging: Path, into: Path) -> None:
    for artefact in staging.iterdir():
        shutil.move(str(artefact), into / artefact.name)


def _plots(directory: Path, rows: list[dict], effective: list[dict], source: str, recipe: Recipe) -> None:
    from svdzip.report.plots import write_plots

    what = (f"{100 * recipe.budget_fraction:.0f}% of the bf16 bytes" if recipe.budget_fraction
            else "a byte budget" if recipe.memory_budget else f"{100 * recipe.ratio:.0f}% removed")
    write_plots(directory, rows, effective, title=f"{Path(str(source)).name}: {recipe.label} at {what}")


def _heal_in_memory(model, windows: tuple[torch.Tensor, torch.Tensor], source: str, heal_config,
                    teacher_box: list[nn.Module], resume_dir: Path | None = None):
    """Heal the just-compressed model on `windows` (`recover.heal.heal_windows`) against its dense teacher: the
    copy of a given model, else a fresh load.

    The teacher is handed over without a name (popped from its box, or loaded in the call), so that heal()
    can free it once its top-k are cached.
    """
    from svdzip.recover.heal import heal, load_teacher

    report = heal(model, teacher_box.pop() if teacher_box else load_teacher(source, heal_config), windows,
                  heal_config, resume_dir=resume_dir)
    warn_if_stopped(report)
    return report


def warn_if_stopped(report) -> None:
    if report.stopped == "nan":
        log.warning("healing stopped on a non-finite loss; the factors of the last good held-out check were kept")


def _place_copy(src: Path, out: Path, keep: bool) -> None:
    """Put the directory `src` in place of `out` (renamed, or copied beside `out` first where `src` must stay)."""
    from svdzip.output.io import replace_dir

    if keep:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=_parent(out)))
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        src = tmp
    replace_dir(src, out)


def _compress_then_heal(request: CompressRequest, ctx: DistContext) -> RunResult:
    """A streamed compression into a staging directory, then the heal from it into `out` (healing needs the
    whole model, which a streamed run never holds).

    With --resume-dir both stages checkpoint there (`compressed/`, `heal/`), so rerunning the command
    continues where a killed run stopped. The staged directory keeps float32 weights for training.
    """
    from svdzip.output import io
    from svdzip.output.loading import parse_dtype
    from svdzip.recover.directory import heal_directory, healed_label

    out, recipe = Path(request.out), request.recipe
    heal_config = recipe.heal_config()
    work = request.resume_dir or Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=_parent(out)))
    try:
        staged = replace(request, out=Path(work) / "compressed", overwrite=True, plots=False,
                         recipe=replace(recipe, heal="none", storage_dtype="float32"),
                         resume_dir=None if request.resume_dir is None else Path(work) / "run")
        first = _run(staged, ctx)
        try:
            report, _ = heal_directory(staged.out, out, heal_config,
                                       resume_dir=Path(work) / "heal" if request.resume_dir else None,
                                       overwrite=request.overwrite, dtype=parse_dtype(recipe.storage_dtype),
                                       fit=heal_check(request.model))
        except HealDoesNotFit as e:  # the compression is kept: saved as what it is, and said so
            _place_copy(staged.out, out, keep=request.resume_dir is not None)
            raise SvdzipError(f"{e}. The compressed model is saved unhealed (float32, recipe heal: none) in {out}: "
                              f"`svdzip heal {out} --out DIR` heals it") from None
        recipe = replace(recipe, healing=replace(recipe.healing, precision=report.config["precision"]))
        recipe.for_output().save(out / RECIPE_FILE)
    finally:
        if request.resume_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    warn_if_stopped(report)
    summary = {**first.summary, "method": healed_label(first.summary.get("method", recipe.label), report),
               "out": str(out), "size_bytes": io.dir_size(out), "heal_s": round(report.seconds, 2),
               "heal": report.brief()}
    return RunResult(out=out, summary=summary, ranks=first.ranks, modules=first.modules, recipe=recipe)
