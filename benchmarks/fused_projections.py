"""Fused projections (Phi-3's `qkv_proj`, `gate_up_proj`): one factorisation per fused matrix, or one per role?

    .venv/bin/python benchmarks/fused_projections.py [--stats PATH] [--model-dir DIR]

Real weights and real calibration Grams, without a Phi-3 download: SmolLM2-135M's q/k/v (and gate/up)
read the very same input, so stacking them is exactly the fused matrix Phi-3 stores. For every layer
and for budgets of 30–80 % of the fused matrix's parameters, the SVD-LLM whitened truncation loss
‖X(W − W')ᵀ‖² (= the dropped σ² of W·G^{1/2}, G = XᵀX) is compared at equal parameters:

* joint: one factorisation of the stacked matrix, rank k costs k·(Σm + n) (the right factor is shared);
* per-role slices: each role its own factors, ranks chosen by the greedy marginal-loss-per-parameter
  rule (optimal for these convex tails), rank k of role i costs k·(m_i + n); a slice may stay dense.

Reports Σ loss / Σ energy over the layers: lower is better. The proxy weighs every output row the
same (an error in v counts as much as one in q), which the whole-model allocator does too.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from svdzip.methods.linalg import weighted_spectrum  # noqa: E402

FUSED = {"qkv": (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"), "q+k+v"),
         "gate_up": (("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"), "gate+up")}
FRACTIONS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def greedy_split(tails: list[torch.Tensor], costs: list[int], dense: list[int], budget: int) -> float:
    """Least summed loss of the slices within `budget` parameters (each slice: a rank, or dense)."""
    ranks = [0] * len(tails)
    spent = 0
    heap = [(-float(t[0] - t[1]) / c, i) for i, (t, c) in enumerate(zip(tails, costs, strict=True))]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        if spent + costs[i] > budget:
            continue
        spent += costs[i]
        ranks[i] += 1
        if ranks[i] + 1 < len(tails[i]):
            heapq.heappush(heap, (-float(tails[i][ranks[i]] - tails[i][ranks[i] + 1]) / costs[i], i))
    loss = 0.0
    for t, r, c, d in zip(tails, ranks, costs, dense, strict=True):
        loss += 0.0 if r * c >= d else float(t[r])
    return loss


def tail_curve(sigma2: torch.Tensor) -> torch.Tensor:
    rev = torch.flip(sigma2, [0]).cumsum(0)
    return torch.cat([torch.flip(rev, [0]), rev.new_zeros(1)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cache = Path.home() / ".cache" / "svdzip"
    parser.add_argument("--model-dir", default=str(cache / "models" / "smollm2-135m"))
    parser.add_argument("--stats", default=str(cache / "stats" / "73416489777e7ffe.safetensors"))
    parser.add_argument("--layers", type=int, default=0, help="first N layers only (0 = all)")
    args = parser.parse_args()
    config = json.loads((Path(args.model_dir) / "config.json").read_text())
    n_layers = args.layers or config["num_hidden_layers"]
    totals = {(kind, how, f): 0.0 for kind in FUSED for how in ("joint", "slices") for f in FRACTIONS}
    energy = dict.fromkeys(FUSED, 0.0)
    with safe_open(str(Path(args.model_dir) / "model.safetensors"), "pt") as weights, \
            safe_open(args.stats, "pt") as stats:
        for layer in range(n_layers):
            for kind, (*roles, key) in FUSED.items():
                gram = stats.get_tensor(f"grams/model.layers.{layer}:{key}").double()
                ws = [weights.get_tensor(f"model.layers.{layer}.{path}.weight").double() for _, path in roles]
                n = ws[0].shape[1]
                stacked = torch.cat(ws)
                joint = tail_curve(weighted_spectrum(stacked, gram).sigma2)
                slices = [tail_curve(weighted_spectrum(w, gram).sigma2) for w in ws]
                energy[kind] += float(joint[0])
                dense = stacked.numel()
                for f in FRACTIONS:
                    budget = int(f * dense)
                    k = budget // (stacked.shape[0] + n)
                    totals[kind, "joint", f] += float(joint[min(k, len(joint) - 1)])
                    totals[kind, "slices", f] += greedy_split(
                        slices, [w.shape[0] + n for w in ws], [w.numel() for w in ws], budget)
            print(f"layer {layer} done", file=sys.stderr)
    print(f"{Path(args.model_dir).name}, {n_layers} layers, whitened loss / energy at equal parameters")
    print("| fused | kept params | joint | per-role slices |")
    print("|---|---|---|---|")
    for kind in FUSED:
        for f in FRACTIONS:
            print(f"| {kind} | {f:.0%} | {totals[kind, 'joint', f] / energy[kind]:.4f} | "
                  f"{totals[kind, 'slices', f] / energy[kind]:.4f} |")


if __name__ == "__main__":
    main()
