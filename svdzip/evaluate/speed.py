"""Throughput, latency and peak memory of a compressed model against the dense one, same run.

Why this shape: a parameter ratio only says what a compressed model *could* save; what a user feels
is time per token and memory. Those depend on the machine and on the two-matmul overhead of every
`LowRankLinear`, so the dense reference is always measured in the same process, alternately with
the compressed model (machine load drifts; interleaving spreads it over both), and reported as ratios.

* **prefill**: one forward over `batch × seq_len` random tokens, no KV cache kept; tokens/s and latency.
* **decode**: `model.generate`, greedy, KV cache, `min_new_tokens = max_new_tokens = N` so the run
  never stops early; the decode time is `t(N new tokens) − t(1 new token)` (the latter is prefill +
  first token), so decode tokens/s = `batch·(N−1) / that`.
* **memory**: CUDA `max_memory_allocated`; on CPU the process peak RSS (`VmHWM`, reset by writing
  "5" to `/proc/self/clear_refs`). Both are process-wide, so the transient peak (peak − level before
  the call) is added to the model's own weight bytes; the raw process figure is kept too. On a CPU
  the transient is a lower bound: memory freed earlier and kept by the allocator is reused unseen.

Timings are medians over `repeats` after `warmup` runs. On a shared CPU they are noisy: compare only
numbers from one run, and read small differences (< 10 %) as ties.
"""

from __future__ import annotations

import contextlib
import logging
import re
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from svdzip.allocate.latency import linear_timing
from svdzip.core.timing import timed
from svdzip.models.lowrank import LowRankLinear

log = logging.getLogger(__name__)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


# --------------------------------------------------------------------------- memory


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's unique parameters and buffers (a shared basis counted once; a quantized
    weight by the int8 values and scales it really holds, not its logical dtype)."""
    from svdzip.output.quantize import storage_bytes

    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += storage_bytes(t)
    return total


def _status_kib(field_name: str) -> int | None:
    try:
        m = re.search(rf"^{field_name}:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux ≥ 4.0); False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int | None:
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


class PeakMemory:
    """Measures the transient peak of a block: CUDA allocator on a GPU, process RSS on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.before: int | None = None
        self.peak: int | None = None
        self.resettable = True

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            self.resettable = reset_peak_rss()
            self.before = rss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = peak_rss_bytes() if self.resettable else None

    @property
    def transient(self) -> int | None:
        if self.peak is None or self.before is None:
            return None
        return max(0, self.peak - self.before)


# --------------------------------------------------------------------------- timing


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _vocab_size(model: nn.Module) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(cfg.vocab_size)


def random_tokens(model: nn.Module, batch: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Token ids away from the special ones at the bottom of most vocabularies; content does not
    change the cost of a dense forward."""
    g = torch.Generator().manual_seed(seed)
    vocab = _vocab_size(model)
    low = min(16, vocab - 1)
    return torch.randint(low, vocab, (batch, seq_len), generator=g)


def _prefill_fn(model: nn.Module, ids: torch.Tensor) -> Callable[[], Any]:
    def run() -> Any:
        return model(input_ids=ids, use_cache=False).logits

    return run


def _generate_fn(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> Callable[[], Any]:
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(pad, list):
        pad = pad[0]
    mask = torch.ones_like(ids)

    def run() -> Any:
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True,
                              pad_token_id=pad, temperature=None, top_p=None, top_k=None)

    return run


@dataclass
class SpeedSetting:
    """One shape: `batch` sequences of `seq_len` prompt tokens, then `new_tokens` decoded."""

    batch: int
    seq_len: int
    new_tokens: int = 32

    @property
    def key(self) -> str:
        return f"b{self.batch}_s{self.seq_len}"


@dataclass
class SpeedResult:
    label: str
    batch: int
    seq_len: int
    new_tokens: int
    prefill_latency_s: float
    prefill_tokens_per_s: float
    decode_latency_s_per_token: float  # per step (one token for each of the batch)
    decode_tokens_per_s: float
    weight_bytes: int
    peak_bytes: int | None  # weights + transient peak of decoding this setting
    process_peak_bytes: int | None  # raw process figure (includes every model loaded)
    prefill_times_s: list[float] = field(default_factory=list)
    decode_times_s: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def measure_speed(
    models: dict[str, nn.Module],
    settings: Sequence[SpeedSetting] = (SpeedSetting(1, 128), SpeedSetting(4, 128)),
    repeats: int = 3,
    warmup: int = 1,
    reference: str | None = "dense",
    seed: int = 0,
    clock: str = "wall",
) -> dict[str, Any]:
    """Time every model on every setting, alternating models within each repeat.

    Returns `{"results": {label: {setting: SpeedResult dict}}, "ratios": {label: {setting: {...}}}}`
    where ratios are `model / reference` (throughput > 1 = faster; memory < 1 = smaller).
    """
    if not models:
        raise ValueError("measure_speed needs at least one model")
    results: dict[str, dict[str, SpeedResult]] = {label: {} for label in models}
    total = len(settings) * len(models) * (warmup + repeats)
    bar = tqdm(total=total, desc="speed", unit="run", leave=False)
    for s in settings:
        if s.new_tokens < 2:
            raise ValueError("decode needs at least 2 new tokens (one is part of the prefill)")
        prefill: dict[str, list[float]] = {k: [] for k in models}
        decode: dict[str, list[float]] = {k: [] for k in models}
        peaks: dict[str, tuple[int | None, int | None]] = {}
        for i in range(warmup + repeats):
            for label, model in models.items():
                dev = _model_device(model)
                ids = random_tokens(model, s.batch, s.seq_len, seed).to(dev)
                with _eval_mode(model):
                    t_pre = timed(_prefill_fn(model, ids), dev, clock)
                    t_one = timed(_generate_fn(model, ids, 1), dev, clock)
                    if i == warmup:  # the first measured repeat also records the memory peak
                        with PeakMemory(dev) as pm:
                            t_all = timed(_generate_fn(model, ids, s.new_tokens), dev, clock)
                        peaks[label] = (pm.transient, pm.peak)
                    else:
                        t_all = timed(_generate_fn(model, ids, s.new_tokens), dev, clock)
                if i >= warmup:
                    prefill[label].append(t_pre)
                    decode[label].append(max(t_all - t_one, 1e-9))
                bar.update()
        for label, model in models.items():
            pre, dec = statistics.median(prefill[label]), statistics.median(decode[label])
            steps = s.new_tokens - 1
            wb = weight_bytes(model)
            transient, raw = peaks.get(label, (None, None))
            results[label][s.key] = SpeedResult(
                label=label, batch=s.batch, seq_len=s.seq_len, new_tokens=s.new_tokens,
                prefill_latency_s=pre, prefill_tokens_per_s=s.batch * s.seq_len / pre,
                decode_latency_s_per_token=dec / steps, decode_tokens_per_s=s.batch * steps / dec,
                weight_bytes=wb, peak_bytes=None if transient is None else wb + transient, process_peak_bytes=raw,
                prefill_times_s=prefill[label], decode_times_s=decode[label],
            )
            r = results[label][s.key]
            log.info("%s %s: prefill %.0f tok/s (%.1f ms), decode %.1f tok/s (%.1f ms/step)", label, s.key,
                     r.prefill_tokens_per_s, 1e3 * pre, r.decode_tokens_per_s, 1e3 * r.decode_latency_s_per_token)
    bar.close()
    out: dict[str, Any] = {"results": {k: {s: r.to_dict() for s, r in v.items()} for k, v in results.items()},
                           "settings": [asdict(s) for s in settings], "repeats": repeats, "warmup": warmup,
                           "threads": torch.get_num_threads(), "clock": clock}
    if reference is not None and reference in results:
        out["ratios"] = speed_ratios(results, reference)
    return out


def speed_ratios(results: dict[str, dict[str, SpeedResult]], reference: str = "dense") -> dict[str, dict[str, Any]]:
    """Per model and setting: throughput and memory relative to the reference model."""
    ref = results[reference]
    ratios: dict[str, dict[str, Any]] = {}
    for label, by in results.items():
        ratios[label] = {}
        for key, r in by.items():
            d = ref[key]
            ratios[label][key] = {
                "prefill_speedup": r.prefill_tokens_per_s / d.prefill_tokens_per_s,
                "decode_speedup": r.decode_tokens_per_s / d.decode_tokens_per_s,
                "weight_bytes_ratio": r.weight_bytes / d.weight_bytes,
                "peak_bytes_ratio": (r.peak_bytes / d.peak_bytes) if r.peak_bytes and d.peak_bytes else None,
            }
    return ratios


def summary_row(speed: dict[str, Any], label: str) -> dict[str, float]:
    """Geometric-mean speedups over the settings: one number per metric for tables and plots."""
    ratios = speed.get("ratios", {}).get(label, {})
    out: dict[str, float] = {}
    for metric in ("prefill_speedup", "decode_speedup", "weight_bytes_ratio"):
        vals = [r[metric] for r in ratios.values() if r.get(metric)]
        if vals:
            out[metric] = float(torch.tensor(vals, dtype=torch.float64).log().mean().exp())
    res = speed["results"].get(label, {})
    if res:
        out["decode_tokens_per_s"] = statistics.median(r["decode_tokens_per_s"] for r in res.values())
        out["prefill_tokens_per_s"] = statistics.median(r["prefill_tokens_per_s"] for r in res.values())
    return out


def speed_table(speed: dict[str, Any]) -> str:
    """Markdown: one row per model × setting, with ratios to the reference."""
    from svdzip.report.tables import human_bytes, table

    rows = []
    for label, by in speed["results"].items():
        for key, r in by.items():
            ratio = speed.get("ratios", {}).get(label, {}).get(key, {})
            rows.append([label, r["batch"], r["seq_len"], round(r["prefill_tokens_per_s"]),
                         round(1e3 * r["prefill_latency_s"], 1), ratio.get("prefill_speedup"),
                         round(r["decode_tokens_per_s"], 1), round(1e3 * r["decode_latency_s_per_token"], 2),
                         ratio.get("decode_speedup"), human_bytes(r["weight_bytes"]),
                         human_bytes(r["peak_bytes"]) if r["peak_bytes"] else "n/a"])
    return table(["model", "batch", "seq", "prefill tok/s", "prefill ms", "prefill ×dense", "decode tok/s",
                  "ms/step", "decode ×dense", "weights", "peak mem"], rows)


def parse_settings(batches: str | Sequence[int], seq_lens: str | Sequence[int], new_tokens: int) -> list[SpeedSetting]:
    """`"1,4"` × `"128"` → settings (comma-separated strings accepted for the CLI)."""
    def ints(v: str | Sequence[int]) -> list[int]:
        return [int(x) for x in v.split(",") if x] if isinstance(v, str) else [int(x) for x in v]

    return [SpeedSetting(b, s, new_tokens) for b in ints(batches) for s in ints(seq_lens)]


# --------------------------------------------------------------------------- per module


def slow_low_rank_modules(model: nn.Module, tokens: int = 1, min_speedup: float = 1.0, repeats: int = 5,
                          clock: str = "cpu") -> list[dict[str, Any]]:
    """Every `LowRankLinear` of `model` whose two matmuls are slower than its dense equivalent would
    be at `tokens` input rows (1 = decode). Measured per distinct (in, out, rank), so cheap."""
    dev = _model_device(model)
    dtype = next(model.parameters()).dtype
    cache: dict[tuple[int, int, int], float] = {}
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, LowRankLinear):
            continue
        key = (m.in_features, m.out_features, m.rank)
        if key not in cache:
            cache[key] = linear_timing(*key[:2], [key[2]], tokens, dev, dtype, repeats, clock)["ranks"][0]["speedup"]
        if cache[key] < min_speedup:
            out.append({"name": name, "in": key[0], "out": key[1], "rank": key[2], "speedup": cache[key]})
    return out


@torch.no_grad()
def densify(model: nn.Module, names: Sequence[str]) -> int:
    """Replace the named `LowRankLinear`s by dense `nn.Linear(A·B)`: same function, more parameters,
    fewer dispatches. Returns the number of parameters added. The result no longer matches the
    saved manifest; use it for serving, not for `svdzip.save`."""
    added = 0
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        m = parent.get_submodule(child)
        if not isinstance(m, LowRankLinear):
            raise ValueError(f"{name} is not a LowRankLinear")
        w = m.left.weight @ m.right.weight
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=w.device, dtype=w.dtype)
        lin.weight.copy_(w)
        if m.bias is not None:
            lin.bias.copy_(m.bias)
        added += w.numel() - m.rank * (m.in_features + m.out_features)
        setattr(parent, child, lin)
    return added
