"""Perplexity under both protocols of the papers (methods-spec §1.5).

* `svdllm` (SVD-LLM, ARA): non-overlapping windows, the remainder dropped; ppl = exp(mean token NLL).
* `hf_stride` (Basis Sharing, D-Rank): the Hugging Face strided recipe with stride = window, the
  final partial window kept; ppl = exp(mean over windows of each window's mean NLL).

Models whose tokenizer starts every text with BOS (Gemma) get a BOS at the start of every window,
which then carries one text token fewer.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from svdzip.errors import SvdzipError

log = logging.getLogger(__name__)

PROTOCOLS = ("svdllm", "hf_stride")


@dataclass
class PerplexityResult:
    ppl: float
    protocol: str
    seq_len: int
    windows: int
    tokens_evaluated: int  # predicted tokens that entered the average

    def to_dict(self) -> dict:
        return asdict(self)


def model_max_length(model: nn.Module) -> int | None:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(cfg, "max_position_embeddings", None)


def bos_for(tokenizer) -> int | None:
    """The BOS id when the tokenizer itself prepends one to every text (as Gemma's does), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a").input_ids
    return bos if ids and ids[0] == bos else None


def _windows(tokens: torch.Tensor, span: int, keep_last: bool) -> list[torch.Tensor]:
    flat = tokens.reshape(-1)
    n_full = flat.numel() // span
    out = [flat[i * span : (i + 1) * span] for i in range(n_full)]
    rest = flat[n_full * span :]
    if keep_last and rest.numel() >= 2:
        out.append(rest)
    return out


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    seq_len: int = 2048,
    protocol: str = "svdllm",
    bos_id: int | None = None,
    device: torch.device | str | None = None,
    desc: str = "perplexity",
) -> PerplexityResult:
    if protocol not in PROTOCOLS:
        raise SvdzipError(f"unknown perplexity protocol '{protocol}'; choose from {', '.join(PROTOCOLS)}")
    limit = model_max_length(model)
    if limit is not None and seq_len > limit:
        log.info("sequence length %d capped to the model's limit %d", seq_len, limit)
        seq_len = limit
    device = device or next(model.parameters()).device
    span = seq_len - 1 if bos_id is not None else seq_len
    windows = _windows(tokens, span, keep_last=protocol == "hf_stride")
    if not windows:
        raise SvdzipError(f"evaluation text has {tokens.numel()} tokens, fewer than one {seq_len}-token window")
    total_nll, total_tokens, window_means = 0.0, 0, []
    for w in tqdm(windows, desc=desc, unit="window", leave=False):
        ids = w if bos_id is None else torch.cat([w.new_tensor([bos_id]), w])
        ids = ids.unsqueeze(0).to(device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        targets = ids[0, 1:]  # with a BOS, every text token of the window is predicted
        nll = F.cross_entropy(logits, targets, reduction="sum")
        count = targets.numel()
        total_nll += float(nll)
        total_tokens += count
        window_means.append(float(nll) / count)
    mean = total_nll / total_tokens if protocol == "svdllm" else sum(window_means) / len(window_means)
    ppl = math.exp(mean) if mean < 700 else float("inf")
    return PerplexityResult(ppl=ppl, protocol=protocol, seq_len=seq_len, windows=len(windows),
                            tokens_evaluated=total_tokens)


def perplexity_on_corpora(
    model: nn.Module,
    tokenizer,
    corpora: list[str],
    protocols: list[str] | tuple[str, ...] = ("svdllm",),
    seq_len: int = 2048,
    max_tokens: int | None = 32768,
    device: torch.device | str | None = None,
    label: str = "",
) -> dict[str, dict[str, PerplexityResult]]:
    """{corpus: {protocol: result}} on the evaluation part of each corpus (never its calibration part)."""
    from svdzip.data import eval_tokens, load_corpus

    results: dict[str, dict[str, PerplexityResult]] = {}
    bos = bos_for(tokenizer)
    for name in corpora:
        tokens = eval_tokens(tokenizer, load_corpus(name), max_tokens)
        results[name] = {}
        for protocol in protocols:
            r = perplexity(model, tokens, seq_len, protocol, bos, device, desc=f"ppl {label} {name}".strip())
            log.info("%s perplexity on %s (%s, %d tokens in %d windows of %d): %.3f", label or "model", name,
                     protocol, r.tokens_evaluated, r.windows, r.seq_len, r.ppl)
            if not math.isfinite(r.ppl):
                log.warning("%s: perplexity on %s is %s: its logits overflowed — the weights may be damaged (a "
                            "directory svdzip saved checks its own), or the dtype too narrow", label or "the model",
                            name, r.ppl)
            results[name][protocol] = r
    return results
