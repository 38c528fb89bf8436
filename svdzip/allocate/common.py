"""Shared maths of the allocators: costs with the dense option, exact-budget integer fixing, greedy fills.

Every allocator ends the same way: continuous or rounded ranks must become integers that spend the
budget exactly (never over, and under by less than the cheapest step any unit could still take).
Ranks here are always *normalised*: an int in [1, max_useful_rank] or `DENSE` (None). Going from
`max_useful_rank` one step up means going dense, which costs `rows·cols − k·(rows+cols)` (never more
than one rank's cost), so "keep this one dense" is simply the last step of every unit.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence

from svdzip.budget import DENSE
from svdzip.errors import InfeasibleBudget, SvdzipError
from svdzip.methods.decompose import Unit, hull_segments  # noqa: F401  (hull_segments: the allocators')

Rank = int | None
#: benefit per parameter of unit i's next step up from `rank` (higher = served first)
Gain = Callable[[int, int], float]


def params(unit: Unit, rank: Rank) -> int:
    """Budget the unit spends at `rank`: parameters, or bytes for a priced unit (memory budgets)."""
    return unit.cost(rank)


def total(units: Sequence[Unit], ranks: Sequence[Rank]) -> int:
    return sum(params(u, r) for u, r in zip(units, ranks, strict=True))


def normalise(unit: Unit, rank: float | None) -> Rank:
    """Round a continuous rank; dense where factorising would not save parameters."""
    if rank is None or not math.isfinite(rank):
        return DENSE
    return unit.normalise(max(1, int(round(rank))))


def step_up(unit: Unit, rank: Rank) -> tuple[Rank, int] | None:
    """(next rank, its extra cost), or None when the unit is already dense."""
    if rank is DENSE:
        return None
    if rank >= unit.max_rank:
        return DENSE, unit.cost(DENSE) - unit.cost(rank)
    return rank + 1, unit.cost(rank + 1) - unit.cost(rank)


def step_down(unit: Unit, rank: Rank) -> tuple[Rank, int] | None:
    """(previous rank, parameters it frees), or None at rank 1."""
    if rank is DENSE:
        k = unit.max_rank
        return (k, unit.cost(DENSE) - unit.cost(k)) if k >= 1 else None
    if rank <= 1:
        return None
    return rank - 1, unit.cost(rank) - unit.cost(rank - 1)


def marginal_loss(unit: Unit, rank: Rank) -> float:
    """Data-weighted loss the next step up removes: σ²_{k+1}, or the whole tail when going dense."""
    if rank is DENSE:
        return 0.0
    if rank >= unit.max_rank:
        return unit.spectrum.tail(rank)
    s = unit.spectrum.sigma2
    return float(s[rank]) if rank < s.numel() else 0.0


def static_gain(priority: Sequence[float]) -> Gain:
    """A gain that ignores the rank: D-Rank's "increment the group with the largest R_eff/ω"."""
    return lambda i, _rank: priority[i]


def shrink_to_budget(units: Sequence[Unit], ranks: list[Rank], budget: int, gain: Gain,
                     subset: Sequence[int] | None = None) -> list[Rank]:
    """Take steps down, always from the unit whose current step is worth least, until within budget."""
    idx = list(range(len(units))) if subset is None else list(subset)
    used = total([units[i] for i in idx], [ranks[i] for i in idx])
    heap = []
    for i in idx:
        down = step_down(units[i], ranks[i])
        if down is not None:
            heap.append((gain(i, down[0]), i))
    heapq.heapify(heap)
    while used > budget:
        if not heap:
            raise InfeasibleBudget(f"budget of {budget} parameters is below one rank per matrix ({used})")
        _, i = heapq.heappop(heap)
        down = step_down(units[i], ranks[i])
        if down is None:
            continue
        ranks[i], freed = down
        used -= freed
        nxt = step_down(units[i], ranks[i])
        if nxt is not None:
            heapq.heappush(heap, (gain(i, nxt[0]), i))
    return ranks


def fill_budget(units: Sequence[Unit], ranks: list[Rank], budget: int, gain: Gain,
                subset: Sequence[int] | None = None) -> list[Rank]:
    """Take steps up, best gain first, while they fit: afterwards no unit's next step fits the rest.

    Step costs never grow (the dense step costs at most one rank), so a unit whose step does not fit
    is done; the leftover is then below the cheapest step any unit could still take.
    """
    idx = list(range(len(units))) if subset is None else list(subset)
    left = budget - total([units[i] for i in idx], [ranks[i] for i in idx])
    heap = [(-gain(i, ranks[i]), i) for i in idx if ranks[i] is not DENSE]
    heapq.heapify(heap)
    while heap and left > 0:
        _, i = heapq.heappop(heap)
        up = step_up(units[i], ranks[i])
        if up is None or up[1] > left:
            continue
        ranks[i], cost = up
        left -= cost
        if ranks[i] is not DENSE:
            heapq.heappush(heap, (-gain(i, ranks[i]), i))
    return ranks


def fit_budget(units: Sequence[Unit], ranks: list[Rank], budget: int, gain: Gain,
               subset: Sequence[int] | None = None) -> list[Rank]:
    """Shrink if over, then fill: the integer budget fix every allocator shares."""
    shrink_to_budget(units, ranks, budget, gain, subset)
    return fill_budget(units, ranks, budget, gain, subset)


def loss_gain(units: Sequence[Unit], weights: Sequence[float]) -> Gain:
    """Marginal reduction of weighted data loss per parameter of the next step (dense step included)."""
    def gain(i: int, rank: Rank) -> float:
        up = step_up(units[i], rank)
        return -math.inf if up is None else weights[i] * marginal_loss(units[i], rank) / max(up[1], 1)

    return gain


def greedy_loss_allocation(units: Sequence[Unit], weights: Sequence[float], budget: int) -> list[Rank]:
    """Minimise Σ wᵤ·tailᵤ(kᵤ) under the budget: greedy over concave-hull segments, then single steps.

    The hull greedy is the exact Lagrangian (convexified) solution; the single-step fill uses what a
    segment that no longer fits leaves over.
    """
    ranks: list[Rank] = [1 if u.max_rank >= 1 else DENSE for u in units]
    left = budget - total(units, ranks)
    if left < 0:
        raise InfeasibleBudget(f"budget of {budget} is below one rank per matrix ({total(units, ranks)})")
    segs = [hull_segments(u, w) for u, w in zip(units, weights, strict=True)]
    pos = [0] * len(units)
    heap = [(-s[0][0], i) for i, s in enumerate(segs) if s]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        _, reach, cost = segs[i][pos[i]]
        if cost > left:
            continue  # this unit stops here; the single-step fill may still move it
        ranks[i] = reach
        left -= cost
        pos[i] += 1
        if pos[i] < len(segs[i]):
            heapq.heappush(heap, (-segs[i][pos[i]][0], i))

    return fill_budget(units, ranks, budget, loss_gain(units, weights))


def built_copy(model, units: Sequence[Unit], ranks: Sequence[Rank]):
    """A copy of `model` with `units` built at `ranks`, and its adapter; the model itself is left as it is."""
    import copy

    from svdzip.methods.materialise import materialise
    from svdzip.models.adapter import ModelAdapter

    trial = copy.deepcopy(model)
    adapter = ModelAdapter(trial)
    materialise(adapter, list(units), list(ranks))
    return trial, adapter


def heldout_loss(units: Sequence[Unit], ranks: Sequence[Rank], model, tokens, batch_size: int = 1) -> float:
    """Mean next-token loss of the model compressed to `ranks` (on a copy) over held-out tokens."""
    trial, _ = built_copy(model, units, ranks)
    loss = heldout_nll(trial, tokens, batch_size)
    del trial
    return loss


def heldout_nll(model, tokens, batch_size: int = 1) -> float:
    """Mean next-token loss of `model` over the held-out windows `tokens`, one window at a time by default: a window's
    logits over Qwen's 152k words are 0.3 GB in float32, held about three times over while the loss is taken, beside
    the model and, for a guard, its trial copy."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch_size):
            ids = tokens[start : start + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                         reduction="sum"))
            count += ids[:, 1:].numel()
    return nll / max(count, 1)


def tune_on_heldout(units: Sequence[Unit], ctx, name: str, grid: Sequence[float],
                    ranks_for: Callable[[float], list[Rank]]) -> float:
    """Pick the hyperparameter value whose allocation has the lowest loss on held-out CALIBRATION text.

    The held-out windows come from the calibration corpus but were not used for the statistics
    (`svdzip compress` draws them when the allocator's needs say `heldout`); evaluation text is never seen.
    """
    import logging

    tokens = ctx.heldout_tokens
    if tokens is None:
        raise SvdzipError(f"tuning {name} needs held-out calibration tokens: `svdzip compress` draws them for "
                          "--tune-beta and for --allocator-option guard=true; in Python pass heldout_tokens to "
                          "compress()")
    if ctx.model is None:
        raise SvdzipError(f"tuning {name} needs the model")
    scores = {}
    for value in grid:
        scores[value] = heldout_loss(units, ranks_for(value), ctx.model, tokens)
        logging.getLogger(__name__).info("tuning %s = %g: held-out calibration ppl %.3f", name, value,
                                         math.exp(min(scores[value], 700)))
    best = min(scores, key=scores.get)
    logging.getLogger(__name__).info("chose %s = %g on %d held-out calibration windows", name, best,
                                     tokens.shape[0])
    return best
