"""What each part of a run declares it needs, and the one check that refuses a mode before any work.

A factorisation method, an allocator, a weight update, cross-layer basis sharing and a recovery each
declare a `Needs`. The driver unions them and asks `refuse_unsupported` whether the mode it runs in
(in memory, streamed from disk, resumable, split over torch.distributed ranks) can give all of it; a
part that cannot be honoured is named in one clear error before calibration starts. No list of names
stands in for this anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from svdzip.errors import SvdzipError

#: calibration statistics a part can ask for (per shared input; "fisher" and "local" are per linear; "local" is
#: computed layer by layer with the rest, "fisher" needs a backward pass through the whole model)
STAT_KINDS = ("grams", "abs_mean", "abs_max", "fisher", "local")


@dataclass(frozen=True)
class Needs:
    """Resources one part of a run needs; `why` says in a few words what for (it ends up in error messages)."""

    statistics: frozenset[str] = frozenset()  # subset of STAT_KINDS
    calib_tokens: bool = False  # the calibration token ids themselves (to evaluate, train or re-run layers)
    heldout: bool = False  # held-out calibration windows the statistics never see (tuning, guards)
    whole_model: bool = False  # the whole model in memory at once (end-to-end forward or backward)
    gradients: bool = False  # back-propagation through the model
    distributable: bool = True  # its work can be split over torch.distributed ranks
    why: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        unknown = set(self.statistics) - set(STAT_KINDS)
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}; known: {', '.join(STAT_KINDS)}")

    @property
    def streamable(self) -> bool:
        """Can run with only one decoder layer's weights in memory at a time."""
        return not (self.whole_model or self.gradients)

    @property
    def data(self) -> bool:
        """Needs calibration text at all."""
        return bool(self.statistics) or self.calib_tokens or self.heldout

    def __or__(self, other: Needs) -> Needs:
        return Needs(
            statistics=self.statistics | other.statistics,
            calib_tokens=self.calib_tokens or other.calib_tokens,
            heldout=self.heldout or other.heldout,
            whole_model=self.whole_model or other.whole_model,
            gradients=self.gradients or other.gradients,
            distributable=self.distributable and other.distributable,
            why=self.why + other.why,
        )

    def because(self, reason: str) -> Needs:
        return replace(self, why=(reason,))


NOTHING = Needs()


@dataclass(frozen=True)
class Mode:
    """How a run executes: streamed from disk, resumable from a run directory, over how many processes."""

    streamed: bool = False
    resumable: bool = False
    world_size: int = 1

    def describe(self) -> str:
        parts = []
        if self.streamed:
            parts.append("--stream")
        if self.resumable:
            parts.append("--resume-dir")
        if self.world_size > 1:
            parts.append(f"torchrun ({self.world_size} processes)")
        return ", ".join(parts) or "in memory"


def refuse_unsupported(parts: dict[str, Needs], mode: Mode) -> None:
    """Raise one `SvdzipError` naming every part (`{label: needs}`) the mode cannot honour."""
    problems = []
    for label, needs in parts.items():
        reason = f" ({'; '.join(needs.why)})" if needs.why else ""
        if mode.streamed and not needs.streamable:
            problems.append(f"{label} needs the whole model in memory{reason}; run without --stream")
        if mode.world_size > 1 and not needs.distributable:
            problems.append(f"{label} cannot be split over processes{reason}; run it with one process")
    if problems:
        raise SvdzipError(f"{mode.describe()} cannot run this: " + "; ".join(problems))
