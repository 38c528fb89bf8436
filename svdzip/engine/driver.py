"""The one compress driver, for every mode: in memory, streamed from disk, resumable, over torch.distributed.

    plan (refuse what the mode cannot do) → load or skeleton → calibration tokens → statistics →
    spectra → [rank 0] allocate → materialise (+ update, + recovery) or the streamed writer → output

A mode changes where weights live (`ResidentWeights` or `StreamedWeights`), whether each step is
checkpointed (`RunState`) and how work is split (`DistContext`); the steps are the same functions.
What each part needs (`svdzip.needs`) is checked against the mode before any weight is read.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from svdzip.config import CompressConfig
from svdzip.core.distributed import DistContext
from svdzip.core.resume import RunState
from svdzip.errors import SvdzipError
from svdzip.needs import Mode, Needs, refuse_unsupported

log = logging.getLogger(__name__)


@dataclass
class CompressRequest:
    """Everything `svdzip compress` is asked; the CLI fills it from its flags."""

    model: str  # alias, local directory or hub id
    config: CompressConfig
    out: Path
    overwrite: bool = False
    stream: bool | None = False  # None: stream when the model would not fit in memory
    resume_dir: Path | None = None
    restart: bool = False
    stats_path: str | None = None  # in-memory, one process: where the statistics are cached
    heldout_samples: int = 8  # held-out calibration windows, for parts that declare `heldout`
    save_dtype: torch.dtype = torch.float32
    heal: Any = None  # a recover.HealConfig, or None
    plots: bool = True
    tokens: torch.Tensor | None = None  # calibration tokens given directly (tests, the Python API)
    heldout_tokens: torch.Tensor | None = None  # with `tokens`: the held-out windows, for parts that declare them


@dataclass
class RunResult:
    out: Path
    summary: dict[str, Any]
    ranks: dict[str, int | None] = field(default_factory=dict)
    modules: list[dict[str, Any]] = field(default_factory=list)  # one row per compressible linear


def part_needs(config: CompressConfig, heal: Any = None) -> dict[str, Needs]:
    """What every part of this run declares, by label (the labels name them in error messages)."""
    from svdzip.allocate import allocator_needs
    from svdzip.methods.factorisations import get_method
    from svdzip.passes.update import get_update

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
    if heal is not None:
        parts[f"--heal {heal.method}"] = Needs(calib_tokens=True, distributable=False).because(
            "healing trains on one process; under torchrun compress first, then run `svdzip heal OUT`")
    return parts


def union(parts: dict[str, Needs]) -> Needs:
    total = Needs()
    for needs in parts.values():
        total = total | needs
    return total


def state_key(source: str, config: CompressConfig, ctx: DistContext, streamed: bool) -> dict[str, Any]:
    """What calibration statistics and spectra depend on (ratio and allocator are not part of it)."""
    return {"model": str(source), "corpus": config.corpus, "samples": config.calib_samples,
            "seq_len": config.calib_seq_len, "seed": config.seed, "batch_size": config.calib_batch_size,
            "method": config.method, "group_size": config.group_size, "share_roles": list(config.share_roles),
            "asvd_alpha": config.asvd_alpha, "asvd_scaling": config.asvd_scaling,
            "world_size": ctx.world_size, "streamed": streamed}


def open_state(root: str | Path, key: dict[str, Any], restart: bool, ctx: DistContext) -> RunState:
    """Rank 0 checks (and with `restart` wipes) the run directory first; the others follow."""
    state = RunState(root, key, restart=restart, writer=True) if ctx.is_main else None
    ctx.barrier()
    return state or RunState(root, key, restart=False, writer=False)


def calibration_tokens_for(tokenizer: Any, config: CompressConfig, needs: Needs, heldout_samples: int,
                           given: torch.Tensor | None = None, given_heldout: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The calibration windows (and held-out ones) if any part needs text; a seeded, disjoint draw."""
    if not needs.data:
        return None, None
    if given is not None:
        if needs.heldout and given_heldout is None:
            raise SvdzipError("this run tunes or guards on held-out windows: pass heldout_tokens with tokens")
        return given, given_heldout
    from svdzip.data import calibration_tokens, load_corpus

    extra = heldout_samples if needs.heldout else 0
    tokens = calibration_tokens(tokenizer, load_corpus(config.corpus), config.calib_samples + extra,
                                config.calib_seq_len, config.seed)
    return tokens[: config.calib_samples], (tokens[config.calib_samples :] if extra else None)


def run(request: CompressRequest, ctx: DistContext | None = None) -> RunResult | None:
    """Compress `request.model` into `request.out` in whatever mode was asked; the result on rank 0."""
    from svdzip.core.distributed import device_for_rank, init_from_env, shutdown

    owned = ctx is None
    ctx = ctx or init_from_env(request.config.device)
    request.config.device = device_for_rank(request.config.device, ctx)
    try:
        return _run(request, ctx)
    finally:
        if owned:
            shutdown(ctx)


def _run(request: CompressRequest, ctx: DistContext) -> RunResult | None:
    from svdzip.assets import resolve_model
    from svdzip.core.checkpoint import should_stream

    config = request.config.validate()
    out = Path(request.out)
    if out.exists() and not request.overwrite:
        raise SvdzipError(f"output directory {out} already exists; pass --overwrite to replace it")
    source = str(resolve_model(request.model))
    streamed = bool(request.stream)
    if request.stream is None and should_stream(source):
        log.warning("the model is larger than 60%% of the available memory: streaming it layer by layer")
        streamed = True
    mode = Mode(streamed=streamed, resumable=request.resume_dir is not None, world_size=ctx.world_size)
    parts = part_needs(config, request.heal)
    refuse_unsupported(parts, mode)
    needs = union(parts)
    if not streamed:
        refuse_if_too_large(source, config, needs, request.heal, ctx.world_size)
    if request.tokens is not None and needs.heldout and request.heldout_tokens is None:
        raise SvdzipError("this run tunes or guards on held-out windows: pass heldout_tokens with tokens")
    if streamed and ctx.enabled and request.resume_dir is None:
        raise SvdzipError("distributed streaming needs a shared --resume-dir for the per-layer statistics")
    if request.heal is not None and (mode.streamed or mode.resumable):
        return _compress_then_heal(request, ctx)
    return _compress(request, source, mode, needs, ctx)


def _compress(request: CompressRequest, source: str, mode: Mode, needs: Needs, ctx: DistContext
              ) -> RunResult | None:
    config, out = request.config, Path(request.out)
    t_start = time.perf_counter()
    model, tokenizer, weights = _open_model(source, config, mode.streamed, request.tokens is None)
    adapter = weights.adapter
    torch.manual_seed(config.seed)
    tokens, heldout = calibration_tokens_for(tokenizer, config, needs, request.heldout_samples, request.tokens,
                                             request.heldout_tokens)
    # (a distributed run needs a shared --resume-dir for that: each rank's temporary directory is its own)
    stats_on_disk = mode.streamed or (request.stats_path is None and (request.resume_dir is not None or not ctx.enabled)
                                      and _grams_too_large(adapter, needs))
    temp_state = stats_on_disk and request.resume_dir is None
    # beside the output, not in /tmp: gigabytes of statistics on a disk the user chose, never in a RAM-backed tmpfs
    root = Path(tempfile.mkdtemp(prefix=f".{out.name}.run-", dir=_parent(out))) if temp_state else request.resume_dir
    timings: dict[str, float] = {}
    try:
        state = None
        if root is not None:
            state = open_state(root, {**state_key(source, config, ctx, mode.streamed),
                                      **({"tokens_given": True} if request.tokens is not None else {})},
                               request.restart, ctx)
        t0 = time.perf_counter()
        stats = _statistics(model, adapter, tokens, source, config, needs, weights, state, ctx, request.stats_path,
                            stats_on_disk)
        timings["calibrate_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        from svdzip.methods.decompose import group_linears
        from svdzip.passes.spectra import decompose_units

        groups = group_linears(adapter, config.share_roles, config.group_size)
        units = decompose_units(adapter, stats, config, groups, weights=weights, on_disk=mode.streamed, state=state,
                                ctx=ctx, device=config.device)
        timings["decompose_s"] = time.perf_counter() - t0
        ctx.barrier()
        if not ctx.is_main:
            return None
        # the spectra are handed over, not kept here, so that the finishing step can free them before the Fisher pass
        # and the heal; the statistics are done with (on Qwen2.5-0.5B: 1 GB of bases, 5 GB of Gram matrices)
        analysis = Analysis(units=units, calibration_tokens=int(stats.tokens) if stats is not None else 0)
        del stats, units
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.alloc-", dir=_parent(out)))
        try:
            if mode.streamed:
                result = _write_streamed(request, weights, analysis.take_units(), tokenizer, state, staging, timings)
            else:
                result = _finish_in_memory(request, model, tokenizer, source, analysis, tokens, heldout, staging,
                                           timings, ctx.world_size)
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


def refuse_if_too_large(source: str, config: CompressConfig, needs: Needs, heal: Any, world_size: int = 1) -> None:
    """Refuse, before loading anything, an in-memory run whose estimated peak exceeds the available memory."""
    if torch.device(config.device).type != "cpu":
        return  # the model and its activations live on the accelerator, not in this machine's memory
    from svdzip.core.checkpoint import checkpoint_elements, memory_limit_bytes
    from svdzip.engine import footprint

    model_config, elements = footprint.read_config(source), checkpoint_elements(source)
    if model_config is None or not elements:
        return  # a hub id: nothing to read before loading
    grams = footprint.gram_bytes_of(model_config) if "grams" in needs.statistics else 0
    estimate = footprint.estimate(
        4 * elements, model_config, gram_bytes=grams, grams_in_memory=0 < grams <= GRAMS_IN_MEMORY_BYTES,
        fisher_tokens=footprint.fisher_tokens(config), heal=heal, grams_freed_after_calibration=True,
        kept=1.0 if config.memory_budget else 1.0 - config.ratio,
        calib_tokens=config.calib_samples * config.calib_seq_len // max(world_size, 1))
    available = memory_limit_bytes()
    log.info("estimated peak memory of this in-memory run: %s (%s); %s available",
             footprint.human(estimate.peak), estimate.describe(), footprint.human(available))
    if estimate.peak > available:
        raise SvdzipError(
            f"this run would need about {footprint.human(estimate.peak)} of memory at its peak "
            f"({estimate.describe()}) and {footprint.human(available)} are available: compress it streamed "
            "instead (--stream [--resume-dir DIR]: one decoder layer in memory at a time), or with fewer "
            "windows per micro-batch (--heal-batch-size 1 --heal-grad-accum N)")


def _parent(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent


def _open_model(source: str, config: CompressConfig, streamed: bool, with_tokenizer: bool):
    """The model in memory, or (streaming) a meta-device skeleton with a checkpoint reader behind it.

    Without `with_tokenizer` (calibration tokens given directly) a bare checkpoint is enough.
    """
    from svdzip.core.layerwise import ResidentWeights
    from svdzip.models.adapter import ModelAdapter
    from svdzip.output.loading import load_model, load_tokenizer

    if not streamed:
        model, tokenizer, _ = load_model(source, config.device, with_tokenizer=with_tokenizer)
        return model, tokenizer, ResidentWeights(model, ModelAdapter(model))
    from svdzip.core.checkpoint import CheckpointReader, StreamedWeights, skeleton
    from svdzip.models.checkpoint_names import CheckpointNames

    model = skeleton(source, torch.float32)
    adapter = ModelAdapter(model)  # opens fused experts / Conv1D into the linears svdzip compresses
    reader = CheckpointReader(source, CheckpointNames(model))
    tokenizer = load_tokenizer(source) if with_tokenizer else None
    return model, tokenizer, StreamedWeights(model, adapter, reader, torch.float32)


def _statistics(model, adapter, tokens, source: str, config: CompressConfig, needs: Needs, weights, state, ctx,
                stats_path: str | None, on_disk: bool):
    """Only the statistics the parts declare: cached by content in memory, checkpointed in a run directory
    (`on_disk`: each layer's statistics stay there and are read back lazily)."""
    kinds = set(needs.statistics) - {"fisher"}
    if not needs.statistics:
        return None
    from svdzip.engine.pipeline import calibration_meta

    if state is None and not ctx.enabled and not on_disk:
        from svdzip.engine.pipeline import prepare_statistics

        return prepare_statistics(model, tokens, source, config, stats_path, kinds=needs.statistics)
    from svdzip.passes.calibrate import calibrate

    stats = None
    if kinds:
        stats = calibrate(model, adapter, tokens, config.calib_batch_size, config.device, kinds, weights=weights,
                          state=state, ctx=ctx, meta=calibration_meta(source, config), on_disk=on_disk)
    if "fisher" in needs.statistics:  # declared non-streamable and non-distributable: in memory, one process
        from svdzip.core.statistics import CalibrationStats
        from svdzip.engine.pipeline import add_fisher

        stats = stats or CalibrationStats(tokens=int(tokens.numel()), meta=calibration_meta(source, config))
        add_fisher(stats, model, tokens, config)
    return stats


def _finish_in_memory(request: CompressRequest, model, tokenizer, source: str, analysis: Analysis, tokens, heldout,
                      staging: Path, timings: dict[str, float], world_size: int) -> RunResult:
    """Allocate, materialise (+ update), recover, store and save — artefacts in place before the output appears."""
    from svdzip.engine.pipeline import compress, store
    from svdzip.output import io

    config = request.config
    result = compress(model, config, calib_tokens=tokens, units=analysis.take_units(), heldout_tokens=heldout,
                      out_dir=staging)
    result.units = None  # the bases are in the factors now; the heal needs the memory
    result.summary.update({k: round(v, 3) for k, v in timings.items()}, calibration_tokens=analysis.calibration_tokens)
    heal_report = _heal_in_memory(model, tokenizer, source, request.heal) if request.heal is not None else None
    quantized = store(result, request.save_dtype)  # after healing: the factors train in float32
    manifest = io.build_manifest(result.modules, result.summary, config.to_dict())
    manifest.details["source_model"] = str(source)
    manifest.details["provenance"]["world_size"] = world_size
    if quantized:
        from svdzip.output.quantize import quantization_record

        manifest.quantization = quantization_record(quantized, config.quantize, config.quantize_scope,
                                                    request.save_dtype)
    if heal_report is not None:
        from svdzip.recover.directory import record_recovery

        record_recovery(manifest, heal_report)
        result.summary["heal_s"] = round(heal_report.seconds, 2)
    rows = [r.to_dict() for r in result.modules]

    def artefacts(tmp: Path) -> None:
        _move_artefacts(staging, tmp)
        if request.plots:
            _plots(tmp, rows, result.effective_ranks, source, config)

    io.save(model, tokenizer, request.out, manifest, overwrite=request.overwrite,
            report={"modules": rows, "effective_ranks": result.effective_ranks}, artefacts=artefacts)
    from svdzip.output.quantize import parameter_bytes

    summary = {**result.summary, "out": str(request.out), "size_bytes": io.dir_size(request.out),
               "weight_bytes_in_memory": parameter_bytes(model)}
    return RunResult(out=Path(request.out), summary=summary, ranks=result.ranks, modules=rows)


def _write_streamed(request: CompressRequest, weights, units, tokenizer, state: RunState, staging: Path,
                    timings: dict[str, float]) -> RunResult:
    from svdzip.engine.pipeline import allocate_units, unit_effective_ranks
    from svdzip.engine.writer import write_streamed
    from svdzip.output import io

    config = request.config
    t0 = time.perf_counter()
    allocation, _, _ = allocate_units(units, config, weights.adapter, model=None)
    ranks = allocation.ranks
    from svdzip.report.plots import write_allocation_report

    write_allocation_report(staging, units, allocation)
    timings["allocate_s"] = time.perf_counter() - t0
    from svdzip.allocate import spent

    dense = sum(u.dense_params for u in units)
    effective = unit_effective_ranks(units)

    def artefacts(tmp: Path, rows: list[Any]) -> None:
        _move_artefacts(staging, tmp)
        if request.plots:
            _plots(tmp, [r.to_dict() for r in rows], effective, str(weights.reader.dir), config)

    t0 = time.perf_counter()
    rows = write_streamed(weights, units, ranks, state, tokenizer, Path(request.out), config, request.save_dtype,
                          summary_extra={"ratio_achieved": 1.0 - spent(units, ranks) / dense,
                                         "effective_ranks": effective, "timings": timings},
                          artefacts=artefacts)
    timings["write_s"] = time.perf_counter() - t0
    summary = {**io.read_manifest(request.out)["details"]["summary"], **{k: round(v, 3) for k, v in timings.items()},
               "out": str(request.out), "size_bytes": io.dir_size(request.out)}
    summary.pop("effective_ranks", None)
    return RunResult(out=Path(request.out), summary=summary, ranks={r.name: r.rank for r in rows},
                     modules=[r.to_dict() for r in rows])


def _move_artefacts(staging: Path, into: Path) -> None:
    for artefact in staging.iterdir():
        shutil.move(str(artefact), into / artefact.name)


def _plots(directory: Path, rows: list[dict], effective: list[dict], source: str, config: CompressConfig) -> None:
    from svdzip.report.plots import write_plots

    what = (f"{100 * config.budget_fraction:.0f}% of the bf16 bytes" if config.budget_fraction
            else "a byte budget" if config.memory_budget else f"{100 * config.ratio:.0f}% removed")
    write_plots(directory, rows, effective, title=f"{Path(str(source)).name}: {config.label} at {what}")


def _heal_in_memory(model, tokenizer, source: str, heal_config):
    """Heal the just-compressed model against a fresh copy of its dense source."""
    from svdzip.recover.heal import heal, heal_windows, load_teacher

    # the teacher is handed over without a name here: heal() frees it once its top-k are cached
    report = heal(model, load_teacher(source, heal_config), heal_windows(tokenizer, heal_config), heal_config)
    warn_if_stopped(report)
    return report


def warn_if_stopped(report) -> None:
    if report.stopped == "nan":
        log.warning("healing stopped on a non-finite loss; the factors of the last good held-out check were kept")


def _compress_then_heal(request: CompressRequest, ctx: DistContext) -> RunResult:
    """Streamed / resumable compression into a staging directory, then the heal from it into `out`.

    With --resume-dir both stages checkpoint there (`compressed/`, `heal/`), so rerunning the command
    continues where a killed run stopped.
    """
    from dataclasses import replace

    from svdzip.output import io
    from svdzip.recover.directory import heal_directory, healed_label

    out = Path(request.out)
    work = request.resume_dir or Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=_parent(out)))
    try:
        staged = replace(request, out=Path(work) / "compressed", overwrite=True, heal=None,
                         save_dtype=torch.float32, plots=False,
                         resume_dir=None if request.resume_dir is None else Path(work) / "run")
        first = _run(staged, ctx)
        report, _ = heal_directory(staged.out, out, request.heal,
                                   resume_dir=Path(work) / "heal" if request.resume_dir else None,
                                   overwrite=request.overwrite, dtype=request.save_dtype)
    finally:
        if request.resume_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    warn_if_stopped(report)
    summary = {**first.summary, "method": healed_label(first.summary.get("method", request.config.label), report),
               "out": str(out), "size_bytes": io.dir_size(out), "heal_s": round(report.seconds, 2),
               "heal": report.brief()}
    return RunResult(out=out, summary=summary, ranks=first.ranks, modules=first.modules)
