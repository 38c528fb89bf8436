"""Scale on paper, measured where it can be: one LLaMA-2-7B layer and one Mixtral layer timed here, then
the whole of LLaMA-2-7B, LLaMA-2-70B and Mixtral-8x7B extrapolated (time and peak memory, streamed, 1-8 processes).

Why: the real models do not fit this machine, but their cost is one layer's cost times the depth. A
synthetic layer of the real shape (random weights; the arithmetic does not care) gives this CPU's
seconds for calibration (layer forward + XᵀX per shared input) and for every matrix's SVD-LLM
decomposition through `svdzip.methods.linalg` (eigen-decompositions in float64, as svdzip runs them).

    OMP_NUM_THREADS=1 /work/tools/heavy .venv/bin/python -m benchmarks.extrapolate          # ~15 min
    .venv/bin/python -m benchmarks.extrapolate --only report    # recompute the tables from the JSON

Each part runs in a fresh process (peak RSS sampled every 5 ms per phase); every time is CPU time of
one thread (`time.process_time`, OMP_NUM_THREADS=1), so other users of the machine do not inflate it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import RESULTS, PeakRSS, setup_logging, write_results
from svdzip.core.distributed import assign_by_cost, eigen_cost
from svdzip.methods.decompose import BASIS_HEADROOM
from svdzip.methods.linalg import gram_factor, weighted_spectrum
from svdzip.report.tables import table

log = logging.getLogger("benchmarks.extrapolate")
SEQ = 2048  # calibration sequence length of the measurement (the papers' 2048)
MIXTRAL_EXPERTS_BUILT = 2  # of 8: the full layer's Grams alone (14 GB) do not fit beside the others here


# ------------------------------------------------------------------------------------------ shapes
@dataclass(frozen=True)
class Shape:
    """What the cost of one decoder layer depends on."""

    name: str
    layers: int
    hidden: int
    inter: int
    heads: int
    kv_heads: int
    experts: int = 0  # 0: a dense MLP
    top_k: int = 0
    vocab: int = 32000

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def matrices(self) -> list[tuple[str, str, int, int]]:
        """(role, shared-input key, rows = out, cols = in) of every compressible matrix of one layer."""
        h, i, kv = self.hidden, self.inter, self.kv_dim
        out = [("q", "qkv", h, h), ("k", "qkv", kv, h), ("v", "qkv", kv, h), ("o", "o", h, h)]
        for e in range(max(self.experts, 1)):
            p = f"e{e}." if self.experts else ""
            out += [(f"{p}gate", f"{p}gate_up", i, h), (f"{p}up", f"{p}gate_up", i, h), (f"{p}down", f"{p}down", h, i)]
        return out

    def layer_params(self) -> int:
        return sum(r * c for _, _, r, c in self.matrices())

    def gram_dims(self) -> dict[str, int]:
        return {key: c for _, key, _, c in self.matrices()}

    def gram_flops_per_token(self) -> float:
        """2 d² per shared input per token it sees; each expert sees top_k/experts of the tokens."""
        share = self.top_k / self.experts if self.experts else 1.0
        return sum(2.0 * d * d * (share if key.startswith("e") else 1.0) for key, d in self.gram_dims().items())

    def forward_flops_per_token(self) -> float:
        """Linears (experts: top_k of them) plus attention's QKᵀ and AV at sequence length SEQ."""
        attn = sum(r * c for role, _, r, c in self.matrices() if role in ("q", "k", "v", "o"))
        mlp = 3 * self.hidden * self.inter * (self.top_k if self.experts else 1)
        return 2.0 * (attn + mlp) + 4.0 * SEQ * self.hidden / 2  # causal: half the score matrix


LLAMA2_7B = Shape("LLaMA-2-7B", 32, 4096, 11008, 32, 32)
LLAMA2_70B = Shape("LLaMA-2-70B", 80, 8192, 28672, 64, 8)
MIXTRAL = Shape("Mixtral-8x7B", 32, 4096, 14336, 32, 8, experts=8, top_k=2)


# ------------------------------------------------------------------------------------- peak memory
# -------------------------------------------------------------------------------- one layer, timed
class GramHooks:
    """XᵀX per shared input in plain torch (fp32 product, fp64 running sum), timed on the CPU clock."""

    def __init__(self) -> None:
        self.grams: dict[str, torch.Tensor] = {}
        self.seconds = 0.0
        self.enabled = True

    def add(self, key: str, x: torch.Tensor) -> None:
        if not self.enabled:
            return
        t = time.process_time()
        x = x.reshape(-1, x.shape[-1])
        g = x.T @ x
        if key in self.grams:
            self.grams[key].add_(g)
        else:
            self.grams[key] = g.double()
        self.seconds += time.process_time() - t

    def pre_hook(self, key: str):
        return lambda _m, args: self.add(key, args[0])


def _routed_experts(experts: nn.Module, hooks: GramHooks):
    """transformers' eager expert loop, with the Gram of each expert's own tokens (gate/up input, down input)."""

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        mask = nn.functional.one_hot(top_k_index, num_classes=experts.num_experts).permute(2, 1, 0)
        for e in range(experts.num_experts):
            pos, token = torch.where(mask[e])
            if token.numel() == 0:
                continue
            x = hidden_states[token]
            hooks.add(f"e{e}.gate_up", x)
            gate, up = nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
            h = experts.act_fn(gate) * up
            hooks.add(f"e{e}.down", h)
            out = nn.functional.linear(h, experts.down_proj[e]) * top_k_weights[token, pos, None]
            final.index_add_(0, token, out.to(final.dtype))
        return final

    return forward


def build_layer(shape: Shape, experts: int) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig

    torch.manual_seed(0)
    common = dict(vocab_size=512, hidden_size=shape.hidden, intermediate_size=shape.inter, num_hidden_layers=1,
                  num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                  max_position_embeddings=SEQ, tie_word_embeddings=True)
    cfg = (MixtralConfig(**common, num_local_experts=experts, num_experts_per_tok=shape.top_k) if experts
           else LlamaConfig(**common))
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def weights_of(model: nn.Module, shape: Shape, role: str) -> torch.Tensor:
    layer = model.model.layers[0]
    if role in ("q", "k", "v", "o"):
        return getattr(layer.self_attn, f"{role}_proj").weight.detach()
    if shape.experts:
        e, kind = role[1:].split(".")
        ex = layer.mlp.experts
        gate, up = ex.gate_up_proj[int(e)].detach().chunk(2, dim=0)
        return {"gate": gate, "up": up, "down": ex.down_proj[int(e)].detach()}[kind]
    return getattr(layer.mlp, f"{role}_proj").weight.detach()


@torch.no_grad()
def measure_layer(shape: Shape, experts: int, decompose_roles: list[str]) -> dict[str, Any]:
    """Runs in a fresh process: build one layer, time calibration on SEQ tokens and the chosen decompositions."""
    torch.set_num_threads(1)
    meter = PeakRSS()
    baseline = PeakRSS.rss()
    meter.enter("build")
    model = build_layer(shape, experts)
    layer = model.model.layers[0]
    hooks = GramHooks()
    layer.self_attn.q_proj.register_forward_pre_hook(hooks.pre_hook("qkv"))
    layer.self_attn.o_proj.register_forward_pre_hook(hooks.pre_hook("o"))
    if experts:
        layer.mlp.experts.forward = _routed_experts(layer.mlp.experts, hooks)
    else:
        layer.mlp.gate_proj.register_forward_pre_hook(hooks.pre_hook("gate_up"))
        layer.mlp.down_proj.register_forward_pre_hook(hooks.pre_hook("down"))
    tokens = torch.randint(0, 512, (1, SEQ), generator=torch.Generator().manual_seed(0))
    after_build = PeakRSS.rss()

    meter.enter("calibrate")
    hooks.enabled = False
    model.model(input_ids=tokens[:, :128], use_cache=False)  # warm-up
    t = time.process_time()
    model.model(input_ids=tokens, use_cache=False)
    forward_only = time.process_time() - t
    hooks.enabled = True
    t = time.process_time()
    model.model(input_ids=tokens, use_cache=False)
    with_grams = time.process_time() - t
    gram_s = hooks.seconds
    grams = hooks.grams
    after_calibrate = PeakRSS.rss()

    rows = []
    factors: dict[str, torch.Tensor] = {}
    dims = {role: (rows_, cols, key) for role, key, rows_, cols in shape.matrices()}
    for role in decompose_roles:
        rows_, cols, key = dims[role]
        weight = weights_of(model, shape, role)
        meter.enter(f"decompose {role}")
        before = PeakRSS.rss()
        t = time.process_time()
        factor_s = 0.0
        factor = None
        if rows_ > cols:  # tall: a factor of G, shared by the matrices reading this input (as decompose() does)
            if key not in factors:
                factors.clear()  # one shared input at a time, like a streamed run
                factors[key] = gram_factor(grams[key])
                factor_s = time.process_time() - t
            factor = factors[key]
        headroom = math.ceil(BASIS_HEADROOM * rows_ * cols / (rows_ + cols))
        spectrum = weighted_spectrum(weight, grams[key], max_rank=headroom, factor=factor)
        seconds = time.process_time() - t
        meter.enter(f"after {role}")
        rows.append({"role": role, "rows": rows_, "cols": cols, "kept_basis": spectrum.basis.shape[1],
                     "seconds": round(seconds, 2), "factor_s": round(factor_s, 2), "rss_before": before})
        log.info("%s %s %dx%d: %.1f s", shape.name, role, rows_, cols, seconds)
        del spectrum
    peaks = meter.stop()
    for r in rows:
        r["peak_above_before_mib"] = round((peaks[f"decompose {r['role']}"] - r.pop("rss_before")) / 2**20, 1)
    mib = 2**20
    return {"shape": shape.name, "experts_built": experts, "tokens": SEQ,
            "forward_only_s": round(forward_only, 3), "forward_and_grams_s": round(with_grams, 3),
            "grams_s": round(gram_s, 3),
            "gram_bytes": sum(g.numel() * g.element_size() for g in grams.values()),
            "weight_bytes": sum(p.numel() * p.element_size() for p in layer.parameters()),
            "rss_baseline_mib": round(baseline / mib, 1), "rss_after_build_mib": round(after_build / mib, 1),
            "rss_after_calibrate_mib": round(after_calibrate / mib, 1),
            "peaks_mib": {k: round(v / mib, 1) for k, v in peaks.items()}, "decompositions": rows}


@torch.no_grad()
def measure_kernels() -> dict[str, Any]:
    """This CPU's rates for the terms of the cost model: fp64 matmul, eigh (at 2 sizes: the exponent), QR."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {}
    a = torch.randn(4096, 4096, dtype=torch.float64, generator=g)
    t = time.process_time()
    a @ a
    out["dgemm_flops_per_s"] = 2 * 4096**3 / (time.process_time() - t)
    out["eigh_s"] = {}
    for n in (1024, 2048, 4096, 8192):  # 8192: LLaMA-2-70B's hidden size
        x = torch.randn(n, n, dtype=torch.float64, generator=g)
        s = x @ x.T
        t = time.process_time()
        torch.linalg.eigh(s)
        out["eigh_s"][n] = time.process_time() - t
    out["eigh_exponent_2048_4096"] = math.log(out["eigh_s"][4096] / out["eigh_s"][2048], 2)
    out["eigh_exponent_4096_8192"] = math.log(out["eigh_s"][8192] / out["eigh_s"][4096], 2)
    m, k = 8192, 2048
    x = torch.randn(m, k, dtype=torch.float64, generator=g)
    t = time.process_time()
    torch.linalg.qr(x)
    out["qr_flops_per_s"] = qr_flops(m, k) / (time.process_time() - t)
    return out


def qr_flops(m: int, k: int) -> float:
    """Householder QR with Q formed: 2mk² − 2k³/3 for R, as much again for Q."""
    return 2 * (2.0 * m * k * k - 2.0 * k**3 / 3)


# ---------------------------------------------------------------------------------------- the model
def unit_cost_s(rows: int, cols: int, k: dict[str, Any], with_factor: bool) -> float:
    """Predicted seconds of one SVD-LLM spectrum along linalg.weighted_spectrum's path (all terms cubic)."""
    measured = {int(n): s for n, s in k["eigh_s"].items()}

    def eigh(n: int) -> float:  # from the largest measured size ≤ n, scaled as n³
        ref = max((m for m in measured if m <= n), default=min(measured))
        return measured[ref] * (n / ref) ** 3

    keep = math.ceil(BASIS_HEADROOM * rows * cols / (rows + cols))
    if rows <= cols:  # W G Wᵀ (m×m), one eigh
        mm = 2.0 * rows * cols * cols + 2.0 * rows * rows * cols
        return mm / k["dgemm_flops_per_s"] + eigh(rows)
    keep = min(keep, cols)  # tall: D = W F, DᵀD, eigh(n), U = QR(D V_k)
    mm = 2.0 * rows * cols * cols * 2 + 2.0 * rows * cols * keep
    return (mm / k["dgemm_flops_per_s"] + eigh(cols) + qr_flops(rows, keep) / k["qr_flops_per_s"]
            + (eigh(cols) if with_factor else 0.0))


def decomposition_jobs(shape: Shape, k: dict[str, Any], anchors: dict[str, float]) -> list[dict[str, Any]]:
    """One job per shared input and layer, as the distributed engine groups them (the factor once per job);
    seconds = the predicted cost × (measured / predicted) of the measured matrix of the same kind."""
    by_key: dict[str, list[tuple[str, int, int]]] = {}
    for role, key, rows, cols in shape.matrices():
        by_key.setdefault(key, []).append((role, rows, cols))
    jobs = []
    for key, members in by_key.items():
        seconds, first_tall = 0.0, True
        for role, rows, cols in members:
            kind = _kind(role)
            tall = rows > cols
            seconds += unit_cost_s(rows, cols, k, with_factor=tall and first_tall) * anchors.get(kind, 1.0)
            first_tall = first_tall and not tall
        cols = members[0][2]
        jobs.append({"key": key, "seconds": seconds,
                     "cost": float(cols) ** 3 + sum(eigen_cost(r, c) for _, r, c in members)})
    return jobs


def _kind(role: str) -> str:
    return role.split(".")[-1]


def anchors_from(measured: list[dict[str, Any]], k: dict[str, Any]) -> dict[str, float]:
    """measured / predicted per role kind (q, k, v, o, gate, up, down) of one measured layer."""
    out: dict[str, float] = {}
    for r in measured:
        pred = unit_cost_s(r["rows"], r["cols"], k, with_factor=r["factor_s"] > 0)
        out.setdefault(_kind(r["role"]), r["seconds"] / pred)
    return out


def extrapolate(payload: dict[str, Any]) -> dict[str, Any]:
    k = payload["kernels"]
    llama, mix = payload["llama7b_layer"], payload["mixtral_layer"]
    a_llama = anchors_from(llama["decompositions"], k)
    a_mix = {**a_llama, **anchors_from(mix["decompositions"], k)}
    a_mix["v"] = a_mix["k"]  # v was not decomposed: it has k's shape (GQA) and path
    per_1k = {"LLaMA-2-7B": _cal_per_1k(llama), "Mixtral-8x7B": _cal_per_1k(mix)}
    base = per_1k["LLaMA-2-7B"]
    per_1k["LLaMA-2-70B"] = {  # forward ~ n² (linear FLOPs per token), Grams ~ n² (Σ d² per token)
        "forward_s": base["forward_s"] * LLAMA2_70B.forward_flops_per_token() / LLAMA2_7B.forward_flops_per_token(),
        "grams_s": base["grams_s"] * LLAMA2_70B.gram_flops_per_token() / LLAMA2_7B.gram_flops_per_token()}
    out = {"calibration_tokens": {"official (32 x 512)": 32 * 512, "papers (256 x 2048)": 256 * 2048},
           "anchors_measured_over_predicted": {"llama": a_llama, "mixtral": a_mix}, "models": []}
    for shape, anchors in ((LLAMA2_7B, a_llama), (LLAMA2_70B, a_llama), (MIXTRAL, a_mix)):
        jobs = decomposition_jobs(shape, k, anchors)
        cal = per_1k[shape.name]
        cal_layer_1k = cal["forward_s"] + cal["grams_s"]
        row: dict[str, Any] = {"model": shape.name, "layers": shape.layers, "hidden": shape.hidden,
                               "inter": shape.inter, "experts": shape.experts,
                               "calibrate_per_layer_per_1k_tokens_s": round(cal_layer_1k, 3),
                               "grams_per_layer_per_1k_tokens_s": round(cal["grams_s"], 3),
                               "decompose_per_layer_s": round(sum(j["seconds"] for j in jobs), 1),
                               "by_processes": {}}
        all_jobs = [j for _ in range(shape.layers) for j in jobs]
        for n in (1, 2, 4, 8):
            owners = assign_by_cost([j["cost"] for j in all_jobs], n)
            load = [0.0] * n
            for j, o in zip(all_jobs, owners, strict=True):
                load[o] += j["seconds"]
            entry = {"decompose_h": round(max(load) / 3600, 2)}
            for label, tokens in out["calibration_tokens"].items():
                cal_s = shape.layers * cal_layer_1k * tokens / 1000 / n
                entry[f"calibrate_h {label}"] = round(cal_s / 3600, 2)
                entry[f"total_h {label}"] = round((cal_s + max(load)) / 3600, 2)
                entry[f"peak_gib {label}"] = round(peak_bytes(shape, tokens / n)["total"] / 2**30, 1)
            row["by_processes"][n] = entry
        row["peak_terms_gib (papers, 1 process)"] = {
            t: round(v / 2**30, 2) for t, v in peak_bytes(shape, 256 * 2048).items()}
        out["models"].append(row)
    return out


def _cal_per_1k(measured: dict[str, Any]) -> dict[str, float]:
    scale = 1000 / measured["tokens"]
    return {"forward_s": measured["forward_only_s"] * scale, "grams_s": measured["grams_s"] * scale}


def spectrum_workspace_bytes(rows: int, cols: int) -> int:
    """Float64 temporaries of linalg.weighted_spectrum for one matrix (besides its Gram and fp32 weight),
    stage by stage along its code; checked against the measured peak of every 7B matrix (see the report)."""
    m, n = rows, cols
    if m <= n:  # W, W G | W, C = W G Wᵀ, its symmetrised copies, eigh's vectors and LAPACK work
        return 8 * max(2 * m * n + m * m, m * n + 5 * m * m)
    k = min(math.ceil(BASIS_HEADROOM * m * n / (m + n)), n)
    eigh_stage = 2 * m * n + n * n + 5 * n * n  # W, D = W F, F, DᵀD and its eigen-solve
    qr_stage = 2 * m * n + n * n + n * n + 2 * m * k + k * k  # W, D, F, sorted vectors, D V_k, its Q and R
    return 8 * max(eigh_stage, qr_stage)


def peak_bytes(shape: Shape, tokens: float) -> dict[str, int]:
    """A streamed run's peak, from the shapes: one layer's weights (fp32) + its Grams (fp64) + the cached
    hidden states of the calibration tokens (a layer's input and output, fp32) + the largest spectrum."""
    terms = {
        "layer weights fp32": 4 * shape.layer_params(),
        "layer Grams fp64": 8 * sum(d * d for d in shape.gram_dims().values()),
        "hidden states in + out fp32": int(2 * 4 * tokens * shape.hidden),
        "largest spectrum workspace": max(spectrum_workspace_bytes(r, c) for _, _, r, c in shape.matrices()),
    }
    terms["total"] = sum(terms.values())
    return terms


def check_formula(measured: dict[str, Any], shape: Shape) -> dict[str, Any]:
    """The formula at the measured layer's tokens and expert count vs the measured peak above baseline."""
    built = Shape(shape.name, 1, shape.hidden, shape.inter, shape.heads, shape.kv_heads,
                  experts=measured["experts_built"], top_k=shape.top_k)
    predicted = peak_bytes(built, measured["tokens"])
    decomposed = [r["role"] for r in measured["decompositions"]]
    dims = {role: (r, c) for role, _, r, c in built.matrices()}
    predicted["largest spectrum workspace"] = max(spectrum_workspace_bytes(*dims[r]) for r in decomposed)
    predicted["total"] = sum(v for t, v in predicted.items() if t != "total")
    peak = max(measured["peaks_mib"].values()) - measured["rss_baseline_mib"]
    return {"predicted_mib": round(predicted["total"] / 2**20, 1), "measured_peak_above_baseline_mib": round(peak, 1),
            "predicted_over_measured": round(predicted["total"] / 2**20 / peak, 3),
            "terms_mib": {t: round(v / 2**20, 1) for t, v in predicted.items()},
            "largest_spectrum_measured_mib": max(r["peak_above_before_mib"] for r in measured["decompositions"]),
            "largest_spectrum_predicted_mib": round(predicted["largest spectrum workspace"] / 2**20, 1)}


# ------------------------------------------------------------------------------------------ report
def markdown(p: dict[str, Any]) -> str:
    k, ex = p["kernels"], p["extrapolation"]
    lines = ["# Scale on paper: one layer measured, whole models extrapolated", "",
             "CPU time of one thread (OMP_NUM_THREADS=1, `time.process_time`); synthetic random weights of the "
             f"real shapes; calibration measured on {SEQ} tokens (one sequence of {SEQ}), Grams fp32 products "
             "summed in fp64; decompositions are `svdzip.methods.linalg.weighted_spectrum` (SVD-LLM whitening, "
             "float64) with the basis headroom `decompose()` keeps.", "",
             "## Measured on this CPU", ""]
    for key in ("llama7b_layer", "mixtral_layer"):
        m = p[key]
        lines += [f"**{m['shape']} layer** ({m['experts_built']} experts built)" if m["experts_built"]
                  else f"**{m['shape']} layer**",
                  "", f"forward {m['forward_only_s']} s, forward + Grams {m['forward_and_grams_s']} s, Grams alone "
                  f"{m['grams_s']} s on {m['tokens']} tokens; weights {m['weight_bytes'] / 2**30:.2f} GiB, Grams "
                  f"{m['gram_bytes'] / 2**30:.2f} GiB."
                  + (f" Routing is real top-{MIXTRAL.top_k}: with {m['experts_built']} experts every expert sees every "
                     "token, so the forward and Gram FLOPs per token equal the 8-expert layer's (each token still "
                     "visits 2 experts); decomposed: attention and expert 0 — v is taken as k (same shape), experts "
                     "1–7 as expert 0; weights and Grams scale linearly to 8 experts." if m["experts_built"] else ""),
                  "",
                  table(["matrix", "rows × cols", "kept basis", "CPU s", "of which Gram factor s",
                         "peak above its start MiB"],
                        [[r["role"], f"{r['rows']}×{r['cols']}", r["kept_basis"], r["seconds"], r["factor_s"],
                          r["peak_above_before_mib"]] for r in m["decompositions"]]), ""]
        chk = p.get(f"{key}_memory_check")
        if chk:
            lines += [f"Peak-memory formula at this layer: predicted {chk['predicted_mib']} MiB, measured peak RSS "
                      f"above the post-import baseline {chk['measured_peak_above_baseline_mib']} MiB "
                      f"(ratio {chk['predicted_over_measured']}); largest spectrum's workspace predicted "
                      f"{chk['largest_spectrum_predicted_mib']} MiB, measured {chk['largest_spectrum_measured_mib']} "
                      "MiB.", ""]
    lines += [f"Kernels: fp64 matmul {k['dgemm_flops_per_s'] / 1e9:.1f} GFLOP/s, QR {k['qr_flops_per_s'] / 1e9:.1f} "
              f"GFLOP/s, eigh {', '.join(f'n={n}: {s:.2f} s' for n, s in k['eigh_s'].items())} (measured exponent "
              f"{k['eigh_exponent_2048_4096']:.2f} between 2048 and 4096"
              + (f", {k['eigh_exponent_4096_8192']:.2f} between 4096 and 8192" if "eigh_exponent_4096_8192" in k
                 else "") + "; the model scales n³ from the largest measured size ≤ n).", "",
              "## Extrapolated", "",
              "Whole model = layers × one layer. Calibration per token scales with the FLOP ratio (exponent 2: linear "
              "FLOPs ~ params, Grams ~ Σ d² per shared input); each matrix's decomposition is predicted from its "
              "shape along weighted_spectrum's path (matmuls at the measured fp64 rate, eigh ~ n³ from the measured "
              "n = 4096, QR at the measured rate — every term cubic in the dimensions) and scaled by measured ÷ "
              "predicted of the 7B (or Mixtral) matrix of the same role. N processes: calibration split by data "
              "(÷ N; the all-reduce of the Grams is not counted), decompositions as the engine spreads them "
              "(one job per shared input and layer, `assign_by_cost` on its cost model; the slowest rank counted). "
              "Peak memory per process of a streamed run: one layer's weights (fp32) + its Grams (fp64) + the "
              "calibration hidden states (input and output of a layer, fp32, this process's share) + the largest "
              "spectrum's workspace.", ""]
    labels = list(ex["calibration_tokens"])
    for label in labels:
        rows = []
        for m in ex["models"]:
            for n, e in m["by_processes"].items():
                rows.append([m["model"], n, e[f"calibrate_h {label}"], e["decompose_h"], e[f"total_h {label}"],
                             e[f"peak_gib {label}"]])
        lines += [f"### Calibration on {label} = {ex['calibration_tokens'][label]:,} tokens", "",
                  table(["model", "processes", "calibrate h", "decompose h", "total h", "peak GiB / process"], rows),
                  ""]
    lines += ["Peak terms, one process, papers' calibration (GiB):", "",
              table(["model", *next(iter(ex["models"]))["peak_terms_gib (papers, 1 process)"].keys()],
                    [[m["model"], *m["peak_terms_gib (papers, 1 process)"].values()] for m in ex["models"]]), ""]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- main
def run_child(part: str) -> dict[str, Any]:
    code = ("import json, sys; from benchmarks import extrapolate as x; "
            f"print('RESULT', json.dumps(x.child({part!r})))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])


def child(part: str) -> dict[str, Any]:
    setup_logging()
    if part == "kernels":
        return measure_kernels()
    if part == "llama":
        return measure_layer(LLAMA2_7B, 0, [r for r, *_ in LLAMA2_7B.matrices()])
    if part == "mixtral":  # attention + one expert: the experts are alike, so the other 7 are ×7 of it
        return measure_layer(MIXTRAL, MIXTRAL_EXPERTS_BUILT, ["q", "k", "o", "e0.gate", "e0.up", "e0.down"])
    raise ValueError(part)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["kernels", "llama", "mixtral", "report"], action="append")
    args = ap.parse_args()
    setup_logging()
    path = RESULTS / "extrapolate.json"
    payload: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    parts = args.only or ["kernels", "llama", "mixtral"]
    for part, key in (("kernels", "kernels"), ("llama", "llama7b_layer"), ("mixtral", "mixtral_layer")):
        if part in parts:
            log.info("measuring %s in a fresh process", part)
            payload[key] = run_child(part)
            log.info("%s: %s", part, payload[key])
    if all(k in payload for k in ("kernels", "llama7b_layer", "mixtral_layer")):
        payload["llama7b_layer_memory_check"] = check_formula(payload["llama7b_layer"], LLAMA2_7B)
        payload["mixtral_layer_memory_check"] = check_formula(payload["mixtral_layer"], MIXTRAL)
        payload["extrapolation"] = extrapolate(payload)
        write_results("extrapolate", payload, markdown(payload))
    else:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
