"""MoDeGPT (methods-spec §11): each module compressed as a whole, by making its shared inner dimension smaller.

Three module types per decoder layer, each a `SlimUnit` whose "rank" is how much of that inner
dimension it keeps, so that the allocators that understand widths (uniform, loss-aware,
block-influence) spend the budget over them as over factorised matrices:

* Type I, the MLP (`NystromMLP`, `methods.nystrom`): neurons kept by ridge leverage, `down_proj` refitted.
* Type II, key–query (`KeyQuery`, `methods.key_query`): query/key dimensions kept per KV group by CR
  scores, whole RoPE pairs.
* Type III, value–output (`ValueOutput`, `methods.value_output`): each KV group's V·O product truncated
  in the whitened metric.

Attention modules keep the original head size (`models.sliced`: the dropped dimensions are zeros that
are never computed or stored), so the stock attention runs them with its own 1/√d_h scale. A module a
family cannot slim this way (fused projections, per-head q/k norms for key–query) is kept dense
(`KeptUnit`) and `--ratio` still counts every decoder linear, so the others carry more.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from svdzip.budget import DENSE
from svdzip.errors import SvdzipError
from svdzip.methods.decompose import Unit
from svdzip.methods.factorisations import FactorisationMethod, Metric
from svdzip.methods.key_query import energy_curve, kept_dims, selection_order
from svdzip.methods.linalg import Spectrum
from svdzip.methods.nystrom import LEVERAGE_RIDGE, REFIT_JITTER, leverage_order, nystrom_curve, nystrom_refit
from svdzip.methods.value_output import ValueOutputBasis, value_output_basis, whitening_factor
from svdzip.models.adapter import LinearInfo, ModelAdapter
from svdzip.models.sliced import SlimLinear, column_subset, row_subset
from svdzip.needs import Needs

log = logging.getLogger(__name__)

#: the roles that read the MLP's input (their rows are the neurons) and the one that reads the neurons
NEURON_ROLES = ("gate", "up", "expert_gate", "expert_up")
DOWN_ROLES = ("down", "expert_down")
#: calibration windows the query/key output energies are measured on
ENERGY_WINDOWS = 8


class SlimModule(ABC):
    """One module's closed-form compression at any width: its loss curve, and the linears it builds."""

    kind: ClassVar[str] = ""
    loss_roles: ClassVar[tuple[str, ...]] = ()  # the members at whose outputs its loss is measured
    width: int  # units of its inner dimension (neurons, RoPE pairs or head dimensions)
    per_rank: int  # weights one unit costs
    sigma2: torch.Tensor  # loss the t-th kept unit removes (Σ over calibration tokens)

    @abstractmethod
    def build(self, adapter: ModelAdapter, members: list[LinearInfo], rank: int) -> dict[str, nn.Module]:
        """The new linears, by name, keeping `rank` units."""

    def reported_width(self, rank: int) -> int:
        """What `svdzip info` shows: neurons kept, or dimensions per head."""
        return rank


@dataclass
class KeptUnit(Unit):
    """A linear this method keeps dense: it counts in the budget and never takes a rank."""

    @property
    def max_rank(self) -> int:
        return 0

    def uniform_rank(self, ratio: float) -> int | None:
        return DENSE


@dataclass
class SlimUnit(Unit):
    """A module whose rank is how much of its inner dimension it keeps."""

    module: SlimModule | None = None
    path: str = ""  # the module holding the linears (an MLP, an attention)
    slimmed: ClassVar[bool] = True

    @property
    def name(self) -> str:
        return f"{self.path}:{self.module.kind}"

    @property
    def role(self) -> str:
        return self.module.kind

    @property
    def loss_members(self) -> list[LinearInfo]:
        return [m for m in self.members if m.role in self.module.loss_roles]

    @property
    def cost_per_rank(self) -> int:
        return self.module.per_rank

    @property
    def dense_params(self) -> int:
        return sum(m.dense_params for m in self.members)

    def cost(self, rank: int | None) -> int:
        if self.pricing is not None:
            raise SvdzipError("slimmed modules are priced in parameters; a memory budget is not supported with them")
        return self.dense_params if rank is DENSE else rank * self.module.per_rank

    @property
    def max_rank(self) -> int:
        return self.module.width - 1

    def uniform_rank(self, ratio: float) -> int | None:
        """The same fraction of the inner dimension as of the parameters (MoDeGPT's `floor(width · keep)`)."""
        return max(1, int((1.0 - ratio) * self.module.width))

    @torch.no_grad()
    def materialise(self, adapter: ModelAdapter, rank: int | None) -> list[Any]:
        from svdzip.methods.materialise import ModuleReport

        share = self.seconds / len(self.members)
        if rank is DENSE:  # kept as it is: the same report rows as any dense unit
            return super().materialise(adapter, DENSE)
        built = self.module.build(adapter, self.members, rank)
        energy = self.spectrum.energy
        loss = self.spectrum.tail(rank) / energy if energy > 0 else 0.0
        rows = []
        for info in self.members:
            new = built[info.name]
            adapter.set_module(info.name, new)
            params = new.weight.numel()
            rows.append(ModuleReport(info.name, info.role, info.layer, info.out_features, info.in_features, None,
                                     params, params / info.dense_params, loss, share,
                                     width=self.module.reported_width(rank)))
        return rows


class NystromMLP(SlimModule):
    """Type I: the MLP keeps `rank` neurons; gate/up keep their rows, down is refitted (Nyström)."""

    kind = "mlp"
    loss_roles = DOWN_ROLES

    def __init__(self, order: torch.Tensor, sigma2: torch.Tensor, per_rank: int, gram: Callable[[], torch.Tensor]):
        self.order, self.sigma2, self.per_rank, self.gram = order, sigma2, per_rank, gram
        self.width = order.numel()

    def build(self, adapter, members, rank):
        kept = torch.sort(self.order[:rank]).values
        built = {}
        for info in members:
            old = adapter.module(info.name)
            weight, bias = old.weight.detach(), getattr(old, "bias", None)
            if info.role in DOWN_ROLES:
                gram = self.gram().to(weight.device)
                down = nystrom_refit(gram, weight, kept.to(weight.device), REFIT_JITTER)
                new = SlimLinear(rank, info.out_features, bias=bias is not None, device=weight.device,
                                 dtype=weight.dtype)
                new.weight.copy_(down.to(weight))
                if bias is not None:
                    new.bias.copy_(bias)
            else:
                index = kept.to(weight.device)
                new = SlimLinear(info.in_features, rank, bias=bias is not None, device=weight.device,
                                 dtype=weight.dtype)
                new.weight.copy_(weight[index])
                if bias is not None:
                    new.bias.copy_(bias[index])
            built[info.name] = new
        return built


class KeyQuery(SlimModule):
    """Type II: every KV group keeps `rank` RoPE pairs (or dimensions) of its query and key heads."""

    kind = "key-query"
    loss_roles = ("q", "k")

    def __init__(self, order: torch.Tensor, sigma2: torch.Tensor, head_dim: int, heads: int, rope: bool,
                 hidden: int):
        self.order, self.sigma2, self.head_dim, self.heads, self.rope = order, sigma2, head_dim, heads, rope
        self.width = order.shape[1]
        kv = order.shape[0]
        self.per_rank = (heads + kv) * hidden * (2 if rope else 1)

    def reported_width(self, rank):
        return 2 * rank if self.rope else rank

    def build(self, adapter, members, rank):
        dims = kept_dims(self.order, rank, self.head_dim, self.rope)  # (n_kv, r)
        kv, group = dims.shape[0], self.heads // dims.shape[0]
        offsets = torch.arange(kv)[:, None] * self.head_dim
        index = {"k": (dims + offsets).flatten(),
                 "q": (dims.repeat_interleave(group, 0) + torch.arange(self.heads)[:, None] * self.head_dim).flatten()}
        built = {}
        for info in members:
            old = adapter.module(info.name)
            weight, bias = old.weight.detach(), getattr(old, "bias", None)
            rows = index[info.role].to(weight.device)
            built[info.name] = row_subset(weight[rows], bias[rows] if bias is not None else None, info.out_features,
                                          rows)
        return built


class ValueOutput(SlimModule):
    """Type III: every KV group's V·O product kept at rank `rank` per head, in the first dims of each head."""

    kind = "value-output"
    loss_roles = ("o",)

    def __init__(self, bases: list[ValueOutputBasis], head_dim: int, heads: int, hidden: int):
        self.bases, self.head_dim, self.heads = bases, head_dim, heads
        self.width = head_dim
        self.per_rank = (len(bases) + heads) * hidden
        self.sigma2 = torch.stack([b.sigma2 for b in bases]).sum(0)

    def build(self, adapter, members, rank):
        v_info = next(m for m in members if m.role == "v")
        o_info = next(m for m in members if m.role == "o")
        v_old, o_old = adapter.module(v_info.name), adapter.module(o_info.name)
        dtype, device = v_old.weight.dtype, v_old.weight.device
        kv, d = len(self.bases), o_info.out_features
        group = self.heads // kv
        value = torch.cat([b.value[:, :rank].T for b in self.bases])  # (kv·r, d)
        output = torch.cat([b.output[:rank, j * d:(j + 1) * d].T for b in self.bases for j in range(group)], dim=1)
        dims = torch.arange(rank)
        v_index = (torch.arange(kv)[:, None] * self.head_dim + dims).flatten()
        o_index = (torch.arange(self.heads)[:, None] * self.head_dim + dims).flatten()
        # v's bias reaches the output as b_vᵀ W_O (every attention row sums to 1): folded into o's bias, exactly
        bias = o_old.bias.detach().double() if getattr(o_old, "bias", None) is not None else None
        if getattr(v_old, "bias", None) is not None:
            per_head = v_old.bias.detach().double().view(kv, 1, self.head_dim).expand(kv, group, self.head_dim)
            fold = o_old.weight.detach().double() @ per_head.reshape(-1)
            bias = fold if bias is None else bias + fold
        # v keeps a (zero) bias where it had one, so that a checkpoint holds every tensor the family's layers expect
        v_bias = value.new_zeros(value.shape[0]) if getattr(v_old, "bias", None) is not None else None
        return {
            v_info.name: row_subset(value.to(device, dtype), v_bias, v_info.out_features, v_index.to(device)),
            o_info.name: column_subset(output.to(device, dtype), bias.to(device, dtype) if bias is not None else None,
                                       o_info.in_features, o_index.to(device)),
        }


class MoDeGPT(FactorisationMethod):
    name = "modegpt"
    summary = ("MoDeGPT's modular decomposition: MLPs slimmed by Nyström, query/key dimensions kept by CR scores, "
               "value-output products truncated whitened")
    structured = True
    #: what `auto` means with this method: loss-aware over the modules, guarded, no training. Loss-aware was measured
    #: better than the paper's block-influence allocation (`--allocator block-influence`) on SmolLM2-135M at 20 % and
    #: 40 % and on Qwen2.5-0.5B at 20 % (block influence 5.4× / 3.7× the dense perplexity, loss-aware 1.09×), worse
    #: on Gemma-3-270M (7.8× against 3.2× on wiki at 40 %): the guard builds whichever of loss-aware, uniform and
    #: block influence loses least on held-out calibration windows (benchmarks/modegpt.py)
    recommended: ClassVar[dict[str, Any] | None] = {"allocator": "loss-aware", "allocator_options": {"guard": True},
                                                    "heal": "none"}

    def needs(self, config: Any = None) -> Needs:
        return Needs(statistics=frozenset({"grams"}), calib_tokens=True, whole_model=True,
                     why=("modegpt builds whole modules in memory from each input's Gram matrix and the query/key "
                          "energies of a forward pass",))

    def metric(self, members, cols, stats, config, device, factors) -> Metric:
        raise SvdzipError("modegpt slims whole modules; it has no per-matrix metric")

    def build_units(self, adapter: ModelAdapter, stats: Any, device: torch.device | str = "cpu",
                    tokens: torch.Tensor | None = None, skip_fused: bool = False) -> list[Unit]:
        """Every module this family can slim as a `SlimUnit` (its curve computed), the other linears kept."""
        modules = slimmable_modules(adapter, skip_fused)
        kept = [info for info in adapter.linears() if not any(info in members for _, _, members in modules)]
        units: list[Unit] = [KeptUnit(members=[info], spectrum=_flat()) for info in kept]
        widest = max((members[-1].in_features for kind, _, members in modules if kind == "mlp"), default=0)
        if widest and stats.tokens < 4 * widest:
            log.warning("modegpt refits each down_proj on %d calibration tokens for up to %d neurons: with fewer than "
                        "about 4 tokens a neuron the refit fits the calibration text, not the language (raise "
                        "--calib-samples)", stats.tokens, widest)
        energies = None
        if any(kind == "key-query" for kind, _, _ in modules):
            if tokens is None:
                raise SvdzipError("modegpt's key-query module needs calibration tokens")
            names = [m.name for kind, _, members in modules if kind == "key-query" for m in members]
            energies = output_energies(adapter.model, names, tokens[:ENERGY_WINDOWS], scale_to=stats.tokens)
        for kind, path, members in tqdm(modules, desc="MoDeGPT: module curves", unit="module"):
            t0 = time.perf_counter()
            if any(m.input_key not in stats.grams for m in members) and ".experts." in path:
                log.warning("modegpt keeps %s dense: the router sent it no calibration token", path)
                units += [KeptUnit(members=[m], spectrum=_flat()) for m in members]
                continue
            module = BUILDERS[kind](adapter, stats, members, device, energies)
            units.append(SlimUnit(members=members, spectrum=_flat(module.sigma2.double().cpu()),
                                  seconds=time.perf_counter() - t0, module=module, path=path))
        if kept:
            log.info("modegpt keeps %d linears dense (%s): this family cannot slim them", len(kept),
                     ", ".join(sorted({i.role for i in kept})))
        return units


def _flat(sigma2: torch.Tensor | None = None) -> Spectrum:
    return Spectrum(sigma2=sigma2 if sigma2 is not None else torch.zeros(1, dtype=torch.float64),
                    basis=torch.zeros(0, 0))


def _gram(stats: Any, info: LinearInfo, device) -> torch.Tensor:
    if info.input_key not in stats.grams:
        raise SvdzipError(f"statistics have no Gram matrix for {info.input_key} (the input of {info.name})")
    return stats.grams[info.input_key].to(device)


def _mlp(adapter: ModelAdapter, stats: Any, members: list[LinearInfo], device, energies) -> SlimModule:
    down = next(m for m in members if m.role in DOWN_ROLES)
    gram = _gram(stats, down, device)
    weight = adapter.module(down.name).weight.detach().to(device)
    order = leverage_order(gram, LEVERAGE_RIDGE)
    sigma2 = nystrom_curve(gram, weight, order, REFIT_JITTER)
    # the budget counts weights (as for a factorisation's): a neuron's gate/up rows and its down column;
    # the Gram is read again for the refit (from the statistics, in memory or on disk), not kept here
    return NystromMLP(order.cpu(), sigma2.cpu(), sum(m.in_features for m in members if m.role in NEURON_ROLES)
                      + down.out_features, lambda: _gram(stats, down, "cpu"))


def _key_query(adapter: ModelAdapter, stats: Any, members: list[LinearInfo], device, energies) -> SlimModule:
    q = next(m for m in members if m.role == "q")
    k = next(m for m in members if m.role == "k")
    d_h, rope = adapter.head_dim, _uses_rope(adapter)
    q_energy = energies[q.name].view(-1, d_h)
    k_energy = energies[k.name].view(-1, d_h)
    order = selection_order(q_energy, k_energy, rope)
    return KeyQuery(order, energy_curve(q_energy, k_energy, order, rope), d_h, q_energy.shape[0], rope, q.in_features)


def _value_output(adapter: ModelAdapter, stats: Any, members: list[LinearInfo], device, energies) -> SlimModule:
    v = next(m for m in members if m.role == "v")
    o = next(m for m in members if m.role == "o")
    d_h = adapter.head_dim
    factor = whitening_factor(_gram(stats, v, device))
    w_v = adapter.module(v.name).weight.detach().to(device).double()  # (kv·d_h, d)
    w_o = adapter.module(o.name).weight.detach().to(device).double()  # (d, heads·d_h)
    kv, heads = v.out_features // d_h, o.in_features // d_h
    group = heads // kv
    bases = []
    for i in range(kv):
        outputs = torch.stack([w_o[:, j * d_h:(j + 1) * d_h].T for j in range(i * group, (i + 1) * group)])
        b = value_output_basis(factor, w_v[i * d_h:(i + 1) * d_h].T, outputs)
        bases.append(ValueOutputBasis(b.value.float().cpu(), b.output.float().cpu(), b.sigma2.cpu()))
    return ValueOutput(bases, d_h, heads, o.out_features)


BUILDERS = {"mlp": _mlp, "key-query": _key_query, "value-output": _value_output}


def _uses_rope(adapter: ModelAdapter) -> bool:
    return any("rotary" in name for name, _ in adapter.model.named_modules())


def _full_rope_or_none(adapter: ModelAdapter) -> bool:
    """RoPE over the whole head in HF's rotate_half pairing (p with p + d_h/2), or no RoPE at all."""
    if not _uses_rope(adapter):
        return True
    config = adapter.model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    params = getattr(config, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) if isinstance(
        params, dict) else getattr(config, "partial_rotary_factor", 1.0)
    return adapter.head_dim % 2 == 0 and (factor is None or float(factor) == 1.0)


def slimmable_modules(adapter: ModelAdapter, skip_fused: bool = False) -> list[tuple[str, str, list[LinearInfo]]]:
    """(kind, module path, members) of every module this family can slim, in model order; an MLP with fused
    gate/up (Phi-3) is refused, or left out with `skip_fused` (the hybrid factorises it instead)."""
    by_parent: dict[str, list[LinearInfo]] = {}
    for info in adapter.linears():
        by_parent.setdefault(info.name.rpartition(".")[0], []).append(info)
    found = []
    for path, infos in by_parent.items():
        roles = {i.role: i for i in infos}
        if "gate_up" in roles:
            if skip_fused:
                continue
            raise SvdzipError(f"modegpt slims an MLP's neurons in separate gate/up projections; {path} fuses them "
                              "(Phi-3), which is not supported yet")
        downs = [i for i in infos if i.role in DOWN_ROLES]
        if downs:
            if len(downs) != 1 or not any(i.role in NEURON_ROLES for i in infos):
                raise SvdzipError(f"modegpt found no complete MLP at {path} (roles {sorted(roles)})")
            width = downs[0].in_features
            bad = [i.name for i in infos if i.role in NEURON_ROLES and i.out_features != width]
            if bad:
                raise SvdzipError(f"{bad[0]} has a different width than {downs[0].name} reads ({width})")
            found.append(("mlp", path, [i for i in infos if i.role in NEURON_ROLES] + downs))
            continue
        attention = adapter.model.get_submodule(path)
        # per-head q/k norms see every dimension, partial or interleaved RoPE does not pair p with p + d_h/2
        if {"q", "k"} <= set(roles) and not hasattr(attention, "q_norm") and _full_rope_or_none(adapter):
            found.append(("key-query", path, [roles["q"], roles["k"]]))
        if {"v", "o"} <= set(roles) and not hasattr(attention, "sinks"):  # sinks: rows no longer sum to 1
            found.append(("value-output", path, [roles["v"], roles["o"]]))
    return found


@torch.no_grad()
def output_energies(model: nn.Module, names: list[str], tokens: torch.Tensor, scale_to: int | None = None,
                    batch_size: int = 2) -> dict[str, torch.Tensor]:
    """Σ over tokens of each named linear's squared outputs, per output (float64), from a forward over `tokens`;
    rescaled to `scale_to` tokens (the statistics' count) so that they are in the Grams' units."""
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def watch(name: str):
        def hook(_module, _args, out):
            y = out.detach().double().reshape(-1, out.shape[-1])
            sums[name] = sums.get(name, 0) + y.pow(2).sum(0)
        return hook

    modules = dict(model.named_modules())
    for name in names:
        handles.append(modules[name].register_forward_hook(watch(name)))
    device = next(model.parameters()).device
    try:
        for start in range(0, tokens.shape[0], batch_size):
            model(input_ids=tokens[start:start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    factor = (scale_to / tokens.numel()) if scale_to else 1.0
    return {n: (s * factor).cpu() for n, s in sums.items()}
