"""ARA: learned rank allocation (Xv et al., arXiv 2510.19389; code `compressionOrg/ARA`; spec §6, §10.11).

Instead of a formula, ARA *trains* one categorical distribution per unit over 101 retention
candidates against the language-model loss on calibration text:

    L = CE + α·(R_tot − target)² + β·guidance,      α = 100, β = 50,

where R_tot is the expected parameter ratio and the guidance term pushes a module towards dense when
its saving (1 − ρ) is smaller than its normalised truncation error — the gain is not smooth at ρ = 1,
which a differentiable loss alone does not see. Factors are over-complete (ρ₀ = 1.2) and come from
the same data-weighted spectra as every other allocator (our eigen-route basis), so "uniform" and
ARA differ only in the ranks. Only the logits train; the model is frozen and restored unchanged.

Options (`--allocator-option key=value`):
  steps (128), seq_len (256), sequences (all calibration rows), batch (1), lr ("auto": 1e-3·2560/steps,
  capped at 0.05, i.e. the logit travel of the paper's 10 epochs × 256 steps at lr 1e-3; give 0.001 for
  the paper's per-step rate), alpha (100), beta (50), rho0 (1.2), snap (0.99), init ("auto": uniform, or
  loss-aware for the hybrid; any allocator name, e.g. drank; its own options as init_<key>=value), sticky_dense
  (false; the reference code's "once dense, always dense"), plot (true: the caller draws the training curve from
  the report).

The hybrid (`--method hybrid --allocator ara`): ARA starts from the hybrid's own choice (loss-aware over its menus,
`init_guard=true` to guard it). Modules it slims or keeps dense stay so, built into a copy of the model that the
masks train in; every matrix it factorises, and every matrix the hybrid can only factorise, gets a mask starting at
its chosen rank, and ARA re-spends what is left of the budget among them.

One `rank_max` per unit (`mask_rank_max`: the over-complete rank, capped by the basis the spectrum
kept) serves the mask, the targets and the dense test: a retention r̂ is worth the parameter ratio
ρ = scale·r̂ with scale = ρ₀·rank_max / over_complete_rank, which is ρ₀ exactly when the basis does not
cap (the paper's ρ = ρ₀·r̂) and smaller when it does (skewed GQA projections, rho0 above the headroom).

The allocator returns its training history, timings and learned retentions in `Allocation.report`;
`svdzip.report.plots.write_allocation_report` draws `ara_loss.png` / `ara_ratios.png` from it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from svdzip.allocate import common
from svdzip.allocate import options as opt
from svdzip.allocate.ara_mask import RHO0, MaskedLinear, StaircaseMask, bonus_table, over_complete_rank
from svdzip.allocate.base import Allocation, AllocationContext, Allocator, spent
from svdzip.budget import DENSE, max_useful_rank
from svdzip.errors import SvdzipError
from svdzip.methods.decompose import Unit
from svdzip.methods.linalg import truncate
from svdzip.needs import NOTHING, Needs

log = logging.getLogger(__name__)

PAPER_STEPS = 2560  # 10 epochs × 256 sequences, batch 1
PAPER_LR = 1e-3
MAX_AUTO_LR = 0.05  # the "auto" rate stops growing below ~51 steps: Adam steps that large overshoot
INIT_PREFIX = "init_"  # options of the allocator ARA starts from


@dataclass
class AraOptions:
    steps: int = 128
    seq_len: int = 256
    sequences: int = 0  # 0 = every calibration row
    batch: int = 1
    lr: float | str = "auto"
    alpha: float = 100.0
    beta: float = 50.0
    rho0: float = RHO0
    snap: float = 0.99
    init: str = "auto"
    sticky_dense: bool = False
    plot: bool = True

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> AraOptions:
        """Typed options (raw or parsed); a clear error for unknown keys and bad values."""
        parsed = ARA().parse_options(options)
        return cls(**{f.name: parsed[f.name] for f in fields(cls)})

    @property
    def learning_rate(self) -> float:
        if self.lr != "auto":
            return float(self.lr)
        return min(MAX_AUTO_LR, PAPER_LR * PAPER_STEPS / self.steps)


def training_windows(tokens: torch.Tensor, seq_len: int, sequences: int, bos_id: int | None) -> torch.Tensor:
    """Cut calibration rows into `seq_len` windows; a row that starts with BOS gives every window a BOS
    (Gemma degrades badly without one)."""
    if tokens is None or tokens.ndim != 2 or tokens.numel() == 0:
        raise SvdzipError("ARA trains on calibration tokens; none were given")
    rows = tokens[:sequences] if sequences else tokens
    out = []
    for row in rows:
        if bos_id is not None and int(row[0]) == bos_id and seq_len > 2:
            body = row[1:]
            step = seq_len - 1
            for s in range(0, body.numel() - step + 1, step):
                out.append(torch.cat([row[:1], body[s : s + step]]))
        else:
            for s in range(0, row.numel() - seq_len + 1, seq_len):
                out.append(row[s : s + seq_len])
    if not out:  # rows shorter than seq_len: use them whole
        out = list(rows)
    return torch.stack(out)


def mask_rank_max(unit: Unit, rho0: float) -> int:
    """The one rank_max of a unit: ARA's over-complete rank, capped by the basis its spectrum kept."""
    return max(1, min(over_complete_rank(unit.rows, unit.cols, rho0), unit.spectrum.basis.shape[1]))


def retention_scale(unit: Unit, rank_max: int, rho0: float) -> float:
    """Parameter ratio per unit of retention (ρ = scale·r̂): ρ₀ exactly unless the basis caps rank_max."""
    return rho0 * (rank_max / max(over_complete_rank(unit.rows, unit.cols, rho0), 1))  # exactly ρ₀ when uncapped


class _Installed:
    """Masked modules swapped into the model for training, and the way back to the dense model."""

    def __init__(self, units: list[Unit], ctx: AllocationContext, targets: list[float], opts: AraOptions):
        self.adapter = ctx.adapter
        self.originals: dict[str, torch.nn.Module] = {}
        self.masks: list[StaircaseMask] = []
        self.rank_max: list[int] = []
        for unit, target in zip(units, targets, strict=True):
            modules = [self.adapter.module(m.name) for m in unit.members]
            weight = modules[0].weight
            r_max = mask_rank_max(unit, opts.rho0)
            stacked = torch.cat([mod.weight.detach() for mod in modules], 0)
            a, b = truncate(stacked, unit.spectrum.basis.to(stacked.device), r_max)
            scale = retention_scale(unit, r_max, opts.rho0)
            mask = StaircaseMask(r_max, target, scale, opts.sticky_dense).to(weight.device)
            offset = 0
            for info, mod in zip(unit.members, modules, strict=True):
                left = a[offset : offset + info.out_features].to(weight.dtype)
                offset += info.out_features
                self.originals[info.name] = mod
                self.adapter.set_module(info.name, MaskedLinear(mod, left, b.to(weight.dtype), mask))
            self.masks.append(mask)
            self.rank_max.append(r_max)

    def restore(self) -> None:
        for name, mod in self.originals.items():
            self.adapter.set_module(name, mod)
        self.originals.clear()


def starting_allocator(units: list[Unit], init: str) -> str:
    """The allocator ARA starts from: `init`, where `auto` means uniform, or loss-aware for modules that choose."""
    if init != "auto":
        return init
    return "loss-aware" if any(u.chooses for u in units) else "uniform"


def _parsing_allocator(init: str) -> str:
    """Whose options init_<key>=value are, and whose needs ARA adds: `auto`'s are loss-aware's (uniform has none)."""
    return "loss-aware" if init == "auto" else init


def _start(units: list[Unit], ctx: AllocationContext, opts: AraOptions) -> Allocation:
    """The starting allocator's answer (options meant for it are passed as init_<key>=value)."""
    from svdzip.allocate import allocate

    n = len(INIT_PREFIX)
    sub = replace(ctx, options={k[n:]: v for k, v in ctx.options.items() if k.startswith(INIT_PREFIX)})
    return allocate(starting_allocator(units, opts.init), units, sub)


def _targets(units: list[Unit], ctx: AllocationContext, opts: AraOptions, kept: float,
             ranks: list[int | None] | None = None) -> list[float]:
    """Initial retention (fraction of each unit's rank_max): the uniform target, or `ranks` (by default another
    allocator's)."""
    rank_max = [mask_rank_max(u, opts.rho0) for u in units]
    scales = [retention_scale(u, r, opts.rho0) for u, r in zip(units, rank_max, strict=True)]
    if ranks is None:
        name = starting_allocator(units, opts.init)
        if name == "uniform":
            return [kept / scale for scale in scales]
        ranks = _start(units, ctx, opts).ranks
        log.info("ARA logits start from '%s' ranks (%d dense)", name, sum(r is DENSE for r in ranks))
    return [1.0 / scale + 0.01 if rank is DENSE else rank / r_max
            for rank, r_max, scale in zip(ranks, rank_max, scales, strict=True)]


def _train(model: torch.nn.Module, inst: _Installed, units: list[Unit], windows: torch.Tensor,
           kept: float, opts: AraOptions, seed: int) -> list[dict[str, float]]:
    """Train the mask logits (AdamW, no weight decay); returns the per-step history."""
    device = next(inst.masks[0].buffers()).device
    sizes = torch.tensor([float(u.dense_params) for u in units], device=device)
    scales = torch.tensor([m.rho0 for m in inst.masks], device=device)
    total = float(sizes.sum())
    bonus = torch.stack([bonus_table(u.spectrum, u.rows, u.cols) for u in units]).to(device)  # (U, 99)
    params = [m.logits for m in inst.masks]
    opt = torch.optim.AdamW(params, lr=opts.learning_rate, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    history: list[dict[str, float]] = []
    bar = tqdm(range(opts.steps), desc="ARA mask training", unit="step")
    for step in bar:
        if len(order) < opts.batch:
            order += torch.randperm(windows.shape[0], generator=gen).tolist()
        idx, order = order[: opts.batch], order[opts.batch :]
        ids = windows[idx].to(device)
        r_hat = torch.stack([m.refresh() for m in inst.masks])
        ce = model(input_ids=ids, labels=ids, use_cache=False).loss
        rho = torch.clamp(scales * r_hat, max=1.0)
        r_tot = (rho * sizes).sum() / total
        comp = (r_tot - kept) ** 2
        with torch.no_grad():  # bonus looked up at the nearest 0.01 key
            key = (rho * 100).round().long().clamp(1, 99) - 1
            push = (rho > 1 - bonus.gather(1, key[:, None]).squeeze(1)).to(rho.dtype)
        guide = ((1 - rho) * push).mean()
        loss = ce + opts.alpha * comp + opts.beta * guide
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        dense = sum(m.dense for m in inst.masks)
        row = {"step": step, "loss": loss.item(), "ce": ce.item(), "comp": comp.item(), "guide": guide.item(),
               "kept": r_tot.item(), "dense": dense}
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", ce=f"{row['ce']:.3f}", kept=f"{row['kept']:.4f}", dense=dense)
    return history


def finalise(units: list[Unit], r_hats: list[float], rank_max: list[int], kept: float, budget: int,
             rho0: float = RHO0, snap: float = 0.99) -> list[int | None]:
    """ARA's finalisation: snap ρ ≥ `snap` to dense, rescale the rest proportionally to hit the target,
    floor to integer ranks, then spend / trim the integer leftover greedily so the budget holds exactly.

    ρ = scale·r̂ with each unit's `retention_scale` of the `rank_max` its ranks are taken from."""
    rho = [retention_scale(u, rm, rho0) * r for u, r, rm in zip(units, r_hats, rank_max, strict=True)]
    dense = [p >= snap for p in rho]
    total = sum(u.dense_params for u in units)
    r_tot = sum(u.dense_params * (1.0 if d else p) for u, p, d in zip(units, rho, dense, strict=True)) / total
    comp = sum(u.dense_params * p for u, p, d in zip(units, rho, dense, strict=True) if not d)
    factor = 1.0 - (r_tot - kept) * total / comp if comp > 0 else 1.0
    ranks: list[int | None] = []
    for unit, r, rm, d in zip(units, r_hats, rank_max, dense, strict=True):
        if d:
            ranks.append(DENSE)
        else:
            ranks.append(min(max(1, int(r * factor * rm)), max(1, max_useful_rank(unit.rows, unit.cols))))
    return fit_budget(units, ranks, budget)


def fit_budget(units: list[Unit], ranks: list[int | None], budget: int) -> list[int | None]:
    """Integer fix after flooring (shared helper): trim while over budget, then fill while a step fits,
    by normalised whitened loss per parameter — the same measure ARA's bonus uses."""
    weights = [1.0 / max(u.spectrum.energy, 1e-300) for u in units]
    return common.fit_budget(units, list(ranks), budget, common.loss_gain(units, weights))


class ARA(Allocator):
    name = "ara"
    summary = "ARA: trains one mask distribution per matrix against the LM loss (learned allocation)"
    chooses = True  # for the hybrid: it starts from loss-aware's choice and refines the factorised matrices
    options = (
        opt.integer("steps", AraOptions.steps, "training steps", minimum=1),
        opt.integer("seq_len", AraOptions.seq_len, "tokens per training window", minimum=2),
        opt.integer("sequences", AraOptions.sequences, "calibration rows to train on (0 = all)", minimum=0),
        opt.integer("batch", AraOptions.batch, "windows per step", minimum=1),
        opt.number("lr", AraOptions.lr, "AdamW rate of the logits; auto = the paper's logit travel in `steps`",
                   parse=opt.or_word(opt.at_least(opt.as_number, 0.0, strict=True), "auto"),
                   kind="number > 0 or auto"),
        opt.number("alpha", AraOptions.alpha, "weight of the compression-ratio loss"),
        opt.number("beta", AraOptions.beta, "weight of the guidance (go-dense) loss"),
        opt.number("rho0", AraOptions.rho0, "over-complete base ratio (must exceed 1 to express dense)",
                   parse=opt.at_least(opt.as_number, 1.0, strict=True), kind="number > 1"),
        opt.number("snap", AraOptions.snap, "final ρ at or above which a matrix is kept dense"),
        opt.Option("init", "allocator name or auto", AraOptions.init,
                   "start the logits from this allocator's ranks (its options as init_<key>=value); auto: uniform, "
                   "or for the hybrid loss-aware's choice", opt.or_word(opt.other_allocator("ara"), "auto")),
        opt.flag("sticky_dense", AraOptions.sticky_dense, "the reference code's once dense, always dense"),
        opt.flag("plot", AraOptions.plot, "draw the training curve and learned ratios next to the output"),
    )

    def parse_options(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """ARA's own options, and init_<key> options parsed by the initialising allocator."""
        from svdzip.allocate import get_allocator

        own = opt.parse_options(self.name, self.options, {k: v for k, v in raw.items()
                                                          if not k.startswith(INIT_PREFIX)})
        n = len(INIT_PREFIX)
        sub = {k[n:]: v for k, v in raw.items() if k.startswith(INIT_PREFIX)}
        try:
            init = get_allocator(_parsing_allocator(own["init"])).parse_options(sub)
        except SvdzipError as exc:
            raise SvdzipError(f"{exc} (given to ARA as {INIT_PREFIX}<key>=value for init={own['init']})") from None
        if own["init"] == "uniform":
            init = {}
        if own["init"] == "auto":  # only what was given: a run that starts uniform records no loss-aware defaults
            init = {k: v for k, v in init.items() if k in sub}
        return {**own, **{INIT_PREFIX + k: v for k, v in init.items()}}

    def needs(self, options: Mapping[str, Any] | None = None) -> Needs:
        from svdzip.allocate import allocator_needs

        o = self.parse_options(options or {})
        n = len(INIT_PREFIX)
        sub = {k[n:]: v for k, v in o.items() if k.startswith(INIT_PREFIX)}
        # auto without options: uniform, or loss-aware's fisher signal, whose needs are ARA's own
        init = NOTHING if o["init"] == "auto" and not sub else allocator_needs(_parsing_allocator(o["init"]), sub)
        return init | Needs(calib_tokens=True, gradients=True, whole_model=True,
                            why=("ARA trains its masks by back-propagating the LM loss on calibration tokens through "
                                 "the whole model",))

    def allocate(self, units: list[Unit], ctx: AllocationContext) -> Allocation:
        opts = AraOptions.from_options(ctx.options)
        if ctx.model is None or ctx.adapter is None:
            raise SvdzipError("ARA trains masks on the model: the allocation context has no model")
        if any(u.chooses for u in units):
            return self._refine_choice(units, ctx, opts)
        return self._learn(units, ctx, opts)

    def _refine_choice(self, units: list[Unit], ctx: AllocationContext, opts: AraOptions) -> Allocation:
        """The hybrid: start from the starting allocator's choice, hold what it slims or keeps dense, and learn the
        ranks of every matrix it factorises within what the held modules leave of the budget."""
        start = _start(units, ctx, opts)
        held, held_ranks, free, free_ranks, owner = [], [], [], [], []
        for i, (unit, rank) in enumerate(zip(units, start.ranks, strict=True)):
            parts = unit.factorised_at(rank) if unit.chooses else [(unit, rank)]
            if parts is None:
                held.append(unit)
                held_ranks.append(rank)
                continue
            for part, r in parts:
                free.append(part)
                free_ranks.append(r)
                owner.append(i)
        ranks: list[int | None] = list(start.ranks)
        report = {"start": start.allocator, "start_report": start.report,
                  "held_modules": len(held), "refined_matrices": len(free)}
        if not free:
            log.info("ARA: the starting choice factorises no matrix; nothing to refine")
            return Allocation(ranks, report)
        log.info("ARA refines the %d matrices that '%s' factorised; %d modules it slims or keeps dense stay so",
                 len(free), report["start"], len(held))
        trial, adapter = common.built_copy(ctx.model, held, held_ranks)  # so that the masks learn around them
        inner = replace(ctx, model=trial, adapter=adapter, budget=ctx.budget - spent(held, held_ranks))
        learned = self._learn(free, inner, opts, free_ranks)
        del trial
        by_owner: dict[int, list[int | None]] = {}
        for i, r in zip(owner, learned.ranks, strict=True):
            by_owner.setdefault(i, []).append(r)
        for i, part_ranks in by_owner.items():
            ranks[i] = units[i].factorised_option(part_ranks) if units[i].chooses else part_ranks[0]
        return Allocation(ranks, {**learned.report, **report})

    def _learn(self, units: list[Unit], ctx: AllocationContext, opts: AraOptions,
               start: list[int | None] | None = None) -> Allocation:
        """ARA proper: train the masks of `units` (starting at `start` ranks, or the starting allocator's) in
        `ctx.model` and finalise their ranks within `ctx.budget`."""
        total = sum(u.dense_params for u in units)
        kept = ctx.budget / total
        targets = _targets(units, ctx, opts, kept, start)
        bos = getattr(ctx.model.config, "bos_token_id", None)
        windows = training_windows(ctx.calib_tokens, opts.seq_len, opts.sequences, bos)
        log.info("ARA: %d units, target kept %.4f, %d steps × batch %d × %d tokens (%d windows), lr %.3g",
                 len(units), kept, opts.steps, opts.batch, windows.shape[1], windows.shape[0], opts.learning_rate)
        model = ctx.model
        grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
        was_training = model.training
        torch.manual_seed(ctx.seed)
        t0 = time.perf_counter()
        inst = _Installed(units, ctx, targets, opts)
        try:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            history = _train(model, inst, units, windows, kept, opts, ctx.seed)
            with torch.no_grad():
                r_hats = [float(m.retention()) for m in inst.masks]
        finally:
            inst.restore()
            for n, p in model.named_parameters():
                p.requires_grad_(grad_flags.get(n, False))
            model.train(was_training)
        train_s = time.perf_counter() - t0
        ranks = finalise(units, r_hats, inst.rank_max, kept, ctx.budget, opts.rho0, opts.snap)
        n_dense = sum(r is DENSE for r in ranks)
        log.info("ARA: trained in %.1f s; expected kept %.4f → final %d dense of %d units", train_s,
                 history[-1]["kept"] if history else float("nan"), n_dense, len(units))
        report = {"train_s": train_s, "options": vars(opts).copy(), "lr": opts.learning_rate,
                  "windows": list(windows.shape), "history": history, "plots": opts.plot,
                  "units": [{"name": u.name, "r_hat": r, "rank_max": rm, "rank": k}
                            for u, r, rm, k in zip(units, r_hats, inst.rank_max, ranks, strict=True)]}
        return Allocation(ranks, report)
