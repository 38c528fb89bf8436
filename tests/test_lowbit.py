"""Low-bit storage: HQQ-packed weights (`output.lowbit`), EoRA compensation (`methods.compensation`), the
quantization pass, the byte planner end to end (compress → save → reload), and the inputs it must refuse."""

from __future__ import annotations

import copy
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from tiny_models import Shape, tiny_model, tiny_tokens
from torch import nn
from transformers import AutoModelForCausalLM

import svdzip
from svdzip import Recipe, SvdzipError, compress
from svdzip.cli import main
from svdzip.methods.compensation import compensation_factors, error_spectrum
from svdzip.models.lowrank import LowRankLinear
from svdzip.output import lowbit
from svdzip.output.lowbit import (
    BITS,
    LowBitLinear,
    apply_lowbit,
    check_packed,
    lowbit_linears,
    lowbit_record,
    packed_bytes,
    quantize,
    require_backend,
    supported,
)

pytestmark = [pytest.mark.skipif(not lowbit.backend_installed(), reason="hqq is not installed"),
              pytest.mark.usefixtures("one_thread")]

# hidden 64 (every attention matrix and gate/up pack in groups of 64), intermediate 96 (down_proj cannot: it
# is only factorised or kept dense), biases and norms random
E2E = Shape(vocab=128, hidden=64, intermediate=96, layers=1, randomise=True)
# every matrix packs (intermediate 128)
PACKABLE = Shape(vocab=128, hidden=64, intermediate=128, layers=1)


def astuple_packed(m: LowBitLinear) -> tuple[torch.Tensor, ...]:
    """A packed linear's stored tensors (the words restored if the CPU kernel's planes were serving)."""
    packed = m.weight_packed
    return packed.words, packed.scale, packed.zero


def _output_error(x: torch.Tensor, e: torch.Tensor) -> float:
    return float((x.double() @ e.double().T).pow(2).sum())


# ---------------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(32, 64), (64, 128), (20, 192)])
def test_packed_bytes_are_the_planners_price(bits, shape):
    rows, cols = shape
    assert supported(rows, cols, bits)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(rows + cols))
    p = quantize(w, bits)
    assert p.nbytes == packed_bytes(rows, cols, bits)
    assert p.scale.dtype == p.zero.dtype == torch.bfloat16 and p.scale.numel() == rows * cols // 64
    assert p.words.dtype == (torch.int32 if bits == 3 else torch.uint8)
    d = p.dequantize(torch.float32)
    assert d.shape == shape and d.dtype == torch.float32 and torch.isfinite(d).all()
    # 8.5 / 4.5 / 2.5 bits per weight at group 64; 3 bits pads its last int32 word of ten values
    per_weight = 8 * p.nbytes / (rows * cols)
    if bits == 3:
        assert 3.7 <= per_weight <= 4.5
    else:
        assert per_weight == {8: 8.5, 4: 4.5, 2: 2.5}[bits]


def test_supported_matches_what_hqq_can_pack():
    for bits in BITS:
        for rows in range(1, 9):
            for cols in (64, 96, 128):
                ok = supported(rows, cols, bits)
                assert ok == (cols % 64 == 0 and (bits in (8, 3) or rows * cols // 64 % (8 // bits) == 0))
                if not ok:
                    with pytest.raises(SvdzipError, match="cannot be packed"):
                        quantize(torch.randn(rows, cols), bits)


def test_dequantization_error_falls_with_bits():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    errors = {b: float((quantize(w, b).dequantize() - w).pow(2).mean()) for b in BITS}
    assert errors[8] < errors[4] < errors[3] < errors[2] < float(w.pow(2).mean())
    assert errors[8] < 1e-3 * float(w.pow(2).mean())  # 8 bits is nearly exact


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("with_comp", [False, True])
def test_lowbit_linear_forward_is_dequantized_matmul_plus_bias_plus_compensation(bits, with_comp):
    g = torch.Generator().manual_seed(bits)
    linear = nn.Linear(128, 32, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(32, 128, generator=g))
        linear.bias.copy_(torch.randn(32, generator=g))
    comp = None
    if with_comp:
        comp = LowRankLinear.from_factors(torch.randn(32, 3, generator=g), torch.randn(3, 128, generator=g))
    packed = quantize(linear.weight, bits)
    m = LowBitLinear.from_linear(linear, bits, comp, packed=packed)
    assert m.packed is packed.words and m.rank == (3 if with_comp else 0)  # the given packing, not a new one
    x = torch.randn(5, 7, 128, generator=g)
    deq = packed.dequantize(torch.float32)
    want = x @ deq.T + linear.bias
    if with_comp:
        want = want + (x @ comp.right.weight.T) @ comp.left.weight.T
    with torch.no_grad():
        got = m(x)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-5)
        dense = deq + (comp.weight if with_comp else 0)
        assert torch.allclose(m.weight, dense, atol=1e-6)
        assert torch.allclose(got, x @ m.weight.T + linear.bias, atol=1e-4, rtol=1e-5)
    # quantizing inside from_linear gives the same words as quantize()
    assert torch.equal(LowBitLinear.from_linear(linear, bits).packed, packed.words)
    # its state round-trips through an empty module of the recorded shape (what a reload does)
    empty = LowBitLinear(128, 32, bits, rank=3 if with_comp else 0, bias=True)
    empty.load_state_dict(m.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(empty(x), got)


def test_lowbit_record_and_apply_lowbit_rebuild_the_skeleton():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64, bias=False))
    model[0] = LowBitLinear.from_linear(model[0], 2)
    record = lowbit_record(model)
    assert record["backend"] == "hqq" and record["modules"] == {
        "0": {"in": 64, "out": 32, "bits": 2, "group_size": 64, "rank": 0, "bias": True}}
    fresh = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64, bias=False))
    apply_lowbit(fresh, record)
    assert set(lowbit_linears(fresh)) == {"0"} and isinstance(fresh[2], nn.Linear)
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    with pytest.raises(SvdzipError, match="does not have"):
        apply_lowbit(fresh, {"modules": {"nope": record["modules"]["0"]}})
    assert lowbit_record(nn.Linear(4, 4)) is None


def test_check_packed_refuses_impossible_tensors():
    m = nn.Sequential(LowBitLinear.from_linear(nn.Linear(64, 20), 3))
    check_packed(m)
    m[0].packed[0, 0] = -5  # ten 3-bit values never set the sign bit
    with pytest.raises(SvdzipError, match="out of range"):
        check_packed(m)
    m = nn.Sequential(LowBitLinear.from_linear(nn.Linear(64, 32), 4))
    m[0].zero[1, 0] = float("inf")
    with pytest.raises(SvdzipError, match="not finite"):
        check_packed(m)


def test_require_backend(monkeypatch):
    for bits in BITS:
        require_backend(bits)
    for bits in (5, 1, 16, 0):
        with pytest.raises(SvdzipError, match="not supported"):
            require_backend(bits)
    monkeypatch.setattr(lowbit, "backend_installed", lambda: False)
    with pytest.raises(SvdzipError, match=r"svdzip\[lowbit\]"):
        require_backend(4)
    with pytest.raises(SvdzipError, match=r"svdzip\[lowbit\]"):
        apply_lowbit(nn.Linear(64, 32), {"modules": {}})


# ---------------------------------------------------------------------------------------------- compensation


def _als(x: torch.Tensor, delta: torch.Tensor, rank: int, iters: int = 300, seed: int = 1):
    """Brute force: alternating least squares for min_{B, A} ‖X (Δ − B A)ᵀ‖_F² from a random start."""
    g = torch.Generator().manual_seed(seed)
    m = delta @ x.T  # targets: the error's outputs on the inputs
    a = torch.randn(rank, delta.shape[1], generator=g, dtype=torch.float64)
    x_pinv = torch.linalg.pinv(x.T)
    for _ in range(iters):
        b = m @ torch.linalg.pinv(a @ x.T)
        a = torch.linalg.pinv(b) @ m @ x_pinv
    return b, a


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
@pytest.mark.parametrize("samples", [200, 9])  # 9 < 12: a singular Gram matrix
def test_compensation_is_the_best_rank_r_correction_on_the_inputs(shape, samples):
    g = torch.Generator().manual_seed(samples + shape[0])
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    assert supported(*shape, 2, group_size=4)
    q = quantize(w, 2, group_size=4).dequantize(torch.float32).double()
    delta = w - q
    assert delta.abs().max() > 1e-2  # 2 bits: a real error
    # anisotropic inputs, so that the metric matters
    x = torch.randn(samples, shape[1], generator=g, dtype=torch.float64) * torch.logspace(-1, 1, shape[1],
                                                                                         dtype=torch.float64)
    gram = x.T @ x
    spectrum = error_spectrum(w, q, gram, max_rank=None)
    assert spectrum.tail(0) == pytest.approx(_output_error(x, delta), rel=1e-10)
    assert torch.all(spectrum.sigma2[:-1] >= spectrum.sigma2[1:] - 1e-9)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    for r in (1, 2, 3, 5, 8):
        b, a = compensation_factors(w, q, gram, r)
        assert b.shape == (shape[0], r) and a.shape == (r, shape[1]) and b.dtype == torch.float64
        closed = _output_error(x, delta - b @ a)
        assert closed == pytest.approx(spectrum.tail(r), rel=1e-8, abs=1e-9)  # the dropped σ²
        assert closed == pytest.approx(float(spectrum.sigma2[r:].sum()), rel=1e-8, abs=1e-9)
        ba, aa = _als(x, delta, r)
        brute = _output_error(x, delta - ba @ aa)
        assert closed <= brute * (1 + 1e-8) + 1e-9
        assert brute <= closed * (1 + 1e-6) + 1e-9  # the brute force did converge (it is a real bound)
        plain = _output_error(x, delta - (u[:, :r] * s[:r]) @ vh[:r])  # unweighted truncation of ΔW
        assert closed <= plain * (1 + 1e-10)
        if r < min(shape) and spectrum.tail(r) > 1e-6 * spectrum.tail(0):
            assert closed < 0.95 * plain  # the metric pays off on these inputs
    full = min(shape)
    b, a = compensation_factors(w, q, gram, full)
    assert _output_error(x, delta - b @ a) <= 1e-8 * spectrum.tail(0)


def test_compensation_in_float32_and_without_a_gram():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 64, generator=g)
    q = quantize(w, 2).dequantize(torch.float32)
    x = torch.randn(300, 64, generator=g) * torch.linspace(0.1, 3.0, 64)
    gram = (x.T @ x).double()
    b, a = compensation_factors(w, q, gram, 4)
    assert b.dtype == a.dtype == torch.float32
    tail = error_spectrum(w, q, gram).tail(4)
    assert _output_error(x, w - q - b @ a) == pytest.approx(tail, rel=1e-4)
    # no metric: the plain Eckart-Young truncation of ΔW
    b0, a0 = compensation_factors(w, q, None, 4)
    s = torch.linalg.svdvals((w - q).double())
    assert float((w - q - b0 @ a0).double().pow(2).sum()) == pytest.approx(float(s[4:].pow(2).sum()), rel=1e-4)


# ---------------------------------------------------------------------------------------------- quantization pass


def test_quantization_errors_measure_each_packable_matrix():
    from svdzip.methods.decompose import decompose
    from svdzip.models.adapter import ModelAdapter
    from svdzip.passes.calibrate import collect_statistics
    from svdzip.passes.quant_error import quantization_errors, unit_gram

    model, tokens = tiny_model("llama", shape=E2E), tiny_tokens(4, 16, vocab=E2E.vocab)
    adapter = ModelAdapter(model)
    stats = collect_statistics(model, tokens, 4, "cpu")
    units = decompose(adapter, stats, "svdllm")
    errors = quantization_errors(adapter, units, stats, (2,))
    packable = {u.name for u in units if u.cols % 64 == 0}
    assert set(errors) == {(n, 2) for n in packable} and any(u.cols % 64 for u in units)  # down_proj: 96 columns
    for u in units:
        if u.name not in packable:
            continue
        err = errors[u.name, 2]
        weight = adapter.module(u.name).weight.detach()
        assert err.packed.nbytes == packed_bytes(u.rows, u.cols, 2)
        deq = err.packed.dequantize(torch.float32)
        e = (weight - deq).double()
        direct = float(torch.einsum("ij,jk,ik->", e, unit_gram(u, stats).double(), e))
        tail = err.tail_curve()
        assert float(tail[0]) == pytest.approx(direct, rel=1e-6)
        assert float(tail[-1]) == 0.0 and torch.all(tail[:-1] >= tail[1:])
    again = quantization_errors(adapter, units, stats, (2,), done=errors)
    assert again is errors and all(again[k] is errors[k] for k in errors)  # nothing recomputed
    with pytest.raises(SvdzipError, match="Gram matrix"):
        unit_gram(units[0], None)


# ---------------------------------------------------------------------------------------------- end to end


def _tensor_bytes(path: Path) -> tuple[int, dict]:
    """(header bytes, header) of a safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return n, json.loads(f.read(n))


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A tiny llama compressed by the byte planner (quantize auto → plan) to 40 % of its bf16 bytes, saved."""
    out = tmp_path_factory.mktemp("lowbit") / "plan"
    model, drawn = tiny_model("llama", seed=3, shape=E2E), tiny_tokens(12, 24, vocab=E2E.vocab)
    tokens, heldout = drawn[:8], drawn[8:]  # the default rounding (choose) compares roundings on held-out windows
    recipe = Recipe(budget_fraction=0.4, calib_samples=8, calib_seq_len=24, calib_batch_size=4)
    result = compress(model, recipe, calib_tokens=tokens, heldout_tokens=heldout, out=out)
    return result, tokens, out


def test_planned_model_fits_its_budget_and_its_file_is_the_plan(planned):
    result, _, out = planned
    assert result.config.quantize == "plan" and result.config.storage_dtype == "bfloat16"
    mem = result.summary["memory"]
    assert mem["planned_bytes"] <= mem["budget_bytes"] == int(0.4 * mem["reference_bytes"])
    assert result.summary["lowbit"]["planned_matrix_bytes"] == mem["planned_bytes"] - mem["fixed_bytes"]
    path = out / "model.safetensors"
    header_len, header = _tensor_bytes(path)
    size = path.stat().st_size
    assert size - 8 - header_len == mem["planned_bytes"]  # every stored byte was priced, and nothing else stored
    assert 0 <= size - mem["planned_bytes"] < 8192
    # the bytes the model holds in memory are the plan too
    model = result.model
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *(
        b for m in lowbit_linears(model).values() for b in astuple_packed(m))])
    assert held == mem["planned_bytes"]
    packed_keys = [k for k in header if k.endswith(".packed")]
    assert packed_keys, "the planner stored nothing at low bits"


def test_manifest_lists_the_packed_modules(planned):
    result, _, out = planned
    manifest = json.loads((out / "config.json").read_text())["quantization_config"]
    record = manifest["lowbit"]
    found = lowbit_linears(result.model)
    assert set(record["modules"]) == set(found) and found
    _, header = _tensor_bytes(out / "model.safetensors")
    rows = {r.name: r for r in result.modules}
    for name, spec in record["modules"].items():
        m = found[name]
        assert (spec["bits"], spec["rank"], spec["in"], spec["out"]) == (m.bits, m.rank, m.in_features,
                                                                         m.out_features)
        assert (rows[name].bits, rows[name].compensation_rank) == (m.bits, m.rank)
        assert header[f"{name}.packed"]["shape"] == list(m.weight_packed.words.shape)
        assert f"{name}.weight" not in header
        if m.rank:
            assert header[f"{name}.compensation.left.weight"]["shape"] == [m.out_features, m.rank]
        assert name not in manifest["modules"]  # not also listed as a factorised module
    assert set(manifest["modules"]).isdisjoint(record["modules"])
    counts = result.summary["lowbit"]["storage"]
    assert sum(v for k, v in counts.items() if k.endswith("-bit")) == len(found)


def test_planned_model_reloads_to_identical_logits(planned):
    result, tokens, out = planned
    assert not result.model.training  # as from_pretrained returns it: in bf16 both run the CPU int4 kernel
    with torch.no_grad():
        ref = result.model(tokens).logits
        again = AutoModelForCausalLM.from_pretrained(out)
        assert ref.dtype == torch.bfloat16 and torch.isfinite(ref).all()
        assert set(lowbit_linears(again)) == set(lowbit_linears(result.model))
        assert torch.equal(again(tokens).logits, ref)
        loaded, _ = svdzip.load(out, dtype=torch.bfloat16, with_tokenizer=False)
        assert torch.equal(loaded(tokens).logits, ref)
        # svdzip.load's default float32: the same stored values, computed in float32
        wide, _ = svdzip.load(out, with_tokenizer=False)
        assert torch.equal(wide(tokens).logits, copy.deepcopy(result.model).float()(tokens).logits)
        for name, m in lowbit_linears(wide).items():
            twin = lowbit_linears(result.model)[name]
            assert torch.equal(m.packed, twin.weight_packed.words)
            assert torch.equal(m.scale.float(), twin.scale.float())


def test_fixed_width_with_a_fixed_compensation_and_no_budget(tmp_path):
    """--quantize int3 --compensate 2, float32 storage, no budget: every matrix at 3 bits with a rank-2 EoRA
    correction; the file holds exactly those bytes, and the correction lowers each matrix's output error."""
    model, tokens = tiny_model("llama", seed=5, shape=PACKABLE), tiny_tokens(8, 24, vocab=PACKABLE.vocab)
    dense = copy.deepcopy(model)
    recipe = Recipe(quantize="int3", compensate=2, calib_samples=8, calib_seq_len=24, calib_batch_size=4)
    result = compress(model, recipe, calib_tokens=tokens, out=tmp_path / "q")
    found = lowbit_linears(model)
    names = [n for n, _ in dense.named_modules() if n.endswith("_proj")]
    assert set(found) == set(names) and all((m.bits, m.rank) == (3, 2) for m in found.values())
    assert result.config.storage_dtype == "float32" and "memory" not in result.summary
    assert result.summary["lowbit"]["compensation_ranks"] == 2 * len(names)
    fixed = (sum(p.numel() for p in dense.parameters()) - sum(m.weight.numel() for m in found.values())) * 4
    want = fixed + sum(packed_bytes(m.out_features, m.in_features, 3) + 2 * (m.in_features + m.out_features) * 4
                       for m in found.values())
    header_len, _ = _tensor_bytes(tmp_path / "q" / "model.safetensors")
    assert (tmp_path / "q" / "model.safetensors").stat().st_size - 8 - header_len == want
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
        assert torch.equal(again(tokens).logits, model(tokens).logits)
        # on the calibration inputs (captured from the dense model), 3 bits + rank 2 beats 3 bits alone
        inputs: dict[str, torch.Tensor] = {}
        hooks = [dense.get_submodule(n).register_forward_hook(
            lambda _m, args, _out, n=n: inputs.__setitem__(n, args[0].reshape(-1, args[0].shape[-1])))
            for n in names]
        dense(tokens)
        for h in hooks:
            h.remove()
        for name, m in found.items():
            w, x = dense.get_submodule(name).weight, inputs[name]
            bare = m.weight_packed.dequantize(torch.float32)
            assert m.compensation is not None
            assert _output_error(x, w - m.weight) < 0.99 * _output_error(x, w - bare)


def test_a_fixed_width_refuses_a_matrix_it_cannot_pack():
    # E2E's down_proj has 96 input columns: no whole group of 64, and --quantize int4 offers nothing else
    with pytest.raises(SvdzipError, match=r"down_proj \(64×96\) cannot be stored"):
        compress(tiny_model("llama", shape=E2E), Recipe(quantize="int4", calib_samples=4, calib_seq_len=16,
                                                        calib_batch_size=4),
                 calib_tokens=tiny_tokens(4, 16, vocab=E2E.vocab))


def _flip(path: Path, key: str, offset: int = 0, value: bytes | None = None) -> None:
    """Change the bytes of one stored tensor in place (the header untouched)."""
    header_len, header = _tensor_bytes(path)
    start = 8 + header_len + header[key]["data_offsets"][0] + offset
    with open(path, "r+b") as f:
        f.seek(start)
        old = f.read(1 if value is None else len(value))
        f.seek(start)
        f.write(bytes([old[0] ^ 0x5A]) if value is None else value)


def test_a_tampered_packed_tensor_is_refused(planned, tmp_path, monkeypatch):
    _, _, out = planned
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    _, header = _tensor_bytes(bad / "model.safetensors")
    key = sorted(k for k in header if k.endswith(".packed"))[0]
    _flip(bad / "model.safetensors", key, offset=3)
    with pytest.raises(SvdzipError, match="corrupted"):
        AutoModelForCausalLM.from_pretrained(bad)
    # past the checksum (SVDZIP_VERIFY=0), a scale that cannot be one is still refused
    scale = key.removesuffix(".packed") + ".scale"
    _flip(bad / "model.safetensors", scale, value=struct.pack("<H", 0x7FC0))  # bf16 NaN
    monkeypatch.setenv("SVDZIP_VERIFY", "0")
    with pytest.raises(SvdzipError, match="not finite"):
        AutoModelForCausalLM.from_pretrained(bad)


# ---------------------------------------------------------------------------------------------- bad input


def test_recipe_refuses_bad_lowbit_settings():
    for fraction in (1.5, 0.0, -0.2):
        with pytest.raises(SvdzipError, match="budget_fraction"):
            Recipe(budget_fraction=fraction).validate()
    Recipe(budget_fraction=1.0).validate()
    with pytest.raises(SvdzipError, match="--compensate 8"):
        Recipe(compensate=8, quantize=None).validate()
    with pytest.raises(SvdzipError, match="--compensate 8"):
        Recipe(compensate=8, quantize="int8", budget_fraction=0.5).validate()
    for bad in (-1, True, 2.5, "many"):
        with pytest.raises(SvdzipError, match="compensate"):
            Recipe(compensate=bad, quantize="int4").validate()
    with pytest.raises(SvdzipError, match="memory budget"):
        Recipe(quantize="plan").validate()
    for method in ("asvd", "svd", "fwsvd"):
        with pytest.raises(SvdzipError, match="svdllm"):
            Recipe(quantize="int3", method=method).validate()
    with pytest.raises(SvdzipError, match="unknown quantization"):
        Recipe(quantize="int5").validate()
    with pytest.raises(SvdzipError, match="--update"):
        Recipe(quantize="int4", update="svdllm").validate()
    with pytest.raises(SvdzipError, match="Basis Sharing"):
        Recipe(quantize="int4", group_size=2).validate()


def test_recipe_resolves_quantize_auto():
    budget = Recipe(budget_fraction=0.3).resolved(scaled=False)
    assert budget.quantize == "plan" and budget.lowbit and budget.storage_dtype == "bfloat16"
    assert budget.heal == "none" and budget.allocator == "loss-aware"
    assert "hqq-plan" in budget.label
    ratio = Recipe(ratio=0.3).resolved(scaled=False)
    assert ratio.quantize is None and not ratio.lowbit and ratio.storage_dtype == "float32"
    fixed = Recipe(quantize="int3", compensate=4).resolved(scaled=False)
    assert fixed.quantize == "int3" and fixed.lowbit and fixed.label.endswith("hqq-int3+eora4")
    assert Recipe(budget_fraction=0.3, quantize="int8").resolved(scaled=False).lowbit is False


def test_compensate_with_a_memory_budget_and_quantize_auto():
    r = Recipe(budget_fraction=0.3, compensate=4)
    r.validate()
    assert r.resolved(scaled=False).compensate == 4


def test_a_memory_budget_with_another_method_still_resolves():
    Recipe(budget_fraction=0.5, method="asvd").validate().resolved(scaled=False)


def test_the_papers_protocol_with_a_memory_budget_still_compresses():
    from tiny_models import SMALL

    result = compress(tiny_model("llama", shape=SMALL), Recipe.plain(budget_fraction=0.6),
                      calib_tokens=tiny_tokens(4, 16, vocab=SMALL.vocab))
    assert result.summary["memory"]["planned_bytes"] <= result.summary["memory"]["budget_bytes"]


def test_cli_refuses_bad_quantize_flags(tmp_path, capsys):
    # a model that does not exist: a flag wrongly accepted fails fast on it (and with another message)
    base = ["compress", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as info:
        main([*base, "--quantize", "int5"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--quantize", "int4", "--compensate", "-1"])
    assert "rank must be" in capsys.readouterr().err
    assert main([*base, "--quantize", "int4", "--ratio", "0.2"]) == 2
    assert "parameter ratio does not apply" in capsys.readouterr().err
    assert main([*base, "--quantize", "int4", "--kept", "0.8"]) == 2
    assert "parameter ratio does not apply" in capsys.readouterr().err
    assert main([*base, "--quantize", "plan"]) == 2
    assert "spends a memory budget" in capsys.readouterr().err
    assert main([*base, "--quantize", "int2", "--method", "asvd", "--budget-fraction", "0.3"]) == 2
    assert "use --method svdllm" in capsys.readouterr().err
    assert main([*base, "--compensate", "4"]) == 2  # a compensation without low bits
    assert "--compensate 4" in capsys.readouterr().err
    assert main([*base, "--compensate-order", "truncate-first", "--quantize", "int3"]) == 2  # nothing to order
    assert "truncate-first orders" in capsys.readouterr().err
    assert main([*base, "--rounding", "nearest", "--quantize", "int8", "--budget-fraction", "0.7"]) == 2
    assert "rounds low-bit weights" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--rounding", "stochastic", "--quantize", "int4"])
    assert "invalid choice" in capsys.readouterr().err
    assert main([*base, "--quantize", "int4", "--quantize-scope", "factors"]) == 2
    assert "allocates the ranks in bytes" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _fixed_and_floor(model):
    lin = {n: m for n, m in model.named_modules() if n.endswith("_proj")}
    fixed = (sum(p.numel() for p in model.parameters()) - sum(m.weight.numel() for m in lin.values())) * 2
    int4 = sum(packed_bytes(m.out_features, m.in_features, 4) for m in lin.values())
    rank1 = sum((m.in_features + m.out_features) * 2 for m in lin.values())
    return fixed, int4, rank1


def _fixed_width(budget_bytes, shape=PACKABLE, **kw):
    recipe = Recipe(budget_bytes=budget_bytes, quantize="int4", calib_samples=4, calib_seq_len=16,
                    calib_batch_size=4, **kw)
    return compress(tiny_model("llama", shape=shape), recipe, calib_tokens=tiny_tokens(4, 16, vocab=shape.vocab))


def test_a_budget_below_the_smallest_storage_names_it():
    fixed, int4, rank1 = _fixed_and_floor(tiny_model("llama", shape=PACKABLE))
    least = fixed + int4
    assert fixed + rank1 < least - 1
    with pytest.raises(SvdzipError, match=f"at least {least:,} bytes"):
        _fixed_width(least - 1)


def test_a_budget_below_the_factorised_floor_names_the_int4_minimum():
    fixed, int4, rank1 = _fixed_and_floor(tiny_model("llama", shape=PACKABLE))
    with pytest.raises(SvdzipError, match=f"{fixed + int4:,}"):
        _fixed_width(fixed + rank1 - 1)


def test_a_streamed_memory_budget_names_what_auto_chose(tmp_path, capsys):
    """`--stream --budget-fraction F`: the refusal says the planner is what --quantize auto chose, not a flag the
    user typed, and nothing is written."""
    from tiny_models import save_tiny

    src = save_tiny(tmp_path / "src")
    code = main(["compress", "--model", str(src), "--budget-fraction", "0.5", "--stream", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--quantize plan (what --quantize auto means for a memory budget)" in err
    assert "run without --stream" in err and not (tmp_path / "o").exists()
