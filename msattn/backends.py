"""Backend registry: which implementation runs a call.

A backend provides ``select_blocks``, ``sparse_attention`` and ``attention`` with the varlen
signatures of :mod:`msattn.reference`. ``"auto"`` picks the fastest one available for the device.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from msattn import reference

NAMES = ("auto", "reference", "triton")

# Which implementation ran the last call of each stage ("select", "attention"), e.g. "triton",
# "reference" or "dense": callers and benchmarks read it to report the path taken.
LAST_PATH: dict[str, str] = {}


def record_path(stage: str, path: str) -> None:
    LAST_PATH[stage] = path


def _reference_select(qi, ki, cu_seqlens_q, cu_seqlens_k, **kwargs):
    record_path("select", "reference")
    return reference.select_blocks(qi, ki, cu_seqlens_q, cu_seqlens_k, **kwargs)


def _reference_sparse_attention(q, k, v, indices, cu_seqlens_q, cu_seqlens_k, **kwargs):
    record_path("attention", "reference")
    return reference.sparse_attention(q, k, v, indices, cu_seqlens_q, cu_seqlens_k, **kwargs)


def _reference_attention(q, k, v, qi, ki, cu_seqlens_q, cu_seqlens_k, *, block_size, topk,
                         init_blocks, local_blocks, softmax_scale):
    indices = _reference_select(qi, ki, cu_seqlens_q, cu_seqlens_k, block_size=block_size,
                                      topk=topk, init_blocks=init_blocks, local_blocks=local_blocks)
    return _reference_sparse_attention(q, k, v, indices, cu_seqlens_q, cu_seqlens_k,
                                       block_size=block_size, softmax_scale=softmax_scale)


REFERENCE = SimpleNamespace(name="reference", select_blocks=_reference_select,
                            sparse_attention=_reference_sparse_attention,
                            attention=_reference_attention)


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device``."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())


def resolve(backend, device: torch.device):
    """Return the backend object for a ``backend`` name and the inputs' device."""
    if not isinstance(backend, str) or backend not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {backend!r}")
    if backend == "reference":
        return REFERENCE
    if backend == "auto":
        return _triton_backend() if device.type == "cuda" and triton_available(device) else REFERENCE
    if not triton_available(device):
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors) "
                         f"and an importable triton; got tensors on {device}")
    return _triton_backend()


def _triton_backend():
    from msattn.ops import backend as triton_backend
    return triton_backend.TRITON
