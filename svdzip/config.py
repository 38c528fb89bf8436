"""The one configuration object of a compression run (CLI flags map onto it one to one)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from svdzip.budget import check_ratio
from svdzip.errors import SvdzipError

SHAREABLE_ROLES = ("q", "k", "v", "up", "gate")  # Basis Sharing never shares o and down


@dataclass
class CompressConfig:
    ratio: float = 0.2  # fraction of the decoder linears' parameters removed
    method: str = "svdllm"  # factorisation metric: svd | svdllm | asvd | fwsvd
    allocator: str = "uniform"
    group_size: int = 1  # > 1: Basis Sharing over that many consecutive layers
    share_roles: tuple[str, ...] = SHAREABLE_ROLES
    update: str | None = None  # svdllm (closed-form layer-wise) | coef (shared-basis coefficients)
    update_samples: int = 0  # calibration sequences the update refits on (0 = all of them)
    allocator_options: dict[str, Any] = field(default_factory=dict)
    asvd_alpha: float = 0.5
    asvd_scaling: str = "abs_mean"  # or abs_max
    calib_samples: int = 64
    calib_seq_len: int = 512
    calib_batch_size: int = 8
    corpus: str = "wiki"
    seed: int = 0
    device: str = "cpu"
    # memory budgets (svdzip.allocate.memory): either replaces `ratio`
    budget_bytes: int | None = None  # weight bytes the whole saved model may take
    budget_fraction: float | None = None  # … as a fraction of the dense model's bfloat16 weight bytes
    quantize: str | None = None  # weight-only quantization of the stored matrices: int8 (int4 needs CUDA)
    quantize_scope: str = "all"  # all | dense (the dense remainder only) | factors (the factors only)
    storage_dtype: str = "float32"  # dtype the unquantized weights are saved in (prices a byte budget)
    byte_aware: bool = True  # False: allocate parameters first, then fit the byte budget by the ratio

    @property
    def memory_budget(self) -> bool:
        return self.budget_bytes is not None or self.budget_fraction is not None

    def validate(self) -> CompressConfig:
        self._validate_memory()
        check_ratio(self.ratio)
        from svdzip.allocate import parse_allocator_options
        from svdzip.methods.factorisations import get_method
        from svdzip.passes.update import get_update

        get_method(self.method)
        if self.update is not None:
            get_update(self.update)
        parse_allocator_options(self.allocator, self.allocator_options)  # unknown keys, malformed values
        if self.group_size < 1:
            raise SvdzipError(f"group size must be ≥ 1, got {self.group_size}")
        bad = [r for r in self.share_roles if r not in SHAREABLE_ROLES]
        if bad:
            raise SvdzipError(f"roles {bad} cannot share a basis; shareable: {', '.join(SHAREABLE_ROLES)}")
        if self.update_samples < 0:
            raise SvdzipError(f"update_samples must be ≥ 0 (0 = all), got {self.update_samples}")
        for name in ("calib_samples", "calib_seq_len", "calib_batch_size"):
            if getattr(self, name) < 1:
                raise SvdzipError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.asvd_scaling not in ("abs_mean", "abs_max"):
            raise SvdzipError(f"asvd scaling must be abs_mean or abs_max, got '{self.asvd_scaling}'")
        return self

    def _validate_memory(self) -> None:
        from svdzip.output.quantize import PRECISIONS, SCOPES

        if self.budget_bytes is not None and self.budget_fraction is not None:
            raise SvdzipError("give a memory budget either in bytes or as a fraction, not both")
        if self.budget_bytes is not None and (not isinstance(self.budget_bytes, int) or self.budget_bytes <= 0):
            raise SvdzipError(f"budget_bytes must be a positive whole number of bytes, got {self.budget_bytes!r}")
        if self.budget_fraction is not None and not 0.0 < self.budget_fraction <= 10.0:
            raise SvdzipError(f"budget_fraction must be a positive fraction of the dense bf16 weight bytes, "
                              f"got {self.budget_fraction!r}")
        if self.quantize is not None and self.quantize not in PRECISIONS:
            raise SvdzipError(f"unknown quantization '{self.quantize}'; choose from {', '.join(PRECISIONS)}")
        if self.quantize_scope not in SCOPES:
            raise SvdzipError(f"unknown quantization scope '{self.quantize_scope}'; choose from {', '.join(SCOPES)}")
        if self.quantize and self.group_size > 1:
            raise SvdzipError("quantization of Basis Sharing's shared bases is not supported (use --group-size 1)")
        if self.storage_dtype not in ("float32", "float16", "bfloat16"):
            raise SvdzipError(f"unknown storage dtype '{self.storage_dtype}'")

    @property
    def label(self) -> str:
        """One name per combination, e.g. `svdllm+drank+update` or `svdllm+share2`."""
        parts = [self.method]
        if self.group_size > 1:
            parts.append(f"share{self.group_size}")
        if self.allocator != "uniform":
            parts.append(self.allocator)
        if self.update:
            parts.append("update" if self.update == "svdllm" else f"update-{self.update}")
        if self.memory_budget and not self.byte_aware:
            parts.append("params-first")
        if self.quantize:
            parts.append(self.quantize if self.quantize_scope == "all" else f"{self.quantize}-{self.quantize_scope}")
        return "+".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["share_roles"] = list(self.share_roles)
        return d
