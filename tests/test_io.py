"""Saving and reloading: safetensors + manifest, `from_pretrained` after `import svdzip`, atomic writes."""

import json

import pytest
import torch
from tiny_models import tiny_model, tiny_tokens
from transformers import AutoModelForCausalLM

import svdzip
from svdzip import Recipe, SvdzipError, compress
from svdzip.output.io import build_manifest, dir_size, read_manifest, save


def _compressed(family="llama", group_size=1, ratio=0.4):
    model = tiny_model(family)
    tokens = tiny_tokens()
    result = compress(model, Recipe.plain(ratio=ratio, group_size=group_size, calib_batch_size=4),
                      calib_tokens=tokens)
    return model, tokens, build_manifest(result.modules, result.summary, result.config.to_dict())


@pytest.mark.parametrize("group_size", [1, 2])
def test_reload_gives_the_same_logits(tmp_path, family, group_size):
    model, tokens, manifest = _compressed(family, group_size)
    save(model, None, tmp_path / "m", manifest)
    with torch.no_grad():
        ref = model(tokens).logits
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")(tokens).logits
        loaded, _ = svdzip.load(tmp_path / "m", with_tokenizer=False)
        assert torch.equal(again, ref)
        assert torch.equal(loaded(tokens).logits, ref)
    assert not list(tmp_path.glob(".m.*"))  # no temporary directory left behind


def test_shared_basis_is_stored_once(tmp_path):
    m1, _, man1 = _compressed("llama", 1)
    m3, _, man3 = _compressed("llama", 3)
    save(m1, None, tmp_path / "a", man1)
    save(m3, None, tmp_path / "b", man3)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    q = [reloaded.model.layers[i].self_attn.q_proj for i in range(3)]
    assert q[0].right is q[1].right is q[2].right
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in m3.parameters())


def test_saved_directory_is_smaller_in_proportion(tmp_path):
    dense = tiny_model("llama")
    dense.save_pretrained(tmp_path / "dense")
    model, _, manifest = _compressed("llama", ratio=0.5)
    save(model, None, tmp_path / "c", manifest)
    linear = manifest.details["summary"]
    removed_bytes = 4 * (linear["model_params_before"] - linear["model_params_after"])
    saved = dir_size(tmp_path / "dense") - dir_size(tmp_path / "c")
    assert saved == pytest.approx(removed_bytes, rel=0.1)  # safetensors headers aside


def test_existing_output_is_refused_and_kept(tmp_path):
    model, _, manifest = _compressed()
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(SvdzipError, match="already exists"):
        save(model, None, out, manifest)
    assert (out / "precious.txt").read_text() == "keep me"
    save(model, None, out, manifest, overwrite=True)
    assert not (out / "precious.txt").exists() and read_manifest(out)["method"] == "svdllm"


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model, _, manifest = _compressed()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(SvdzipError, match="cannot write .*disk full; nothing was written"):
        save(model, None, tmp_path / "x", manifest)
    assert list(tmp_path.iterdir()) == []


def test_foreign_and_corrupted_directories(tmp_path):
    with pytest.raises(SvdzipError, match="not a directory"):
        svdzip.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SvdzipError, match="no config.json"):
        svdzip.load(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(SvdzipError, match="corrupted"):
        svdzip.load(bad)
    model, _, manifest = _compressed()
    save(model, None, tmp_path / "ok", manifest)
    for f in (tmp_path / "ok").glob("*.safetensors"):
        f.write_bytes(b"garbage")
    with pytest.raises(SvdzipError, match="model.safetensors is corrupted"):  # its recorded checksum
        svdzip.load(tmp_path / "ok")
    (tmp_path / "ok" / "svdzip_checksums.json").unlink()  # without the record: safetensors' own error
    with pytest.raises(SvdzipError, match="cannot load"):
        svdzip.load(tmp_path / "ok")


def test_manifest_records_method_ratio_and_ranks(tmp_path):
    model, _, manifest = _compressed()
    save(model, None, tmp_path / "m", manifest)
    q = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "svdzip" and q["ratio"] == 0.4 and q["ratio_convention"] == "removed"
    assert q["svdzip_version"] == svdzip.__version__
    assert all(set(v) >= {"in", "out", "rank"} for v in q["modules"].values())


def test_rank_grid_shows_every_expert_of_a_layer():
    from svdzip.report.tables import rank_grid

    rows = [{"layer": 0, "role": "expert_gate", "rank": r} for r in (4, 9, None)]
    rows.append({"layer": 0, "role": "q", "rank": 7})
    headers, body = rank_grid(rows)
    assert headers == ["layer", "q", "expert_gate"]
    assert body == [[0, 7, "4–9 (1 dense)"]]
