"""The two other orders of low rank and low bits: SVD first with the factors packed (`--quantize-scope factors`,
and the planner's menu), and CALDERA's truncate-then-quantize (`--compensate-order truncate-first`)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from tiny_models import Shape, tiny_model, tiny_tokens
from transformers import AutoModelForCausalLM

from svdzip import Recipe, SvdzipError, compress
from svdzip.allocate.storage import StorageMenu, least_bytes, matrix_bytes, plan_storage
from svdzip.methods.linalg import data_loss, truncate, weighted_spectrum
from svdzip.methods.quantized_factors import prefix_losses
from svdzip.models.lowrank import LowRankLinear
from svdzip.output import lowbit
from svdzip.output.lowbit import LowBitLinear, lowbit_linears, packed_bytes
from svdzip.passes.quant_error import FactorError, factor_ranks

# attention 256×256 and k/v 128×256 (rank 64 packs and stores fewer values than the matrix), MLP 256 ↔ 512
WIDE = Shape(vocab=128, hidden=256, intermediate=512, layers=1, heads=4, kv_heads=2)
needs_hqq = pytest.mark.skipif(not lowbit.backend_installed(), reason="hqq is not installed")
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- the maths


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_prefix_losses_equal_each_prefix_brute_force(shape):
    g = torch.Generator().manual_seed(shape[0])
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    k = 7
    left = torch.randn(shape[0], k, generator=g, dtype=torch.float64)
    right = torch.randn(k, shape[1], generator=g, dtype=torch.float64)
    x = torch.randn(50, shape[1], generator=g, dtype=torch.float64) * torch.logspace(-1, 1, shape[1],
                                                                                    dtype=torch.float64)
    gram = x.T @ x
    losses = prefix_losses(w, left, right, gram)
    assert losses.shape == (k + 1,) and losses.dtype == torch.float64
    for j in range(k + 1):
        brute = data_loss(w, left[:, :j] @ right[:j], gram)
        assert float(losses[j]) == pytest.approx(brute, rel=1e-5)
    # with the exact truncation's factors the prefix losses are the spectrum's tails
    spectrum = weighted_spectrum(w, gram)
    a, b = truncate(w, spectrum.basis, k)
    tails = prefix_losses(w, a, b, gram)
    assert torch.allclose(tails, spectrum.tail_curve()[: k + 1], rtol=1e-5, atol=1e-6 * spectrum.energy)


def test_factor_ranks_pack_and_save_values():
    assert factor_ranks(256, 512, 256, 4) == (64, 128)  # 256·512/768 = 170: ranks 64 and 128
    assert factor_ranks(256, 512, 100, 4) == (64,)  # the stored basis bounds them too
    assert factor_ranks(64, 64, 64, 4) == ()  # rank 64 stores as many values as the matrix
    assert factor_ranks(256, 96, 256, 4) == ()  # 96 inputs: the right factor cannot pack


@needs_hqq
@pytest.mark.parametrize("rounding", ["gptq", "nearest"])
def test_truncate_then_quantize_refits_the_correction(rounding):
    from svdzip.passes.quant_error import quantize_rounded, truncate_then_quantize

    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 128, generator=g) * torch.logspace(0, -1, 128)
    x = torch.randn(400, 128, generator=g) * torch.linspace(0.2, 3.0, 128)
    gram = (x.T @ x).double()
    packed, (b, a) = truncate_then_quantize(w, gram, 8, 3, rounding=rounding)
    assert packed.bits == 3 and b.shape == (64, 8) and a.shape == (8, 128)
    q = packed.dequantize(torch.float32)
    # the packing is of the truncation's residual
    left, right = truncate(w, weighted_spectrum(w, gram, max_rank=8).basis, 8)
    residual = w - (left.double() @ right.double()).float()
    assert torch.equal(q, quantize_rounded(residual, 3, gram, rounding).dequantize(torch.float32))
    refit = data_loss(w, q + b @ a, gram)
    assert refit <= data_loss(w, q + left @ right, gram) * (1 + 1e-6)  # the alternation never loses
    best = float(weighted_spectrum(w - q, gram).tail(8))  # and it is the best rank-8 correction of that packing
    assert refit == pytest.approx(best, rel=1e-3)


# ---------------------------------------------------------------------------------------------- the planner


class _Unit:
    def __init__(self, name: str, rows: int, cols: int):
        self.name, self.rows, self.cols = name, rows, cols
        self.dense_params = rows * cols


def test_menus_offer_packed_factors_as_asked():
    from svdzip.allocate.storage import menu_for
    from svdzip.output.lowbit import BITS

    assert menu_for("plan", "auto", 2).factor_bits == ()  # loss-aware's packed_factors is off by default
    assert menu_for("plan", "auto", 2, packed_factors=True).factor_bits == BITS
    only = menu_for("int3", "auto", 2, scope="factors")
    assert (only.bits, only.factor_bits, only.factorise, only.comp) == ((), (3,), False, 0)
    assert menu_for("int3", 4, 2).factor_bits == ()


def test_plan_storage_with_factor_options_prices_and_reports_them():
    units = [_Unit("a", 256, 512), _Unit("b", 256, 512)]
    losses = torch.linspace(10.0, 1.0, 129, dtype=torch.float64)  # losses[k] for k = 0 … 128
    losses[64] = 3.0
    factors = {(u.name, 4): FactorError(losses=losses, ranks=(64, 128)) for u in units}
    menu = StorageMenu(bits=(), comp=0, factorise=False, value_bytes=2, factor_bits=(4,))
    floor, what = least_bytes(units, menu)
    assert floor == 2 * (packed_bytes(256, 64, 4) + packed_bytes(64, 512, 4)) and "rank 64" in what
    budget = floor + packed_bytes(256, 64, 4) + packed_bytes(64, 512, 4)  # room for one unit at rank 128
    allocation = plan_storage(units, [1.0, 2.0], {}, menu, budget, factors)
    assert allocation.ranks == [64, 128]  # the heavier unit gets the rank
    assert allocation.lowbit == {"a": (4, 0), "b": (4, 0)}
    assert allocation.report["storage"] == {"4-bit factors": 2}
    assert matrix_bytes(units, allocation, 2) == allocation.report["planned_matrix_bytes"] == budget
    with pytest.raises(SvdzipError, match="least"):
        plan_storage(units, [1.0, 1.0], {}, menu, floor - 1, factors)


# ---------------------------------------------------------------------------------------------- end to end


def _header(path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return n, json.loads(f.read(n))


@needs_hqq
def test_svd_then_4bit_factors_end_to_end(tmp_path):
    """--quantize int4 --quantize-scope factors at a byte budget: every matrix factorised with both factors
    packed; the file holds exactly the plan, reloads to identical logits, and its priced losses are real."""
    model, tokens = tiny_model("llama", seed=2, shape=WIDE), tiny_tokens(8, 32, vocab=WIDE.vocab)
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("_proj")}
    recipe = Recipe(budget_fraction=0.5, quantize="int4", quantize_scope="factors", calib_samples=8,
                    calib_seq_len=32, calib_batch_size=4)
    result = compress(model, recipe, calib_tokens=tokens, out=tmp_path / "f")
    assert result.config.label.endswith("hqq-int4-factors")
    rows = {r.name: r for r in result.modules}
    assert set(rows) == set(dense) and all(r.rank in (64, 128) and r.bits == 4 for r in rows.values())
    found = lowbit_linears(model)
    assert set(found) == {f"{n}.{side}" for n in dense for side in ("left", "right")}
    assert all(isinstance(model.get_submodule(n), LowRankLinear) for n in dense)
    mem = result.summary["memory"]
    assert mem["planned_bytes"] <= mem["budget_bytes"]
    header_len, header = _header(tmp_path / "f" / "model.safetensors")
    assert (tmp_path / "f" / "model.safetensors").stat().st_size - 8 - header_len == mem["planned_bytes"]
    assert not any(k.endswith((".left.weight", ".right.weight")) for k in header)  # only packed factors
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "f")
        assert torch.equal(again(tokens).logits, model(tokens).logits)
    # the report's loss is the priced one, and it is the stored factors' real error (the priced prefix of the
    # widest quantization vs the stored quantization at that rank: equal up to HQQ's global stopping test)
    from svdzip.methods.decompose import decompose
    from svdzip.models.adapter import ModelAdapter
    from svdzip.passes.calibrate import collect_statistics
    from svdzip.passes.quant_error import unit_gram

    twin = tiny_model("llama", seed=2, shape=WIDE)
    stats = collect_statistics(twin, tokens, 4, "cpu")
    grams = {u.name: unit_gram(u, stats) for u in decompose(ModelAdapter(twin), stats, "svdllm")}
    for name, row in rows.items():
        module = model.get_submodule(name)
        stored = module.left.weight.double() @ module.right.weight.double()
        gram = grams[name]
        real = data_loss(dense[name], stored, gram)
        energy = data_loss(dense[name], torch.zeros_like(dense[name]), gram)
        assert row.loss == pytest.approx(real / energy, rel=0.1, abs=1e-3)


@needs_hqq
def test_caldera_order_end_to_end(tmp_path):
    model, tokens = tiny_model("llama", seed=6, shape=WIDE), tiny_tokens(8, 32, vocab=WIDE.vocab)
    recipe = Recipe(quantize="int3", compensate=4, compensate_order="truncate-first", calib_samples=8,
                    calib_seq_len=32, calib_batch_size=4)
    result = compress(model, recipe, calib_tokens=tokens, out=tmp_path / "c")
    assert result.config.label.endswith("hqq-int3+eora4+caldera")
    found = lowbit_linears(model)
    assert found and all(isinstance(m, LowBitLinear) and (m.bits, m.rank) == (3, 4) for m in found.values())
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
        assert torch.equal(again(tokens).logits, model(tokens).logits)
    recipe = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert "truncate-first" in json.dumps(recipe)


def test_recipe_refuses_bad_orders_and_scopes():
    with pytest.raises(SvdzipError, match="compensation order"):
        Recipe(quantize="int4", compensate_order="sideways").validate()
    with pytest.raises(SvdzipError, match="truncate-first"):
        Recipe(quantize="int4", compensate=0, compensate_order="truncate-first").validate()
    with pytest.raises(SvdzipError, match="truncate-first"):
        Recipe(quantize="int8", compensate_order="truncate-first", budget_fraction=0.5).validate()
    with pytest.raises(SvdzipError, match="'dense' is int8's"):
        Recipe(quantize="int4", quantize_scope="dense").validate()
    with pytest.raises(SvdzipError, match="leave --quantize-scope all"):
        Recipe(quantize="plan", quantize_scope="factors", budget_fraction=0.4).validate()
    with pytest.raises(SvdzipError, match="drop --compensate 8"):
        Recipe(quantize="int4", quantize_scope="factors", compensate=8, budget_fraction=0.4).validate()
    with pytest.raises(SvdzipError, match="--budget-fraction"):
        Recipe(quantize="int4", quantize_scope="factors").validate()
    with pytest.raises(SvdzipError, match="nothing left to train"):
        Recipe(quantize="int4", quantize_scope="factors", budget_fraction=0.4, heal="distill").validate()
    Recipe(quantize="int4", quantize_scope="factors", budget_fraction=0.4).validate()
