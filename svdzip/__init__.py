"""svdzip: post-training SVD compression of LLMs with per-matrix rank allocation.

Importing svdzip is cheap (no torch, no transformers) and registers its transformers quantizer as soon
as transformers' model loading is imported, so a directory it wrote reloads with
`AutoModelForCausalLM.from_pretrained(dir)`. The public names load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from svdzip.output.registration import install as _install_quantizer
from svdzip.version import __version__

_install_quantizer()

#: public name → the module that defines it (imported on first access)
_PUBLIC = {
    "Recipe": "svdzip.recipe",
    "CompressionResult": "svdzip.engine.pipeline",
    "compress": "svdzip.engine.driver",
    "SvdzipError": "svdzip.errors",
    "load": "svdzip.output.io",
    "save": "svdzip.output.io",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'svdzip' has no attribute {name!r}")
