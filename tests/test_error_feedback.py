"""GPTQ's rounding with error feedback (`methods.error_feedback`) against the sequential OBQ greedy it is, and
its use for HQQ-packed weights (`passes.quant_error.quantize_rounded`, `--rounding`)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import Shape, tiny_model, tiny_tokens

from svdzip import Recipe, SvdzipError
from svdzip.methods.error_feedback import activation_order, dequantize_codes, error_feedback_codes, round_to_grid
from svdzip.output import lowbit
from svdzip.passes.quant_error import CHOOSE_MARGIN, quantize_rounded, rounding_at

pytestmark = pytest.mark.usefixtures("one_thread")


def _min_max_grid(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A scale and zero point per group (rows × groups) spanning each group's range: a stand-in for HQQ's."""
    groups = w.reshape(w.shape[0], -1, group_size)
    lo, hi = groups.min(dim=2).values, groups.max(dim=2).values
    scale = (hi - lo).clamp_min(1e-8) / (2 ** bits - 1)
    return scale, -lo / scale


def _sequential_greedy(weight, gram, bits, group_size, damp=0.01):
    """OBQ's greedy written out on the min-max grid, loudest input first: round column j, spread its error over
    the columns left with the inverse Hessian of those columns, then drop j from that inverse (no Cholesky, no
    blocks, no permuted matrices)."""
    w = weight.double().clone()
    scale, zero = (t.repeat_interleave(group_size, dim=1) for t in _min_max_grid(w, bits, group_size))
    h = gram.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h += damp * float(torch.diagonal(h).mean()) * torch.eye(len(h), dtype=torch.float64)
    left = sorted(range(w.shape[1]), key=lambda c: (-float(h[c, c] - (1.0 if dead[c] else 0.0)), c))
    codes = torch.empty_like(w)
    while left:
        j, rest = left[0], left
        inv = torch.linalg.inv(h[rest][:, rest])
        codes[:, j] = round_to_grid(w[:, j].clone(), scale[:, j], zero[:, j], bits)
        err = (w[:, j] - (codes[:, j] - zero[:, j]) * scale[:, j]) / inv[0, 0]
        w[:, rest] -= err[:, None] * inv[0][None, :]
        left = left[1:]
    return codes


def _inputs(samples, cols, seed, dead=()):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64) * 0.3 + torch.eye(cols, dtype=torch.float64)
    x = torch.randn(samples, cols, generator=g, dtype=torch.float64) @ mix
    x[:, :3] *= 20  # a few loud input channels, as in real activations
    x[:, list(dead)] = 0
    return x


def _output_error(x, e):
    return float((x @ e.detach().double().T).pow(2).sum())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("block", [8, 16])
def test_blocked_cholesky_pass_equals_the_sequential_greedy(bits, block):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(6, 32, generator=g, dtype=torch.float64)
    x = _inputs(100, 32, seed=bits, dead=(5,))
    gram = x.T @ x
    scale, zero = _min_max_grid(w, bits, 8)
    codes = error_feedback_codes(w, gram, bits, scale, zero, 8, block=block)
    assert torch.equal(codes, _sequential_greedy(w, gram, bits, 8))
    assert codes.min() >= 0 and codes.max() <= 2 ** bits - 1 and torch.equal(codes, codes.round())
    # the input the calibration never excited comes last, rounded on its group's grid from where the others'
    # errors moved it (and, with nothing left after it, feeds nothing back)
    assert int(activation_order(gram)[-1]) == 5
    # it beats rounding each weight to its nearest point of the same grid, on the inputs it was fitted to
    deq = dequantize_codes(codes, scale, zero, 8)
    nearest = dequantize_codes(round_to_grid(w.clone(), *(t.repeat_interleave(8, 1) for t in (scale, zero)), bits),
                               scale, zero, 8)
    assert _output_error(x, w - deq) < 0.8 * _output_error(x, w - nearest)


def test_activation_order_is_by_decreasing_input_energy():
    gram = torch.diag(torch.tensor([1.0, 5.0, 0.0, 5.0, 2.0]))
    assert activation_order(gram).tolist() == [1, 3, 4, 0, 2]


def test_a_diagonal_gram_feeds_nothing_back():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 16, generator=g, dtype=torch.float64)
    gram = torch.diag(torch.rand(16, generator=g, dtype=torch.float64) + 0.5)
    scale, zero = _min_max_grid(w, 3, 8)
    codes = error_feedback_codes(w, gram, 3, scale, zero, 8, block=16)
    wide = [t.repeat_interleave(8, dim=1) for t in (scale, zero)]
    assert torch.equal(codes, round_to_grid(w.clone(), *wide, 3))


def test_a_gram_it_cannot_use_or_an_unknown_rounding_is_refused():
    w = torch.randn(4, 64)
    with pytest.raises(SvdzipError, match="non-finite"):
        error_feedback_codes(w, torch.full((64, 64), float("nan")), 4, *_min_max_grid(w, 4, 64), 64)
    with pytest.raises(SvdzipError, match="not positive definite"):
        error_feedback_codes(w, -torch.eye(64), 4, *_min_max_grid(w, 4, 64), 64)
    with pytest.raises(SvdzipError, match="unknown rounding 'GPTQ'"):
        quantize_rounded(w, 4, torch.eye(64), "GPTQ")


def test_shapes_that_are_not_whole_groups_are_refused():
    with pytest.raises(ValueError, match="whole groups"):
        error_feedback_codes(torch.zeros(2, 12), torch.eye(12), 4, torch.ones(2, 1), torch.zeros(2, 1), 8)


@pytest.mark.skipif(not lowbit.backend_installed(), reason="hqq is not installed")
@pytest.mark.parametrize("bits", lowbit.BITS)
def test_hqq_packing_of_the_feedback_codes(bits):
    """The packed words decode to exactly the codes on the stored (bf16) grid, and the output error on the
    calibration inputs is below HQQ's nearest rounding."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(20, 128, generator=g) * 0.05
    x = _inputs(400, 128, seed=bits).float()
    gram = (x.T @ x).double()
    fed = quantize_rounded(w, bits, gram, "gptq")
    plain = lowbit.quantize(w, bits)
    assert fed.nbytes == plain.nbytes == lowbit.packed_bytes(20, 128, bits)
    assert fed.words.dtype == plain.words.dtype and fed.words.shape == plain.words.shape
    # the grid is HQQ's own, only the codes differ
    assert torch.equal(fed.scale, plain.scale) and torch.equal(fed.zero, plain.zero)
    scale, zero = fed.scale.float().reshape(20, -1), fed.zero.float().reshape(20, -1)
    codes = error_feedback_codes(w, gram, bits, scale, zero, 64)
    hqq = pytest.importorskip("hqq.core.quantize").Quantizer
    unpacked = hqq.unpack[hqq.bit_to_packing[bits]](fed.words)[:codes.numel() // 64]  # 3 bits pads the rows
    assert torch.equal(unpacked.long(), codes.reshape(-1, 64).long())
    deq = fed.dequantize(torch.float32)
    assert torch.allclose(dequantize_codes(codes, scale, zero, 64), deq, atol=1e-6)
    assert _output_error(x.double(), w - deq) < 0.7 * _output_error(x.double(), w - plain.dequantize(torch.float32))


@pytest.mark.skipif(not lowbit.backend_installed(), reason="hqq is not installed")
def test_the_pass_rounds_as_the_recipe_says_and_gptq_measures_less_error():
    from svdzip.methods.decompose import decompose
    from svdzip.models.adapter import ModelAdapter
    from svdzip.passes.calibrate import collect_statistics
    from svdzip.passes.quant_error import quantization_errors

    shape = Shape(vocab=128, hidden=64, intermediate=128, layers=1, randomise=True)
    model, tokens = tiny_model("llama", shape=shape), tiny_tokens(8, 32, vocab=shape.vocab)
    adapter = ModelAdapter(model)
    stats = collect_statistics(model, tokens, 4, "cpu")
    units = decompose(adapter, stats, "svdllm")
    fed = quantization_errors(adapter, units, stats, (2, 3))  # the default: gptq
    nearest = quantization_errors(adapter, units, stats, (2, 3), rounding="nearest")
    auto = quantization_errors(adapter, units, stats, (2, 3), rounding="auto")
    assert set(fed) == set(nearest) and len(fed) == 2 * len(units)
    total = {k: sum(float(e[u.name, 3].tail_curve()[0]) for u in units) for k, e in (("fed", fed), ("n", nearest))}
    assert total["fed"] < 0.85 * total["n"]
    for u in units:  # the nearest rounding is HQQ's own quantizer, untouched; auto keeps it at 2 bits
        weight = adapter.module(u.name).weight.detach()
        assert torch.equal(nearest[u.name, 3].packed.words, lowbit.quantize(weight, 3).words)
        assert torch.equal(auto[u.name, 2].packed.words, nearest[u.name, 2].packed.words)
        assert torch.equal(auto[u.name, 3].packed.words, fed[u.name, 3].packed.words)
        assert not torch.equal(fed[u.name, 2].packed.words, nearest[u.name, 2].packed.words)


def test_auto_rounding_is_gptq_from_3_bits_up():
    assert [rounding_at("auto", b) for b in (2, 3, 4, 8)] == ["nearest", "gptq", "gptq", "gptq"]
    assert [rounding_at(r, b) for r in ("gptq", "nearest") for b in (2, 8)] == ["gptq", "gptq", "nearest", "nearest"]
    with pytest.raises(SvdzipError, match="unknown rounding 'GPTQ'"):
        rounding_at("GPTQ", 4)


def test_recipe_rounding_is_checked_labelled_and_old_files_keep_nearest():
    with pytest.raises(SvdzipError, match="unknown rounding 'stochastic'"):
        Recipe(quantize="int4", rounding="stochastic").validate()
    assert Recipe(quantize="int4").label.endswith("hqq-int4")
    assert Recipe(quantize="int4", rounding="nearest").label.endswith("hqq-int4+nearest")
    assert Recipe(quantize="int4", rounding="auto").label.endswith("hqq-int4+auto")
    written = Recipe(quantize="int4", heal="none").to_file_dict()
    written.pop("rounding")
    assert Recipe.from_dict(written).rounding == "nearest"  # a file written before the option
    assert Recipe.from_dict({"quantize": "int4"}).rounding == "choose"  # a hand-written partial recipe
    assert Recipe.from_dict({**written, "rounding": "auto"}).rounding == "auto"
    old_int8 = Recipe(quantize="int8", heal="none", budget_fraction=0.7).to_file_dict()
    old_int8.pop("rounding")
    assert Recipe.from_dict(old_int8).validate().rounding == "choose"  # nothing low-bit: nothing to keep
    with pytest.raises(SvdzipError, match="rounds low-bit weights"):
        Recipe(quantize="int8", rounding="nearest", budget_fraction=0.7).validate()


@pytest.mark.skipif(not lowbit.backend_installed(), reason="hqq is not installed")
def test_the_recipes_rounding_reaches_the_stored_model():
    """`--quantize int3 --rounding nearest` stores HQQ's own words for every matrix; the default (gptq) stores
    other words, in the same format, with less output error on the calibration inputs; `auto` at 2 bits stores
    HQQ's own words."""
    from svdzip import compress

    shape = Shape(vocab=128, hidden=64, intermediate=128, layers=1, randomise=True)
    tokens = tiny_tokens(8, 24, vocab=shape.vocab)
    dense = tiny_model("llama", seed=5, shape=shape)
    names = [n for n, _ in dense.named_modules() if n.endswith("_proj")]
    inputs: dict[str, torch.Tensor] = {}
    hooks = [dense.get_submodule(n).register_forward_hook(
        lambda _m, args, _out, n=n: inputs.__setitem__(n, args[0].reshape(-1, args[0].shape[-1]).double()))
        for n in names]
    with torch.no_grad():
        dense(tokens)
    for h in hooks:
        h.remove()
    stored, error = {}, {}
    for rounding, bits in (("gptq", 3), ("nearest", 3), ("auto", 2)):
        model = tiny_model("llama", seed=5, shape=shape)
        compress(model, Recipe(quantize=f"int{bits}", rounding=rounding, calib_samples=8, calib_seq_len=24,
                               calib_batch_size=4), calib_tokens=tokens)
        found = lowbit.lowbit_linears(model)
        assert set(found) == set(names)
        stored[rounding, bits] = {n: m.weight_packed.words for n, m in found.items()}
        error[rounding, bits] = sum(_output_error(inputs[n], dense.get_submodule(n).weight - m.weight_packed.dequantize(
            torch.float32)) for n, m in found.items())
    for n in names:
        weight = dense.get_submodule(n).weight.detach()
        assert torch.equal(stored["nearest", 3][n], lowbit.quantize(weight, 3).words)
        assert torch.equal(stored["auto", 2][n], lowbit.quantize(weight, 2).words)
        assert stored["gptq", 3][n].shape == stored["nearest", 3][n].shape
        assert not torch.equal(stored["gptq", 3][n], stored["nearest", 3][n])
    assert error["gptq", 3] < 0.9 * error["nearest", 3]


@pytest.mark.skipif(not lowbit.backend_installed(), reason="hqq is not installed")
def test_choose_keeps_the_rounding_whose_stored_model_loses_less_on_heldout_windows():
    """`--rounding choose` at 2 bits plans with gptq and with auto (nearest at 2 bits), stores the
    one with the lower held-out calibration perplexity, and that perplexity is the stored model's own; its words are
    those of the chosen rounding asked for directly. Without 2-bit matrices it compares nothing and needs no
    held-out windows; with them and no held-out windows it is refused before any work."""
    import math

    from svdzip import compress
    from svdzip.allocate.common import heldout_nll

    shape = Shape(vocab=128, hidden=64, intermediate=128, layers=2, randomise=True)
    drawn = tiny_tokens(12, 24, vocab=shape.vocab)
    tokens, heldout = drawn[:8], drawn[8:]
    base = dict(calib_samples=8, calib_seq_len=24, calib_batch_size=4, rounding="choose")
    model = tiny_model("llama", seed=5, shape=shape)
    result = compress(model, Recipe(quantize="int2", **base), calib_tokens=tokens, heldout_tokens=heldout)
    report = result.summary["lowbit"]
    ppl = report["rounding_heldout_ppl"]
    assert set(ppl) == {"gptq", "auto"} and ppl["gptq"] != ppl["auto"]
    # gptq is kept unless auto's held-out perplexity is lower by more than the margin
    assert report["rounding"] == ("auto" if ppl["auto"] < (1 - CHOOSE_MARGIN) * ppl["gptq"] else "gptq")
    assert math.exp(heldout_nll(model, heldout)) == pytest.approx(ppl[report["rounding"]], rel=1e-4)
    twin = tiny_model("llama", seed=5, shape=shape)
    compress(twin, Recipe(quantize="int2", **{**base, "rounding": report["rounding"]}), calib_tokens=tokens)
    for name, m in lowbit.lowbit_linears(model).items():
        assert torch.equal(m.weight_packed.words, lowbit.lowbit_linears(twin)[name].weight_packed.words)

    three = compress(tiny_model("llama", seed=5, shape=shape), Recipe(quantize="int3", **base), calib_tokens=tokens)
    assert three.summary["lowbit"]["rounding"] == "gptq" and "rounding_heldout_ppl" not in three.summary["lowbit"]
    with pytest.raises(SvdzipError, match="--rounding choose: it compares GPTQ's 2-bit rounding"):
        compress(tiny_model("llama", seed=5, shape=shape), Recipe(quantize="int2", **base), calib_tokens=tokens)
