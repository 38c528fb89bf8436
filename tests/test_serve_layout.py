"""The manifest -> engine-layer layout of the vLLM plugin, and its refusals; pure Python, no vLLM needed.

The layout is checked against a brute-force reference: multiplying by the stack and the flattened
left factors the way the plugin does must give exactly the dense fused layer W = [A_q B_q; A_k B_k; W_v].
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import SMALL, VLLM, WIDE, tiny_config

from svdzip.errors import SvdzipError
from svdzip.models.families import FAMILIES, Packed, VllmServing
from svdzip.serve.layout import (
    MANIFEST_FORMAT,
    EngineLayer,
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
    slimmed_subset,
    weight_bytes,
)

PACKED = packing(FAMILIES["llama"])  # the family table's serving entry, as the plugin reads it
VLLM_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}  # vLLM's Llama
CFG = {"model_type": "llama", "vocab_size": 16, "hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1,
       "head_dim": 4, "intermediate_size": 12, "num_hidden_layers": 2}
P = "model.layers.0.self_attn"


def _fused_forward(layout, x, dense, factors, bases):
    """What the plugin computes, from the layout's offsets only."""
    stack_rows, left_flat = [], []
    own = layout.own_right_slices()
    for i, s in enumerate(layout.shards):
        if s.owns_right:
            assert own[i][1] - own[i][0] == s.rank
            stack_rows.append(factors[s.name][1])
    for s in layout.shards:
        if not s.low_rank:
            stack_rows.append(dense[s.name])
    for s in layout.shards:
        if s.low_rank:
            left_flat.append(factors[s.name][0].reshape(-1))
    stack = torch.cat(stack_rows) if stack_rows else torch.empty(0, layout.in_features)
    left = torch.cat(left_flat)
    assert stack.shape[0] == layout.own_right_rows + layout.dense_rows and left.numel() == layout.left_numel
    y = x @ stack.T
    pieces = []
    for i, s in enumerate(layout.shards):
        if s.low_rank:
            a, b = layout.left_slices()[i]
            basis = bases.get(s.shared_with or s.name)
            z = x @ basis.T if basis is not None else y[:, slice(*layout.stack_slices()[i])]
            pieces.append(z @ left[a:b].view(s.out, s.rank).T)
        else:
            pieces.append(y[:, slice(*layout.stack_slices()[i])])
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("dense_shards", [(), ("v_proj",), ("q_proj", "v_proj")])
def test_fused_layout_reproduces_the_dense_layer(dense_shards):
    torch.manual_seed(0)
    outs = {"q_proj": 8, "k_proj": 4, "v_proj": 4}
    ranks = {"q_proj": 3, "k_proj": 2, "v_proj": 1}
    modules, dense, factors = {}, {}, {}
    for name, out in outs.items():
        full = f"{P}.{name}"
        if name in dense_shards:
            dense[full] = torch.randn(out, 8)
        else:
            modules[full] = {"in": 8, "out": out, "rank": ranks[name]}
            factors[full] = (torch.randn(out, ranks[name]), torch.randn(ranks[name], 8))
    layout = build_layout(f"{P}.qkv_proj", 8, [8, 4, 4], modules, PACKED)
    x = torch.randn(3, 8)
    want = torch.cat([x @ (factors[f"{P}.{n}"][0] @ factors[f"{P}.{n}"][1]).T if f"{P}.{n}" in factors
                      else x @ dense[f"{P}.{n}"].T for n in outs], dim=1)
    torch.testing.assert_close(_fused_forward(layout, x, dense, factors, {}), want)
    assert layout.weight_elements() < layout.dense_elements()


def test_shared_basis_member_uses_the_leaders_tensor_and_stores_no_right_factor():
    lead, member = "model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj"
    modules = {lead: {"in": 8, "out": 12, "rank": 3},
               member: {"in": 8, "out": 12, "rank": 3, "shared_with": lead}}
    lay0 = build_layout("model.layers.0.mlp.gate_up_proj", 8, [12, 12], modules, PACKED)
    lay1 = build_layout("model.layers.1.mlp.gate_up_proj", 8, [12, 12], modules, PACKED)
    assert lay0.shards[0].is_basis_leader and not lay0.shards[0].owns_right
    assert lay1.shards[0].shared_with == lead and lay1.own_right_rows == 0
    assert lay0.weight_elements() - lay1.weight_elements() == 3 * 8  # the basis, counted once, in the leader
    torch.manual_seed(1)
    basis, a0, a1 = torch.randn(3, 8), torch.randn(12, 3), torch.randn(12, 3)
    up0, up1 = torch.randn(12, 8), torch.randn(12, 8)
    x = torch.randn(2, 8)
    got = _fused_forward(lay1, x, {"model.layers.1.mlp.up_proj": up1}, {member: (a1, None)}, {lead: basis})
    torch.testing.assert_close(got, torch.cat([x @ (a1 @ basis).T, x @ up1.T], dim=1))
    got0 = _fused_forward(lay0, x, {"model.layers.0.mlp.up_proj": up0}, {lead: (a0, None)}, {lead: basis})
    torch.testing.assert_close(got0, torch.cat([x @ (a0 @ basis).T, x @ up0.T], dim=1))


def test_layer_without_low_rank_shards_stays_dense_and_names_follow_the_packing():
    assert {"qkv_proj": EngineLayer(("q_proj", "k_proj", "v_proj"), ("q", "k", "v")),
            "gate_up_proj": EngineLayer(("gate_proj", "up_proj"), (0, 1))} == PACKED
    check_packing(VLLM_PACKED, PACKED, "LlamaForCausalLM")
    assert build_layout(f"{P}.qkv_proj", 8, [8, 4, 4], {"model.layers.1.self_attn.q_proj": {}}, PACKED) is None
    assert shard_names(f"{P}.qkv_proj", PACKED) == [f"{P}.q_proj", f"{P}.k_proj", f"{P}.v_proj"]
    assert shard_names(f"{P}.o_proj", PACKED) == [f"{P}.o_proj"]
    qkv = build_layout(f"{P}.qkv_proj", 8, [8, 4, 4], {f"{P}.q_proj": {"in": 8, "out": 8, "rank": 2}}, PACKED)
    gate_up = build_layout("model.layers.0.mlp.gate_up_proj", 8, [12, 12],
                           {"model.layers.0.mlp.up_proj": {"in": 8, "out": 12, "rank": 2}}, PACKED)
    o = build_layout(f"{P}.o_proj", 8, [8], {f"{P}.o_proj": {"in": 8, "out": 8, "rank": 2}}, PACKED)
    assert [shard_index(s, qkv.shard_ids) for s in ("q", "k", "v")] == [0, 1, 2]
    assert shard_index(1, gate_up.shard_ids) == 1 and shard_index(None, o.shard_ids) == 0
    with pytest.raises(SvdzipError, match="without shard id"):
        shard_index(None, qkv.shard_ids)
    with pytest.raises(SvdzipError, match="unknown shard id 2"):
        shard_index(2, gate_up.shard_ids)
    with pytest.raises(SvdzipError, match="unknown shard id 0"):  # QKV shards have names, not numbers
        shard_index(0, qkv.shard_ids)


def test_vllm_packing_that_disagrees_with_the_table_is_refused():
    with pytest.raises(SvdzipError, match=r"packs gate_up_proj as \['up_proj', 'gate_proj'\].*families.py"):
        check_packing({**VLLM_PACKED, "gate_up_proj": ["up_proj", "gate_proj"]}, PACKED, "LlamaForCausalLM")
    with pytest.raises(SvdzipError, match="packs qkv_proj as None"):
        check_packing({"gate_up_proj": ["gate_proj", "up_proj"]}, PACKED, "LlamaForCausalLM")
    bad = dataclasses.replace(FAMILIES["llama"], serving=VllmServing(
        frozenset({"LlamaForCausalLM"}), {"self_attn.qkv_proj": Packed(("q", "gate"))}))
    with pytest.raises(SvdzipError, match="packs role 'gate' into self_attn.qkv_proj"):
        packing(bad)


def test_shape_disagreement_is_refused_before_loading():
    modules = {f"{P}.k_proj": {"in": 8, "out": 6, "rank": 2}}
    with pytest.raises(SvdzipError, match="k_proj: manifest says 8→6, the model has 8→4"):
        build_layout(f"{P}.qkv_proj", 8, [8, 4, 4], modules, PACKED)


def test_manifest_naming_a_module_the_model_lacks_is_refused():
    expected = expected_linears("LlamaForCausalLM", CFG)
    assert len(expected) == 14 and expected[f"{P}.k_proj"] == (8, 4)
    assert expected["model.layers.1.mlp.down_proj"] == (12, 8)
    good = {f"{P}.q_proj": {"in": 8, "out": 8, "rank": 2}}
    check_manifest(good, expected)
    with pytest.raises(SvdzipError, match="does not have: model.layers.7.self_attn.q_proj"):
        check_manifest({**good, "model.layers.7.self_attn.q_proj": {"in": 8, "out": 8, "rank": 2}}, expected)
    with pytest.raises(SvdzipError, match="rank 9 is not between 1 and 8"):
        check_manifest({f"{P}.q_proj": {"in": 8, "out": 8, "rank": 9}}, expected)
    with pytest.raises(SvdzipError, match="shares the basis"):
        check_manifest({"model.layers.1.self_attn.q_proj": {"in": 8, "out": 8, "rank": 2,
                                                            "shared_with": f"{P}.k_proj"}}, expected)


def _hand_formulas(config) -> dict[str, tuple[int, int]]:
    """The shapes the plugin computed by hand from the config before it asked transformers."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inter = config.intermediate_size
    shapes = {
        "self_attn.q_proj": (hidden, heads * head_dim), "self_attn.k_proj": (hidden, kv_heads * head_dim),
        "self_attn.v_proj": (hidden, kv_heads * head_dim), "self_attn.o_proj": (heads * head_dim, hidden),
        "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter), "mlp.down_proj": (inter, hidden),
    }
    return {f"model.layers.{i}.{k}": v for i in range(config.num_hidden_layers) for k, v in shapes.items()}


@pytest.mark.parametrize("shape", [SMALL, WIDE, VLLM], ids=["small", "wide", "vllm"])
@pytest.mark.parametrize("family,architecture", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM"),
                                                 ("mistral", "MistralForCausalLM"),
                                                 ("gemma3", "Gemma3ForCausalLM")])
def test_shapes_from_the_skeleton_equal_the_old_hand_formulas(family, architecture, shape):
    config = tiny_config(family, shape)
    want = _hand_formulas(config)
    got = expected_linears(architecture, config)  # a config object, as vLLM passes it
    assert list(got.items()) == list(want.items())
    assert expected_linears(architecture, config.to_dict()) == want  # a config.json dict, as the benchmarks do
    assert expected_linears("LlamaForCausalLM", CFG)[f"{P}.q_proj"] == (8, 8)


def test_a_family_without_serving_entry_names_the_table_entry_to_add():
    phi3 = tiny_config("phi3").to_dict()
    want = ("the svdzip vLLM plugin has no serving entry for model_type 'phi3' (architecture Phi3ForCausalLM): "
            "add `serving=...` to its FamilySpec in svdzip/models/families.py")
    with pytest.raises(SvdzipError) as err:
        expected_linears("Phi3ForCausalLM", phi3)
    assert str(err.value) == want
    with pytest.raises(SvdzipError, match=r"model_type 'bloom' \(architecture BloomForCausalLM\): add a "
                                          r"FamilySpec with `serving=...` for it to FAMILIES\['bloom'\]"):
        served_family("BloomForCausalLM", "bloom")
    with pytest.raises(SvdzipError, match="model_type 'gemma'"):  # in the table, not served
        served_family("GemmaForCausalLM", "gemma")
    with pytest.raises(SvdzipError, match="serves model_type 'llama' as LlamaForCausalLM, not architecture "
                                          "LlamaForSequenceClassification"):
        served_family("LlamaForSequenceClassification", "llama")
    served = {t for t, spec in FAMILIES.items() if spec.serving is not None}
    assert served == {"llama", "mistral", "qwen2", "qwen3", "gemma3_text"}  # what the vLLM plugin tests cover


def test_unsupported_architecture_parallelism_and_newer_format_are_refused():
    with pytest.raises(SvdzipError, match="no serving entry for model_type 'gpt2' .*GPT2LMHeadModel"):
        expected_linears("GPT2LMHeadModel", {**CFG, "model_type": "gpt2"})
    with pytest.raises(SvdzipError, match="pipeline"):
        check_parallel(2)
    check_parallel(1)
    ok = {"quant_method": "svdzip", "format": MANIFEST_FORMAT, "modules": {}}
    check_format(ok)
    with pytest.raises(SvdzipError, match="format 2.*upgrade svdzip"):
        check_format({**ok, "format": 2, "svdzip_version": "9.0"})
    with pytest.raises(SvdzipError, match="not an svdzip manifest"):
        check_format({**ok, "quant_method": "gptq"})


def test_weight_bytes_count_lm_head_and_shared_bases_once_on_disk():
    expected = {"a": (8, 8), "b": (8, 8)}
    modules = {"a": {"in": 8, "out": 8, "rank": 2}, "b": {"in": 8, "out": 8, "rank": 2, "shared_with": "a"}}
    got = weight_bytes(modules, expected, other_params=100, bytes_per_value=4)
    assert got["dense"] == (128 + 100) * 4
    assert got["stored"] == (32 + 16 + 100) * 4
    assert got["read_per_token"] == (64 + 100) * 4


def _cut(t, sl):
    return t if sl is None else t.narrow(*sl)


@pytest.mark.parametrize("tp,kv_heads", [(2, 2), (2, 1), (4, 1)])
def test_tensor_parallel_slices_reassemble_the_unsplit_layers(tp, kv_heads):
    """Column-parallel q/k/v: per-rank outputs concatenate (k/v replicated when ranks > KV heads) to the
    full layer; row-parallel o: per-rank partial outputs sum to the full layer."""
    torch.manual_seed(3)
    head, heads, hidden, rank = 2, 4, 8, 3
    outs = [heads * head, kv_heads * head, kv_heads * head]
    factors = [(torch.randn(o, rank), torch.randn(rank, hidden)) for o in outs]
    x = torch.randn(5, hidden)
    full = [x @ (a @ b).T for a, b in factors]
    replicas = max(1, tp // kv_heads)
    per_rank = [heads * head // tp] + [max(1, kv_heads // tp) * head] * 2
    for r in range(tp):
        for i, (a, b) in enumerate(factors):
            left = _cut(a, rank_slice("column", "left", i, r, replicas, True, per_rank[i], hidden))
            right = _cut(b, rank_slice("column", "right", i, r, replicas, True, per_rank[i], hidden))
            block = r // replicas if i else r
            torch.testing.assert_close(x @ right.T @ left.T, full[i][:, block * per_rank[i]:(block + 1) * per_rank[i]])
    a, b = torch.randn(hidden, rank), torch.randn(rank, hidden)
    cols = hidden // tp
    partial = sum(x[:, r * cols:(r + 1) * cols]
                  @ _cut(b, rank_slice("row", "right", 0, r, 1, False, hidden, cols)).T
                  @ _cut(a, rank_slice("row", "left", 0, r, 1, False, hidden, cols)).T for r in range(tp))
    torch.testing.assert_close(partial, x @ (a @ b).T)
    dense = torch.randn(hidden, hidden)
    pieces = [x[:, r * cols:(r + 1) * cols] @ _cut(dense, rank_slice("row", "dense", 0, r, 1, False, hidden, cols)).T
              for r in range(tp)]
    torch.testing.assert_close(sum(pieces), x @ dense.T)


def test_slimmed_shards_beside_low_rank_and_dense_reproduce_the_transformers_modules():
    """q keeps 5 rows at an index list (MoDeGPT's key–query), k is low-rank, v dense, in one fused layer; then
    an o that reads 3 inputs at an index list, and a slimmed MLP's gate (first 7 of 12 neurons) and down.
    The plugin's way (stack of stored rows, placements, reads) must equal the transformers modules."""
    from svdzip.models.sliced import SlimLinear, column_subset, row_subset

    torch.manual_seed(0)
    x = torch.randn(6, 8)
    q_index = torch.tensor([0, 1, 4, 5, 7])
    q = row_subset(torch.randn(5, 8), torch.randn(5), 8, q_index)
    k_left, k_right, v = torch.randn(4, 2), torch.randn(2, 8), torch.randn(4, 8)
    modules = {f"{P}.k_proj": {"in": 8, "out": 4, "rank": 2}}
    slimmed = {f"{P}.q_proj": {"kind": "rows", "in": 8, "out": 8, "kept": 5, "bias": True},
               f"{P}.o_proj": {"kind": "cols", "in": 8, "out": 8, "kept": 3, "bias": True},
               "model.layers.0.mlp.gate_proj": {"kind": "linear", "in": 8, "out": 7, "bias": False},
               "model.layers.0.mlp.down_proj": {"kind": "linear", "in": 7, "out": 8, "bias": False}}
    qkv = build_layout(f"{P}.qkv_proj", 8, [8, 4, 4], modules, PACKED, slimmed=slimmed)
    assert [(s.subset, s.kept, s.indexed, s.low_rank) for s in qkv.shards] == [
        ("rows", 5, True, False), (None, None, False, True), (None, None, False, False)]
    assert (qkv.dense_rows, qkv.own_right_rows, qkv.index_numel, qkv.reads) == (5 + 4, 2, 5, 8)
    stack = torch.cat([k_right, q.weight, v])  # own right factors first, then the dense shards' stored rows
    assert qkv.stack_slices() == {1: (0, 2), 0: (2, 7), 2: (7, 11)}
    y = x @ stack.T
    q_out = torch.zeros(6, 8).index_copy_(1, q_index, y[:, 2:7]) + q.bias  # the engine adds its full-width bias
    fused = torch.cat([q_out, y[:, 0:2] @ k_left.T, y[:, 7:11]], dim=1)
    want = torch.cat([q(x), x @ (k_left @ k_right).T, x @ v.T], dim=1)
    torch.testing.assert_close(fused, want)
    assert torch.count_nonzero(q(x)[:, [2, 3, 6]]) == 0  # rows it does not keep stay zero, bias included

    o = column_subset(torch.randn(8, 3), torch.randn(8), 8, torch.tensor([1, 2, 6]))
    o_layout = build_layout(f"{P}.o_proj", 8, [8], {}, PACKED, slimmed=slimmed)
    assert (o_layout.reads, o_layout.dense_rows, o_layout.index_numel) == (3, 8, 3)
    torch.testing.assert_close(x.index_select(1, o.index) @ o.weight.T + o.bias, o(x))
    assert o_layout.weight_elements() == 3 * 8 and o_layout.dense_elements() == 64

    gate_up = build_layout("model.layers.0.mlp.gate_up_proj", 8, [12, 12], {}, PACKED, slimmed=slimmed)
    assert [(s.subset, s.kept, s.indexed) for s in gate_up.shards] == [("rows", 7, False), (None, None, False)]
    assert not gate_up.compact and not qkv.compact  # up is not slimmed here; q's rows sit at an index list
    both = {**slimmed, "model.layers.0.mlp.up_proj": {"kind": "linear", "in": 8, "out": 7, "bias": False}}
    assert build_layout("model.layers.0.mlp.gate_up_proj", 8, [12, 12], {}, PACKED, slimmed=both).compact
    down_layout = build_layout("model.layers.0.mlp.down_proj", 12, [8], {}, PACKED, slimmed=slimmed)
    assert (down_layout.reads, down_layout.index_numel) == (7, 0)  # the first 7 neurons, no index stored
    down = SlimLinear(7, 8, bias=False)
    h = torch.randn(6, 12)
    torch.testing.assert_close(h[:, :7] @ down.weight.T, down(h[:, :7]))


@pytest.mark.parametrize("spec,shape,match", [
    ({"kind": "rows", "in": 8, "out": 8, "kept": 9}, (8, 8), "does not fit"),
    ({"kind": "cols", "in": 6, "out": 8, "kept": 3}, (8, 8), "does not fit"),
    ({"kind": "linear", "in": 8, "out": 7}, (9, 12), "does not fit"),
    ({"kind": "linear", "in": 8, "out": 7, "bias": True}, (8, 12), "bias of its own width"),
    ({"kind": "heads", "in": 8, "out": 8}, (8, 8), "unknown slimmed kind 'heads'"),
])
def test_slimmed_entries_that_do_not_fit_are_refused(spec, shape, match):
    with pytest.raises(SvdzipError, match=match):
        slimmed_subset("m", spec, *shape)


def test_slimmed_manifests_are_checked_and_refused_under_tensor_parallelism():
    expected = {f"{P}.q_proj": (8, 8), f"{P}.k_proj": (8, 4)}
    rows = {"kind": "rows", "in": 8, "out": 8, "kept": 4}
    check_manifest({}, expected, {f"{P}.q_proj": rows})
    with pytest.raises(SvdzipError, match="as both low-rank and slimmed"):
        check_manifest({f"{P}.q_proj": {"in": 8, "out": 8, "rank": 2}}, expected, {f"{P}.q_proj": rows})
    with pytest.raises(SvdzipError, match="does not have: model.layers.5"):
        check_manifest({}, expected, {"model.layers.5.mlp.up_proj": rows})
    with pytest.raises(SvdzipError, match="without tensor parallelism"):  # this rank holds half of q's outputs
        build_layout(f"{P}.qkv_proj", 8, [4, 4, 4], {}, PACKED, full_outs=[8, 4, 4],
                     slimmed={f"{P}.q_proj": rows})
    check_format({"quant_method": "svdzip", "format": MANIFEST_FORMAT, "modules": {}, "slimmed": {f"{P}.q_proj": rows}})
    got = weight_bytes({}, expected, other_params=0, bytes_per_value=2, slimmed={f"{P}.q_proj": rows})
    assert got["stored"] == got["read_per_token"] == (4 * 8 + 8 * 4) * 2 and got["dense"] == (64 + 32) * 2
