"""Calibration: the statistics of every compressible linear's input, one decoder layer at a time.

One function serves every mode. The first layer's inputs are captured once (`layerwise`), then each
layer runs over the cached batches with one `Accumulator` hook per shared input; layer i sees the
outputs of the *original* layers < i, as in SVD-LLM's and ARA's profiling. Where the layer's weights
come from (memory or the checkpoint on disk), whether the data is split over torch.distributed ranks
(statistics all-reduced per layer) and whether each layer is checkpointed for a resumable run are
arguments, not other code paths.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from svdzip.core.distributed import DistContext, data_slice
from svdzip.core.layerwise import ResidentWeights, WeightSource, capture_layer_inputs, forward_pre_hooks, run_layer
from svdzip.core.precision import autocast_for
from svdzip.core.resume import RunState, fault, write_checked
from svdzip.core.statistics import (
    AUXILIARY,
    INPUT_KINDS,
    LAYER_KINDS,
    Accumulator,
    CalibrationStats,
    LayeredStats,
    flatten,
    unflatten,
)
from svdzip.errors import SvdzipError
from svdzip.models.adapter import ModelAdapter
from svdzip.passes.local_gain import PROBE_BATCH, PROBE_WINDOWS, probe_layer

log = logging.getLogger(__name__)


def _reduce(stats: CalibrationStats, ctx: DistContext) -> None:
    for kind in (*INPUT_KINDS, *LAYER_KINDS):
        table = getattr(stats, kind)
        for key in sorted(table):
            table[key] = ctx.all_reduce(table[key], "max" if kind == "abs_max" else "sum")


def _resume_point(state: RunState | None, ctx: DistContext, n_layers: int, kinds: Iterable[str] = ()
                  ) -> tuple[int, list[torch.Tensor] | None]:
    """First layer still to calibrate (agreed by all ranks) and this rank's saved activations.

    A finished layer whose file lacks a kind this run wants (an earlier run asked for fewer) restarts the
    calibration from layer 0: every kind comes from the same pass."""
    if state is None:
        return 0, None
    got = state.load_hidden(ctx.rank)
    last = -1
    if got is not None:
        last = got[0]
        for i in range(last + 1):  # every finished layer's statistics must still be intact, with every kind
            got_layer = state.read_names(state.layer_stats_path(i))  # checked, none of its tensors read
            if got_layer is None:
                log.warning("statistics of layer %d lost; calibration restarts from layer 0", i)
                last = -1
                break
            present = {name.partition("/")[0] for name in got_layer[0]}
            if not set(kinds) <= present:
                log.warning("the saved statistics lack %s, which this run needs; calibration restarts from layer 0",
                            ", ".join(sorted(set(kinds) - present)))
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
def calibrate(model: nn.Module, adapter: ModelAdapter, tokens: torch.Tensor, batch_size: int,
              device: torch.device | str, kinds: Iterable[str] = INPUT_KINDS, *, weights: WeightSource | None = None,
              state: RunState | None = None, ctx: DistContext | None = None, meta: dict[str, Any] | None = None,
              on_disk: bool = False, dtype: torch.dtype = torch.float32) -> CalibrationStats | LayeredStats:
    """Statistics of this rank's slice of `tokens`, reduced over ranks, checkpointed in `state` if given.

    `dtype` is the layers' matmul precision (`core.precision`): under bfloat16 the statistics are those of the
    activations a bfloat16 forward produces, summed in float32/float64 all the same; the layer-local gain's
    probe (a first-order perturbation, which 16-bit rounding would swamp) stays float32.

    `kinds` ⊆ ("grams", "abs_mean", "abs_max", "local"): only those are computed ("local": the layer-local
    gain of every linear, `passes.local_gain`). With `on_disk` (streaming) each layer's statistics stay in
    the run directory and a lazily reading `LayeredStats` is returned.
    """
    wanted = set(kinds) | {AUXILIARY[k] for k in kinds if k in AUXILIARY}
    probing = "local" in wanted
    kinds = tuple(k for k in INPUT_KINDS if k in wanted)
    if tokens is None or tokens.ndim != 2 or tokens.shape[0] == 0:
        raise SvdzipError("calibration needs a non-empty [samples, seq_len] token tensor")
    if on_disk and state is None:
        raise SvdzipError("streaming needs a run directory for the per-layer statistics")
    ctx = ctx or DistContext()
    weights = weights or ResidentWeights(model, adapter)
    device = torch.device(device)
    share = data_slice(tokens.shape[0], ctx)
    mine = tokens[share]
    if mine.shape[0] == 0:
        raise SvdzipError(f"{tokens.shape[0]} calibration sequences cannot be split over {ctx.world_size} ranks")
    n_layers = adapter.num_layers
    start, hidden = _resume_point(state, ctx, n_layers, (*kinds, *(("local",) if probing else ())))
    inputs = capture_layer_inputs(model, adapter, mine, batch_size, device, weights=weights)
    # the layer-local gain's own stream: the first PROBE_WINDOWS windows, on rank 0 only (the others add zeros),
    # so that the sums are the same however the calibration windows are split over processes
    probe = (capture_layer_inputs(model, adapter, tokens[:PROBE_WINDOWS], PROBE_BATCH, device, weights=weights)
             if probing and ctx.is_main else None)
    n_main = len(inputs.hidden)
    if hidden is not None and not probing:
        hidden = hidden[:n_main]  # a run with the probe stream saved it after the calibration windows
    expected = n_main + (len(probe.hidden) if probe is not None else 0)
    if start < n_layers and ctx.min_int(int(hidden is None or len(hidden) == expected)) == 0:
        # saved by a run without the probe stream
        log.warning("the saved activations do not match this run's streams; calibration restarts from layer 0")
        start, hidden = 0, None
    if hidden is None:
        hidden = inputs.hidden + (probe.hidden if probe is not None else [])
    for stream in (inputs, probe):  # from here on the activations live in `hidden` only (the captures keep kwargs)
        if stream is not None:
            stream.hidden.clear()
    counts = ctx.all_reduce(torch.tensor([mine.numel(), n_main], dtype=torch.int64))
    total_tokens, total_batches = int(counts[0]), int(counts[1])
    full = CalibrationStats(tokens=total_tokens, batches=total_batches, meta=dict(meta or {}))
    if not on_disk:  # bring back what a previous run finished
        for i in range(start):
            got = state.read(state.layer_stats_path(i)) if state else None
            if got is None:
                raise SvdzipError(f"statistics of layer {i} vanished during the run")
            unflatten(got[0], full)
    desc = "calibrating layers" + (f" (rank {ctx.rank})" if ctx.enabled else "")
    for index in tqdm(range(start, n_layers), desc=desc, unit="layer", initial=start, total=n_layers):
        layer_stats = CalibrationStats()
        hooks, seen = {}, set()
        for info in adapter.layer_linears(index):
            if info.input_key not in seen:
                seen.add(info.input_key)
                hooks[adapter.module(info.name)] = Accumulator(layer_stats, info.input_key, kinds)
        main_in, probe_in = hidden[:n_main], hidden[n_main:]
        del hidden  # each input is dropped once its output exists (`consume`)
        with weights.layer(index, device) as layer:
            if probing:
                modules = {info.name: adapter.module(info.name) for info in adapter.layer_linears(index)}
                layer_stats.local = probe_layer(layer, modules, probe_in,
                                                probe.kwargs[index] if probe is not None else [], PROBE_BATCH, index,
                                                device)
            with autocast_for(device, dtype):
                with forward_pre_hooks(hooks):
                    main = run_layer(layer, main_in, inputs.kwargs[index], device, consume=True)
                hidden = main + (run_layer(layer, probe_in, probe.kwargs[index], device, consume=True) if probe
                                 else [])
        layer_stats.to_cpu()
        _reduce(layer_stats, ctx)
        if state is not None:
            if ctx.is_main:
                write_checked(state.layer_stats_path(index), flatten(layer_stats), {"layer": index})
            ctx.barrier()  # the layer's statistics exist before any rank records it as done
            state.save_hidden(ctx.rank, index, hidden)
        if not on_disk:
            unflatten(flatten(layer_stats), full)
        del layer_stats
        fault("calib", index)
    if not on_disk:
        full.check_finite()
        return full
    key_layer = {info.input_key: info.layer for info in adapter.linears()}
    name_layer = {info.name: info.layer for info in adapter.linears()}
    return LayeredStats(state, key_layer, total_tokens, total_batches, dict(meta or {}),
                        (*kinds, *(("local",) if probing else ())), name_layer)


def collect_statistics(model: nn.Module, tokens: torch.Tensor, batch_size: int = 8,
                       device: torch.device | str = "cpu", meta: dict[str, Any] | None = None,
                       kinds: Iterable[str] = INPUT_KINDS, dtype: torch.dtype = torch.float32) -> CalibrationStats:
    """In-memory statistics of a loaded model, on one process (the Python API's short form)."""
    return calibrate(model, ModelAdapter(model), tokens, batch_size, device, kinds, meta=meta, dtype=dtype)
