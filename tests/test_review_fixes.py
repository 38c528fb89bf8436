"""Review findings of issue 18, each with a test that fails when the behaviour it names breaks."""

from __future__ import annotations

import dataclasses
import math

import pytest
from conftest import tiny_model, tiny_tokens

from svdzip.config import SHAREABLE_ROLES


@pytest.fixture(scope="module")
def llama_units():
    from svdzip.methods.decompose import decompose, group_linears
    from svdzip.models.adapter import ModelAdapter
    from svdzip.passes.calibrate import collect_statistics

    model = tiny_model("llama")
    stats = collect_statistics(model, tiny_tokens(), 4, "cpu")
    adapter = ModelAdapter(model)
    return decompose(adapter, stats, "svdllm", group_linears(adapter, SHAREABLE_ROLES, 1))


# 1. SVD-LLM V2: a matrix that loses nothing at the uniform rank


def test_v2_ratios_with_a_lossless_matrix_are_finite():
    from svdzip.allocate.svdllm_v2 import v2_ratios

    r = v2_ratios([0.0, 50.0, 500.0, 5000.0], 0.3)
    assert all(math.isfinite(x) for x in r)
    assert r[0] == pytest.approx(0.3)  # loses nothing at the uniform rank: keeps R
    assert sum(r[1:]) / 3 == pytest.approx(0.3) and r[1] > r[2] > r[3]
    assert v2_ratios([0.0, 0.0], 0.4) == [0.4, 0.4]


def test_v2_allocates_within_budget_when_a_matrix_has_rank_below_the_uniform_rank(llama_units):
    from svdzip.allocate import AllocationContext, allocate, spent
    from svdzip.budget import DENSE, keep_budget, uniform_rank

    units = list(llama_units)
    i = next(j for j, u in enumerate(units) if u.role == units[0].role and j > 0)
    low = units[i]
    k = max(1, uniform_rank(low.rows, low.cols, 0.4))
    sigma2 = low.spectrum.sigma2.clone()
    sigma2[1:] = 0.0  # rank 1: nothing lost at the uniform rank
    assert k > 1 and low.spectrum.tail(k) > 0
    units[i] = dataclasses.replace(low, spectrum=dataclasses.replace(low.spectrum, sigma2=sigma2))
    budget = keep_budget(sum(u.dense_params for u in units), 0.4)
    ranks = allocate("svdllm-v2", units, AllocationContext(ratio=0.4, budget=budget, options={})).ranks
    assert spent(units, ranks) <= budget
    assert all(r is DENSE or 1 <= r <= u.max_rank for u, r in zip(units, ranks, strict=True))
    assert ranks[i] == 1  # its own rank loses nothing; the rest of the budget goes to the others
