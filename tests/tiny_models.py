"""The tests' one factory of tiny random models, built from configs in code, and a tokenizer for them
that needs no download.

`tiny_model(family)` gives the default `SMALL` shape (hidden 32, 3 layers, vocabulary 96) that the unit
tests use; `shape=WIDE` (hidden 64, 2 layers, vocabulary 128) is what the architecture tests use, with
biases, norm weights and routers randomised too (transformers initialises them to 0, 1 and small values),
so a test that loses a bias or a norm on the way through compression and reload can fail; `shape=VLLM`
has the head size vLLM's CPU kernels need (the plugin tests).

`tiny_tokenizer()` is a character-level tokenizer built in code (no merges, one token per character),
whose ids all fit the tiny vocabulary; `save_tiny()` writes a model directory with it, so the driver and
CLI tests run offline on a directory that looks like any downloaded model.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

from svdzip.core.precision import CPU_BF16_PROBES


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int = 4
    kv_heads: int = 2
    randomise: bool = False  # biases, norm weights and routers drawn at random too
    window: int = 8  # sliding window of Mistral and Gemma 3's sliding layers
    positions: int = 128


SMALL = Shape(vocab=96, hidden=32, intermediate=48, layers=3)
WIDE = Shape(vocab=128, hidden=64, intermediate=96, layers=2, randomise=True)
# vLLM's CPU attention has kernels for head size 64: 2 heads of 64, one KV head
VLLM = Shape(vocab=128, hidden=128, intermediate=192, layers=2, heads=2, kv_heads=1, window=16, positions=256)
VOCAB = SMALL.vocab


def _common(s: Shape, **over) -> dict:
    return {**dict(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                   num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                   max_position_embeddings=s.positions), **over}


def _head_dim(s: Shape) -> int:
    return s.hidden // s.heads


CONFIGS: dict[str, Callable[[Shape], PretrainedConfig]] = {
    "llama": lambda s: LlamaConfig(**_common(s), tie_word_embeddings=True),  # GQA: 4 heads, 2 KV heads
    "mistral": lambda s: MistralConfig(**_common(s), sliding_window=s.window),
    "qwen2": lambda s: Qwen2Config(**_common(s)),  # q/k/v carry biases
    "qwen3": lambda s: Qwen3Config(**_common(s), head_dim=_head_dim(s)),
    # multi-query attention (one KV head, as Gemma 3 1B), sliding layers then a full one
    "gemma3": lambda s: Gemma3TextConfig(**_common(s, num_key_value_heads=1), head_dim=_head_dim(s),
                                         sliding_window=s.window,
                                         layer_types=["sliding_attention"] * (s.layers - 1) + ["full_attention"]),
    "opt": lambda s: OPTConfig(vocab_size=s.vocab, hidden_size=s.hidden, ffn_dim=s.intermediate,
                               num_hidden_layers=s.layers, num_attention_heads=s.heads,
                               max_position_embeddings=s.positions, word_embed_proj_dim=s.hidden),
    "gpt2": lambda s: GPT2Config(vocab_size=s.vocab, n_embd=s.hidden, n_layer=s.layers, n_head=s.heads,
                                 n_positions=s.positions, bos_token_id=1, eos_token_id=2),  # Conv1D, fused c_attn
    # fused qkv_proj and gate_up_proj
    "phi3": lambda s: Phi3Config(**_common(s), pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "mixtral": lambda s: MixtralConfig(**_common(s, intermediate_size=s.intermediate // 2), num_local_experts=4,
                                       num_experts_per_tok=2),
    # layer 0 sparse (4 experts, top 2), the others dense MLPs (mlp_only_layers)
    "qwen3_moe": lambda s: Qwen3MoeConfig(**_common(s), head_dim=_head_dim(s), num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=s.intermediate // 2, decoder_sparse_step=1,
                                          mlp_only_layers=list(range(1, s.layers)), norm_topk_prob=True),
}
FAMILIES = tuple(CONFIGS)
CORE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "opt")  # the `family` fixture's
MOE_FAMILIES = ("mixtral", "qwen3_moe")


def tiny_config(family: str = "llama", shape: Shape = SMALL) -> PretrainedConfig:
    if family not in CONFIGS:
        raise ValueError(f"no tiny config for {family!r}; one of {', '.join(FAMILIES)}")
    return CONFIGS[family](shape)


def tiny_model(family: str = "llama", seed: int = 0, shape: Shape = SMALL) -> torch.nn.Module:
    """A random fp32 model of `family` in eval mode; the same seed gives the same weights."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, shape), dtype=torch.float32).eval()
    if shape.randomise:
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


def tiny_tokens(n: int = 8, seq: int = 24, seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    """Random ids above the tokenizer's three special tokens."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, seq), generator=g)


SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2: LLaMA's unk/bos/eos ids
# most frequent characters first, so a small vocabulary keeps what text (and code) uses most
_ALPHABET = (" \n" + "etaoinsrhldcumfpgwybvkxjqz" + "ETAOINSRHLDCUMFPGWYBVKXJQZ" + string.digits
             + ".,:;'\"()_=-[]{}#*/+<>!?%&@|\\^~`$\t")


def tiny_tokenizer(vocab: int = VOCAB) -> PreTrainedTokenizerFast:
    """One token per character of the `vocab - 3` most frequent ones (others are <unk>); no BOS is added.

    Built in code (a BPE model without merges), so it needs no download; every id is below `vocab`.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = _ALPHABET[: vocab - len(SPECIALS)]
    if len(chars) < 2:
        raise ValueError(f"a vocabulary of {vocab} leaves no room for characters")
    ids = {tok: i for i, tok in enumerate([*SPECIALS, *chars])}
    tk = Tokenizer(models.BPE(vocab=ids, merges=[], unk_token="<unk>", fuse_unk=True))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+"), behavior="isolated")  # short pieces: fast BPE
    tk.add_special_tokens(list(SPECIALS))
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=128)


def save_tiny(path: str | Path, family: str = "llama", seed: int = 0, shape: Shape = SMALL,
              model: torch.nn.Module | None = None) -> Path:
    """A model directory as a download would give it: config, weights and the tiny tokenizer."""
    path = Path(path)
    (tiny_model(family, seed, shape) if model is None else model).save_pretrained(path)
    tiny_tokenizer(shape.vocab).save_pretrained(path)
    return path


_WORDS = (
    "the", "model", "keeps", "most", "of", "what", "it", "knew", "when", "each", "matrix", "is", "replaced", "by",
    "two", "thin", "factors", "whose", "product", "is", "close", "to", "the", "original", "on", "the", "text", "it",
    "sees", "and", "a", "small", "budget", "of", "parameters", "is", "spent", "where", "the", "spectrum", "decays",
    "slowly", "while", "layers", "that", "lose", "little", "are", "cut", "deeper", "than", "others"
)


def write_tiny_corpus(path: str | Path, paragraphs: int = 100, seed: int = 0) -> Path:
    """A .txt corpus of seeded pseudo-sentences (blank-line separated paragraphs) for `--corpus PATH`: calibration
    and healing text that needs no download and tokenises in milliseconds with `tiny_tokenizer()`."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(paragraphs):
        sentences = []
        for _ in range(6):
            words = [_WORDS[i] for i in torch.randint(len(_WORDS), (12,), generator=g).tolist()]
            sentences.append(" ".join(words).capitalize() + ".")
        out.append(" ".join(sentences))
    path = Path(path)
    path.write_text("\n\n".join(out) + "\n", encoding="utf-8")
    return path


def no_native_bf16(set_attr: Callable[[object, str, object], None] = setattr) -> None:
    """This process sees a CPU without native bf16 (`auto` precisions = float32): conftest's `float32_cpu`
    for every test (with a monkeypatch's `setattr`, undone afterwards), and a test's child process (a spawned
    rank, a killed run), so that its numbers match."""
    for probe in CPU_BF16_PROBES:
        set_attr(torch.cpu, probe, lambda: False)


#: prepended to a child-process script (its path puts tests/ first)
FLOAT32_CPU = "from tiny_models import no_native_bf16\nno_native_bf16()\n"
