"""The family table: every supported architecture as data, with wildcards for repeated modules.

A pattern is a module path inside one decoder layer; a `*` segment stands for every child of the
container at that point (every expert of an MoE block), so one entry covers all of them. Linears
whose roles are in one `shared_inputs` group and whose wildcards bind to the same children read the
same tensor and share one Gram matrix: q/k/v of a layer, gate/up of one expert.

Fused projections (Phi-3's `qkv_proj`, `gate_up_proj`) are one linear with one role, factorised as one
matrix (see `benchmarks/fused_projections.py`: at equal parameters the joint factorisation's whitened
loss is 3–16 % lower for gate/up and within ±5 % for q/k/v than per-role slices, and it keeps the
checkpoint's tensor names).

A family that vLLM serves with svdzip's plugin says so in `serving` (`VllmServing`): the Hugging Face
architecture classes whose vLLM implementation names its layers like the checkpoint, and the engine
layers that pack several of the family's roles (q/k/v into `qkv_proj`, gate/up into `gate_up_proj`),
in shard order. A family without it is compressed and reloaded by svdzip but refused by the plugin.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class FusedExperts:
    """An MoE block whose experts transformers 5 stores as 3-D parameters, opened by svdzip into one
    MLP of `nn.Linear`s per expert (`svdzip.models.experts`), named as the original checkpoints name them."""

    path: str  # inside a decoder layer, e.g. "mlp.experts"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


@dataclass(frozen=True)
class Packed:
    """One vLLM engine layer holding several of the family's linears side by side (concatenated outputs)."""

    roles: tuple[str, ...]  # the roles it packs, in shard order (the order of its output rows)
    shard_ids: tuple[str | int, ...] = ()  # what vLLM's weight loader calls each shard; () = 0, 1, ...


@dataclass(frozen=True)
class VllmServing:
    """How vLLM serves a family: which architectures, and which of its engine layers pack which roles.

    The architectures listed must have a vLLM implementation that names its layers like the Hugging Face
    checkpoint (`<layers_path>.N.<pattern>`) and loads weights through vLLM's AutoWeightsLoader (which
    applies the quantization config's name mapper); every role not packed is one engine layer of its own.
    """

    architectures: frozenset[str]
    packed: dict[str, Packed] = field(default_factory=dict)  # engine layer inside a decoder layer -> shards


@dataclass(frozen=True)
class FamilySpec:
    """Where one architecture family keeps its decoder layers and linears."""

    layers_path: str
    linears: dict[str, tuple[str, ...]]  # role -> patterns inside a decoder layer ('*' = every child)
    shared_inputs: tuple[tuple[str, ...], ...] = ()  # roles that read the very same input tensor
    optional_roles: frozenset[str] = frozenset()  # roles some layers lack (Qwen3-MoE's dense vs sparse MLPs)
    experts: FusedExperts | None = None
    conv1d: bool = False  # GPT-2's Conv1D layers (weights stored in×out): opened into nn.Linear (out×in)
    serving: VllmServing | None = None  # None: svdzip's vLLM plugin refuses it


def _paths(**roles: str | tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    return {role: (p,) if isinstance(p, str) else p for role, p in roles.items()}


_ATTENTION = _paths(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj")
_MLP = _paths(gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj")
_QKV, _GATE_UP = ("q", "k", "v"), ("gate", "up")
_EXPERT_GATE_UP = ("expert_gate", "expert_up")


def _experts_roles(experts: FusedExperts) -> dict[str, tuple[str, ...]]:
    return _paths(expert_gate=f"{experts.path}.*.{experts.gate}", expert_up=f"{experts.path}.*.{experts.up}",
                  expert_down=f"{experts.path}.*.{experts.down}")


LLAMA_LIKE = FamilySpec(layers_path="model.layers", linears={**_ATTENTION, **_MLP}, shared_inputs=(_QKV, _GATE_UP))

OPT = FamilySpec(
    layers_path="model.decoder.layers",
    linears={**_paths(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.out_proj"),
             **_paths(up="fc1", down="fc2")},
    shared_inputs=(_QKV,),
)

GPT2 = FamilySpec(  # c_attn is q/k/v fused: one factorisation, as for Phi-3
    layers_path="transformer.h",
    linears=_paths(qkv="attn.c_attn", o="attn.c_proj", up="mlp.c_fc", down="mlp.c_proj"),
    conv1d=True,
)

PHI3 = FamilySpec(  # fused q/k/v and gate/up: one factorisation each
    layers_path="model.layers",
    linears=_paths(qkv="self_attn.qkv_proj", o="self_attn.o_proj", gate_up="mlp.gate_up_proj", down="mlp.down_proj"),
)

_MIXTRAL_EXPERTS = FusedExperts("mlp.experts", gate="w1", up="w3", down="w2")
MIXTRAL = FamilySpec(  # the router (mlp.gate) stays dense, as in every MoE family
    layers_path="model.layers",
    linears={**_ATTENTION, **_experts_roles(_MIXTRAL_EXPERTS)},
    shared_inputs=(_QKV, _EXPERT_GATE_UP),
    experts=_MIXTRAL_EXPERTS,
)

_QWEN_EXPERTS = FusedExperts("mlp.experts")
QWEN_MOE = FamilySpec(  # layers in mlp_only_layers keep a dense MLP
    layers_path="model.layers",
    linears={**_ATTENTION, **_MLP, **_experts_roles(_QWEN_EXPERTS)},
    shared_inputs=(_QKV, _GATE_UP, _EXPERT_GATE_UP),
    optional_roles=frozenset({"gate", "up", "down", "expert_gate", "expert_up", "expert_down"}),
    experts=_QWEN_EXPERTS,
)

# vLLM's QKVParallelLinear names its shards 'q'/'k'/'v'; MergedColumnParallelLinear numbers them
_LLAMA_PACKED = {"self_attn.qkv_proj": Packed(_QKV, shard_ids=("q", "k", "v")), "mlp.gate_up_proj": Packed(_GATE_UP)}


def _served(spec: FamilySpec, *architectures: str) -> FamilySpec:
    """`spec` as served by vLLM under `architectures`, with q/k/v and gate/up packed as in vLLM's Llama."""
    return replace(spec, serving=VllmServing(frozenset(architectures), _LLAMA_PACKED))


FAMILIES: dict[str, FamilySpec] = {  # the vLLM plugin's tests cover every family with a serving entry
    "llama": _served(LLAMA_LIKE, "LlamaForCausalLM"),
    "mistral": _served(LLAMA_LIKE, "MistralForCausalLM"),
    "qwen2": _served(LLAMA_LIKE, "Qwen2ForCausalLM"),
    "qwen3": _served(LLAMA_LIKE, "Qwen3ForCausalLM"),
    "gemma": LLAMA_LIKE,
    "gemma2": LLAMA_LIKE,
    "gemma3_text": _served(LLAMA_LIKE, "Gemma3ForCausalLM"),
    "opt": OPT,
    "gpt2": GPT2,
    "phi3": PHI3,
    "mixtral": MIXTRAL,
    "qwen3_moe": QWEN_MOE,
}


def _all_roles() -> tuple[str, ...]:
    """Every role of the table, in the order the families declare them (the display order of reports)."""
    seen: dict[str, None] = {}
    for spec in FAMILIES.values():
        seen.update(dict.fromkeys(spec.linears))
    return tuple(seen)


ROLES = _all_roles()
