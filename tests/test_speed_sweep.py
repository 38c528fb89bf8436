"""Speed measurement and the resumable sweep, on tiny random models (fast, no data or model downloads)."""

from __future__ import annotations

import copy
import json
import math
from collections import Counter

import pytest
import torch
from tiny_models import tiny_model, tiny_tokens

from svdzip import Recipe, SvdzipError, compress
from svdzip import sweep as sweep_mod
from svdzip.evaluate.perplexity import perplexity
from svdzip.evaluate.speed import (
    PeakMemory,
    SpeedSetting,
    densify,
    linear_timing,
    measure_speed,
    peak_rss_bytes,
    reset_peak_rss,
    slow_low_rank_modules,
    speed_table,
    summary_row,
)
from svdzip.methods.decompose import decompose
from svdzip.models.adapter import ModelAdapter
from svdzip.models.lowrank import LowRankLinear
from svdzip.passes.calibrate import collect_statistics
from svdzip.sweep import SweepSpec, config_from_label, parse_label, run_sweep


def _compressed(ratio: float = 0.4) -> torch.nn.Module:
    model = tiny_model("llama")
    compress(model, Recipe.plain(method="svd", ratio=ratio))
    return model


def test_measure_speed_dense_vs_compressed_gives_positive_numbers_and_ratios():
    models = {"dense": tiny_model("llama"), "svd": _compressed()}
    settings = [SpeedSetting(1, 12, 4), SpeedSetting(2, 8, 3)]
    res = measure_speed(models, settings, repeats=2, warmup=0)
    for label in models:
        for s in settings:
            r = res["results"][label][s.key]
            assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
            assert r["prefill_latency_s"] > 0 and r["decode_latency_s_per_token"] > 0
            assert len(r["decode_times_s"]) == 2
            assert r["weight_bytes"] > 0
            assert r["peak_bytes"] is None or r["peak_bytes"] >= r["weight_bytes"]
    ratio = res["ratios"]["svd"][settings[0].key]
    assert ratio["weight_bytes_ratio"] < 1.0  # the compressed model is smaller
    assert all(math.isfinite(ratio[k]) and ratio[k] > 0 for k in ("prefill_speedup", "decode_speedup"))
    assert res["ratios"]["dense"][settings[0].key]["decode_speedup"] == pytest.approx(1.0)
    assert set(summary_row(res, "svd")) >= {"prefill_speedup", "decode_speedup", "decode_tokens_per_s"}
    assert "decode ×dense" in speed_table(res)


def test_cpu_clock_and_bad_settings():
    res = measure_speed({"dense": tiny_model("llama")}, [SpeedSetting(1, 8, 3)], repeats=1, warmup=0, clock="cpu")
    assert res["clock"] == "cpu" and res["results"]["dense"]["b1_s8"]["prefill_tokens_per_s"] > 0
    with pytest.raises(ValueError, match="decode needs at least 2 new tokens"):
        measure_speed({"dense": tiny_model("llama")}, [SpeedSetting(1, 8, 1)])


def test_peak_rss_resets_and_measures_an_allocation():
    if peak_rss_bytes() is None:
        pytest.skip("no /proc/self/status here")
    if not reset_peak_rss():
        pytest.skip("kernel refuses /proc/self/clear_refs")
    with PeakMemory(torch.device("cpu")) as pm:
        x = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
        del x
    assert pm.transient is not None and pm.transient >= 48 * 1024 * 1024


def test_linear_timing_and_densify_keep_the_function():
    t = linear_timing(64, 48, [4, 20], tokens=2, repeats=2)
    assert t["dense_seconds"] > 0 and [r["rank"] for r in t["ranks"]] == [4, 20]
    assert all(r["speedup"] > 0 for r in t["ranks"])
    model = _compressed(0.4)
    ids = tiny_tokens(2, 10)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    slow = slow_low_rank_modules(model, tokens=1, min_speedup=float("inf"), repeats=1)  # all count as slow
    names = [s["name"] for s in slow]
    assert names and densify(model, names) > 0
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fields", [
    {}, {"method": "svd"}, {"allocator": "drank"}, {"group_size": 2}, {"update": "svdllm"},
    {"allocator": "drank", "update": "svdllm"}, {"group_size": 4, "update": "coef", "method": "asvd"},
    {"method": "fwsvd", "allocator": "ara"},
])
def test_parse_label_round_trips_config_label(fields):
    cfg = Recipe.plain(**fields)
    parsed = parse_label(cfg.label)
    assert {k: getattr(cfg, k) for k in parsed} == parsed
    assert config_from_label(cfg.label, 0.3).label == cfg.label


@pytest.mark.parametrize("bad", ["", "nope", "svdllm+update-foo", "svdllm+drank+ara"])
def test_parse_label_refuses_nonsense(bad):
    with pytest.raises(SvdzipError):
        parse_label(bad)


class _Tok:
    """Just enough tokenizer for the patched sweep."""


@pytest.fixture
def patched_sweep(monkeypatch):
    """The sweep's expensive steps on a tiny model, each call counted."""
    calls: Counter[str] = Counter()
    dense = tiny_model("llama")
    drawn = tiny_tokens(12, 24)
    tokens, heldout = drawn[:8], drawn[8:]
    real_compress, real_speed = sweep_mod.compress_cell, sweep_mod.speed

    def load(name, device):
        calls["load"] += 1
        return copy.deepcopy(dense), _Tok(), f"/tmp/{name}"

    def calibration(model, tokenizer, source, base):
        calls["calibration"] += 1
        return tokens, collect_statistics(model, tokens, 4, "cpu"), heldout

    def compress_cell(model, config, stats, toks, cache=None, tokenizer=None, heldout=None):
        calls["compress"] += 1
        calls["spectra_reused"] += bool(cache is not None and cache.spectra)
        return real_compress(model, config, stats, toks, cache, tokenizer, heldout)

    def perplexities(model, tokenizer, corpora, spec, label):
        calls["ppl"] += len(corpora)
        return {c: perplexity(model, tiny_tokens(4, 32, seed=7), 32).ppl for c in corpora}

    def zero_shot(model, tokenizer, tasks, spec):
        calls["zero_shot"] += len(tasks)
        return {t: {"acc": 0.5, "acc_norm": 0.25, "n": 10} for t in tasks}

    def speed(dense_model, model, label, spec):
        calls["speed"] += 1
        return real_speed(dense_model, model, label, spec)

    for name, fn in [("load", load), ("calibration", calibration), ("compress_cell", compress_cell),
                     ("perplexities", perplexities), ("zero_shot", zero_shot), ("speed", speed)]:
        monkeypatch.setattr(sweep_mod, name, fn)
    return calls


def _spec(**kw) -> SweepSpec:
    base = dict(models=["tiny"], methods=["svd", "svdllm+update"], ratios=[0.5],
                corpora=["wiki", "austen"], tasks=["piqa"], speed=True, speed_batches=[1], speed_seq_lens=[8],
                speed_new_tokens=3, speed_repeats=1, eval_tokens=64, seq_len=32)
    return SweepSpec(**{**base, **kw})


def test_sweep_is_resumable_and_writes_table_and_plots(patched_sweep, tmp_path):
    calls = patched_sweep
    data = run_sweep(_spec(), tmp_path)
    assert calls["compress"] == 2 and calls["calibration"] == 1  # statistics shared across cells
    assert calls["ppl"] == 2 * 3 and calls["zero_shot"] == 3 and calls["speed"] == 2
    assert len(data["cells"]) == 3
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["cells"]["tiny|svdllm+update|0.5"]["summary"]["method"] == "svdllm+update"
    md = (tmp_path / "results.md").read_text()
    assert "| ratio" in md and "svdllm+update" in md and "commit" in md and "decode ×dense" in md
    assert (tmp_path / "sweep_tiny.png").stat().st_size > 0

    before = dict(calls)
    run_sweep(_spec(), tmp_path)
    assert dict(calls) == {**before, "load": before["load"]}  # nothing recomputed, nothing loaded

    run_sweep(_spec(tasks=["piqa", "arc_easy"]), tmp_path)  # a new task: only that is measured
    assert calls["zero_shot"] == before["zero_shot"] + 3 and calls["ppl"] == before["ppl"]
    assert calls["speed"] == before["speed"]


def test_sweep_reuses_spectra_across_ratios_through_its_own_cache(patched_sweep, tmp_path):
    run_sweep(_spec(methods=["svdllm"], ratios=[0.3, 0.5], speed=False, tasks=[], corpora=["wiki"]), tmp_path)
    assert patched_sweep["compress"] == 2 and patched_sweep["spectra_reused"] == 1
    assert not hasattr(sweep_mod, "_SPECTRA")  # no module-level state carries results between sweeps


def test_sweep_refuses_to_mix_settings(patched_sweep, tmp_path):
    run_sweep(_spec(methods=["svd"], ratios=[0.4], speed=False, tasks=[]), tmp_path)
    with pytest.raises(SvdzipError, match="other settings"):
        run_sweep(_spec(methods=["svd"], ratios=[0.4], speed=False, tasks=[], eval_tokens=128), tmp_path)


def test_sweep_writes_readme_block_and_refuses_unmarked_readme(patched_sweep, tmp_path):
    from svdzip.sweep import README_END, README_START, check_readme, update_readme

    out = tmp_path / "sweep"
    run_sweep(_spec(methods=["svd"], ratios=[0.4], speed=False, tasks=[]), out)
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{README_START}\nold table\n{README_END}\n\n## after\n")
    update_readme(readme, out)
    text = readme.read_text()
    assert "old table" not in text and "#### tiny" in text and "commit" in text
    assert "](sweep/sweep_tiny.png)" in text and text.startswith("# title") and text.endswith("## after\n")
    update_readme(readme, out)  # idempotent: one block, same text
    assert readme.read_text() == text

    plain = tmp_path / "PLAIN.md"
    plain.write_text("# no markers\n")
    with pytest.raises(SvdzipError, match="sweep:start"):
        check_readme(plain)
    with pytest.raises(SvdzipError, match="no such file"):
        check_readme(tmp_path / "missing.md")
    assert plain.read_text() == "# no markers\n"


def test_speed_aware_allocator_keeps_slow_matrices_dense_within_budget(monkeypatch):
    from svdzip.allocate import speed_aware

    # pretend that k and v (32→16 in the tiny model) lose at any rank, everything else wins
    monkeypatch.setattr(speed_aware, "measured_speedup", lambda unit, rank, tokens, clock, cache:
                        0.5 if unit.rows == 16 else 2.0)
    model = tiny_model("llama")
    res = compress(model, Recipe.plain(method="svd", ratio=0.3, allocator="speedaware"))
    dense = {name.rsplit(".", 1)[-1] for name, r in res.ranks.items() if r is None}
    assert dense == {"k_proj", "v_proj"}
    assert res.summary["ratio_achieved"] >= 0.3 - 1e-9  # the others were cut deeper to pay for it
    assert res.config.label == "svd+speedaware" and parse_label(res.config.label)["allocator"] == "speedaware"
    assert {n.rsplit(".", 1)[-1] for n in res.allocation_report["kept_dense_for_speed"]} == {"k_proj", "v_proj"}
    monkeypatch.setattr(speed_aware, "measured_speedup", lambda *a: 0.5)  # nothing pays off
    with pytest.raises(SvdzipError, match="no feasible budget"):
        compress(tiny_model("llama"), Recipe.plain(method="svd", ratio=0.3, allocator="speedaware"))


def test_speed_aware_never_returns_factorised_what_it_kept_dense(monkeypatch):
    """Each re-allocation finds one more slow matrix, for more rounds than the old cap of 8: every matrix
    found slow (and logged as kept dense) must come back dense."""
    from svdzip.allocate import speed_aware

    state = {"last": None, "rounds": 0}
    slow: list[str] = []

    def one_new_slow_matrix_per_round(unit, rank, tokens, clock, cache):
        index = order[unit.name]
        first = state["last"] is None or index <= state["last"]  # a new allocation round starts
        state["last"] = index
        if first:
            state["rounds"] += 1
        if first and state["rounds"] <= 11:
            slow.append(unit.name)
            return 0.5
        return 2.0

    monkeypatch.setattr(speed_aware, "measured_speedup", one_new_slow_matrix_per_round)
    model = tiny_model("llama")
    order = {info.name: i for i, info in enumerate(ModelAdapter(model).linears())}
    res = compress(model, Recipe.plain(method="svd", ratio=0.2, allocator="speedaware"))
    assert len(slow) == 11 and state["rounds"] == 12
    assert all(res.ranks[name] is None for name in slow)
    assert sorted(res.allocation_report["kept_dense_for_speed"]) == sorted(slow)


def test_speed_aware_options_and_cache():
    from svdzip.allocate import AllocationCache, allocator_needs, parse_allocator_options, speed_aware

    opts = parse_allocator_options("speedaware", {"base": "drank", "beta": "0.2", "tokens": "4"})
    assert opts["base"] == "drank" and opts["beta"] == 0.2 and opts["tokens"] == 4 and opts["mode"] == "paper"
    assert parse_allocator_options("speedaware", opts) == opts  # idempotent
    with pytest.raises(SvdzipError, match="its base allocator 'uniform'"):
        parse_allocator_options("speedaware", {"beta": 0.2})
    with pytest.raises(SvdzipError, match="cannot start from or wrap itself"):
        parse_allocator_options("speedaware", {"base": "speedaware"})
    assert allocator_needs("speedaware", {"base": "drank", "tune_beta": True}).heldout
    assert not allocator_needs("speedaware").data
    # timings are kept in the caller's cache, per shape and rank
    model = tiny_model("llama")
    unit = decompose(ModelAdapter(model), None, "svd")[0]
    cache = AllocationCache()
    first = speed_aware.measured_speedup(unit, 2, 1, "cpu", cache)
    assert speed_aware.measured_speedup(unit, 2, 1, "cpu", cache) == first and len(cache.entries) == 1


def test_cli_eval_speed_and_tasks(monkeypatch, capsys):
    import svdzip.evaluate.perplexity as ppl_mod
    import svdzip.evaluate.zeroshot as zs_mod
    import svdzip.output.loading as loading
    from svdzip.cli import main

    models = {"dense": tiny_model("llama"), "small": _compressed()}
    monkeypatch.setattr(loading, "load_model", lambda name, device="cpu", dtype=None: (models[name], _Tok(), name))
    monkeypatch.setattr(ppl_mod, "perplexity_on_corpora", lambda *a, **k: {})
    monkeypatch.setattr(zs_mod, "evaluate_zero_shot", lambda model, tok, tasks, **k:
                        {t: {"acc": 0.5, "acc_norm": 0.5, "n": k["limit"]} for t in tasks})
    rc = main(["eval", "dense", "small", "--corpora", "", "--tasks", "piqa,arc_easy", "--limit", "3", "--speed",
               "--speed-batches", "1", "--speed-seq-lens", "8", "--speed-new-tokens", "3", "--speed-repeats", "1",
               "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["zero_shot"]["small"]["piqa"]["n"] == 3
    assert out["speed"]["ratios"]["small"]["b1_s8"]["decode_speedup"] > 0
