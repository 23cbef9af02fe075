"""The one dispatch layer: which implementation runs a call, decided before any op runs.

A :class:`Backend` describes an implementation: a module with the same functions as every other
backend module (``select_blocks``, ``sparse_attention``, ``paged_select``, ``paged_attention``,
``paged_decode_attention``; see :mod:`msattn.backends.reference`), loaded lazily on first use,
and a ``supports`` predicate. The ``*_path`` functions pick the :class:`Path` of a call from its
arguments alone: the backend asked for, the device, dtype and sizes. The public functions of
:mod:`msattn.interface` and :mod:`msattn.paged` run exactly the path these functions return, so
calling one with the same arguments is how callers (benchmarks, tests) learn which path a call
takes. Nothing here holds state, and no op imports this module.

Fallbacks decided here:

* ``backend="triton"`` (or ``"auto"`` on CUDA) with a block size or head dim below 16 (``tl.dot``
  needs 16-wide tiles) runs the reference; ``Path.reason`` says so.
* ``msa_attention(backend="auto")`` on CUDA with fp16/bf16, when every sequence has at most
  ``topk`` blocks (MSA then equals dense causal attention), skips the indexer and runs torch's
  FlashAttention-2 (:mod:`msattn.ops.dense`), when that op is available for the device.
* Paged calls whose query runs are at most :data:`DECODE_MAX_QUERY_LEN` long use the
  query-outer decode kernel, longer runs (chunked prefill) the KV-outer kernel.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType

import torch

from msattn.ops import dense

NAMES = ("auto", "reference", "triton")

# Query runs up to this length use the query-outer decode kernel; longer runs (chunked
# prefill) use the KV-outer kernel, which loads each selected page once per chunk.
DECODE_MAX_QUERY_LEN = 16


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Backend:
    """An implementation of MSA's ops.

    Attributes:
        name: the ``backend=`` argument that asks for it.
        module: import path of its module (loaded on first :meth:`load`).
        min_tile: the smallest block size and head dims it takes (0: any).
        needs_triton: whether it runs Triton kernels (CUDA tensors, or CPU tensors under
            ``TRITON_INTERPRET=1``).
    """

    name: str
    module: str
    min_tile: int = 0
    needs_triton: bool = False

    def available(self, device: torch.device) -> bool:
        """Whether it can run on tensors of ``device`` at all."""
        if not self.needs_triton:
            return True
        return _triton_importable() and (device.type == "cuda"
                                         or (device.type == "cpu" and triton_interpreted()))

    def supports(self, block_size: int, *dims: int) -> bool:
        """Whether it takes this block (page) size and these head dims."""
        return block_size >= self.min_tile and min(dims, default=self.min_tile) >= self.min_tile

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


REFERENCE = Backend("reference", "msattn.backends.reference")
TRITON = Backend("triton", "msattn.backends.triton", min_tile=16, needs_triton=True)
REGISTRY = {backend.name: backend for backend in (REFERENCE, TRITON)}


@dataclass(frozen=True)
class Path:
    """The implementation each stage of a call runs.

    Attributes:
        select: backend name of the selection, or ``"skipped"`` (the dense path selects nothing).
        attention: ``"triton"``, ``"triton-decode"`` (paged query-outer kernel), ``"reference"``
            or ``"dense"`` (torch's FlashAttention-2).
        reason: why this differs from the backend asked for (empty when it does not).
    """

    select: str
    attention: str
    reason: str = ""

    def select_impl(self) -> ModuleType:
        return REGISTRY[self.select].load()

    def attention_impl(self) -> ModuleType:
        return REGISTRY["triton" if self.attention == "triton-decode" else self.attention].load()


def resolve(backend, device: torch.device) -> Backend:
    """The backend a ``backend`` name means for tensors on ``device``: ``"auto"`` is Triton on
    CUDA (when triton imports), else the reference. Raises ValueError for an unknown name or a
    backend that cannot run on ``device``."""
    if not isinstance(backend, str) or backend not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {backend!r}")
    if backend == "auto":
        return TRITON if device.type == "cuda" and TRITON.available(device) else REFERENCE
    chosen = REGISTRY[backend]
    if not chosen.available(device):
        raise ValueError(f"backend={backend!r} needs CUDA tensors (or TRITON_INTERPRET=1 for CPU "
                         f"tensors) and an importable triton; got tensors on {device}")
    return chosen


def _kernel(backend, device, block_size: int, dims: tuple[int, ...], what: str) -> tuple[str, str]:
    chosen = resolve(backend, device)
    if chosen.supports(block_size, *dims):
        return chosen.name, ""
    return REFERENCE.name, f"{chosen.name} takes no {what} below {chosen.min_tile}"


def select_path(backend, device: torch.device, *, block_size: int, index_dim: int) -> Path:
    """The path of :func:`msattn.msa_select`."""
    name, reason = _kernel(backend, device, block_size, (index_dim,), "block_size or Di")
    return Path(name, name, reason)


def sparse_attention_path(backend, device: torch.device, *, block_size: int, head_dim: int) -> Path:
    """The path of :func:`msattn.msa_sparse_attention`."""
    name, reason = _kernel(backend, device, block_size, (head_dim,), "block_size or D")
    return Path(name, name, reason)


def indexer_loss_path(backend, device: torch.device, *, block_size: int, head_dim: int,
                      index_dim: int) -> Path:
    """The path of :func:`msattn.msa_indexer_loss` (``attention`` names the backend that runs it)."""
    name, reason = _kernel(backend, device, block_size, (head_dim, index_dim), "block_size, D or Di")
    return Path(name, name, reason)


def dense_possible(backend, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether :func:`attention_path` may pick the dense path (then it needs ``max_seqlen_k``)."""
    return backend == "auto" and dense.available(device, dtype, head_dim)


def attention_path(backend, device: torch.device, dtype: torch.dtype, *, block_size: int, topk: int,
                   head_dim: int, index_dim: int, max_seqlen_k: int | None) -> Path:
    """The path of :func:`msattn.msa_attention`; ``max_seqlen_k`` (the longest key sequence) is
    needed only when :func:`dense_possible`."""
    if dense_possible(backend, device, dtype, head_dim):
        if max_seqlen_k is None:
            raise ValueError("attention_path needs max_seqlen_k to decide on the dense path")
        if dense.dense_is_exact(max_seqlen_k, topk, block_size):
            return Path("skipped", "dense", f"every sequence has at most topk * block_size = "
                        f"{topk * block_size} keys, where MSA equals dense causal attention")
    name, reason = _kernel(backend, device, block_size, (head_dim, index_dim), "block_size, D or Di")
    return Path(name, name, reason)


def paged_path(backend, device: torch.device, *, page_size: int, index_dim: int,
               head_dim: int | None = None, max_seqlen_q: int = 1) -> Path:
    """The path of :func:`msattn.msa_paged_select` (``head_dim`` None) and
    :func:`msattn.msa_paged_attention`: ``"triton-decode"`` attention for query runs of at most
    :data:`DECODE_MAX_QUERY_LEN` tokens."""
    dims = (index_dim,) if head_dim is None else (index_dim, head_dim)
    name, reason = _kernel(backend, device, page_size, dims, "page_size, D or Di")
    attention = name
    if name == "triton" and max_seqlen_q <= DECODE_MAX_QUERY_LEN:
        attention = "triton-decode"
    return Path(name, attention, reason)
