"""Memory budgets: byte prices, byte-aware allocation against brute force, int8 storage that is real and reloads."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from tiny_models import tiny_model, tiny_tokens
from transformers import AutoModelForCausalLM

import svdzip
from svdzip import Recipe, SvdzipError, compress
from svdzip.allocate import AllocationContext, allocate, spent
from svdzip.allocate.memory import allocate_params_first, price, reference_bytes
from svdzip.budget import DENSE, Pricing, max_useful_rank
from svdzip.cli import main, parse_bytes
from svdzip.engine.pipeline import factorise, store
from svdzip.evaluate.speed import weight_bytes
from svdzip.methods.decompose import Unit, decompose
from svdzip.methods.linalg import Spectrum
from svdzip.models.adapter import LinearInfo, ModelAdapter
from svdzip.output.io import build_manifest, dir_size, save
from svdzip.output.quantize import parameter_bytes, quantization_record, quantized_linears, storage_bytes
from svdzip.passes.calibrate import collect_statistics

INT8_BF16 = Pricing(factor_value_bytes=1, dense_value_bytes=1, factor_row_bytes=5, dense_row_bytes=5)
MIXED = Pricing(factor_value_bytes=2, dense_value_bytes=1, factor_row_bytes=0, dense_row_bytes=5)  # bf16 factors


def fake_unit(i: int, rows: int, cols: int, decay: float) -> Unit:
    r = min(rows, cols)
    sigma2 = torch.tensor([decay**k for k in range(r)], dtype=torch.float64) * (i + 1)
    info = LinearInfo(f"m{i}", i, "q", f"x{i}", rows, cols)
    return Unit(members=[info], spectrum=Spectrum(sigma2=sigma2, basis=torch.eye(rows, r)))


def test_pricing_reduces_to_parameters_and_counts_row_scales():
    plain = Pricing(2, 2, 0, 0)
    for rows, cols in [(8, 8), (12, 5), (3, 40)]:
        assert plain.max_useful_rank(rows, cols) == max_useful_rank(rows, cols)
        assert plain.factored(rows, cols, 2) == 2 * 2 * (rows + cols)
        assert plain.dense(rows, cols) == 2 * rows * cols
    assert INT8_BF16.factored(10, 6, 3) == 3 * 16 + 5 * (10 + 3)
    assert INT8_BF16.dense(10, 6) == 60 + 50
    # bf16 factors against an int8 dense matrix (256 values + 16 row scales of 5 bytes = 336 bytes):
    # factorising pays only up to rank 5 (5·32·2 = 320 bytes), not up to the parameter count's 7
    assert MIXED.max_useful_rank(16, 16) == 5 < max_useful_rank(16, 16) == 7


@pytest.mark.parametrize("pricing", [INT8_BF16, MIXED])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_byte_aware_loss_aware_matches_brute_force(pricing, seed):
    """At every budget the hull greedy lands on exactly (a Lagrangian point: cumulative hull segments), its
    allocation is the brute-force optimum in bytes; at any budget it never spends more than the budget."""
    from svdzip.allocate.common import hull_segments

    g = torch.Generator().manual_seed(seed)
    units = price([fake_unit(i, 12, 12, float(0.3 + 0.6 * torch.rand(1, generator=g))) for i in range(3)], pricing)
    options = [[*range(1, u.max_rank + 1), DENSE] for u in units]

    def loss(combo):
        return sum(0.0 if k is DENSE else u.spectrum.tail(k) for u, k in zip(units, combo, strict=True))

    def run(budget):
        ctx = AllocationContext(ratio=0.5, budget=budget, options={"signal": "whitened"})
        return allocate("loss-aware", units, ctx).ranks

    segments = sorted((s for u in units for s in hull_segments(u, 1.0)), key=lambda s: -s[0])
    budget, checked = spent(units, [1] * 3), 0
    for _gain, _, cost in segments:
        budget += cost
        ranks = run(budget)
        best = min((c for c in itertools.product(*options) if spent(units, c) <= budget), key=loss)
        assert spent(units, ranks) <= budget
        assert loss(ranks) == pytest.approx(loss(best), rel=1e-9, abs=1e-12), (budget, ranks, best)
        checked += 1
    assert checked > 5
    for budget in range(spent(units, [1] * 3), spent(units, [DENSE] * 3) + 1, 13):
        assert spent(units, run(budget)) <= budget


def test_params_first_fits_the_byte_budget_and_byte_aware_is_no_worse():
    units = [fake_unit(i, 16, 16, 0.5 + 0.1 * i) for i in range(3)]
    priced = price(units, MIXED)
    budget = spent(priced, [2, 2, DENSE])
    ctx = AllocationContext(ratio=0.5, budget=0, options={"signal": "whitened"})
    pf, ratio = allocate_params_first("loss-aware", units, priced, ctx, budget)
    pf = pf.ranks
    aware = allocate("loss-aware", priced,
                     AllocationContext(ratio=0.5, budget=budget, options={"signal": "whitened"})).ranks
    assert spent(priced, pf) <= budget and spent(priced, aware) <= budget and 0 < ratio < 1

    def loss(ranks):
        return sum(0.0 if k is DENSE else u.spectrum.tail(k) for u, k in zip(units, ranks, strict=True))
    assert loss(aware) <= loss(pf) + 1e-12


def _quantized(tmp_path, fraction=0.6, scope="all", dtype=torch.bfloat16, allocator="loss-aware"):
    model, tokens = tiny_model("llama"), tiny_tokens()
    cfg = Recipe.plain(budget_fraction=fraction, quantize="int8", quantize_scope=scope, allocator=allocator,
                         storage_dtype=str(dtype).removeprefix("torch."), calib_batch_size=4,
                         allocator_options={"signal": "whitened"} if allocator == "loss-aware" else {})
    result = compress(model, cfg, calib_tokens=tokens, out=tmp_path / "q")  # the runner quantizes, then saves
    return model, tokens, result, result.quantized


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_save_reload_gives_identical_logits(tmp_path, dtype):
    model, tokens, result, names = _quantized(tmp_path, dtype=dtype)
    assert names and set(quantized_linears(model)) == set(names)
    with torch.no_grad():
        ref = model(tokens).logits
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
        loaded, _ = svdzip.load(tmp_path / "q", with_tokenizer=False)
        assert torch.equal(again(tokens).logits, ref)
        assert torch.equal(loaded(tokens).logits, ref)
    assert set(quantized_linears(again)) == set(names)
    assert weight_bytes(again) == weight_bytes(model)
    # save_pretrained cannot write int8 tensors; svdzip.save re-saves a reloaded model as it was
    with pytest.raises(ValueError, match="not serializable"):
        again.save_pretrained(tmp_path / "plain")
    save(again, None, tmp_path / "again", again.config.quantization_config)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "again")(tokens).logits, ref)


def test_quantized_model_fits_its_budget_in_memory_and_is_really_smaller(tmp_path):
    model, _, result, _ = _quantized(tmp_path, fraction=0.6)
    mem = result.summary["memory"]
    assert parameter_bytes(model) <= mem["planned_bytes"] <= mem["budget_bytes"]
    assert mem["planned_bytes"] - parameter_bytes(model) < 0.01 * mem["budget_bytes"]  # the plan is the real size
    dense = tiny_model("llama").to(torch.bfloat16)
    dense.save_pretrained(tmp_path / "dense")
    assert parameter_bytes(model) <= 0.6 * parameter_bytes(dense)
    # int8 weights hold one byte per value: the quantized file carries them, not 16-bit copies
    qbytes = sum(storage_bytes(m.weight) for m in quantized_linears(model).values())
    assert qbytes < sum(m.weight.numel() for m in quantized_linears(model).values()) * 2 * 0.75
    assert dir_size(tmp_path / "q") < dir_size(tmp_path / "dense")


def test_mixed_scope_keeps_factors_16bit(tmp_path):
    model, tokens, result, names = _quantized(tmp_path, fraction=0.7, scope="dense")
    assert all(not n.endswith((".left", ".right")) for n in names)
    dense_rows = [r.name for r in result.modules if r.rank is None]
    assert set(names) == set(dense_rows)


def test_int8_factors_beside_a_16bit_remainder_stop_at_the_stored_basis(tmp_path):
    """int8 factors and bf16 dense matrices: factorising pays up to about twice the parameter break-even, beyond
    the basis a spectrum keeps (1.2×); ranks stop there instead of failing at materialisation."""
    model, tokens, result, names = _quantized(tmp_path, fraction=0.62, scope="factors")
    factorised = [r for r in result.modules if r.rank is not None]
    assert factorised and all(n.endswith((".left", ".right")) for n in names)
    units = {u.name: u for u in result.units}
    assert all(r.rank <= units[r.name].spectrum.basis.shape[1] for r in factorised)
    assert any(r.rank > max_useful_rank(r.out_features, r.in_features) for r in factorised)  # the case at stake


def test_budget_errors():
    model = tiny_model("llama")
    with pytest.raises(SvdzipError, match="embeddings, lm_head and norms alone"):
        compress(model, Recipe.plain(budget_fraction=0.05, method="svd"))
    with pytest.raises(SvdzipError, match="not both"):
        Recipe.plain(budget_fraction=0.5, budget_bytes=1000).validate()
    with pytest.raises(SvdzipError, match="byte planner"):  # int4 is HQQ's, planned by loss-aware
        compress(tiny_model("llama"), Recipe.plain(budget_fraction=0.5, quantize="int4", method="svd"))
    assert reference_bytes(model) == 2 * sum(p.numel() for p in model.parameters())


def test_budget_just_above_embeddings_but_below_one_rank_each():
    model = tiny_model("llama")
    fixed = (sum(p.numel() for p in model.parameters()) - sum(m.weight.numel() for n, m in model.named_modules()
             if n.endswith(("_proj",)))) * 4
    with pytest.raises(SvdzipError, match="one rank per matrix"):
        compress(model, Recipe.plain(budget_bytes=fixed + 10, method="svd", storage_dtype="float32"))


def test_cli_refuses_ratio_with_budget_and_parses_sizes(tmp_path, capsys):
    assert main(["compress", "--out", str(tmp_path / "x"), "--ratio", "0.3", "--budget-fraction", "0.5"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["compress", "--out", str(tmp_path / "x"), "--params-first"]) == 2
    assert parse_bytes("80MB") == 80_000_000 and parse_bytes("64MiB") == 64 * 2**20 and parse_bytes("1000") == 1000
    with pytest.raises(SvdzipError, match="--budget-bytes must be a number of bytes such as .* got 'lots'"):
        parse_bytes("lots")


def test_missing_backend_is_reported_with_the_install_command(tmp_path, monkeypatch):
    _quantized(tmp_path)
    import svdzip.output.quantize as q

    monkeypatch.setattr(q, "backend_installed", lambda: False)
    with pytest.raises(SvdzipError, match=r"svdzip\[quant\]"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with pytest.raises(SvdzipError, match=r"svdzip\[quant\]"):
        q.require_backend("int8")
    manifest = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert manifest["quantization"]["backend"] == "torchao" and manifest["quantization"]["precision"] == "int8"


def test_cli_compresses_to_a_memory_budget_with_int8(tmp_path, monkeypatch, capsys):
    """`svdzip compress --budget-fraction 0.5 --quantize int8 --dtype bfloat16` end to end on a tiny model."""
    import svdzip.data
    import svdzip.output.loading

    monkeypatch.setattr(svdzip.output.loading, "load_model", lambda *a, **k: (tiny_model("llama"), None, "tiny"))
    monkeypatch.setattr(svdzip.data, "load_corpus", lambda name: name)
    monkeypatch.setattr(svdzip.data, "calibration_tokens", lambda _t, _c, n, seq, seed=0: tiny_tokens(n=n, seq=seq))
    out = tmp_path / "o"
    code = main(["compress", "--out", str(out), "--budget-fraction", "0.5", "--quantize", "int8", "--dtype",
                 "bfloat16", "--allocator", "loss-aware", "--allocator-option", "signal=whitened", "--calib-samples",
                 "4", "--calib-seq-len", "24", "--stats", str(tmp_path / "s.safetensors"), "--no-plots", "--json",
                 "--heal", "none"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["weight_bytes_in_memory"] <= summary["memory"]["budget_bytes"] == int(
        0.5 * summary["memory"]["reference_bytes"])
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert quantized_linears(reloaded) and parameter_bytes(reloaded) == summary["weight_bytes_in_memory"]
    assert main(["info", str(out)]) == 0


def test_heal_then_int8_keeps_the_budget_and_reloads_identically(tmp_path):
    """Recovery trains the float factors; quantizing afterwards keeps the shapes, so the bytes stay planned."""
    import copy

    from svdzip.recover.config import HealConfig
    from svdzip.recover.heal import heal

    teacher, tokens = tiny_model("llama"), tiny_tokens()
    student = copy.deepcopy(teacher)
    cfg = Recipe.plain(budget_fraction=0.6, quantize="int8", storage_dtype="bfloat16", calib_batch_size=4)
    # the runner's order, stage by stage: factorise, heal the float factors, then store them quantized
    units = decompose(ModelAdapter(student), collect_statistics(student, tokens, 4, "cpu"), "svdllm")
    result = factorise(student, cfg, units, calib_tokens=tokens)
    heal(student, teacher, (tiny_tokens(8, 16, seed=5), tiny_tokens(4, 16, seed=5)),
         HealConfig(method="distill", steps=2, batch_size=2, eval_every=1, patience=10, warmup=0.0,
                    lr=1e-3, seq_len=16))
    names = store(result, torch.bfloat16)
    manifest = build_manifest(result.modules, result.summary, cfg.to_dict())
    manifest.quantization = quantization_record(names, "int8", "all", torch.bfloat16)
    save(student, None, tmp_path / "h", manifest)
    assert parameter_bytes(student) <= result.summary["memory"]["budget_bytes"]
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "h")(tokens).logits,
                           student(tokens).logits)
