"""Scale and survive: two gloo processes = one, resume after a fault or a kill, corrupted state,
streaming = in memory, a failed save keeps the previous output, provenance in the manifest."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from tiny_models import FLOAT32_CPU, WIDE, no_native_bf16, save_tiny, tiny_model, tiny_tokenizer, tiny_tokens
from transformers import AutoModelForCausalLM, LlamaConfig

import svdzip.engine.writer as writer_mod
import svdzip.passes.calibrate as calibrate_mod
import svdzip.passes.spectra as spectra_mod
from svdzip import Recipe, SvdzipError, compress, load
from svdzip.core.distributed import DistContext, assign_by_cost
from svdzip.core.resume import RunState
from svdzip.engine.driver import CompressRequest, run
from svdzip.output import io

CFG = dict(ratio=0.3, calib_samples=8, calib_seq_len=24, calib_batch_size=2)
PROBE = tiny_tokens(2, 16, seed=5)


def _config() -> Recipe:
    return Recipe.plain(**CFG)


def _checkpoint(path: Path) -> Path:
    """A LLaMA-shaped checkpoint with an untied head (so the head is streamed too), 4 layers."""
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _reference(source: Path):
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    return compress(model, _config(), calib_tokens=tiny_tokens())


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROBE).logits


def _stream(source: Path, out: Path, run_dir: Path | None, stream: bool = True, ctx: DistContext | None = None,
            **kw):
    """The CLI's driver on a local checkpoint with given calibration tokens."""
    request = CompressRequest(model=str(source), recipe=_config(), out=out, stream=stream, resume_dir=run_dir,
                              tokens=tiny_tokens(), plots=False, **kw)
    return run(request, ctx=ctx or DistContext())


def killed_run(module: str, function: str, paths: tuple[Path, ...], fault: str) -> None:
    """`module.function(*paths)` in a fresh process that `SVDZIP_FAULT=fault` kills hard (exit 137, no cleanup)."""
    args = ", ".join(f"Path({str(p)!r})" for p in paths)
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n{FLOAT32_CPU}"
              f"from pathlib import Path\nfrom {module} import {function}\n{function}({args})\n")
    env = {**os.environ, "SVDZIP_FAULT": fault, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert proc.returncode == 137, proc.stderr.decode()[-2000:]


def _assert_same(out: Path, ref) -> None:
    model, _ = load(out, with_tokenizer=False)
    torch.testing.assert_close(_logits(model), _logits(ref.model), rtol=1e-4, atol=1e-5)
    manifest = io.read_manifest(out)
    assert {k: v["rank"] for k, v in manifest["modules"].items()} == {k: v for k, v in ref.ranks.items() if v}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> tuple[Path, object]:
    path = _checkpoint(tmp_path_factory.mktemp("ckpt") / "dense")
    return path, _reference(path)


# ------------------------------------------------------------------------------------------ units
def test_assign_by_cost_balances_and_is_deterministic():
    costs = [9.0, 7.0, 5.0, 3.0, 3.0, 1.0]
    owners = assign_by_cost(costs, 2)
    assert owners == assign_by_cost(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in (0, 1)]
    assert max(loads) <= 4 / 3 * sum(costs) / 2  # LPT's guarantee


# ------------------------------------------------------------------------------------- streaming
def test_streaming_equals_in_memory(ckpt, tmp_path):
    source, ref = ckpt
    res = _stream(source, tmp_path / "out", tmp_path / "run")
    assert res.ranks == ref.ranks
    _assert_same(tmp_path / "out", ref)
    shards = sorted((tmp_path / "out").glob("model-*.safetensors"))
    held = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    # one shard per decoder layer, then one per remaining tensor (embeddings, final norm, untied head)
    assert [sorted({k.split(".")[2] for k, v in held.items() if v == s.name}) for s in shards[:4]] == [
        ["0"], ["1"], ["2"], ["3"]]
    assert sorted(k for k, v in held.items() if v in {s.name for s in shards[4:]}) == [
        "lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    assert len(shards) == 7 and all(list(held.values()).count(s.name) == 1 for s in shards[4:])


def test_a_streamed_resume_restores_spectra_without_their_bases(tmp_path, monkeypatch):
    """A resumed streamed run reads σ² and the basis's shape of each finished unit, not the basis: the writer reads
    it again when its layer is written (all of a 1.5B's bases held at once were its extra GiB)."""
    import svdzip.core.resume as resume_mod
    from svdzip.methods.decompose import group_linears
    from svdzip.models.adapter import ModelAdapter
    from svdzip.passes.calibrate import collect_statistics

    model = tiny_model("llama")
    adapter, state = ModelAdapter(model), RunState(tmp_path / "run", {"test": 1})
    stats = collect_statistics(model, tiny_tokens(), 4, "cpu")
    groups = group_linears(adapter)
    first = spectra_mod.decompose_units(adapter, stats, _config(), groups, on_disk=True, state=state)

    def no_full_read(*_a, **_k):
        raise AssertionError("a basis was read")

    monkeypatch.setattr(resume_mod, "load_file", no_full_read)
    again = spectra_mod.decompose_units(adapter, None, _config(), groups, on_disk=True, state=state)
    assert len(again) == len(first) == len(groups)
    for a, b in zip(again, first, strict=True):
        assert a.spectrum.basis.device.type == "meta" and a.spectrum.basis.shape == b.spectrum.basis.shape
        torch.testing.assert_close(a.spectrum.sigma2, b.spectrum.sigma2, rtol=0, atol=0)
    with pytest.raises(AssertionError, match="a basis was read"):  # the in-memory resume still reads them
        spectra_mod.decompose_units(adapter, None, _config(), groups, on_disk=False, state=state)


@pytest.mark.parametrize("update", [None, "svdllm"])
def test_in_memory_run_with_grams_on_disk_equals_grams_in_memory(ckpt, tmp_path, monkeypatch, update):
    """Above GRAMS_IN_MEMORY_BYTES an in-memory run keeps its Gram matrices on disk, layer by layer: same result."""
    import svdzip.engine.driver as driver_mod

    source, _ = ckpt
    calls = []
    real = calibrate_mod.calibrate

    def spy(*args, **kw):
        calls.append(kw.get("on_disk"))
        return real(*args, **kw)

    monkeypatch.setattr(calibrate_mod, "calibrate", spy)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    config = Recipe.plain(**CFG, update=update)
    results = {}
    for limit in (driver_mod.GRAMS_IN_MEMORY_BYTES, 0):
        monkeypatch.setattr(driver_mod, "GRAMS_IN_MEMORY_BYTES", limit)
        out = tmp_path / f"out-{limit}"
        run(CompressRequest(model=str(source), recipe=config, out=out, stream=False, tokens=tiny_tokens(),
                            plots=False), ctx=DistContext())
        results[limit] = load(out, with_tokenizer=False)[0]
    assert calls.count(True) == 1  # only the small limit calibrated on disk (the default: in memory, or cached)
    torch.testing.assert_close(_logits(results[0]), _logits(results[driver_mod.GRAMS_IN_MEMORY_BYTES]),
                               rtol=1e-5, atol=1e-6)
    assert not list(tmp_path.glob(".out-*.run-*")) and not list((tmp_path / "tmp").iterdir())  # run dirs removed
    summary = io.read_manifest(tmp_path / "out-0")["details"]["summary"]
    assert summary["calibration_tokens"] == tiny_tokens().numel()


def test_an_in_memory_run_that_cannot_fit_is_refused_before_loading(ckpt, tmp_path, monkeypatch):
    import svdzip.core.checkpoint as checkpoint_mod
    import svdzip.output.loading as loading_mod

    source, _ = ckpt
    monkeypatch.setattr(checkpoint_mod, "memory_limit_bytes", lambda: 64 * 2**20)
    monkeypatch.setattr(loading_mod, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SvdzipError, match=r"--stream") as info:
        run(CompressRequest(model=str(source), recipe=_config(), out=tmp_path / "out", stream=False,
                            tokens=tiny_tokens(), plots=False), ctx=DistContext())
    assert "calibration" in str(info.value) or "allocation" in str(info.value)
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()  # the real available memory: the same run goes through
    run(CompressRequest(model=str(source), recipe=_config(), out=tmp_path / "out", stream=False,
                        tokens=tiny_tokens(), plots=False), ctx=DistContext())
    assert (tmp_path / "out" / "config.json").is_file()


def test_footprint_terms_grow_with_what_the_run_holds():
    from svdzip.engine import footprint
    from svdzip.recover.config import HealConfig

    cfg = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "vocab_size": 151936}
    plain = footprint.estimate(2 * 2**30, cfg, gram_bytes=footprint.gram_bytes_of(cfg), grams_in_memory=False)
    held = footprint.estimate(2 * 2**30, cfg, gram_bytes=footprint.gram_bytes_of(cfg), grams_in_memory=True)
    assert footprint.gram_bytes_of(cfg) == 8 * 24 * (3 * 896**2 + 4864**2)
    assert held.peak - plain.peak == footprint.gram_bytes_of(cfg)
    healed = footprint.estimate(2 * 2**30, cfg, gram_bytes=0, grams_in_memory=False,
                                 heal=HealConfig(method="distill", precision="float32"), kept=0.8)
    assert healed.peak_stage == "heal (training)" and healed.peak > plain.peak
    half = footprint.estimate(2 * 2**30, cfg, gram_bytes=0, grams_in_memory=False,
                              heal=HealConfig(method="distill", precision="bfloat16"), kept=0.8)
    linears = 0.8 * footprint.decoder_linear_bytes(cfg, 2 * 2**30) / 4 + 151936 * 896  # elements in the forward
    assert half.peak - healed.peak == pytest.approx(2 * linears, abs=2)  # a bf16 copy of each, saved for backward
    assert footprint.backward_bytes(cfg, 2048) == 2 * footprint.backward_bytes(cfg, 1024)
    guarded = footprint.estimate(2 * 2**30, cfg, gram_bytes=0, grams_in_memory=False, guard_tokens=512)
    assert guarded.peak_stage == "allocation (guard)"  # the trial copy beside the model, one window's logits
    # the plain run's peak (calibration) holds the model alone here: no Grams in memory, no calibration tokens
    assert guarded.peak - plain.peak == 2 * 2**30 + 4 * footprint.LOGIT_COPIES * 512 * 151936


def test_ara_s_mask_training_is_a_stage_with_a_trial_copy_for_the_hybrid():
    from svdzip.engine import footprint

    cfg = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "vocab_size": 151936}
    assert footprint.ara_window(Recipe(allocator="ara", allocator_options={"seq_len": 128, "batch": 2})) == (256, 128)
    assert footprint.ara_window(Recipe(allocator="loss-aware")) is None
    plain = footprint.estimate(2 * 2**30, cfg, gram_bytes=0, grams_in_memory=False, ara_window=(256, 256))
    hybrid = footprint.estimate(2 * 2**30, cfg, gram_bytes=0, grams_in_memory=False, ara_window=(256, 256),
                                ara_trial=True)
    assert plain.peak_stage == hybrid.peak_stage == "allocation (ARA masks)"
    stage = plain.stages["allocation (ARA masks)"]  # the over-complete factors of every decoder linear beside it
    assert stage["factors"] == int(1.2 * footprint.decoder_linear_bytes(cfg, 2 * 2**30))
    assert hybrid.peak - plain.peak == 2 * 2**30  # the copy with the held modules built


def test_the_guard_is_counted_only_where_the_recipe_guards():
    from svdzip.engine.footprint import guard_tokens

    assert guard_tokens(Recipe(method="hybrid").resolved(scaled=False)) == 512
    assert guard_tokens(Recipe().resolved(scaled=False)) == 0  # the default recipe does not guard
    assert guard_tokens(Recipe(allocator="uniform")) == 0


def test_streaming_tied_embeddings_without_run_dir(tmp_path):
    save_tiny(tmp_path / "dense")
    ref = compress(tiny_model("llama"), _config(), calib_tokens=tiny_tokens())
    _stream(tmp_path / "dense", tmp_path / "out", None)
    _assert_same(tmp_path / "out", ref)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_streamed_capture_leaves_the_head_on_disk(family, tmp_path):
    """The capture pass stops inside the last layer: an untied head is never read (a tied one is the embedding)."""
    from svdzip.core.checkpoint import CheckpointReader, StreamedWeights, skeleton
    from svdzip.core.layerwise import capture_layer_inputs
    from svdzip.models.adapter import ModelAdapter
    from svdzip.models.checkpoint_names import CheckpointNames

    save_tiny(tmp_path / "dense", family)
    model = skeleton(tmp_path / "dense", torch.float32)
    adapter = ModelAdapter(model)
    weights = StreamedWeights(model, adapter, CheckpointReader(tmp_path / "dense", CheckpointNames(model)),
                              torch.float32)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    with weights.non_layers("cpu"):
        assert embedding.weight.device.type == "cpu"
        assert (head.weight is embedding.weight) == model.config.tie_word_embeddings
        assert (head.weight.device.type == "meta") != model.config.tie_word_embeddings
    assert embedding.weight.device.type == "meta"
    tokens = tiny_tokens(n=2)
    streamed = capture_layer_inputs(model, adapter, tokens, 1, "cpu", weights=weights)
    dense = tiny_model(family)
    resident = capture_layer_inputs(dense, ModelAdapter(dense), tokens, 1, "cpu")
    for a, b in zip(streamed.hidden, resident.hidden, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- resume
def test_resume_after_injected_faults_recomputes_only_the_rest(ckpt, tmp_path, monkeypatch):
    source, ref = ckpt
    run = tmp_path / "run"
    for fault in ("calib:1", "unit:9"):  # first calibration dies after layer 1; then decomposition after unit 9
        monkeypatch.setenv("SVDZIP_FAULT", fault)
        with pytest.raises(RuntimeError, match="injected fault"):
            _stream(source, tmp_path / "out", run)
    monkeypatch.delenv("SVDZIP_FAULT")
    calls = {"layers": 0, "units": 0}
    real_run, real_dec = calibrate_mod.run_layer, spectra_mod.decompose

    def count_layers(*a, **k):
        calls["layers"] += 1
        return real_run(*a, **k)

    def count_units(adapter, stats, method, groups, *a, **k):
        calls["units"] += len(groups)
        return real_dec(adapter, stats, method, groups, *a, **k)

    monkeypatch.setattr(calibrate_mod, "run_layer", count_layers)
    monkeypatch.setattr(spectra_mod, "decompose", count_units)
    _stream(source, tmp_path / "out", run)
    assert calls == {"layers": 0, "units": 28 - 10}  # all 4 layers and units 0–9 came from disk
    _assert_same(tmp_path / "out", ref)


@pytest.mark.parametrize("on_disk", [False, True])
def test_calibration_counts_its_tokens_and_batches(on_disk, tmp_path):
    """ASVD's activation means fall back on the batch count: it must survive the captures being emptied."""
    from svdzip.models.adapter import ModelAdapter
    from svdzip.passes.calibrate import calibrate

    model = tiny_model("llama")
    state = RunState(tmp_path / "run", {"test": 1}) if on_disk else None
    stats = calibrate(model, ModelAdapter(model), tiny_tokens(8, 24), 3, "cpu", ("grams", "local"), state=state,
                      on_disk=on_disk)
    assert (stats.tokens, stats.batches) == (8 * 24, 3)


def test_state_file_names_are_read_from_a_checked_header(tmp_path, caplog):
    """What a resume checks of every finished layer: the names, only from a file whose checksum holds."""
    from svdzip.core.resume import read_checked, read_names_checked, write_checked

    path = tmp_path / "calib" / "layer_00000.safetensors"
    write_checked(path, {"grams/a": torch.eye(3), "local/b": torch.ones(2)}, {"layer": 0})
    names, info = read_names_checked(path)
    assert sorted(names) == sorted(read_checked(path)[0]) == ["grams/a", "local/b"] and info == {"layer": 0}
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in a tensor the header does not describe
    path.write_bytes(bytes(data))
    assert read_names_checked(path, remove=False) is None and path.exists()
    assert "corrupted" in caplog.text
    assert read_names_checked(path) is None and not path.exists()


def test_resume_after_kill(ckpt, tmp_path):
    """A process killed hard (no cleanup, like SIGKILL) mid-calibration; the same call continues."""
    source, ref = ckpt
    killed_run("test_scale", "_stream", (source, tmp_path / "out", tmp_path / "run"), "calib:2:kill")
    assert not (tmp_path / "out").exists()
    hidden = json.loads((tmp_path / "run" / "calib" / "hidden_r0.safetensors.json").read_text())
    assert hidden["info"]["layer"] == 2
    _stream(source, tmp_path / "out", tmp_path / "run")
    _assert_same(tmp_path / "out", ref)


def test_changed_configuration_is_refused_or_restarted(tmp_path):
    RunState(tmp_path, {"model": "a", "samples": 8})
    (tmp_path / "units").mkdir()
    with pytest.raises(SvdzipError, match=r"samples: 8 → 16.*--restart"):
        RunState(tmp_path, {"model": "a", "samples": 16})
    RunState(tmp_path, {"model": "a", "samples": 16}, restart=True)
    assert not (tmp_path / "units").exists()
    RunState(tmp_path, {"model": "a", "samples": 16})  # same configuration: resumes


def test_corrupted_state_files_are_recomputed(ckpt, tmp_path, caplog):
    source, ref = ckpt
    run = tmp_path / "run"
    _stream(source, tmp_path / "out", run)
    for path in (run / "units" / "u000003.safetensors", run / "calib" / "layer_00001.safetensors"):
        data = bytearray(path.read_bytes())
        data[-8:] = b"\xff" * 8
        path.write_bytes(bytes(data))
    _stream(source, tmp_path / "out", run, overwrite=True)
    assert "corrupted" in caplog.text
    _assert_same(tmp_path / "out", ref)


# ----------------------------------------------------------------------------------------- faults
def test_write_error_keeps_previous_output(ckpt, tmp_path, monkeypatch):
    source, ref = ckpt
    out = tmp_path / "out"
    _stream(source, out, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = {"n": 0}
    real = writer_mod.save_file

    def disk_full(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(writer_mod, "save_file", disk_full)
    with pytest.raises(SvdzipError, match="No space left on device; nothing was written"):
        _stream(source, out, tmp_path / "run", overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    # the in-memory writer (io.save) likewise
    model = ref.model

    def half_written(directory, **kw):
        (Path(directory) / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model, "save_pretrained", half_written)
    manifest = io.build_manifest(ref.modules, ref.summary, _config().to_dict())
    with pytest.raises(SvdzipError, match="No space left on device"):
        io.save(model, None, out, manifest, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_manifest_records_seed_versions_and_config(ckpt, tmp_path):
    source, _ = ckpt
    _stream(source, tmp_path / "out", None)
    details = io.read_manifest(tmp_path / "out")["details"]
    prov = details["provenance"]
    assert prov["seed"] == 0 and prov["torch"] == torch.__version__ and prov["svdzip"]
    assert details["config"]["calib_samples"] == CFG["calib_samples"]


# ------------------------------------------------------------------------------------ distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tmp: str, source: str) -> None:
    no_native_bf16()
    import torch.distributed as dist

    import svdzip.passes.spectra as spectra_mod
    from svdzip.core.distributed import DistContext

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ctx = DistContext(rank=rank, world_size=world, backend="gloo")
    computed = {"units": 0}
    real = spectra_mod.decompose

    def counting(adapter, stats, method, groups, *a, **k):
        computed["units"] += len(groups)
        return real(adapter, stats, method, groups, *a, **k)

    spectra_mod.decompose = counting
    _stream(Path(source), Path(tmp) / "mem", Path(tmp) / "run-mem", stream=False, ctx=ctx)
    owned = computed["units"]
    _stream(Path(source), Path(tmp) / "stream", Path(tmp) / "run-st", ctx=ctx)
    (Path(tmp) / f"rank{rank}.json").write_text(json.dumps({"units_computed": owned}))
    dist.destroy_process_group()


def test_two_gloo_processes_equal_one(ckpt, tmp_path):
    source, ref = ckpt
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path), str(source)), nprocs=2,
                       start_method="spawn", join=True)
    _assert_same(tmp_path / "mem", ref)
    _assert_same(tmp_path / "stream", ref)
    # both ranks decomposed some units: the work was spread
    units = sorted(p.name for p in (tmp_path / "run-mem" / "units").glob("*.safetensors"))
    assert len(units) == 28
    counts = [json.loads((tmp_path / f"rank{r}.json").read_text())["units_computed"] for r in (0, 1)]
    assert sum(counts) == 28 and min(counts) > 0


def test_distributed_context_is_a_noop_alone():
    ctx = DistContext()
    t = torch.ones(3)
    assert ctx.all_reduce(t) is t and ctx.min_int(4) == 4 and not ctx.enabled


@pytest.mark.parametrize("family", ["qwen2", "phi3", "mixtral", "qwen3_moe", "gpt2", "opt"])
def test_streaming_equals_in_memory_for_other_families(family, tmp_path):
    """Streamed from a saved checkpoint = compressed in memory: experts, fused projections, biases, Conv1D."""
    save_tiny(tmp_path / "dense", family, shape=WIDE)
    tokens = tiny_tokens(vocab=WIDE.vocab)
    config = Recipe.plain(**{**CFG, "calib_seq_len": tokens.shape[1]})
    ref = compress(AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).eval(), config,
                   calib_tokens=tokens)
    request = CompressRequest(model=str(tmp_path / "dense"), recipe=config, out=tmp_path / "out", stream=True,
                              tokens=tokens, plots=False)
    res = run(request, ctx=DistContext())
    assert res.ranks == ref.ranks and any(r is not None for r in ref.ranks.values())
    model, _ = load(tmp_path / "out", with_tokenizer=False)
    probe = tokens[:2, :16]
    with torch.no_grad():
        torch.testing.assert_close(model(probe).logits, ref.model(probe).logits, rtol=1e-4, atol=1e-5)


def test_auto_heal_precision_falls_back_to_float32_where_only_its_footprint_fits(ckpt, tmp_path, monkeypatch):
    """A bf16 heal saves a 16-bit copy of every weight for the backward: where that alone would not fit, "auto"
    heals in float32 (recorded as such); an explicit bfloat16 is refused instead, and so is a run too large
    either way. Up front a run is refused on what any allocation needs (its heal training none of the kept
    weights), since what it trains is only known once the model is compressed."""
    import svdzip.core.checkpoint as checkpoint_mod
    from svdzip.engine.driver import fit_in_memory, in_memory_footprint, part_needs, union
    from svdzip.recover.config import HealConfig

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    source, _ = ckpt
    # micro-batches of 8 windows: the training's backward outweighs the model's calibration at this size
    healing = HealConfig(steps=2, train_samples=8, heldout_samples=2, seq_len=16, eval_every=1, batch_size=8)
    recipe = Recipe.plain(**CFG, heal="distill", healing=healing).resolved(scaled=False)
    needs, heal = union(part_needs(recipe)), recipe.heal_config()
    half = in_memory_footprint(str(source), recipe, needs, heal, trained=0.0).peak
    full = in_memory_footprint(str(source), recipe, needs, dataclasses.replace(heal, precision="float32"),
                               trained=0.0).peak
    assert half > full
    assert in_memory_footprint(str(source), recipe, needs, heal).peak > half  # the bound: every kept weight trained
    monkeypatch.setattr(checkpoint_mod, "memory_limit_bytes", lambda: (half + full) // 2)
    assert fit_in_memory(str(source), recipe, needs, heal) == "float32"
    with pytest.raises(SvdzipError, match="--stream"):
        fit_in_memory(str(source), recipe, needs, dataclasses.replace(heal, precision="bfloat16"))
    run(CompressRequest(model=str(source), recipe=recipe, out=tmp_path / "out", stream=False, plots=False),
        ctx=DistContext())
    details = io.read_manifest(tmp_path / "out")["details"]
    assert details["recovery"][0]["precision"] == "float32"
    assert "precision: float32" in (tmp_path / "out" / "recipe.yaml").read_text()
    monkeypatch.setattr(checkpoint_mod, "memory_limit_bytes", lambda: full - 1)
    with pytest.raises(SvdzipError, match="--stream"):
        fit_in_memory(str(source), recipe, needs, heal)


def test_the_heal_is_checked_once_the_compressed_model_says_what_it_trains(ckpt, tmp_path, monkeypatch):
    """Once compressed, the heal's need is known (the student as it is, the weights it trains): where a bf16 heal
    would not fit, "auto" heals in float32; where neither fits, the compressed model is saved unhealed and the run
    says so and how to heal it, instead of being killed halfway through the heal."""
    import svdzip.core.checkpoint as checkpoint_mod
    from svdzip.engine.driver import fit_heal, heal_footprint
    from svdzip.engine.footprint import TRAINER_COPIES
    from svdzip.recover.config import HealConfig
    from svdzip.recover.heal import trained_weights

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(checkpoint_mod, "resident_bytes", lambda: 2**30)  # what the process holds, held still
    source, _ = ckpt
    healing = HealConfig(steps=2, train_samples=4, heldout_samples=2, seq_len=16, eval_every=1)
    run(CompressRequest(model=str(source), recipe=Recipe.plain(**CFG), out=tmp_path / "plain", plots=False),
        ctx=DistContext())
    model, _ = load(tmp_path / "plain")
    heal = Recipe.plain(**CFG, heal="distill", healing=healing).resolved(scaled=False).heal_config()
    teacher = 4 * checkpoint_mod.checkpoint_elements(source)
    trained = sum(p.numel() for p in trained_weights(model).values())
    assert 0 < trained < sum(p.numel() for p in model.parameters())  # the factors, not the frozen rest
    half = heal_footprint(model, heal, teacher)
    full = heal_footprint(model, dataclasses.replace(heal, precision="float32"), teacher)
    assert half.stages["heal (training)"]["optimizer"] == TRAINER_COPIES * 4 * trained
    assert half.stages["heal (training)"]["student"] == 2**30  # measured, the compressed model included
    assert half.peak > full.peak
    monkeypatch.setattr(checkpoint_mod, "process_memory_limit_bytes", lambda: half.peak)
    assert fit_heal(model, heal, teacher) == (heal, None)
    monkeypatch.setattr(checkpoint_mod, "process_memory_limit_bytes", lambda: (half.peak + full.peak) // 2)
    assert fit_heal(model, heal, teacher) == (dataclasses.replace(heal, precision="float32"), None)
    monkeypatch.setattr(checkpoint_mod, "process_memory_limit_bytes", lambda: full.peak - 1)
    assert f"train {trained:,} parameters" in fit_heal(model, heal, teacher)[1]

    out = tmp_path / "healed"
    with pytest.raises(SvdzipError, match=f"saved unhealed in {out}.*svdzip heal {out}"):
        run(CompressRequest(model=str(source), recipe=Recipe.plain(**CFG, heal="distill", healing=healing), out=out,
                            plots=False), ctx=DistContext())
    assert "recovery" not in io.read_manifest(out)["details"]
    assert "heal: none" in (out / "recipe.yaml").read_text()
    reloaded, _ = load(out)
    probe = torch.arange(8).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(probe).logits, model(probe).logits)  # the same factors, unhealed


def test_a_saved_directory_s_heal_is_checked_before_its_teacher_loads_and_a_streamed_run_keeps_its_compression(
        ckpt, tmp_path, monkeypatch):
    """`svdzip heal DIR` and a streamed run healed from its staged directory check the heal's memory once the student
    and its windows are loaded: "auto" falls back to float32 where only that fits (and says so in the healed
    recipe); where neither fits, nothing is written and the teacher is never loaded — and the streamed run saves its
    compression unhealed instead of losing it. A streamed run whose heal cannot fit even at its smallest is refused
    before it compresses anything."""
    import svdzip.core.checkpoint as checkpoint_mod
    import svdzip.recover.directory as directory_mod
    from svdzip.engine.driver import HealDoesNotFit, heal_check, heal_footprint
    from svdzip.recover.config import HealConfig
    from svdzip.recover.heal import trained_weights

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(checkpoint_mod, "resident_bytes", lambda: 2**30)
    source, _ = ckpt
    healing = HealConfig(steps=2, train_samples=4, heldout_samples=2, seq_len=16, eval_every=1)
    recipe = Recipe.plain(**CFG, heal="distill", healing=healing)
    run(CompressRequest(model=str(source), recipe=Recipe.plain(**CFG), out=tmp_path / "plain", plots=False),
        ctx=DistContext())
    model, _ = load(tmp_path / "plain")
    heal = recipe.resolved(scaled=False).heal_config()
    teacher = 4 * checkpoint_mod.checkpoint_elements(source)
    half, full = (heal_footprint(model, dataclasses.replace(heal, precision=p), teacher).peak
                  for p in ("auto", "float32"))
    assert half > full

    monkeypatch.setattr(checkpoint_mod, "process_memory_limit_bytes", lambda: (half + full) // 2)
    report, _ = directory_mod.heal_directory(tmp_path / "plain", tmp_path / "healed32", heal,
                                             fit=heal_check(str(source)))
    assert report.config["precision"] == "float32" and report.precision == "float32"

    monkeypatch.setattr(checkpoint_mod, "process_memory_limit_bytes", lambda: full - 1)
    loaded = []
    monkeypatch.setattr(directory_mod, "load_teacher", lambda *a: loaded.append(a))
    trained = sum(p.numel() for p in trained_weights(model).values())
    with pytest.raises(HealDoesNotFit, match=f"train {trained:,} parameters.*--heal-batch-size 1"):
        directory_mod.heal_directory(tmp_path / "plain", tmp_path / "healed", heal, fit=heal_check(str(source)))
    assert not loaded and not (tmp_path / "healed").exists()

    out = tmp_path / "streamed"
    with pytest.raises(SvdzipError, match=rf"saved unhealed \(float32.*in {out}: `svdzip heal {out}"):
        run(CompressRequest(model=str(source), recipe=recipe, out=out, stream=True, plots=False), ctx=DistContext())
    assert "recovery" not in io.read_manifest(out)["details"]
    assert "heal: none" in (out / "recipe.yaml").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["healed32", "plain", "streamed"]  # no staging left
    streamed, _ = load(out)
    torch.testing.assert_close(_logits(streamed), _logits(model), rtol=1e-4, atol=1e-5)  # streaming = in memory

    monkeypatch.setattr(checkpoint_mod, "memory_limit_bytes", lambda: 2**20)
    with pytest.raises(SvdzipError, match="heal after this streamed compression needs the whole model.*layerwise"):
        run(CompressRequest(model=str(source), recipe=recipe, out=tmp_path / "refused", stream=True, plots=False),
            ctx=DistContext())
    assert not (tmp_path / "refused").exists()
