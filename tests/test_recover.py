"""Recovery: the losses against brute force, the training loop, sequential LoRA with peft, distillation."""

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model, tiny_tokens

from svdzip import Recipe, SvdzipError, compress
from svdzip.recover.config import HealConfig
from svdzip.recover.heal import heal, trainable_factors
from svdzip.recover.losses import kl_full, kl_topk, next_token_ce, topk_of
from svdzip.recover.seq_lora import factor_targets, lora_on, low_rank_modules
from svdzip.recover.trainer import Checkpoint, batch_order, lr_at


def _pair(family="llama", ratio=0.5, group_size=1):
    teacher = tiny_model(family)
    with torch.no_grad():  # a random tiny model predicts nearly uniformly: sharpen it so truncation hurts
        for _, p in teacher.named_parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    student = copy.deepcopy(teacher)
    compress(student, Recipe.plain(ratio=ratio, group_size=group_size, calib_batch_size=4),
             calib_tokens=tiny_tokens(8, 24))
    return teacher, student


def _windows(n_train=8, n_held=4, seq=16):
    """Random tokens have nothing to generalise: the 'held-out' windows are training ones here."""
    train = tiny_tokens(n_train, seq, seed=5)
    return train, train[:n_held]


def _cfg(**kw):
    base = dict(method="distill", steps=6, batch_size=2, grad_accum=1, eval_every=2, patience=10, warmup=0.0,
                lr=3e-3, seq_len=16, precision="float32")  # the same numbers on every CPU ("auto" follows the CPU)
    return HealConfig(**{**base, **kw})


# ------------------------------------------------------------------ losses and schedule


def test_topk_kl_with_the_whole_vocabulary_is_the_full_kl():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 11, generator=g), torch.randn(3, 5, 11, generator=g)
    brute = sum(F.kl_div(F.log_softmax(s[i, j], -1), F.log_softmax(t[i, j], -1), log_target=True,
                         reduction="sum") for i in range(3) for j in range(5)) / 15
    assert torch.allclose(kl_full(s, t), brute, atol=1e-6)
    assert torch.allclose(kl_topk(s, topk_of(t, 11)), brute, atol=1e-5)
    for T in (0.5, 2.0):
        assert torch.allclose(kl_topk(s, topk_of(t, 11, T), T), kl_full(s, t, T), atol=1e-5)


def test_topk_kl_is_a_lower_bound_and_zero_at_the_teacher():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 7, 50, generator=g), torch.randn(4, 7, 50, generator=g) * 3
    full = kl_full(s, t)
    kls = [float(kl_topk(s, topk_of(t, k))) for k in (1, 5, 20, 50)]
    assert all(k <= float(full) + 1e-5 for k in kls)
    assert kls[-1] == pytest.approx(float(full), abs=1e-5)
    assert float(kl_topk(t, topk_of(t, 5))) == pytest.approx(0.0, abs=1e-5)


def test_next_token_ce_predicts_the_following_token():
    ids = torch.tensor([[1, 2, 3]])
    logits = torch.full((1, 3, 4), -30.0)
    logits[0, 0, 2] = logits[0, 1, 3] = 30.0  # right on both predicted positions; the last is ignored
    assert float(next_token_ce(logits, ids)) < 1e-6
    logits[0, 1, 3], logits[0, 1, 0] = -30.0, 30.0  # now confidently wrong on the second
    assert float(next_token_ce(logits, ids)) > 10


def test_schedule_warms_up_then_decays_to_zero():
    lrs = [lr_at(s, 10, 1.0, 0.2) for s in range(10)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0) and lrs[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False)) and lrs[-1] < 0.05


def test_a_back_off_warms_up_again_from_where_it_restarts():
    assert [lr_at(s, 10, 1.0, 0.2, restart=0) for s in range(10)] == [lr_at(s, 10, 1.0, 0.2) for s in range(10)]
    assert lr_at(6, 10, 1.0, 0.2, restart=6) == pytest.approx(0.5 * lr_at(6, 10, 1.0, 0.2))
    assert lr_at(7, 10, 1.0, 0.2, restart=6) == pytest.approx(lr_at(7, 10, 1.0, 0.2))


def test_the_learning_rate_is_searched_unless_one_is_given():
    distill = HealConfig(method="distill")
    assert distill.auto_lr and (distill.lr, distill.lr_per_rms) == (None, 2.57e-3)  # from the weights' scale
    assert HealConfig(lr="auto").auto_lr and HealConfig(method="seq-lora").lr == 1e-4
    assert not HealConfig(lr=1e-4).auto_lr and HealConfig(lr=1e-4).lr == 1e-4
    assert HealConfig().lr is None and HealConfig().steps is None  # options for whichever recovery a recipe names
    assert HealConfig(lr=1e-3, auto_lr=True).auto_lr  # a given start for the search
    assert HealConfig(method="distill", lr=1e-3).lr_per_rms is None  # a given rate is where training starts


def test_the_learning_rate_starts_from_the_median_rms_of_the_trained_weights():
    """AdamW moves each weight by about lr a step: weights ten times smaller need a rate ten times smaller."""
    weights = [torch.full((3, 4), 0.1), -torch.full((5, 2), 0.4), torch.tensor([[0.2, -0.2], [0.2, -0.2]]),
               torch.full((2, 2), 3.0), torch.full((1, 7), 0.05), torch.empty(0, 4)]  # the empty one has no RMS
    cfg = HealConfig(method="distill")
    assert cfg.start_lr(weights) == pytest.approx(2.57e-3 * 0.2)  # RMS 0.05, 0.1, 0.2, 0.4, 3.0
    assert cfg.start_lr([w / 10 for w in weights]) == pytest.approx(cfg.start_lr(weights) / 10)
    assert HealConfig(method="distill", lr=0.05).start_lr(weights) == 0.05
    assert HealConfig(method="seq-lora").start_lr(weights) == 1e-4  # adapters start at zero: a fixed rate
    for nothing in ([torch.empty(0)], [torch.zeros(3, 3)]):
        with pytest.raises(SvdzipError, match="give --heal-lr"):
            cfg.start_lr(nothing)


def test_batch_order_visits_every_window_once_per_epoch():
    order = batch_order(6, 2, 6, seed=3)
    assert order.shape == (6, 2)
    assert sorted(order[:3].flatten().tolist()) == list(range(6))
    assert sorted(order[3:].flatten().tolist()) == list(range(6))
    assert torch.equal(order, batch_order(6, 2, 6, seed=3)) and not torch.equal(order, batch_order(6, 2, 6, 4))


def test_bad_options_are_refused():
    for bad, message in ((dict(steps=0), "heal steps must be ≥ 1"), (dict(method="lora"), "unknown recovery 'lora'"),
                         (dict(lr=-1.0), "learning rate must be > 0"), (dict(topk=-1), "top-k must be ≥ 0"),
                         (dict(lr_per_rms=0.0), "per weight RMS \\(lr_per_rms\\) must be > 0, got 0.0"),
                         (dict(warmup=1.0), "warm-up is a fraction"),
                         (dict(objective="l1"), "objective 'l1'"), (dict(objective="mse"), "cannot use 'mse'"),
                         (dict(method="seq-lora", steps=1), "at least 2 steps"),
                         (dict(temperature=0.0), "temperature must be > 0"),
                         (dict(lr_backoff=1.0), "back-off must be > 1"), (dict(max_backoffs=-1), "count ≥ 0")):
        with pytest.raises(SvdzipError, match=message):
            HealConfig(**{"method": "distill", **bad}).validate()


# ------------------------------------------------------------------ sequential LoRA (peft)


@pytest.mark.parametrize("group_size", [1, 2])
def test_merged_lora_equals_the_unmerged_forward(group_size):
    _, student = _pair(group_size=group_size)
    tokens = tiny_tokens(2, 12)
    for side in ("left", "right"):
        with torch.no_grad():
            before = student(tokens).logits
        factors = {n: p.clone() for n, p in student.named_parameters() if n.endswith((".left.weight", ".right.weight"))}
        with lora_on(student, side, r=4, alpha=8, dropout=0.0) as peft_model:
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.05)
            with torch.no_grad():
                unmerged = peft_model(tokens).logits
        with torch.no_grad():
            merged = student(tokens).logits
        assert torch.allclose(unmerged, merged, atol=1e-5)
        assert not any("lora" in n for n, _ in student.named_parameters())
        # the merge changed the model: exactly the adapted side's factors, and the logits with them
        changed = {n for n, p in student.named_parameters() if n in factors and not torch.equal(p, factors[n])}
        assert changed == {n for n in factors if n.endswith(f".{side}.weight")}, side
        assert (merged - before).abs().max() > 1e-3


def test_shared_basis_linears_use_the_adapted_basis():
    _, student = _pair(group_size=2)
    with lora_on(student, "right", r=2, alpha=4, dropout=0.0):
        mods = low_rank_modules(student)
        shared = [m for m in mods.values() if getattr(m, "_tied_weights_keys", None)]
        assert shared
        for m in shared:
            leader = m._tied_weights_keys["right.weight"].rsplit(".", 2)[0]
            assert m.right is mods[leader].right and "lora" in type(m.right).__module__


@pytest.mark.parametrize("side,other", [("left", "right"), ("right", "left")])
def test_sequential_lora_trains_only_its_side(side, other):
    _, student = _pair()
    tokens = tiny_tokens(2, 12)
    with lora_on(student, side, r=4, alpha=8, dropout=0.0) as peft_model:
        next_token_ce(peft_model(tokens).logits, tokens).backward()
        for name in factor_targets(student, side):
            module = student.get_submodule(name)
            assert module.lora_A["default"].weight.grad is not None
            assert module.base_layer.weight.grad is None
        for name in factor_targets(student, other):
            assert student.get_submodule(name).weight.grad is None


# ------------------------------------------------------------------ distillation and the loop


@pytest.mark.parametrize("topk", [0, 8])
def test_a_few_distillation_steps_lower_the_kl(topk):
    teacher, student = _pair()
    windows = _windows()
    report = heal(student, teacher, windows, _cfg(topk=topk))
    phase = report.phases[0]
    assert phase["best_heldout"] < 0.92 * phase["initial_heldout"]
    with torch.no_grad():
        after = kl_full(student(windows[1]).logits, teacher(windows[1]).logits)
        before = kl_full(_pair()[1](windows[1]).logits, teacher(windows[1]).logits)
    assert after < before


@pytest.mark.parametrize(("precision", "cpu_bf16", "expected"), [
    ("float32", True, torch.float32), ("bfloat16", False, torch.bfloat16),
    ("auto", True, torch.bfloat16), ("auto", False, torch.float32)])
def test_the_training_matmuls_run_in_the_precision_asked_and_auto_follows_the_cpu(monkeypatch, precision, cpu_bf16,
                                                                                   expected):
    """Student and teacher multiply in the resolved dtype; the factors and their optimiser stay float32."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: cpu_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    teacher, student = _pair()
    seen: dict[str, set[torch.dtype]] = {"student": set(), "teacher": set()}
    for role, model in (("student", student), ("teacher", teacher)):
        head = model.get_output_embeddings()
        head.register_forward_hook(lambda _m, _a, out, role=role: seen[role].add(out.dtype))
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if n not in trainable_factors(student)}
    report = heal(student, teacher, _windows(), _cfg(precision=precision, topk=8))
    assert seen == {"student": {expected}, "teacher": {expected}}
    assert report.precision == str(expected).removeprefix("torch.") and report.brief()["precision"] == report.precision
    assert report.phases[0]["best_heldout"] < report.phases[0]["initial_heldout"]  # bf16 trains too
    assert all(p.dtype == torch.float32 for p in student.parameters())
    # the frozen weights, held in bf16 during training, are the same float32 tensors afterwards
    assert all(torch.equal(p, frozen[n]) for n, p in student.named_parameters() if n in frozen)
    # the teacher is used up: a bf16 heal left its frozen linears in bf16, a float32 one as they were
    assert teacher.model.layers[0].mlp.up_proj.weight.dtype == expected


def test_a_named_precision_is_kept_and_an_unknown_one_is_refused():
    """(`auto` on CUDA follows the card's compute capability: `test_precision`.)"""
    from svdzip.core.precision import compute_dtype

    assert compute_dtype("cuda", "float32") == torch.float32 and compute_dtype("cpu", "bfloat16") == torch.bfloat16
    with pytest.raises(SvdzipError, match="unknown heal precision 'fp16'"):
        HealConfig(method="distill", precision="fp16").validate()


def test_the_teacher_runs_before_training_only_and_is_then_freed(monkeypatch):
    """With top-k distillation the teacher's outputs are cached for exactly the windows training reads; then the
    teacher is let go (checked during training), so a heal holds one model while it trains."""
    import gc
    import importlib
    import weakref

    heal_mod = importlib.import_module("svdzip.recover.heal")  # the package re-exports a function of that name

    teacher, student = _pair()
    seen: list[int] = []
    teacher.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["input_ids"].shape[0]), with_kwargs=True)
    alive = weakref.ref(teacher)
    alive_at_training_steps: list[bool] = []
    real_loss = heal_mod.Objective.loss

    def watched(self, student_, split, indices):
        if split == "train":
            gc.collect()
            alive_at_training_steps.append(alive() is not None)
        return real_loss(self, student_, split, indices)

    monkeypatch.setattr(heal_mod.Objective, "loss", watched)
    windows, cfg = _windows(n_train=32), _cfg(topk=8)
    holder = [teacher]
    del teacher
    report = heal(student, holder.pop(), windows, cfg)  # handed over: no name outside heal() keeps it
    assert alive_at_training_steps and not any(alive_at_training_steps)
    used = set(batch_order(32, cfg.batch_size, cfg.steps, cfg.seed).flatten().tolist())
    assert len(used) < 32 and sum(seen) == len(used) + len(windows[1])  # each read once, no unused one
    assert report.phases[0]["steps_done"] == cfg.steps  # the training ran on the cache alone


def test_the_ce_objective_needs_no_teacher():
    from svdzip.recover.heal import load_teacher

    assert load_teacher("no/such-model", HealConfig(method="seq-lora")) is None  # ce: nothing is loaded
    _, student = _pair()
    report = heal(student, None, _windows(), _cfg(method="seq-lora", steps=4))
    assert report.phases and report.phases[0]["initial_heldout"] > 0


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_sequential_lora_lowers_the_heldout_loss_and_keeps_the_ranks(precision):
    """Also in bf16, where the frozen base linears are held in bf16 during each phase: the adapters are merged
    into the float32 weights given back."""
    teacher, student = _pair()
    ranks = {n: m.rank for n, m in low_rank_modules(student).items()}
    windows = _windows()
    with torch.no_grad():
        before = next_token_ce(student(windows[1]).logits, windows[1])  # seq-lora's objective: the text's next token
    report = heal(student, teacher, windows, _cfg(method="seq-lora", lr=1e-2, steps=8, precision=precision))
    with torch.no_grad():  # the merged float32 model, read in float32
        assert next_token_ce(student(windows[1]).logits, windows[1]) < before
    assert [p["phase"] for p in report.phases] == ["seq-lora-1-left", "seq-lora-2-right"]
    assert all(p["best_heldout"] < p["initial_heldout"] for p in report.phases)
    assert {n: m.rank for n, m in low_rank_modules(student).items()} == ranks
    assert not any("lora" in n for n, _ in student.named_parameters())
    assert all(p.dtype == torch.float32 for p in student.parameters())


@pytest.mark.parametrize("method", ["distill", "seq-lora"])
def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, method):
    teacher, reference = _pair()
    cfg = _cfg(method=method, steps=8, lora_dropout=0.1)
    expected = heal(reference, teacher, _windows(), cfg, resume_dir=tmp_path / "a")

    _, student = _pair()
    calls = {"n": 0}
    forward = student.forward

    def dies_at_the_seventh_micro_batch(*args, **kwargs):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 7:  # after a checkpoint (seq-lora: in its second phase)
                raise KeyboardInterrupt
        return forward(*args, **kwargs)

    student.forward = dies_at_the_seventh_micro_batch
    with pytest.raises(KeyboardInterrupt):
        heal(student, teacher, _windows(), cfg, resume_dir=tmp_path / "b")
    assert list((tmp_path / "b").rglob("state.json"))  # a checkpoint was left to resume from
    _, student = _pair()
    report = heal(student, teacher, _windows(), cfg, resume_dir=tmp_path / "b")
    assert report.phases[-1]["resumed_at"] == (6 if method == "distill" else 2)
    assert method == "distill" or "restored" in report.phases[0]
    for (n, a), (_, b) in zip(reference.named_parameters(), student.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    assert report.improved and (report.initial_heldout, report.final_heldout, report.lr) == (
        expected.initial_heldout, expected.final_heldout, expected.lr)


def test_the_default_rate_starts_from_the_scale_of_the_factors_being_trained():
    """Without a given lr, a heal starts at lr_per_rms × the median RMS of the factors it trains: scaling the
    model's factors by 10 scales the start by 10 (the same relative step)."""
    teacher, student = _pair()
    rms = [float(p.detach().pow(2).mean().sqrt()) for n, p in student.named_parameters()
           if n.endswith(("left.weight", "right.weight"))]
    assert rms
    report = heal(student, teacher, _windows(), _cfg(lr=None, steps=2))
    start = report.phases[0]["lr_start"]
    assert start == pytest.approx(2.57e-3 * float(torch.tensor(rms).median()))
    _, scaled = _pair()
    with torch.no_grad():
        for n, p in scaled.named_parameters():
            if n.endswith(("left.weight", "right.weight")):
                p.mul_(10.0)
    assert heal(scaled, teacher, _windows(), _cfg(lr=None, steps=2)).phases[0]["lr_start"] == pytest.approx(10 * start)


def _reported(report):
    return (report.improved, report.initial_heldout, report.final_heldout, report.lr, report.backoffs,
            [p["backoffs"] for p in report.phases])


def test_a_far_too_large_learning_rate_backs_off_to_one_that_heals():
    """At lr 0.3 every check is worse than step 0: a fixed lr keeps the un-healed factors, the search
    rolls back twice (÷10), and heals at 0.003."""
    teacher, fixed = _pair()
    stuck = heal(fixed, teacher, _windows(), _cfg(lr=0.3, steps=12, eval_every=4))
    assert not stuck.improved and stuck.phases[0]["best_step"] == 0 and stuck.backoffs == 0

    _, student = _pair()
    report = heal(student, teacher, _windows(), _cfg(lr=0.3, auto_lr=True, lr_backoff=10.0, steps=12, eval_every=4))
    phase = report.phases[0]
    assert report.lr_auto and report.improved and report.final_heldout < report.initial_heldout
    assert report.initial_heldout == stuck.initial_heldout and report.final_heldout == phase["best_heldout"]
    assert report.backoffs == 2 and report.lr == pytest.approx(0.003) and phase["lr_start"] == 0.3
    # the first check at each rate comes after eval_every / 2 = 2 steps
    assert [(b["step"], b["lr"], b["new_lr"]) for b in phase["backoffs"]] == [(2, 0.3, 0.03), (4, 0.03, 0.003)]
    assert all(b["heldout"] >= b["best"] for b in phase["backoffs"])
    assert [h["lr"] for h in phase["history"]][-1] == pytest.approx(0.003) and phase["best_step"] > 4
    assert report.to_dict()["lr"] == report.lr and report.brief()["heldout_step0"] == report.initial_heldout
    curve = report.brief()["heldout_curve"]  # every held-out check, step 0 first: where the gain flattens
    assert curve[0] == [0, round(report.initial_heldout, 5)] and len(curve) == len(phase["history"])
    assert min(h for _, h in curve) == pytest.approx(report.final_heldout, abs=1e-5)


@pytest.mark.parametrize("method", ["distill", "seq-lora"])
@pytest.mark.parametrize("auto_lr", [True, False])
def test_a_heal_that_cannot_improve_keeps_the_factors_and_claims_nothing(monkeypatch, caplog, method, auto_lr):
    """Training that climbs the loss (every update worsens it): the searched lr runs out of back-offs,
    a fixed one out of patience; either way the model is bit for bit the un-healed one."""
    from svdzip.output.io import build_manifest
    from svdzip.recover.directory import healed_label, record_recovery
    from svdzip.recover.heal import Objective

    loss = Objective.loss
    monkeypatch.setattr(Objective, "loss", lambda self, student, split, idx: (
        -loss(self, student, split, idx) if split == "train" else loss(self, student, split, idx)))
    teacher = tiny_model()
    student = copy.deepcopy(teacher)
    result = compress(student, Recipe.plain(ratio=0.5, calib_batch_size=4), calib_tokens=tiny_tokens(8, 24))
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    cfg = _cfg(method=method, steps=16, eval_every=4, patience=1, lr=3e-3, auto_lr=auto_lr, lora_dropout=0.0)
    report = heal(student, teacher, _windows(), cfg)
    assert not report.improved and report.final_heldout == report.initial_heldout
    assert all(torch.equal(p, before[n]) for n, p in student.named_parameters())
    assert report.backoffs == (3 * len(report.phases) if auto_lr else 0)
    assert "did not lower the held-out" in caplog.text and "not labelled +" + method in caplog.text
    manifest = build_manifest(result.modules, result.summary, result.config.to_dict())
    label = manifest.method
    record_recovery(manifest, report)
    assert manifest.method == label == healed_label(label, report) and "+" + method not in manifest.method
    assert manifest.details["summary"]["method"] == label and manifest.details["summary"]["heal"]["improved"] is False
    assert manifest.details["recovery"][0]["improved"] is False


@pytest.mark.parametrize("kill_at", [5, 8])
def test_resume_after_back_offs_equals_an_uninterrupted_run(tmp_path, kill_at):
    """Killed right after the second back-off (fresh optimiser moments, a restarted warm-up) or later."""
    teacher, reference = _pair()
    cfg = _cfg(lr=0.3, auto_lr=True, lr_backoff=10.0, steps=10, eval_every=4, warmup=0.2)
    expected = heal(reference, teacher, _windows(), cfg, resume_dir=tmp_path / "a")
    assert expected.backoffs == 2 and expected.improved

    _, student = _pair()
    calls = {"n": 0}
    forward = student.forward

    def dies(*args, **kwargs):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == kill_at:
                raise KeyboardInterrupt
        return forward(*args, **kwargs)

    student.forward = dies
    with pytest.raises(KeyboardInterrupt):
        heal(student, teacher, _windows(), cfg, resume_dir=tmp_path / "b")
    _, student = _pair()
    report = heal(student, teacher, _windows(), cfg, resume_dir=tmp_path / "b")
    assert report.phases[0]["resumed_at"] == {5: 4, 8: 6}[kill_at]
    for (n, a), (_, b) in zip(reference.named_parameters(), student.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    assert _reported(report) == _reported(expected)
    assert report.phases[0]["history"] == expected.phases[0]["history"]


def test_a_resume_dir_of_another_configuration_is_refused(tmp_path):
    teacher, student = _pair()
    heal(student, teacher, _windows(), _cfg(steps=2), resume_dir=tmp_path)
    _, student = _pair()
    with pytest.raises(SvdzipError, match="another configuration"):
        heal(student, teacher, _windows(), _cfg(steps=2, lr=1e-3), resume_dir=tmp_path)


def test_nan_loss_stops_and_keeps_the_last_good_factors():
    teacher, student = _pair()
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    forward = student.forward
    calls = {"n": 0}

    def nan_after_three(*args, **kwargs):
        out = forward(*args, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] >= 3:
                out.logits = out.logits * float("nan")
        return out

    student.forward = nan_after_three
    report = heal(student, teacher, _windows(), _cfg(eval_every=2))
    assert report.stopped == "nan" and report.phases[0]["steps_done"] == 2
    assert all(torch.isfinite(p).all() for p in student.parameters())
    changed = any(not torch.equal(p, before[n]) for n, p in student.named_parameters())
    assert changed == (report.phases[0]["best_step"] > 0)


def test_a_dense_model_has_nothing_to_heal():
    with pytest.raises(SvdzipError, match="no factorised"):
        heal(tiny_model(), tiny_model(), _windows(), _cfg())


def test_checkpoint_round_trip(tmp_path):
    ck = Checkpoint(tmp_path, {"a": 1})
    ck.save({"step": 3}, {"x": torch.arange(4.0)})
    state, tensors = ck.load()
    assert state["step"] == 3 and torch.equal(tensors["x"], torch.arange(4.0))
    ck.save({"step": 5}, {"x": torch.ones(2)})
    assert len(list(tmp_path.glob("ckpt-*"))) == 1
    with pytest.raises(SvdzipError, match="another configuration or model"):
        Checkpoint(tmp_path, {"a": 2}).load()


@pytest.mark.parametrize("group_size", [1, 2])
def test_a_healed_directory_reloads_with_identical_logits(tmp_path, group_size):
    from transformers import AutoModelForCausalLM

    from svdzip.output.io import build_manifest, read_manifest, save
    from svdzip.recover.directory import record_recovery

    teacher = tiny_model()
    student = copy.deepcopy(teacher)
    result = compress(student, Recipe.plain(ratio=0.5, group_size=group_size, calib_batch_size=4),
                      calib_tokens=tiny_tokens(8, 24))
    report = heal(student, teacher, _windows(), _cfg(method="seq-lora" if group_size > 1 else "distill"))
    manifest = build_manifest(result.modules, result.summary, result.config.to_dict())
    record_recovery(manifest, report)
    save(student, None, tmp_path / "h", manifest)
    tokens = tiny_tokens(2, 12)
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "h")(tokens).logits
        assert torch.equal(again, student(tokens).logits)
    saved = read_manifest(tmp_path / "h")
    assert saved["method"].endswith("+" + report.method)
    assert saved["details"]["recovery"][0]["phases"][0]["steps_done"] > 0
