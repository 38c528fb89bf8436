"""What `benchmarks/faults.py` found under faults, each as a test: an output that would delete its own input, a
bit flipped in a saved factor, a disk that fills while saving or checkpointing — a clear error, nothing lost."""

from __future__ import annotations

import errno
import shutil

import pytest
import torch
from tiny_models import save_tiny, tiny_model, tiny_tokenizer, tiny_tokens, write_tiny_corpus
from transformers import AutoModelForCausalLM

import svdzip
from svdzip import Recipe, SvdzipError, compress
from svdzip.cli import main
from svdzip.output.checksums import CHECKSUM_FILE
from svdzip.recover.trainer import Checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_corpus(root / "corpus.txt")
    return save_tiny(root / "model")


@pytest.fixture
def compressed(tmp_path):
    out = tmp_path / "c"
    compress(tiny_model("llama"), Recipe.plain(ratio=0.3), calib_tokens=tiny_tokens(), out=out,
             tokenizer=tiny_tokenizer())
    return out


def _snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def test_out_equal_to_the_source_is_refused_before_any_work(tiny_dir, tmp_path, capsys):
    src = shutil.copytree(tiny_dir, tmp_path / "src")
    before = _snapshot(src)
    for out in (src, src / "inside"):
        assert main(["compress", "--model", str(src), "--out", str(out), "--overwrite", "--heal", "none",
                     "--allocator", "uniform"]) == 2
        assert "source model" in capsys.readouterr().err
    assert _snapshot(src) == before


def test_heal_out_equal_to_its_input_is_refused(compressed, capsys):
    before = _snapshot(compressed)
    assert main(["heal", str(compressed), "--out", str(compressed), "--overwrite", "--teacher",
                 str(compressed)]) == 2
    assert "being healed" in capsys.readouterr().err
    assert _snapshot(compressed) == before


def test_a_flipped_bit_in_a_saved_factor_is_refused_at_reload(compressed, monkeypatch):
    assert (compressed / CHECKSUM_FILE).is_file()
    weights = compressed / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40  # inside the last tensor's data: the layout stays valid, only the value changes
    weights.write_bytes(bytes(data))
    with pytest.raises(SvdzipError, match="corrupted"):
        svdzip.load(compressed, with_tokenizer=False)
    with pytest.raises(SvdzipError, match="corrupted"):
        AutoModelForCausalLM.from_pretrained(compressed)
    monkeypatch.setenv("SVDZIP_VERIFY", "0")  # the documented way round, for a trusted disk
    svdzip.load(compressed, with_tokenizer=False)


def test_disk_full_while_saving_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_model("llama")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(model), "save_pretrained", full)
    with pytest.raises(SvdzipError, match="cannot write .*No space left on device; nothing was written"):
        compress(model, Recipe.plain(ratio=0.3), calib_tokens=tiny_tokens(), out=tmp_path / "o",
                 tokenizer=tiny_tokenizer())
    assert list(tmp_path.iterdir()) == []  # no output, no temporary sibling


def test_disk_full_while_checkpointing_a_heal_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt = Checkpoint(tmp_path / "ck", {"run": 1})
    ckpt.save({"step": 2}, {"w": torch.ones(3)})
    import svdzip.recover.trainer as trainer

    def full(tensors, path, *args, **kwargs):
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer, "save_file", full)
    with pytest.raises(SvdzipError, match="heal checkpoint .*No space left on device.*previous checkpoint"):
        ckpt.save({"step": 4}, {"w": torch.zeros(3)})
    assert not list((tmp_path / "ck").glob(".*.tmp"))
    state, tensors = ckpt.load()
    assert state["step"] == 2 and torch.equal(tensors["w"], torch.ones(3))


def test_a_non_finite_perplexity_is_a_warning_not_just_a_number(tmp_path, caplog):
    """A model whose logits overflow (here: one weight set to inf) is flagged where its perplexity is printed."""
    from svdzip.evaluate.perplexity import perplexity_on_corpora

    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("inf")
    corpus = write_tiny_corpus(tmp_path / "c.txt")
    with caplog.at_level("WARNING"):
        results = perplexity_on_corpora(model, tiny_tokenizer(), [str(corpus)], seq_len=32, max_tokens=256)
    ppl = results[str(corpus)]["svdllm"].ppl
    assert not torch.isfinite(torch.tensor(ppl))
    assert "overflowed" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        perplexity_on_corpora(tiny_model("llama"), tiny_tokenizer(), [str(corpus)], seq_len=32, max_tokens=256)
    assert "overflowed" not in caplog.text
