"""The Triton backend: the fused indexer and the KV-outer sparse attention.

Block sizes below 16 are not supported by the kernels (``tl.dot`` needs 16 keys per tile); such
calls run the reference and :data:`msattn.backends.LAST_PATH` says so.
"""

from __future__ import annotations

from types import SimpleNamespace

from msattn import backends, reference
from msattn.ops.indexer import select_blocks as _triton_select
from msattn.ops.sparse_attention import sparse_attention as _triton_sparse_attention

MIN_BLOCK_SIZE = 16


def kernels_support(block_size: int, *dims: int) -> bool:
    """Whether the kernels take this block size and these head dims (``tl.dot`` needs 16-wide tiles)."""
    return block_size >= MIN_BLOCK_SIZE and min(dims) >= MIN_BLOCK_SIZE


def select_blocks(qi, ki, cu_seqlens_q, cu_seqlens_k, *, block_size, topk, init_blocks,
                  local_blocks):
    if not kernels_support(block_size, qi.shape[-1]):
        backends.record_path("select", "reference (block_size or Di below 16)")
        return reference.select_blocks(qi, ki, cu_seqlens_q, cu_seqlens_k, block_size=block_size,
                                       topk=topk, init_blocks=init_blocks, local_blocks=local_blocks)
    backends.record_path("select", "triton")
    return _triton_select(qi, ki, cu_seqlens_q, cu_seqlens_k, block_size=block_size, topk=topk,
                          init_blocks=init_blocks, local_blocks=local_blocks)


def sparse_attention(q, k, v, indices, cu_seqlens_q, cu_seqlens_k, *, block_size, softmax_scale):
    if not kernels_support(block_size, q.shape[-1]):
        backends.record_path("attention", "reference (block_size or D below 16)")
        return reference.sparse_attention(q, k, v, indices, cu_seqlens_q, cu_seqlens_k,
                                          block_size=block_size, softmax_scale=softmax_scale)
    backends.record_path("attention", "triton")
    return _triton_sparse_attention(q, k, v, indices, cu_seqlens_q, cu_seqlens_k,
                                    block_size=block_size, softmax_scale=softmax_scale)


def attention(q, k, v, qi, ki, cu_seqlens_q, cu_seqlens_k, *, block_size, topk, init_blocks,
              local_blocks, softmax_scale):
    indices = select_blocks(qi, ki, cu_seqlens_q, cu_seqlens_k, block_size=block_size, topk=topk,
                            init_blocks=init_blocks, local_blocks=local_blocks)
    return sparse_attention(q, k, v, indices, cu_seqlens_q, cu_seqlens_k, block_size=block_size,
                            softmax_scale=softmax_scale)


TRITON = SimpleNamespace(name="triton", kernels_support=kernels_support, select_blocks=select_blocks,
                         sparse_attention=sparse_attention, attention=attention)
