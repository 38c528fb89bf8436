"""How an svdzip manifest maps onto a serving engine's (fused) linear layers — pure Python, no vLLM.

vLLM fuses q/k/v into one `qkv_proj` and gate/up into one `gate_up_proj`; with svdzip each shard of a
fused layer may have its own rank, or be kept dense, or (Basis Sharing) use a right factor that
belongs to the same role in an earlier layer. A `LayerLayout` records, for one engine layer, where
every shard's pieces live:

* the *stack*: one matrix whose rows are the own right factors of the low-rank shards (rank rows
  each) followed by the dense shards' weights (out rows each) — one GEMM over the shared input;
* the *left* buffer: every low-rank shard's left factor (out×rank), flattened one after another;
* shared bases: a shard whose right factor is shared names its group's leader; the leader's basis
  is stored once, outside any stack, and every member multiplies by that same tensor.

The output of the layer is then `cat(left_i(stack_rows_i(x)) or stack_rows_i(x), ...)` in shard
order. Under tensor parallelism each rank holds the slices `rank_slice` names. The checks
(`check_manifest`, `check_format`, `check_parallel`) give the clear errors a user needs before any weight is read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from svdzip.errors import SvdzipError

MANIFEST_FORMAT = 1

# Architectures whose vLLM implementation names its layers like the Hugging Face checkpoint
# (`model.layers.N.self_attn.*` / `model.layers.N.mlp.*`), fuses q/k/v and gate/up, and loads weights
# through vLLM's AutoWeightsLoader (which applies the quantization config's name mapper).
SUPPORTED_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM",
})

# Checkpoint tensor suffix -> engine parameter suffix. The layer's own `bias` takes the left bias.
PARAM_RENAMES = (
    (".left.weight", ".lowrank_left"),
    (".right.weight", ".lowrank_right"),
    (".left.bias", ".bias"),
)

QKV_SHARD_IDS = ("q", "k", "v")


@dataclass(frozen=True)
class Shard:
    """One checkpoint linear inside an engine layer: dense (`rank is None`) or low-rank."""

    name: str
    out: int
    rank: int | None = None
    shared_with: str | None = None
    is_basis_leader: bool = False

    @property
    def low_rank(self) -> bool:
        return self.rank is not None

    @property
    def owns_right(self) -> bool:
        """A low-rank shard whose right factor sits in this layer's stack (not a shared basis)."""
        return self.low_rank and self.shared_with is None and not self.is_basis_leader


@dataclass(frozen=True)
class LayerLayout:
    """Where every shard of one engine layer keeps its factors; offsets are rows / flat elements."""

    prefix: str
    in_features: int
    shards: tuple[Shard, ...]

    @property
    def own_right_rows(self) -> int:
        return sum(s.rank for s in self.shards if s.owns_right)

    @property
    def dense_rows(self) -> int:
        return sum(s.out for s in self.shards if not s.low_rank)

    @property
    def left_numel(self) -> int:
        return sum(s.out * s.rank for s in self.shards if s.low_rank)

    def stack_slices(self) -> dict[int, tuple[int, int]]:
        """Shard index -> rows of the stack (own right factors first, then dense weights)."""
        return _packed([(i, s.rank) for i, s in enumerate(self.shards) if s.owns_right]
                       + [(i, s.out) for i, s in enumerate(self.shards) if not s.low_rank])

    def left_slices(self) -> dict[int, tuple[int, int]]:
        """Shard index -> (start, stop) of its flattened left factor in the left buffer."""
        return _packed([(i, s.out * s.rank) for i, s in enumerate(self.shards) if s.low_rank])

    def dense_slices(self) -> dict[int, tuple[int, int]]:
        """Shard index -> rows of the `weight` parameter (dense shards only, in shard order)."""
        return _packed([(i, s.out) for i, s in enumerate(self.shards) if not s.low_rank])

    def own_right_slices(self) -> dict[int, tuple[int, int]]:
        """Shard index -> rows of the `lowrank_right` parameter (own right factors only)."""
        return {i: rows for i, rows in self.stack_slices().items() if self.shards[i].owns_right}

    def weight_elements(self) -> int:
        """Values this layer holds: own rights + dense rows + lefts + bases it leads (stored once)."""
        bases = sum(s.rank * self.in_features for s in self.shards if s.is_basis_leader)
        return (self.own_right_rows + self.dense_rows) * self.in_features + self.left_numel + bases

    def dense_elements(self) -> int:
        return sum(s.out for s in self.shards) * self.in_features


def shard_index(shard_id: str | int | None, n_shards: int) -> int:
    """vLLM's shard id ('q'/'k'/'v' for QKV, 0/1 for gate/up, None for an unfused layer) -> index."""
    if shard_id is None:
        if n_shards != 1:
            raise SvdzipError(f"a checkpoint tensor without shard id cannot load into a layer of {n_shards} shards "
                              "(already-fused q/k/v or gate/up checkpoints are not supported)")
        return 0
    if isinstance(shard_id, str):
        if shard_id not in QKV_SHARD_IDS:
            raise SvdzipError(f"unknown shard id {shard_id!r}")
        index = QKV_SHARD_IDS.index(shard_id)
    else:
        index = int(shard_id)
    if not 0 <= index < n_shards:
        raise SvdzipError(f"shard id {shard_id!r} out of range for a layer of {n_shards} shards")
    return index


def shard_names(prefix: str, packed_modules_mapping: Mapping[str, Sequence[str]]) -> list[str]:
    """Checkpoint module names of the shards of the engine layer `prefix` (itself if not fused)."""
    parent, _, leaf = prefix.rpartition(".")
    members = packed_modules_mapping.get(leaf)
    if not members:
        return [prefix]
    return [f"{parent}.{m}" if parent else m for m in members]


def build_layout(prefix: str, in_features: int, output_sizes: Sequence[int],
                 modules: Mapping[str, Mapping[str, Any]],
                 packed_modules_mapping: Mapping[str, Sequence[str]],
                 full_in: int | None = None, full_outs: Sequence[int] | None = None) -> LayerLayout | None:
    """The layout of engine layer `prefix`, or None when none of its shards is low-rank (stays dense).

    `in_features` / `output_sizes` are this tensor-parallel rank's sizes (what the layer stores);
    `full_in` / `full_outs` the unsplit ones the manifest records (default: the same, i.e. TP = 1).
    Raises when the manifest disagrees with the engine's shapes: a wrong size must never load.
    """
    names = shard_names(prefix, packed_modules_mapping)
    if len(names) != len(output_sizes):
        raise SvdzipError(f"{prefix}: the engine has {len(output_sizes)} shards, svdzip expected {len(names)} "
                          f"({', '.join(names)})")
    if not any(n in modules for n in names):
        return None
    full_in = in_features if full_in is None else full_in
    full_outs = list(output_sizes) if full_outs is None else list(full_outs)
    leaders = {spec["shared_with"] for spec in modules.values() if spec.get("shared_with")}
    shards = []
    for name, out, full_out in zip(names, output_sizes, full_outs, strict=True):
        spec = modules.get(name)
        if spec is None:
            shards.append(Shard(name, out))
            continue
        if spec["in"] != full_in or spec["out"] != full_out:
            raise SvdzipError(f"{name}: manifest says {spec['in']}→{spec['out']}, the model has "
                              f"{full_in}→{full_out}")
        shards.append(Shard(name, out, int(spec["rank"]), spec.get("shared_with"), is_basis_leader=name in leaders))
    return LayerLayout(prefix, in_features, tuple(shards))


def rank_slice(parallel: str, kind: str, shard: int, tp_rank: int, kv_replicas: int, is_qkv: bool,
               rows: int, cols: int) -> tuple[int, int, int] | None:
    """(dim, start, length) of a checkpoint tensor that tensor-parallel rank `tp_rank` keeps, None = all of it.

    Column-parallel layers (q/k/v, gate/up) split their output: a dense shard's rows and a low-rank
    shard's left factor by rows; the right factor (and so a shared basis) is replicated. With fewer
    KV heads than ranks, k/v rows are replicated over `kv_replicas` consecutive ranks, as vLLM does.
    Row-parallel layers (o, down) split their input: a dense weight's columns and the right factor's
    columns; the left factor is replicated, so each rank's `left(right_r(x_r))` is a partial output that
    the layer's own all-reduce sums (left is linear). `rows`/`cols`: this rank's sizes.
    """
    if parallel == "column" and kind in ("dense", "left"):
        block = tp_rank // kv_replicas if is_qkv and shard > 0 else tp_rank
        return 0, block * rows, rows
    if parallel == "row" and kind in ("dense", "right"):
        return 1, tp_rank * cols, cols
    return None


def check_format(quant_config: Mapping[str, Any]) -> None:
    """Refuse a manifest this version cannot read (a newer svdzip wrote it, or it is not svdzip's)."""
    if quant_config.get("quant_method") != "svdzip":
        raise SvdzipError(f"not an svdzip manifest (quant_method={quant_config.get('quant_method')!r})")
    fmt = quant_config.get("format")
    if fmt != MANIFEST_FORMAT:
        newer = isinstance(fmt, int) and fmt > MANIFEST_FORMAT
        who = f"svdzip {quant_config.get('svdzip_version', '?')}"
        raise SvdzipError(
            f"this directory was written by {who} with manifest format {fmt}; this svdzip reads format "
            f"{MANIFEST_FORMAT}" + ("; upgrade svdzip (`pip install -U svdzip`) to serve it" if newer else ""))
    if not isinstance(quant_config.get("modules"), dict):
        raise SvdzipError("svdzip manifest has no 'modules' table")


def expected_linears(architecture: str, config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Every decoder linear of a supported architecture: name -> (in, out), from its HF config."""
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise SvdzipError(f"the svdzip vLLM plugin does not support architecture {architecture}; supported: "
                          f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    shapes = {
        "self_attn.q_proj": (hidden, heads * head_dim), "self_attn.k_proj": (hidden, kv_heads * head_dim),
        "self_attn.v_proj": (hidden, kv_heads * head_dim), "self_attn.o_proj": (heads * head_dim, hidden),
        "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter), "mlp.down_proj": (inter, hidden),
    }
    return {f"model.layers.{i}.{k}": v for i in range(config["num_hidden_layers"]) for k, v in shapes.items()}


def check_manifest(modules: Mapping[str, Mapping[str, Any]], expected: Mapping[str, tuple[int, int]]) -> None:
    """Every manifest entry must name a linear the model has, with its shape and a sensible rank."""
    unknown = sorted(set(modules) - set(expected))
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise SvdzipError(f"the svdzip manifest names modules this model does not have: "
                          f"{', '.join(unknown[:3])}{more}")
    for name, spec in modules.items():
        i, o = expected[name]
        if (spec.get("in"), spec.get("out")) != (i, o):
            raise SvdzipError(f"{name}: manifest says {spec.get('in')}→{spec.get('out')}, the model has {i}→{o}")
        rank = spec.get("rank")
        if not isinstance(rank, int) or not 1 <= rank <= min(i, o):
            raise SvdzipError(f"{name}: rank {rank!r} is not between 1 and {min(i, o)}")
        leader = spec.get("shared_with")
        if leader is not None:
            lead = modules.get(leader)
            if lead is None or lead.get("shared_with") or lead.get("in") != i or lead.get("rank") != rank:
                raise SvdzipError(f"{name}: shares the basis of {leader}, which is not a low-rank module "
                                  f"of input size {i} and rank {rank}")


def check_parallel(pipeline_parallel: int) -> None:
    """Refuse what this plugin has not been tested with (tensor parallelism is supported)."""
    if pipeline_parallel > 1:
        raise SvdzipError(f"svdzip's vLLM plugin is untested with pipeline parallelism (pipeline_parallel_size="
                          f"{pipeline_parallel}); serve with --pipeline-parallel-size 1 (tensor parallelism works)")


def weight_bytes(modules: Mapping[str, Mapping[str, Any]], expected: Mapping[str, tuple[int, int]],
                 other_params: int, bytes_per_value: int) -> dict[str, int]:
    """Bytes of weights read per decoded token, dense vs compressed (embedding/lm_head in `other_params`).

    A shared basis is counted once: it is read once per layer that uses it, but the dense model reads
    every matrix too, so per-token traffic counts each use; this returns both views.
    """
    dense = sum(i * o for i, o in expected.values())
    stored = read = 0
    for name, (i, o) in expected.items():
        spec = modules.get(name)
        if spec is None:
            stored += i * o
            read += i * o
            continue
        k = spec["rank"]
        stored += k * o + (0 if spec.get("shared_with") else k * i)
        read += k * (o + i)
    return {"dense": (dense + other_params) * bytes_per_value, "stored": (stored + other_params) * bytes_per_value,
            "read_per_token": (read + other_params) * bytes_per_value}


def _packed(sizes: list[tuple[int, int]]) -> dict[int, tuple[int, int]]:
    """(index, size) pairs laid out one after another: index -> (start, stop)."""
    out, pos = {}, 0
    for index, size in sizes:
        out[index] = (pos, pos + size)
        pos += size
    return out
