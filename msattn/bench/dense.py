"""Dense causal attention baseline: the fastest SDPA kernel of this run.

Every candidate kernel runs ``scaled_dot_product_attention(is_causal=True)`` in the ``[B, H, N, D]``
layout, first with native GQA (``enable_gqa=True``, K/V with ``G`` heads), else with K/V expanded
to ``H`` heads. A candidate that fails (unsupported, out of memory) is recorded and skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from msattn.bench.timing import Timing, add_input_sets, release_memory
from msattn.config import MSAConfig

# The kernels raced on each device type, by the name recorded in the results.
CANDIDATES = {
    "cuda": {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION},
    "cpu": {"flash": SDPBackend.FLASH_ATTENTION},
}


@dataclass
class DenseResult:
    """The fastest candidate (``timing`` None when all failed), every candidate's median time, and
    why the failed ones failed."""

    timing: Timing | None = None
    backend: str | None = None
    candidates_ms: dict[str, float] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


def row_fields(status: str, dense: DenseResult | None) -> dict:
    """The dense fields of a JSON row: its status ("measured", "failed", "off", "skipped"), the
    winning kernel, every candidate's median time and the failures (``dense`` None: not run)."""
    return {
        "dense_status": status,
        "dense_backend": dense.backend if dense else None,
        "dense_candidates_ms": dense.candidates_ms if dense else {},
        "dense_failures": dense.failures if dense else {},
    }


def _sdpa(qkv, *, kernel: SDPBackend, gqa: bool):
    q, k, v = qkv
    with sdpa_kernel([kernel]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)


def _expand_kv(qkv):
    q, k, v = qkv
    group_size = q.shape[1] // k.shape[1]
    return q, k.repeat_interleave(group_size, dim=1), v.repeat_interleave(group_size, dim=1)


def candidates(device: torch.device, names: tuple[str, ...] | None = None) -> dict[str, SDPBackend]:
    """The dense kernels raced on ``device``: all of :data:`CANDIDATES`, or those in ``names``."""
    kernels = CANDIDATES[device.type]
    chosen = {name: kernel for name, kernel in kernels.items() if names is None or name in names}
    if not chosen:
        raise ValueError(f"dense_kernels: none of {names} runs on {device.type} "
                         f"(its candidates: {', '.join(kernels)})")
    return chosen


def _time_kernel(kernel: SDPBackend, sets: list, measure: Callable) -> tuple[Timing, str]:
    """Time one kernel: native GQA if it runs, else expanded K/V; returns the timing and how."""
    native = partial(_sdpa, kernel=kernel, gqa=True)
    try:
        native(sets[0])
    except RuntimeError:
        expanded = [_expand_kv(qkv) for qkv in sets]
        return measure(partial(_sdpa, kernel=kernel, gqa=False), expanded), "expanded-kv"
    return measure(native, sets), "gqa"


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else repr(error)


def measure_dense(config: MSAConfig, *, batch: int, seq_len: int, dtype: torch.dtype,
                  device: torch.device, l2_bytes: int, measure: Callable,
                  kernels: tuple[str, ...] | None = None) -> DenseResult:
    """Race the dense candidates of ``device`` on random inputs of ``config``'s shape.

    ``measure(fn, inputs) -> Timing`` times ``fn`` over the list of input sets.
    """

    def make_set():
        q = torch.randn(batch, config.num_heads, seq_len, config.head_dim, device=device, dtype=dtype)
        k = torch.randn(batch, config.num_kv_heads, seq_len, config.head_dim, device=device,
                        dtype=dtype)
        return q, k, torch.randn_like(k)

    sets = [make_set()]
    add_input_sets(sets, make_set, l2_bytes, sum(t.numel() * t.element_size() for t in sets[0]))
    result = DenseResult()
    for name, kernel in candidates(device, kernels).items():
        try:
            timing, how = _time_kernel(kernel, sets, measure)
        except RuntimeError as error:  # unsupported here, or out of memory
            result.failures[name] = _first_line(error)
        else:
            label = name if how == "gqa" else f"{name}+{how}"
            result.candidates_ms[label] = timing.ms
            if result.timing is None or timing.ms < result.timing.ms:
                result.timing, result.backend = timing, label
        release_memory(device)
    return result
