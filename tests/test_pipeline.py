"""compress() end to end on tiny random models of every supported family."""

import pytest
import torch
from tiny_models import tiny_model, tiny_tokens
from torch import nn

from svdzip import Recipe, SvdzipError, compress
from svdzip.models.adapter import ModelAdapter
from svdzip.models.lowrank import LowRankLinear
from svdzip.passes.calibrate import CalibrationStats, capture_layer_inputs, collect_statistics


def test_adapter_finds_roles_and_heads(family):
    adapter = ModelAdapter(tiny_model(family))
    roles = {i.role for i in adapter.linears()}
    assert {"q", "k", "v", "o", "up", "down"} <= roles
    assert adapter.num_layers == 3
    keys = {i.input_key for i in adapter.layer_linears(0) if i.role in ("q", "k", "v")}
    assert len(keys) == 1  # q, k, v share one Gram matrix
    if family != "opt":
        assert adapter.num_kv_heads < adapter.num_heads  # GQA


def test_unsupported_architecture_is_named():
    class Foo(nn.Module):
        config = type("C", (), {"model_type": "foo"})()

    with pytest.raises(SvdzipError, match="unsupported architecture 'foo'"):
        ModelAdapter(Foo())


def test_gram_matches_brute_force(family):
    model = tiny_model(family)
    tokens = tiny_tokens(4, 16)
    stats = collect_statistics(model, tokens, batch_size=2)
    adapter = ModelAdapter(model)
    captured = {}
    info = adapter.layer_linears(1)[0]
    handle = adapter.module(info.name).register_forward_pre_hook(
        lambda m, a: captured.setdefault("x", []).append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        model(tokens)
    handle.remove()
    x = torch.cat(captured["x"])
    assert torch.allclose(stats.grams[info.input_key], x.T @ x, rtol=1e-4, atol=1e-4)
    assert stats.tokens == tokens.numel()


def test_capture_restores_layers(family):
    model = tiny_model(family)
    adapter = ModelAdapter(model)
    tokens = tiny_tokens(2, 8)
    with torch.no_grad():
        ref = model(tokens).logits
    inputs = capture_layer_inputs(model, adapter, tokens, 1, "cpu")
    assert len(inputs.hidden) == 2 and len(inputs.kwargs) == 3
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, ref)


@pytest.mark.parametrize("method", ["svd", "svdllm", "asvd"])
def test_compress_spends_at_most_the_budget(family, method):
    model = tiny_model(family)
    tokens = tiny_tokens()
    result = compress(model, Recipe.plain(ratio=0.3, method=method, calib_batch_size=4), calib_tokens=tokens)
    s = result.summary
    assert s["decoder_linear_params_after"] <= (1 - 0.3) * s["decoder_linear_params_before"]
    assert s["ratio_achieved"] >= 0.3
    assert s["model_params_after"] < s["model_params_before"]
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    with torch.no_grad():
        assert torch.isfinite(model(tokens).logits).all()


def test_whitening_beats_plain_svd_on_calibration_data():
    """Each first-layer linear's output error on the calibration inputs: SVD-LLM ≤ plain SVD."""
    tokens = tiny_tokens(8, 24)
    dense = tiny_model("llama")
    inputs = capture_layer_inputs(dense, ModelAdapter(dense), tokens, 8, "cpu")
    x = inputs.hidden[0]
    layer0 = dense.model.layers[0]
    with torch.no_grad():
        xn = layer0.input_layernorm(x)
        ref = layer0.self_attn.q_proj(xn)
        errors = {}
        for method in ("svd", "svdllm"):
            model = tiny_model("llama")
            compress(model, Recipe.plain(ratio=0.4, method=method, calib_batch_size=8), calib_tokens=tokens)
            errors[method] = float((model.model.layers[0].self_attn.q_proj(xn) - ref).pow(2).sum())
    assert errors["svdllm"] < errors["svd"]


def test_nan_weights_are_refused():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(SvdzipError, match="NaN"):
        compress(model, Recipe.plain(method="svd"))


def test_data_methods_need_data():
    with pytest.raises(SvdzipError, match="needs calibration"):
        compress(tiny_model("llama"), Recipe.plain(method="svdllm"))


def test_stats_roundtrip_and_corruption(tmp_path):
    model = tiny_model("qwen2")
    stats = collect_statistics(model, tiny_tokens(4, 12), batch_size=2, meta={"k": 1})
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    again = CalibrationStats.load(path)
    assert again.meta == {"k": 1} and again.tokens == stats.tokens
    for key in stats.grams:
        assert torch.equal(again.grams[key], stats.grams[key])
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SvdzipError, match="corrupted"):
        CalibrationStats.load(path)
    with pytest.raises(SvdzipError, match="no calibration statistics"):
        CalibrationStats.load(tmp_path / "missing.safetensors")


def test_nonfinite_statistics_are_refused():
    stats = CalibrationStats(grams={"a": torch.tensor([[float("inf")]])})
    with pytest.raises(SvdzipError, match="NaN/Inf"):
        stats.check_finite()


def test_config_validation():
    for bad in (dict(ratio=1.2), dict(method="nope"), dict(update="nope"), dict(group_size=0),
                dict(share_roles=("o",)), dict(calib_samples=0)):
        with pytest.raises(SvdzipError):
            Recipe.plain(**bad).validate()
    assert Recipe.plain(allocator="drank", update="svdllm").label == "svdllm+drank+update"
