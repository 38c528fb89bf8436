"""Does GPTQ's rounding keep its advantage off the windows it was fitted on, and is 2 bits different?

    python benchmarks/rounding_heldout.py --model smollm2-135m --threads 2

Every decoder linear is packed on HQQ's grid at 2, 3 and 4 bits, rounded to the nearest point and by GPTQ's
error feedback on the Gram of the calibration windows (A: the first 64 × 512 wiki windows, what `compress`
calibrates on). Each packing's output error tr(ΔW G ΔWᵀ) is then measured under three Grams: A itself (the
price the byte planner sees), B (the next 64 wiki windows: held-out text of the same domain) and the first 32
windows of austen (another domain). The table gives GPTQ's error relative to nearest's: the sum over matrices
and the median and largest per-matrix ratio. If 2-bit GPTQ's advantage shrank off A more than 3- and 4-bit's,
the planner's 2-bit prices would be optimistic because the pass overfits; if not, the error is elsewhere.
"""

from __future__ import annotations

import argparse
import logging
import statistics
from typing import Any

import torch
from common import setup_logging, write_results
from tqdm.auto import tqdm

from svdzip.data import calibration_tokens, load_corpus
from svdzip.models.adapter import ModelAdapter
from svdzip.output.loading import load_model
from svdzip.output.lowbit import quantize, supported
from svdzip.passes.calibrate import collect_statistics
from svdzip.passes.quant_error import quantize_rounded

log = logging.getLogger("benchmarks.rounding_heldout")
BITS = (2, 3, 4)
GRAMS = ("calibration", "held-out wiki", "austen")


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> float:
    delta = delta.double()
    return float((delta @ gram.double() * delta).sum())


def measure(model_name: str, samples: int, seq_len: int) -> dict[str, Any]:
    model, tokenizer, _ = load_model(model_name, "cpu")
    model.float().eval()
    wiki = calibration_tokens(tokenizer, load_corpus("wiki"), 2 * samples, seq_len, 0)  # rows past A: held out
    austen = calibration_tokens(tokenizer, load_corpus("austen"), samples // 2, seq_len, 0)
    grams = {name: collect_statistics(model, tokens, 8, kinds=("grams",)).grams
             for name, tokens in zip(GRAMS, (wiki[:samples], wiki[samples:], austen), strict=True)}
    ratios: dict[int, dict[str, list[tuple[float, float]]]] = {b: {g: [] for g in GRAMS} for b in BITS}
    linears = ModelAdapter(model).linears()
    for info in tqdm(linears, desc="rounding every matrix both ways", unit="matrix"):
        weight = model.get_submodule(info.name).weight.detach().float()
        for b in BITS:
            if not supported(*weight.shape, b):
                continue
            nearest = weight - quantize(weight, b).dequantize(torch.float32)
            fitted = grams["calibration"][info.input_key].float()
            gptq = weight - quantize_rounded(weight, b, fitted, "gptq").dequantize(torch.float32)
            for g in GRAMS:
                gram = grams[g][info.input_key]
                ratios[b][g].append((output_error(gptq, gram), output_error(nearest, gram)))
    rows = []
    for b in BITS:
        for g in GRAMS:
            pairs = ratios[b][g]
            each = [x / y for x, y in pairs]
            rows.append({"bits": b, "gram": g, "matrices": len(pairs),
                         "sum_ratio": sum(x for x, _ in pairs) / sum(y for _, y in pairs),
                         "median_ratio": statistics.median(each), "max_ratio": max(each),
                         "worse_than_nearest": sum(r > 1 for r in each)})
    return {"model": model_name, "calib_samples": samples, "seq_len": seq_len, "rows": rows}


def markdown(data: dict[str, Any]) -> str:
    lines = [f"#### {data['model']}: GPTQ's output error relative to nearest rounding, on and off the calibration "
             "windows", "", f"Calibration (the windows GPTQ is fitted on): the first {data['calib_samples']} × "
             f"{data['seq_len']} wiki windows; held-out wiki: the next {data['calib_samples']}; austen: "
             f"{data['calib_samples'] // 2} windows of another domain.", "",
             "| bits | Gram measured on | Σ GPTQ / Σ nearest | median per matrix | largest | matrices worse |",
             "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['bits']} | {r['gram']} | {r['sum_ratio']:.3f} | {r['median_ratio']:.3f} | "
                     f"{r['max_ratio']:.3f} | {r['worse_than_nearest']} of {r['matrices']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default=None)
    args = p.parse_args()
    setup_logging()
    torch.set_num_threads(args.threads)
    data = measure(args.model, args.calib_samples, args.seq_len)
    name = args.name or f"rounding_heldout_{args.model.split('-')[0].replace('.', '')}"
    write_results(name, data, markdown(data))


if __name__ == "__main__":
    main()
