"""Scale: models larger than memory, several processes, resumable runs — one layer-sequential engine.

Three concerns share one loop, because they all hinge on "one decoder layer at a time":

* **Streaming.** The model is a skeleton on the meta device (accelerate's `init_empty_weights`);
  a `CheckpointReader` reads each tensor from the checkpoint's safetensors (`safe_open`, one tensor
  at a time) just when its layer or unit is processed, and the layer goes back to meta after. The
  statistics of each layer go to the run directory and are read back lazily (`LayeredStats`); the
  spectra keep only σ² in memory, their bases wait on disk until the output is written, layer by
  layer, one shard per layer.
* **Distribution** (`svdzip.engine.distributed`): every rank calibrates its slice of the data, per-layer
  statistics are all-reduced, decompositions are spread over ranks by cost and broadcast back.
* **Resume** (`svdzip.engine.resume`): after every layer, the reduced statistics and this rank's
  activations are checkpointed; every finished spectrum is a file. A rerun skips what exists.

The in-memory path (`pipeline.compress`) is unchanged; this engine only feeds it statistics and
spectra, or (streaming) replaces materialise + save with a shard-by-shard writer.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from svdzip.config import CompressConfig
from svdzip.engine.calibrate import CalibrationStats, _Accumulator, capture_layer_inputs, run_layer
from svdzip.engine.distributed import DistContext, assign_by_cost, data_slice, eigen_cost
from svdzip.engine.resume import RunState, read_checked, write_checked
from svdzip.errors import SvdzipError
from svdzip.methods.decompose import Unit, decompose, group_linears
from svdzip.methods.factorisations import get_method
from svdzip.methods.linalg import Spectrum
from svdzip.models.adapter import LinearInfo, ModelAdapter

log = logging.getLogger(__name__)

STAT_KINDS = ("grams", "abs_mean", "abs_max")


# ---------------------------------------------------------------------------------------------
# fault injection (tests and the benchmark's fault table)
# ---------------------------------------------------------------------------------------------
def _fault(stage: str, index: int) -> None:
    """`SVDZIP_FAULT=calib:1` raises after calibrating layer 1; `…:kill` dies like SIGKILL (no cleanup)."""
    spec = os.environ.get("SVDZIP_FAULT")
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] == stage and int(parts[1]) == index:
        if len(parts) > 2 and parts[2] == "kill":
            os._exit(137)
        raise RuntimeError(f"injected fault after {stage} {index}")


def _release() -> None:
    """Hand freed memory back to the OS after a layer (glibc keeps it otherwise, and RSS would creep)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------------------------------------
# weights from disk
# ---------------------------------------------------------------------------------------------
class CheckpointReader:
    """Tensor by tensor access to a HF checkpoint's safetensors (single file or sharded index)."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        index = self.dir / "model.safetensors.index.json"
        self.where: dict[str, Path] = {}
        if index.is_file():
            for name, file in json.loads(index.read_text())["weight_map"].items():
                self.where[name] = self.dir / file
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise SvdzipError(f"{self.dir} has no safetensors weights to stream from")
            for file in files:
                with safe_open(str(file), "pt") as f:
                    for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                        self.where[name] = file

    def resolve(self, name: str) -> str:
        for candidate in (name, name.removeprefix("model."), f"model.{name}"):
            if candidate in self.where:
                return candidate
        raise SvdzipError(f"checkpoint {self.dir} has no tensor for {name}")

    def get(self, name: str) -> torch.Tensor:
        key = self.resolve(name)
        with safe_open(str(self.where[key]), "pt") as f:
            return f.get_tensor(key)

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in set(self.where.values()))


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner_name, _, leaf = name.rpartition(".")
    return (module.get_submodule(owner_name) if owner_name else module), leaf


def _skipped(full: str, skip: tuple[str, ...]) -> bool:
    return any(full.startswith(s) for s in skip)


def load_weights(module: nn.Module, prefix: str, reader: CheckpointReader, dtype: torch.dtype | None,
                 device: torch.device | str = "cpu", skip: tuple[str, ...] = ()) -> None:
    """Fill a meta module's parameters from the checkpoint (`prefix` + name = checkpoint name).

    Tied parameters (embedding and head) stay one object: the first name read fills both.
    """
    loaded: dict[int, nn.Parameter] = {}
    for name, param in list(module.named_parameters(remove_duplicate=False)):
        if _skipped(prefix + name, skip):
            continue
        owner, leaf = _owner(module, name)
        if id(param) in loaded:
            owner._parameters[leaf] = loaded[id(param)]
            continue
        if param.device.type != "meta":
            continue
        value = reader.get(prefix + name)
        value = value.to(device=device, dtype=dtype if dtype and value.is_floating_point() else value.dtype)
        loaded[id(param)] = owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def unload_weights(module: nn.Module, skip: tuple[str, ...] = (), prefix: str = "") -> None:
    """Back to the meta device (ties kept): the memory of these weights is released."""
    gone: dict[int, nn.Parameter] = {}
    for name, param in list(module.named_parameters(remove_duplicate=False)):
        if _skipped(prefix + name, skip):
            continue
        owner, leaf = _owner(module, name)
        if id(param) not in gone:
            gone[id(param)] = nn.Parameter(param.detach().to("meta"), requires_grad=False)
        owner._parameters[leaf] = gone[id(param)]


def skeleton(source: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """The model's modules with every parameter on the meta device (no weight memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    return model.eval()


def _non_layer_prefixes(adapter: ModelAdapter) -> tuple[str, ...]:
    return (adapter.spec.layers_path + ".",)


@contextmanager
def non_layer_weights(model: nn.Module, adapter: ModelAdapter, reader: CheckpointReader | None,
                      dtype: torch.dtype | None) -> Iterator[None]:
    """Embeddings, norms and head in memory for the capture pass only (streaming)."""
    if reader is None:
        yield
        return
    skip = _non_layer_prefixes(adapter)
    head = model.get_output_embeddings()
    tied = head is not None and getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    head_names = tuple(f"{n}." for n, mod in model.named_modules() if mod is head) if tied else ()
    load_weights(model, "", reader, dtype, skip=skip + head_names)
    if tied:  # a tied checkpoint stores the embedding once
        head.weight = model.get_input_embeddings().weight
    try:
        yield
    finally:
        unload_weights(model, skip=skip)


# ---------------------------------------------------------------------------------------------
# statistics: per layer, reduced over ranks, checkpointed
# ---------------------------------------------------------------------------------------------
def _flatten(stats: CalibrationStats) -> dict[str, torch.Tensor]:
    return {f"{kind}/{k}": v for kind in STAT_KINDS for k, v in getattr(stats, kind).items()}


def _unflatten(tensors: dict[str, torch.Tensor], into: CalibrationStats) -> None:
    for name, value in tensors.items():
        kind, _, key = name.partition("/")
        getattr(into, kind)[key] = value


class _LazyTable(Mapping):
    def __init__(self, owner: LayeredStats, kind: str):
        self.owner, self.kind = owner, kind

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.owner.key_layer:
            raise KeyError(key)
        return getattr(self.owner.layer(self.owner.key_layer[key]), self.kind)[key]

    def __contains__(self, key: object) -> bool:
        return key in self.owner.key_layer

    def __iter__(self) -> Iterator[str]:
        return iter(self.owner.key_layer)

    def __len__(self) -> int:
        return len(self.owner.key_layer)


class LayeredStats:
    """`CalibrationStats` read layer by layer from the run directory (one layer cached at a time)."""

    def __init__(self, state: RunState, key_layer: dict[str, int], tokens: int, batches: int,
                 meta: dict[str, Any]):
        self.state, self.key_layer = state, key_layer
        self.tokens, self.batches, self.meta = tokens, batches, meta
        self.grams, self.abs_mean, self.abs_max = (_LazyTable(self, k) for k in STAT_KINDS)
        self.fisher: dict[str, torch.Tensor] = {}
        self._cached: tuple[int, CalibrationStats] | None = None

    def layer(self, index: int) -> CalibrationStats:
        if self._cached is None or self._cached[0] != index:
            self._cached = None
            got = read_checked(self.state.layer_stats_path(index))
            if got is None:
                raise SvdzipError(f"statistics of layer {index} are missing or corrupted in {self.state.root}; "
                                  "rerun the same command to recompute them")
            stats = CalibrationStats()
            _unflatten(got[0], stats)
            self._cached = (index, stats)
        return self._cached[1]


def _reduce(stats: CalibrationStats, ctx: DistContext) -> None:
    for kind in STAT_KINDS:
        table = getattr(stats, kind)
        for key in sorted(table):
            table[key] = ctx.all_reduce(table[key], "max" if kind == "abs_max" else "sum")


def _resume_point(state: RunState | None, ctx: DistContext, n_layers: int
                  ) -> tuple[int, list[torch.Tensor] | None]:
    """First layer still to calibrate (agreed by all ranks) and this rank's saved activations."""
    if state is None:
        return 0, None
    got = state.load_hidden(ctx.rank)
    last = -1
    if got is not None:
        last = got[0]
        for i in range(last + 1):  # every finished layer's statistics must still be intact
            if read_checked(state.layer_stats_path(i)) is None:
                log.warning("statistics of layer %d lost; calibration restarts from layer 0", i)
                last = -1
                break
    agreed = ctx.min_int(last)
    if ctx.enabled and -ctx.min_int(-last) != agreed:  # ranks stopped at different layers
        agreed = -1
    if agreed < 0:
        return 0, None
    if agreed >= n_layers - 1:
        return n_layers, None
    log.info("calibration resumes at layer %d (layers 0–%d restored from %s)", agreed + 1, agreed, state.root)
    return agreed + 1, got[1]


@torch.no_grad()
def calibrate_layers(model: nn.Module, adapter: ModelAdapter, tokens: torch.Tensor, batch_size: int,
                     device: str, *, reader: CheckpointReader | None = None, dtype: torch.dtype | None = None,
                     state: RunState | None = None, ctx: DistContext | None = None,
                     meta: dict[str, Any] | None = None) -> CalibrationStats | LayeredStats:
    """Layer-sequential statistics of this rank's data slice, reduced over ranks, checkpointed.

    With a `reader` (streaming) each layer's weights are read just for its turn and the result is
    a `LayeredStats` on disk; otherwise an in-memory `CalibrationStats`.
    """
    ctx = ctx or DistContext()
    mine = tokens[data_slice(tokens.shape[0], ctx)]
    if mine.shape[0] == 0:
        raise SvdzipError(f"{tokens.shape[0]} calibration sequences cannot be split over {ctx.world_size} ranks")
    n_layers = adapter.num_layers
    start, hidden = _resume_point(state, ctx, n_layers)
    with non_layer_weights(model, adapter, reader, dtype):
        inputs = capture_layer_inputs(model, adapter, mine, batch_size, device)
    if hidden is None:
        hidden = inputs.hidden
    counts = ctx.all_reduce(torch.tensor([mine.numel(), len(inputs.hidden)], dtype=torch.int64))
    total_tokens, total_batches = int(counts[0]), int(counts[1])
    full = CalibrationStats(tokens=total_tokens, batches=total_batches, meta=dict(meta or {}))
    if reader is None:  # in memory: bring back what a previous run finished
        for i in range(start):
            got = read_checked(state.layer_stats_path(i)) if state else None
            if got is None:
                raise SvdzipError(f"statistics of layer {i} vanished during the run")
            _unflatten(got[0], full)
    for index in tqdm(range(start, n_layers), desc=f"calibrating layers (rank {ctx.rank})", unit="layer",
                      initial=start, total=n_layers):
        layer = adapter.layers[index]
        prefix = f"{adapter.spec.layers_path}.{index}."
        if reader is not None:
            load_weights(layer, prefix, reader, dtype, device)
        home = next(layer.parameters()).device
        layer.to(device)
        layer_stats = CalibrationStats()
        handles, seen = [], set()
        for info in adapter.layer_linears(index):
            if info.input_key not in seen:
                seen.add(info.input_key)
                hook = _Accumulator(layer_stats, info.input_key)
                handles.append(adapter.module(info.name).register_forward_pre_hook(hook))
        try:
            hidden = run_layer(layer, hidden, inputs.kwargs[index], device)
        finally:
            for h in handles:
                h.remove()
            if reader is not None:
                unload_weights(layer)
            else:
                layer.to(home)
        _reduce(layer_stats, ctx)
        if state is not None:
            if ctx.is_main:
                write_checked(state.layer_stats_path(index), _flatten(layer_stats), {"layer": index})
            ctx.barrier()  # the layer's statistics exist before any rank records it as done
            state.save_hidden(ctx.rank, index, hidden)
        if reader is None:
            _unflatten(_flatten(layer_stats), full)
        else:
            del layer_stats
            _release()
        _fault("calib", index)
    if reader is None:
        full.check_finite()
        return full
    if state is None:
        raise SvdzipError("streaming needs a run directory for the per-layer statistics")
    key_layer = {info.input_key: info.layer for info in adapter.linears()}
    return LayeredStats(state, key_layer, total_tokens, total_batches, dict(meta or {}))


# ---------------------------------------------------------------------------------------------
# decomposition: jobs by shared input, spread by cost, checkpointed per unit
# ---------------------------------------------------------------------------------------------
def _jobs(groups: list[list[LinearInfo]]) -> list[list[int]]:
    """Units reading the same inputs go together: their metric's square root is computed once."""
    by_key: dict[tuple[str, ...], list[int]] = {}
    for i, members in enumerate(groups):
        by_key.setdefault(tuple(m.input_key for m in members), []).append(i)
    return list(by_key.values())


def _job_cost(groups: list[list[LinearInfo]], job: list[int]) -> float:
    cols = groups[job[0]][0].in_features
    return float(cols) ** 3 + sum(eigen_cost(sum(m.out_features for m in groups[u]), cols) for u in job)


def _placeholder(basis_shape: tuple[int, int]) -> torch.Tensor:
    """A basis with its shape but no memory (streaming: the real one waits on disk)."""
    return torch.empty(basis_shape, device="meta")


def decompose_units(adapter: ModelAdapter, stats: Any, config: CompressConfig, groups: list[list[LinearInfo]],
                    *, reader: CheckpointReader | None = None, dtype: torch.dtype | None = None,
                    state: RunState | None = None, ctx: DistContext | None = None,
                    device: str = "cpu") -> list[Unit]:
    """Spectra of every unit: this rank's share computed (or restored), then everyone's broadcast."""
    ctx = ctx or DistContext()
    jobs = _jobs(groups)
    owners = assign_by_cost([_job_cost(groups, j) for j in jobs], ctx.world_size)
    owner_of = {u: owners[j] for j, job in enumerate(jobs) for u in job}
    done: dict[int, Unit] = {}
    mine = [job for job, owner in zip(jobs, owners, strict=True) if owner == ctx.rank]
    for job in tqdm(mine, desc=f"decomposing ({config.method}, rank {ctx.rank})", unit="group"):
        todo = []
        for u in job:
            restored = state.load_unit(u, _unit_name(groups[u])) if state else None
            if restored is not None:
                sigma2, basis, secs = restored
                done[u] = Unit(members=list(groups[u]), spectrum=Spectrum(sigma2, basis), seconds=secs)
            else:
                todo.append(u)
        if not todo:
            continue
        members_all = [m for u in todo for m in groups[u]]
        if reader is not None:
            for m in members_all:
                load_weights(adapter.module(m.name), f"{m.name}.", reader, dtype)
        try:
            units = decompose(adapter, stats, config.method, [groups[u] for u in todo], config.asvd_alpha,
                              config.asvd_scaling, device=device)
        finally:
            if reader is not None:
                for m in members_all:
                    unload_weights(adapter.module(m.name))
        for u, unit in zip(todo, units, strict=True):
            if state is not None:
                state.save_unit(u, unit.name, unit.spectrum.sigma2, unit.spectrum.basis, unit.seconds)
                if reader is not None:  # streaming: the basis waits on disk, not in memory
                    unit.spectrum = Spectrum(unit.spectrum.sigma2, _placeholder(tuple(unit.spectrum.basis.shape)))
            done[u] = unit
            _fault("unit", u)
        if reader is not None:
            for u in job:
                if done[u].spectrum.basis.device.type != "meta":
                    done[u].spectrum = Spectrum(done[u].spectrum.sigma2,
                                                _placeholder(tuple(done[u].spectrum.basis.shape)))
            _release()
    return _gather(groups, done, owner_of, ctx, state, keep_basis=reader is None)


def _unit_name(members: list[LinearInfo]) -> str:
    return members[0].name if len(members) == 1 else "+".join(m.name for m in members)


def _gather(groups: list[list[LinearInfo]], done: dict[int, Unit], owner_of: dict[int, int], ctx: DistContext,
            state: RunState | None, keep_basis: bool) -> list[Unit]:
    """Every unit's spectrum on every rank, in unit order (owner broadcasts shape, σ² + time, basis)."""
    result: list[Unit] = []
    for u, members in enumerate(groups):
        unit = done.get(u)
        if ctx.enabled:
            src = owner_of[u]
            mine = ctx.rank == src
            r = min(sum(m.out_features for m in members), members[0].in_features)
            shape = torch.tensor(list(unit.spectrum.basis.shape) if mine else [0, 0], dtype=torch.int64)
            shape = ctx.broadcast(shape, src)
            head = torch.zeros(r + 1, dtype=torch.float64)
            if mine:
                head[:r], head[r] = unit.spectrum.sigma2.double(), unit.seconds
            head = ctx.broadcast(head, src)
            if mine and unit.spectrum.basis.device.type == "meta":  # streamed: read back from the run dir
                unit.spectrum = Spectrum(unit.spectrum.sigma2, state.load_unit(u, unit.name)[1])
            basis = unit.spectrum.basis.float() if mine else torch.zeros(*shape.tolist(), dtype=torch.float32)
            basis = ctx.broadcast(basis, src)
            if not mine:
                unit = Unit(members=list(members), spectrum=Spectrum(head[:r].clone(), basis),
                            seconds=float(head[r]))
                if state is not None and ctx.is_main and not keep_basis:
                    state.save_unit(u, unit.name, unit.spectrum.sigma2, basis, unit.seconds)
        if not keep_basis:
            unit.spectrum = Spectrum(unit.spectrum.sigma2, _placeholder(tuple(unit.spectrum.basis.shape)))
        result.append(unit)
    return result


# ---------------------------------------------------------------------------------------------
# in-memory orchestration (distributed / resumable), then pipeline.compress
# ---------------------------------------------------------------------------------------------
def state_key(source: str, config: CompressConfig, ctx: DistContext, streamed: bool) -> dict[str, Any]:
    """What calibration statistics and spectra depend on (ratio and allocator are not part of it)."""
    return {"model": str(source), "corpus": config.corpus, "samples": config.calib_samples,
            "seq_len": config.calib_seq_len, "seed": config.seed, "batch_size": config.calib_batch_size,
            "method": config.method, "group_size": config.group_size, "share_roles": list(config.share_roles),
            "asvd_alpha": config.asvd_alpha, "asvd_scaling": config.asvd_scaling,
            "world_size": ctx.world_size, "streamed": streamed}


def open_state(root: str | os.PathLike, key: dict[str, Any], restart: bool, ctx: DistContext) -> RunState:
    """Rank 0 checks (and with `restart` wipes) the run directory first; the others follow."""
    state = RunState(root, key, restart=restart, writer=True) if ctx.is_main else None
    ctx.barrier()
    return state or RunState(root, key, restart=False, writer=False)


def prepare_scaled(model: nn.Module, tokens: torch.Tensor | None, source: str, config: CompressConfig,
                   ctx: DistContext, state: RunState | None) -> tuple[CalibrationStats | None, list[Unit]]:
    """Statistics and spectra of an in-memory model, spread over ranks and resumable."""
    if config.method == "fwsvd" and ctx.enabled:
        raise SvdzipError("fwsvd's Fisher pass is not distributed yet; run it with one process")
    adapter = ModelAdapter(model)
    stats = None
    if get_method(config.method).needs(config).statistics:
        from svdzip.engine.pipeline import calibration_meta

        stats = calibrate_layers(model, adapter, tokens, config.calib_batch_size, config.device,
                                 state=state, ctx=ctx, meta=calibration_meta(source, config))
    groups = group_linears(adapter, config.share_roles, config.group_size)
    units = decompose_units(adapter, stats, config, groups, state=state, ctx=ctx, device=config.device)
    return stats, units


# ---------------------------------------------------------------------------------------------
# streaming compression: write the output layer by layer
# ---------------------------------------------------------------------------------------------
@dataclass
class StreamResult:
    out: Path
    summary: dict[str, Any]
    modules: list[Any]
    ranks: dict[str, int | None]


def _check_streamable(config: CompressConfig) -> None:
    problems = []
    if config.update:
        problems.append(f"the '{config.update}' update (it needs the whole model in memory)")
    if config.group_size > 1:
        problems.append("Basis Sharing across layers")
    if config.method == "fwsvd":
        problems.append("fwsvd (its Fisher pass back-propagates through the whole model)")
    if config.allocator in ("ara", "strs"):
        problems.append(f"the '{config.allocator}' allocator (it evaluates the model)")
    if config.allocator == "loss-aware" and config.allocator_options.get("signal", "fisher") == "fisher":
        problems.append("the loss-aware allocator's fisher signal (it back-propagates through the model; "
                        "--allocator-option signal=relative does not)")
    if problems:
        raise SvdzipError("streaming does not support " + "; ".join(problems) + "; run without --stream")


def stream_compress(source: str | os.PathLike, tokenizer: Any, tokens: torch.Tensor | None, config: CompressConfig,
                    out: str | os.PathLike, *, state_dir: str | os.PathLike | None = None, restart: bool = False,
                    ctx: DistContext | None = None, dtype: torch.dtype | None = torch.float32,
                    save_dtype: torch.dtype | None = None, overwrite: bool = False) -> StreamResult | None:
    """Compress a checkpoint without ever holding more than one decoder layer's weights.

    Returns the result on rank 0 (None on other ranks). Without `state_dir` a temporary run
    directory holds the statistics and spectra and is removed afterwards.
    """
    from svdzip.allocate import AllocationContext, allocate, spent
    from svdzip.budget import keep_budget
    from svdzip.engine.pipeline import calibration_meta

    config.validate()
    _check_streamable(config)
    ctx = ctx or DistContext()
    out = Path(out)
    if out.exists() and not overwrite:
        raise SvdzipError(f"output directory {out} already exists; pass --overwrite to replace it")
    torch.manual_seed(config.seed)
    t_start = time.perf_counter()
    reader = CheckpointReader(source)
    model = skeleton(source, dtype)
    adapter = ModelAdapter(model)
    temp_state = state_dir is None
    root = Path(tempfile.mkdtemp(prefix="svdzip-run-")) if temp_state else Path(state_dir)
    if temp_state and ctx.enabled:
        raise SvdzipError("distributed streaming needs a shared --resume-dir for the per-layer statistics")
    state = open_state(root, state_key(str(source), config, ctx, streamed=True), restart, ctx)
    timings: dict[str, float] = {}
    try:
        stats = None
        if get_method(config.method).needs(config).statistics:
            t0 = time.perf_counter()
            stats = calibrate_layers(model, adapter, tokens, config.calib_batch_size, config.device, reader=reader,
                                     dtype=dtype, state=state, ctx=ctx, meta=calibration_meta(str(source), config))
            timings["calibrate_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        groups = group_linears(adapter)
        units = decompose_units(adapter, stats, config, groups, reader=reader, dtype=dtype, state=state, ctx=ctx,
                                device=config.device)
        timings["decompose_s"] = time.perf_counter() - t0
        ctx.barrier()
        if not ctx.is_main:
            return None
        t0 = time.perf_counter()
        dense = sum(u.dense_params for u in units)
        actx = AllocationContext(ratio=config.ratio, budget=keep_budget(dense, config.ratio),
                                 options=config.allocator_options, adapter=adapter,
                                 device=config.device, seed=config.seed)
        ranks = allocate(config.allocator, units, actx).ranks
        timings["allocate_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        rows = write_streamed(model, adapter, reader, units, ranks, state, tokenizer, out, config, dtype,
                              save_dtype or dtype,
                              summary_extra={"ratio_achieved": 1.0 - spent(units, ranks) / dense, "timings": timings})
        timings["write_s"] = time.perf_counter() - t0
    finally:
        if temp_state:
            shutil.rmtree(root, ignore_errors=True)
    summary = json.loads((out / "svdzip_report.json").read_text())["summary"]
    summary.update({k: round(v, 3) for k, v in timings.items()})
    summary["seconds_total"] = round(time.perf_counter() - t_start, 2)
    return StreamResult(out=out, summary=summary, modules=rows, ranks={r.name: r.rank for r in rows})


@torch.no_grad()
def write_streamed(model: nn.Module, adapter: ModelAdapter, reader: CheckpointReader, units: list[Unit],
                   ranks: list[int | None], state: RunState, tokenizer: Any, out: Path, config: CompressConfig,
                   dtype: torch.dtype | None, save_dtype: torch.dtype | None, summary_extra: dict[str, Any]
                   ) -> list[Any]:
    """Materialise and save one decoder layer at a time (one shard each), then the rest; atomically."""
    from svdzip.methods.materialise import materialise
    from svdzip.output import io

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        n = adapter.num_layers
        shard_names = [f"model-{i + 1:05d}-of-{n + 1:05d}.safetensors" for i in range(n + 1)]
        weight_map: dict[str, str] = {}
        rows = []
        bias: dict[str, bool] = {}
        by_layer: dict[int, list[int]] = {}
        for u, unit in enumerate(units):
            by_layer.setdefault(unit.members[0].layer, []).append(u)
        for index in tqdm(range(n), desc="writing layers", unit="layer"):
            layer = adapter.layers[index]
            prefix = f"{adapter.spec.layers_path}.{index}."
            load_weights(layer, prefix, reader, dtype)
            mine = by_layer.get(index, [])
            for u in mine:
                if ranks[u] is not None:
                    restored = state.load_unit(u, units[u].name)
                    if restored is None:
                        raise SvdzipError(f"spectrum of {units[u].name} is missing or corrupted in {state.root}; "
                                          "rerun the same command to recompute it")
                    units[u].spectrum = Spectrum(restored[0], restored[1])
            rows += materialise(adapter, [units[u] for u in mine], [ranks[u] for u in mine])
            for u in mine:
                spec = units[u].spectrum
                units[u].spectrum = Spectrum(spec.sigma2, _placeholder(tuple(spec.basis.shape)))
                for m in units[u].members:
                    mod = adapter.module(m.name)
                    if hasattr(mod, "left"):
                        bias[m.name] = mod.left.bias is not None
            tensors = {prefix + k: v.to(save_dtype) if v.is_floating_point() and save_dtype else v
                       for k, v in layer.state_dict().items()}
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / shard_names[index]),
                      metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, shard_names[index]))
            del tensors
            unload_weights(layer)
            _release()
        rest = {}
        tied = getattr(model.config, "tie_word_embeddings", False)
        out_emb = model.get_output_embeddings()
        head_names = {f"{name}.weight" for name, mod in model.named_modules() if mod is out_emb} if tied else set()
        for name, _ in model.named_parameters():
            if name.startswith(adapter.spec.layers_path + ".") or name in head_names:
                continue
            value = reader.get(name)
            rest[name] = value.to(save_dtype) if save_dtype and value.is_floating_point() else value
        save_file(rest, str(tmp / shard_names[n]), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(rest, shard_names[n]))
        total = sum((tmp / s).stat().st_size for s in shard_names)
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        summary = {"method": config.label, "ratio_requested": config.ratio, "streamed": True,
                   "decoder_linear_params_before": adapter.decoder_linear_params(),
                   "dense_modules": sum(1 for r in rows if r.rank is None), **summary_extra}
        manifest = io.build_manifest(rows, summary, config.to_dict())
        manifest.details["provenance"]["streamed"] = True
        manifest.details["source_model"] = str(reader.dir)
        for name, entry in manifest.modules.items():
            entry["bias"] = bias.get(name, False)
        model.config.quantization_config = manifest
        try:
            if save_dtype is not None:
                model.config.dtype = save_dtype
            model.config.save_pretrained(tmp)
        finally:
            del model.config.quantization_config
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "svdzip_report.json").write_text(json.dumps(
            {**manifest.details, "modules": [r.to_dict() for r in rows]}, indent=2, default=str))
        io.replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return rows


# ---------------------------------------------------------------------------------------------
# memory: when to stream automatically
# ---------------------------------------------------------------------------------------------
def memory_limit_bytes() -> int:
    """Available memory: the cgroup limit if one is set, else MemAvailable."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def should_stream(source: str | os.PathLike, dtype_bytes: int = 4, fraction: float = 0.6) -> bool:
    """Stream when the float model would take more than `fraction` of the available memory."""
    path = Path(source)
    if not path.is_dir() or not any(path.glob("*.safetensors")):
        return False
    reader = CheckpointReader(path)
    elements = 0
    for name, file in reader.where.items():
        with safe_open(str(file), "pt") as f:
            elements += math.prod(f.get_slice(name).get_shape())
    return elements * dtype_bytes > fraction * memory_limit_bytes()


# ---------------------------------------------------------------------------------------------
# command line: `svdzip compress --stream / --resume-dir`, and under torchrun
# ---------------------------------------------------------------------------------------------
def wants_scaled(args: Any) -> bool:
    return bool(args.stream or args.resume_dir or int(os.environ.get("WORLD_SIZE", "1")) > 1)


def cli_compress(args: Any, config: CompressConfig, out: Path, dtype: torch.dtype) -> dict[str, Any]:
    """The `compress` command on the scaled engine; rank 0 writes and reports, other ranks return {}."""
    from svdzip.assets import resolve_model
    from svdzip.engine.distributed import device_for_rank, init_from_env, shutdown
    from svdzip.output import io

    ctx = init_from_env(config.device)
    config.device = device_for_rank(config.device, ctx)
    t_start = time.perf_counter()
    try:
        source = resolve_model(args.model)
        stream = args.stream
        if not stream and should_stream(source):
            log.warning("the model is larger than %.0f%% of the available memory: streaming it layer by layer", 60)
            stream = True
        if stream:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source)
            tokens = _tokens(tokenizer, config)
            res = stream_compress(source, tokenizer, tokens, config, out, state_dir=args.resume_dir,
                                  restart=args.restart, ctx=ctx, save_dtype=dtype, overwrite=args.overwrite)
            if res is None:
                args.json = False
                return {}
            summary = {**res.summary, "out": str(out), "size_bytes": io.dir_size(out),
                       "peak_rss_bytes": _peak_rss(), "world_size": ctx.world_size}
            log.info("%s (streamed): removed %.2f%% of decoder-linear parameters; %.1f s; peak RSS %.0f MiB",
                     summary["method"], 100 * summary["ratio_achieved"], summary["seconds_total"],
                     summary["peak_rss_bytes"] / 2**20)
            return summary
        from svdzip.engine.pipeline import compress
        from svdzip.models.loading import load_model

        model, tokenizer, source = load_model(args.model, config.device)
        torch.manual_seed(config.seed)
        tokens = _tokens(tokenizer, config)
        state = None
        if args.resume_dir:
            state = open_state(args.resume_dir, state_key(source, config, ctx, streamed=False), args.restart, ctx)
        stats, units = prepare_scaled(model, tokens, source, config, ctx, state)
        if not ctx.is_main:
            args.json = False
            return {}
        result = compress(model, config, stats=stats, calib_tokens=tokens, units=units)
        model.to(dtype)
        manifest = io.build_manifest(result.modules, result.summary, config.to_dict())
        manifest.details["source_model"] = str(source)
        manifest.details["provenance"]["world_size"] = ctx.world_size
        io.save(model, tokenizer, out, manifest, overwrite=args.overwrite,
                report={"modules": [r.to_dict() for r in result.modules]})
        summary = {**result.summary, "out": str(out), "seconds_total": round(time.perf_counter() - t_start, 2),
                   "size_bytes": io.dir_size(out), "peak_rss_bytes": _peak_rss(), "world_size": ctx.world_size}
        log.info("%s: removed %.2f%% of decoder-linear parameters with %d process(es); %.1f s",
                 summary["method"], 100 * summary["ratio_achieved"], ctx.world_size, summary["seconds_total"])
        return summary
    finally:
        shutdown(ctx)


def _tokens(tokenizer: Any, config: CompressConfig) -> torch.Tensor | None:
    from svdzip.data import calibration_tokens, load_corpus

    needs = (get_method(config.method).needs(config).statistics or config.update
             or config.allocator in ("ara", "strs"))
    if not needs:
        return None
    return calibration_tokens(tokenizer, load_corpus(config.corpus), config.calib_samples, config.calib_seq_len,
                              config.seed)


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
