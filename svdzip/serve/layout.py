"""How an svdzip manifest maps onto a serving engine's (fused) linear layers — no vLLM needed.

What vLLM serves, and how, is the family table's (`svdzip.models.families`): a family's `serving`
entry names its architectures and which engine layers pack which roles (q/k/v into `qkv_proj`,
gate/up into `gate_up_proj`, in shard order); the shapes of its linears are transformers' own, read
from the model built on the meta device from its config (`expected_linears`). A model whose family has
no serving entry is refused with the entry to add (`served_family`). With svdzip each shard of a
fused layer may have its own rank, or be kept dense, or (Basis Sharing) use a right factor that
belongs to the same role in an earlier layer. A `LayerLayout` records, for one engine layer, where
every shard's pieces live:

* the *stack*: one matrix whose rows are the own right factors of the low-rank shards (rank rows
  each) followed by the dense shards' weights (out rows each) — one GEMM over the shared input;
* the *left* buffer: every low-rank shard's left factor (out×rank), flattened one after another;
* shared bases: a shard whose right factor is shared names its group's leader; the leader's basis
  is stored once, outside any stack, and every member multiplies by that same tensor.

The output of the layer is then `cat(left_i(stack_rows_i(x)) or stack_rows_i(x), ...)` in shard
order. MoDeGPT's slimmed modules (the manifest's `slimmed` section) are dense shards that keep a subset:
a *rows* shard stores only its kept output rows and places them (at its stored index list, or first)
in a zero-filled output of the engine's width — a slimmed MLP keeps its neurons first, so act(0)·0 = 0
fills the rest and the down projection reads only them; a *cols* layer (o_proj, down_proj) reads only
its kept inputs. vLLM's model code then runs with the config's sizes, unchanged. Under tensor
parallelism each rank holds the slices `rank_slice` names (slimmed modules are served without it). The checks
(`check_manifest`, `check_format`, `check_parallel`) give the clear errors a user needs before any weight is read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from svdzip.errors import SvdzipError
from svdzip.models.families import FAMILIES, FamilySpec, VllmServing

MANIFEST_FORMAT = 1
TABLE = "svdzip/models/families.py"

# Checkpoint tensor suffix -> engine parameter suffix. The layer's own `bias` takes the left bias.
PARAM_RENAMES = (
    (".left.weight", ".lowrank_left"),
    (".right.weight", ".lowrank_right"),
    (".left.bias", ".bias"),
    (".index", ".svdzip_index"),
)
SUBSETS = ("rows", "cols")


@dataclass(frozen=True)
class EngineLayer:
    """A packed engine layer in checkpoint terms: its members' leaf names and vLLM's shard ids, in shard order."""

    members: tuple[str, ...]
    shard_ids: tuple[str | int, ...]


Packing = Mapping[str, EngineLayer]  # engine layer leaf name ('qkv_proj') -> what it packs


def served_family(architecture: str, model_type: str | None) -> tuple[FamilySpec, VllmServing]:
    """The family table's entry for a model vLLM is asked to serve, and its serving entry; or one clear refusal."""
    spec = FAMILIES.get(model_type) if model_type else None
    serving = spec.serving if spec is not None else None
    if serving is None:
        todo = ("add `serving=...` to its FamilySpec" if spec is not None else
                f"add a FamilySpec with `serving=...` for it to FAMILIES[{model_type!r}]")
        raise SvdzipError(f"the svdzip vLLM plugin has no serving entry for model_type {model_type!r} "
                          f"(architecture {architecture}): {todo} in {TABLE}")
    if architecture not in serving.architectures:
        raise SvdzipError(f"the svdzip vLLM plugin serves model_type {model_type!r} as "
                          f"{', '.join(sorted(serving.architectures))}, not architecture {architecture}: add it to "
                          f"the `serving` architectures of FAMILIES[{model_type!r}] in {TABLE} if vLLM's "
                          "implementation names its layers like the checkpoint")
    return spec, serving


def packing(spec: FamilySpec) -> dict[str, EngineLayer]:
    """The serving entry's packed layers keyed by leaf name, as vLLM's `packed_modules_mapping` is."""
    if spec.serving is None:
        raise SvdzipError(f"family without a serving entry in {TABLE}")
    out = {}
    for path, packed in spec.serving.packed.items():
        parent, _, leaf = path.rpartition(".")
        members = []
        for role in packed.roles:
            patterns = spec.linears.get(role, ())
            if len(patterns) != 1 or "*" in patterns[0] or patterns[0].rpartition(".")[0] != parent:
                raise SvdzipError(f"{TABLE}: serving packs role {role!r} into {path}, but the family's "
                                  f"'{role}' is {patterns or 'missing'}, not one linear beside it")
            members.append(patterns[0].rpartition(".")[2])
        ids = packed.shard_ids or tuple(range(len(members)))
        if len(ids) != len(members):
            raise SvdzipError(f"{TABLE}: {path} packs {len(members)} roles but names {len(ids)} shard ids")
        out[leaf] = EngineLayer(tuple(members), tuple(ids))
    return out


def check_packing(engine: Mapping[str, Sequence[str]], table: Packing, architecture: str) -> None:
    """vLLM's own packed_modules_mapping must pack what the family table says, in the same shard order."""
    for leaf in sorted(set(engine) | set(table)):
        ours = list(table[leaf].members) if leaf in table else None
        theirs = list(engine[leaf]) if leaf in engine else None
        if ours != theirs:
            raise SvdzipError(f"vLLM's {architecture} packs {leaf} as {theirs}, the serving entry of its family "
                              f"in {TABLE} says {ours}: update the entry's `packed` to vLLM's")


@dataclass(frozen=True)
class Shard:
    """One checkpoint linear inside an engine layer: dense (`rank is None`) or low-rank; a dense shard may be
    slimmed (`subset`): 'rows' computes `kept` of its `out` outputs, 'cols' reads `kept` of the layer's inputs,
    at the places a stored index list gives (`indexed`) or the first `kept`."""

    name: str
    out: int
    rank: int | None = None
    shared_with: str | None = None
    is_basis_leader: bool = False
    subset: str | None = None
    kept: int | None = None
    indexed: bool = False

    @property
    def low_rank(self) -> bool:
        return self.rank is not None

    @property
    def stored_rows(self) -> int:
        """Rows of this dense shard's stored weight."""
        return self.kept if self.subset == "rows" else self.out

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
    shard_ids: tuple[str | int, ...] = (0,)  # what the engine's weight loader calls each shard

    @property
    def reads(self) -> int:
        """Input entries the layer reads: all, or the kept ones of a slimmed 'cols' layer."""
        return next((s.kept for s in self.shards if s.subset == "cols"), self.in_features)

    @property
    def own_right_rows(self) -> int:
        return sum(s.rank for s in self.shards if s.owns_right)

    @property
    def dense_rows(self) -> int:
        return sum(s.stored_rows for s in self.shards if not s.low_rank)

    @property
    def compact(self) -> bool:
        """A slimmed MLP's fused gate/up: every shard keeps the same first neurons, so the layer can output just
        those (gate's, then up's) — the engine's act-and-mul halves whatever width it gets, and the down
        projection reads exactly that many inputs. No zero padding, no copies."""
        kept = {s.kept for s in self.shards}
        return (len(self.shards) > 1 and len(kept) == 1
                and all(s.subset == "rows" and not s.indexed for s in self.shards))

    @property
    def stack_is_output(self) -> bool:
        """No low-rank shard and nothing to place: the stack's product (dense or kept rows in shard order) is the
        layer's output as it is."""
        return not any(s.low_rank for s in self.shards) and (
            self.compact or not any(s.subset == "rows" for s in self.shards))

    @property
    def index_numel(self) -> int:
        return sum(s.kept for s in self.shards if s.indexed)

    @property
    def left_numel(self) -> int:
        return sum(s.out * s.rank for s in self.shards if s.low_rank)

    def stack_slices(self) -> dict[int, tuple[int, int]]:
        """Shard index -> rows of the stack (own right factors first, then dense weights)."""
        return _packed([(i, s.rank) for i, s in enumerate(self.shards) if s.owns_right]
                       + [(i, s.stored_rows) for i, s in enumerate(self.shards) if not s.low_rank])

    def left_slices(self) -> dict[int, tuple[int, int]]:
        """Shard index -> (start, stop) of its flattened left factor in the left buffer."""
        return _packed([(i, s.out * s.rank) for i, s in enumerate(self.shards) if s.low_rank])

    def dense_slices(self) -> dict[int, tuple[int, int]]:
        """Shard index -> rows of the `weight` parameter (dense shards only, in shard order)."""
        return _packed([(i, s.stored_rows) for i, s in enumerate(self.shards) if not s.low_rank])

    def index_slices(self) -> dict[int, tuple[int, int]]:
        """Shard index -> (start, stop) of its index list in the `svdzip_index` parameter (indexed shards only)."""
        return _packed([(i, s.kept) for i, s in enumerate(self.shards) if s.indexed])

    def own_right_slices(self) -> dict[int, tuple[int, int]]:
        """Shard index -> rows of the `lowrank_right` parameter (own right factors only)."""
        return {i: rows for i, rows in self.stack_slices().items() if self.shards[i].owns_right}

    def weight_elements(self) -> int:
        """Values this layer holds: own rights + dense rows + lefts + bases it leads (stored once)."""
        bases = sum(s.rank * self.in_features for s in self.shards if s.is_basis_leader)
        return (self.own_right_rows + self.dense_rows) * self.reads + self.left_numel + bases

    def dense_elements(self) -> int:
        return sum(s.out for s in self.shards) * self.in_features


def shard_index(shard_id: str | int | None, shard_ids: Sequence[str | int]) -> int:
    """vLLM's shard id ('q'/'k'/'v' for QKV, 0/1 for gate/up, None for an unfused layer) -> index, given the
    layer's shard ids in shard order (from the family table's serving entry)."""
    if shard_id is None:
        if len(shard_ids) != 1:
            raise SvdzipError(f"a checkpoint tensor without shard id cannot load into a layer of {len(shard_ids)} "
                              "shards (already-fused q/k/v or gate/up checkpoints are not supported)")
        return 0
    for index, known in enumerate(shard_ids):
        if type(known) is type(shard_id) and known == shard_id:
            return index
    raise SvdzipError(f"unknown shard id {shard_id!r} for a layer whose shards are {tuple(shard_ids)}")


def shard_names(prefix: str, packing: Packing) -> list[str]:
    """Checkpoint module names of the shards of the engine layer `prefix` (itself if not packed)."""
    parent, _, leaf = prefix.rpartition(".")
    layer = packing.get(leaf)
    if layer is None:
        return [prefix]
    return [f"{parent}.{m}" if parent else m for m in layer.members]


def build_layout(prefix: str, in_features: int, output_sizes: Sequence[int],
                 modules: Mapping[str, Mapping[str, Any]], packing: Packing,
                 full_in: int | None = None, full_outs: Sequence[int] | None = None,
                 slimmed: Mapping[str, Mapping[str, Any]] | None = None) -> LayerLayout | None:
    """The layout of engine layer `prefix`, or None when none of its shards is low-rank or slimmed (stays dense).

    `in_features` / `output_sizes` are this tensor-parallel rank's sizes (what the layer stores);
    `full_in` / `full_outs` the unsplit ones the manifest records (default: the same, i.e. TP = 1).
    `slimmed` is the manifest's section of MoDeGPT's slimmed linears.
    Raises when the manifest disagrees with the engine's shapes: a wrong size must never load.
    """
    slimmed = slimmed or {}
    names = shard_names(prefix, packing)
    if len(names) != len(output_sizes):
        raise SvdzipError(f"{prefix}: the engine has {len(output_sizes)} shards, svdzip expected {len(names)} "
                          f"({', '.join(names)})")
    if not any(n in modules or n in slimmed for n in names):
        return None
    full_in = in_features if full_in is None else full_in
    full_outs = list(output_sizes) if full_outs is None else list(full_outs)
    leaders = {spec["shared_with"] for spec in modules.values() if spec.get("shared_with")}
    shards = []
    for name, out, full_out in zip(names, output_sizes, full_outs, strict=True):
        if name in slimmed:
            if in_features != full_in or out != full_out:
                raise SvdzipError(f"{name} is slimmed (MoDeGPT): svdzip's vLLM plugin serves slimmed modules "
                                  "without tensor parallelism; serve with --tensor-parallel-size 1")
            subset, kept, indexed = slimmed_subset(name, slimmed[name], full_in, full_out)
            if subset == "cols" and len(names) > 1:
                raise SvdzipError(f"{name}: a slimmed input subset inside the fused layer {prefix} is not supported")
            shards.append(Shard(name, out, subset=subset, kept=kept, indexed=indexed))
            continue
        spec = modules.get(name)
        if spec is None:
            shards.append(Shard(name, out))
            continue
        if spec["in"] != full_in or spec["out"] != full_out:
            raise SvdzipError(f"{name}: manifest says {spec['in']}→{spec['out']}, the model has "
                              f"{full_in}→{full_out}")
        shards.append(Shard(name, out, int(spec["rank"]), spec.get("shared_with"), is_basis_leader=name in leaders))
    packed = packing.get(prefix.rpartition(".")[2])
    return LayerLayout(prefix, in_features, tuple(shards), packed.shard_ids if packed else (0,))


def slimmed_subset(name: str, spec: Mapping[str, Any], full_in: int, full_out: int) -> tuple[str, int, bool]:
    """(subset, kept, indexed) of a slimmed linear of the manifest inside a model of these shapes, or a refusal.

    A slimmed MLP's linear ('linear') is smaller on one side: its neurons are the first `kept`; a key–query or
    value–output module ('rows' / 'cols') keeps the model's shapes and stores where its kept dimensions sit."""
    kind, i, o = spec.get("kind", "linear"), spec.get("in"), spec.get("out")
    if kind == "linear":
        if i == full_in and isinstance(o, int) and 1 <= o <= full_out:
            if spec.get("bias"):
                raise SvdzipError(f"{name}: a slimmed MLP linear with a bias of its own width cannot be served with "
                                  "the engine's full-width bias; serve it with transformers (`svdzip.load`)")
            return "rows", o, False
        if o == full_out and isinstance(i, int) and 1 <= i < full_in:
            return "cols", i, False
    elif kind in SUBSETS:
        kept = spec.get("kept")
        if (i, o) == (full_in, full_out) and isinstance(kept, int) and 1 <= kept <= (o if kind == "rows" else i):
            return kind, kept, True
    else:
        raise SvdzipError(f"{name}: the manifest gives the unknown slimmed kind {kind!r} (written by a newer svdzip?)")
    raise SvdzipError(f"{name}: the manifest's slimmed {kind} {i}→{o} (kept {spec.get('kept')}) does not fit the "
                      f"model's {full_in}→{full_out}")


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
    stored = [what for what, key in (("int8 weights (torchao)", "quantization"),
                                     ("packed low-bit weights (HQQ)", "lowbit")) if quant_config.get(key)]
    if stored:
        raise SvdzipError(f"this directory holds {' and '.join(stored)}: svdzip's vLLM plugin serves 16/32-bit "
                          "factors and dense matrices only (vLLM's own HQQ and int8 kernels expect their own "
                          "checkpoint formats, on GPUs). Serve it with transformers (`svdzip.load`), or compress "
                          "for vLLM without --quantize (with a memory budget: --quantize none)")


def expected_linears(architecture: str, config: Mapping[str, Any] | Any) -> dict[str, tuple[int, int]]:
    """Every decoder linear of a served architecture: name -> (in, out), as transformers builds the model from
    its config (a `config.json` dict or a config object) on the meta device — no shape rule lives in svdzip."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from svdzip.models.adapter import ModelAdapter

    values = dict(config) if isinstance(config, Mapping) else config.to_dict()
    served_family(architecture, values.get("model_type"))
    values.pop("quantization_config", None)  # the skeleton is the dense model the manifest describes
    hf_config = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return {info.name: (info.in_features, info.out_features) for info in ModelAdapter(model).linears()}


def check_manifest(modules: Mapping[str, Mapping[str, Any]], expected: Mapping[str, tuple[int, int]],
                   slimmed: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Every manifest entry must name a linear the model has, with its shape and a sensible rank (or kept size)."""
    slimmed = slimmed or {}
    unknown = sorted((set(modules) | set(slimmed)) - set(expected))
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise SvdzipError(f"the svdzip manifest names modules this model does not have: "
                          f"{', '.join(unknown[:3])}{more}")
    both = sorted(set(modules) & set(slimmed))
    if both:
        raise SvdzipError(f"the svdzip manifest lists {both[0]} as both low-rank and slimmed")
    for name, spec in slimmed.items():
        slimmed_subset(name, spec, *expected[name])
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
                 other_params: int, bytes_per_value: int,
                 slimmed: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, int]:
    """Bytes of weights read per decoded token, dense vs compressed (embedding/lm_head in `other_params`).

    A shared basis is counted once: it is read once per layer that uses it, but the dense model reads
    every matrix too, so per-token traffic counts each use; this returns both views. A slimmed linear
    holds (and reads) only its kept rows or columns.
    """
    slimmed = slimmed or {}
    dense = sum(i * o for i, o in expected.values())
    stored = read = 0
    for name, (i, o) in expected.items():
        spec = modules.get(name)
        if name in slimmed:
            subset, kept, _ = slimmed_subset(name, slimmed[name], i, o)
            values = kept * (i if subset == "rows" else o)
            stored += values
            read += values
        elif spec is None:
            stored += i * o
            read += i * o
        else:
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
