"""Calibration statistics: what they hold, how one batch adds to them, and where they are kept.

Per shared input (linears reading the very same tensor share one entry):

* the Gram matrix XᵀX (SVD-LLM whitening, D-Rank, ARA, Basis Sharing): each batch's product in float32 on
  the compute device, the running sum in float64;
* Σ_batches mean_tokens |x| and max |x| per channel (ASVD's scaling);

and, per linear, FWSVD's Fisher information and the layer-local gain (`local`: how much of the linear's output
error reaches its decoder layer's output, relative to each token's residual stream; `passes.local_gain`).
Only the kinds the run's parts declare (`Needs.statistics`) are computed. The statistics are an artefact of
their own: saved with a checksum, keyed by what they depend on (a hash of the weights, of the calibration
tokens and the batch size) and reused across methods and ratios; a run that needs a kind the file lacks
computes just that kind and adds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from svdzip.assets import sha256_file
from svdzip.core.precision import full_precision
from svdzip.core.resume import RunState
from svdzip.errors import SvdzipError

log = logging.getLogger(__name__)

STATS_FORMAT = 2
#: the kinds gathered by the layer-wise hooks (Fisher needs a backward pass of its own)
INPUT_KINDS = ("grams", "abs_mean", "abs_max", "abs_batches")
#: batches that reached each input, kept with the |x| statistics: an MoE expert sees only the batches that
#: routed tokens to it, so its mean |x| is averaged over those, not over all batches
AUXILIARY = {"abs_mean": "abs_batches", "abs_max": "abs_batches"}
#: per-linear kinds the layer walk computes and a run directory keeps per layer (`passes.local_gain`)
LAYER_KINDS = ("local",)
#: what a layer's statistics file and the statistics cache hold, in that order
STORED_KINDS = (*INPUT_KINDS, *LAYER_KINDS)


@dataclass
class CalibrationStats:
    """Per shared input: Gram matrix (fp64), Σ mean|x| and max|x| per channel; plus provenance."""

    grams: dict[str, torch.Tensor] = field(default_factory=dict)
    abs_mean: dict[str, torch.Tensor] = field(default_factory=dict)
    abs_max: dict[str, torch.Tensor] = field(default_factory=dict)
    abs_batches: dict[str, torch.Tensor] = field(default_factory=dict)  # batches counted in abs_mean, per input
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)  # per linear name (FWSVD)
    # per linear name: [Σ g², count] (`passes.local_gain`); sums, so that ranks add them up
    local: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0
    batches: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def check_finite(self) -> None:
        """A NaN/Inf input makes its Gram's diagonal Σx² non-finite, and |G_ij| ≤ √(G_ii G_jj) bounds the
        rest, so a Gram's diagonal is enough (O(d), not O(d²))."""
        for kind, table in (("Gram", self.grams), ("|x| mean", self.abs_mean), ("Fisher", self.fisher)):
            for key, value in table.items():
                if not torch.isfinite(value.diagonal() if kind == "Gram" else value).all():
                    raise SvdzipError(
                        f"calibration statistics contain NaN/Inf ({kind} of {key}); "
                        "the model produces non-finite activations on this data"
                    )

    @property
    def kinds(self) -> set[str]:
        """The kinds of statistics present."""
        return {kind for kind in (*STORED_KINDS, "fisher") if getattr(self, kind)}

    def to_cpu(self) -> CalibrationStats:
        for kind in (*STORED_KINDS, "fisher"):
            table = getattr(self, kind)
            for key in table:
                table[key] = table[key].cpu()
        return self

    def merge(self, other: CalibrationStats) -> None:
        """Add the kinds `other` has and this lacks (same tokens, same model)."""
        for kind in other.kinds - self.kinds:
            setattr(self, kind, dict(getattr(other, kind)))

    def save(self, path: str | os.PathLike) -> None:
        """safetensors file + sidecar JSON with provenance and a checksum, written atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for kind in (*STORED_KINDS, "fisher"):
            for key, value in getattr(self, kind).items():
                tensors[f"{kind}/{key}"] = value.contiguous()
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp))
        digest = sha256_file(tmp)
        meta = {"format": STATS_FORMAT, "tokens": self.tokens, "batches": self.batches,
                "sha256": digest, "meta": self.meta}
        meta_tmp = _meta_path(path).with_name(_meta_path(path).name + ".tmp")
        meta_tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.replace(tmp, path)
        os.replace(meta_tmp, _meta_path(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationStats:
        path = Path(path)
        meta_path = _meta_path(path)
        if not path.is_file() or not meta_path.is_file():
            raise SvdzipError(f"no calibration statistics at {path} (expected {path.name} and {meta_path.name})")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise SvdzipError(f"statistics metadata {meta_path} is corrupted: {exc}") from exc
        if meta.get("format") != STATS_FORMAT:
            raise SvdzipError(f"statistics {path} have format {meta.get('format')}, expected {STATS_FORMAT}")
        if sha256_file(path) != meta.get("sha256"):
            raise SvdzipError(f"statistics file {path} is corrupted (checksum mismatch); delete it to recompute")
        stats = cls(tokens=meta["tokens"], batches=meta["batches"], meta=meta["meta"])
        for name, tensor in load_file(str(path)).items():
            kind, _, key = name.partition("/")
            getattr(stats, kind)[key] = tensor
        return stats


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


#: inputs at least this wide get their Gram from the blocks on and above the diagonal (`add_gram_`). CPU, one
#: thread, 4096 tokens: blocked is 1.3-1.6× faster from n ≈ 384 on, the crossover is n ≈ 256
#: (benchmarks/gram_speed.py). Elsewhere (not measured; ~40 small kernels per batch instead of one) only wide
#: inputs, e.g. Qwen2.5-0.5B's 4864-wide down_proj input, ~90 % of its Gram flops.
GRAM_BLOCKED_MIN = {"cpu": 512}
GRAM_BLOCKED_MIN_OTHER = 1024
#: the blocked Gram's column blocks: (b+1)/(2b) of the plain product's flops (56 %)
GRAM_BLOCKS = 8


def gram_blocked(x: torch.Tensor) -> bool:
    """Whether `Accumulator` takes x's Gram blockwise (`add_gram_`) rather than as one `xᵀx`."""
    return x.shape[-1] >= GRAM_BLOCKED_MIN.get(x.device.type, GRAM_BLOCKED_MIN_OTHER)


def add_gram_(acc: torch.Tensor, x: torch.Tensor, blocks: int = GRAM_BLOCKS) -> torch.Tensor:
    """`acc += xᵀx` in place, from the column blocks on and above the diagonal only; returns `acc`.

    x (tokens × n) is split into `blocks` column blocks X_0 … X_{b-1}; block row i is one matmul
    X_iᵀ [X_i … X_{b-1}] in x's dtype on x's device (b(b+1)/2 of the b² block products: (b+1)/(2b) of the
    flops), added into `acc` (any dtype, e.g. the float64 running sum) and mirrored below the diagonal.
    Each diagonal block is made exactly symmetric from its upper triangle, so a symmetric `acc` stays
    exactly symmetric. NaN/Inf in x reach the diagonal as with `xᵀx`.
    """
    n = x.shape[-1]
    if x.dim() != 2 or acc.shape != (n, n):
        raise ValueError(f"add_gram_: x must be tokens × n and acc n × n, got {tuple(x.shape)}, {tuple(acc.shape)}")
    b = max(1, min(int(blocks), n))
    edges = [n * i // b for i in range(b + 1)]
    for start, end in zip(edges[:-1], edges[1:], strict=True):
        panel = x[:, start:end].T @ x[:, start:]  # (w × (n − start)): the diagonal block and those right of it
        w = end - start
        diag = panel[:, :w]
        acc[start:end, start:end].add_(diag.triu()).add_(diag.triu(1).T)  # exactly symmetric
        if end < n:
            right = panel[:, w:]
            acc[start:end, end:].add_(right)
            acc[end:, start:end].add_(right.T)
    return acc


def symmetric_gram(x: torch.Tensor, blocks: int = GRAM_BLOCKS, dtype: torch.dtype | None = None) -> torch.Tensor:
    """xᵀx (exactly symmetric) from the blocks on and above the diagonal; products in x's dtype, result in
    `dtype` (default x's dtype) on x's device."""
    n = x.shape[-1]
    return add_gram_(torch.zeros(n, n, dtype=dtype or x.dtype, device=x.device), x, blocks)


class Accumulator:
    """A forward pre-hook adding one batch's input statistics (only the wanted kinds) to `stats`.

    Its products are float32 whatever the pass's autocast: a Gram from 16-bit products would round every
    entry to 8 bits (2.4e-3 relative error on a 4096-token batch of Qwen2.5-0.5B's shapes, measured).

    The sums stay on the compute device during a layer (no per-batch transfer); `finish` moves them to
    the CPU once the layer is done.
    """

    def __init__(self, stats: CalibrationStats, key: str, kinds: Iterable[str]):
        self.stats, self.key = stats, key
        self.gram = "grams" in kinds
        self.absolute = "abs_mean" in kinds or "abs_max" in kinds

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1])
        if x.dtype != torch.float32:
            x = x.float()
        with full_precision(x.device):  # under a bf16 pass the activations are bf16's, their sums still float32
            self._add(x)

    def _add(self, x: torch.Tensor) -> None:
        s, key = self.stats, self.key
        if self.gram:
            if gram_blocked(x):  # wide: the blocks on and above the diagonal only, products in fp32 ...
                if key not in s.grams:
                    s.grams[key] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
                add_gram_(s.grams[key], x)  # ... added in place to the running sum in fp64
            else:
                gram = x.T @ x  # one batch in fp32 ...
                if key in s.grams:
                    s.grams[key].add_(gram)  # ... added in place to the running sum in fp64
                else:
                    s.grams[key] = gram.double()
        if self.absolute:
            absx = x.abs()
            mean, amax = absx.mean(0).double(), absx.amax(0).double()
            if key in s.abs_mean:
                s.abs_mean[key].add_(mean)
                torch.maximum(s.abs_max[key], amax, out=s.abs_max[key])
                s.abs_batches[key] += 1
            else:
                s.abs_mean[key], s.abs_max[key] = mean, amax
                s.abs_batches[key] = torch.ones((), dtype=torch.float64, device=mean.device)


def flatten(stats: CalibrationStats) -> dict[str, torch.Tensor]:
    return {f"{kind}/{k}": v for kind in STORED_KINDS for k, v in getattr(stats, kind).items()}


def unflatten(tensors: dict[str, torch.Tensor], into: CalibrationStats) -> None:
    for name, value in tensors.items():
        kind, _, key = name.partition("/")
        getattr(into, kind)[key] = value


class _LazyTable(Mapping):
    def __init__(self, owner: LayeredStats, kind: str, key_layer: dict[str, int]):
        self.owner, self.kind, self.key_layer = owner, kind, key_layer

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.key_layer:
            raise KeyError(key)
        return getattr(self.owner.layer(self.key_layer[key]), self.kind)[key]

    def _present(self) -> bool:
        return self.kind in self.owner.kinds

    def __contains__(self, key: object) -> bool:
        return self._present() and key in self.key_layer

    def __iter__(self) -> Iterator[str]:
        return iter(self.key_layer if self._present() else ())

    def __len__(self) -> int:
        return len(self.key_layer) if self._present() else 0


class LayeredStats:
    """`CalibrationStats` read layer by layer from the run directory (one layer cached at a time).

    `key_layer` maps every input key to its layer, `name_layer` every linear's name (the per-linear kinds)."""

    def __init__(self, state: RunState, key_layer: dict[str, int], tokens: int, batches: int,
                 meta: dict[str, Any], kinds: Iterable[str] = INPUT_KINDS, name_layer: dict[str, int] | None = None):
        self.state, self.key_layer = state, key_layer
        self.tokens, self.batches, self.meta = tokens, batches, meta
        self.grams, self.abs_mean, self.abs_max, self.abs_batches = (
            _LazyTable(self, k, key_layer) for k in INPUT_KINDS)
        self.local = _LazyTable(self, "local", name_layer or {})
        self.fisher: dict[str, torch.Tensor] = {}
        self.kinds = set(kinds)
        self._cached: tuple[int, CalibrationStats] | None = None

    def layer(self, index: int) -> CalibrationStats:
        if self._cached is None or self._cached[0] != index:
            self._cached = None
            got = self.state.read(self.state.layer_stats_path(index))
            if got is None:
                raise SvdzipError(f"statistics of layer {index} are missing or corrupted in {self.state.root}; "
                                  "rerun the same command to recompute them")
            stats = CalibrationStats()
            unflatten(got[0], stats)
            self._cached = (index, stats)
        return self._cached[1]


def tensor_digest(tensors: Iterable[torch.Tensor], h: Any = None) -> str:
    """A content hash of tensors (their dtype, shape and bytes, in order)."""
    h = h or hashlib.blake2b(digest_size=16)
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def statistics_key(model: nn.Module, tokens: torch.Tensor, batch_size: int, precision: str = "float32"
                   ) -> dict[str, Any]:
    """What the statistics depend on: the weights' content, the tokens' content, the batch size and the dtype
    the pass multiplied in (resolved: "float32" | "bfloat16")."""
    weights = tensor_digest(p for _, p in sorted(model.state_dict().items()))
    return {"format": STATS_FORMAT, "weights": weights, "tokens": tensor_digest([tokens]),
            "batch_size": int(batch_size), "precision": precision}


def default_stats_path(key: dict[str, Any]) -> Path:
    from svdzip.assets import cache_dir

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "stats" / f"{digest}.safetensors"


