"""Shared test setup. The tiny models live in tiny_models.py (the one factory); the names below are
re-exported so that `from conftest import tiny_model` keeps working."""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterator

import pytest
import torch
from tiny_models import (  # noqa: F401  (re-exported)
    CORE_FAMILIES,
    FAMILIES,
    SMALL,
    VOCAB,
    WIDE,
    no_native_bf16,
    save_tiny,
    tiny_config,
    tiny_model,
    tiny_tokenizer,
    tiny_tokens,
)

logging.getLogger("transformers").setLevel(logging.ERROR)


def require(module: str, env: str):
    """`pytest.importorskip(module)`, except where the environment variable `env` is 1 (CI's
    scripts/test_serving.sh sets it): there a missing or broken module fails the run instead of skipping it."""
    if os.environ.get(env) == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module)


def pytest_collection_modifyitems(config, items):
    """Minutes-long tests (Gemma 3 conversion) run only when SVDZIP_SLOW_TESTS=1."""
    if os.environ.get("SVDZIP_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow; set SVDZIP_SLOW_TESTS=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=CORE_FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """Small float64 linear algebra on a shared CPU: one thread is fastest (and many are very slow)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def float32_cpu() -> Iterator[None]:
    """Every test sees a CPU without native bf16, so that `auto` precisions mean float32 and the numbers do not
    depend on the machine CI draws (session-wide: module fixtures compute references too); a test of the bf16
    paths asks for bfloat16 or patches the probes back (a child process: `tiny_models.FLOAT32_CPU`)."""
    with pytest.MonkeyPatch.context() as patch:
        no_native_bf16(patch.setattr)
        yield
