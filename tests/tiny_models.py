"""Tiny random models of every supported family, built from configs in code (hidden 64, 2 layers).

Biases and norm weights are randomised too (transformers initialises them to 0 and 1), so a test
that loses a bias or a norm on the way through compression and reload can fail.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OPTConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

VOCAB = 128
HIDDEN = 64
_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "llama-gqa": lambda: LlamaConfig(**_COMMON, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=8),
    "qwen2": lambda: Qwen2Config(**_COMMON),  # q/k/v carry biases
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=16),
    "gemma3": lambda: Gemma3TextConfig(**_COMMON, head_dim=16, sliding_window=8,
                                       layer_types=["sliding_attention", "full_attention"]),
    "opt": lambda: OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=96, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=HIDDEN),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=128,
                               bos_token_id=1, eos_token_id=2),  # Conv1D, fused c_attn
    # fused qkv_proj and gate_up_proj
    "phi3": lambda: Phi3Config(**_COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "mixtral": lambda: MixtralConfig(**{**_COMMON, "intermediate_size": 48}, num_local_experts=4,
                                     num_experts_per_tok=2),
    # layer 0 sparse (4 experts, top 2), layer 1 a dense MLP (mlp_only_layers)
    "qwen3_moe": lambda: Qwen3MoeConfig(**_COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                        moe_intermediate_size=48, decoder_sparse_step=1, mlp_only_layers=[1],
                                        norm_topk_prob=True),
}
FAMILIES = tuple(CONFIGS)
MOE_FAMILIES = ("mixtral", "qwen3_moe")


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A random fp32 model of `family` in eval mode; the same seed gives the same weights."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[family](), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "norm" in name and p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("mlp.gate.weight"):  # routers: spread the tokens over the experts
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def tiny_tokens(n: int = 8, seq: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, seq), generator=g)
