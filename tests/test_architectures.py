"""Architectures as data: every family compresses, saves and reloads to the same logits; MoE experts
are per-expert linears whose statistics hold only the tokens the router sends them."""

import pytest
import torch
from tiny_models import FAMILIES, MOE_FAMILIES, WIDE, tiny_model, tiny_tokens
from torch import nn
from transformers import AutoModelForCausalLM

import svdzip  # noqa: F401  (registers the reload path)
from svdzip import Recipe, SvdzipError, compress
from svdzip.methods.decompose import decompose, group_linears
from svdzip.methods.materialise import materialise
from svdzip.models.adapter import ModelAdapter, _expand, open_structure
from svdzip.models.experts import RoutedExperts, open_experts
from svdzip.models.families import FusedExperts
from svdzip.models.lowrank import LowRankLinear
from svdzip.output.io import build_manifest, read_manifest, save
from svdzip.passes.calibrate import collect_statistics
from svdzip.serve.layout import expected_linears


def _logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _reloaded(model: nn.Module, rows, summary, path) -> nn.Module:
    save(model, None, path, build_manifest(rows, summary, {}))
    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_compress_save_reload_gives_identical_logits(tmp_path, family):
    model = tiny_model(family, shape=WIDE)
    tokens = tiny_tokens(8, 32, vocab=WIDE.vocab)
    result = compress(model, Recipe.plain(ratio=0.3, method="svdllm", calib_batch_size=4), calib_tokens=tokens)
    assert result.summary["ratio_achieved"] >= 0.3
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) > len(result.modules) // 2
    again = _reloaded(model, result.modules, result.summary, tmp_path / "m")
    _assert_same(_logits(again, tokens), _logits(model, tokens))
    manifest = read_manifest(tmp_path / "m")["modules"]
    roles = {row.name: row.role for row in result.modules}
    assert all(entry["role"] == roles[name] for name, entry in manifest.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_family_table_finds_every_linear_once(family):
    model = tiny_model(family, shape=WIDE)
    adapter = ModelAdapter(model)
    infos = adapter.linears()
    assert len({i.name for i in infos}) == len(infos)
    for info in infos:
        module = adapter.module(info.name)
        assert isinstance(module, nn.Linear)
        assert (module.out_features, module.in_features) == (info.out_features, info.in_features)
        assert adapter.relative_name(info) == info.name.removeprefix(f"{adapter.spec.layers_path}.{info.layer}.")
    assert not any(i.name.endswith("mlp.gate") for i in infos)  # MoE routers stay dense
    linear_weights = {id(adapter.module(i.name).weight) for i in infos}
    layer_linears = [m for m in adapter.layers.modules() if isinstance(m, nn.Linear)]
    routers = [m for n, m in adapter.layers.named_modules() if n.endswith("mlp.gate")]
    assert {id(m.weight) for m in layer_linears} == linear_weights  # nothing left out
    assert all(not isinstance(r, nn.Linear) for r in routers)


@pytest.mark.parametrize("family", [*MOE_FAMILIES, "gpt2"])
def test_opening_the_structure_keeps_the_logits(family):
    model = tiny_model(family, shape=WIDE)
    tokens = tiny_tokens(2, 16, vocab=WIDE.vocab)
    before = _logits(model, tokens)
    assert open_structure(model) > 0
    _assert_same(_logits(model, tokens), before)
    assert open_structure(model) == 0  # idempotent


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_experts_are_opened_with_one_input_per_expert(family):
    model = tiny_model(family, shape=WIDE)
    adapter = ModelAdapter(model)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, RoutedExperts) and len(experts) == 4
    assert ModelAdapter(model).model.model.layers[0].mlp.experts is experts  # opening is idempotent
    layer0 = adapter.layer_linears(0)
    by_role = {r: [i for i in layer0 if i.role == r] for r in ("expert_gate", "expert_up", "expert_down")}
    assert all(len(v) == 4 for v in by_role.values())
    for gate, up, down in zip(*by_role.values(), strict=True):
        assert gate.input_key == up.input_key != down.input_key
    assert len({i.input_key for i in by_role["expert_gate"]}) == 4
    assert layer0[0].input_key == "model.layers.0:q+k+v"  # dense keys as before (cached statistics stay valid)


def _routing(model: nn.Module, tokens: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE block's input tokens and the experts the router picks for them, from the unmodified model."""
    seen = {}

    def hook(module, args, out):
        seen.setdefault("x", []).append(args[0].reshape(-1, args[0].shape[-1]).double())
        seen.setdefault("idx", []).append(out[2])

    handle = model.model.layers[layer].mlp.gate.register_forward_hook(hook)
    for start in range(0, tokens.shape[0], 4):
        _logits(model, tokens[start : start + 4])
    handle.remove()
    return torch.cat(seen["x"]), torch.cat(seen["idx"])


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_statistics_count_only_routed_tokens(family):
    tokens = tiny_tokens(8, 24, vocab=WIDE.vocab)
    x, chosen = _routing(tiny_model(family, shape=WIDE), tokens, layer=0)  # brute force on the fused HF model
    stats = collect_statistics(tiny_model(family, shape=WIDE), tokens, batch_size=4)
    counts = []
    for e in range(4):
        routed = x[(chosen == e).any(-1)]
        counts.append(routed.shape[0])
        gram = stats.grams[f"model.layers.0.mlp.experts.{e}:expert_gate+expert_up"]
        torch.testing.assert_close(gram, routed.T @ routed, rtol=1e-4, atol=1e-4)  # fp32 batches, fp64 sum
        assert float(gram.trace()) == pytest.approx(float((routed * routed).sum()), rel=1e-5)
        assert float(gram.trace()) < float((x * x).sum())  # strictly fewer tokens than the block saw
    assert sum(counts) == 2 * tokens.numel()  # top-2: every token reaches two experts
    assert all(c > 0 for c in counts)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_abs_mean_is_averaged_over_the_batches_that_reached_it(family):
    """ASVD's mean |x| of an expert: Σ over the batches routed to it of the batch mean, / those batches."""
    tokens = tiny_tokens(8, 4, vocab=WIDE.vocab)
    # rows in token order, batch by batch of 1 sequence
    x, chosen = _routing(tiny_model(family, shape=WIDE), tokens, layer=0)
    stats = collect_statistics(tiny_model(family, shape=WIDE), tokens, batch_size=1, kinds={"abs_mean"})
    per_batch = tokens.shape[1]
    missed = 0
    for e in range(4):
        hit = (chosen == e).any(-1)
        means = [x[b * per_batch:(b + 1) * per_batch][hit[b * per_batch:(b + 1) * per_batch]].abs().mean(0)
                 for b in range(tokens.shape[0]) if hit[b * per_batch:(b + 1) * per_batch].any()]
        missed += tokens.shape[0] - len(means)
        key = f"model.layers.0.mlp.experts.{e}:expert_gate+expert_up"
        assert float(stats.abs_batches[key]) == len(means)
        torch.testing.assert_close(stats.abs_mean[key].float(), torch.stack(means).sum(0).float(), rtol=1e-4, atol=1e-5)
    assert missed > 0  # some expert skipped some batch, so dividing by all batches would be wrong
    assert float(stats.abs_batches["model.layers.0:q+k+v"]) == tokens.shape[0]  # a dense input sees every batch


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_experts_kept_dense_reload(tmp_path, family):
    """A dense expert is saved as experts.N.<name>.weight, which transformers' own MoE converters would
    otherwise try to merge into a 3-D parameter on load."""
    model = tiny_model(family, shape=WIDE)
    tokens = tiny_tokens(8, 24, vocab=WIDE.vocab)
    adapter = ModelAdapter(model)
    units = decompose(adapter, collect_statistics(model, tokens, 4), "svdllm", group_linears(adapter))
    ranks = [None if ".experts.1." in u.name or ("experts.2." in u.name and u.role == "expert_gate") else 6
             for u in units]
    rows = materialise(adapter, units, ranks)
    assert sum(r.rank is None for r in rows) >= 4
    again = _reloaded(model, rows, {"method": "svdllm"}, tmp_path / "m")
    kept = again.model.layers[0].mlp.experts[1]
    assert not any(isinstance(m, LowRankLinear) for m in kept.modules())
    assert sum(isinstance(m, nn.Linear) for m in kept.modules()) == 3
    _assert_same(_logits(again, tokens), _logits(model, tokens))
    resaved = _reloaded(again, rows, {"method": "svdllm"}, tmp_path / "again")  # a reloaded model saves too
    _assert_same(_logits(resaved, tokens), _logits(model, tokens))


def test_qwen2_biases_survive_factorisation_and_reload(tmp_path):
    model = tiny_model("qwen2", shape=WIDE)
    originals = {n: model.model.layers[0].self_attn.get_submodule(n).bias.detach().clone()
                 for n in ("q_proj", "k_proj", "v_proj")}
    assert all(b.abs().sum() > 0 for b in originals.values())
    tokens = tiny_tokens(8, 24, vocab=WIDE.vocab)
    result = compress(model, Recipe.plain(ratio=0.3, method="svdllm", calib_batch_size=4), calib_tokens=tokens)
    again = _reloaded(model, result.modules, result.summary, tmp_path / "m")
    manifest = read_manifest(tmp_path / "m")["modules"]
    for name, bias in originals.items():
        for m in (model, again):
            module = m.model.layers[0].self_attn.get_submodule(name)
            assert isinstance(module, LowRankLinear)
            assert torch.equal(module.bias, bias)
        assert manifest[f"model.layers.0.self_attn.{name}"]["bias"] is True
    assert manifest["model.layers.0.self_attn.o_proj"]["bias"] is False
    _assert_same(_logits(again, tokens), _logits(model, tokens))


def test_phi3_fused_projections_are_one_matrix_each():
    adapter = ModelAdapter(tiny_model("phi3", shape=WIDE))
    layer0 = {i.role: i for i in adapter.layer_linears(0)}
    assert set(layer0) == {"qkv", "o", "gate_up", "down"}
    assert layer0["qkv"].out_features == adapter.head_dim * (adapter.num_heads + 2 * adapter.num_kv_heads)
    assert layer0["gate_up"].out_features == 2 * layer0["down"].in_features
    assert len({i.input_key for i in layer0.values()}) == 4


def test_wildcards_expand_in_module_order_with_their_scope():
    root = nn.Module()
    root.blocks = nn.ModuleList(nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)}) for _ in range(3))
    assert _expand(root, "blocks.*.b") == [(f"blocks.{i}.b", f"blocks.{i}") for i in range(3)]
    assert _expand(root, "blocks.1.a") == [("blocks.1.a", "")]
    assert _expand(root, "blocks.*.c") == [] and _expand(root, "nothing.*.a") == []


def test_missing_linear_and_foreign_expert_layout_are_refused():
    model = tiny_model("llama", shape=WIDE)
    del model.model.layers[1].mlp.down_proj
    with pytest.raises(SvdzipError, match="layer 1 of 'llama' has no 'mlp.down_proj'"):
        ModelAdapter(model)
    fused = tiny_model("mixtral", shape=WIDE).model.layers[0].mlp.experts
    fused.is_transposed = True
    with pytest.raises(SvdzipError, match="not an expert layout svdzip can open"):
        open_experts(fused, FusedExperts("mlp.experts"), "model.layers.0.mlp.experts")


@pytest.mark.parametrize("family", ["phi3", "mixtral", "qwen3_moe", "gpt2"])
def test_serving_refuses_what_it_does_not_map(family):
    model = tiny_model(family, shape=WIDE)
    with pytest.raises(SvdzipError, match=f"no serving entry for model_type '{model.config.model_type}'"):
        expected_linears(type(model).__name__, model.config.to_dict())


@pytest.mark.parametrize("family", [*MOE_FAMILIES, "gpt2", "llama"])
def test_checkpoint_names_find_every_parameter_in_both_formats(tmp_path, family):
    """A reader by name (streaming) finds each opened parameter in the original per-expert format and in
    transformers 5's fused 3-D one."""
    from safetensors.torch import load_file

    from svdzip.models.checkpoint_names import CheckpointNames

    model = tiny_model(family, shape=WIDE)
    fused = {k: v.clone() for k, v in model.state_dict().items()}  # the fused layout, as the model holds it
    if family == "gpt2":  # one format only: Conv1D weights as the checkpoint stores them
        fused = {}
    model.save_pretrained(tmp_path / "orig")  # transformers writes the original (per-expert) format
    original = load_file(str(tmp_path / "orig" / "model.safetensors"))
    ModelAdapter(model)
    names = CheckpointNames(model)
    for name, param in model.named_parameters():
        for checkpoint in (original, fused) if fused else (original,):
            source = next((s for s in names.sources(name) if s.key in checkpoint), None)
            if source is None and name == "lm_head.weight":  # tied: stored once, as the embedding
                continue
            assert source is not None, name
            assert torch.equal(source.take(checkpoint[source.key]), param), name
    if family == "mixtral":
        assert names.original("model.layers.0.mlp.experts.2.w1.weight") == \
            "model.layers.0.block_sparse_moe.experts.2.w1.weight"
