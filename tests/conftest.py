"""Tiny random models built from configs in code: LLaMA with GQA, Gemma 3, Qwen 2/3, Mistral, OPT shapes."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
    Qwen3Config,
)

logging.getLogger("transformers").setLevel(logging.ERROR)

VOCAB = 96


def tiny_config(family: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if family == "mistral":
        return MistralConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=8)
    if family == "gemma3":
        return Gemma3TextConfig(**{**common, "num_key_value_heads": 1}, head_dim=8, sliding_window=8,
                                layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    if family == "opt":
        return OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32)
    raise ValueError(family)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "opt")


def tiny_model(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    return model.eval()


def tiny_tokens(n: int = 8, seq: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, seq), generator=g)


def pytest_collection_modifyitems(config, items):
    """Minutes-long tests (Gemma 3 conversion) run only when SVDZIP_SLOW_TESTS=1."""
    if os.environ.get("SVDZIP_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow; set SVDZIP_SLOW_TESTS=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param
