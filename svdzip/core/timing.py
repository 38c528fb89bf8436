"""Clocks and repeat timing for micro-benchmarks on a shared machine (CPU seconds or wall time)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = ("wall", "cpu")


def clock_fn(clock: str, device: torch.device) -> Callable[[], float]:
    """`wall` = perf_counter; `cpu` = this process's CPU seconds (all threads), CPU devices only.

    Why `cpu`: on a machine shared with other jobs, wall time counts the time the scheduler gave to
    others; CPU time does not (cache sharing still leaks in). With one torch thread it equals the
    latency a quiet machine would show; with several it is total work, not latency.
    """
    if clock not in CLOCKS:
        raise ValueError(f"unknown clock '{clock}'; choose from {', '.join(CLOCKS)}")
    if clock == "cpu" and device.type == "cpu":
        return time.process_time
    return time.perf_counter


def timed(fn: Callable[[], Any], device: torch.device, clock: str = "wall") -> float:
    now = clock_fn(clock, device)
    sync(device)
    t0 = now()
    fn()
    sync(device)
    return now() - t0


def median_time(fn: Callable[[], Any], device: torch.device, repeats: int, clock: str,
                 target_s: float = 0.01) -> float:
    """Median seconds per call; calls are batched so that one repeat lasts about `target_s`."""
    now = clock_fn(clock, device)
    fn()
    sync(device)
    t0 = now()
    fn()
    sync(device)
    inner = max(1, min(1000, int(target_s / max(now() - t0, 1e-7))))
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = now()
        for _ in range(inner):
            fn()
        sync(device)
        times.append((now() - t0) / inner)
    return statistics.median(times)
