"""Review findings of issue 18, each with a test that fails when the behaviour it names breaks."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import tiny_model, tiny_tokens


@pytest.fixture(scope="module")
def llama_units():
    from svdzip.methods.decompose import decompose, group_linears
    from svdzip.models.adapter import ModelAdapter
    from svdzip.passes.calibrate import collect_statistics

    model = tiny_model("llama")
    stats = collect_statistics(model, tiny_tokens(), 4, "cpu")
    adapter = ModelAdapter(model)
    return decompose(adapter, stats, "svdllm", group_linears(adapter))


# 1. SVD-LLM V2: a matrix that loses nothing at the uniform rank


def test_v2_ratios_with_a_lossless_matrix_are_finite():
    from svdzip.allocate.svdllm_v2 import v2_ratios

    r = v2_ratios([0.0, 50.0, 500.0, 5000.0], 0.3)
    assert all(math.isfinite(x) for x in r)
    assert r[0] == pytest.approx(0.3)  # loses nothing at the uniform rank: keeps R
    assert sum(r[1:]) / 3 == pytest.approx(0.3) and r[1] > r[2] > r[3]
    assert v2_ratios([0.0, 0.0], 0.4) == [0.4, 0.4]


def test_v2_allocates_within_budget_when_a_matrix_has_rank_below_the_uniform_rank(llama_units):
    from svdzip.allocate import AllocationContext, allocate, spent
    from svdzip.budget import DENSE, keep_budget, uniform_rank

    units = list(llama_units)
    i = next(j for j, u in enumerate(units) if u.role == units[0].role and j > 0)
    low = units[i]
    k = max(1, uniform_rank(low.rows, low.cols, 0.4))
    sigma2 = low.spectrum.sigma2.clone()
    sigma2[1:] = 0.0  # rank 1: nothing lost at the uniform rank
    assert k > 1 and low.spectrum.tail(k) > 0
    units[i] = dataclasses.replace(low, spectrum=dataclasses.replace(low.spectrum, sigma2=sigma2))
    budget = keep_budget(sum(u.dense_params for u in units), 0.4)
    ranks = allocate("svdllm-v2", units, AllocationContext(ratio=0.4, budget=budget, options={})).ranks
    assert spent(units, ranks) <= budget
    assert all(r is DENSE or 1 <= r <= u.max_rank for u, r in zip(units, ranks, strict=True))
    assert ranks[i] == 1  # its own rank loses nothing; the rest of the budget goes to the others


# 2. heal resume: CUDA's RNG states are checkpointed and restored


def _train_linear(checkpoint, device, steps):
    from svdzip.recover.trainer import train

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    params = dict(layer.named_parameters())
    return train(layer, params, lambda idx: ((layer(x[idx]) - y[idx]) ** 2).mean(),
                 lambda: float(((layer(x) - y) ** 2).mean()), n_windows=8, steps=steps, lr=1e-2, warmup=0.0,
                 batch_size=2, grad_accum=1, eval_every=2, patience=10, seed=0, device=device,
                 checkpoint=checkpoint)


def test_a_cuda_heal_checkpoints_and_restores_every_cuda_rng_state(tmp_path, monkeypatch):
    from svdzip.recover import trainer

    states = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    restored: list[list[torch.Tensor]] = []
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda new: restored.append(list(new)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ck = trainer.Checkpoint(tmp_path, {"run": 1})
    _train_linear(ck, "cuda", 4)
    _, tensors = ck.load()
    assert torch.equal(tensors["rng.cuda.0"], states[0]) and torch.equal(tensors["rng.cuda.1"], states[1])
    assert not restored
    assert _train_linear(ck, "cuda", 6).resumed_at == 4
    assert len(restored) == 1 and all(torch.equal(a, b) for a, b in zip(restored[0], states, strict=True))


def test_a_cpu_heal_checkpoint_holds_no_cuda_state(tmp_path, monkeypatch):
    from svdzip.recover.trainer import Checkpoint

    def no_cuda(*_a, **_k):
        raise AssertionError("a CPU run touched CUDA's RNG")

    monkeypatch.setattr(torch.cuda, "get_rng_state_all", no_cuda)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", no_cuda)
    ck = Checkpoint(tmp_path, {"run": 1})
    _train_linear(ck, "cpu", 4)
    assert not [k for k in ck.load()[1] if k.startswith("rng.cuda")] and "rng.cpu" in ck.load()[1]
    assert _train_linear(ck, "cpu", 6).resumed_at == 4


# 3. a reloaded quantized linear without bias goes where its neighbours are


@pytest.mark.parametrize("bias", [False, True])
def test_a_reloaded_quantized_linear_is_placed_on_its_modules_device(tmp_path, bias):
    from svdzip.output.quantize import load_quantized, quantize_linears, save_quantized, swap_in_slots

    torch.manual_seed(0)
    saved = torch.nn.Sequential(torch.nn.Linear(16, 8, bias=bias), torch.nn.LayerNorm(8))
    quantize_linears(saved, ["0"], "int8")
    save_quantized(saved, ["0"], tmp_path / "q.safetensors")
    # "meta" stands for an accelerator here: what matters is that it is not the CPU
    model = torch.nn.Sequential(torch.nn.Linear(16, 8, bias=bias, device="meta"), torch.nn.LayerNorm(8, device="meta"))
    swap_in_slots(model, ["0"])
    assert load_quantized(model, tmp_path / "q.safetensors") == ["0"]
    assert model[0].weight.device.type == "meta"
    assert not model[0].weight.requires_grad


# 4. the byte search treats only an infeasible budget as "too deep"


def _byte_search(units, name, options, budget_share):
    from svdzip.allocate import AllocationContext
    from svdzip.allocate.memory import allocate_params_first, price, pricing_for

    priced = price(units, pricing_for(torch.float32, None))
    dense = sum(u.dense_params for u in units) * 4
    ctx = AllocationContext(ratio=0.5, budget=0, options=options)
    return priced, allocate_params_first(name, units, priced, ctx, int(budget_share * dense))


def test_the_byte_search_passes_through_infeasible_ratios(llama_units):
    from svdzip.allocate import AllocationContext, allocate, spent
    from svdzip.errors import InfeasibleBudget

    for name in ("uniform", "drank", "svdllm-v2"):  # the condition the search treats as "too deep"
        with pytest.raises(InfeasibleBudget):
            allocate(name, llama_units, AllocationContext(ratio=0.999, budget=10, options={}))
    priced, (allocation, ratio) = _byte_search(llama_units, "uniform", {}, 0.1)
    assert ratio > 0.85 and spent(priced, allocation.ranks) <= int(0.1 * sum(u.dense_params for u in llama_units) * 4)


def test_the_byte_search_lets_other_errors_through(llama_units):
    from svdzip.errors import SvdzipError

    with pytest.raises(SvdzipError, match="needs the model"):  # not "found no parameter ratio"
        _byte_search(llama_units, "loss-aware", {"signal": "fisher"}, 0.5)


# 5. run state: only corruption is "recompute", and only the writer removes the file


def _corrupt_unit(tmp_path):
    from svdzip.core.resume import RunState

    writer = RunState(tmp_path, {"model": "m"}, writer=True)
    writer.save_unit(3, "q", torch.ones(4), torch.ones(2, 2), 0.5)
    path = writer.unit_path(3)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    return writer, RunState(tmp_path, {"model": "m"}, writer=False), path


def test_only_the_writer_removes_a_corrupted_state_file(tmp_path):
    writer, reader, path = _corrupt_unit(tmp_path)
    assert reader.load_unit(3, "q") is None  # recompute it...
    assert path.is_file() and path.with_name(path.name + ".json").is_file()  # ...but leave it to rank 0
    assert writer.load_unit(3, "q") is None
    assert not path.exists() and not path.with_name(path.name + ".json").exists()


def test_an_error_that_is_not_corruption_propagates_and_keeps_the_file(tmp_path, monkeypatch):
    from svdzip.core import resume

    writer = resume.RunState(tmp_path, {"model": "m"}, writer=True)
    writer.save_unit(3, "q", torch.ones(4), torch.ones(2, 2), 0.5)
    assert writer.load_unit(3, "q")[2] == 0.5

    def fails(*_a, **_k):
        raise MemoryError("out of memory")

    monkeypatch.setattr(resume, "load_file", fails)
    with pytest.raises(MemoryError):
        writer.load_unit(3, "q")
    assert writer.unit_path(3).is_file()


# 6. heal and seq-LoRA train only what they mean to, and give requires_grad back as it was


def _student(seed=0):
    from svdzip.allocate import AllocationContext, allocate
    from svdzip.budget import keep_budget
    from svdzip.methods.decompose import decompose, group_linears
    from svdzip.methods.materialise import materialise
    from svdzip.models.adapter import ModelAdapter
    from svdzip.passes.calibrate import collect_statistics

    model = tiny_model("llama", seed=seed)
    stats = collect_statistics(model, tiny_tokens(), 4, "cpu")
    adapter = ModelAdapter(model)
    units = decompose(adapter, stats, "svdllm", group_linears(adapter))
    budget = keep_budget(sum(u.dense_params for u in units), 0.5)
    materialise(adapter, units, allocate("uniform", units, AllocationContext(ratio=0.5, budget=budget)).ranks)
    return model


@pytest.mark.parametrize("method", ["distill", "seq-lora"])
def test_heal_trains_only_its_parameters_and_restores_requires_grad(monkeypatch, method):
    import importlib

    from svdzip.recover.config import HealConfig
    from svdzip.recover.seq_lora import factor_targets

    heal_mod = importlib.import_module("svdzip.recover.heal")
    teacher, student = tiny_model("llama"), _student()
    student.model.embed_tokens.weight.requires_grad_(False)  # the caller's choice, to be given back
    before = {n: p.requires_grad for n, p in student.named_parameters()}
    trainable: list[set[str]] = []
    real_loss = heal_mod.Objective.loss

    def watched(self, model, split, indices):
        if split == "train":
            trainable.append({n for n, p in model.named_parameters() if p.requires_grad})
        return real_loss(self, model, split, indices)

    monkeypatch.setattr(heal_mod.Objective, "loss", watched)
    windows = tiny_tokens(4, 16, seed=5)
    cfg = HealConfig(method=method, steps=2, batch_size=2, grad_accum=1, eval_every=2, patience=10, warmup=0.0,
                     lr=1e-3, seq_len=16, topk=8)
    heal_mod.heal(student, teacher, (windows, windows[:2]), cfg)
    assert trainable
    factors = {f"{n}.weight" for side in ("left", "right") for n in factor_targets(student, side)}
    for names in trainable:
        if method == "distill":
            assert names == factors
        else:
            assert names and all("lora_" in n for n in names)
    assert {n: p.requires_grad for n, p in student.named_parameters()} == before


# 7. lm-eval: HF_DATASETS_OFFLINE for the evaluation only


def test_datasets_offline_is_set_for_the_block_only(monkeypatch):
    import os

    from svdzip.evaluate.lm_eval_bridge import datasets_offline

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with datasets_offline():
        assert os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert "HF_DATASETS_OFFLINE" not in os.environ
    with pytest.raises(KeyError), datasets_offline():
        raise KeyError("the evaluation failed")
    assert "HF_DATASETS_OFFLINE" not in os.environ
    with datasets_offline(enabled=False):
        assert "HF_DATASETS_OFFLINE" not in os.environ
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")  # the user's own choice is kept, and left as it was
    with datasets_offline():
        assert os.environ["HF_DATASETS_OFFLINE"] == "0"
    assert os.environ["HF_DATASETS_OFFLINE"] == "0"


def test_run_lm_eval_leaves_the_environment_as_it_found_it(monkeypatch, tmp_path):
    import os
    import sys
    import types

    from svdzip.evaluate import lm_eval_bridge

    seen = []
    fake = types.ModuleType("lm_eval")
    fake.simple_evaluate = lambda **kw: seen.append(os.environ.get("HF_DATASETS_OFFLINE")) or {"results": {}}
    tasks = types.ModuleType("lm_eval.tasks")
    tasks.TaskManager = lambda include_path=None: None
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", tasks)
    monkeypatch.setattr(lm_eval_bridge, "require_lm_eval", lambda: fake)
    monkeypatch.setattr(lm_eval_bridge, "write_local_task_configs", lambda *a, **k: None)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    task = sorted(lm_eval_bridge.ZERO_SHOT_TASKS)[0]
    lm_eval_bridge.run_lm_eval(str(tmp_path), [task], raw=True)
    assert seen == ["1"] and "HF_DATASETS_OFFLINE" not in os.environ


# 8. the layer walk offloads each batch's masks and position embeddings once, not once per layer


def _kwarg_tensors(kw):
    return [t for v in kw.values() for t in (v if isinstance(v, tuple | list) else [v]) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_layer_kwargs_are_offloaded_once_per_batch_not_per_layer(monkeypatch, family):
    from svdzip.core import layerwise
    from svdzip.models.adapter import ModelAdapter

    model, tokens = tiny_model(family), tiny_tokens(4, 12)
    adapter = ModelAdapter(model)
    same = layerwise.capture_layer_inputs(model, adapter, tokens, 2, "cpu")  # no offload: the tensors as given
    distinct = [len({id(t) for layer in same.kwargs for t in _kwarg_tensors(layer[b])}) for b in range(2)]
    given = [sum(len(_kwarg_tensors(layer[b])) for layer in same.kwargs) for b in range(2)]
    assert all(0 < d < g for d, g in zip(distinct, given, strict=True))  # the layers share most of them
    copies = []
    real_to = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if out.device.type == "meta" and self.device.type != "meta":
            copies.append(out)
        return out

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    # "meta" stands for the CPU offload of a GPU run: any device other than the compute one
    inputs = layerwise.capture_layer_inputs(model, adapter, tokens, 2, "cpu", offload="meta")
    monkeypatch.undo()
    assert len(copies) == sum(distinct) + 2  # each distinct tensor once per batch, plus the hidden states
    for b in range(2):
        assert len({id(t) for layer in inputs.kwargs for t in _kwarg_tensors(layer[b])}) == distinct[b]


# 9. a manifest whose ranks disagree with the stored factors: one line naming the module


def _saved_student(path):
    import json

    from svdzip.output.io import build_manifest, save
    from svdzip.recover.seq_lora import low_rank_modules

    model = _student()
    rows = [dataclasses.make_dataclass("Row", ["name", "in_features", "out_features", "rank", "role", "shared_with"])(
        n, m.right.in_features, m.left.out_features, m.left.in_features, n.rsplit(".", 1)[1], None)
        for n, m in low_rank_modules(model).items()]
    save(model, None, path, build_manifest(rows, {}, {}))
    return json.loads((path / "config.json").read_text())


def test_a_manifest_rank_that_disagrees_with_the_stored_factors_is_one_clear_error(tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    from svdzip.errors import SvdzipError
    from svdzip.output.io import load

    cfg = _saved_student(tmp_path / "m")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m") is not None  # as saved, it loads
    name, spec = sorted(cfg["quantization_config"]["modules"].items())[2]
    stored = spec["rank"]
    spec["rank"] = stored + 1
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    for reload in (lambda: load(tmp_path / "m", with_tokenizer=False),
                   lambda: AutoModelForCausalLM.from_pretrained(tmp_path / "m")):
        with pytest.raises(SvdzipError) as info:
            reload()
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"{name}:")
        assert f"rank {stored + 1}" in message and f"[{spec['out']}, {stored}]" in message
