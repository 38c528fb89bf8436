"""The vLLM plugin end to end on tiny random models: same log-probabilities as transformers, clear refusals.

Runs only where vLLM is importable (`.venv-vllm`, made by `scripts/setup_vllm.sh`); the main environment
skips it. Each engine start takes ~20 s on this CPU, so the cases share engines where they can.
Log-probabilities are compared teacher-forced (vLLM's prompt log-probabilities vs transformers' logits
on the same tokens), which random tiny models' near-uniform distributions cannot turn into a tie.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import require  # noqa: E402

vllm = require("vllm", "SVDZIP_REQUIRE_VLLM")  # a skip here; a failure in CI (scripts/test_serving.sh)

from tiny_models import VLLM, tiny_model  # noqa: E402

import svdzip  # noqa: E402
from svdzip import Recipe, compress  # noqa: E402
from svdzip.evaluate.speed import densify  # noqa: E402
from svdzip.output.io import build_manifest, save  # noqa: E402

VOCAB = VLLM.vocab
KEEP_DENSE = ("model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.q_proj")


def _make(tmp: Path, family: str, group_size: int = 1, keep_dense: tuple[str, ...] = KEEP_DENSE) -> Path:
    model = tiny_model(family, shape=VLLM)
    for name, p in model.named_parameters():  # random biases, so that a lost bias shows
        if name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.5)
    tokens = torch.randint(3, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
    result = compress(model, Recipe.plain(ratio=0.3, group_size=group_size, calib_batch_size=4), calib_tokens=tokens)
    densify(model, list(keep_dense))
    manifest = build_manifest(result.modules, result.summary, result.config.to_dict())
    for name in keep_dense:
        manifest.modules.pop(name, None)
    out = tmp / f"{family}-g{group_size}"
    save(model, None, out, manifest)
    return out


def _reference_logprobs(path: Path, ids: list[int]) -> torch.Tensor:
    model, _ = svdzip.load(path, with_tokenizer=False)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    return torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def _vllm_logprobs(llm, ids: list[int]) -> torch.Tensor:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    out = llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    return torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:], strict=True)],
                        dtype=torch.float64)


def _llm(path: Path, **kw):
    from vllm import LLM

    return LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=256, skip_tokenizer_init=True,
               enable_prefix_caching=False, **kw)


def _weight_values(model) -> tuple[int, int]:
    held = dense = 0
    for m in model.modules():
        layout = getattr(m, "svdzip_layout", None)
        if layout is not None:
            held += layout.weight_elements()
            dense += layout.dense_elements()
    return held, dense


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(autouse=True)
def _vllm_env(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@pytest.mark.parametrize("family,group_size", [("llama", 1), ("llama", 2), ("mistral", 1), ("qwen2", 1),
                                               ("qwen3", 1), ("gemma3", 1)])
def test_served_logprobs_equal_transformers(tmp, family, group_size):
    # shared bases must stay low-rank in every member, so with sharing only an unshared role is kept dense
    path = _make(tmp, family, group_size, KEEP_DENSE if group_size == 1 else ("model.layers.0.mlp.down_proj",))
    _assert_served_like_transformers(path)


def _assert_served_like_transformers(path: Path) -> None:
    """vLLM's prompt log-probabilities equal transformers' on the same directory, with fewer weight values held."""
    ids = torch.randint(3, VOCAB, (48,), generator=torch.Generator().manual_seed(2)).tolist()
    ref = _reference_logprobs(path, ids)
    llm = _llm(path)
    try:
        got = _vllm_logprobs(llm, ids)
        held, dense = llm.apply_model(_weight_values)[0]
    finally:
        del llm
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert 0 < held < dense  # factors or kept rows only: fewer values than the dense layers they replace


def _expect_refusal(path: Path, match: str, **kw) -> None:
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in path.iterdir()}
    with pytest.raises(svdzip.SvdzipError, match=match):  # raised in-process, before any engine starts
        _llm(path, **kw)
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in path.iterdir()}
    assert after == before  # nothing lost, nothing written


def _edit_manifest(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_bad_directories_are_refused_clearly(tmp):
    good = tmp / "llama-g1" if (tmp / "llama-g1").exists() else _make(tmp, "llama")

    def unknown_module(cfg):
        cfg["quantization_config"]["modules"]["model.layers.9.mlp.down_proj"] = {"in": 192, "out": 128, "rank": 4}

    def newer_format(cfg):
        cfg["quantization_config"]["format"] = 2
        cfg["quantization_config"]["svdzip_version"] = "9.9.9"

    def other_arch(cfg):
        cfg["architectures"] = ["Phi3ForCausalLM"]  # fuses q/k/v in the checkpoint itself

    def other_family(cfg):
        cfg["architectures"], cfg["model_type"] = ["Phi3ForCausalLM"], "phi3"

    _expect_refusal(_edit_manifest(good, tmp / "unknown", unknown_module),
                    "names modules this model does not have: model.layers.9.mlp.down_proj")
    _expect_refusal(_edit_manifest(good, tmp / "newer", newer_format),
                    "written by svdzip 9.9.9 with manifest format 2.*upgrade svdzip")
    _expect_refusal(_edit_manifest(good, tmp / "arch", other_arch),
                    "serves model_type 'llama' as LlamaForCausalLM, not architecture Phi3ForCausalLM")
    _expect_refusal(_edit_manifest(good, tmp / "family", other_family),
                    r"no serving entry for model_type 'phi3' \(architecture Phi3ForCausalLM\): add `serving=...` "
                    "to its FamilySpec in svdzip/models/families.py")


def test_checkpoint_missing_a_factor_fails_at_load_instead_of_serving_garbage(tmp):
    from safetensors.torch import load_file, save_file

    good = tmp / "llama-g1" if (tmp / "llama-g1").exists() else _make(tmp, "llama")
    broken = tmp / "missing"
    shutil.copytree(good, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.left.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    _expect_refusal(broken, "lacks tensors the manifest promises: model.layers.1.self_attn.k_proj \\(left\\)")


@pytest.mark.parametrize("family,group_size", [("llama", 1), ("llama", 2), ("qwen2", 1)])
def test_tensor_parallel_two_ranks_equal_transformers(tmp, family, group_size, monkeypatch):
    """TP = 2 on the two CPU cores: q split by heads, the single KV head replicated, o/down split by input."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    keep = KEEP_DENSE if group_size == 1 else ("model.layers.0.mlp.down_proj",)
    path = tmp / f"{family}-g{group_size}"
    if not path.exists():
        path = _make(tmp, family, group_size, keep)
    ids = torch.randint(3, VOCAB, (48,), generator=torch.Generator().manual_seed(2)).tolist()
    ref = _reference_logprobs(path, ids)
    llm = _llm(path, tensor_parallel_size=2, distributed_executor_backend="mp")
    try:
        got = _vllm_logprobs(llm, ids)
        per_rank = llm.apply_model(_weight_values)
    finally:
        del llm
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert len(per_rank) == 2 and all(0 < held < dense for held, dense in per_rank)


def _make_slimmed(tmp: Path, family: str, method: str) -> Path:
    """MoDeGPT or the hybrid on a tiny model: slimmed MLPs (first neurons) and attention subsets (index lists)."""
    from tiny_models import tiny_tokenizer

    model = tiny_model(family, shape=VLLM)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.5)
    tokens = torch.randint(3, VOCAB, (16, 32), generator=torch.Generator().manual_seed(1))
    out = tmp / f"{family}-{method}"
    allocator = "uniform" if method == "modegpt" else "loss-aware"  # uniform slims every module
    compress(model, Recipe.plain(method=method, allocator=allocator, ratio=0.3, calib_samples=16, calib_seq_len=32),
             calib_tokens=tokens, out=out, tokenizer=tiny_tokenizer())
    return out


@pytest.mark.parametrize("family,method", [("qwen2", "modegpt"), ("llama", "hybrid"), ("gemma3", "modegpt")])
def test_slimmed_models_served_equal_transformers(tmp, family, method):
    path = _make_slimmed(tmp, family, method)
    manifest = json.loads((path / "config.json").read_text())["quantization_config"]
    kinds = {spec["kind"] for spec in manifest["slimmed"].values()}
    if method == "hybrid":  # slimmed MLPs beside factorised attention
        assert kinds == {"linear"} and manifest["modules"]
    else:  # every kind: MLPs (first neurons), q/k/v rows and o columns at stored index lists; Gemma 3 keeps q/k
        assert kinds == ({"linear", "rows", "cols"})
    _assert_served_like_transformers(path)


def test_slimmed_models_refuse_tensor_parallelism(tmp, monkeypatch, capfd):
    """Refused in each worker as it builds its first slimmed layer, before any weight is read (the engine's
    main process is not told the parallel sizes when it checks the manifest)."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    path = tmp / "qwen2-modegpt" if (tmp / "qwen2-modegpt").exists() else _make_slimmed(tmp, "qwen2", "modegpt")
    with pytest.raises(Exception):  # noqa: B017 - vLLM wraps the workers' errors in its own
        _llm(path, tensor_parallel_size=2, distributed_executor_backend="mp")
    logs = capfd.readouterr()
    assert "serves slimmed modules without tensor parallelism; serve with --tensor-parallel-size 1" in (
        logs.out + logs.err)
