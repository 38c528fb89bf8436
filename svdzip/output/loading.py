"""Load a model by alias (`smollm2-135m`, `gemma3-270m`), local directory or hub id, dense or svdzip."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from svdzip.errors import SvdzipError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise SvdzipError(f"unknown dtype '{name}'; choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(source: str) -> object:
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # transformers raises many types for a missing or broken tokenizer
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SvdzipError(f"cannot load the tokenizer of '{source}': {first}") from exc


def load_model(name_or_path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               with_tokenizer: bool = True) -> tuple[nn.Module, object, str]:
    """Returns (model in eval mode on `device`, tokenizer or None, resolved source path or hub id)."""
    from svdzip.assets import resolve_model
    from svdzip.output import io

    source = resolve_model(name_or_path)
    if Path(source).is_dir():
        io.read_manifest(source)  # clear errors for corrupted or foreign directories
    tokenizer = load_tokenizer(source) if with_tokenizer else None
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except SvdzipError:
        raise
    except Exception as exc:  # transformers raises many types for a bad or unreachable model
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SvdzipError(f"cannot load model '{name_or_path}' ({source}): {first}") from exc
    model.to(device).eval()
    return model, tokenizer, source


def check_device(device: str) -> str:
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise SvdzipError(f"invalid device '{device}'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SvdzipError(f"device '{device}' requested but CUDA is not available on this machine")
    return device
