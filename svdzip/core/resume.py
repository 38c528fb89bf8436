"""Resumable runs: a state directory that lets a killed compression continue where it stopped.

Layout of a run directory::

    state.json                   what the state depends on (its hash), svdzip/torch versions
    calib/layer_00003.safetensors  reduced statistics of decoder layer 3 (+ .json: checksum)
    calib/hidden_r0.safetensors  rank 0's activations after the last finished layer (+ .json)
    units/u00017.safetensors     spectrum of unit 17 (sigma², basis) (+ .json)

Every file is written to a temporary name and renamed, with a sha256 in its sidecar: a file cut
short by a kill or flipped on disk fails its checksum, is logged, deleted and recomputed. A run
whose configuration (model, data, method, world size …) differs from the one that wrote the state
is refused with the differences spelled out, or wiped first with ``restart=True`` — never mixed.
The allocation, ratio and output are not part of the state: changing them reuses the spectra.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from svdzip.assets import sha256_file
from svdzip.core.checkpoint import placeholder
from svdzip.errors import SvdzipError

log = logging.getLogger(__name__)

STATE_FORMAT = 1
T = TypeVar("T")


def config_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def write_checked(path: Path, tensors: dict[str, torch.Tensor], info: dict[str, Any] | None = None) -> None:
    """safetensors + `.json` sidecar (sha256, info), each written to a temp name and renamed.

    The sidecar is renamed last, so a file without a matching sidecar is never trusted.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    side = {"sha256": sha256_file(tmp), "info": info or {}}
    side_path = path.with_name(path.name + ".json")
    side_tmp = side_path.with_name(side_path.name + f".tmp{os.getpid()}")
    side_tmp.write_text(json.dumps(side, sort_keys=True))
    os.replace(tmp, path)
    os.replace(side_tmp, side_path)


def read_checked(path: Path, remove: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The tensors and info of a file written by `write_checked`; None if it is missing, cut short or
    corrupted — the caller recomputes it. A corrupted file is removed only with `remove` (its writer)."""
    # copies, not views of the file's memory map: a kept σ² must not keep the whole file (basis
    # included) mapped and resident, or a streamed run's memory would grow with depth
    return _checked(path, remove, lambda p: {k: v.clone() for k, v in load_file(str(p)).items()})


def read_names_checked(path: Path, remove: bool = True) -> tuple[list[str], dict[str, Any]] | None:
    """The tensor names and info of a file written by `write_checked`, checked as `read_checked` does but
    from its header alone: no tensor is read (a streamed Qwen2.5-1.5B's layer statistics are 0.7 GB each)."""
    def names(p: Path) -> list[str]:
        with safe_open(str(p), framework="pt") as f:
            return list(f.keys())

    return _checked(path, remove, names)


def _checked(path: Path, remove: bool, read: Callable[[Path], T]) -> tuple[T, dict[str, Any]] | None:
    side_path = path.with_name(path.name + ".json")
    if not path.is_file() or not side_path.is_file():
        return None
    try:
        side = json.loads(side_path.read_text())
        if sha256_file(path) != side["sha256"]:
            raise ValueError("checksum mismatch")
        return read(path), side.get("info", {})
    except FileNotFoundError:  # removed meanwhile (by its writer): missing, not corrupted
        return None
    except (ValueError, KeyError, TypeError, SafetensorError) as exc:  # json, checksum, safetensors: damage
        log.warning("state file %s is corrupted (%s); recomputing it", path, exc)
        if remove:
            for p in (path, side_path):
                p.unlink(missing_ok=True)
        return None


class RunState:
    """One run's on-disk state, bound to the hash of what that state depends on."""

    def __init__(self, root: str | os.PathLike, key: dict[str, Any], restart: bool = False,
                 writer: bool = True):
        self.root = Path(root)
        self.key = key
        self.hash = config_hash(key)
        self.writer = writer  # only one process (rank 0) writes shared files
        state_file = self.root / "state.json"
        if state_file.is_file():
            try:
                previous = json.loads(state_file.read_text())
            except json.JSONDecodeError:
                previous = {"hash": None, "key": {}}
                log.warning("%s is corrupted; treating the run directory as foreign", state_file)
            if previous.get("hash") != self.hash:
                if not restart:
                    diff = {k: (previous.get("key", {}).get(k), v) for k, v in key.items()
                            if previous.get("key", {}).get(k) != v}
                    changes = "; ".join(f"{k}: {a!r} → {b!r}" for k, b_a in diff.items() for a, b in [b_a])
                    raise SvdzipError(
                        f"run directory {self.root} holds the state of another configuration "
                        f"({changes or 'unreadable state'}); rerun with the original settings to resume, "
                        "pass --restart to discard it, or choose another --resume-dir")
                if writer:
                    log.warning("configuration changed; discarding the state in %s (--restart)", self.root)
                    self.wipe()
            else:
                log.info("resuming from the run state in %s", self.root)
        if writer and not state_file.is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            from svdzip.version import __version__

            meta = {"format": STATE_FORMAT, "hash": self.hash, "key": key, "svdzip_version": __version__,
                    "torch_version": torch.__version__}
            tmp = state_file.with_name(f"state.json.tmp{os.getpid()}")
            tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
            os.replace(tmp, state_file)

    def read(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """`read_checked` of a shared file: only the writer removes a corrupted one."""
        return read_checked(path, remove=self.writer)

    def read_names(self, path: Path) -> tuple[list[str], dict[str, Any]] | None:
        """`read_names_checked` of a shared file: which tensors it holds, none of them read."""
        return read_names_checked(path, remove=self.writer)

    def wipe(self) -> None:
        for sub in ("calib", "units", "heal", "layerwise"):
            shutil.rmtree(self.root / sub, ignore_errors=True)
        (self.root / "state.json").unlink(missing_ok=True)

    # calibration -------------------------------------------------------------------------------
    def layer_stats_path(self, layer: int) -> Path:
        return self.root / "calib" / f"layer_{layer:05d}.safetensors"

    def hidden_path(self, rank: int) -> Path:
        return self.root / "calib" / f"hidden_r{rank}.safetensors"

    def save_hidden(self, rank: int, layer: int, hidden: list[torch.Tensor]) -> None:
        """Activations after `layer` (the inputs of the next): what a resumed calibration starts from."""
        write_checked(self.hidden_path(rank), {f"b{i:06d}": h for i, h in enumerate(hidden)},
                      {"layer": layer, "batches": len(hidden)})

    def load_hidden(self, rank: int) -> tuple[int, list[torch.Tensor]] | None:
        got = read_checked(self.hidden_path(rank))  # each rank writes (and may remove) its own
        if got is None:
            return None
        tensors, info = got
        return int(info["layer"]), [tensors[f"b{i:06d}"] for i in range(int(info["batches"]))]

    # decomposition -----------------------------------------------------------------------------
    def unit_path(self, index: int) -> Path:
        return self.root / "units" / f"u{index:06d}.safetensors"

    def save_unit(self, index: int, name: str, sigma2: torch.Tensor, basis: torch.Tensor, seconds: float) -> None:
        write_checked(self.unit_path(index), {"sigma2": sigma2, "basis": basis},
                      {"name": name, "seconds": seconds})

    def load_unit(self, index: int, name: str, basis: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """σ², basis and seconds of a finished unit; without `basis` the basis comes back as a memoryless meta
        tensor of its shape (a streamed run reads it again when its layer is written: on Qwen2.5-1.5B the bases
        are 1 GiB, which a resumed run used to hold all at once)."""
        got = self.read(self.unit_path(index)) if basis else _checked(
            self.unit_path(index), self.writer, _spectrum_without_basis)
        if got is None:
            return None
        tensors, info = got
        if info.get("name") != name:
            log.warning("unit file %s is for %s, not %s; recomputing", self.unit_path(index), info.get("name"), name)
            return None
        return tensors["sigma2"], tensors["basis"], float(info.get("seconds", 0.0))


def _spectrum_without_basis(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {"sigma2": f.get_tensor("sigma2").clone(), "basis": placeholder(tuple(f.get_slice("basis").get_shape()))}


def fault(stage: str, index: int) -> None:
    """`SVDZIP_FAULT=calib:1` raises after calibrating layer 1; `…:kill` dies like SIGKILL (no cleanup).

    Fault injection for the resume tests and the scale benchmark's fault table.
    """
    spec = os.environ.get("SVDZIP_FAULT")
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] == stage and int(parts[1]) == index:
        if len(parts) > 2 and parts[2] == "kill":
            os._exit(137)
        raise RuntimeError(f"injected fault after {stage} {index}")
