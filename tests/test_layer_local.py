"""Layer-local features: the layer-local gain behind `loss-aware signal=local` (`passes.local_gain`) and
layer-wise healing (`--heal layerwise`, `recover.layerwise`).

The gain is checked against brute force (perturb one linear's output, measure its layer's per-token relative
output change) and through the allocation it drives; the heal one layer at a time, then through the driver:
streamed = in memory, resumed after a fault or a kill, 2 gloo processes = 1, and what it refuses.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_scale import CFG, _assert_same, _checkpoint, _free_port, _logits, killed_run
from tiny_models import VOCAB, WIDE, no_native_bf16, save_tiny, tiny_model, tiny_tokens, write_tiny_corpus
from transformers import AutoModelForCausalLM

from svdzip import Recipe, SvdzipError, compress, load
from svdzip.allocate import AllocationContext, allocate, get_allocator
from svdzip.allocate.common import greedy_loss_allocation
from svdzip.budget import keep_budget
from svdzip.core.distributed import DistContext
from svdzip.core.layerwise import capture_layer_inputs, first_output, run_layer
from svdzip.core.resume import read_checked
from svdzip.engine.driver import CompressRequest, run
from svdzip.engine.pipeline import units_by_layer
from svdzip.methods.materialise import materialise
from svdzip.models.adapter import ModelAdapter
from svdzip.output import io
from svdzip.passes.calibrate import calibrate
from svdzip.passes.local_gain import PROBE_WINDOWS, gain, probe_layer
from svdzip.recover.config import HealConfig
from svdzip.recover.layerwise import LayerwiseHealer, relative_error

#: a few layer-wise heal steps per layer, a step large enough that some layers of the tiny models do improve
HEAL = HealConfig(steps=10, lr=1e-3, eval_every=5)


def _recipe(signal: str | None = "local", heal: str = "none", **over) -> Recipe:
    """CFG with loss-aware ranks on `signal` (None: uniform ranks) and the given recovery."""
    ranks = {"allocator": "uniform"} if signal is None else {"allocator": "loss-aware",
                                                               "allocator_options": {"signal": signal}}
    return Recipe(**{**CFG, **over}, **ranks, heal=heal, healing=HEAL)


def _run(source: Path, out: Path, recipe: Recipe, *, stream: bool = True, run_dir: Path | None = None,
         tokens: torch.Tensor | None = None, ctx: DistContext | None = None, **kw):
    """The driver on a local checkpoint with given calibration tokens (test_scale's `_stream`, any recipe)."""
    request = CompressRequest(model=str(source), recipe=recipe, out=out, stream=stream, resume_dir=run_dir,
                              tokens=tiny_tokens() if tokens is None else tokens, plots=False, **kw)
    return run(request, ctx=ctx or DistContext())


#: deep enough, on enough windows (3 batches to train on, 1 held out), for most layers' heal to be kept
HEALABLE = dict(ratio=0.5, calib_samples=16, calib_batch_size=4)


def _healed(source: Path, out: Path, run_dir: Path | None = None, stream: bool = True, vocab: int = VOCAB):
    """signal=local + layer-wise healing in the HEALABLE setting."""
    return _run(source, out, _recipe(heal="layerwise", **HEALABLE), stream=stream, run_dir=run_dir,
                tokens=tiny_tokens(HEALABLE["calib_samples"], CFG["calib_seq_len"], vocab=vocab))


def _same_outputs(a: Path, b: Path) -> None:
    """Two saved outputs: the same ranks and the same logits."""
    ranks = [{k: v["rank"] for k, v in io.read_manifest(d)["modules"].items()} for d in (a, b)]
    assert ranks[0] == ranks[1]
    torch.testing.assert_close(_logits(load(a, with_tokenizer=False)[0]), _logits(load(b, with_tokenizer=False)[0]),
                               rtol=1e-4, atol=1e-5)


def _phases(out: Path) -> list[dict]:
    return io.read_manifest(out)["details"]["recovery"][0]["phases"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "dense")


# ------------------------------------------------------------------------------- the gain itself
def test_an_empty_probe_stream_gives_zero_sums_for_every_linear():
    """The ranks other than 0 carry no probe stream: zeros, but for every linear (the same all_reduce calls)."""
    model = tiny_model("llama")
    adapter = ModelAdapter(model)
    index = 1
    modules = {info.name: adapter.module(info.name) for info in adapter.layer_linears(index)}
    sums = probe_layer(adapter.layers[index], modules, [], [], 4, index, "cpu")
    assert sorted(sums) == sorted(modules) and len(sums) == 7
    for name, s in sums.items():
        assert s.dtype == torch.float64 and s.shape == (2,), name
        assert torch.equal(s, torch.zeros(2, dtype=torch.float64)), name
        assert gain(s) == 0.0


def _brute_force_gain(layer, module, hidden, kwargs, draws: int = 4, eps: float = 1e-6, seed: int = 0) -> float:
    """Σ_t ‖Δh_t‖²/ms(h_t) / ‖δ‖² for random perturbations δ of `module`'s output (float64: first order exact).

    (= hidden size × the mean over tokens of ‖Δh_t‖²/‖h_t‖² per mean ‖δ_t‖²; the probe's gain has this scale.)"""
    g = torch.Generator().manual_seed(seed)
    num = den = 0.0
    with torch.no_grad():
        base = [first_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs, strict=True)]
        for _ in range(draws):
            for b, (h, kw) in enumerate(zip(hidden, kwargs, strict=True)):
                box = {}

                def perturb(_m, _a, out, box=box):
                    box["delta"] = eps * torch.randn(out.shape, generator=g, dtype=out.dtype)
                    return out + box["delta"]

                handle = module.register_forward_hook(perturb)
                try:
                    out = first_output(layer(h, **kw))
                finally:
                    handle.remove()
                num += float(((out - base[b]).pow(2).sum(-1) / base[b].pow(2).mean(-1)).sum())
                den += float(box["delta"].pow(2).sum())
    return num / den


def _spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def test_local_gain_matches_brute_force_perturbation():
    """probe_layer's E (J_uᵀ r)² = the layer's per-token relative output change per unit of output noise."""
    model = tiny_model("llama").double()
    adapter = ModelAdapter(model)
    windows, batch, index = 16, 4, 1
    inputs = capture_layer_inputs(model, adapter, tiny_tokens(windows, 24), batch, "cpu")
    hidden, kwargs = run_layer(adapter.layers[0], inputs.hidden, inputs.kwargs[0], "cpu"), inputs.kwargs[index]
    layer = adapter.layers[index]
    modules = {info.name: adapter.module(info.name) for info in adapter.layer_linears(index)}
    # several cotangent draws (the seed follows the index argument): an estimate of the expectation
    sums = {name: torch.zeros(2, dtype=torch.float64) for name in modules}
    for draw in range(8):
        got = probe_layer(layer, modules, hidden, kwargs, batch, 100 + draw, "cpu")
        for name in modules:
            sums[name] += got[name]
    probed = {name: gain(s) for name, s in sums.items()}
    brute = {name: _brute_force_gain(layer, mod, hidden, kwargs) for name, mod in modules.items()}
    for name in modules:
        assert probed[name] == pytest.approx(brute[name], rel=0.10), name
    names = list(modules)
    assert _spearman([probed[n] for n in names], [brute[n] for n in names]) >= 0.9
    # the spread is real (attention logits vs the residual writers), so the ranking above says something
    assert max(brute.values()) > 100 * min(brute.values())
    # down_proj writes straight into the layer's output (J = I): its gain is the mean over tokens of 1/ms(h_t)
    out = run_layer(layer, hidden, kwargs, "cpu")
    inverse_ms = float(torch.cat([1.0 / h.pow(2).mean(-1).flatten() for h in out]).mean())
    down = next(n for n in names if n.endswith("down_proj"))
    assert probed[down] == pytest.approx(inverse_ms, rel=0.03)
    assert brute[down] == pytest.approx(inverse_ms, rel=0.03)


def test_probe_sums_do_not_depend_on_how_the_windows_are_batched():
    """Each window's cotangent comes from its own generator, batch b's windows from b·batch_size on: batches of
    1, 2, 3 (the last one short), 4 or 8 over the same 8 windows agree, and every batch is probed."""
    model = tiny_model("llama").double()
    adapter = ModelAdapter(model)
    tokens = tiny_tokens(PROBE_WINDOWS, 24)
    index = 2
    modules = {info.name: adapter.module(info.name) for info in adapter.layer_linears(index)}
    sums = []
    for batch in (1, 2, 3, 4, 8):
        inputs = capture_layer_inputs(model, adapter, tokens, batch, "cpu")
        hidden = inputs.hidden
        for i in range(index):  # the layer's own inputs
            hidden = run_layer(adapter.layers[i], hidden, inputs.kwargs[i], "cpu")
        assert len(hidden) == -(-PROBE_WINDOWS // batch)
        sums.append(probe_layer(adapter.layers[index], modules, hidden, inputs.kwargs[index], batch, index, "cpu"))
    for name, mod in modules.items():
        assert sums[0][name][1] == PROBE_WINDOWS * 24 * mod.out_features  # every token of every batch
        for other in sums[1:]:
            assert other[name][1] == sums[0][name][1]
            torch.testing.assert_close(other[name], sums[0][name], rtol=1e-10, atol=0)


@dataclasses.dataclass
class _Recording(DistContext):
    """A rank of a multi-process run that records its collectives instead of communicating (each reduce is
    the identity: the returned statistics are this rank's own part)."""

    calls: list = dataclasses.field(default_factory=list)

    def barrier(self) -> None:
        self.calls.append(("barrier",))

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        self.calls.append(("all_reduce", op, tuple(tensor.shape), tensor.dtype))
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        self.calls.append(("broadcast", src, tuple(tensor.shape)))
        return tensor


def _split_calibration(windows: int, batch: int, world: int = 2):
    model = tiny_model("llama")
    adapter = ModelAdapter(model)
    tokens = tiny_tokens(windows, 24)
    one = calibrate(model, adapter, tokens, batch, "cpu", ("local",))
    ranks = [_Recording(rank=r, world_size=world) for r in range(world)]
    parts = [calibrate(model, adapter, tokens, batch, "cpu", ("local",), ctx=ctx) for ctx in ranks]
    return adapter, one, ranks, parts


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("windows", [8, 16])
def test_every_rank_makes_the_same_collective_calls(windows, world):
    """With 16 windows the ranks other than 0 hold none of the first PROBE_WINDOWS: they must reduce all the same."""
    adapter, _, ranks, _ = _split_calibration(windows, 2, world)
    local = ("all_reduce", "sum", (2,), torch.float64)  # one [Σ g², count] per linear
    assert ranks[0].calls.count(local) == len(list(adapter.linears())) > 0
    for other in ranks[1:]:
        assert other.calls == ranks[0].calls


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("windows,batch", [(8, 2), (16, 2), (12, 4), (16, 16)])
def test_local_sums_of_a_split_equal_one_process(windows, batch, world):
    """The probe stream is the first PROBE_WINDOWS windows, on rank 0 only: the ranks' parts add up to one
    process's sums exactly, whatever the split's batch boundaries."""
    adapter, one, _, parts = _split_calibration(windows, batch, world)
    assert len(one.local) == len(list(adapter.linears()))
    for name, total in one.local.items():
        # the probe set, and only it, was probed whole (a batch wider than it is cut to it)
        assert total[1] == min(windows, PROBE_WINDOWS) * 24 * adapter.module(name).out_features, name
        assert total[0] > 0, name
        for part in parts[1:]:  # zeros, for every linear
            assert torch.equal(part.local[name], torch.zeros(2, dtype=torch.float64)), name
        added = sum(p.local[name] for p in parts)
        torch.testing.assert_close(added, total, rtol=1e-9, atol=0)


# --------------------------------------------------------------------------- the gain, allocated
@pytest.fixture(scope="module")
def local_run():
    """A tiny llama compressed in memory with signal=local, its dense copy and the calibration tokens."""
    dense = tiny_model("llama")
    tokens = tiny_tokens()
    result = compress(copy.deepcopy(dense), _recipe(), calib_tokens=tokens)
    return dense, tokens, result


def _brute_force_gains(dense, tokens) -> dict[str, float]:
    """Every linear's brute-force gain, each layer on the dense stream (as calibration sees it)."""
    model = copy.deepcopy(dense).double()
    adapter = ModelAdapter(model)
    inputs = capture_layer_inputs(model, adapter, tokens, CFG["calib_batch_size"], "cpu")
    hidden, gains = inputs.hidden, {}
    for index in range(adapter.num_layers):
        layer = adapter.layers[index]
        for info in adapter.layer_linears(index):
            gains[info.name] = _brute_force_gain(layer, adapter.module(info.name), hidden, inputs.kwargs[index],
                                                 draws=2)
        hidden = run_layer(layer, hidden, inputs.kwargs[index], "cpu")
    return gains


def test_local_ranks_nearly_minimise_the_brute_force_loss(local_run):
    """Σ_u g_u·tail_u(k_u) with brute-force gains g: the local ranks come within 15 % of that objective's own
    optimum (the same greedy on the brute-force gains), where uniform and whitened ranks are > 10× off."""
    dense, tokens, result = local_run
    units = result.units
    assert all(u.extras["local_gain"] > 0 for u in units)
    brute = _brute_force_gains(dense, tokens)
    weights = [brute[u.name] for u in units]

    def loss(ranks) -> float:
        return sum(w * (0.0 if r is None else u.spectrum.tail(r)) for w, u, r in zip(weights, units, ranks,
                                                                                       strict=True))

    ctx = AllocationContext(ratio=CFG["ratio"], budget=keep_budget(sum(u.dense_params for u in units), CFG["ratio"]))
    best = loss(greedy_loss_allocation(units, weights, ctx.budget))
    local = [result.ranks[u.name] for u in units]
    assert allocate("loss-aware", units, dataclasses.replace(ctx, options={"signal": "local"})).ranks == local
    local = loss(local)
    others = {name: loss(allocate(allocator, units, dataclasses.replace(ctx, options=options)).ranks)
              for name, allocator, options in (("uniform", "uniform", {}),
                                               ("whitened", "loss-aware", {"signal": "whitened"}))}
    assert best <= local <= 1.15 * best
    assert min(others.values()) > 10 * local, others


def test_larger_gain_keeps_more_rank_at_equal_spectra(local_run):
    """Three same-shaped units with one spectrum: the allocation follows their gains, and permuting the gains
    permutes the ranks."""
    _, _, result = local_run
    downs = [u for u in result.units if u.name.endswith("down_proj")]
    assert len(downs) == 3
    spectrum = downs[1].spectrum
    base = sum(u.extras["local_gain"] for u in downs) / 3

    def ranks_for(factors):
        units = [dataclasses.replace(u, spectrum=spectrum, extras={"local_gain": base * f})
                 for u, f in zip(downs, factors, strict=True)]
        ctx = AllocationContext(ratio=0.5, budget=keep_budget(sum(u.dense_params for u in units), 0.5),
                                options={"signal": "local"})
        full = units[0].max_rank + 1  # dense counts as more than any rank
        return [full if r is None else r for r in allocate("loss-aware", units, ctx).ranks]

    rising = ranks_for([1.0, 10.0, 100.0])
    assert rising[0] <= rising[1] <= rising[2] and rising[0] < rising[2], rising
    assert ranks_for([100.0, 1.0, 10.0]) == [rising[2], rising[0], rising[1]]
    assert len(set(ranks_for([1.0, 1.0, 1.0]))) <= 2  # equal gains: equal ranks (up to the last step)


def test_down_proj_gain_of_a_run_is_its_layers_inverse_mean_square(local_run):
    """What the driver attaches to the units: for down_proj (J = I) the mean over the probed tokens of
    1/ms(h_t) of its layer's dense output."""
    dense, tokens, result = local_run
    adapter = ModelAdapter(dense)
    inputs = capture_layer_inputs(dense, adapter, tokens[:PROBE_WINDOWS], CFG["calib_batch_size"], "cpu")
    hidden = inputs.hidden
    gains = {u.name: u.extras["local_gain"] for u in result.units}
    for index in range(adapter.num_layers):
        hidden = run_layer(adapter.layers[index], hidden, inputs.kwargs[index], "cpu")
        inverse_ms = float(torch.cat([1.0 / h.pow(2).mean(-1).flatten() for h in hidden]).mean())
        assert gains[f"model.layers.{index}.mlp.down_proj"] == pytest.approx(inverse_ms, rel=0.08), index


# ------------------------------------------------------------------------------ modes and needs
def test_signal_local_runs_streamed_where_fisher_is_refused(ckpt, tmp_path):
    local = get_allocator("loss-aware").needs({"signal": "local"})
    fisher = get_allocator("loss-aware").needs({"signal": "fisher"})
    assert local.statistics == {"local"} and local.streamable and local.distributable
    assert not fisher.streamable
    res = _run(ckpt, tmp_path / "local", _recipe())
    uniform = _run(ckpt, tmp_path / "uniform", _recipe(None))
    assert res.ranks != uniform.ranks  # the gains were there and changed the allocation
    with pytest.raises(SvdzipError, match="--stream"):
        _run(ckpt, tmp_path / "fisher", _recipe("fisher"))
    assert not (tmp_path / "fisher").exists()


def test_a_run_directory_without_the_local_kind_is_recalibrated(ckpt, tmp_path, caplog):
    run_dir = tmp_path / "run"
    _run(ckpt, tmp_path / "uniform", _recipe(None), run_dir=run_dir)
    layer0 = run_dir / "calib" / "layer_00000.safetensors"
    assert not any(k.startswith("local/") for k in read_checked(layer0)[0])
    with caplog.at_level(logging.WARNING, logger="svdzip"):
        resumed = _run(ckpt, tmp_path / "resumed", _recipe(), run_dir=run_dir)
    assert "lack local" in caplog.text
    assert any(k.startswith("local/") for k in read_checked(layer0)[0])
    fresh = _run(ckpt, tmp_path / "fresh", _recipe(), run_dir=tmp_path / "run-fresh")
    assert resumed.ranks == fresh.ranks
    _same_outputs(tmp_path / "resumed", tmp_path / "fresh")


# ------------------------------------------------------------------------- layer-wise healing
@pytest.fixture(scope="module")
def heal_setup():
    """A tiny llama, 32 calibration windows in batches of 8 (3 to train on, 1 held out) and its units at a
    ratio deep enough for healing to have something to win back."""
    dense = tiny_model("llama")
    tokens = tiny_tokens(32, 24)
    recipe = Recipe.plain(ratio=0.5, calib_samples=32, calib_seq_len=24, calib_batch_size=8)
    result = compress(copy.deepcopy(dense), recipe, calib_tokens=tokens)
    units = result.units
    return dense, tokens, units, [result.ranks[u.name] for u in units]


def _heal_first_layer(heal_setup, lr: float | None, steps: int = 40, **options):
    """Layer 0 through LayerwiseHealer; returns its record, the layer, the factors as materialised and the held-out
    relative error measured here before and after."""
    dense, tokens, units, ranks = heal_setup
    model = copy.deepcopy(dense)
    adapter = ModelAdapter(model)
    inputs = capture_layer_inputs(model, adapter, tokens, 8, "cpu")
    layer = adapter.layers[0]
    x, kw = inputs.hidden[-1], inputs.kwargs[0][-1]  # the held-out batch
    with torch.no_grad():
        target = first_output(layer(x, **kw))
    mine = units_by_layer(units)[0]
    seen = {}

    def build():
        rows = materialise(adapter, [units[u] for u in mine], [ranks[u] for u in mine])
        seen["params"] = {n: p.detach().clone() for n, p in layer.named_parameters()}
        with torch.no_grad():
            seen["before"] = float(relative_error(first_output(layer(x, **kw)), target))
        return rows

    healer = LayerwiseHealer(inputs, HealConfig(method="layerwise", steps=steps, lr=lr, eval_every=5,
                                                **options).validate(),
                             "cpu")
    healer.layer(0, layer, build)
    with torch.no_grad():
        after = float(relative_error(first_output(layer(x, **kw)), target))
    return healer.layers[-1], layer, seen["params"], seen["before"], after


def test_one_layer_of_healing_lowers_its_heldout_error(heal_setup):
    record, layer, materialised, before, after = _heal_first_layer(heal_setup, lr=1e-3)
    assert record["kept"] and record["steps"] == 40
    assert record["before"] == pytest.approx(before, rel=1e-6)
    assert record["after"] == pytest.approx(after, rel=1e-6)
    assert after < 0.97 * before
    params = dict(layer.named_parameters())
    factors = [n for n in params if n.endswith(("left.weight", "right.weight"))]
    assert len(factors) == 14 and record["params"] == sum(params[n].numel() for n in factors)
    assert all(not torch.equal(params[n], materialised[n]) for n in factors)  # every factor trained
    for name, p in params.items():  # nothing else: norms, biases
        if name not in factors:
            assert torch.equal(p, materialised[name]), name
        assert p.requires_grad and p.grad is None  # flags given back, no gradients left behind


def test_a_heal_that_would_hurt_keeps_the_unhealed_factors(heal_setup, caplog):
    with caplog.at_level(logging.WARNING, logger="svdzip"):
        record, layer, materialised, before, after = _heal_first_layer(heal_setup, lr=10.0)
    assert record["kept"] is False
    assert record["before"] == record["after"] == pytest.approx(before, rel=1e-6)
    assert after == before
    for name, p in layer.named_parameters():
        assert torch.equal(p, materialised[name]), name  # bit for bit
    assert "un-healed factors are kept" in caplog.text


def test_a_layer_no_rate_heals_hands_its_starting_rate_to_the_next(heal_setup):
    """Every searched rate fails: the record says the last rate tried, and the next layer (and a resumed run,
    which reads `lr_next`) starts where this one did, not 9× lower."""
    record, layer, materialised, before, after = _heal_first_layer(heal_setup, lr=10.0, auto_lr=True, max_backoffs=2,
                                                                   steps=10)
    assert record["kept"] is False and record["backoffs"] == 2
    assert record["lr"] == pytest.approx(10.0 / 9) and record["lr_next"] == 10.0


def test_a_searched_learning_rate_backs_off_until_the_heal_helps(heal_setup):
    """Without --heal-lr a rate too large is undone and divided by 3 until the layer's held-out error falls."""
    record, layer, materialised, before, after = _heal_first_layer(heal_setup, lr=10.0, auto_lr=True,
                                                                   max_backoffs=10)
    assert record["kept"] and after < before and 0 < record["backoffs"] <= 10
    assert record["lr"] == record["lr_next"] == pytest.approx(10.0 / 3.0 ** record["backoffs"])
    # the tries before stopped early on a non-finite loss or ran in full; the last, at the rate that helped, in full
    assert 40 < record["steps"] <= 40 * (record["backoffs"] + 1)


def test_the_default_layerwise_rate_starts_from_the_first_layers_factors(heal_setup):
    """No --heal-lr: the first layer's heal starts at lr_per_rms × the median RMS of that layer's factors."""
    record, layer, materialised, before, after = _heal_first_layer(heal_setup, lr=None, steps=10, max_backoffs=0)
    rms = [float(p.pow(2).mean().sqrt()) for n, p in materialised.items()
           if n.endswith(("left.weight", "right.weight"))]
    assert record["lr"] == pytest.approx(1.17e-2 * float(torch.tensor(rms).median()))


@pytest.mark.parametrize("family", ["llama-checkpoint", "qwen2"])
def test_layerwise_heal_streamed_equals_in_memory(family, ckpt, tmp_path):
    if family == "qwen2":  # q/k/v biases, randomised norms
        source, vocab = save_tiny(tmp_path / "dense", "qwen2", shape=WIDE), WIDE.vocab
    else:
        source, vocab = ckpt, VOCAB
    ref = compress(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval(),
                   _recipe(heal="layerwise", **HEALABLE),
                   calib_tokens=tiny_tokens(HEALABLE["calib_samples"], CFG["calib_seq_len"], vocab=vocab))
    res = _healed(source, tmp_path / "out", vocab=vocab)
    assert res.ranks == ref.ranks
    _assert_same(tmp_path / "out", ref)
    phases = _phases(tmp_path / "out")
    assert [p["layer"] for p in phases] == list(range(len(phases)))
    assert phases[0]["kept"]  # trained layers are part of the comparison
    assert ref.summary["heal"]["improved"]


@pytest.mark.parametrize("stream", [True, False])
def test_layerwise_heal_resumes_after_a_fault(ckpt, tmp_path, monkeypatch, caplog, stream):
    _healed(ckpt, tmp_path / "whole", stream=stream)
    assert [p["kept"] for p in _phases(tmp_path / "whole")][:2] == [True, True]  # restoring them matters
    monkeypatch.setenv("SVDZIP_FAULT", "heal:1")
    with pytest.raises(RuntimeError, match="injected fault after heal 1"):
        _healed(ckpt, tmp_path / "out", tmp_path / "run", stream=stream)
    assert not (tmp_path / "out").exists()
    monkeypatch.delenv("SVDZIP_FAULT")
    with caplog.at_level(logging.INFO, logger="svdzip"):
        _healed(ckpt, tmp_path / "out", tmp_path / "run", stream=stream)
    assert "layer-wise healing resumes after layer 1" in caplog.text
    assert [bool(p.get("restored")) for p in _phases(tmp_path / "out")] == [True, True, False, False]
    _same_outputs(tmp_path / "out", tmp_path / "whole")


def test_layerwise_heal_resumes_after_a_kill(ckpt, tmp_path):
    """Killed hard (no cleanup) right after healing layer 1; the same call continues from layer 2."""
    _healed(ckpt, tmp_path / "whole")
    killed_run("test_layer_local", "_healed", (ckpt, tmp_path / "out", tmp_path / "run"), "heal:1:kill")
    assert not (tmp_path / "out").exists()
    streams = read_checked(tmp_path / "run" / "layerwise" / "streams.safetensors")
    assert streams is not None and streams[1]["layer"] == 1
    _healed(ckpt, tmp_path / "out", tmp_path / "run")
    assert [bool(p.get("restored")) for p in _phases(tmp_path / "out")] == [True, True, False, False]
    _same_outputs(tmp_path / "out", tmp_path / "whole")


def test_restart_does_not_restore_another_models_healed_layers(tmp_path, monkeypatch):
    """--restart wipes RUN/layerwise (and RUN/heal) too: heal_key does not cover the model, so another model
    with the same (uniform) ranks would otherwise get the old model's healed layers 0–1."""
    first, second = save_tiny(tmp_path / "a", seed=0), save_tiny(tmp_path / "b", seed=1)
    recipe = _recipe(None, heal="layerwise")
    monkeypatch.setenv("SVDZIP_FAULT", "heal:1")
    with pytest.raises(RuntimeError, match="injected fault"):
        _run(first, tmp_path / "out-a", recipe, run_dir=tmp_path / "run")
    assert (tmp_path / "run" / "layerwise").is_dir()  # something the restart has to wipe
    monkeypatch.delenv("SVDZIP_FAULT")
    _run(second, tmp_path / "out-b", recipe, run_dir=tmp_path / "run", restart=True)
    _run(second, tmp_path / "fresh-b", recipe)
    assert not any(p.get("restored") for p in _phases(tmp_path / "out-b"))
    _same_outputs(tmp_path / "out-b", tmp_path / "fresh-b")


# -------------------------------------------------------------------------------------- refusals
def test_layerwise_refusals(ckpt, tmp_path):
    from svdzip.cli import build_parser

    for over, match in (({"group_size": 2}, "group-size"), ({"update": "svdllm"}, "--update")):
        with pytest.raises(SvdzipError, match=match):
            _run(ckpt, tmp_path / "out", _recipe(heal="layerwise", **over))
        assert not (tmp_path / "out").exists()
    with pytest.raises(SvdzipError, match="mse"):
        HealConfig(method="layerwise", objective="kl").validate()
    with pytest.raises(SvdzipError, match="mse"):
        HealConfig(method="distill", objective="mse").validate()
    parser = build_parser()
    assert vars(parser.parse_args(["compress", "--out", "o", "--heal", "layerwise"]))["recipe.heal"] == "layerwise"
    assert parser.parse_args(["heal", "d", "--out", "o", "--heal", "seq-lora"]).heal == "seq-lora"
    with pytest.raises(SystemExit) as info:  # a saved directory has no dense layers to heal against
        parser.parse_args(["heal", "d", "--out", "o", "--heal", "layerwise"])
    assert info.value.code == 2


def test_heal_directory_refuses_layerwise_up_front(tmp_path):
    """heal() (behind heal_directory, the Python side of `svdzip heal`) refuses a layer-local method before it
    looks at anything else, rather than treating it as seq-lora and failing on an internal error."""
    from svdzip.recover.directory import heal_directory
    from svdzip.recover.heal import heal

    source = save_tiny(tmp_path / "dense")
    _run(source, tmp_path / "compressed", _recipe(None), stream=False)
    corpus = write_tiny_corpus(tmp_path / "corpus.txt")
    config = HealConfig(method="layerwise", steps=2, seq_len=16, train_samples=4, heldout_samples=2,
                        corpus=str(corpus))
    with pytest.raises(SvdzipError, match="layerwise") as info:
        heal_directory(tmp_path / "compressed", tmp_path / "healed", config)
    assert "internal" not in str(info.value)
    assert not (tmp_path / "healed").exists()
    # up front: not even the student (not an svdzip model here) or the windows are looked at
    with pytest.raises(SvdzipError, match="layerwise"):
        heal(torch.nn.Linear(2, 2), None, (None, None), config)
    # where the other methods do look at the student
    seq = dataclasses.replace(config, method="seq-lora", objective=HealConfig().objective)
    with pytest.raises(SvdzipError, match="no factorised linears"):
        heal(torch.nn.Linear(2, 2), None, (None, None), seq)


# ----------------------------------------------------------------------------------- distributed
def _gloo_worker(rank: int, world: int, port: int, tmp: str, source: str) -> None:
    no_native_bf16()
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ctx = DistContext(rank=rank, world_size=world, backend="gloo")
    recipe = _recipe(heal="layerwise")
    for stream in (False, True):
        name = "stream" if stream else "mem"
        result = _run(Path(source), Path(tmp) / name, recipe, stream=stream, run_dir=Path(tmp) / f"run-{name}",
                      ctx=ctx)
        if rank == 0:
            (Path(tmp) / f"{name}.json").write_text(json.dumps(result.ranks))
        else:
            assert result is None
    dist.destroy_process_group()


def test_two_gloo_processes_equal_one_for_signal_local(ckpt, tmp_path):
    """signal=local's gains are all-reduced per layer; the layer-wise heal runs on rank 0."""
    recipe = _recipe(heal="layerwise")
    ref = compress(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval(), recipe,
                   calib_tokens=tiny_tokens())
    mp.start_processes(_gloo_worker, args=(2, _free_port(), str(tmp_path), str(ckpt)), nprocs=2,
                       start_method="spawn", join=True)
    for name in ("mem", "stream"):
        assert json.loads((tmp_path / f"{name}.json").read_text()) == ref.ranks
        _assert_same(tmp_path / name, ref)
    assert ref.ranks != compress(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval(),
                                 _recipe(None), calib_tokens=tiny_tokens()).ranks


def test_spectra_given_without_gains_get_them_from_the_statistics(ckpt):
    """A sweep hands the spectra of a uniform cell to a signal=local cell: the gains are computed and attached,
    and the ranks are those of a run that computed everything itself."""
    from svdzip.output.loading import load_model
    from svdzip.passes.calibrate import collect_statistics

    tokens = tiny_tokens()
    first = compress(load_model(str(ckpt), "cpu", with_tokenizer=False)[0], _recipe(None), calib_tokens=tokens,
                     stats=collect_statistics(load_model(str(ckpt), "cpu", with_tokenizer=False)[0], tokens, 2))
    assert all("local_gain" not in u.extras for u in first.units)
    fresh = compress(load_model(str(ckpt), "cpu", with_tokenizer=False)[0], _recipe(), calib_tokens=tokens)
    reused = compress(load_model(str(ckpt), "cpu", with_tokenizer=False)[0], _recipe(), calib_tokens=tokens,
                      units=first.units)
    assert reused.ranks == fresh.ranks and reused.ranks != first.ranks
