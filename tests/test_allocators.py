"""Allocators: exact budgets with the dense option, D-Rank's closed form and rebalancing, V2, loss-aware, plots."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_model, tiny_tokens

from svdzip.allocate import AllocationContext, allocate, spent
from svdzip.allocate.common import HELDOUT_KEY, greedy_loss_allocation, hull_segments, step_up
from svdzip.allocate.drank import drank_ranks, effective_ranks, lagrange_ranks, rebalance_qk_to_v
from svdzip.allocate.svdllm_v2 import v2_ratios
from svdzip.budget import DENSE, keep_budget, max_useful_rank
from svdzip.config import SHAREABLE_ROLES, CompressConfig
from svdzip.engine.calibrate import collect_statistics
from svdzip.engine.pipeline import compress
from svdzip.methods.decompose import decompose, group_linears
from svdzip.models.adapter import ModelAdapter

CASES = [("drank", {}), ("drank", {"mode": "code"}), ("drank", {"rebalance": False}), ("svdllm-v2", {}),
         ("loss-aware", {}), ("loss-aware", {"signal": "relative"}), ("uniform", {})]


@pytest.fixture(scope="module")
def setup():
    model, tokens = tiny_model("llama"), tiny_tokens()
    stats = collect_statistics(model, tokens, 4, "cpu")
    adapter = ModelAdapter(model)
    units = {g: decompose(adapter, stats, "svdllm", group_linears(adapter, SHAREABLE_ROLES, g)) for g in (1, 2)}
    return model, tokens, stats, adapter, units


def _ctx(setup, units, ratio, options=None):
    model, tokens, stats, adapter, _ = setup
    return AllocationContext(ratio=ratio, budget=keep_budget(sum(u.dense_params for u in units), ratio),
                             options=options or {}, adapter=adapter, model=model, stats=stats, calib_tokens=tokens)


def _min_step(units, ranks):
    steps = [step_up(u, r) for u, r in zip(units, ranks, strict=True)]
    return min((s[1] for s in steps if s is not None), default=math.inf)


@pytest.mark.parametrize("name,options", CASES)
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("ratio", [0.1, 0.4, 0.9])
def test_budget_spent_exactly(setup, name, options, group, ratio):
    units = setup[4][group]
    ctx = _ctx(setup, units, ratio, options)
    ranks = allocate(name, units, ctx)
    used = spent(units, ranks)
    assert used <= ctx.budget
    if name != "uniform":  # uniform rounds every matrix down: the papers' baseline, not exact
        assert ctx.budget - used < _min_step(units, ranks), (ctx.budget - used, ranks)
    assert all(r is DENSE or 1 <= r <= max_useful_rank(u.rows, u.cols) for u, r in zip(units, ranks, strict=True))


def test_lagrange_closed_form_is_optimal():
    reff, omega, budget = [5.0, 40.0, 300.0], [64, 64, 96], 6000.0
    k = lagrange_ranks(reff, omega, budget)
    assert sum(ki * w for ki, w in zip(k, omega, strict=True)) == pytest.approx(budget)
    obj = sum(r / ki for r, ki in zip(reff, k, strict=True))
    g = torch.Generator().manual_seed(0)
    for _ in range(50):  # any other feasible point is worse
        d = torch.randn(3, generator=g, dtype=torch.float64) * 2
        d[2] = -(d[0] * omega[0] + d[1] * omega[1]) / omega[2]
        other = [ki + float(di) for ki, di in zip(k, d, strict=True)]
        assert sum(r / ki for r, ki in zip(reff, other, strict=True)) >= obj - 1e-9


def test_drank_gives_more_rank_to_higher_effective_rank(setup):
    units = setup[4][1]
    ranks = drank_ranks(units, 0.3, keep_budget(sum(u.dense_params for u in units), 0.3), rebalance=False)
    reff = effective_ranks(units)
    by = {}
    for u, r, e in zip(units, ranks, reff, strict=True):
        if r is not DENSE:
            by.setdefault(u.role, []).append((e, r))
    for pairs in by.values():
        pairs.sort()
        assert pairs[-1][1] >= pairs[0][1]


def test_rebalance_moves_parameters_from_qk_to_v_under_gqa(setup):
    units = setup[4][1]  # tiny llama: 4 heads, 2 KV heads, so V is half of Q
    assert units[2].role == "v" and units[2].rows < units[0].rows
    budget = keep_budget(sum(u.dense_params for u in units), 0.6)
    base = drank_ranks(units, 0.6, budget, rebalance=False)
    after = rebalance_qk_to_v(units, list(base), 0.3, effective_ranks(units))
    attn = [i for i, u in enumerate(units) if u.role in ("q", "k", "v")]
    assert spent([units[i] for i in attn], [after[i] for i in attn]) <= spent([units[i] for i in attn],
                                                                               [base[i] for i in attn])
    for i in attn:
        if units[i].role == "v":
            assert after[i] is DENSE or (base[i] is not DENSE and after[i] > base[i])
        elif base[i] is not DENSE:
            assert after[i] is not DENSE and after[i] <= base[i]


def test_dense_option_is_taken_when_it_pays(setup):
    """Loss-aware: a unit whose spectrum is flat is cheaper to keep dense than to factorise deeply."""
    units = setup[4][1]
    weights = [1e6 if i == 0 else 1e-6 for i in range(len(units))]
    budget = keep_budget(sum(u.dense_params for u in units), 0.5)
    ranks = greedy_loss_allocation(units, weights, budget)
    assert ranks[0] is DENSE
    segs = hull_segments(units[0], 1.0)
    assert segs[-1][1] is DENSE and all(a[0] >= b[0] - 1e-12 for a, b in zip(segs, segs[1:], strict=False))


def test_v2_ratios_mean_is_target_and_loss_orders_them():
    r = v2_ratios([50.0, 500.0, 5000.0], 0.3)
    assert sum(r) / 3 == pytest.approx(0.3)
    assert r[0] > r[1] > r[2]  # higher loss → less compression


def test_drank_with_basis_sharing_groups(setup):
    units = setup[4][2]
    assert any(len(u.members) == 2 for u in units)
    ranks = allocate("drank", units, _ctx(setup, units, 0.4))
    assert len(ranks) == len(units)


def test_tune_beta_uses_heldout_calibration_tokens(setup, caplog):
    units = setup[4][1]
    held = tiny_tokens(n=2, seed=7)
    ctx = _ctx(setup, units, 0.4, {"tune_beta": True, "beta_grid": [0.0, 0.3], HELDOUT_KEY: held})
    with caplog.at_level("INFO"):
        allocate("drank", units, ctx)
    assert "chose beta" in caplog.text
    with pytest.raises(Exception, match="held-out"):
        allocate("drank", units, _ctx(setup, units, 0.4, {"tune_beta": True}))


def test_loss_aware_guard_keeps_whichever_loses_less_on_heldout(setup, monkeypatch, caplog):
    from svdzip.allocate import common

    units = setup[4][1]
    held = tiny_tokens(n=2, seed=7)
    opts = {HELDOUT_KEY: held}
    plain = allocate("loss-aware", units, _ctx(setup, units, 0.4, opts))
    uniform = allocate("uniform", units, _ctx(setup, units, 0.4, opts))
    assert plain != uniform
    real = common.heldout_loss
    seen = []

    def spy(u, ranks, model, tokens, batch_size=4):
        seen.append((list(ranks), tokens))
        return real(u, ranks, model, tokens, batch_size)

    monkeypatch.setattr(common, "heldout_loss", spy)
    guarded = allocate("loss-aware", units, _ctx(setup, units, 0.4, {**opts, "guard": "true"}))
    assert [r for r, _ in seen] == [plain, uniform] and all(t is held for _, t in seen)
    losses = [real(units, r, setup[0], held) for r in (plain, uniform)]
    assert guarded == (plain if losses[0] <= losses[1] else uniform)

    # whichever is cheaper on held-out text wins: make uniform the cheaper one
    monkeypatch.setattr(common, "heldout_loss", lambda u, ranks, *a, **k: 0.0 if list(ranks) == uniform else 1.0)
    with caplog.at_level("WARNING"):
        assert allocate("loss-aware", units, _ctx(setup, units, 0.4, {**opts, "guard": True})) == uniform
    assert "uniform ranks lose less" in caplog.text
    with pytest.raises(Exception, match="guard=true"):
        allocate("loss-aware", units, _ctx(setup, units, 0.4, {"guard": True}))


def test_heldout_windows_are_declared_by_tune_beta_and_guard():
    from svdzip.allocate import allocator_needs

    assert allocator_needs("drank", {"tune_beta": "true"}).heldout
    assert allocator_needs("loss-aware", {"guard": "true"}).heldout
    assert not allocator_needs("loss-aware", {"guard": "false"}).heldout
    assert not allocator_needs("loss-aware", {}).heldout


@pytest.mark.parametrize("family", ["mistral", "gemma3", "opt"])
def test_allocators_end_to_end_other_families(family):
    model, tokens = tiny_model(family), tiny_tokens()
    stats = collect_statistics(model, tokens, 4, "cpu")
    for name in ("drank", "loss-aware"):
        m = tiny_model(family)
        result = compress(m, CompressConfig(ratio=0.3, allocator=name), stats=stats, calib_tokens=tokens)
        assert result.summary["ratio_achieved"] >= 0.3
        assert torch.isfinite(m(tokens[:1]).logits).all()


def test_plots_and_info_grid(setup, tmp_path):
    from svdzip.output.plots import write_plots
    from svdzip.output.report import rank_grid

    model, tokens, stats = tiny_model("llama"), setup[1], setup[2]
    result = compress(model, CompressConfig(ratio=0.4, allocator="drank", group_size=2), stats=stats,
                      calib_tokens=tokens)
    rows = [r.to_dict() for r in result.modules]
    paths = write_plots(tmp_path, rows, result.effective_ranks)
    assert {p.name for p in paths} == {"ranks.png", "effective_rank.png"}
    assert all(p.stat().st_size > 1000 for p in paths)
    headers, grid = rank_grid(rows)
    assert headers[0] == "layer" and len(grid) == 3
    json.dumps(result.effective_ranks)


def test_tune_beta_draws_heldout_calibration_windows(setup, monkeypatch, caplog):
    """`--tune-beta`: the statistics see the usual windows; β is chosen on extra calibration windows only."""
    import svdzip.data
    from svdzip.engine.driver import calibration_tokens_for, part_needs, union

    drawn = {}

    def fake_tokens(_tok, _corpus, n, seq, seed=0):
        drawn["n"] = n
        return tiny_tokens(n=n, seq=seq, seed=seed)

    monkeypatch.setattr(svdzip.data, "load_corpus", lambda name: name)
    monkeypatch.setattr(svdzip.data, "calibration_tokens", fake_tokens)
    config = CompressConfig(ratio=0.4, allocator="drank", calib_samples=4, calib_seq_len=24,
                            allocator_options={"tune_beta": True, "beta_grid": [0.0, 0.3]})
    tokens, held = calibration_tokens_for(None, config, union(part_needs(config)), heldout_samples=2)
    assert drawn["n"] == 6 and tokens.shape == (4, 24) and held.shape == (2, 24)
    assert torch.equal(tokens, tiny_tokens(n=6, seq=24, seed=config.seed)[:4])  # the usual windows come first
    with caplog.at_level("INFO"):
        result = compress(tiny_model("llama"), config, calib_tokens=tokens, heldout_tokens=held)
    assert "chose beta" in caplog.text and "2 held-out" in caplog.text
    assert result.effective_ranks and "heldout_tokens" not in config.allocator_options
