"""FWSVD's Fisher, the two weight updates and ASVD's STRS, each checked against brute force."""

import math

import pytest
import torch
from tiny_models import tiny_model, tiny_tokens

from svdzip import Recipe, compress
from svdzip.allocate import strs as strs_mod
from svdzip.models.adapter import ModelAdapter
from svdzip.models.lowrank import LowRankLinear
from svdzip.passes.calibrate import collect_statistics
from svdzip.passes.fisher import collect_fisher
from svdzip.passes.update import fitted_loss, refit_left


@pytest.mark.parametrize("family", ["llama", "opt", "gemma3"])
def test_fisher_equals_autograd(family):
    model, tokens = tiny_model(family), tiny_tokens(4, 16)
    fisher = collect_fisher(model, tokens, batch_size=2)
    adapter = ModelAdapter(model)
    ref = {i.name: torch.zeros(i.in_features, dtype=torch.float64) for i in adapter.linears()}
    for b in range(2):
        model.zero_grad()
        ids = tokens[2 * b : 2 * b + 2]
        model(input_ids=ids, labels=ids).loss.backward()  # the full-model backward, all at once
        for i in adapter.linears():
            ref[i.name] += adapter.module(i.name).weight.grad.double().pow(2).mean(0) / 2
    assert set(fisher) == set(ref)
    for name, value in fisher.items():
        assert torch.allclose(value, ref[name], rtol=1e-4, atol=1e-12), name
    assert all(p.grad is None or p.grad.abs().sum() > 0 for p in model.parameters())


def test_refit_left_is_the_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64)
    w = torch.randn(9, 12, generator=g, dtype=torch.float64)
    b = torch.randn(4, 12, generator=g, dtype=torch.float64)
    a = refit_left(w, b, x.T @ x)
    brute = torch.linalg.lstsq(x @ b.T, x @ w.T).solution.T
    assert torch.allclose(a, brute, atol=1e-9)
    a0 = torch.randn(9, 4, generator=g, dtype=torch.float64)
    assert fitted_loss(w, a, b, x.T @ x) <= fitted_loss(w, a0, b, x.T @ x)
    # a singular Gram (fewer samples than inputs) must not break the solve
    xs = x[:3]
    a_s = refit_left(w, b, xs.T @ xs)
    assert torch.isfinite(a_s).all()


def _layer_inputs(model, adapter, tokens):
    """(hidden, kwargs) entering every decoder layer during a normal forward (brute force)."""
    seen = {}

    def grab(index):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            seen[index] = (h.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"})

        return hook

    handles = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(adapter.layers)]
    with torch.no_grad():
        model(tokens, use_cache=False)
    for h in handles:
        h.remove()
    return seen


def _sublayer_inputs(layer, modules, hidden, kwargs):
    xs = {}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: xs.__setitem__(n, a[0].reshape(-1, a[0].shape[-1])))
               for n, m in modules.items()]
    with torch.no_grad():
        layer(hidden, **kwargs)
    for h in handles:
        h.remove()
    return xs


@pytest.mark.parametrize("update", ["svdllm", "coef"])
@pytest.mark.parametrize("family,group", [("llama", 1), ("opt", 1), ("llama", 3)])
def test_update_never_increases_fitted_output_error(update, family, group):
    """Per linear, on the very inputs X' it was fitted on: ‖X'(W − A_new B)ᵀ‖ ≤ ‖X'(W − A_old B)ᵀ‖,
    and A_new is the brute-force least-squares solution."""
    tokens = tiny_tokens(8, 24)
    dense = tiny_model(family)
    stats = collect_statistics(dense, tokens, 4)
    cfg = dict(ratio=0.5, group_size=group)
    plain = compress(tiny_model(family), Recipe.plain(**cfg), stats=stats, calib_tokens=tokens).model
    updated = compress(tiny_model(family), Recipe.plain(**cfg, update=update), stats=stats,
                       calib_tokens=tokens).model
    ad_dense, ad_up, ad_plain = ModelAdapter(dense), ModelAdapter(updated), ModelAdapter(plain)
    inputs = _layer_inputs(updated, ad_up, tokens)  # the deviated inputs of every (final) layer
    improved = 0
    for index, (hidden, kwargs) in inputs.items():
        infos = ad_up.layer_linears(index)
        if update == "svdllm":  # X' = what the ORIGINAL layer feeds its linears on the deviated input
            xs = _sublayer_inputs(ad_dense.layers[index], {i.name: ad_dense.module(i.name) for i in infos},
                                  hidden, kwargs)
        else:  # X' = what the compressed (updated) layer feeds them
            xs = _sublayer_inputs(ad_up.layers[index], {i.name: ad_up.module(i.name) for i in infos}, hidden, kwargs)
        for info in infos:
            new, old = ad_up.module(info.name), ad_plain.module(info.name)
            assert isinstance(new, LowRankLinear)
            x = xs[info.name].double()
            w = ad_dense.module(info.name).weight.double()
            right = new.right.weight.double()
            assert torch.equal(right, old.right.weight.double())  # the basis is kept
            loss_new = fitted_loss(w, new.left.weight, right, x.T @ x)
            loss_old = fitted_loss(w, old.left.weight, right, x.T @ x)
            assert loss_new <= loss_old * (1 + 1e-5) + 1e-9, info.name
            brute = torch.linalg.lstsq(x @ right.T, x @ w.T).solution.T
            assert fitted_loss(w, brute, right, x.T @ x) >= loss_new * (1 - 1e-4) - 1e-9
            improved += loss_new < loss_old * (1 - 1e-3)
    assert improved > 0


def test_update_composes_in_the_label():
    assert Recipe.plain(method="svdllm", allocator="drank", update="svdllm").label == "svdllm+drank+update"
    assert Recipe.plain(method="asvd", allocator="strs").label == "asvd+strs"
    assert Recipe.plain(group_size=2, update="coef").label == "svdllm+share2+update-coef"


def test_fwsvd_end_to_end_computes_fisher():
    tokens = tiny_tokens(4, 16)
    result = compress(tiny_model("qwen3"), Recipe.plain(ratio=0.3, method="fwsvd", calib_batch_size=2),
                      calib_tokens=tokens)
    assert "fisher_s" in result.summary
    with torch.no_grad():
        assert torch.isfinite(result.model(tokens).logits).all()


def _search_by_scan(units, table, budget):
    entries = sorted(((p, j, k) for j, row in enumerate(table) for k, p in row.items()), key=lambda e: -e[0])
    best = None
    for mid in range(len(entries) + 1):
        kept = [1.0] * len(units)
        for _, j, k in entries[mid:]:
            kept[j] = min(kept[j], k)
        if sum(strs_mod._params(u, k) for u, k in zip(units, kept, strict=True)) <= budget:
            best = kept
    return best


def test_fisher_is_saved_with_the_statistics_and_reused(tmp_path, monkeypatch):
    from svdzip.engine.pipeline import prepare_statistics
    from svdzip.passes import fisher as fisher_mod

    model, tokens = tiny_model("llama"), tiny_tokens(4, 16)
    calls = []
    real = fisher_mod.collect_fisher
    monkeypatch.setattr(fisher_mod, "collect_fisher", lambda *a, **k: calls.append(1) or real(*a, **k))
    path = tmp_path / "stats.safetensors"
    plain = prepare_statistics(model, tokens, "tiny", Recipe.plain(method="svdllm"), path)
    assert not plain.fisher and not calls  # only fwsvd pays for the backward pass
    first = prepare_statistics(model, tokens, "tiny", Recipe.plain(method="fwsvd"), path)
    again = prepare_statistics(model, tokens, "tiny", Recipe.plain(method="fwsvd", ratio=0.5), path)
    assert len(calls) == 1 and first.fisher.keys() == again.fisher.keys()
    assert all(torch.equal(first.fisher[k], again.fisher[k]) for k in first.fisher)
    assert all(torch.equal(plain.grams[k], again.grams[k]) for k in plain.grams)


def test_strs_meets_budget_and_caches(tmp_path, monkeypatch):
    tokens = tiny_tokens(6, 20)
    model = tiny_model("llama")
    stats = collect_statistics(model, tokens, 3)
    options = {"cache": str(tmp_path), "samples": 2, "candidates": [0.1, 0.3, 0.5, 0.7, 0.9]}
    calls = []
    real = strs_mod.sensitivity_table
    monkeypatch.setattr(strs_mod, "sensitivity_table", lambda *a, **k: calls.append(1) or real(*a, **k))
    for ratio in (0.3, 0.6):
        cfg = Recipe.plain(ratio=ratio, method="asvd", allocator="strs", allocator_options=options)
        result = compress(tiny_model("llama"), cfg, stats=stats, calib_tokens=tokens)
        assert result.summary["ratio_achieved"] >= ratio - 1e-9  # never over budget
        assert result.config.label == "asvd+strs"
    assert len(calls) == 1  # the second ratio reused the cached sensitivity table
    assert len(list(tmp_path.glob("*.json"))) == 1

    # the binary search equals a linear scan for the largest feasible cut-off
    from svdzip.methods.decompose import decompose, group_linears

    adapter = ModelAdapter(model)
    units = decompose(adapter, stats, "asvd", group_linears(adapter))
    g = torch.Generator().manual_seed(3)
    table = [{k: float(torch.rand(1, generator=g)) * (1 - k) * 10 for k in (0.1, 0.3, 0.5, 0.9)} for _ in units]
    table[0][0.1] = math.inf
    dense = sum(u.dense_params for u in units)
    for frac in (0.2, 0.5, 0.8):
        budget = int(frac * dense)
        assert strs_mod.search(units, table, budget) == _search_by_scan(units, table, budget)
