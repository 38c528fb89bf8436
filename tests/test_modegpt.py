"""MoDeGPT's Type I module (MLPs slimmed by Nyström) and its allocation: the maths against brute force on small
matrices, the block-influence allocation, and compress → save → reload on tiny models of every MLP family."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from tiny_models import WIDE, tiny_model, tiny_tokens
from transformers import AutoModelForCausalLM

import svdzip
from svdzip import Recipe, SvdzipError, compress
from svdzip.allocate.block_influence import layer_sparsities
from svdzip.cli import main
from svdzip.methods.factorisations import get_method
from svdzip.methods.nystrom import leverage_order, nystrom_curve, nystrom_refit, ridge_leverage_scores
from svdzip.models.adapter import ModelAdapter
from svdzip.passes.block_influence import block_influence


def _activations(n: int = 200, m: int = 12, seed: int = 0) -> torch.Tensor:
    """Correlated activations with a few loud neurons, as an MLP's are."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, m, generator=g, dtype=torch.float64) @ torch.randn(m, m, generator=g, dtype=torch.float64)
    return h * torch.logspace(0, 1.5, m, dtype=torch.float64)


def test_ridge_leverage_scores_are_the_diagonal_of_the_ridge_hat_matrix():
    c = (lambda h: h.T @ h)(_activations())
    for ridge in (1e-3, 1e-2, 1.0):
        lam = ridge * float(torch.diagonal(c).mean())
        brute = torch.diagonal(c @ torch.linalg.inv(c + lam * torch.eye(c.shape[0], dtype=c.dtype)))
        assert torch.allclose(ridge_leverage_scores(c, ridge), brute, atol=1e-10)
    # a rescaled correlation selects the same neurons (the ridge is relative to the mean activation energy)
    assert torch.equal(leverage_order(c, 1e-2), leverage_order(1e6 * c, 1e-2))


@pytest.mark.parametrize("k", [1, 5, 11])
def test_nystrom_refit_is_the_least_squares_down_projection_and_the_curve_its_residual(k):
    h = _activations()
    down = torch.randn(7, h.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))  # (d, m)
    c = h.T @ h
    order = leverage_order(c)
    sigma2 = nystrom_curve(c, down, order, jitter=0.0)
    kept = torch.sort(order[:k]).values
    refit = nystrom_refit(c, down, kept, jitter=0.0)
    target = h @ down.T
    brute = torch.linalg.lstsq(h[:, kept], target).solution  # (k, d)
    assert torch.allclose(refit, brute.T, atol=1e-8)
    residual = (target - h[:, kept] @ refit.T).pow(2).sum()
    assert float(sigma2[k:].sum()) == pytest.approx(float(residual), rel=1e-8)
    assert float(sigma2.sum()) == pytest.approx(float(target.pow(2).sum()), rel=1e-10)


def test_nystrom_with_a_ridge_stays_close_and_at_full_width_keeps_the_down_projection():
    h = _activations(m=9)
    down = torch.randn(5, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    c = h.T @ h
    assert torch.allclose(nystrom_refit(c, down, torch.arange(9), jitter=0.0), down, atol=1e-9)
    kept = torch.tensor([0, 2, 3, 7])
    exact, ridged = nystrom_refit(c, down, kept, 0.0), nystrom_refit(c, down, kept, 1e-6)
    assert float((exact - ridged).norm() / exact.norm()) < 1e-2
    with pytest.raises(SvdzipError, match="cannot keep"):
        nystrom_refit(c, down, torch.arange(10) % 9, 0.0)


def test_layer_sparsities_meet_the_mean_and_respect_the_cap():
    scores = [0.05, 0.3, 0.1, 0.02, 0.5, 0.2]
    for eps, cap in ((0.05, 0.8), (0.2, 0.5), (0.01, 0.6)):
        phi = layer_sparsities(scores, 0.3, eps, cap)
        assert sum(phi) == pytest.approx(0.3 * len(scores))
        assert max(phi) <= cap + 1e-12
        assert phi[3] >= phi[0] >= phi[2] >= phi[5] >= phi[1] >= phi[4]  # less influence, more removed
    assert layer_sparsities(scores, 0.3, 1e9, 0.8) == pytest.approx([0.3] * 6)  # ε → ∞: uniform
    assert layer_sparsities(scores, 0.9, 0.1, 0.8) == pytest.approx([0.8] * 6)  # the cap bounds the mean too
    assert layer_sparsities(scores, 0.3, 0.001, 0.8)[3] == pytest.approx(0.8)  # concentrated, then clamped


def test_block_influence_is_one_minus_the_mean_cosine_of_each_layers_input_and_output():
    model, tokens = tiny_model("llama", seed=2), tiny_tokens(4, 16)
    scores = block_influence(model, tokens, batch_size=3)
    with torch.no_grad():
        states = model(input_ids=tokens, output_hidden_states=True).hidden_states
    for i in range(len(scores) - 1):  # HF's last hidden state is after the final norm: compared by hooks only
        cos = torch.nn.functional.cosine_similarity(states[i], states[i + 1], dim=-1)
        assert scores[i] == pytest.approx(1 - float(cos.mean()), abs=1e-5)
    assert all(0.0 <= s <= 2.0 for s in scores)


def _mlp_output_error(model, compressed, tokens, layer: int) -> float:
    """Σ over tokens of ‖MLP(x) − MLP'(x)‖² at `layer`, both fed the dense model's MLP inputs."""
    dense_mlp = ModelAdapter(model).layers[layer].mlp
    slim_mlp = ModelAdapter(compressed).layers[layer].mlp
    seen = []
    handle = dense_mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(input_ids=tokens)
        handle.remove()
        x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])
        return float((dense_mlp(x) - slim_mlp(x)).double().pow(2).sum())


def test_compressed_mlp_loses_exactly_what_its_curve_says():
    """The materialised MLP's output error on the calibration inputs is the Nyström tail its unit predicted."""
    model, tokens = tiny_model("llama", seed=4), tiny_tokens(8, 24)
    recipe = Recipe.plain(method="modegpt", ratio=0.3, calib_samples=8, calib_seq_len=24, calib_batch_size=8)
    result = compress(copy.deepcopy(model), recipe, calib_tokens=tokens)
    slim = [u for u in result.units if u.role == "mlp"]
    assert len(slim) == 3 and all(u.max_rank == 47 for u in slim)
    assert {u.role for u in result.units} == {"mlp", "key-query", "value-output"}
    for unit in slim:
        layer = unit.members[0].layer
        width = next(r.width for r in result.modules if r.name == unit.members[-1].name)
        # the curve is of the dense model's calibration inputs to this MLP (statistics of the original model)
        assert _mlp_output_error(model, result.model, tokens, layer) == pytest.approx(unit.spectrum.tail(width),
                                                                                      rel=1e-3)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "opt", "mixtral"])
def test_slimmed_model_meets_the_ratio_and_reloads_to_identical_logits(family, tmp_path):
    model, tokens = tiny_model(family, seed=1, shape=WIDE), tiny_tokens(8, 24, vocab=WIDE.vocab)
    dense_linear = ModelAdapter(model).decoder_linear_params()
    scales = [m.scaling for m in model.modules() if hasattr(m, "scaling")]
    recipe = Recipe.plain(method="modegpt", ratio=0.2, calib_samples=8, calib_seq_len=24, calib_batch_size=8)
    result = compress(model, recipe, calib_tokens=tokens, out=tmp_path / "m")
    rows = {r.name: r for r in result.modules}
    slimmed = [r for r in rows.values() if r.width is not None]
    assert all(r.rank is None for r in rows.values())  # nothing factorised
    roles = {r.role for r in slimmed}
    assert {"o", "v"} <= roles and ({"q", "k"} <= roles) == (family != "gemma3")  # Gemma's q/k norms: dense
    assert all(r.params == r.in_features * r.out_features for r in rows.values() if r.width is None)
    # uniform: the same kept fraction of every module's inner dimension, within one unit of rounding each
    units = [u for u in result.units if u.slimmed]
    slack = sum(u.cost_per_rank for u in units) / dense_linear
    assert 0.2 - 1e-9 <= result.summary["ratio_achieved"] <= 0.2 + slack
    # the softmax keeps the dense 1/√d_h (the maths), not the re-implementations' 1/√r of the kept dimensions
    assert scales and [m.scaling for m in result.model.modules() if hasattr(m, "scaling")] == scales
    manifest = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert set(manifest["slimmed"]) == {r.name for r in slimmed} and not manifest["modules"]
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
        assert torch.equal(again(tokens).logits, result.model(tokens).logits)
        loaded, _ = svdzip.load(tmp_path / "m", with_tokenizer=False)
        assert torch.equal(loaded(tokens).logits, result.model(tokens).logits)
    stored = sum(p.numel() for n, p in again.named_parameters() if n.endswith("weight") and any(
        n.startswith(r.name + ".") for r in slimmed))
    assert stored == sum(r.params for r in slimmed)
    assert stored < 0.85 * sum(r.in_features * r.out_features for r in slimmed)


def test_loss_aware_and_block_influence_give_mlps_different_widths_within_the_budget():
    model, tokens = tiny_model("llama", seed=5, shape=WIDE), tiny_tokens(8, 24, vocab=WIDE.vocab)
    base = Recipe.plain(method="modegpt", ratio=0.25, calib_samples=8, calib_seq_len=24, calib_batch_size=8)
    for allocator, options in (("loss-aware", {"signal": "whitened"}),
                               ("block-influence", {"epsilon": 0.01, "samples": 4})):
        result = compress(copy.deepcopy(model), Recipe(**{**base.__dict__, "allocator": allocator,
                                                          "allocator_options": options}), calib_tokens=tokens)
        widths = [r.width for r in result.modules if r.role == "down"]
        assert len(set(widths)) > 1, allocator
        assert result.summary["ratio_achieved"] >= 0.25 - 1e-9
    assert len(result.allocation_report["layer_sparsity"]) == 2


def test_modegpt_auto_is_loss_aware_without_healing():
    recipe = Recipe(method="modegpt").resolved(scaled=False)
    assert (recipe.allocator, recipe.allocator_options, recipe.heal) == ("loss-aware", {"guard": True}, "none")


@pytest.mark.parametrize("overrides, message", [
    ({"allocator": "drank"}, "allocates factorisation ranks only"),
    ({"budget_fraction": 0.5}, "memory budget"),
    ({"heal": "seq-lora"}, "--heal seq-lora"),
    ({"heal": "layerwise"}, "--heal layerwise"),
    ({"update": "svdllm"}, "--update svdllm"),
])
def test_modegpt_refuses_what_it_cannot_do_before_any_work(overrides, message):
    with pytest.raises(SvdzipError, match=message):
        Recipe(method="modegpt", **overrides).validate()


def test_modegpt_refuses_a_fused_gate_up_projection():
    with pytest.raises(SvdzipError, match="fuses"):
        compress(tiny_model("phi3"), Recipe.plain(method="modegpt", calib_samples=4, calib_seq_len=16),
                 calib_tokens=tiny_tokens(4, 16))


def test_cli_refuses_modegpt_streamed(tmp_path, capsys):
    from tiny_models import save_tiny

    src = save_tiny(tmp_path / "src")
    code = main(["compress", "--model", str(src), "--method", "modegpt", "--stream", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "modegpt" in err and "--stream" in err and not (tmp_path / "o").exists()


# ---------------------------------------------------------------- Type II and III maths, the sliced linears

def _spd(d: int, seed: int) -> torch.Tensor:
    x = torch.randn(4 * d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return x.T @ x


@pytest.mark.parametrize("group", [1, 3])
def test_value_output_truncation_is_the_best_rank_k_of_the_whitened_concatenation(group):
    from svdzip.methods.linalg import gram_factor
    from svdzip.methods.value_output import value_output_basis

    d, d_h = 10, 6
    g = torch.Generator().manual_seed(3)
    c = _spd(d, 4)
    w_v = torch.randn(d, d_h, dtype=torch.float64, generator=g)
    w_o = torch.randn(group, d_h, d, dtype=torch.float64, generator=g)
    basis = value_output_basis(gram_factor(c), w_v, w_o)
    evals, evecs = torch.linalg.eigh(c)
    root = evecs @ torch.diag(evals.sqrt()) @ evecs.T
    target = root @ w_v @ torch.cat(list(w_o), dim=1)  # (d, g·d)
    sv = torch.linalg.svdvals(target)
    assert torch.allclose(basis.sigma2, sv[:d_h].pow(2), rtol=1e-8)
    for k in (1, 3, d_h):
        approx = root @ basis.value[:, :k] @ basis.output[:k]
        assert float((target - approx).pow(2).sum()) == pytest.approx(float(sv[k:].pow(2).sum()), abs=1e-6)


def test_key_query_scores_group_the_query_heads_and_keep_whole_rope_pairs():
    from svdzip.methods.key_query import energy_curve, kept_dims, pair_scores, selection_order

    g = torch.Generator().manual_seed(5)
    q, k = torch.rand(4, 8, generator=g, dtype=torch.float64), torch.rand(2, 8, generator=g, dtype=torch.float64)
    brute = torch.zeros(2, 4, dtype=torch.float64)
    for i in range(2):
        for p in range(4):
            brute[i, p] = sum(q[j, p] * k[i, p] + q[j, p + 4] * k[i, p + 4] for j in (2 * i, 2 * i + 1))
    assert torch.allclose(pair_scores(q, k, rope=True), brute)
    order = selection_order(q, k, rope=True)
    dims = kept_dims(order, 2, 8, rope=True)
    for i in range(2):
        top = set(torch.topk(brute[i], 2).indices.tolist())
        assert set(dims[i].tolist()) == top | {p + 4 for p in top}
    # the curve: the q and k energy of the kept pairs, in selection order, summed over the groups
    curve = energy_curve(q, k, order, rope=True)
    kept = sum(float(q[2 * i:2 * i + 2, dims[i]].sum() + k[i, dims[i]].sum()) for i in range(2))
    assert float(curve[:2].sum()) == pytest.approx(kept)
    assert kept_dims(selection_order(q, k, rope=False), 3, 8, rope=False).shape == (2, 3)


def test_rope_commutes_with_a_pair_closed_selection_only():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    d_h, n = 8, 5
    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(1, 1, n, d_h, generator=g), torch.randn(1, 1, n, d_h, generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, d_h, 2).float() / d_h))
    freqs = torch.outer(torch.arange(n).float(), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos()[None], emb.sin()[None]
    closed = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0.0])  # pairs (0,4) and (2,6)
    split = torch.tensor([1, 0, 0, 0, 0, 0, 1, 0.0])  # 0 without 4
    for mask, same in ((closed, True), (split, False)):
        rq, rk = apply_rotary_pos_emb(q * mask, k * mask, cos, sin)
        fq, fk = apply_rotary_pos_emb(q, k, cos, sin)
        assert torch.allclose(rq, fq * mask, atol=1e-6) == same
        if same:  # the scores are the dense rotated scores restricted to the kept planes
            assert torch.allclose(rq @ rk.transpose(-1, -2), (fq * mask) @ (fk * mask).transpose(-1, -2), atol=1e-5)


def test_subset_linears_are_the_dense_linear_with_the_rest_zeroed():
    from svdzip.models.sliced import column_subset, row_subset

    lin = torch.nn.Linear(6, 8)
    x = torch.randn(3, 6)
    rows = torch.tensor([1, 4, 5])
    out = row_subset(lin.weight[rows], lin.bias[rows], 8, rows)(x)
    mask = torch.zeros(8)
    mask[rows] = 1
    assert torch.allclose(out, lin(x) * mask)
    cols = torch.tensor([0, 3])
    wide = torch.randn(3, 8)
    colmod = column_subset(lin.weight[:, :2][:4], None, 8, cols)  # (4, 2) reading inputs 0 and 3
    dense = torch.zeros(4, 8)
    dense[:, cols] = lin.weight[:, :2][:4]
    assert torch.allclose(colmod(wide), wide @ dense.T)


@pytest.mark.parametrize("family", ["qwen2", "opt", "llama"])
def test_every_module_at_full_width_reproduces_the_dense_model(family):
    """Biases (Qwen's q/k/v, OPT's everywhere; v's folded into o), GQA groups, RoPE or not: at full width
    the rebuilt modules compute the dense model's logits."""
    from svdzip.methods.modegpt import MoDeGPT
    from svdzip.passes.calibrate import collect_statistics

    model, tokens = tiny_model(family, seed=7, shape=WIDE), tiny_tokens(8, 24, vocab=WIDE.vocab)
    dense = copy.deepcopy(model)
    stats = collect_statistics(model, tokens, 8, kinds={"grams"})
    adapter = ModelAdapter(model)
    units = MoDeGPT().build_units(adapter, stats, tokens=tokens)
    for unit in units:
        if unit.slimmed:
            unit.materialise(adapter, unit.module.width)
    with torch.no_grad():
        assert torch.allclose(model(tokens).logits, dense(tokens).logits, atol=1e-3)
        for unit in units:  # and one unit fewer changes them
            if unit.slimmed:
                unit.materialise(adapter, unit.module.width - 1)
        assert not torch.allclose(model(tokens).logits, dense(tokens).logits, atol=1e-3)


def test_info_shows_widths_and_the_manifest_fits_the_serving_layout(tmp_path, capsys):
    from tiny_models import tiny_tokenizer

    from svdzip.serve.layout import check_format, check_manifest, expected_linears

    model, tokens = tiny_model("llama", seed=2), tiny_tokens(8, 24)
    compress(model, Recipe.plain(method="modegpt", ratio=0.3, calib_samples=8, calib_seq_len=24),
             calib_tokens=tokens, out=tmp_path / "m", tokenizer=tiny_tokenizer())
    assert main(["info", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "linears slimmed (MoDeGPT)" in out and " w33 " in out  # floor(0.7 · 48) neurons
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    manifest = config["quantization_config"]
    check_format(manifest)  # the vLLM plugin serves it (tests/test_vllm_plugin.py); here: its checks accept it
    check_manifest(manifest["modules"], expected_linears("LlamaForCausalLM", config), manifest["slimmed"])
    assert {spec["kind"] for spec in manifest["slimmed"].values()} == {"linear", "rows", "cols"}


def _units_of(family: str, seed: int = 8):
    from svdzip.methods.modegpt import MoDeGPT
    from svdzip.passes.calibrate import collect_statistics

    model, tokens = tiny_model(family, seed=seed, shape=WIDE), tiny_tokens(8, 24, vocab=WIDE.vocab)
    stats = collect_statistics(model, tokens, 8, kinds={"grams"})
    adapter = ModelAdapter(model)
    return model, tokens, stats, adapter, MoDeGPT().build_units(adapter, stats, tokens=tokens)


def test_key_query_at_partial_width_is_the_dense_projection_masked_per_kv_group():
    """Query head j keeps the dimensions of its KV group j // g (HF's repeat_kv): checked against the dense
    q/k outputs with every other dimension zeroed, on a GQA model with q/k biases."""
    from svdzip.methods.key_query import kept_dims

    model, tokens, _, adapter, units = _units_of("qwen2")
    unit = next(u for u in units if u.role == "key-query" and u.members[0].layer == 0)
    q_info, k_info = unit.members
    dense_q, dense_k = copy.deepcopy(adapter.module(q_info.name)), copy.deepcopy(adapter.module(k_info.name))
    rank = unit.module.width // 2
    unit.materialise(adapter, rank)
    d_h, heads = adapter.head_dim, adapter.num_heads
    dims = kept_dims(unit.module.order, rank, d_h, rope=True)
    kv = dims.shape[0]
    assert kv == adapter.num_kv_heads < heads
    x = torch.randn(5, q_info.in_features)
    for info, dense, n in ((q_info, dense_q, heads), (k_info, dense_k, kv)):
        mask = torch.zeros(n, d_h)
        for h in range(n):
            mask[h, dims[h // (heads // kv) if n == heads else h]] = 1
        with torch.no_grad():
            assert torch.allclose(adapter.module(info.name)(x), dense(x) * mask.flatten(), atol=1e-6)
        assert adapter.module(info.name).weight.shape[0] == n * 2 * rank


def test_value_output_at_partial_width_loses_its_tail_in_the_whitened_metric():
    model, tokens, stats, adapter, units = _units_of("llama")
    unit = next(u for u in units if u.role == "value-output" and u.members[0].layer == 1)
    v_info, o_info = unit.members
    w_v = adapter.module(v_info.name).weight.detach().double()
    w_o = adapter.module(o_info.name).weight.detach().double()
    d_h, heads, kv = adapter.head_dim, adapter.num_heads, adapter.num_kv_heads
    gram = stats.grams[v_info.input_key].double()

    def products(wv, wo):  # each query head's d×d map x ↦ o-contribution, through its KV head's values
        return [wv[(j // (heads // kv)) * d_h:(j // (heads // kv) + 1) * d_h].T @ wo[:, j * d_h:(j + 1) * d_h].T
                for j in range(heads)]

    before = products(w_v, w_o)
    rank = 3
    unit.materialise(adapter, rank)
    v_new, o_new = adapter.module(v_info.name), adapter.module(o_info.name)
    dense_v = torch.zeros_like(w_v)
    dense_v[v_new.index] = v_new.weight.detach().double()
    dense_o = torch.zeros_like(w_o)
    dense_o[:, o_new.index] = o_new.weight.detach().double()
    after = products(dense_v, dense_o)
    error = sum(float(torch.trace((a - b).T @ gram @ (a - b))) for a, b in zip(before, after, strict=True))
    assert error == pytest.approx(unit.spectrum.tail(rank), rel=1e-3)  # the ridge (1e-4 of the mean) is the gap


# ---------------------------------------------------------------- the hybrid: slim or factorise, per module

def test_factorised_options_are_the_best_rank_combinations_on_the_hull():
    """Brute force over every rank combination of two matrices: each merged option is on the lower hull of
    (cost, weighted loss), and the option list covers every hull point of the combinations."""
    from itertools import product

    from svdzip.methods.decompose import decompose
    from svdzip.methods.hybrid import factorised_options, pareto
    from svdzip.passes.calibrate import collect_statistics

    model, tokens = tiny_model("llama", seed=9), tiny_tokens(8, 24)
    adapter = ModelAdapter(model)
    stats = collect_statistics(model, tokens, 8, kinds={"grams"})
    parts = decompose(adapter, stats, "svdllm", [[i] for i in adapter.layer_linears(0)[2:4]])  # v and o
    weights = [2.0, 0.5]
    options = factorised_options(parts, weights)
    assert all(b.cost > a.cost and b.loss <= a.loss + 1e-9 for a, b in zip(options, options[1:], strict=False))

    def loss(ranks):
        return sum(w * (p.spectrum.tail(r) if r is not None else 0.0) for p, w, r in zip(parts, weights, ranks,
                                                                                        strict=True))

    for o in options:
        assert o.loss == pytest.approx(loss(o.ranks), rel=1e-6, abs=1e-9)
    grid = [(sum(p.cost(r) for p, r in zip(parts, rs, strict=True)), loss(rs)) for rs in product(
        *[[*range(1, p.max_rank + 1), None] for p in parts])]
    for cost, value in grid:  # no combination lies below the chords of the merged options
        below = [o for o in options if o.cost <= cost]
        above = [o for o in options if o.cost >= cost]
        if below and above:
            a, b = below[-1], above[0]
            t = 0.0 if b.cost == a.cost else (cost - a.cost) / (b.cost - a.cost)
            assert value >= a.loss + t * (b.loss - a.loss) - 1e-6
    front = pareto(options, sum(p.dense_params for p in parts))
    assert all(o.cost < sum(p.dense_params for p in parts) for o in front)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_hybrid_chooses_per_module_within_the_budget_and_reloads(family, tmp_path):
    model, tokens = tiny_model(family, seed=3, shape=WIDE), tiny_tokens(12, 24, vocab=WIDE.vocab)
    recipe = Recipe(method="hybrid", heal="none", ratio=0.3, calib_samples=8, calib_seq_len=24, calib_batch_size=8)
    result = compress(model, recipe, calib_tokens=tokens[:8], heldout_tokens=tokens[8:], out=tmp_path / "h")
    assert result.config.allocator == "loss-aware"
    assert result.allocation_report["guard_kept"] in ("loss-aware", "uniform", "block-influence")  # auto guards
    assert result.summary["ratio_achieved"] >= 0.3 - 1e-9
    kinds = {("factorised" if r.rank is not None else "slimmed" if r.width is not None else "dense")
             for r in result.modules}
    assert {"factorised", "slimmed"} <= kinds  # both families chosen somewhere
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "h")
        assert torch.equal(again(tokens).logits, result.model(tokens).logits)


def test_hybrid_refuses_an_allocator_that_cannot_choose():
    with pytest.raises(SvdzipError, match="chooses per module with loss-aware or ara"):
        Recipe(method="hybrid", allocator="uniform").validate()
    with pytest.raises(SvdzipError, match="factorisation ranks only"):  # ARA refines choices, it cannot slim
        Recipe(method="modegpt", allocator="ara").validate()
    with pytest.raises(SvdzipError, match=r"--allocator ara starting from drank .*init=loss-aware\)$"):  # early
        Recipe(method="hybrid", allocator="ara", allocator_options={"init": "drank"}).validate()
    Recipe(method="hybrid", allocator="ara", allocator_options={"init": "loss-aware"}).validate()


def test_ara_refines_the_hybrid_s_factorised_matrices_and_holds_what_it_slims(tmp_path):
    """--method hybrid --allocator ara: ARA starts from loss-aware's choice; every module that choice slims keeps its
    width, every matrix it factorises (and Gemma's q/k, which only factorise) gets ARA's rank, within the budget."""
    model, tokens = tiny_model("gemma3", seed=3, shape=WIDE), tiny_tokens(12, 24, vocab=WIDE.vocab)
    base = Recipe(method="hybrid", allocator="loss-aware", heal="none", ratio=0.3, calib_samples=8, calib_seq_len=24,
                  calib_batch_size=8)
    start = compress(copy.deepcopy(model), base, calib_tokens=tokens[:8])
    ara = compress(copy.deepcopy(model), replace(base, allocator="ara", allocator_options={"steps": 4, "seq_len": 12}),
                   calib_tokens=tokens[:8], out=tmp_path / "a")
    report = ara.allocation_report
    widths = {r.name: r.width for r in start.modules if r.width is not None}
    assert widths and {r.name: r.width for r in ara.modules if r.width is not None} == widths
    assert report["start"] == "loss-aware" and report["held_modules"] >= 1
    refined = {u["name"]: u["rank"] for u in report["units"]}
    assert len(refined) == report["refined_matrices"] and not set(refined) & set(widths)
    rows = {r.name: r.rank for r in ara.modules}
    assert all(rows[name] == rank for name, rank in refined.items())  # ARA's ranks built, through the menu
    assert ara.summary["ratio_achieved"] >= 0.3 - 1e-9
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
        assert torch.equal(again(tokens).logits, ara.model(tokens).logits)


def test_a_choice_finds_or_adds_the_option_of_given_factorisation_ranks():
    """ARA's ranks map onto the hybrid's menu: the option if it is there, added after the menu if the Pareto front
    pruned it (earlier indices unchanged), dense where the factors cost no less than the module."""
    from types import SimpleNamespace

    from svdzip.methods.hybrid import ChoiceUnit, Option
    from svdzip.methods.linalg import Spectrum

    parts = [SimpleNamespace(cost=lambda r: 40 if r is None else 5 * r) for _ in range(2)]
    menu = [Option(10, 3.0, ranks=(1, 1)), Option(20, 2.0, slim=2), Option(30, 1.0, ranks=(4, 2))]
    unit = ChoiceUnit(members=[SimpleNamespace(dense_params=80)], spectrum=Spectrum(sigma2=torch.zeros(1),
                      basis=torch.zeros(0, 0)), parts=parts, options=list(menu))
    assert unit.factorised_at(3) == list(zip(parts, (4, 2), strict=True)) and unit.factorised_at(2) is None
    assert unit.factorised_option((4, 2)) == 3 and len(unit.options) == 3
    assert unit.factorised_option((2, None)) == 4 and unit.options[:3] == menu and unit.cost(4) == 50
    assert unit.factorised_option((None, 8)) is None  # 80 parameters: no saving, dense


@pytest.mark.parametrize("method", ["modegpt", "hybrid"])
def test_the_guard_builds_whichever_allocation_loses_least_on_heldout_windows(method, monkeypatch):
    """guard=true compares the loss-aware choice with uniform widths and MoDeGPT's block-influence allocation on
    held-out calibration windows and builds the one that loses least (on Gemma-3-270M at 40 % loss-aware's MoDeGPT
    widths lose to both)."""
    import svdzip.allocate.common as common

    model, tokens = tiny_model("llama", seed=3, shape=WIDE), tiny_tokens(12, 24, vocab=WIDE.vocab)
    recipe = Recipe(method=method, heal="none", ratio=0.3, calib_samples=8, calib_seq_len=24, calib_batch_size=8,
                    allocator="loss-aware", allocator_options={"guard": True})
    seen = []
    real = common.heldout_loss

    def spy(units, ranks, model, toks):
        seen.append(list(ranks))
        return real(units, ranks, model, toks) + (0.0 if len(seen) == 3 else 100.0)  # the third wins
    monkeypatch.setattr(common, "heldout_loss", spy)
    result = compress(copy.deepcopy(model), recipe, calib_tokens=tokens[:8], heldout_tokens=tokens[8:])
    assert result.allocation_report["guard_kept"] == "block-influence" and len(seen) == 3
    assert seen[0] != seen[2] and result.summary["ratio_achieved"] >= 0.3 - 1e-9
    if method == "modegpt":  # the same model as the paper's allocation named directly
        direct = compress(copy.deepcopy(model), replace(recipe, allocator="block-influence", allocator_options={}),
                          calib_tokens=tokens[:8], heldout_tokens=tokens[8:])
        assert [r.width for r in result.modules] == [r.width for r in direct.modules]


def test_the_hybrid_heals_by_default_and_refuses_what_it_cannot_do():
    resolved = Recipe(method="hybrid").resolved(scaled=False)
    assert (resolved.allocator, resolved.allocator_options, resolved.heal) == ("loss-aware", {"guard": True}, "distill")
    for overrides, why in (({"budget_fraction": 0.5}, "a memory budget"), ({"heal": "seq-lora"}, "--heal seq-lora"),
                           ({"allocator": "loss-aware", "allocator_options": {"signal": "local"}}, "signal=local")):
        assert why in Recipe(method="hybrid", **overrides).structured_problems(get_method("hybrid"))[0]
    assert Recipe(method="hybrid").structured_problems(get_method("hybrid")) == []


def test_a_phi3_model_gets_the_hybrid_with_its_fused_modules_factorised():
    """Phi-3 fuses q/k/v and gate/up: nothing MoDeGPT can slim, so the hybrid factorises them all where
    `--method modegpt` refuses the family."""
    model, tokens = tiny_model("phi3", seed=3, shape=WIDE), tiny_tokens(12, 24, vocab=WIDE.vocab)
    result = compress(model, Recipe(method="hybrid", heal="none", ratio=0.3, calib_samples=8, calib_seq_len=24),
                      calib_tokens=tokens[:8], heldout_tokens=tokens[8:])
    assert result.config.method == "hybrid" and result.summary["ratio_achieved"] >= 0.3 - 1e-9
    assert all(r.width is None for r in result.modules)
    assert {r.role for r in result.modules if r.rank is not None} >= {"gate_up", "down"}


def test_distillation_trains_the_slimmed_linears_only_and_lowers_the_heldout_kl():
    from svdzip.models.sliced import slimmed_modules
    from svdzip.recover.config import HealConfig
    from svdzip.recover.heal import heal

    teacher = tiny_model("llama", seed=11)
    student = copy.deepcopy(teacher)
    compress(student, Recipe.plain(method="modegpt", ratio=0.6, calib_samples=8, calib_seq_len=24),
             calib_tokens=tiny_tokens(8, 24))
    slim = slimmed_modules(student)
    assert {type(m).__name__ for m in slim.values()} == {"SlimLinear", "RowSubsetLinear", "ColumnSubsetLinear"}
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if not any(n.startswith(s + ".weight")
                                                                                      for s in slim)}
    windows = tiny_tokens(8, 16, seed=5)
    config = HealConfig(method="distill", steps=8, batch_size=2, grad_accum=1, eval_every=2, patience=10,
                        warmup=0.0, lr=1e-5, seq_len=16)  # a tiny random model: a tiny KL, a tiny lr
    report = heal(student, teacher, (windows, windows[:4]), config)
    assert report.trained_params == sum(m.weight.numel() for m in slim.values())
    assert report.improved and report.final_heldout < report.initial_heldout
    for n, p in student.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_breakage_check_is_recorded_and_warns_when_the_model_breaks(caplog):
    from svdzip.engine.pipeline import BreakageCheck

    model, tokens = tiny_model("llama", seed=12, shape=WIDE), tiny_tokens(8, 24, vocab=WIDE.vocab)
    result = compress(copy.deepcopy(model), Recipe.plain(method="modegpt", ratio=0.2, calib_samples=8,
                                                         calib_seq_len=24), calib_tokens=tokens)
    check = result.summary["breakage_check"]
    assert check["windows"] == 4 and check["ratio"] == pytest.approx(check["compressed_ppl"] / check["dense_ppl"],
                                                                      rel=1e-3)
    guard = BreakageCheck.before(model, tokens, Recipe())
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # confidently wrong everywhere
    with caplog.at_level("WARNING"):
        guard.after(model)
    assert guard.result["ratio"] > 2 and "may be broken" in caplog.text
