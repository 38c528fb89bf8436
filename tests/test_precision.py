"""Passes under a bfloat16 autocast: 16-bit matmuls in the layers, float32 sums, weights held in 16 bits once."""

from dataclasses import replace

import pytest
import torch
from tiny_models import tiny_model, tiny_tokens

from svdzip.core.precision import compute_dtype, dtype_name
from svdzip.core.statistics import Accumulator, CalibrationStats
from svdzip.engine.pipeline import prepare_statistics
from svdzip.errors import SvdzipError
from svdzip.models.adapter import ModelAdapter
from svdzip.passes.calibrate import calibrate
from svdzip.passes.fisher import collect_fisher
from svdzip.recipe import Recipe


def _bf16_exact(tokens: int, n: int, seed: int = 0) -> torch.Tensor:
    """float32 values that bfloat16 holds exactly: a 16-bit product of them rounds only its result."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, n, generator=g) * torch.logspace(0, 1, n)).bfloat16().float()


@pytest.mark.parametrize("n", [40, 600])  # the plain product and the blocked one (`GRAM_BLOCKED_MIN`)
def test_the_gram_of_a_bf16_pass_is_summed_from_float32_products(n):
    x = _bf16_exact(512, n)
    ref = x.double().T @ x.double()
    stats = CalibrationStats()
    hook = Accumulator(stats, "k", ("grams",))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hook(torch.nn.Identity(), (x,))
        rounded = (x.T @ x).double()  # what the same product gives under the autocast
    err = ((stats.grams["k"] - ref).norm() / ref.norm()).item()
    assert err < 1e-6  # float32 products
    assert ((rounded - ref).norm() / ref.norm()).item() > 1e-4  # a 16-bit result would have been this far off


def test_a_bf16_calibration_multiplies_in_bf16_and_stays_close_to_float32():
    model = tiny_model("llama")
    adapter, tokens = ModelAdapter(model), tiny_tokens(8, 24)
    seen: dict[str, set[torch.dtype]] = {"main": set()}
    probe = adapter.module(adapter.layer_linears(0)[0].name)
    probe.register_forward_hook(lambda _m, _a, out: seen["main"].add(out.dtype))
    f32 = calibrate(model, adapter, tokens, 4, "cpu", ("grams", "abs_mean"))
    assert seen["main"] == {torch.float32}
    seen["main"].clear()
    b16 = calibrate(model, adapter, tokens, 4, "cpu", ("grams", "abs_mean"), dtype=torch.bfloat16)
    assert seen["main"] == {torch.bfloat16}
    assert set(b16.grams) == set(f32.grams)
    rel = {}
    for key, gram in b16.grams.items():
        assert gram.dtype == torch.float64 and torch.equal(gram, gram.T)
        rel[key] = ((gram - f32.grams[key]).norm() / f32.grams[key].norm()).item()
    # the activations of a bf16 forward: close, not equal (the first layer's norm reads the embeddings exactly)
    assert max(rel.values()) < 0.05 and min(v for k, v in rel.items() if k != "model.layers.0:q+k+v") > 0
    assert all(torch.isfinite(v).all() for v in b16.abs_mean.values())


def test_the_local_gain_probe_stays_float32_under_a_bf16_calibration():
    model = tiny_model("llama")
    adapter = ModelAdapter(model)
    dtypes: list[torch.dtype] = []
    name = adapter.layer_linears(0)[0].name
    adapter.module(name).register_forward_hook(lambda _m, _a, out: dtypes.append(out.dtype))
    stats = calibrate(model, adapter, tiny_tokens(8, 24), 4, "cpu", ("grams", "local"), dtype=torch.bfloat16)
    # the probe's own forward (with grad) runs first in float32, then the main and probe streams in bf16
    assert dtypes[0] == torch.float32 and torch.bfloat16 in dtypes
    assert float(stats.local[name][1]) > 0


def test_the_fisher_pass_multiplies_in_bf16_and_keeps_float32_gradients():
    model = tiny_model("llama")
    tokens = tiny_tokens(8, 24)
    adapter = ModelAdapter(model)
    seen: set[torch.dtype] = set()
    name = adapter.layer_linears(1)[0].name
    adapter.module(name).register_forward_hook(lambda _m, _a, out: seen.add(out.dtype))
    f32 = collect_fisher(model, tokens, 4)
    seen.clear()
    b16 = collect_fisher(model, tokens, 4, dtype=torch.bfloat16)
    assert seen == {torch.bfloat16}
    assert all(p.dtype == torch.float32 and p.grad is None for p in model.parameters())
    for key, value in b16.items():
        assert value.dtype == torch.float64 and torch.isfinite(value).all()
        corr = torch.corrcoef(torch.stack([value, f32[key]]))[0, 1].item()
        assert corr > 0.95, key


def test_statistics_of_one_precision_are_not_reused_for_the_other(tmp_path, monkeypatch):
    monkeypatch.setenv("SVDZIP_CACHE", str(tmp_path))
    model, tokens = tiny_model("llama"), tiny_tokens(8, 24)
    kinds = {"grams"}
    a = prepare_statistics(model, tokens, "tiny", Recipe(calib_precision="float32", calib_batch_size=4), kinds=kinds)
    b = prepare_statistics(model, tokens, "tiny", Recipe(calib_precision="bfloat16", calib_batch_size=4), kinds=kinds)
    assert a.meta["key"]["precision"] == "float32" and b.meta["key"]["precision"] == "bfloat16"
    assert a.meta["source"]["precision"] == "float32"
    key = "model.layers.1:down"
    assert not torch.equal(a.grams[key], b.grams[key])
    again = prepare_statistics(model, tokens, "tiny", Recipe(calib_precision="float32", calib_batch_size=4),
                               kinds=kinds)
    assert torch.equal(again.grams[key], a.grams[key])  # reused, from its own file
    with pytest.raises(SvdzipError, match="other weights, tokens, batch size or precision"):
        prepare_statistics(model, tokens, "tiny", Recipe(calib_precision="bfloat16", calib_batch_size=4),
                           stats_path=tmp_path / "stats" / next(p.name for p in (tmp_path / "stats").glob(
                               "*.safetensors") if CalibrationStats.load(p).meta["key"]["precision"] == "float32"),
                           kinds=kinds)


@pytest.mark.parametrize("cpu_bf16,expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_calibration_precision_follows_the_cpu(monkeypatch, cpu_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: cpu_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert Recipe().calib_dtype() == expected == compute_dtype("cpu", "auto")
    assert Recipe(calib_precision="float32").calib_dtype() == torch.float32
    assert dtype_name(expected) == {torch.bfloat16: "bfloat16", torch.float32: "float32"}[expected]
    with pytest.raises(SvdzipError, match="unknown calibration precision 'half'"):
        Recipe(calib_precision="half").validate()


def test_frozen_linears_held_in_bf16_give_the_same_logits_and_come_back_float32():
    from svdzip.core.precision import frozen_linears_in, frozen_linears_to

    model = tiny_model("qwen2")  # q/k/v biases
    model.requires_grad_(False)
    trained = model.model.layers[0].mlp.down_proj.weight
    trained.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = tiny_tokens(2, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(input_ids=ids).logits
        with frozen_linears_in(model, torch.bfloat16):
            q = model.model.layers[0].self_attn.q_proj
            assert q.weight.dtype == q.bias.dtype == torch.bfloat16
            assert trained.dtype == torch.float32  # trained: left alone
            assert model.get_input_embeddings().weight.dtype == torch.float32
            got = model(input_ids=ids).logits
    assert torch.equal(got, ref)  # autocast multiplied in bf16 before as well
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[n]), n
    assert frozen_linears_to(model, torch.float32, keep=True) == []


def test_a_tied_head_stays_float32():
    from svdzip.core.precision import frozen_linears_to

    model = tiny_model("llama")
    model.requires_grad_(False)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    kept = frozen_linears_to(model, torch.bfloat16, keep=True)
    assert kept and model.get_output_embeddings().weight.dtype == torch.float32
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("capability,native", [((7, 0), False), ((8, 0), True)])
def test_a_cuda_card_before_ampere_is_not_native_bf16(monkeypatch, capability, native):
    from svdzip.core.precision import native_bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert native_bf16("cuda:0") is native
    assert compute_dtype("cuda", "auto") == (torch.bfloat16 if native else torch.float32)


def test_a_linear_with_a_trainable_bias_stays_float32():
    from svdzip.core.precision import frozen_linears_to

    model = tiny_model("qwen2")
    model.requires_grad_(False)
    q = model.model.layers[0].self_attn.q_proj
    q.bias.requires_grad_(True)
    frozen_linears_to(model, torch.bfloat16)
    assert q.weight.dtype == q.bias.dtype == torch.float32  # the optimiser's parameter is not made 16-bit
    assert model.model.layers[0].self_attn.k_proj.weight.dtype == torch.bfloat16


def _native_cpu_bf16(monkeypatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)


def test_recipe_yaml_records_the_precisions_each_pass_ran_at(monkeypatch):
    _native_cpu_bf16(monkeypatch)
    distilled = Recipe(allocator="uniform", heal="distill").for_output()
    assert (distilled.calib_precision, distilled.healing.precision) == ("bfloat16", "bfloat16")
    layerwise = Recipe(allocator="uniform", heal="layerwise").for_output()
    assert layerwise.healing.precision == "float32"  # layer-wise healing always trains in float32


def test_a_recipe_file_from_before_the_calibration_precision_calibrates_in_float32(monkeypatch):
    _native_cpu_bf16(monkeypatch)
    assert Recipe.from_dict({"svdzip_recipe": 1, "ratio": 0.3}).calib_dtype() == torch.float32  # svdzip wrote it
    assert Recipe.from_dict({"svdzip_recipe": 1, "calib_precision": "auto"}).calib_dtype() == torch.bfloat16
    assert Recipe.from_dict({"ratio": 0.3}).calib_dtype() == torch.bfloat16  # hand-written: the CLI's default


def test_a_heal_checkpoint_records_the_precision_as_resolved(monkeypatch):
    from svdzip.recover.config import HealConfig

    assert HealConfig(method="distill").fingerprint()["precision"] == "float32"  # the tests' CPU
    _native_cpu_bf16(monkeypatch)
    assert HealConfig(method="distill").fingerprint()["precision"] == "bfloat16"


def test_statistics_handed_to_the_api_must_match_the_recipes_precision(tmp_path):
    import svdzip

    model, tokens = tiny_model("llama"), tiny_tokens(8, 24)
    plain = Recipe.plain(ratio=0.2, calib_batch_size=4)
    stats = prepare_statistics(model, tokens, "tiny", replace(plain, calib_precision="float32"),
                               stats_path=tmp_path / "s.safetensors", kinds={"grams"})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SvdzipError, match="computed in float32, but this recipe calibrates in bfloat16"):
        svdzip.compress(model, replace(plain, calib_precision="bfloat16"), calib_tokens=tokens, stats=stats)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before any change
    svdzip.compress(model, replace(plain, calib_precision="float32"), calib_tokens=tokens, stats=stats)
