"""The recipe: everything that decides what a compressed model is, as one typed, serialisable value.

The factorisation, the allocator, the update, the recovery, the storage (dtype, quantization), the budget
and the calibration, with their options and their defaults — defined here once, read by the Python API,
the command line (its flags and their help) and the sweep alike. Every output directory holds its
`recipe.yaml`, and `svdzip compress --recipe FILE` reruns it exactly. Where a run executes (`device`) is
not part of the recipe file; the precisions it multiplied in are, as they resolved there (a file svdzip wrote
before `calib_precision` existed calibrated in float32), so a rerun elsewhere multiplies the same way.

`allocator` and `heal` default to `auto`: the recommended recipe (SVD-LLM, loss-aware ranks, then distillation)
for a model held in memory; for a streamed, resumable or distributed run, whose point is not holding the whole
model, the same allocator on its layer-local signal and layer-wise healing (benchmarks/streamed_recipes.py).
A method may declare its own `auto` (`FactorisationMethod.recommended`: modegpt means loss-aware over its modules,
no healing; the hybrid takes the recommended allocator and healing). `resolved(mode)` turns `auto` into what
runs, and the recipe file records it. The hybrid is not the default method: better on prose on every model
measured, but on the real code model calibrated on prose it loses twice as much on code, and it needs more
memory (README "MoDeGPT and the hybrid").
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from svdzip.budget import check_ratio
from svdzip.core.precision import PRECISIONS, compute_dtype, dtype_name
from svdzip.errors import SvdzipError
from svdzip.passes.quant_error import DEFAULT_ROUNDING, ROUNDINGS
from svdzip.recover.config import HEAL_METHODS, LAYER_LOCAL, METHOD_DEFAULTS, HealConfig, default_corpus

SHAREABLE_ROLES = ("q", "k", "v", "up", "gate")  # Basis Sharing never shares o and down
AUTO = "auto"
#: what `auto` means for a model in memory (README "Results", benchmarks/recovery.py) and for a streamed,
#: resumable or distributed run
RECOMMENDED = {"allocator": "loss-aware", "allocator_options": {}, "heal": "distill"}
SCALED = {"allocator": "loss-aware", "allocator_options": {"signal": "local"}, "heal": "layerwise"}
#: --quantize values stored packed by HQQ (`output.lowbit`), and the planner that mixes them
LOWBIT = ("int4", "int3", "int2")
PLAN = "plan"
RECIPE_FORMAT = 1
RECIPE_FILE = "recipe.yaml"
#: fields that say where a run executes, not what it makes: left out of the recipe file
RUNTIME_FIELDS = ("device",)


@dataclass
class Recipe:
    # the budget: `ratio` of the decoder linears' parameters removed, or a memory budget instead
    ratio: float = 0.2
    budget_bytes: int | None = None  # weight bytes the whole saved model may take
    budget_fraction: float | None = None  # … as a fraction of the dense model's bfloat16 weight bytes
    # the factorisation
    method: str = "svdllm"  # svd | svdllm | asvd | fwsvd | modegpt | hybrid
    group_size: int = 1  # > 1: Basis Sharing over that many consecutive layers
    share_roles: tuple[str, ...] = SHAREABLE_ROLES
    asvd_alpha: float = 0.5
    asvd_scaling: str = "abs_mean"  # or abs_max
    # the ranks
    allocator: str = AUTO  # a registered allocator, or auto (see the module docstring)
    allocator_options: dict[str, Any] = field(default_factory=dict)
    # the weight update after truncation
    update: str | None = None  # svdllm (closed-form layer-wise) | coef (shared-basis coefficients)
    update_samples: int = 0  # calibration sequences the update refits on (0 = all of them)
    # the recovery after truncation
    heal: str = AUTO  # none | distill | seq-lora | auto
    # its options (its method is `heal`; what is not set here takes that method's defaults)
    healing: HealConfig = field(default_factory=HealConfig)
    # the storage
    storage_dtype: str = AUTO  # dtype of the unquantized weights: auto = bfloat16 for a memory budget, else float32
    # quantization of the stored matrices: int8 (torchao, per row), int4 | int3 | int2 (HQQ, packed, every matrix at
    # that width), plan (the byte planner chooses per matrix among factorised, dense and 8/4/3/2 bits), none, or auto
    # (plan for a memory budget, none for a parameter ratio)
    quantize: str | None = AUTO
    quantize_scope: str = "all"  # int8: all | dense (the dense remainder only) | factors (the factors only)
    compensate: int | str = AUTO  # low-rank correction of each low-bit matrix's error: a rank, or auto (planned)
    # quantize-first (EoRA: pack W, correct its error) | truncate-first (CALDERA, one alternation: pack the residual
    # of W's truncation, refit the correction to what the packing missed)
    compensate_order: str = "quantize-first"
    # how a low-bit matrix's values are rounded onto HQQ's grid: gptq (error feedback on the layer's input Gram:
    # the codes that keep the output error small) | nearest (HQQ alone, each weight to its nearest grid point) |
    # auto (gptq from 3 bits up, nearest at 2: better on some models, passes.quant_error.rounding_at) | choose (gptq,
    # or auto where that plan stores 2-bit matrices and auto's model loses less on held-out calibration windows)
    rounding: str = DEFAULT_ROUNDING
    byte_aware: bool = True  # False: allocate parameters first, then fit the byte budget by the ratio
    # the calibration text
    corpus: str = "wiki"
    calib_samples: int = 64
    calib_seq_len: int = 512
    calib_batch_size: int = 8
    # the matmuls of the calibration and Fisher passes: auto = a bfloat16 autocast where the device multiplies it
    # natively (`core.precision`), else float32; the statistics are summed in float32/float64 either way
    calib_precision: str = "auto"
    heldout_samples: int = 8  # held-out calibration windows, for parts that tune or guard on them
    seed: int = 0
    # where it runs (not written to the recipe file)
    device: str = "cpu"

    @classmethod
    def plain(cls, **overrides: Any) -> Recipe:
        """The papers' protocol (SVD-LLM(W) and the others as published): uniform ranks, no recovery."""
        return cls(**{"allocator": "uniform", "heal": "none", **overrides})

    # ------------------------------------------------------------------ derived

    @property
    def memory_budget(self) -> bool:
        return self.budget_bytes is not None or self.budget_fraction is not None

    def resolved(self, scaled: bool) -> Recipe:
        """`auto` replaced by what runs: the recommended recipe in memory, `SCALED` when `scaled`."""
        from svdzip.methods.factorisations import get_method

        chosen = get_method(self.method).recommended or (SCALED if scaled else RECOMMENDED)
        auto_allocator = self.allocator == AUTO
        heal = chosen["heal"] if self.heal == AUTO else self.heal
        if self.heal == AUTO and heal in LAYER_LOCAL and (self.update or self.group_size > 1):
            heal = "none"  # layer-wise healing trains each layer's own factors, then an update would overwrite them
        quantize = self.quantize if self.quantize != AUTO else (PLAN if self.planner_applies() else None)
        if self.heal == AUTO and quantize in (PLAN, *LOWBIT):
            heal = "none"  # the planner's compensation is closed-form; --heal distill trains it further if asked
        storage = self.storage_dtype if self.storage_dtype != AUTO else (
            "bfloat16" if self.memory_budget else "float32")
        return replace(self, allocator=chosen["allocator"] if auto_allocator else self.allocator,
                       allocator_options=dict(chosen["allocator_options"]) if auto_allocator
                       else self.allocator_options, heal=heal, quantize=quantize, storage_dtype=storage).validate()

    def heal_config(self) -> HealConfig | None:
        """The recovery to run (None for none), trained on `default_corpus` of the calibration corpus unless it names
        its own."""
        if self.heal == AUTO:
            raise SvdzipError("resolve the recipe first (recipe.resolved(...)): heal is still 'auto'")
        if self.heal == "none":
            return None
        base = self.healing
        # what was left to the method (None), or only where a learning-rate search starts, follows this one's
        lr = None if base.auto_lr else base.lr
        objective, steps = base.objective, base.steps
        return replace(base, method=self.heal, lr=lr, objective=objective, steps=steps,
                       auto_lr=True if base.auto_lr else None,
                       corpus=base.corpus or default_corpus(self.corpus), seed=self.seed,
                       device=self.device).validate()

    def for_output(self) -> Recipe:
        """The recipe as it ran, for `recipe.yaml`: `auto` resolved beforehand, the recovery's options resolved,
        the precisions as this device resolved them (a rerun elsewhere multiplies the same way)."""
        healing = self.heal_config()
        if healing is not None:  # layer-wise healing has no precision option: it trains in float32
            healing = replace(healing, precision="float32" if healing.layer_local else healing.resolved_precision())
        return replace(self, healing=healing or self.healing, calib_precision=self.resolved_calib_precision())

    def planner_applies(self) -> bool:
        """Whether `quantize: auto` means the byte planner: a memory budget, SVD-LLM's metric, loss-aware ranks,
        one matrix per unit and no update (otherwise it means no quantization, as before the planner)."""
        from svdzip.output.lowbit import backend_installed

        return (self.memory_budget and self.method == "svdllm" and self.allocator in (AUTO, "loss-aware")
                and self.group_size == 1 and not self.update and self.heal not in LAYER_LOCAL
                and backend_installed())

    @property
    def lowbit(self) -> bool:
        """Stored (partly) at HQQ's low bit widths: the byte planner decides the storage of every matrix."""
        return self.quantize in (PLAN, *LOWBIT)

    @property
    def chooses_rounding(self) -> bool:
        """Whether the run compares roundings on held-out calibration windows: `choose`, with 2-bit matrices on
        the menu (only there do its candidates differ)."""
        return self.rounding == "choose" and self.quantize in (PLAN, "int2") and self.quantize_scope != "factors"

    @property
    def label(self) -> str:
        """One name per compression, e.g. `svdllm+drank+update` or `svdllm+share2` (recovery not included)."""
        parts = [self.method]
        if self.group_size > 1:
            parts.append(f"share{self.group_size}")
        if self.allocator != "uniform":
            parts.append(self.allocator)
        if self.update:
            parts.append("update" if self.update == "svdllm" else f"update-{self.update}")
        if self.memory_budget and not self.byte_aware:
            parts.append("params-first")
        if self.lowbit:
            comp = "" if self.compensate in (0, AUTO) and self.quantize != PLAN else (
                "+eora" if self.compensate == AUTO else f"+eora{self.compensate}")
            order = "+caldera" if self.compensate_order == "truncate-first" else ""
            order += f"+{self.rounding}" if self.rounding != DEFAULT_ROUNDING and self.quantize_scope != "factors" \
                else ""
            scope = "-factors" if self.quantize_scope == "factors" else ""
            parts.append(("hqq-plan" if self.quantize == PLAN else f"hqq-{self.quantize}{scope}") + comp + order)
        elif self.quantize and self.quantize != AUTO:
            parts.append(self.quantize if self.quantize_scope == "all" else f"{self.quantize}-{self.quantize_scope}")
        return "+".join(parts)

    # ------------------------------------------------------------------ checks

    def validate(self) -> Recipe:
        self._validate_memory()
        check_ratio(self.ratio)
        from svdzip.allocate import parse_allocator_options
        from svdzip.methods.factorisations import get_method
        from svdzip.passes.update import get_update

        self._validate_structured(get_method(self.method))
        if self.update is not None:
            get_update(self.update)
        if self.allocator != AUTO:
            parse_allocator_options(self.allocator, self.allocator_options)  # unknown keys, malformed values
        elif self.allocator_options:
            raise SvdzipError("allocator options need a named allocator (allocator 'auto' chooses one per mode)")
        if self.heal not in (AUTO, "none", *HEAL_METHODS):
            raise SvdzipError(f"unknown recovery '{self.heal}'; choose from auto, none, {', '.join(HEAL_METHODS)}")
        if not isinstance(self.healing, HealConfig):
            raise SvdzipError(f"healing must be a HealConfig, got {type(self.healing).__name__}")
        if self.heal in LAYER_LOCAL and self.group_size > 1:
            raise SvdzipError("layer-wise healing trains each layer's own factors: a basis shared across layers "
                              "(--group-size > 1) is not supported with it")
        if self.heal in LAYER_LOCAL and self.update:
            raise SvdzipError("layer-wise healing refits every layer's factors to its dense output itself; drop "
                              f"--update {self.update} (it would be overwritten)")
        if self.group_size < 1:
            raise SvdzipError(f"group size must be ≥ 1, got {self.group_size}")
        bad = [r for r in self.share_roles if r not in SHAREABLE_ROLES]
        if bad:
            raise SvdzipError(f"roles {bad} cannot share a basis; shareable: {', '.join(SHAREABLE_ROLES)}")
        if self.update_samples < 0:
            raise SvdzipError(f"update_samples must be ≥ 0 (0 = all), got {self.update_samples}")
        for name in ("calib_samples", "calib_seq_len", "calib_batch_size", "heldout_samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise SvdzipError(f"{name} must be a whole number ≥ 1, got {getattr(self, name)!r}")
        if self.asvd_scaling not in ("abs_mean", "abs_max"):
            raise SvdzipError(f"asvd scaling must be abs_mean or abs_max, got '{self.asvd_scaling}'")
        if self.calib_precision not in PRECISIONS:
            raise SvdzipError(f"unknown calibration precision '{self.calib_precision}'; "
                              f"choose from {', '.join(PRECISIONS)}")
        return self

    def calib_dtype(self) -> torch.dtype:
        """The calibration's matmul dtype on this recipe's device (`calib_precision` resolved)."""
        return compute_dtype(self.device, self.calib_precision)

    def resolved_calib_precision(self) -> str:
        """`calib_dtype` by name ("float32" | "bfloat16"), as keys, provenance and recipe files record it."""
        return dtype_name(self.calib_dtype())

    def _validate_structured(self, method: Any) -> None:
        """A method that slims whole modules (MoDeGPT) with what can give its modules their widths."""
        problems = self.structured_problems(method)
        if problems:
            raise SvdzipError(f"--method {self.method} does not support {problems[0]}")

    def structured_problems(self, method: Any) -> list[str]:
        """What in this recipe a method that slims whole modules cannot do, each with the reason; [] if none."""
        if not method.structured:
            return []
        from svdzip.allocate import get_allocator, slimming_allocators

        problems = []
        if self.allocator != AUTO and method.allocators and self.allocator not in method.allocators:
            problems.append(f"--allocator {self.allocator} (it chooses per module with "
                            f"{' or '.join(method.allocators)}: leave --allocator auto)")
        elif self.allocator != AUTO and not method.allocators and not get_allocator(self.allocator).slims:
            problems.append(f"--allocator {self.allocator} (it allocates factorisation ranks only: choose one of "
                            f"{', '.join(slimming_allocators())}, or auto)")
        options = self.allocator_options
        start = str(options.get("init", AUTO))
        if method.chooses and self.allocator == "ara" and start != AUTO and not get_allocator(start).chooses:
            problems.append(f"--allocator ara starting from {start} (it starts from the hybrid's choice: leave "
                            "init at auto, or init=loss-aware)")
        problems += [what for what, on in (
            ("a memory budget", self.memory_budget), (f"--quantize {self.quantize}", self.quantize not in (None, AUTO)),
            (f"--update {self.update}", bool(self.update)), ("--group-size > 1", self.group_size > 1),
            (f"--heal {self.heal}", self.heal not in (AUTO, "none", "distill")),
            ("loss-aware's layer-local signal (signal=local)", str(options.get("signal")) == "local")) if on]
        if problems and not problems[0].startswith("--allocator"):
            problems[0] += (" yet (its slimmed modules are plain linears of smaller shapes: no factors to update, "
                            "share or put adapters on; --heal distill trains them)")
        return problems

    def _validate_memory(self) -> None:
        from svdzip.output.quantize import PRECISIONS, SCOPES

        if self.budget_bytes is not None and self.budget_fraction is not None:
            raise SvdzipError("give a memory budget either in bytes or as a fraction, not both")
        if self.budget_bytes is not None and (not isinstance(self.budget_bytes, int) or self.budget_bytes <= 0):
            raise SvdzipError(f"budget_bytes must be a positive whole number of bytes, got {self.budget_bytes!r}")
        if self.budget_fraction is not None and (not isinstance(self.budget_fraction, int | float)
                                                 or not 0.0 < self.budget_fraction <= 1.0):
            raise SvdzipError(f"budget_fraction is a fraction of the dense model's bf16 weight bytes, above 0 and at "
                              f"most 1 (1 = the dense bf16 size, which nothing needs compressing to), got "
                              f"{self.budget_fraction!r}")
        choices = (AUTO, *PRECISIONS, *LOWBIT, PLAN)
        if self.quantize is not None and self.quantize not in choices:
            raise SvdzipError(f"unknown quantization '{self.quantize}'; choose from none, {', '.join(choices)}")
        if self.compensate != AUTO and (isinstance(self.compensate, bool) or not isinstance(self.compensate, int)
                                        or self.compensate < 0):
            raise SvdzipError(f"compensate must be a rank ≥ 0 or auto, got {self.compensate!r}")
        if self.compensate not in (AUTO, 0) and self.quantize not in (PLAN, *LOWBIT) and not (
                self.quantize == AUTO and self.planner_applies()):
            raise SvdzipError(f"--compensate {self.compensate} corrects the error of low-bit weights: give "
                              f"--quantize {'|'.join((*LOWBIT, PLAN))} as well")
        if self.quantize == PLAN and not self.memory_budget:
            raise SvdzipError("--quantize plan spends a memory budget: give --budget-fraction or --budget-bytes")
        if self.quantize in (PLAN, *LOWBIT) and self.allocator not in (AUTO, "loss-aware"):
            raise SvdzipError(f"low-bit storage is planned by loss-aware's byte planner: --allocator {self.allocator} "
                              f"cannot choose bits (leave --allocator auto)")
        if self.quantize in (PLAN, *LOWBIT) and self.method != "svdllm":
            raise SvdzipError(f"low-bit storage prices every option in SVD-LLM's whitened metric (the Gram matrices "
                              f"of the inputs): use --method svdllm, not {self.method}")
        if self.quantize in (PLAN, *LOWBIT) and (self.update or self.heal in LAYER_LOCAL):
            raise SvdzipError(f"low-bit storage is planned on the dense weights: --update and --heal layerwise are "
                              f"not supported with --quantize {self.quantize}")
        if self.quantize_scope not in SCOPES:
            raise SvdzipError(f"unknown quantization scope '{self.quantize_scope}'; choose from {', '.join(SCOPES)}")
        self._validate_lowbit_storage()
        if self.quantize not in (None, AUTO) and self.group_size > 1:
            raise SvdzipError("quantization of Basis Sharing's shared bases is not supported (use --group-size 1)")
        if self.storage_dtype not in (AUTO, "float32", "float16", "bfloat16"):
            raise SvdzipError(f"unknown storage dtype '{self.storage_dtype}'")

    def _validate_lowbit_storage(self) -> None:
        """Scopes and compensation orders of the low-bit recipes."""
        orders = ("quantize-first", "truncate-first")
        if self.compensate_order not in orders:
            raise SvdzipError(f"unknown compensation order '{self.compensate_order}'; choose from {', '.join(orders)}")
        if self.rounding not in ROUNDINGS:
            raise SvdzipError(f"unknown rounding '{self.rounding}'; choose from {', '.join(ROUNDINGS)}")
        planned = self.lowbit or (self.quantize == AUTO and self.planner_applies())
        if self.rounding in ("nearest", "auto") and not planned:
            raise SvdzipError(f"--rounding {self.rounding} rounds low-bit weights: give --quantize "
                              f"{'|'.join((*LOWBIT, PLAN))} (or a memory budget, whose planner uses them)")
        no_rank = self.compensate == 0 or (self.compensate == AUTO and not self.memory_budget)  # auto: 0 without one
        if self.compensate_order == "truncate-first" and (no_rank or not planned):
            raise SvdzipError("--compensate-order truncate-first orders a low-bit matrix's compensation: give "
                              f"--quantize {'|'.join((*LOWBIT, PLAN))} with a --compensate rank (or auto)")
        if self.quantize in LOWBIT and self.quantize_scope == "dense":
            raise SvdzipError(f"--quantize {self.quantize} stores every matrix at that width (--quantize-scope all) "
                              "or factorises every matrix and stores the factors at it (factors); 'dense' is int8's")
        if self.quantize == PLAN and self.quantize_scope != "all":
            raise SvdzipError("--quantize plan chooses the storage of every matrix itself (factors at low bits "
                              "included): leave --quantize-scope all")
        if not (self.quantize in LOWBIT and self.quantize_scope == "factors"):
            return
        if self.compensate not in (AUTO, 0):
            raise SvdzipError(f"--quantize-scope factors factorises every matrix and packs its factors: it has no "
                              f"quantization error to compensate (drop --compensate {self.compensate})")
        if self.heal not in (AUTO, "none"):
            raise SvdzipError(f"--quantize-scope factors packs every factor: --heal {self.heal} would have nothing "
                              "left to train (use --quantize plan, whose 16-bit factors and compensations it trains)")
        if not self.memory_budget:
            raise SvdzipError(f"--quantize {self.quantize} --quantize-scope factors allocates the ranks in bytes: give "
                              "--budget-fraction or --budget-bytes")

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["share_roles"] = list(self.share_roles)
        d["healing"] = self.healing.to_dict()
        return d

    def to_file_dict(self) -> dict[str, Any]:
        """What `recipe.yaml` holds: the recipe without where it ran; recovery options only with a recovery."""
        d = {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}
        if self.heal == "none":
            d.pop("healing")
        else:
            d["healing"] = {k: v for k, v in d["healing"].items() if k not in ("method", "seed", "device")}
        return {"svdzip_recipe": RECIPE_FORMAT, **d}

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "recipe") -> Recipe:
        """A recipe from a mapping (a recipe file's content); unknown or mistyped keys are named."""
        if not isinstance(data, dict):
            raise SvdzipError(f"{origin}: a recipe is a mapping of settings, got {type(data).__name__}")
        data = dict(data)
        written = "svdzip_recipe" in data  # a file svdzip wrote, not a hand-written partial recipe
        version = data.pop("svdzip_recipe", RECIPE_FORMAT)
        if version != RECIPE_FORMAT:
            raise SvdzipError(f"{origin}: recipe format {version!r}, this svdzip reads format {RECIPE_FORMAT}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SvdzipError(f"{origin}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if written:  # written before these options existed: float32 statistics, low bits rounded to nearest
            data.setdefault("calib_precision", "float32")
            if data.get("quantize") in (PLAN, *LOWBIT):
                data.setdefault("rounding", "nearest")
        if "share_roles" in data:
            data["share_roles"] = tuple(data["share_roles"])
        if "healing" in data:
            data["healing"] = _heal_options(data["healing"], origin, str(data.get("heal", AUTO)))
        try:
            recipe = cls(**data)
        except (TypeError, ValueError) as exc:
            raise SvdzipError(f"{origin}: {exc}") from None
        _check_types(recipe, origin)
        return recipe.validate()

    def save(self, path: str | Path) -> Path:
        import yaml

        path = Path(path)
        text = ("# svdzip recipe: `svdzip compress --model MODEL --out DIR --recipe this-file` makes the same model\n"
                + yaml.safe_dump(self.to_file_dict(), sort_keys=False, allow_unicode=True))
        path.write_text(text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        import yaml

        path = Path(path)
        if path.is_dir():
            path = path / RECIPE_FILE
        if not path.is_file():
            raise SvdzipError(f"recipe file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise SvdzipError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        return cls.from_dict(data or {}, origin=str(path))


def _heal_options(value: Any, origin: str, method: str = AUTO) -> HealConfig:
    """A recipe file's recovery options, for its recovery `method`: the values that are that method's defaults
    are read as defaults (a recipe file holds them resolved), so that another `--heal` takes its own."""
    if isinstance(value, HealConfig):
        return value
    if not isinstance(value, dict):
        raise SvdzipError(f"{origin}: healing is a mapping of recovery options, got {type(value).__name__}")
    known = {f.name for f in fields(HealConfig)} - {"method", "seed", "device"}
    unknown = sorted(set(value) - known)
    if unknown:
        raise SvdzipError(f"{origin}: unknown healing option(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    defaults = METHOD_DEFAULTS.get(method, {})
    given = {k: v for k, v in value.items() if not (k in ("objective", "steps", "lr_per_rms") and defaults.get(k) == v)}
    try:
        return HealConfig(**given)
    except (TypeError, ValueError) as exc:
        raise SvdzipError(f"{origin}: healing: {exc}") from None


_SIMPLE_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool}


def _check_types(recipe: Recipe, origin: str) -> None:
    """Plain-typed fields hold their type (a YAML `ratio: twenty` is named here, not deep in a stage)."""
    for f in dataclasses.fields(recipe):
        expected = _SIMPLE_TYPES.get(str(f.type).replace(" | None", ""))
        value = getattr(recipe, f.name)
        if expected is None or (value is None and "None" in str(f.type)):
            continue
        if isinstance(value, bool) and expected is not bool or not isinstance(value, expected):
            raise SvdzipError(f"{origin}: {f.name} must be {str(f.type)}, got {value!r}")
