"""Save and load compressed models: safetensors plus a manifest in `config.json`.

The manifest is a `quantization_config` block with `quant_method: "svdzip"`. `import svdzip`
registers a transformers quantizer for it, so `AutoModelForCausalLM.from_pretrained(dir)` swaps the
listed linears for `LowRankLinear`s before the weights load — for any architecture, with no remote
code and no pickles. `svdzip.load(dir)` is the same call with clearer errors.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from svdzip.errors import SvdzipError
from svdzip.output.quantizer import MANIFEST_FORMAT, QUANT_METHOD, SvdzipConfig, apply_manifest  # noqa: F401
from svdzip.version import __version__

log = logging.getLogger(__name__)



def build_manifest(module_rows: list[Any], summary: dict[str, Any], config: dict[str, Any]) -> SvdzipConfig:
    modules = {}
    for row in module_rows:
        if row.rank is None:
            continue
        entry = {"in": row.in_features, "out": row.out_features, "rank": row.rank, "role": row.role}
        if row.shared_with:
            entry["shared_with"] = row.shared_with
        modules[row.name] = entry
    return SvdzipConfig(modules=modules, method=summary.get("method", ""), ratio=summary.get("ratio_requested"),
                        details={"summary": summary, "config": config, "provenance": provenance(config)})


def _fill_bias_flags(model: nn.Module, manifest: SvdzipConfig) -> None:
    for name, entry in manifest.modules.items():
        entry["bias"] = model.get_submodule(name).left.bias is not None


def save(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike, manifest: SvdzipConfig,
         overwrite: bool = False, report: dict[str, Any] | None = None,
         artefacts: Callable[[Path], None] | None = None) -> Path:
    """Write the compressed model atomically: into a temporary sibling directory, then rename.

    An existing `out_dir` is refused unless `overwrite`; a failure leaves it as it was. `artefacts(tmp)`
    adds plots and other files before the directory appears, so it never appears without them.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise SvdzipError(f"output directory {out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    _fill_bias_flags(model, manifest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        quantized = manifest.quantization["modules"] if manifest.quantization else []
        originals = {}
        if quantized:
            from svdzip.output.quantize import restore, save_quantized, swap_in_slots

            save_quantized(model, quantized, tmp / manifest.quantization["file"])
            originals = swap_in_slots(model, quantized)  # model.safetensors holds all but the quantized weights
        previous = getattr(model.config, "quantization_config", None)
        model.config.quantization_config = manifest
        # a reloaded quantized model carries the quantizer that refuses save_pretrained; its weights are
        # already written above and swapped out, so the rest saves as a plain checkpoint
        quantizer = model.__dict__.pop("hf_quantizer", None) if quantized else None
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            if previous is None:
                del model.config.quantization_config
            else:
                model.config.quantization_config = previous
            if quantizer is not None:
                model.hf_quantizer = quantizer
            if originals:
                restore(model, originals)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        full_report = {**manifest.details, **(report or {})}
        (tmp / "svdzip_report.json").write_text(json.dumps(full_report, indent=2, default=str))
        if artefacts is not None:
            artefacts(tmp)
        from svdzip.output.checksums import write_checksums

        write_checksums(tmp)
        replace_dir(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_write_error(exc, out)
        raise
    return out


def refuse_overlap(out: str | os.PathLike, other: str | os.PathLike | None, what: str) -> None:
    """Refuse an output that is, contains or lies inside `other` (a local directory): --overwrite would delete it."""
    if not other or not Path(other).exists():
        return
    o, p = Path(out).resolve(), Path(other).resolve()
    if o == p or o in p.parents or p in o.parents:
        raise SvdzipError(f"--out {out} is, contains or lies inside {what} ({other}): write the output elsewhere")


def write_failure(exc: BaseException) -> str | None:
    """Why a write failed (disk full, read-only, quota) in a few words; None for an error that is not a write's."""
    from safetensors import SafetensorError

    if not isinstance(exc, OSError | SafetensorError):
        return None
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]


def raise_write_error(exc: BaseException, out: Path) -> None:
    """A failed write as one clear error; anything else is re-raised by the caller."""
    reason = write_failure(exc)
    if reason is not None:
        free = shutil.disk_usage(out.parent).free if out.parent.exists() else None
        raise SvdzipError(f"cannot write {out}: {reason}; nothing was written"
                          + (f" ({free / 2**20:.0f} MiB free there)" if free is not None else "")) from exc


def replace_dir(tmp: Path, out: Path) -> None:
    """Put a fully written `tmp` in place of `out` by renames; the old `out` lives until `tmp` is there."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def provenance(config: dict[str, Any]) -> dict[str, Any]:
    """Seed and versions: what reproducing a compressed model needs besides the config."""
    import safetensors
    import transformers

    return {"seed": config.get("seed"), "svdzip": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__}


def read_manifest(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The svdzip manifest of a directory, None for a dense HF checkpoint; errors for anything else."""
    path = Path(model_dir)
    cfg_path = path / "config.json"
    if not path.is_dir():
        raise SvdzipError(f"{path} is not a directory")
    if not cfg_path.is_file():
        raise SvdzipError(f"{path} is not a model directory (no config.json)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise SvdzipError(f"{cfg_path} is corrupted: {exc}") from exc
    q = cfg.get("quantization_config")
    if not q or q.get("quant_method") != QUANT_METHOD:
        return None
    if q.get("format") != MANIFEST_FORMAT:
        raise SvdzipError(f"{path} has svdzip manifest format {q.get('format')}, expected {MANIFEST_FORMAT}")
    return q


def load(model_dir: str | os.PathLike, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = torch.float32, with_tokenizer: bool = True):
    """Load a svdzip (or dense) directory; returns (model, tokenizer)."""
    read_manifest(model_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    except SvdzipError:
        raise
    except Exception as exc:  # safetensors, json, torch: any failure means an unusable directory
        raise SvdzipError(f"cannot load a model from {model_dir}: {str(exc).splitlines()[0]}") from exc
    model.to(device).eval()
    tokenizer = None
    if with_tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError) as exc:
            log.warning("no tokenizer in %s: %s", model_dir, exc)
    return model, tokenizer


def dir_size(path: str | os.PathLike) -> int:
    """Bytes of the weight files of a model directory."""
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))
