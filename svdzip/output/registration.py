"""Register svdzip's quantizer with transformers without importing transformers at `import svdzip`.

`import svdzip` must be cheap (the CLI's `--help`, a user's script that only reads a manifest), yet a
directory svdzip wrote must reload with `AutoModelForCausalLM.from_pretrained(dir)` once svdzip was
imported. So the registration runs the moment transformers' model loading (`transformers.modeling_utils`)
has been imported — before any `from_pretrained` can run — or at once when it already was.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any

TRIGGER = "transformers.modeling_utils"


def register_now() -> None:
    """Import the quantizer module, whose decorators register it with transformers."""
    import svdzip.output.quantizer  # noqa: F401


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of TRIGGER so that the registration runs after it."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != TRIGGER:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps find_spec below from finding this finder again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            register_now()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    """Register now when transformers' model loading is imported already; otherwise right after it is."""
    if TRIGGER in sys.modules:
        register_now()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
