"""How well the layer-local gain stands in for the whole-model Fisher signal (issue 21).

    python benchmarks/local_signal.py --model smollm2-135m --samples 16 --seq-len 256

Loss-aware allocation weighs every linear's whitened truncation loss by the mean squared gradient of the
language-model loss at its output (`signal=fisher`, a backward pass through the whole model). The local
signal (`svdzip/passes/local_gain.py`) measures, one layer at a time, how much of a linear's output error
reaches its layer's output relative to each token's residual stream. The two differ by how much the rest of
the model amplifies a layer's error; this benchmark measures on a real model how well one ranks like the
other: Pearson correlation of their logarithms and Spearman's rank correlation over all linears, per role
across layers, and the same for a variant that divides by the layer output's mean square over all tokens
instead of per token (the design the per-token scaling replaced).
"""

from __future__ import annotations

import argparse
import logging
import math

import torch
from common import setup_logging, write_results

log = logging.getLogger("benchmarks.local_signal")


def ranks_of(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    for rank, i in enumerate(order):
        out[i] = float(rank)
    return out


def pearson(x: list[float], y: list[float]) -> float:
    return float(torch.corrcoef(torch.tensor([x, y], dtype=torch.float64))[0, 1])


def spearman(x: list[float], y: list[float]) -> float:
    return pearson(ranks_of(x), ranks_of(y))


def global_mean_square_gains(model, tokens: torch.Tensor, batch_size: int) -> dict[str, float]:
    """The rejected variant: E‖Jᵀz‖² / E‖h‖² over all tokens (one cotangent scale for the whole layer)."""
    from svdzip.core.layerwise import capture_layer_inputs, first_output, run_layer, to_device
    from svdzip.models.adapter import ModelAdapter
    from svdzip.passes.local_gain import cotangent

    adapter = ModelAdapter(model)
    inputs = capture_layer_inputs(model, adapter, tokens, batch_size, "cpu")
    hidden, gains = inputs.hidden, {}
    for index, layer in enumerate(adapter.layers):
        modules = {i.name: adapter.module(i.name) for i in adapter.layer_linears(index)}
        sums = {n: [0.0, 0] for n in modules}
        energy = [0.0, 0]
        for b, h in enumerate(hidden):
            captured = []
            handles = [m.register_forward_hook(lambda _m, _a, o, n=n, into=captured: into.append((n, o)))
                       for n, m in modules.items()]
            with torch.enable_grad():
                out = first_output(layer(h.detach().requires_grad_(True), **to_device(inputs.kwargs[index][b],
                                                                                       "cpu")))
                z = cotangent(out.shape, b * batch_size, index)
                grads = torch.autograd.grad((out * z).sum(), [o for _, o in captured])
            for h_ in handles:
                h_.remove()
            for (name, _), g in zip(captured, grads, strict=True):
                sums[name][0] += float(g.double().pow(2).sum())
                sums[name][1] += g.numel()
            energy[0] += float(out.detach().double().pow(2).sum())
            energy[1] += out.numel()
        for name, (total, count) in sums.items():
            gains[name] = (total / count) / (energy[0] / energy[1])
        hidden = run_layer(layer, hidden, inputs.kwargs[index], "cpu")
    return gains


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--fisher-samples", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="local_signal")
    args = p.parse_args()
    setup_logging()
    torch.set_num_threads(args.threads)
    from svdzip.allocate.loss_aware import output_fisher
    from svdzip.data import calibration_tokens, load_corpus
    from svdzip.output.loading import load_model
    from svdzip.passes.calibrate import collect_statistics
    from svdzip.passes.local_gain import PROBE_WINDOWS, gain

    model, tokenizer, _ = load_model(args.model, "cpu")
    tokens = calibration_tokens(tokenizer, load_corpus("wiki"), args.samples, args.seq_len, 0)
    stats = collect_statistics(model, tokens, 8, "cpu", kinds={"local"})
    names = list(stats.local)
    local = {n: gain(stats.local[n]) for n in names}
    fisher = output_fisher(model, names, tokens[: args.fisher_samples], 2)
    flat = global_mean_square_gains(model, tokens[:PROBE_WINDOWS], 8)
    rows = []
    for label, roles in [("all linears", None), *[(r, r) for r in sorted({n.rsplit(".", 1)[1] for n in names})]]:
        chosen = [n for n in names if roles is None or n.endswith("." + roles)]
        lf = [math.log(fisher[n]) for n in chosen]
        rows.append({"linears": label, "n": len(chosen),
                     "pearson_log": round(pearson([math.log(local[n]) for n in chosen], lf), 3),
                     "spearman": round(spearman([local[n] for n in chosen], [fisher[n] for n in chosen]), 3),
                     "global_ms_pearson_log": round(pearson([math.log(flat[n]) for n in chosen], lf), 3),
                     "global_ms_spearman": round(spearman([flat[n] for n in chosen], [fisher[n] for n in chosen]),
                                                 3)})
        log.info("%s", rows[-1])
    md = [f"### Layer-local gain against the whole-model Fisher signal on {args.model}", "",
          f"Fisher: mean squared LM-loss gradient at each linear's output over {args.fisher_samples} windows of "
          f"{args.seq_len} `wiki` calibration tokens; local gain: `signal=local` as calibration computes it (first "
          f"{PROBE_WINDOWS} windows); 'global mean square': the same Jacobian probe divided by the layer output's "
          "mean square over all tokens instead of per token.", "",
          "| linears | n | Pearson (log) local | Spearman local | Pearson (log) global mean square | "
          "Spearman global mean square |", "|---|---|---|---|---|---|"]
    md += [f"| {r['linears']} | {r['n']} | {r['pearson_log']} | {r['spearman']} | {r['global_ms_pearson_log']} | "
           f"{r['global_ms_spearman']} |" for r in rows]
    write_results(args.name, {"model": args.model, "rows": rows}, "\n".join(md))


if __name__ == "__main__":
    main()
