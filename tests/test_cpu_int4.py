"""torch's CPU int4 kernel serving HQQ-packed weights (`output.cpu_int4`, `LowBitLinear._kernel_serves`): the
planes hold exactly the stored codes, the product is (q − z)·s times x within bf16's rounding, and the stored
format, the float32 path and training are untouched by it."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import Shape, tiny_model, tiny_tokenizer, tiny_tokens
from torch import nn

import svdzip
from svdzip import Recipe, compress
from svdzip.output import cpu_int4, lowbit
from svdzip.output.lowbit import LowBitLinear, lowbit_linears

pytestmark = [pytest.mark.skipif(not (lowbit.backend_installed() and cpu_int4.available()),
                                 reason="hqq or torch's CPU int4 kernel is missing"),
              pytest.mark.usefixtures("one_thread")]

GROUP = 64


def _grid(rows: int, cols: int, bits: int, seed: int, zero_at: float | None = None):
    """Random codes with a per-group scale and zero point (w = (q − z)·s, groups of 64 along each row)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (rows, cols), generator=g, dtype=torch.uint8)
    groups = rows * cols // GROUP
    scale = (torch.rand(groups, 1, generator=g) + 0.5) / 2 ** bits
    zero = (torch.rand(groups, 1, generator=g) * (2 ** bits - 1) if zero_at is None
            else torch.full((groups, 1), zero_at))
    return codes, scale.to(torch.bfloat16), zero.to(torch.bfloat16)


def _dequantized(codes, scale, zero) -> torch.Tensor:
    rows, cols = codes.shape
    q = codes.double().reshape(-1, GROUP)
    return ((q - zero.double()) * scale.double()).reshape(rows, cols)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_planes_hold_the_codes_exactly(bits):
    codes, scale, zero = _grid(128, 192, bits, seed=bits)
    words, meta = cpu_int4.planes(codes, scale, zero, bits, GROUP)
    assert words.shape == ((2 if bits == 8 else 1), 128, 96) and words.dtype == torch.uint8
    assert torch.equal(cpu_int4.codes(words, bits), codes)
    # the dequantized planes are (q − z)·s up to the bf16 rounding of the scales and offsets
    exact = _dequantized(codes, scale, zero)
    assert (cpu_int4.dequantize(words, meta, GROUP).double() - exact).abs().max() <= 0.02 * exact.abs().max()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("zero_at", [None, 0.0])  # a zero point far from the codes' middle: the offset is large
def test_kernel_product_is_the_dequantized_product_within_bf16(bits, zero_at):
    codes, scale, zero = _grid(64, 256, bits, seed=10 + bits, zero_at=zero_at)
    words, meta = cpu_int4.planes(codes, scale, zero, bits, GROUP)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    exact = x.double() @ _dequantized(codes, scale, zero).T
    got = cpu_int4.matmul(x, words, meta, GROUP)
    assert got.dtype == torch.bfloat16 and got.shape == (5, 64)
    strided = x.t().contiguous().t()  # the same values, not contiguous (as a last-token slice gives the head)
    assert not strided.is_contiguous() and torch.equal(cpu_int4.matmul(strided, words, meta, GROUP), got)
    # a dense bf16 matmul of the same weight is the yardstick: the kernel may be as far off as its rounding
    dense = nn.functional.linear(x, _dequantized(codes, scale, zero).to(torch.bfloat16))
    bound = 3 * (dense.double() - exact).abs().max() + 1e-3 * exact.abs().max()
    assert (got.double() - exact).abs().max() <= bound
    # many rows (a prompt) take the dequantized weight and a bf16 matmul: the same product within bf16
    many = x.repeat(cpu_int4.DEQUANTIZE_FROM_ROWS, 1)
    assert ((cpu_int4.matmul(many, words, meta, GROUP)[:5].double() - exact).abs().max() <= bound)


def test_supported_shapes():
    assert cpu_int4.available()  # this torch tiles as `unpack` reads
    assert cpu_int4.supported(64, 128, 4, 64) and cpu_int4.supported(64, 128, 8, 64)
    assert not cpu_int4.supported(48, 128, 4, 64)  # rows: the layout tiles by 64
    assert not cpu_int4.supported(64, 96, 4, 64)  # whole groups along each row
    assert not cpu_int4.supported(64, 128, 4, 48)  # a group size the kernel does not take


@pytest.mark.parametrize("bits", [3, 8])
def test_lowbit_linear_serves_bf16_inference_through_the_kernel_and_saves_what_it_stored(bits):
    torch.manual_seed(bits)
    linear = nn.Linear(128, 64, bias=True)
    module = LowBitLinear.from_linear(linear, bits).eval()
    stored = {k: v.clone() for k, v in module.state_dict().items()}
    x = torch.randn(3, 128)
    with torch.no_grad():
        wide = module(x)  # float32: the dequantized path, the reference every perplexity was measured with
        assert module.kernel_words is None and module.packed is not None
        narrow = module(x.to(torch.bfloat16))
    assert module.packed is None and module.kernel_words is not None  # one copy of the weight in memory
    assert narrow.dtype == torch.bfloat16
    assert (narrow.float() - wide).abs().max() < 0.02 * wide.abs().max()
    assert module.stored_bytes == lowbit.packed_bytes(64, 128, bits)
    # the state dict is HQQ's format, bit for bit, whichever form served
    again = module.state_dict()
    assert set(again) == set(stored) and all(torch.equal(again[k], stored[k]) for k in stored)
    with torch.no_grad():
        assert torch.equal(module(x), wide)  # float32 again: the words restored exactly


def test_a_gradient_through_the_input_takes_the_dequantized_path():
    module = LowBitLinear.from_linear(nn.Linear(128, 64), 4).eval()
    x = torch.randn(2, 128, dtype=torch.bfloat16, requires_grad=True)
    module(x).sum().backward()  # the kernel has no backward: training must not reach it
    assert x.grad is not None and module.kernel_words is None


SHAPE = Shape(vocab=128, hidden=64, intermediate=128, layers=1, randomise=True)


def _int4_directory(out):
    """A tiny llama at 4 bits with rank-8 compensations, saved in bf16."""
    tokens = tiny_tokens(8, 24, vocab=SHAPE.vocab)
    compress(tiny_model("llama", seed=2, shape=SHAPE), Recipe(quantize="int4", compensate=8, calib_samples=8,
             calib_seq_len=24, calib_batch_size=4, storage_dtype="bfloat16"), calib_tokens=tokens, out=out)
    return tokens


def test_a_model_loaded_in_bf16_decodes_through_the_kernel_and_saves_unchanged(tmp_path):
    out = tmp_path / "int4"
    tokens = _int4_directory(out)
    wide, _ = svdzip.load(out, with_tokenizer=False)
    model, _ = svdzip.load(out, dtype=torch.bfloat16, with_tokenizer=False)
    found = lowbit_linears(model)
    assert found and all(m.rank == 8 for m in found.values())
    with torch.no_grad():
        ref = wide(tokens[:2]).logits
        got = model(tokens[:2]).logits
        generated = model.generate(tokens[:1, :4], max_new_tokens=3, do_sample=False)
    takes = {n: cpu_int4.supported(m.out_features, m.in_features, m.bits, m.group_size) for n, m in found.items()}
    assert any(takes.values()) and not all(takes.values())  # k/v (32 rows) stay on the dequantized path
    assert all((found[n].kernel_words is not None) == kernel for n, kernel in takes.items())
    assert generated.shape == (1, 7)
    assert (got.float() - ref).abs().max() < 0.05 * ref.abs().max()
    again = tmp_path / "again"
    model.save_pretrained(again)
    reloaded, _ = svdzip.load(again, with_tokenizer=False)
    for name, m in lowbit_linears(reloaded).items():
        twin = lowbit_linears(wide)[name]
        assert torch.equal(m.packed, twin.packed) and torch.equal(m.scale, twin.scale)


def test_cli_eval_in_bf16_times_the_kernel(tmp_path, monkeypatch, capsys):
    """`svdzip eval DIR --dtype bfloat16 --speed`: the low-bit linears run through the kernel (float32: they do not)."""
    from svdzip.cli import main

    out = tmp_path / "int4"
    _int4_directory(out)
    tiny_tokenizer(SHAPE.vocab).save_pretrained(out)  # eval reads the directory's tokenizer
    calls = []
    real = cpu_int4.matmul
    monkeypatch.setattr(cpu_int4, "matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    flags = ["--corpora", "", "--speed", "--speed-batches", "1", "--speed-seq-lens", "8", "--speed-new-tokens",
             "2", "--speed-repeats", "1", "--json"]
    assert main(["eval", str(out), *flags]) == 0 and not calls
    capsys.readouterr()
    assert main(["eval", str(out), "--dtype", "bfloat16", *flags]) == 0 and calls
    assert json.loads(capsys.readouterr().out)["speed"]["results"][str(out)]


def test_loading_a_state_dict_into_a_serving_module_replaces_the_planes():
    """After a bf16 forward the words are released; loading another weight's state must not keep the old planes."""
    torch.manual_seed(0)
    serving = LowBitLinear.from_linear(nn.Linear(128, 64), 4).eval()
    other = LowBitLinear.from_linear(nn.Linear(128, 64), 4).eval()
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        serving(x)
        assert serving.packed is None
        serving.load_state_dict(other.state_dict())
        assert torch.equal(serving(x), other(x))


def test_training_and_autocast_stay_on_the_dequantized_path():
    module = LowBitLinear.from_linear(nn.Linear(128, 64), 4)
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        module.train()
        module(x)
        module.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            module(x)
    assert module.kernel_words is None and module.packed is not None
