"""vLLM plugin: serve an svdzip directory with its low-rank factors, never re-densified.

vLLM loads this module through the `vllm.general_plugins` entry point (`register`), in every process.
It registers the quantization method `svdzip`, which vLLM picks from `config.json`'s
`quantization_config`. Each linear the manifest lists runs as two matmuls; a fused q/k/v or gate/up
layer multiplies its input once by the stack of its shards' right factors (plus any dense shard's
weight), then each low-rank shard's left factor (see `svdzip.serve.layout`). Which architectures are
served and which layers pack which shards is the family table's `serving` entry (`svdzip.models.families`),
checked against vLLM's own packing when the first layer is built. MoDeGPT's slimmed linears are dense
shards that compute a subset of their outputs (zeros elsewhere) or read a subset of their inputs, so
vLLM's model code runs at the config's sizes, unchanged (`svdzip.serve.layout`). Basis-Sharing bases are
stored once in the config object and used by every layer of their group. Every factor goes through
vLLM's own CPU GEMM dispatch (oneDNN / AMX kernels), the same as the dense layers it replaces.
Under tensor parallelism each rank loads the slices `layout.rank_slice` names (README "Serving with vLLM").
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.models.utils import WeightsMapper
from vllm.platforms import current_platform

from svdzip.errors import SvdzipError
from svdzip.serve.layout import (
    PARAM_RENAMES,
    EngineLayer,
    LayerLayout,
    build_layout,
    check_format,
    check_manifest,
    check_packing,
    check_parallel,
    expected_linears,
    packing,
    rank_slice,
    served_family,
    shard_index,
    shard_names,
)

log = logging.getLogger(__name__)

LAYOUTS = ("stacked", "per-shard")
Gemm = Callable[[torch.Tensor], torch.Tensor]


def make_gemm(weight: torch.Tensor) -> Gemm:
    """x -> x·Wᵀ with the kernel vLLM itself would pick for a dense weight of this shape on this platform."""
    if current_platform.is_cpu():
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        holder = nn.Module()
        holder.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        dispatch_cpu_unquantized_gemm(holder, remove_weight=True)
        fn = holder.cpu_linear
        return lambda x: fn(x, holder.weight, None)
    w = weight.contiguous()
    return lambda x: torch.nn.functional.linear(x, w)


def full_output_sizes(layer: nn.Module, per_rank: list[int]) -> list[int]:
    """Unsplit output size of every shard of `layer` (what the manifest records), given this rank's sizes."""
    tp = getattr(layer, "tp_size", 1)
    if isinstance(layer, QKVParallelLinear):
        kv = layer.total_num_kv_heads
        return [layer.total_num_heads * layer.head_size, kv * layer.head_size, kv * layer.v_head_size]
    if isinstance(layer, RowParallelLinear):
        return list(per_rank)
    return [n * tp for n in per_rank]


class SvdzipVllmConfig(QuantizationConfig):
    """The manifest as vLLM sees it; also owns the shared bases of this model (one config per model)."""

    def __init__(self, manifest: dict[str, Any], layout: str = "stacked"):
        super().__init__()
        if layout not in LAYOUTS:
            raise SvdzipError(f"SVDZIP_VLLM_LAYOUT must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        self.manifest = manifest
        self.modules: dict[str, dict[str, Any]] = dict(manifest["modules"])
        self.slimmed: dict[str, dict[str, Any]] = dict(manifest.get("slimmed") or {})
        self.layout = layout
        self.bases: dict[str, torch.Tensor] = {}
        self.loaded_bases: set[str] = set()
        self.basis_gemms: dict[str, Gemm] = {}
        self.architecture: str | None = None
        self.packing: dict[str, EngineLayer] | None = None  # from the family table, set by maybe_update_config
        self.packing_checked = False

    def get_name(self) -> str:
        return "svdzip"

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SvdzipVllmConfig:
        check_format(config)
        return cls(config, os.environ.get("SVDZIP_VLLM_LAYOUT", "stacked"))

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None) -> None:
        """Check the manifest against the model's architecture before any weight is read."""
        if hf_config is None:
            return
        archs = list(getattr(hf_config, "architectures", None) or [])
        if len(archs) != 1:
            raise SvdzipError(f"{model_name}: config.json must name exactly one architecture, got {archs}")
        spec, _ = served_family(archs[0], getattr(hf_config, "model_type", None))
        self.architecture, self.packing = archs[0], packing(spec)
        check_manifest(self.modules, expected_linears(archs[0], hf_config), self.slimmed)

    def get_checkpoint_weight_mapper(self) -> WeightsMapper:
        """Checkpoint `<m>.left.weight` / `.right.weight` / `.left.bias` / `.index` -> this method's parameters.

        A slimmed layer that reads a subset of its inputs may carry a bias the engine's layer lacks (MoDeGPT
        folds v's bias into o's: Qwen2's o_proj has none), so its bias loads into this method's `svdzip_bias`."""
        own_bias = {re.compile(f"^{re.escape(name)}\\.bias$"): f"{name}.svdzip_bias"
                    for name, spec in self.slimmed.items() if spec.get("bias") and spec.get("kind") != "rows"}
        renames = WeightsMapper(orig_to_new_regex=own_bias, orig_to_new_suffix=dict(PARAM_RENAMES))
        return super().get_checkpoint_weight_mapper() | renames

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantizeMethodBase | None:
        from vllm.distributed import get_pp_group

        check_parallel(get_pp_group().world_size)
        if not isinstance(layer, LinearBase):
            return None
        if self.packing is None:
            raise SvdzipError("the svdzip vLLM plugin builds layers only for a model whose config it has checked "
                              "(vLLM did not pass the model's config to maybe_update_config)")
        if not self.packing_checked:  # vLLM has set its model's packed_modules_mapping by now
            check_packing(self.packed_modules_mapping, self.packing, self.architecture)
            self.packing_checked = True
        if not any(n in self.modules or n in self.slimmed for n in shard_names(prefix, self.packing)):
            return UnquantizedLinearMethod()
        return SvdzipLinearMethod(self, prefix)


class SvdzipLinearMethod(LinearMethodBase):
    """One engine layer whose shards are (partly) low-rank or slimmed: factors in, two matmuls out."""

    def __init__(self, config: SvdzipVllmConfig, prefix: str):
        self.config = config
        self.prefix = prefix

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs: Any):
        extra_weight_attrs.pop("weight_loader", None)
        layout = build_layout(self.prefix, input_size_per_partition, output_partition_sizes, self.config.modules,
                              self.config.packing, full_in=input_size,
                              full_outs=full_output_sizes(layer, output_partition_sizes), slimmed=self.config.slimmed)
        if layout is None:
            raise SvdzipError(f"{self.prefix}: no low-rank or slimmed shard, yet the svdzip method was chosen")
        layer.svdzip_layout = layout
        layer.svdzip_loaded = set()
        self._register(layer, "lowrank_right", torch.empty(layout.own_right_rows, layout.reads, dtype=params_dtype),
                       "right")
        self._register(layer, "lowrank_left", torch.empty(layout.left_numel, dtype=params_dtype), "left")
        if layout.dense_rows:
            self._register(layer, "weight", torch.empty(layout.dense_rows, layout.reads, dtype=params_dtype), "dense")
        if layout.index_numel:
            self._register(layer, "svdzip_index", torch.empty(layout.index_numel, dtype=torch.int64), "index")
        layer.svdzip_owns_bias = any(sh.subset == "cols" and self.config.slimmed[sh.name].get("bias")
                                     for sh in layout.shards)  # see get_checkpoint_weight_mapper
        if layer.svdzip_owns_bias:
            self._register(layer, "svdzip_bias", torch.empty(output_partition_sizes[0], dtype=params_dtype), "bias")
        for shard in layout.shards:
            if shard.is_basis_leader:
                self.config.bases[shard.name] = torch.empty(shard.rank, layout.in_features, dtype=params_dtype)

    def _register(self, layer: nn.Module, name: str, data: torch.Tensor, kind: str) -> None:
        param = nn.Parameter(data, requires_grad=False)
        param.weight_loader = self._loader(layer, kind)
        layer.register_parameter(name, param)

    def _loader(self, layer: nn.Module, kind: str) -> Callable[..., None]:
        layout: LayerLayout = layer.svdzip_layout

        def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
            i = shard_index(shard_id, layout.shard_ids)
            shard = layout.shards[i]
            target = self._target(param, layout, kind, i)
            cut = rank_slice("row" if isinstance(layer, RowParallelLinear) else "column", kind, i,
                             getattr(layer, "tp_rank", 0), getattr(layer, "num_kv_head_replicas", 1),
                             isinstance(layer, QKVParallelLinear), shard.out, layout.in_features)
            if cut is not None and getattr(layer, "tp_size", 1) > 1:
                loaded = loaded.narrow(*cut)
            if target.shape != loaded.shape:
                raise SvdzipError(f"{shard.name}: checkpoint {kind} tensor has shape {tuple(loaded.shape)}, "
                                  f"the manifest implies {tuple(target.shape)}")
            target.copy_(loaded)
            layer.svdzip_loaded.add((kind, i))
            if kind == "right" and shard.is_basis_leader:
                self.config.loaded_bases.add(shard.name)

        return load

    def _target(self, param: nn.Parameter, layout: LayerLayout, kind: str, i: int) -> torch.Tensor:
        shard = layout.shards[i]
        if kind == "bias":
            return param.data
        if kind == "index":
            if not shard.indexed:
                raise SvdzipError(f"{shard.name}: checkpoint has an index list, the manifest does not slim it so")
            a, b = layout.index_slices()[i]
            return param.data[a:b]
        if kind == "dense":
            if shard.low_rank:
                raise SvdzipError(f"{shard.name}: checkpoint has a dense weight, the manifest says rank {shard.rank}")
            a, b = layout.dense_slices()[i]
            return param.data[a:b]
        if not shard.low_rank:
            raise SvdzipError(f"{shard.name}: checkpoint has low-rank factors, the manifest does not list it")
        if kind == "left":
            a, b = layout.left_slices()[i]
            return param.data[a:b].view(shard.out, shard.rank)
        if shard.is_basis_leader:
            return self.config.bases[shard.name]
        if shard.shared_with:
            raise SvdzipError(f"{shard.name}: checkpoint has its own right factor, the manifest says it shares "
                              f"{shard.shared_with}'s")
        a, b = layout.own_right_slices()[i]
        return param.data[a:b]

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Check that every factor arrived, then build the matmuls and free the loading buffers."""
        layout: LayerLayout = layer.svdzip_layout
        self._check_loaded(layer, layout)
        left = layer.lowrank_left.data
        lefts = {i: left[a:b].view(layout.shards[i].out, layout.shards[i].rank)
                 for i, (a, b) in layout.left_slices().items()}
        indices = {i: layer.svdzip_index.data[a:b].clone() for i, (a, b) in layout.index_slices().items()}
        rows = [layer.lowrank_right.data] + ([layer.weight.data] if layout.dense_rows else [])
        stack = torch.cat(rows) if len(rows) > 1 else rows[0]
        slices = layout.stack_slices()
        plan: list[tuple[Gemm | None, tuple[int, int] | None, Gemm | None, Gemm | None]] = []
        stack_gemm = None
        if self.config.layout == "stacked" and stack.shape[0]:
            stack_gemm = make_gemm(stack)
        layer.svdzip_read = None
        for i, shard in enumerate(layout.shards):
            left_gemm = make_gemm(lefts[i]) if shard.low_rank else None
            place = (subset_placement(shard.out, shard.kept, indices.get(i))
                     if shard.subset == "rows" and not layout.compact else None)
            if shard.subset == "cols":
                layer.svdzip_read = subset_reader(shard.kept, indices.get(i))
            basis = shard.shared_with or (shard.name if shard.is_basis_leader else None)
            if basis is not None:
                plan.append((self._basis_gemm(basis), None, left_gemm, place))
            elif stack_gemm is not None:
                plan.append((None, slices[i], left_gemm, place))
            else:
                a, b = slices[i]
                plan.append((make_gemm(stack[a:b]), None, left_gemm, place))
        layer.svdzip_stack_gemm = stack_gemm
        layer.svdzip_plan = plan
        layer.svdzip_whole = stack_gemm is not None and layout.stack_is_output  # no slicing, no concatenation
        layer.svdzip_own_bias = layer.svdzip_bias.data.clone() if layer.svdzip_owns_bias else None
        if layer.svdzip_own_bias is not None and getattr(layer, "bias", None) is not None:
            layer.bias.data.zero_()  # the engine's own bias had nothing to load: the checkpoint's is ours
        empty = torch.empty(0, dtype=left.dtype, device=left.device)
        for name in ("lowrank_right", "lowrank_left", "weight", "svdzip_index", "svdzip_bias"):
            if hasattr(layer, name):
                setattr(layer, name, nn.Parameter(empty, requires_grad=False))

    def _check_loaded(self, layer: nn.Module, layout: LayerLayout) -> None:
        missing = []
        for i, shard in enumerate(layout.shards):
            need = (["dense"] + (["index"] if shard.indexed else []) if not shard.low_rank
                    else ["left"] + ([] if shard.shared_with else ["right"]))
            if i == 0 and layer.svdzip_owns_bias:
                need.append("bias")
            missing += [f"{shard.name} ({kind})" for kind in need if (kind, i) not in layer.svdzip_loaded]
            if shard.shared_with and shard.shared_with not in self.config.loaded_bases:
                missing.append(f"{shard.shared_with} (shared basis used by {shard.name})")
        if missing:
            raise SvdzipError(f"the checkpoint lacks tensors the manifest promises: {', '.join(missing)}")

    def _basis_gemm(self, leader: str) -> Gemm:
        if leader not in self.config.basis_gemms:
            self.config.basis_gemms[leader] = make_gemm(self.config.bases.pop(leader))
        return self.config.basis_gemms[leader]

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.svdzip_read is not None:
            x = layer.svdzip_read(x)
        y = layer.svdzip_stack_gemm(x) if layer.svdzip_stack_gemm is not None else None
        if layer.svdzip_whole:
            return y if bias is None and layer.svdzip_own_bias is None else _biased(y, bias, layer.svdzip_own_bias)
        pieces = []
        for own_gemm, rows, left_gemm, place in layer.svdzip_plan:
            z = own_gemm(x) if own_gemm is not None else y[..., rows[0]:rows[1]]
            if left_gemm is not None:
                z = left_gemm(z.contiguous())
            pieces.append(z if place is None else place(z))
        out = torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]
        return _biased(out, bias, layer.svdzip_own_bias)


def _biased(out: torch.Tensor, *biases: torch.Tensor | None) -> torch.Tensor:
    for b in biases:
        if b is not None:
            out = out + b
    return out


def subset_placement(width: int, kept: int, index: torch.Tensor | None) -> Gemm:
    """A slimmed shard's `kept` outputs -> its `width`-wide output: at `index`, or first (a slimmed MLP's
    neurons), zeros elsewhere."""
    if index is None:
        return lambda z: torch.nn.functional.pad(z, (0, width - kept))
    return lambda z: z.new_zeros(*z.shape[:-1], width).index_copy_(-1, index, z)


def subset_reader(kept: int, index: torch.Tensor | None) -> Gemm:
    """The inputs a slimmed 'cols' layer reads: at `index`, or the first `kept` (all it gets from a compact gate/up)."""
    if index is None:
        return lambda x: x if x.shape[-1] == kept else x[..., :kept].contiguous()
    return lambda x: x.index_select(-1, index)


def register() -> None:
    """The `vllm.general_plugins` entry point: make `quant_method: "svdzip"` known to vLLM (idempotent)."""
    register_quantization_config("svdzip")(SvdzipVllmConfig)
