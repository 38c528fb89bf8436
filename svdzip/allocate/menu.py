"""Choose one option per unit from a menu of (cost, loss) under a budget: the byte planner's optimiser.

Each unit offers options — factorise at rank k, keep dense, store at b bits with a compensation of rank r —
each with its cost (bytes) and its predicted loss. Minimising the total loss under the total cost is a
multiple-choice knapsack; the greedy over every unit's lower convex hull is its exact Lagrangian
(convexified) solution, and a last pass spends what the hull steps left over on the best single moves.
Loss-aware's rank greedy (`common.greedy_loss_allocation`) is the special case whose menu is the ranks.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from svdzip.errors import InfeasibleBudget

Menu = Sequence[tuple[int, float]]  # (cost, loss) per option


def lower_hull(menu: Menu, start: int) -> list[int]:
    """Indices of the options on the lower convex hull of (cost, loss) from `start` towards lower losses,
    in increasing cost (`start` excluded): the only options a Lagrangian optimum ever picks."""
    c0, l0 = menu[start]
    better = sorted((c, loss, i) for i, (c, loss) in enumerate(menu) if c > c0 and loss < l0)
    frontier: list[tuple[int, float, int]] = [(c0, l0, start)]
    for c, loss, i in better:
        if loss >= frontier[-1][1]:
            continue  # dominated: costs more, loses no less
        while len(frontier) >= 2:
            (ca, la, _), (cb, lb, _) = frontier[-2], frontier[-1]
            # drop b when going a → this option straight is at least as steep a descent as a → b
            if (lb - la) * (c - ca) >= (loss - la) * (cb - ca):
                frontier.pop()
            else:
                break
        frontier.append((c, loss, i))
    return [i for _, _, i in frontier[1:]]


def greedy_menu(menus: Sequence[Menu], budget: int, fill: bool = True) -> list[int]:
    """One option index per unit with total cost ≤ budget and (near-)minimal total loss.

    Start from each unit's cheapest option; take hull steps in order of loss removed per unit of cost while
    they fit; then (if `fill`) move single units to whichever option removes the most loss within what is left.
    """
    choice = [min(range(len(m)), key=lambda i, m=m: (m[i][0], m[i][1])) for m in menus]
    left = budget - sum(m[c][0] for m, c in zip(menus, choice, strict=True))
    if left < 0:
        raise InfeasibleBudget(f"budget of {budget:,} is below the cheapest option of every unit "
                               f"({budget - left:,})")
    hulls = [lower_hull(m, c) for m, c in zip(menus, choice, strict=True)]
    pos = [0] * len(menus)

    def slope(u: int) -> float:
        (c0, l0), (c1, l1) = menus[u][choice[u]], menus[u][hulls[u][pos[u]]]
        return (l0 - l1) / max(c1 - c0, 1)

    heap = [(-slope(u), u) for u in range(len(menus)) if hulls[u]]
    heapq.heapify(heap)
    while heap:
        _, u = heapq.heappop(heap)
        nxt = hulls[u][pos[u]]
        extra = menus[u][nxt][0] - menus[u][choice[u]][0]
        if extra > left:
            continue  # this unit stops here; the fill may still move it
        choice[u], left = nxt, left - extra
        pos[u] += 1
        if pos[u] < len(hulls[u]):
            heapq.heappush(heap, (-slope(u), u))
    return fill_menu(menus, choice, left) if fill else choice


def fill_menu(menus: Sequence[Menu], choice: list[int], left: int) -> list[int]:
    """Spend `left` on single moves, the largest loss reduction first, until no move fits."""
    while True:
        best = (0.0, -1, -1, 0)
        for u, m in enumerate(menus):
            c0, l0 = m[choice[u]]
            for i, (c, loss) in enumerate(m):
                if loss < l0 and c - c0 <= left and l0 - loss > best[0]:
                    best = (l0 - loss, u, i, c - c0)
        if best[1] < 0:
            return choice
        _, u, i, extra = best
        choice[u], left = i, left - extra
