"""Factorisation methods and weight updates as objects: names, declared needs, and the metric each truncates under."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model, tiny_tokens

from svdzip.errors import SvdzipError
from svdzip.methods.decompose import decompose, group_linears
from svdzip.methods.factorisations import Settings, available_methods, get_method
from svdzip.models.adapter import ModelAdapter
from svdzip.needs import Mode, Needs, refuse_unsupported
from svdzip.passes.calibrate import CalibrationStats, collect_statistics
from svdzip.passes.update import available_updates, get_update
from svdzip.recipe import Recipe


def test_method_registry_and_errors():
    assert available_methods() == ["svd", "svdllm", "asvd", "fwsvd", "modegpt", "hybrid"]
    assert [m for m in available_methods() if get_method(m).structured] == ["modegpt", "hybrid"]
    assert get_method("asvd").name == "asvd" and get_method(get_method("svd")) is get_method("svd")
    with pytest.raises(SvdzipError, match=r"unknown method 'svdlm'; choose a factorisation from: svd \(.*fwsvd \("):
        get_method("svdlm")
    with pytest.raises(SvdzipError, match="unknown method"):
        Recipe.plain(method="svdlm").validate()


@pytest.mark.parametrize("name,config,expected", [
    ("svd", Recipe.plain(), Needs()),
    ("svdllm", Recipe.plain(), Needs(statistics=frozenset({"grams"}))),
    ("asvd", Recipe.plain(), Needs(statistics=frozenset({"abs_mean"}))),
    ("asvd", Recipe.plain(asvd_scaling="abs_max"), Needs(statistics=frozenset({"abs_max"}))),
    ("fwsvd", Recipe.plain(), Needs(statistics=frozenset({"fisher"}), calib_tokens=True, gradients=True,
                                      whole_model=True, distributable=False)),
])
def test_methods_declare_exactly_the_statistics_they_read(name, config, expected):
    needs = get_method(name).needs(config)
    assert needs == expected
    assert needs.data == (name != "svd")


def test_fwsvd_is_refused_where_its_fisher_pass_cannot_run():
    needs = {"method fwsvd": get_method("fwsvd").needs(Recipe.plain())}
    with pytest.raises(SvdzipError, match="whole model.*Fisher"):
        refuse_unsupported(needs, Mode(streamed=True))
    with pytest.raises(SvdzipError, match="cannot be split over processes"):
        refuse_unsupported(needs, Mode(world_size=2))
    refuse_unsupported({"method svdllm": get_method("svdllm").needs(Recipe.plain())}, Mode(streamed=True,
                                                                                             world_size=2))


def _brute_sigma2(weight: torch.Tensor, sqrt_metric: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(weight.double() @ sqrt_metric.double()) ** 2


@pytest.fixture(scope="module")
def tiny():
    model, tokens = tiny_model("llama"), tiny_tokens()
    stats = collect_statistics(model, tokens, 4, "cpu")
    # FWSVD's statistics: any positive per-channel weights exercise the same path as collect_fisher's
    g = torch.Generator().manual_seed(3)
    adapter = ModelAdapter(model)
    stats.fisher = {i.name: torch.rand(i.in_features, generator=g, dtype=torch.float64) + 0.1
                    for i in adapter.linears()}
    return model, adapter, stats


@pytest.mark.parametrize("method", ["svd", "svdllm", "asvd", "fwsvd"])
def test_each_method_truncates_under_its_own_metric(tiny, method):
    """σ² of every unit equals the singular values² of W·G^{1/2}, G built by hand from the statistics."""
    model, adapter, stats = tiny
    units = decompose(adapter, stats if method != "svd" else None, method, group_linears(adapter, ("q",), 2))
    for unit in units:
        weight = torch.cat([adapter.module(m.name).weight.detach() for m in unit.members], 0)
        if method == "svd":
            root = torch.eye(unit.cols, dtype=torch.float64)
        elif method == "svdllm":
            gram = sum(stats.grams[m.input_key] for m in unit.members).double()
            evals, evecs = torch.linalg.eigh(gram)
            root = evecs * evals.clamp_min(0).sqrt()
        elif method == "asvd":  # s = (mean|x| + ε)^α, α = 0.5; G = Σ_members s²
            scales = [(stats.abs_mean[m.input_key].double() / stats.batches + 1e-6) ** 0.5 for m in unit.members]
            root = torch.diag(sum(s * s for s in scales).sqrt())
        else:
            root = torch.diag(sum(stats.fisher[m.name] for m in unit.members).sqrt())
        expected = _brute_sigma2(weight, root)
        k = min(unit.spectrum.sigma2.numel(), expected.numel())
        torch.testing.assert_close(unit.spectrum.sigma2[:k], expected[:k], rtol=1e-6,
                                   atol=1e-9 * float(expected[0]))


def test_a_method_without_its_statistics_is_a_clear_error(tiny):
    _, adapter, stats = tiny
    with pytest.raises(SvdzipError, match="method 'svdllm' needs calibration statistics"):
        decompose(adapter, None, "svdllm")
    with pytest.raises(SvdzipError, match="no Fisher information"):
        decompose(adapter, CalibrationStats(grams=stats.grams), "fwsvd")
    with pytest.raises(SvdzipError, match="asvd scaling must be one of abs_mean, abs_max"):
        get_method("asvd").needs(Settings(asvd_scaling="abs_median"))


def test_update_registry_and_needs():
    assert available_updates() == ["svdllm", "coef"]
    for name in available_updates():
        needs = get_update(name).needs()
        assert needs == Needs(calib_tokens=True, whole_model=True) and not needs.streamable and needs.why
    with pytest.raises(SvdzipError, match=r"unknown update 'coeff'; choose from: svdllm \(.*coef \("):
        get_update("coeff")
    with pytest.raises(SvdzipError, match="unknown update"):
        Recipe.plain(update="coeff").validate()


def test_config_validates_allocator_options_before_any_work():
    with pytest.raises(SvdzipError, match="unknown option"):
        Recipe.plain(allocator="drank", allocator_options={"betta": 0.1}).validate()
    with pytest.raises(SvdzipError, match="unknown allocator"):
        Recipe.plain(allocator="dranc").validate()
    Recipe.plain(allocator="drank", allocator_options={"beta_grid": "0,0.1", "tune_beta": "true"}).validate()
