"""`svdzip heal DIR --out DIR2`: recover an already compressed directory, recorded in its manifest."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svdzip.errors import SvdzipError
from svdzip.recover.config import HealConfig
from svdzip.recover.heal import HealReport, heal, heal_windows, load_teacher

log = logging.getLogger(__name__)

PLOTS = ("ranks.png", "effective_rank.png")


def healed_label(label: str, report: HealReport) -> str:
    """The method label after a heal: `+distill` / `+seq-lora` only when it lowered the held-out loss."""
    return f"{label}+{report.method}" if report.improved else label


def record_recovery(manifest: Any, report: HealReport) -> None:
    """Append what was trained (or tried) to the manifest (a `SvdzipConfig`); name it in the method label
    only if it improved the model, and show its outcome in the run summary."""
    manifest.details.setdefault("recovery", []).append(report.to_dict())
    manifest.method = healed_label(manifest.method, report)
    if "summary" in manifest.details:
        manifest.details["summary"]["method"] = manifest.method
        manifest.details["summary"]["heal"] = report.brief()


def teacher_source(manifest: dict[str, Any], teacher: str | None) -> str:
    source = teacher or manifest.get("details", {}).get("source_model")
    if not source:
        raise SvdzipError("the manifest does not say which dense model this was compressed from; pass --teacher")
    return source


def heal_directory(src: str | os.PathLike, out: str | os.PathLike, config: HealConfig, teacher: str | None = None,
                   resume_dir: str | os.PathLike | None = None, overwrite: bool = False,
                   dtype: torch.dtype = torch.float32,
                   fit: Callable[[nn.Module, HealConfig], HealConfig] | None = None) -> tuple[HealReport, Path]:
    """Load the compressed `src`, heal it against its dense model, save to `out` (atomically).

    `fit(student, config)` is called once the student and the heal's windows are in memory and before the teacher
    loads: the config to run (the engine's memory check, `engine.driver.heal_check`), or an error that leaves `out`
    unwritten."""
    from svdzip.output import io

    config.validate()
    src, out = Path(src), Path(out)
    manifest_dict = io.read_manifest(src)
    if manifest_dict is None:
        raise SvdzipError(f"{src} is a dense model directory: compress it first (`svdzip compress`)")
    if manifest_dict.get("quantization"):
        raise SvdzipError(f"{src} is quantized: its int8 factors cannot be trained; heal before quantizing "
                          "(`svdzip compress --heal distill --quantize int8 …`)")
    if manifest_dict.get("lowbit"):
        raise SvdzipError(f"{src} holds packed low-bit weights: `svdzip heal` does not train them; heal while "
                          "compressing instead (`svdzip compress --budget-fraction F --heal distill …` trains the "
                          "factors and the compensations of the quantization errors against the dense model)")
    if out.exists() and not overwrite:
        raise SvdzipError(f"output directory {out} already exists; pass --overwrite to replace it")
    source = teacher_source(manifest_dict, teacher)
    io.refuse_overlap(out, src, "the directory being healed")
    io.refuse_overlap(out, source, "the teacher model")
    student, tokenizer = io.load(src, device=config.device)
    if tokenizer is None:
        raise SvdzipError(f"{src} has no tokenizer: healing needs one to cut calibration windows")
    windows = heal_windows(tokenizer, config)  # before the check: its corpus is part of what the process holds
    if fit is not None:
        config = fit(student, config)
    # the teacher (only the kl objective has one) is passed without a name here, so that heal() can free it once
    # its top-k are cached
    report = heal(student, load_teacher(source, config), windows, config, resume_dir=resume_dir)
    manifest = io.SvdzipConfig(**{k: v for k, v in manifest_dict.items() if k != "quant_method"})
    record_recovery(manifest, report)
    old_report = src / "svdzip_report.json"
    modules = json.loads(old_report.read_text()).get("modules", []) if old_report.is_file() else []
    staged = _stage_plots(src, out)
    try:
        io.save(student.to(dtype), tokenizer, out, manifest, overwrite=overwrite, report={"modules": modules})
        for name, copy in staged:
            shutil.move(str(copy), out / name)
    finally:
        for _, copy in staged:
            copy.unlink(missing_ok=True)
    return report, out


def _stage_plots(src: Path, out: Path) -> list[tuple[str, Path]]:
    """Copies of the source's plots beside the output (the source may be the output itself)."""
    staged = []
    for name in PLOTS:
        if (src / name).is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            copy = out.parent / f".{out.name}.{name}"
            shutil.copy2(src / name, copy)
            staged.append((name, copy))
    return staged
