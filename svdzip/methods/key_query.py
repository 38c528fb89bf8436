"""MoDeGPT's Type II maths (methods-spec §11.2.2): which query/key dimensions each KV group keeps (CR selection).

The attention score q·k = Σ_p q_p k_p is a sum over head dimensions; column–row sampling keeps the
dimensions with the largest ‖q_p‖·‖k_p‖. With E_q[j, p] = Σ_t q_{t,p}² (query head j) and E_k[i, p]
(key head i), a KV group i shares one selection with its g query heads: s²_p = Σ_j E_q[j, p]·E_k[i, p].
With RoPE, dimension p and p + d_h/2 are rotated together, so whole pairs are kept (score: the sum over
the pair, the re-implementations' form) and RoPE commutes with the selection exactly.

The loss curve: the output energy the dropped dimensions carry, Σ (E_q + E_k) over them — the q/k output
error of the selection, in the same units (Σ over calibration tokens) as every other unit's curve.
"""

from __future__ import annotations

import torch


def _grouped(q_energy: torch.Tensor, k_energy: torch.Tensor) -> torch.Tensor:
    """(n_kv, g, d_h) view of the query energies, checked against the key heads."""
    n_h, d_h = q_energy.shape
    n_kv = k_energy.shape[0]
    if n_h % n_kv or k_energy.shape[1] != d_h:
        raise ValueError(f"{n_h} query heads of {d_h} dims do not group over {tuple(k_energy.shape)} key heads")
    return q_energy.double().view(n_kv, n_h // n_kv, d_h)


def _fold(values: torch.Tensor, rope: bool) -> torch.Tensor:
    """Per dimension → per selectable unit: a RoPE pair (p, p + d_h/2) is one unit."""
    if not rope:
        return values
    half = values.shape[-1] // 2
    return values[..., :half] + values[..., half:]


def pair_scores(q_energy: torch.Tensor, k_energy: torch.Tensor, rope: bool) -> torch.Tensor:
    """s² per KV group and selectable unit (n_kv, d_h/2 with RoPE, else d_h): Σ_{j in group} E_q[j]·E_k[i]."""
    q = _grouped(q_energy, k_energy)
    return _fold((q * k_energy.double()[:, None, :]).sum(1), rope)


def selection_order(q_energy: torch.Tensor, k_energy: torch.Tensor, rope: bool) -> torch.Tensor:
    """(n_kv, units): each group's units by decreasing score (ties by index)."""
    return torch.sort(-pair_scores(q_energy, k_energy, rope), dim=1, stable=True).indices


def kept_dims(order: torch.Tensor, kept: int, head_dim: int, rope: bool) -> torch.Tensor:
    """(n_kv, dims) ascending head dimensions each group keeps at `kept` units (a pair counts once)."""
    top = order[:, :kept]
    dims = torch.cat([top, top + head_dim // 2], dim=1) if rope else top
    return torch.sort(dims, dim=1).values


def energy_curve(q_energy: torch.Tensor, k_energy: torch.Tensor, order: torch.Tensor, rope: bool) -> torch.Tensor:
    """sigma2[t]: q and k output energy the t-th kept unit of every group saves (summed over the groups)."""
    q = _grouped(q_energy, k_energy)
    per_unit = _fold(q.sum(1) + k_energy.double(), rope)  # (n_kv, units)
    return torch.gather(per_unit, 1, order).sum(0)
