"""Timing by the house method, and the device helpers around it.

A measurement warms up, then takes the median of timed calls. On CUDA each call is bracketed by
CUDA events (the GPU's own clock); on the CPU by ``time.perf_counter``. Calls cycle through
several input sets when one set is smaller than about twice the L2 cache, so that a call does not
find its inputs already cached by the previous one.
"""

from __future__ import annotations

import gc
import itertools
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

MAX_INPUT_SETS = 8


@dataclass(frozen=True)
class Timing:
    """Median milliseconds of ``runs`` timed calls."""

    ms: float
    runs: int


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    """Return freed memory to the device so that the next measurement starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def l2_cache_bytes(device: torch.device) -> int:
    """The device's L2 cache size (0 on the CPU, where inputs are not rotated)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).L2_cache_size


def num_input_sets(set_bytes: int, l2_bytes: int) -> int:
    """Input sets to rotate through so that together they span at least twice the L2 cache."""
    if set_bytes <= 0:
        return 1
    return max(1, min(MAX_INPUT_SETS, math.ceil(2 * l2_bytes / set_bytes)))


def add_input_sets(sets: list, make: Callable[[], Any], l2_bytes: int, set_bytes: int) -> list:
    """Append ``make()`` sets to ``sets`` (which holds the first one, of ``set_bytes`` bytes) up to
    :func:`num_input_sets` sets in all; returns ``sets``."""
    sets += [make() for _ in range(num_input_sets(set_bytes, l2_bytes) - 1)]
    return sets


def _cuda_interval(fn: Callable, x: Any) -> Callable[[], float]:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn(x)
    end.record()
    return lambda: start.elapsed_time(end)


def _host_interval(fn: Callable, x: Any) -> Callable[[], float]:
    start = time.perf_counter()
    fn(x)
    elapsed_ms = (time.perf_counter() - start) * 1e3
    return lambda: elapsed_ms


def time_ms(fn: Callable[[Any], Any], inputs: Sequence[Any], *, device: torch.device, warmup: int,
            repeats: int, budget_s: float) -> Timing:
    """Median time of ``fn(x)``, with ``x`` cycling through ``inputs``.

    Warm-up runs at least one call and at most ``warmup``, stopping early once warm-up has used a
    quarter of ``budget_s``. Then ``repeats`` timed calls, fewer (never under one) when the fastest
    warm-up call says they would take longer than ``budget_s``. Run a first call (compilation,
    autotuning) before, so that it does not count as the estimate.
    """
    calls = itertools.cycle(inputs)
    fastest, spent = math.inf, 0.0
    for _ in range(max(1, warmup)):
        start = time.perf_counter()
        fn(next(calls))
        synchronize(device)
        elapsed = time.perf_counter() - start
        fastest, spent = min(fastest, elapsed), spent + elapsed
        if spent >= budget_s / 4:
            break
    runs = max(1, min(repeats, int(budget_s / max(fastest, 1e-9))))
    interval = _cuda_interval if device.type == "cuda" else _host_interval
    pending = [interval(fn, next(calls)) for _ in range(runs)]
    synchronize(device)
    return Timing(statistics.median(read() for read in pending), runs)


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int, **timing) -> float:
    """Achieved TFLOP/s of a ``size``-cubed matrix product on random data (the compute ceiling).

    ``timing`` holds the keyword arguments of :func:`time_ms` other than ``device``.
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    result = time_ms(lambda ab: torch.matmul(*ab), [(a, b)], device=device, **timing)
    del a, b
    release_memory(device)
    return 2 * size ** 3 / (result.ms * 1e9)
