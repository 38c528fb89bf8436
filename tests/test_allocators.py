"""Allocators: exact budgets with the dense option, D-Rank's closed form and rebalancing, V2, loss-aware, plots."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import tiny_model, tiny_tokens

from svdzip.allocate import AllocationContext, allocate, spent
from svdzip.allocate.common import greedy_loss_allocation, hull_segments, step_up
from svdzip.allocate.drank import drank_ranks, effective_ranks, lagrange_ranks, rebalance_qk_to_v
from svdzip.allocate.svdllm_v2 import v2_ratios
from svdzip.budget import DENSE, keep_budget, max_useful_rank
from svdzip.engine.driver import compress
from svdzip.errors import SvdzipError
from svdzip.methods.decompose import Unit, decompose, group_linears
from svdzip.methods.linalg import Spectrum
from svdzip.models.adapter import LinearInfo, ModelAdapter
from svdzip.passes.calibrate import collect_statistics
from svdzip.recipe import SHAREABLE_ROLES, Recipe

CASES = [("drank", {}), ("drank", {"mode": "code"}), ("drank", {"rebalance": False}), ("svdllm-v2", {}),
         ("loss-aware", {}), ("loss-aware", {"signal": "relative"}), ("uniform", {})]


@pytest.fixture(scope="module")
def setup():
    model, tokens = tiny_model("llama"), tiny_tokens()
    stats = collect_statistics(model, tokens, 4, "cpu")
    adapter = ModelAdapter(model)
    units = {g: decompose(adapter, stats, "svdllm", group_linears(adapter, SHAREABLE_ROLES, g)) for g in (1, 2)}
    return model, tokens, stats, adapter, units


def _ctx(setup, units, ratio, options=None, heldout=None):
    model, tokens, _, adapter, _ = setup
    return AllocationContext(ratio=ratio, budget=keep_budget(sum(u.dense_params for u in units), ratio),
                             options=options or {}, adapter=adapter, model=model, calib_tokens=tokens,
                             heldout_tokens=heldout)


def _min_step(units, ranks):
    steps = [step_up(u, r) for u, r in zip(units, ranks, strict=True)]
    return min((s[1] for s in steps if s is not None), default=math.inf)


def _assert_spends_the_budget(units, ranks, budget, exact=True, case=""):
    """At most the budget; with `exact`, less than the cheapest further step below it; every rank usable."""
    assert len(ranks) == len(units)
    used = spent(units, ranks)
    assert used <= budget
    if exact:
        assert budget - used < _min_step(units, ranks), (case, budget - used, ranks)
    assert all(r is DENSE or 1 <= r <= max_useful_rank(u.rows, u.cols) for u, r in zip(units, ranks, strict=True))


@pytest.mark.parametrize("name,options", CASES)
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("ratio", [0.1, 0.4, 0.9])
def test_budget_spent_exactly(setup, name, options, group, ratio):
    units = setup[4][group]
    ctx = _ctx(setup, units, ratio, options)
    ranks = allocate(name, units, ctx).ranks
    # uniform rounds every matrix down: the papers' baseline, not exact
    _assert_spends_the_budget(units, ranks, ctx.budget, exact=name != "uniform")


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
    ctx = _ctx(setup, units, 0.4)
    ranks = allocate("drank", units, ctx).ranks
    _assert_spends_the_budget(units, ranks, ctx.budget)
    # a shared basis is one unit: its rank buys rows + cols of both members (2·out + in) per step
    shared = [(u, r) for u, r in zip(units, ranks, strict=True) if len(u.members) == 2 and r is not DENSE]
    assert shared and all(u.cost_per_rank == 2 * u.members[0].out_features + u.cols for u, _ in shared)


# --------------------------------------------------------------------------- hand-built spectra, known answers


def _unit(name: str, role: str, layer: int, rows: int, cols: int, sigma2: list[float]) -> Unit:
    """A unit whose spectrum is given: sigma2 are the data-weighted squared singular values."""
    keep = min(rows, cols, math.ceil(1.2 * rows * cols / (rows + cols)))
    info = LinearInfo(name=name, layer=layer, role=role, input_key=name, out_features=rows, in_features=cols)
    return Unit(members=[info], spectrum=Spectrum(sigma2=torch.tensor(sigma2, dtype=torch.float64),
                                                  basis=torch.eye(rows)[:, :keep]))


def _bare_ctx(units, ratio, options=None) -> AllocationContext:
    return AllocationContext(ratio=ratio, budget=keep_budget(sum(u.dense_params for u in units), ratio),
                             options=options or {}, adapter=None, model=None, calib_tokens=None)


def test_known_ranks_on_hand_built_spectra():
    """Two 64×64 matrices of one role, 10 ranks to share (1280 of 8192 parameters): one carries all of its
    energy in one direction (effective rank 1), the other spreads it evenly over 16 (effective rank 16)."""
    spike = _unit("a", "up", 0, 64, 64, [1.0] + [0.0] * 63)
    flat16 = _unit("b", "up", 1, 64, 64, [1.0] * 16 + [0.0] * 48)
    units = [spike, flat16]
    ratio = 1 - 1280 / 8192
    assert keep_budget(8192, ratio) == 1280
    assert effective_ranks(units) == pytest.approx([1.0, 16.0], rel=1e-9)
    # D-Rank: k ∝ √(R_eff / cost) = 1 : 4, the closed form is integral here
    assert allocate("drank", units, _bare_ctx(units, ratio)).ranks == [2, 8]
    assert drank_ranks(units, ratio, 1280, beta=0.0, rebalance=False) == [2, 8]
    # loss-aware: rank 1 loses nothing of the spike, so every other rank goes to the flat one
    assert allocate("loss-aware", units, _bare_ctx(units, ratio, {"signal": "whitened"})).ranks == [1, 9]
    assert greedy_loss_allocation(units, [1.0, 1.0], 1280) == [1, 9]
    # a weight makes no difference where the tail is already zero
    assert greedy_loss_allocation(units, [1e6, 1.0], 1280) == [1, 9]
    # uniform: floor((1 − r)·m·n/(m + n)) for each shape, whatever the spectra
    shapes = [_unit("q", "q", 0, 64, 64, [1.0] * 64), _unit("k", "k", 0, 32, 64, [1.0] * 32)]
    assert allocate("uniform", shapes, _bare_ctx(shapes, 0.5)).ranks == [16, 10]


def test_greedy_loss_allocation_follows_the_steepest_tail():
    """16×16 matrices (32 parameters a rank): a spike needs rank 1; a geometric spectrum takes the other 4."""
    spike = _unit("a", "up", 0, 16, 16, [1.0] + [0.0] * 15)
    geometric = _unit("b", "up", 1, 16, 16, [2.0 ** -i for i in range(16)])
    assert greedy_loss_allocation([spike, geometric], [1.0, 1.0], 6 * 32) == [1, 5]
    assert greedy_loss_allocation([geometric, spike], [1.0, 1.0], 6 * 32) == [5, 1]
    with pytest.raises(SvdzipError, match="below one rank per matrix"):
        greedy_loss_allocation([spike, geometric], [1.0, 1.0], 63)


def test_tune_beta_uses_heldout_calibration_tokens(setup, caplog):
    units = setup[4][1]
    held = tiny_tokens(n=2, seed=7)
    ctx = _ctx(setup, units, 0.4, {"tune_beta": True, "beta_grid": [0.0, 0.3]}, heldout=held)
    with caplog.at_level("INFO"):
        allocate("drank", units, ctx)
    assert "chose beta" in caplog.text
    with pytest.raises(SvdzipError, match="tuning beta needs held-out calibration tokens"):
        allocate("drank", units, _ctx(setup, units, 0.4, {"tune_beta": True}))


def test_loss_aware_guard_keeps_whichever_loses_less_on_heldout(setup, monkeypatch, caplog):
    from svdzip.allocate import common

    units = setup[4][1]
    held = tiny_tokens(n=2, seed=7)
    plain = allocate("loss-aware", units, _ctx(setup, units, 0.4, heldout=held)).ranks
    uniform = allocate("uniform", units, _ctx(setup, units, 0.4, heldout=held)).ranks
    assert plain != uniform
    real = common.heldout_loss
    seen = []

    def spy(u, ranks, model, tokens, batch_size=4):
        seen.append((list(ranks), tokens))
        return real(u, ranks, model, tokens, batch_size)

    monkeypatch.setattr(common, "heldout_loss", spy)
    guarded = allocate("loss-aware", units, _ctx(setup, units, 0.4, {"guard": "true"}, held)).ranks
    assert [r for r, _ in seen] == [plain, uniform] and all(t is held for _, t in seen)
    losses = [real(units, r, setup[0], held) for r in (plain, uniform)]
    assert guarded == (plain if losses[0] <= losses[1] else uniform)

    # whichever is cheaper on held-out text wins: make uniform the cheaper one
    monkeypatch.setattr(common, "heldout_loss", lambda u, ranks, *a, **k: 0.0 if list(ranks) == uniform else 1.0)
    with caplog.at_level("WARNING"):
        assert allocate("loss-aware", units, _ctx(setup, units, 0.4, {"guard": True}, held)).ranks == uniform
    assert "uniform allocation loses less" in caplog.text
    with pytest.raises(SvdzipError, match=r"tuning guard \(0 = loss-aware, 1 = uniform\) needs held-out"):
        allocate("loss-aware", units, _ctx(setup, units, 0.4, {"guard": True}))


def test_heldout_windows_are_declared_by_tune_beta_and_guard():
    from svdzip.allocate import allocator_needs

    assert allocator_needs("drank", {"tune_beta": "true"}).heldout
    assert allocator_needs("loss-aware", {"guard": "true"}).heldout
    assert allocator_needs("ara", {"init": "drank", "init_tune_beta": 1}).heldout
    assert not allocator_needs("loss-aware", {"guard": "false"}).heldout
    assert not allocator_needs("loss-aware", {}).heldout


@pytest.mark.parametrize("family", ["mistral", "gemma3", "opt"])
def test_allocators_end_to_end_other_families(family):
    model, tokens = tiny_model(family), tiny_tokens()
    stats = collect_statistics(model, tokens, 4, "cpu")
    for name in ("drank", "loss-aware"):
        m = tiny_model(family)
        result = compress(m, Recipe.plain(ratio=0.3, allocator=name), stats=stats, calib_tokens=tokens)
        assert result.summary["ratio_achieved"] >= 0.3
        assert torch.isfinite(m(tokens[:1]).logits).all()


def test_plots_and_info_grid(setup, tmp_path):
    from svdzip.report.plots import write_plots
    from svdzip.report.tables import rank_grid

    model, tokens, stats = tiny_model("llama"), setup[1], setup[2]
    result = compress(model, Recipe.plain(ratio=0.4, allocator="drank", group_size=2), stats=stats,
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
    config = Recipe.plain(ratio=0.4, allocator="drank", calib_samples=4, calib_seq_len=24, heldout_samples=2,
                          allocator_options={"tune_beta": True, "beta_grid": [0.0, 0.3]})
    tokens, held = calibration_tokens_for(None, config, union(part_needs(config)))
    assert drawn["n"] == 6 and tokens.shape == (4, 24) and held.shape == (2, 24)
    assert torch.equal(tokens, tiny_tokens(n=6, seq=24, seed=config.seed)[:4])  # the usual windows come first
    with caplog.at_level("INFO"):
        result = compress(tiny_model("llama"), config, calib_tokens=tokens, heldout_tokens=held)
    assert "chose beta" in caplog.text and "2 held-out" in caplog.text
    assert result.effective_ranks and "heldout_tokens" not in config.allocator_options


# --------------------------------------------------------------------------- the registry, options and needs


def test_registry_lists_objects_that_declare_their_options():
    from svdzip.allocate import available, get_allocator

    names = available()
    assert names == sorted(["uniform", "drank", "svdllm-v2", "loss-aware", "ara", "strs", "speedaware",
                            "block-influence"])
    for name in names:
        allocator = get_allocator(name)
        assert allocator.name == name and allocator.summary
        assert all(o.doc and o.kind for o in allocator.options)
        defaults = allocator.parse_options({})
        assert allocator.parse_options(defaults) == defaults  # parsing is idempotent
    assert [n for n in names if get_allocator(n).byte_aware] == ["loss-aware"]
    assert [n for n in names if get_allocator(n).slims] == ["block-influence", "loss-aware", "uniform"]
    with pytest.raises(SvdzipError, match="unknown allocator 'dranc'; choose from ara, block-influence, drank"):
        get_allocator("dranc")


@pytest.mark.parametrize("name,raw,expected", [
    ("drank", {"beta_grid": "0,0.1"}, {"beta_grid": [0.0, 0.1]}),  # comma-separated text is a list
    ("drank", {"beta_grid": "[0, 0.2]", "beta": "0.25", "tune_beta": "yes"},
     {"beta_grid": [0.0, 0.2], "beta": 0.25, "tune_beta": True}),
    ("drank", {"beta": "auto"}, {"beta": None}),
    ("loss-aware", {"fisher_samples": 4.0, "guard": 1}, {"fisher_samples": 4, "guard": True}),
    ("ara", {"lr": "auto", "steps": "64", "init": "drank", "init_mode": "code"},
     {"lr": "auto", "steps": 64, "init_mode": "code", "init_rebalance": True}),
    ("strs", {"candidates": 0.5, "cache": "/tmp/strs-cache", "batch_size": "auto"},
     {"candidates": [0.5], "cache": "/tmp/strs-cache", "batch_size": None}),
])
def test_options_are_typed_from_text_or_values(name, raw, expected):
    from svdzip.allocate import parse_allocator_options

    parsed = parse_allocator_options(name, raw)
    assert {k: parsed[k] for k in expected} == expected


@pytest.mark.parametrize("name,raw,message", [
    ("drank", {"beta_grid": "0,abc"}, r"beta_grid=0,abc of 'drank' is not valid: expected a non-empty list"),
    ("drank", {"beta_grid": [0.2, 1.5]}, r"beta_grid=\[0.2, 1.5\].*\[0, 1\)"),
    ("drank", {"betta": 0.1}, r"unknown option\(s\) betta for the 'drank' allocator; 'drank' takes: beta \("),
    ("drank", {"mode": "fancy"}, r"expected one of paper, code"),
    ("drank", {"tune_beta": "maybe"}, r"expected true or false"),
    ("loss-aware", {"fisher_samples": "2.5"}, r"expected a whole number"),
    ("loss-aware", {"fisher_batch": 0}, r"expected a value ≥ 1"),
    ("loss-aware", {"signal": "fishy"}, r"expected one of fisher, local, whitened, relative, erank"),
    ("uniform", {"beta": 0.3}, r"'uniform' takes no options"),
    ("ara", {"steps": "many"}, r"steps=many of 'ara' is not valid: expected a number"),
    ("ara", {"init": "uniform", "init_beta": 0.2},
     r"'uniform' takes no options \(given to ARA as init_<key>=value for init=uniform\)"),
    ("ara", {"init_beta": 0.2}, r"beta for the 'loss-aware' allocator.*for init=auto\)"),  # auto's: loss-aware's
    ("strs", {"candidates": [0.5, 1.0]}, r"strictly between 0 and 1"),
])
def test_bad_options_are_one_clear_error(name, raw, message):
    from svdzip.allocate import parse_allocator_options

    with pytest.raises(SvdzipError, match=message):
        parse_allocator_options(name, raw)


def test_cli_refuses_a_malformed_option_before_loading_anything(monkeypatch, tmp_path, capsys):
    import svdzip.output.loading as loading
    from svdzip.cli import main

    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(loading, "load_model", no_load)
    rc = main(["compress", "--model", "smollm2-135m", "--allocator", "drank", "--allocator-option",
               "beta_grid=0,abc", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "beta_grid=0,abc" in err and "Traceback" not in err and "beta_grid (list of numbers" in err
    rc = main(["compress", "--model", "smollm2-135m", "--allocator", "drank", "--allocator-option",
               "beta_gird=0.1", "--out", str(tmp_path / "x")])
    assert rc == 2 and "unknown option(s) beta_gird" in capsys.readouterr().err


NEEDS_CASES = [
    ("uniform", {}, dict()),
    ("svdllm-v2", {}, dict()),
    ("drank", {}, dict()),
    ("drank", {"tune_beta": True}, dict(heldout=True, whole_model=True)),
    ("loss-aware", {}, dict(calib_tokens=True, gradients=True, whole_model=True)),
    ("loss-aware", {"signal": "relative"}, dict()),
    # the guard may compare with block influence (slimmed modules), which runs the model over calibration windows
    ("loss-aware", {"signal": "relative", "guard": "true"}, dict(heldout=True, calib_tokens=True, whole_model=True)),
    ("ara", {}, dict(calib_tokens=True, gradients=True, whole_model=True)),
    # auto's init options are loss-aware's (for the hybrid's choice): its guard's held-out windows
    ("ara", {"init_guard": "true"}, dict(calib_tokens=True, gradients=True, whole_model=True, heldout=True)),
    ("ara", {"init": "drank", "init_tune_beta": True}, dict(calib_tokens=True, gradients=True, whole_model=True,
                                                            heldout=True)),
    ("strs", {}, dict(calib_tokens=True, whole_model=True)),
    ("speedaware", {}, dict()),
    ("speedaware", {"base": "loss-aware"}, dict(calib_tokens=True, gradients=True, whole_model=True)),
]


@pytest.mark.parametrize("name,options,expected", NEEDS_CASES)
def test_allocators_declare_exactly_what_they_need(name, options, expected):
    from svdzip.allocate import allocator_needs
    from svdzip.needs import Needs

    needs = allocator_needs(name, options)
    assert needs == Needs(**expected)
    assert needs.streamable == (not expected.get("whole_model", False))
    assert not needs.statistics and needs.distributable  # spectra come from the method; rank 0 allocates
    if expected:
        assert needs.why  # the reason ends up in the error that refuses a mode


def test_needs_are_what_the_allocators_use(setup, monkeypatch):
    """An allocator run with only what it declares succeeds: no model, tokens or held-out windows otherwise."""
    from svdzip.allocate import allocator_needs, speed_aware

    monkeypatch.setattr(speed_aware, "measured_speedup", lambda *a: 2.0)  # timings are not a need; keep them out

    units = setup[4][1]
    model, tokens, _, adapter, _ = setup
    held = tiny_tokens(n=2, seed=7)
    for name, options, _ in NEEDS_CASES:
        if name in ("ara", "strs"):  # trained / measured: covered by their own tests
            continue
        needs = allocator_needs(name, options)
        ctx = AllocationContext(ratio=0.4, budget=keep_budget(sum(u.dense_params for u in units), 0.4),
                                options=dict(options), adapter=adapter if needs.whole_model else None,
                                model=model if needs.whole_model else None,
                                calib_tokens=tokens if needs.calib_tokens else None,
                                heldout_tokens=held if needs.heldout else None)
        ranks = allocate(name, units, ctx).ranks
        # uniform rounds down (also as speedaware's default base), and the guard may fall back to uniform ranks
        rounds_down = "uniform" in (name, options.get("base", "uniform" if name == "speedaware" else None)) or \
            "guard" in options
        _assert_spends_the_budget(units, ranks, ctx.budget, exact=not rounds_down, case=name)


def test_streaming_refuses_what_an_allocator_declares():
    from svdzip.allocate import allocator_needs
    from svdzip.needs import Mode, refuse_unsupported

    refuse_unsupported({"allocator drank": allocator_needs("drank")}, Mode(streamed=True))
    with pytest.raises(SvdzipError, match="fisher signal"):
        refuse_unsupported({"allocator loss-aware": allocator_needs("loss-aware")}, Mode(streamed=True))
    refuse_unsupported({"allocator loss-aware": allocator_needs("loss-aware", {"signal": "relative"})},
                       Mode(streamed=True))


def test_fisher_sensitivities_live_in_the_callers_cache(setup, monkeypatch):
    from svdzip.allocate import AllocationCache, loss_aware

    units = setup[4][1]
    calls = []
    real = loss_aware.output_fisher
    monkeypatch.setattr(loss_aware, "output_fisher", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = AllocationCache()
    for ratio in (0.2, 0.4):
        ctx = _ctx(setup, units, ratio)
        ctx.cache = cache
        allocate("loss-aware", units, ctx)
    assert len(calls) == 1  # the same model and tokens at two ratios: one backward pass
    allocate("loss-aware", units, _ctx(setup, units, 0.4, {"fisher_batch": 1}))  # a fresh cache, other batching
    assert len(calls) == 2


def test_no_module_level_state_carries_results():
    from svdzip.allocate import ara, loss_aware, speed_aware

    assert not hasattr(ara, "LAST_RUN") and not hasattr(loss_aware, "_FISHER_CACHE")
    assert not hasattr(speed_aware, "_CACHE")


def test_output_fisher_equals_the_batch_mean_loss_gradient():
    """One window at a time, the output Fisher is the batch's: Σ (∂ mean-batch-loss / ∂y)² per linear output."""
    from svdzip.allocate.loss_aware import output_fisher

    model = tiny_model("llama")
    tokens = tiny_tokens(4, 12)
    names = ["model.layers.0.mlp.down_proj", "model.layers.2.self_attn.q_proj"]
    got = output_fisher(model, names, tokens, batch_size=2)
    outs, acc = {}, {n: 0.0 for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o))
             for n in names]
    for start in (0, 2):
        ids = tokens[start : start + 2]
        logits = model(input_ids=ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        grads = torch.autograd.grad(loss, [outs[n] for n in names])
        for n, g in zip(names, grads, strict=True):
            acc[n] += float(g.double().pow(2).sum())
    for h in hooks:
        h.remove()
    for n in names:
        count = tokens.shape[0] * tokens.shape[1] * model.get_submodule(n).out_features
        assert got[n] == pytest.approx(acc[n] / count, rel=1e-4)


def test_ara_s_auto_start_records_only_the_options_given_for_it():
    """init=auto starts uniform (or, for the hybrid, from loss-aware's choice): a plain run records no loss-aware
    defaults, and what was given for loss-aware is checked and kept."""
    from svdzip.allocate import parse_allocator_options

    assert not any(k.startswith("init_") for k in parse_allocator_options("ara", {}))
    given = parse_allocator_options("ara", {"init_guard": "true"})
    assert {k: v for k, v in given.items() if k.startswith("init_")} == {"init_guard": True}
