"""ARA: the staircase mask, its initialisation, gradient flow, the dense branch and the final budget."""

from dataclasses import replace

import pytest
import torch
from tiny_models import tiny_model, tiny_tokens

from svdzip import Recipe, compress
from svdzip.allocate import AllocationContext, allocate
from svdzip.allocate.ara import AraOptions, _Installed, _targets, finalise, mask_rank_max, training_windows
from svdzip.allocate.ara_mask import StaircaseMask, candidates, init_logits, staircase
from svdzip.budget import keep_budget, max_useful_rank
from svdzip.errors import SvdzipError
from svdzip.methods.decompose import decompose
from svdzip.models.adapter import ModelAdapter
from svdzip.passes.calibrate import collect_statistics


def _setup(family: str = "llama", ratio: float = 0.3, **options):
    model = tiny_model(family)
    tokens = tiny_tokens(6, 24)
    stats = collect_statistics(model, tokens, batch_size=3)
    adapter = ModelAdapter(model)
    units = decompose(adapter, stats, "svdllm")
    total = sum(u.dense_params for u in units)
    ctx = AllocationContext(ratio=ratio, budget=keep_budget(total, ratio), options=options, adapter=adapter,
                            model=model, calib_tokens=tokens, seed=0)
    return model, units, ctx


def _assert_within_budget(units, ranks, budget):
    """At most the budget, less than one more rank of any factorised unit below it, every rank usable."""
    used = sum(u.dense_params if r is None else r * u.cost_per_rank for u, r in zip(units, ranks, strict=True))
    assert used <= budget
    assert budget - used < min(u.cost_per_rank for u, r in zip(units, ranks, strict=True) if r is not None)
    assert all(r is None or 1 <= r <= max_useful_rank(u.rows, u.cols) for u, r in zip(units, ranks, strict=True))


@pytest.mark.parametrize("target", [0.8 / 1.2, 0.6 / 1.2, 0.5, 0.123, 0.99])
def test_initial_expected_retention_is_the_target(target):
    probs = torch.softmax(init_logits(target), 0)
    assert abs(float(probs @ candidates()) - target) < 1e-6
    assert init_logits(target).dtype == torch.float32


def test_staircase_mask_is_monotone_and_prefix():
    rank_max = 37
    m = staircase(rank_max)
    assert m.shape == (101, rank_max)
    assert m[0].sum() == rank_max and m[-1].sum() == 0
    assert m.sum(1).tolist() == [rank_max * (100 - i) // 100 for i in range(101)]
    mask = StaircaseMask(rank_max, 0.5)
    r_hat = mask.refresh()
    soft = torch.softmax(mask.logits, 0) @ mask.stairs
    assert torch.all(soft[1:] <= soft[:-1] + 1e-7)  # P(rank > j) is non-increasing
    hard_rank = round(rank_max * float(r_hat.detach()))
    assert mask.current.detach().tolist() == [1.0] * hard_rank + [0.0] * (rank_max - hard_rank)


def test_gradients_reach_the_logits_and_model_is_restored():
    model, units, ctx = _setup()
    ids = ctx.calib_tokens[:2]
    with torch.no_grad():
        ref = model(ids).logits.clone()
    opts = AraOptions()
    inst = _Installed(units, ctx, [0.7 / 1.2] * len(units), opts)
    try:
        for m in inst.masks:
            m.refresh()
        model(input_ids=ids, labels=ids).loss.backward()
        grads = [m.logits.grad for m in inst.masks]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) > 0 for g in grads) == len(grads)
    finally:
        inst.restore()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_full_rank_mask_reproduces_the_dense_layer_and_past_ratio_one_runs_dense():
    model, units, ctx = _setup()
    unit = units[0]
    x = torch.randn(5, unit.cols)
    dense_out = ctx.adapter.module(unit.name)(x)
    inst = _Installed([unit], ctx, [0.99], AraOptions())
    try:
        mod = ctx.adapter.module(unit.name)
        mask = inst.masks[0]
        r_hat = mask.refresh()
        assert 1.2 * float(r_hat.detach()) >= 1 and mask.dense  # pushed past ratio 1: the dense branch
        assert torch.equal(mod(x), dense_out)
        # just below 1: low rank, masked, and no longer exactly the dense output
        with torch.no_grad():
            mask.logits.copy_(init_logits(0.7))
        mask.refresh()
        assert not mask.dense
        assert not torch.equal(mod(x), dense_out)
    finally:
        inst.restore()


def test_a_full_prefix_of_the_whitened_factors_reproduces_the_dense_layer():
    """Where rank_max reaches min(m, n) (ρ₀ = 1.6 on tiny Gemma 3's 8×32 K/V projections: one KV head, the basis
    holds all 8 directions), the unmasked factors are W itself; a partial mask is not."""
    model, units, ctx = _setup("gemma3")
    opts = AraOptions.from_options({"rho0": 1.6})
    full = [u for u in units if mask_rank_max(u, opts.rho0) >= min(u.rows, u.cols)]
    assert {u.role for u in full} == {"k", "v"}, [(u.name, u.rows, u.cols) for u in full]
    unit = full[0]
    x = torch.randn(5, unit.cols, generator=torch.Generator().manual_seed(0))
    dense_out = ctx.adapter.module(unit.name)(x)
    inst = _Installed([unit], ctx, [0.3], opts)
    try:
        mod, mask = ctx.adapter.module(unit.name), inst.masks[0]
        mask.refresh()
        assert not mask.dense and inst.rank_max[0] == min(unit.rows, unit.cols)
        assert not torch.allclose(mod(x), dense_out, atol=1e-3)  # ~30 % of the rank: not W
        mask.current = torch.ones(inst.rank_max[0])
        torch.testing.assert_close(mod(x), dense_out, atol=1e-4, rtol=1e-4)
    finally:
        inst.restore()
    assert ctx.adapter.module(unit.name) is not mod  # the dense linear is back


def test_sticky_dense_keeps_a_module_dense():
    mask = StaircaseMask(10, 0.95, sticky_dense=True)
    mask.refresh()
    assert mask.dense
    with torch.no_grad():
        mask.logits.copy_(init_logits(0.3))
    mask.refresh()
    assert mask.dense
    mask.sticky_dense = False
    mask.refresh()
    assert not mask.dense


def test_finalise_meets_the_budget_and_snaps_dense():
    _, units, ctx = _setup(ratio=0.3)
    r_max = [int(u.rows * u.cols * 1.2 / (u.rows + u.cols)) for u in units]
    r_hats = [0.9 if i == 0 else 0.55 for i in range(len(units))]  # unit 0: ρ = 1.08 → dense
    ranks = finalise(units, r_hats, r_max, ctx.budget / sum(u.dense_params for u in units), ctx.budget)
    assert ranks[0] is None
    used = sum(u.dense_params if r is None else r * u.cost_per_rank for u, r in zip(units, ranks, strict=True))
    assert used <= ctx.budget
    assert ctx.budget - used < min(u.cost_per_rank for u, r in zip(units, ranks, strict=True) if r is not None)


def test_allocator_trains_and_meets_budget(tmp_path):
    from svdzip.report.plots import write_allocation_report

    model, units, ctx = _setup(steps=6, seq_len=12, lr=0.05)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    allocation = allocate("ara", units, ctx)
    ranks = allocation.ranks
    _assert_within_budget(units, ranks, ctx.budget)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # model untouched
    assert len(allocation.report["history"]) == 6 and allocation.allocator == "ara"
    assert list(tmp_path.iterdir()) == []  # the allocator itself writes nothing
    written = write_allocation_report(tmp_path, units, allocation)
    assert {p.name for p in written} == {"ara_loss.png", "ara_ratios.png", "ara_history.json"}
    assert all(p.stat().st_size > 500 for p in written)
    again = allocate("ara", units, ctx)
    assert again.ranks == ranks  # deterministic with the seed


def test_compress_writes_ara_plots_from_the_report(tmp_path):
    model = tiny_model("llama")
    cfg = Recipe.plain(ratio=0.3, allocator="ara", allocator_options={"steps": 2, "seq_len": 12},
                         calib_batch_size=2)
    from svdzip.engine.pipeline import factorise

    def spectra(model):
        return decompose(ModelAdapter(model), collect_statistics(model, tiny_tokens(4, 24), 2, "cpu"), "svdllm")

    result = factorise(model, cfg, spectra(model), calib_tokens=tiny_tokens(4, 24), out_dir=tmp_path)
    assert len(result.allocation_report["history"]) == 2
    assert {p.name for p in tmp_path.iterdir()} == {"ara_loss.png", "ara_ratios.png", "ara_history.json"}
    plain = tmp_path / "no_plots"
    plain.mkdir()
    cfg.allocator_options["plot"] = "false"
    model = tiny_model("llama")
    factorise(model, cfg, spectra(model), calib_tokens=tiny_tokens(4, 24), out_dir=plain)
    assert {p.name for p in plain.iterdir()} == {"ara_history.json"}


@pytest.mark.parametrize("rho0", [1.2, 1.6])
def test_one_rank_max_for_targets_mask_and_dense_test(rho0):
    """Where the basis caps rank_max (rho0 above the spectra's 1.2 headroom, or a very skewed matrix), the
    targets, the mask's dense branch and finalise all measure retention against that same rank_max."""
    from svdzip.allocate.ara_mask import over_complete_rank

    _, units, ctx = _setup(ratio=0.3)
    opts = AraOptions.from_options({"rho0": rho0})
    kept = ctx.budget / sum(u.dense_params for u in units)
    targets = _targets(units, ctx, opts, kept)
    capped = 0
    for unit, target in zip(units, targets, strict=True):
        r_max = mask_rank_max(unit, rho0)
        capped += r_max < over_complete_rank(unit.rows, unit.cols, rho0)
        # the uniform start keeps `kept` of the unit's parameters, whatever caps rank_max
        assert target * r_max * unit.cost_per_rank / unit.dense_params == pytest.approx(kept, abs=2 / r_max)
    assert (capped > 0) == (rho0 > 1.2)
    inst = _Installed(units, ctx, targets, opts)
    try:
        for unit, mask, r_max in zip(units, inst.masks, inst.rank_max, strict=True):
            assert r_max == mask_rank_max(unit, rho0)
            # the dense branch starts where the mask's rank would cost what the dense matrix costs
            for r_hat in (0.5, 0.8, 0.9, 0.999):
                with torch.no_grad():
                    mask.logits.copy_(init_logits(r_hat))
                mask.refresh()
                rank_cost = float(mask.retention().detach()) * r_max * unit.cost_per_rank
                rounding = 1.5 / over_complete_rank(unit.rows, unit.cols, rho0)  # of int(m·n·ρ₀/(m+n))
                if rank_cost >= unit.dense_params:
                    assert mask.dense, (unit.name, r_hat)
                elif rank_cost < (1 - rounding) * unit.dense_params:
                    assert not mask.dense, (unit.name, r_hat)
    finally:
        inst.restore()
    # finalise: a retention whose rank costs more than dense is kept dense, one well below is factorised
    r_max = inst.rank_max
    full = [min(0.999, 1.05 * u.dense_params / (rm * u.cost_per_rank)) for u, rm in zip(units, r_max, strict=True)]
    ranks = finalise(units, full, r_max, 1.0, sum(u.dense_params for u in units), rho0)
    over = [i for i, (u, f, rm) in enumerate(zip(units, full, r_max, strict=True))
            if f * rm * u.cost_per_rank >= 0.99 * u.dense_params]
    assert over and all(ranks[i] is None for i in over)


@pytest.mark.parametrize("family", ["llama", "gemma3", "opt"])
def test_compress_with_ara_end_to_end(family):
    model = tiny_model(family)
    tokens = tiny_tokens(4, 24)
    cfg = Recipe.plain(ratio=0.25, allocator="ara", allocator_options={"steps": 3, "seq_len": 12},
                         calib_batch_size=2)
    result = compress(model, cfg, calib_tokens=tokens)
    assert result.summary["decoder_linear_params_after"] <= keep_budget(
        result.summary["decoder_linear_params_before"], 0.25)
    with torch.no_grad():
        assert torch.isfinite(model(tokens).logits).all()


def test_init_from_another_allocator():
    _, units, ctx = _setup(steps=2, seq_len=12, init="drank", init_mode="code")
    opts = AraOptions.from_options(ctx.options)
    # the mask starts at D-Rank's ranks (init_<key> options reach it), not at the uniform target
    start = allocate("drank", units, replace(ctx, options={"mode": "code"})).ranks
    targets = _targets(units, ctx, opts, ctx.budget / sum(u.dense_params for u in units))
    for unit, rank, target in zip(units, start, targets, strict=True):
        if rank is not None:
            assert round(target * mask_rank_max(unit, opts.rho0)) == rank, unit.name
    assert len(set(start)) > 1  # D-Rank's ranks differ by matrix: a uniform start could not pass the loop above
    ranks = allocate("ara", units, ctx).ranks
    _assert_within_budget(units, ranks, ctx.budget)
    ctx.options = {"steps": 1, "seq_len": 12, "init": "ara"}
    with pytest.raises(SvdzipError, match="itself"):
        allocate("ara", units, ctx)
    ctx.options = {"steps": 1, "init": "drank", "init_mode": "fancy"}
    with pytest.raises(SvdzipError, match="mode=fancy.*init=drank"):
        allocate("ara", units, ctx)


def test_bad_options_and_windows():
    with pytest.raises(SvdzipError, match="unknown option.*stepz.*'ara'"):
        AraOptions.from_options({"stepz": 3})
    with pytest.raises(SvdzipError, match="rho0"):
        AraOptions.from_options({"rho0": 1.0})
    assert AraOptions.from_options({"steps": "64"}).learning_rate == pytest.approx(0.04)
    tokens = torch.tensor([[1, 5, 6, 7, 8, 9, 10]])
    w = training_windows(tokens, 3, 0, bos_id=1)
    assert w.tolist() == [[1, 5, 6], [1, 7, 8], [1, 9, 10]]


def test_ara_ranks_save_and_reload_like_any_method(tmp_path):
    import svdzip
    from svdzip.output.io import build_manifest, save

    model = tiny_model("llama")
    tokens = tiny_tokens(4, 24)
    cfg = Recipe.plain(ratio=0.3, allocator="ara", group_size=2,  # shared bases: one mask per group
                         allocator_options={"steps": 2, "seq_len": 12}, calib_batch_size=2)
    result = compress(model, cfg, calib_tokens=tokens)
    save(model, None, tmp_path / "m", build_manifest(result.modules, result.summary, cfg.to_dict()))
    loaded, _ = svdzip.load(tmp_path / "m", with_tokenizer=False)
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
