"""The recipe (one typed value, one set of defaults, a file that reruns a run) and the one runner behind every
entry point: the Python API, the CLI and the sweep reach the driver, which checks every part's needs first."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import pytest
import torch
import yaml
from tiny_models import save_tiny, tiny_model, tiny_tokenizer, tiny_tokens, write_tiny_corpus

import svdzip
from svdzip import Recipe, SvdzipError, compress
from svdzip.cli import build_parser, main, recipe_from_args
from svdzip.recipe import AUTO, RECIPE_FILE, RECOMMENDED, SCALED
from svdzip.recover.config import HealConfig


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["compress", "--out", "unused", *argv])


# ------------------------------------------------------------------ one set of defaults


def test_the_cli_without_flags_asks_for_the_recipe_defaults():
    """The CLI's defaults are Recipe's: no flag means the same recipe as `Recipe()` in Python."""
    assert recipe_from_args(_args()) == Recipe()
    assert Recipe().allocator == AUTO and Recipe().heal == AUTO


def test_auto_resolves_to_the_recommended_recipe_in_memory_and_to_the_scaled_one_streamed():
    assert (Recipe().resolved(scaled=False).allocator, Recipe().resolved(scaled=False).heal) == \
        (RECOMMENDED["allocator"], RECOMMENDED["heal"])
    assert (Recipe().resolved(scaled=True).allocator, Recipe().resolved(scaled=True).heal) == \
        (SCALED["allocator"], SCALED["heal"])
    assert Recipe().resolved(scaled=True).allocator_options == {"signal": "local"}  # streamable: no whole-model pass
    named = Recipe(allocator="drank", heal="none").resolved(scaled=False)
    assert (named.allocator, named.heal) == ("drank", "none")  # what a user names is kept


def test_flags_override_only_what_they_name(tmp_path):
    path = Recipe(ratio=0.35, method="asvd", allocator="drank", heal="none", calib_samples=16).save(tmp_path / "r.yaml")
    recipe = recipe_from_args(_args("--recipe", str(path), "--calib-samples", "4", "--heal-steps", "7"))
    assert (recipe.ratio, recipe.method, recipe.allocator, recipe.calib_samples) == (0.35, "asvd", "drank", 4)
    assert recipe.healing.steps == 7 and recipe.healing.batch_size == HealConfig().batch_size


def test_a_memory_budget_flag_replaces_a_files_ratio_and_a_ratio_flag_replaces_its_budget(tmp_path):
    path = Recipe(budget_fraction=0.5).save(tmp_path / "r.yaml")
    assert recipe_from_args(_args("--recipe", str(path), "--ratio", "0.3")).budget_fraction is None
    assert recipe_from_args(_args("--recipe", str(path), "--kept", "0.7")).ratio == pytest.approx(0.3)
    with pytest.raises(SvdzipError, match="not both"):
        recipe_from_args(_args("--ratio", "0.3", "--budget-fraction", "0.5"))


# ------------------------------------------------------------------ the file


def test_recipe_file_round_trips_every_field(tmp_path):
    recipe = Recipe(ratio=0.3, method="asvd", allocator="loss-aware", allocator_options={"signal": "relative"},
                    group_size=1, update="svdllm", heal="seq-lora", healing=HealConfig(steps=9, lora_r=4),
                    storage_dtype="bfloat16", corpus="austen", calib_samples=12, seed=3, device="cpu")
    again = Recipe.load(recipe.save(tmp_path / "r.yaml"))
    assert again == replace(recipe, device="cpu")
    text = (tmp_path / "r.yaml").read_text()
    assert "device" not in yaml.safe_load(text)  # where it ran is not what it makes


def test_recipe_file_mistakes_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ratio: 0.2\nallocater: drank\n")
    with pytest.raises(SvdzipError, match="unknown setting.*allocater"):
        Recipe.load(bad)
    bad.write_text("ratio: twenty\n")
    with pytest.raises(SvdzipError, match="ratio"):
        Recipe.load(bad)
    bad.write_text("healing: {steps: 3, lerning_rate: 1}\n")
    with pytest.raises(SvdzipError, match="lerning_rate"):
        Recipe.load(bad)
    bad.write_text("svdzip_recipe: 7\n")
    with pytest.raises(SvdzipError, match="format 7"):
        Recipe.load(bad)
    bad.write_text("ratio: [0.2\n")
    with pytest.raises(SvdzipError, match="not valid YAML"):
        Recipe.load(bad)
    with pytest.raises(SvdzipError, match="does not exist"):
        Recipe.load(tmp_path / "missing.yaml")


def test_the_heal_options_follow_the_recovery_method():
    """Options made for distillation keep their explicit values and take seq-lora's defaults for the rest."""
    recipe = Recipe(heal="seq-lora", healing=HealConfig(steps=6))
    cfg = recipe.heal_config()
    assert (cfg.method, cfg.lr, cfg.objective, cfg.steps, cfg.auto_lr) == ("seq-lora", 1e-4, "ce", 6, True)
    explicit = Recipe(heal="distill", healing=HealConfig(lr=0.01)).heal_config()
    assert (explicit.lr, explicit.auto_lr) == (0.01, False)
    assert Recipe(heal="distill", corpus="austen").heal_config().corpus == "austen"


def test_healing_defaults_to_the_broader_mix_only_when_calibrating_on_wiki():
    """wiki (the default calibration) heals on mix, measured better on other domains; a domain the user chose heals
    on that domain; a healing corpus named explicitly wins over both."""
    assert Recipe(heal="distill").heal_config().corpus == "mix"
    assert Recipe(heal="distill", corpus="code").heal_config().corpus == "code"
    named = Recipe(heal="distill", corpus="wiki", healing=HealConfig(corpus="wiki")).heal_config()
    assert named.corpus == "wiki"


def test_svdzip_heal_defaults_to_the_directory_s_calibration_corpus(tmp_path):
    from svdzip.cli import _default_heal_corpus
    from svdzip.recipe import RECIPE_FILE

    assert _default_heal_corpus(tmp_path) == "mix"  # no recipe.yaml: as if calibrated on wiki
    Recipe(corpus="austen").save(tmp_path / RECIPE_FILE)
    assert _default_heal_corpus(tmp_path) == "austen"


# ------------------------------------------------------------------ the one runner


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_corpus(root / "corpus.txt")
    return save_tiny(root / "model")


def test_compress_writes_the_recipe_and_recipe_reruns_it_exactly(tiny_dir, tmp_path, capsys):
    common = ["--model", str(tiny_dir), "--corpus", str(tiny_dir.parent / "corpus.txt"), "--no-plots", "--json"]
    assert main(["compress", *common, "--out", str(tmp_path / "a"), "--ratio", "0.3", "--allocator", "drank",
                 "--heal", "none", "--calib-samples", "6", "--calib-seq-len", "32"]) == 0
    capsys.readouterr()
    written = Recipe.load(tmp_path / "a")
    assert (written.allocator, written.heal, written.ratio, written.calib_samples) == ("drank", "none", 0.3, 6)
    assert main(["compress", *common, "--out", str(tmp_path / "b"), "--recipe", str(tmp_path / "a" / RECIPE_FILE)]) == 0
    capsys.readouterr()
    first, second = (svdzip.load(tmp_path / d, with_tokenizer=False)[0].state_dict() for d in ("a", "b"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_an_auto_recipe_is_written_resolved(tiny_dir, tmp_path, capsys):
    assert main(["compress", "--model", str(tiny_dir), "--corpus", str(tiny_dir.parent / "corpus.txt"),
                 "--out", str(tmp_path / "s"), "--stream", "--calib-samples", "4", "--calib-seq-len", "32",
                 "--no-plots", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["recipe"]["allocator"], summary["recipe"]["heal"]) == ("loss-aware", "layerwise")
    written = Recipe.load(tmp_path / "s")
    assert (written.allocator, written.allocator_options, written.heal) == ("loss-aware", {"signal": "local"},
                                                                            "layerwise")
    # the precisions as this device resolved them (the tests' CPU has no native bf16), not "auto"
    assert (written.calib_precision, written.healing.precision) == ("float32", "float32")
    healing = written.heal_config()
    # layer-wise healing's own defaults
    assert (healing.steps, healing.lr, healing.lr_per_rms, healing.objective) == (10, None, 1.17e-2, "mse")
    # and the file's options, being that recovery's defaults, follow another one named over it
    other = replace(written, heal="distill").heal_config()
    assert (other.steps, other.lr, other.lr_per_rms, other.objective) == (40, None, 2.57e-3, "kl")


def test_the_api_refuses_before_touching_the_model():
    """An update without calibration text used to be refused after the model was rewritten in place."""
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SvdzipError, match="calibration text"):
        compress(model, Recipe.plain(method="svd", update="svdllm"))
    with pytest.raises(SvdzipError, match="tokenizer"):
        compress(model, Recipe(allocator="uniform", heal="distill"), calib_tokens=tiny_tokens())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_api_does_not_change_the_callers_recipe():
    recipe = Recipe.plain(ratio=0.3, device="cpu")
    snapshot = replace(recipe)
    compress(tiny_model("llama"), recipe, calib_tokens=tiny_tokens())
    assert recipe == snapshot


def test_the_api_default_is_the_recommended_recipe(tmp_path):
    """`svdzip.compress(model)` means what `svdzip compress` means: loss-aware ranks, then distillation."""
    tok = tiny_tokenizer()
    corpus = write_tiny_corpus(tmp_path / "c.txt")
    recipe = Recipe(ratio=0.3, corpus=str(corpus), calib_samples=4, calib_seq_len=32,
                    healing=HealConfig(steps=2, seq_len=32, train_samples=4, heldout_samples=2, eval_every=1,
                                       batch_size=2, grad_accum=1))
    result = compress(tiny_model("llama"), recipe, tokenizer=tok)
    assert result.summary["method"].startswith("svdllm+loss-aware")
    assert result.summary["heal"] is not None and "heldout_final" in result.summary["heal"]
    assert (result.summary["method"].endswith("+distill")) == result.summary["heal"]["improved"]


def test_stats_file_is_refused_where_it_would_be_ignored(tiny_dir, tmp_path):
    assert main(["compress", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), "--stream",
                 "--stats", str(tmp_path / "s.pt"), "--heal", "none"]) == 2
    assert not (tmp_path / "o").exists()


def test_info_reads_a_streamed_output(tiny_dir, tmp_path, capsys):
    assert main(["compress", "--model", str(tiny_dir), "--corpus", str(tiny_dir.parent / "corpus.txt"),
                 "--out", str(tmp_path / "s"), "--stream", "--ratio", "0.3", "--calib-samples", "4",
                 "--calib-seq-len", "32", "--no-plots"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "s")]) == 0
    text = capsys.readouterr().out
    assert "decoder-linear parameters" in text and "model " in text


def test_eval_limit_zero_is_an_error(tiny_dir, capsys):
    assert main(["eval", str(tiny_dir), "--tasks", "piqa", "--limit", "0", "--corpora", ""]) == 2
    assert "--limit" in capsys.readouterr().err


# ------------------------------------------------------------------ a cheap import


def test_import_svdzip_loads_neither_torch_nor_transformers_and_still_registers_the_reload(tmp_path):
    """`import svdzip` (and so `svdzip --help`) stays cheap; the quantizer registers when transformers' model
    loading is imported, so `from_pretrained(dir)` of a directory svdzip wrote works in a fresh process."""
    import subprocess
    import sys

    model = tiny_model("llama")
    compress(model, Recipe.plain(ratio=0.3), calib_tokens=tiny_tokens(), out=tmp_path / "c", tokenizer=tiny_tokenizer())
    cheap = subprocess.run([sys.executable, "-c", "import sys, svdzip; print(sorted(m for m in ('torch', "
                            "'transformers') if m in sys.modules))"], capture_output=True, text=True, check=True)
    assert cheap.stdout.strip() == "[]"
    reload = subprocess.run([sys.executable, "-c", f"import svdzip; from transformers import AutoModelForCausalLM; "
                             f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'c')!r}); "
                             "print(sum(type(x).__name__ == 'LowRankLinear' for x in m.modules()))"],
                            capture_output=True, text=True, check=True)
    assert int(reload.stdout.strip()) == len(svdzip.output.io.read_manifest(tmp_path / "c")["modules"])
