"""The peak memory of an in-memory run, estimated before the model is loaded, so that a run that cannot fit
is refused up front (with the streamed alternative) instead of being killed by the kernel halfway.

The terms are the ones measured on Qwen2.5-0.5B (README, "Real models"): the float32
model; the float64 Gram matrices while they are held in memory (small models only, `driver.GRAMS_IN_MEMORY_BYTES`);
a backward pass through the whole model (the loss-aware Fisher signal, healing): every layer's activations for
the tokens of one micro-batch plus the logits over the vocabulary and their gradient (and, under a bf16 autocast,
the 16-bit copies of the weights it saves); and, while a heal caches
its teacher's top-k, a second copy of the model. Each stage's peak is the sum of what lives during it; the run's
peak is the largest stage. What a heal trains depends on the allocation (a factorisation heal trains the factors,
not the matrices kept dense; the hybrid trains its slimmed linears too), so before the run it is bounded, and once
the model is compressed it is counted and the heal checked again (`driver.fit_heal`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: float32 values kept per token and decoder layer for a backward pass, as multiples of (hidden, intermediate)
#: (attention inputs/outputs, norms, residuals; the MLP's gate, up, their product and activation), fitted to the
#: stages measured on Qwen2.5-0.5B
ACT_PER_HIDDEN, ACT_PER_INTERMEDIATE = 6, 3
#: copies of the [tokens × vocabulary] float32 logits alive at a backward's peak (logits, log-softmax, gradient)
LOGIT_COPIES = 3
#: float32 values per trained parameter besides the parameter: its gradient, AdamW's two moments and the best
#: held-out copy (measured: 3.6 bytes more per trained byte, SmolLM2-135M healed trained 69.2 M against 23.2 M)
TRAINER_COPIES = 4
OVERHEAD_BYTES = 600 * 2**20  # the interpreter, torch, tokenizer and allocator slack
#: what a heal's peak holds beyond the sum of its parts where the process's own memory is measured (the allocator's
#: slack, the teacher's top-k cache): healing a saved SmolLM2-135M hybrid peaked 0.3 GiB above that sum (README)
HEAL_SLACK_BYTES = 300 * 2**20


@dataclass
class Footprint:
    """Bytes per stage of a run; `peak` is the largest."""

    stages: dict[str, dict[str, int]] = field(default_factory=dict)
    overhead: int = OVERHEAD_BYTES  # less where a stage counts what the process holds already (measured)

    def add(self, stage: str, **parts: int) -> None:
        self.stages[stage] = {k: int(v) for k, v in parts.items()}

    @property
    def peak(self) -> int:
        return max((sum(p.values()) for p in self.stages.values()), default=0) + self.overhead

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=lambda s: sum(self.stages[s].values())) if self.stages else "load"

    def describe(self) -> str:
        parts = self.stages.get(self.peak_stage, {})
        return f"{self.peak_stage}: " + " + ".join(f"{k} {v / 2**30:.1f} GiB" for k, v in parts.items())


def _shape(config: dict[str, Any]) -> tuple[int, int, int, int]:
    text = config.get("text_config", config)
    hidden = text.get("hidden_size") or text.get("n_embd") or 0
    inter = text.get("intermediate_size") or text.get("ffn_dim") or text.get("n_inner") or 4 * hidden
    layers = text.get("num_hidden_layers") or text.get("n_layer") or 0
    return int(hidden), int(inter), int(layers), int(text.get("vocab_size") or 0)


def backward_bytes(config: dict[str, Any], tokens: int, seq_len: int | None = None) -> int:
    """Activations and logits of one forward + backward through the whole model over `tokens` tokens (in windows
    of `seq_len`: eager attention keeps heads × seq_len² probabilities per window and layer, twice)."""
    hidden, inter, layers, vocab = _shape(config)
    per_token = 4 * layers * (ACT_PER_HIDDEN * hidden + ACT_PER_INTERMEDIATE * inter)
    heads = int(config.get("text_config", config).get("num_attention_heads") or 0)
    attention = 2 * 4 * layers * heads * (seq_len or 0) * tokens
    return tokens * (per_token + 4 * LOGIT_COPIES * vocab) + attention


def decoder_linear_bytes(config: dict[str, Any], model_bytes: int) -> int:
    """float32 bytes of the model without its embeddings and head: what a heal trains (at most)."""
    text = config.get("text_config", config)
    hidden, _, _, vocab = _shape(config)
    tables = 1 if text.get("tie_word_embeddings", config.get("tie_word_embeddings", True)) else 2
    return max(model_bytes - 4 * tables * vocab * hidden, 0)


def estimate(model_bytes: int, config: dict[str, Any], *, gram_bytes: int, grams_in_memory: bool,
             fisher_tokens: int = 0, guard_tokens: int = 0, ara_window: tuple[int, int] | None = None,
             ara_trial: bool = False, heal: Any = None, calib_tokens: int = 0,
             grams_freed_after_calibration: bool = False, kept: float = 1.0, trained: float = 1.0) -> Footprint:
    """The stages of an in-memory run: calibration, the allocator's backward (if any), its guard (if any: a trial
    copy of the model scored on one held-out window of `guard_tokens` at a time), ARA's mask training (if any:
    over-complete factors of every decoder linear beside it, a backward over `ara_window` = (tokens, window length)
    per step, and for the hybrid a trial copy with its held modules built), the heal (if any).

    `grams_freed_after_calibration`: the driver drops the statistics once the spectra exist (the Python API's
    caller may keep them); `kept`: the fraction of the decoder linears' parameters left; `trained`: the share of
    those the heal trains, unknown before the allocation (1: the bound, every kept weight; 0: what any allocation
    needs)."""
    fp = Footprint()
    hidden, inter, _, vocab = _shape(config)
    layer_activations = 2 * 4 * calib_tokens * max(hidden, inter)  # one layer's input and output, all windows
    fp.add("calibration", model=model_bytes, grams=gram_bytes if grams_in_memory else 0,
           activations=layer_activations)
    if fisher_tokens:
        held = grams_in_memory and not grams_freed_after_calibration
        fp.add("allocation (Fisher backward)", model=model_bytes, grams=gram_bytes if held else 0,
               backward=backward_bytes(config, fisher_tokens, fisher_tokens))
    if guard_tokens:
        fp.add("allocation (guard)", model=model_bytes, trial=model_bytes,
               logits=4 * LOGIT_COPIES * guard_tokens * vocab)
    if ara_window:
        from svdzip.allocate.ara_mask import RHO0

        fp.add("allocation (ARA masks)", model=model_bytes, trial=model_bytes if ara_trial else 0,
               factors=int(RHO0 * decoder_linear_bytes(config, model_bytes)),
               backward=backward_bytes(config, *ara_window))
    if heal is not None:
        linears = int(kept * decoder_linear_bytes(config, model_bytes))
        add_heal(fp, config, heal, student=model_bytes, teacher=model_bytes, linears=linears,
                 trained=int(trained * linears))
    return fp


def add_heal(fp: Footprint, config: dict[str, Any], heal: Any, *, student: int, teacher: int, linears: int,
             trained: int) -> None:
    """The heal's stages: training (the `student`'s bytes, TRAINER_COPIES of every `trained` byte, the 16-bit
    copies of the decoder `linears` and the head under a 16-bit autocast, one micro-batch's backward) and, for the kl
    objective, computing the `teacher`'s top-k beside the student. Before compression `student` is the float32
    model and `trained` a bound (every kept linear); once the model is compressed `student` is what the process
    holds and `trained` what the heal will train (`driver.heal_footprint`)."""
    hidden, _, _, vocab = _shape(config)
    micro = heal.batch_size * heal.seq_len
    # with the top-k cache the teacher is freed before training; the full distribution keeps it running
    running = teacher if heal.objective == "kl" and not heal.topk else 0
    # a 16-bit autocast saves a 16-bit copy of every trained weight for the backward, and the frozen ones are
    # held in 16 bits beside their float32 originals (`core.precision.frozen_linears_in`)
    width = heal.compute_dtype().itemsize
    casts = (linears + 4 * vocab * hidden) * width // 4 if width < 4 else 0
    fp.add("heal (training)", student=student, teacher=running, optimizer=TRAINER_COPIES * trained, casts=casts,
           backward=backward_bytes(config, micro, heal.seq_len))
    if heal.objective == "kl":
        fp.add("heal (teacher top-k)", student=student, teacher=teacher, logits=2 * 4 * micro * vocab)


def read_config(source: str | Path) -> dict[str, Any] | None:
    path = Path(source) / "config.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def human(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _options_of(config: Any, allocator: str) -> dict[str, Any]:
    """The recipe's parsed options of `allocator`, or {} where the recipe allocates otherwise."""
    if config.allocator != allocator:
        return {}
    from svdzip.allocate import parse_allocator_options

    return parse_allocator_options(config.allocator, config.allocator_options)


def fisher_tokens(config: Any) -> int:
    """Tokens per backward of the allocator's Fisher signal (loss-aware's, one window at a time), 0 if none."""
    return config.calib_seq_len if _options_of(config, "loss-aware").get("signal") == "fisher" else 0


def guard_tokens(config: Any) -> int:
    """Tokens of the window loss-aware's guard scores at a time (one held-out window), 0 without a guard."""
    return config.calib_seq_len if _options_of(config, "loss-aware").get("guard") else 0


def ara_window(config: Any) -> tuple[int, int] | None:
    """(tokens, window length) of one step of ARA's mask training, None where the recipe does not allocate by ARA."""
    o = _options_of(config, "ara")
    return (o["batch"] * o["seq_len"], o["seq_len"]) if o else None


def gram_bytes_of(config: dict[str, Any]) -> int:
    """float64 Gram matrices of a decoder's distinct linear inputs: q/k/v, o, gate/up (hidden) and down
    (intermediate) per layer (the adapter's exact count needs the model; this is for before loading it)."""
    hidden, inter, layers, _ = _shape(config)
    return 8 * layers * (3 * hidden * hidden + inter * inter)


__all__ = ["Footprint", "add_heal", "ara_window", "backward_bytes", "decoder_linear_bytes", "estimate", "fisher_tokens",
           "gram_bytes_of", "guard_tokens", "human", "read_config"]
