"""The byte planner's optimiser and menus: `allocate.menu` (hull greedy over (cost, loss) options) and
`allocate.storage` (which options a recipe allows, their prices, the plan), checked against brute force."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from svdzip.allocate.menu import fill_menu, greedy_menu, lower_hull
from svdzip.allocate.storage import (
    MAX_COMPENSATION_RANK,
    matrix_bytes,
    menu_for,
    plan_storage,
    unit_options,
)
from svdzip.budget import DENSE
from svdzip.errors import InfeasibleBudget, SvdzipError
from svdzip.methods.decompose import Unit
from svdzip.methods.linalg import Spectrum
from svdzip.models.adapter import LinearInfo
from svdzip.output.lowbit import BITS, packed_bytes
from svdzip.passes.quant_error import QuantError


def _cost(menus, choice):
    return sum(m[i][0] for m, i in zip(menus, choice, strict=True))


def _loss(menus, choice):
    return sum(m[i][1] for m, i in zip(menus, choice, strict=True))


def _all_choices(menus):
    return itertools.product(*[range(len(m)) for m in menus])


def _best(menus, budget):
    return min(_loss(menus, c) for c in _all_choices(menus) if _cost(menus, c) <= budget)


def _random_menus(rng: random.Random, units: int, options: tuple[int, int] = (3, 5)):
    return [[(rng.randint(1, 40), rng.random() * 10) for _ in range(rng.randint(*options))] for _ in range(units)]


def _curvy_menus(rng: random.Random, units: int, options: tuple[int, int] = (3, 5)):
    """Menus whose loss mostly falls with cost (as ranks and bit widths do), with options off the hull."""
    menus = []
    for _ in range(units):
        costs = rng.sample(range(1, 60), rng.randint(*options))
        menus.append([(c, 10.0 * 0.9**c * (1.0 + rng.random())) for c in costs])
    return menus


def _cheapest(menu):
    return min(range(len(menu)), key=lambda i: (menu[i][0], menu[i][1]))


# ---------------------------------------------------------------------------------------------- lower hull


@pytest.mark.parametrize("seed", range(20))
def test_lower_hull_is_convex_and_lies_below_every_option(seed):
    rng = random.Random(seed)
    menu = [(rng.randint(1, 60), rng.random() * 10) for _ in range(rng.randint(2, 12))]
    start = _cheapest(menu)
    hull = lower_hull(menu, start)
    assert start not in hull
    points = [menu[start]] + [menu[i] for i in hull]
    costs, losses = [p[0] for p in points], [p[1] for p in points]
    assert costs == sorted(costs) and len(set(costs)) == len(costs)  # strictly increasing cost
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False))  # strictly decreasing loss
    slopes = [(l0 - l1) / (c1 - c0) for (c0, l0), (c1, l1) in zip(points, points[1:], strict=False)]
    assert all(b < a for a, b in zip(slopes, slopes[1:], strict=False))  # strictly convex
    # no option lies strictly below the hull's piecewise-linear curve (within the hull's cost range)
    for c, loss in menu:
        if c < costs[0]:
            continue
        if c >= costs[-1]:
            assert loss >= losses[-1] - 1e-12
            continue
        j = max(k for k in range(len(costs)) if costs[k] <= c)
        c0, l0, c1, l1 = costs[j], losses[j], costs[j + 1], losses[j + 1]
        assert loss >= l0 + (l1 - l0) * (c - c0) / (c1 - c0) - 1e-9
    # the last hull point is the lowest-loss option (a cheapest one among equals)
    lowest = min(loss for _, loss in menu)
    if lowest < menu[start][1]:
        assert losses[-1] == lowest


def test_lower_hull_skips_dominated_and_nonconvex_options():
    menu = [(1, 10.0), (2, 4.0), (3, 9.0), (4, 3.5), (5, 1.0), (6, 1.0), (7, 0.0)]
    # (3, 9) and (6, 1) are dominated; (4, 3.5) lies above the chord (2, 4) → (5, 1)
    assert lower_hull(menu, 0) == [1, 4, 6]
    assert lower_hull(menu, 6) == []  # nothing costs more and loses less than the best option


# ---------------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("seed", range(40))
def test_greedy_menu_never_exceeds_the_budget_and_fill_only_helps(seed):
    rng = random.Random(seed)
    menus = _random_menus(rng, rng.randint(2, 6), (1, 7))
    floor = sum(min(c for c, _ in m) for m in menus)
    top = sum(max(c for c, _ in m) for m in menus)
    for budget in sorted({floor, top, *(rng.randint(floor, top + 5) for _ in range(8))}):
        plain = greedy_menu(menus, budget, fill=False)
        filled = greedy_menu(menus, budget)
        assert len(plain) == len(filled) == len(menus)
        assert all(0 <= i < len(m) for i, m in zip(filled, menus, strict=True))
        assert _cost(menus, plain) <= budget and _cost(menus, filled) <= budget
        assert _loss(menus, filled) <= _loss(menus, plain) + 1e-12
        assert _loss(menus, filled) >= _best(menus, budget) - 1e-9  # brute force is a lower bound
    # with room for everything, every unit ends on its lowest loss
    assert _loss(menus, greedy_menu(menus, top)) == pytest.approx(sum(min(x for _, x in m) for m in menus))


@pytest.mark.parametrize("seed", range(4))
def test_greedy_menu_refuses_a_budget_below_the_cheapest_options(seed):
    menus = _random_menus(random.Random(seed), 4)
    floor = sum(min(c for c, _ in m) for m in menus)
    with pytest.raises(InfeasibleBudget, match=f"{floor:,}"):
        greedy_menu(menus, floor - 1)
    with pytest.raises(InfeasibleBudget):
        greedy_menu(menus, floor - 1, fill=False)
    choice = greedy_menu(menus, floor, fill=False)
    assert _cost(menus, choice) == floor
    assert choice == [_cheapest(m) for m in menus]


def _hull_steps(menus):
    """Every unit's hull steps from its cheapest option: (loss removed per byte, extra bytes)."""
    steps = []
    for m in menus:
        at = _cheapest(m)
        for i in lower_hull(m, at):
            (c0, l0), (c1, l1) = m[at], m[i]
            steps.append(((l0 - l1) / (c1 - c0), c1 - c0))
            at = i
    return sorted(steps, key=lambda s: -s[0])


@pytest.mark.parametrize("seed", range(25))
def test_greedy_menu_is_optimal_at_its_lagrangian_points(seed):
    """At a budget that is a prefix of the hull steps in slope order (a Lagrangian point), the hull greedy
    without fill lands on it exactly and no assignment that spends at most the budget loses less."""
    rng = random.Random(1000 + seed)
    menus = _curvy_menus(rng, rng.randint(3, 4))
    budget = sum(min(c for c, _ in m) for m in menus)
    checked = 0
    for _, extra in _hull_steps(menus):
        budget += extra
        choice = greedy_menu(menus, budget, fill=False)
        assert _cost(menus, choice) == budget  # every step of the prefix taken, nothing else
        assert _loss(menus, choice) == pytest.approx(_best(menus, budget), rel=1e-12, abs=1e-12), (menus, budget)
        # fill has nothing left to spend at a Lagrangian point
        assert greedy_menu(menus, budget) == choice
        checked += 1
    assert checked >= 2


def test_fill_menu_spends_what_is_left_on_the_largest_single_reduction():
    # unit 0's option (3, 9) lies above its hull (the chord (1, 10) → (10, 0)): only the fill can pick it
    menus = [[(1, 10.0), (3, 9.0), (10, 0.0)], [(0, 1.0), (4, 0.5)]]
    assert lower_hull(menus[0], 0) == [2]
    assert fill_menu(menus, [0, 0], 4) == [1, 0]  # a reduction of 1 for 2 bytes beats 0.5 for 4
    assert fill_menu(menus, [0, 0], 6) == [1, 1]  # then the rest goes to unit 1
    assert fill_menu(menus, [0, 0], 1) == [0, 0]  # nothing fits
    assert greedy_menu(menus, 11) == [2, 0] and greedy_menu(menus, 14) == [2, 1]


# ---------------------------------------------------------------------------------------------- storage menus


def _unit(name: str, rows: int, cols: int, seed: int) -> Unit:
    g = torch.Generator().manual_seed(seed)
    r = min(rows, cols)
    sigma2 = torch.sort(torch.rand(r, generator=g, dtype=torch.float64) * 10, descending=True).values
    info = LinearInfo(name, seed, "q", f"x{seed}", rows, cols)
    return Unit(members=[info], spectrum=Spectrum(sigma2=sigma2, basis=torch.eye(rows, r)))


def _errors(units, bits=BITS, scale=1.0):
    """Fake quantization errors: a fatter tail at fewer bits."""
    out = {}
    for u in units:
        r = min(u.rows, u.cols)
        for b in bits:
            if u.cols % 64:
                continue
            sigma2 = torch.linspace(1.0, 0.01, r, dtype=torch.float64) * scale * 4.0 ** (4 - b)
            out[u.name, b] = QuantError(packed=None, sigma2=sigma2)
    return out


def test_menu_for_the_recipe_values():
    plan = menu_for("plan", "auto", 2)
    assert plan.bits == BITS and plan.comp is None and plan.factorise and plan.value_bytes == 2
    fixed = menu_for("int3", 4, 4)
    assert fixed.bits == (3,) and fixed.comp == 4 and not fixed.factorise and fixed.value_bytes == 4
    assert menu_for("int2", "auto", 2).comp is None


def test_unit_options_prices():
    unit = _unit("m", 64, 128, 0)
    errors = _errors([unit])
    opts = unit_options(unit, 2.0, errors, menu_for("plan", "auto", 2))
    dense = [o for o in opts if o.bits is None and o.rank is DENSE]
    assert len(dense) == 1 and dense[0].cost == 64 * 128 * 2 and dense[0].loss == 0.0
    tail = unit.spectrum.tail_curve()
    for o in opts:
        if o.bits is None and o.rank is not DENSE:
            assert o.cost == o.rank * (64 + 128) * 2 < 64 * 128 * 2
            assert o.loss == pytest.approx(2.0 * float(tail[o.rank]))
        elif o.bits is not None:
            qt = errors["m", o.bits].tail_curve()
            assert o.cost == packed_bytes(64, 128, o.bits) + o.comp * (64 + 128) * 2
            assert o.loss == pytest.approx(2.0 * float(qt[o.comp]))
    for b in BITS:
        assert sorted(o.comp for o in opts if o.bits == b) == list(range(min(MAX_COMPENSATION_RANK, 64) + 1))
    # a fixed compensation rank and a single width: one option, no factors, no dense
    only = unit_options(unit, 1.0, errors, menu_for("int4", 3, 2))
    assert [(o.bits, o.comp) for o in only] == [(4, 3)]
    with pytest.raises(SvdzipError, match="exceeds"):
        unit_options(unit, 1.0, errors, menu_for("int4", 65, 2))
    # a shape HQQ cannot pack (no error measured for it) has nothing to offer at a fixed width
    odd = _unit("odd", 64, 96, 1)
    with pytest.raises(SvdzipError, match="cannot be stored"):
        unit_options(odd, 1.0, _errors([odd]), menu_for("int4", "auto", 2))
    assert all(o.bits is None for o in unit_options(odd, 1.0, {}, menu_for("plan", "auto", 2)))


@pytest.mark.parametrize("fraction", [0.08, 0.15, 0.3, 0.6])
def test_plan_storage_spends_at_most_the_budget_and_reports_it(fraction):
    units = [_unit("a", 64, 64, 0), _unit("b", 32, 64, 1), _unit("c", 64, 96, 2), _unit("d", 128, 64, 3)]
    errors = _errors(units)
    menu = menu_for("plan", "auto", 2)
    dense_bytes = sum(u.rows * u.cols * 2 for u in units)
    budget = int(fraction * dense_bytes)
    alloc = plan_storage(units, [1.0, 2.0, 0.5, 1.0], errors, menu, budget)
    spent = matrix_bytes(units, alloc, 2)
    assert spent == alloc.report["planned_matrix_bytes"] <= budget
    assert "c" not in alloc.lowbit  # its 96 columns make no whole group of 64
    for u, r in zip(units, alloc.ranks, strict=True):
        if u.name in alloc.lowbit:
            bits, comp = alloc.lowbit[u.name]
            assert r is DENSE and bits in BITS and 0 <= comp <= min(u.rows, u.cols)
    assert sum(alloc.report["storage"].values()) == len(units)
    assert alloc.report["compensation_ranks"] == sum(c for _, c in alloc.lowbit.values())
    # a larger budget never predicts a larger loss
    more = plan_storage(units, [1.0, 2.0, 0.5, 1.0], errors, menu, budget + dense_bytes // 10)
    assert more.report["predicted_loss"] <= alloc.report["predicted_loss"] + 1e-12


def test_plan_storage_infeasible_and_unbudgeted():
    units = [_unit("a", 64, 64, 0), _unit("b", 32, 64, 1)]
    errors = _errors(units)
    menu = menu_for("int4", "auto", 2)
    least = packed_bytes(64, 64, 4) + packed_bytes(32, 64, 4)
    with pytest.raises(InfeasibleBudget) as info:
        plan_storage(units, [1.0, 1.0], errors, menu, least - 1)
    assert info.value.least_bytes == least and f"{least:,}" in str(info.value)
    exact = plan_storage(units, [1.0, 1.0], errors, menu, least)
    assert exact.lowbit == {"a": (4, 0), "b": (4, 0)} and matrix_bytes(units, exact, 2) == least
    # no budget: every matrix at its cheapest option (a fixed compensation included)
    free = plan_storage(units, [1.0, 1.0], errors, menu_for("int2", 5, 2), None)
    assert free.lowbit == {"a": (2, 5), "b": (2, 5)}
    assert matrix_bytes(units, free, 2) == sum(packed_bytes(u.rows, u.cols, 2) + 5 * (u.rows + u.cols) * 2
                                               for u in units)
