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
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from svdzip.output.quantize import quiet_backend_import

with quiet_backend_import():  # transformers' quantizer registry imports torchao when it is installed
    from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

from svdzip import __version__
from svdzip.errors import SvdzipError
from svdzip.models.adapter import open_structure
from svdzip.models.lowrank import LowRankLinear

log = logging.getLogger(__name__)

QUANT_METHOD = "svdzip"
MANIFEST_FORMAT = 1


class SvdzipConfig(QuantizationConfigMixin):
    """The manifest: method, version, ratio and convention, and every factorised module's rank."""

    def __init__(
        self,
        modules: dict[str, dict[str, Any]] | None = None,
        method: str = "",
        ratio: float | None = None,
        ratio_convention: str = "removed",
        svdzip_version: str = __version__,
        format: int = MANIFEST_FORMAT,
        details: dict[str, Any] | None = None,
        quantization: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        self.quant_method = QUANT_METHOD
        self.modules = modules or {}
        self.method = method
        self.ratio = ratio
        self.ratio_convention = ratio_convention
        self.svdzip_version = svdzip_version
        self.format = format
        self.details = details or {}
        self.quantization = quantization  # svdzip.output.quantize.quantization_record(), or None (16/32-bit only)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "quant_method": QUANT_METHOD, "format": self.format, "svdzip_version": self.svdzip_version,
            "method": self.method, "ratio": self.ratio, "ratio_convention": self.ratio_convention,
            "details": self.details, "modules": self.modules,
        }
        if self.quantization:
            d["quantization"] = self.quantization
        return d


def _get(model: nn.Module, name: str) -> nn.Module:
    for part in name.split("."):
        model = getattr(model, part)
    return model


def apply_manifest(model: nn.Module, modules: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Replace every listed linear with an (uninitialised) LowRankLinear of the recorded rank.

    Members of a shared-basis group reference the leader's `right` module, so the basis exists once;
    returns the {alias: source} map of those shared parameters.
    """
    built: dict[str, LowRankLinear] = {}
    aliases: dict[str, str] = {}
    for name, spec in modules.items():
        try:
            old = _get(model, name)
        except AttributeError as exc:
            raise SvdzipError(f"manifest lists {name}, which this model does not have") from exc
        weight = getattr(old, "weight", None)
        device = weight.device if weight is not None else None
        dtype = weight.dtype if weight is not None else None
        leader = spec.get("shared_with")
        shared = built[leader].right if leader else None
        new = LowRankLinear(spec["in"], spec["out"], spec["rank"], bias=spec.get("bias", False),
                            shared_right=shared, device=device, dtype=dtype)
        if leader:
            new.share_basis_of(leader)
            aliases[f"{name}.right.weight"] = f"{leader}.right.weight"
        parent, _, child = name.rpartition(".")
        setattr(_get(model, parent) if parent else model, child, new)
        built[name] = new
    return aliases


@register_quantization_config(QUANT_METHOD)
class _RegisteredConfig(SvdzipConfig):
    pass


@register_quantizer(QUANT_METHOD)
class SvdzipQuantizer(HfQuantizer):
    """Lets `from_pretrained` rebuild the low-rank modules before the checkpoint's weights load."""

    requires_calibration = False

    def _quantization(self) -> dict[str, Any] | None:
        return getattr(self.quantization_config, "quantization", None)

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """A quantized directory computes in the dtype its scales were made for; other dtypes are refused quietly."""
        q = self._quantization()
        if q and q.get("dtype"):
            saved = getattr(torch, q["dtype"])
            if dtype is not None and dtype != saved:
                log.info("quantized svdzip model: loading in its saved dtype %s instead of %s", saved, dtype)
            return saved
        return dtype

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        open_structure(model)  # the structure the model was compressed in: per-expert linears for MoE
        aliases = apply_manifest(model, self.quantization_config.modules)
        if aliases:
            model.all_tied_weights_keys = {**getattr(model, "all_tied_weights_keys", {}), **aliases}
        q = self._quantization()
        if q:
            from svdzip.output.quantize import require_backend, swap_in_slots

            require_backend(q["precision"], "cpu" if q["precision"] == "int8" else "cuda",
                            why=f"this directory's {q['precision']} weights ({q.get('backend')} "
                                f"{q.get('backend_version', '')})")
            files = kwargs.get("checkpoint_files") or []
            if not files:
                raise SvdzipError("a quantized svdzip directory must be loaded from a local directory")
            self._quantized_file = Path(files[0]).parent / q["file"]
            swap_in_slots(model, q["modules"])
        return model

    def update_weight_conversions(self, weight_conversions: list[Any], model: nn.Module) -> list[Any]:
        """Drop the checkpoint converters that merge tensors into parameters this model no longer has.

        transformers 5 merges an MoE checkpoint's per-expert tensors into 3-D parameters on load; svdzip
        saved the experts opened (one module per expert), so those merges must not run. Renamings stay:
        `save_pretrained` applied their reverse.
        """
        from transformers.core_model_loading import WeightConverter

        params = "\n".join(name for name, _ in model.named_parameters())
        kept = [c for c in super().update_weight_conversions(weight_conversions, model)
                if not isinstance(c, WeightConverter)
                or any(re.search(t.replace("*", r"\d+"), params) for t in c._original_target_patterns)]
        return kept

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self._quantization():
            from svdzip.output.quantize import load_quantized

            load_quantized(model, self._quantized_file)
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        if self._quantization():
            log.warning("a quantized svdzip model is saved with svdzip.save(model, tokenizer, out_dir, "
                        "model.config.quantization_config), which stores its int8 weights in their own file; "
                        "save_pretrained cannot")
            return False
        return True

    @property
    def is_trainable(self) -> bool:
        return True


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
        entry["bias"] = _get(model, name).left.bias is not None


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
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


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
