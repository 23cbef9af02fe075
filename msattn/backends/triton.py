"""The Triton backend: the fused indexer, the KV-outer sparse attention (with its backward when
gradients are needed) and the paged decode kernels. Inputs are checked and supported
(:meth:`msattn.dispatch.Backend.supports`); nothing here synchronises with the host when the
``max_seqlen_*`` arguments are given."""

from __future__ import annotations

import torch

from msattn.ops import indexer, paged_attention as decode, sparse_attention as sparse


def select_blocks(qi, ki, cu_seqlens_q, cu_seqlens_k, *, block_size, topk, init_blocks,
                  local_blocks, max_seqlen_q=None, max_seqlen_k=None, index_dtype=None):
    if index_dtype is not None:  # the fp8 index path
        return indexer.select_blocks_fp8(qi, ki, cu_seqlens_q, cu_seqlens_k, block_size=block_size,
                                         topk=topk, init_blocks=init_blocks,
                                         local_blocks=local_blocks, max_seqlen_q=max_seqlen_q,
                                         max_seqlen_k=max_seqlen_k)
    return indexer.select_blocks(qi, ki, cu_seqlens_q, cu_seqlens_k, block_size=block_size,
                                 topk=topk, init_blocks=init_blocks, local_blocks=local_blocks,
                                 max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def sparse_attention(q, k, v, indices, cu_seqlens_q, cu_seqlens_k, *, block_size, softmax_scale,
                     deterministic=False):
    if _needs_grad(q, k, v):
        from msattn.ops.sparse_attention_bwd import sparse_attention_autograd

        return sparse_attention_autograd(q, k, v, indices, cu_seqlens_q, cu_seqlens_k,
                                         block_size=block_size, softmax_scale=softmax_scale,
                                         deterministic=deterministic)
    return sparse.sparse_attention(q, k, v, indices, cu_seqlens_q, cu_seqlens_k,
                                   block_size=block_size, softmax_scale=softmax_scale)


def paged_select(qi, index_cache, block_table, cu_seqlens_q, seq_lens, *, topk, init_blocks,
                 local_blocks, index_scale, max_seqlen_q=None, index_block_scale=None):
    return indexer.select_blocks_paged(qi, index_cache, block_table, cu_seqlens_q, seq_lens,
                                       topk=topk, init_blocks=init_blocks,
                                       local_blocks=local_blocks, index_scale=index_scale,
                                       index_block_scale=index_block_scale,
                                       max_len_q=max_seqlen_q)


def paged_attention(q, k_cache, v_cache, indices, block_table, cu_seqlens_q, seq_lens, *,
                    softmax_scale, max_seqlen_q=None, k_scale=None, v_scale=None):
    """KV-outer attention over paged K/V (chunked prefill); fp8 K/V with their scales."""
    return sparse.sparse_attention(q, k_cache, v_cache, indices, cu_seqlens_q, None,
                                   block_size=k_cache.shape[1], softmax_scale=softmax_scale,
                                   block_table=block_table, seq_lens=seq_lens, k_scale=k_scale,
                                   v_scale=v_scale)


def paged_decode_attention(q, k_cache, v_cache, indices, block_table, cu_seqlens_q, seq_lens, *,
                           softmax_scale, max_seqlen_q, k_scale=None, v_scale=None):
    """Query-outer decode attention (query runs of at most ``DECODE_MAX_QUERY_LEN`` tokens);
    fp8 K/V with their scales."""
    plan = decode.plan_paged_attention(
        q.shape[0], block_table.shape[0], max_seqlen_q, q.shape[1], k_cache.shape[2], q.shape[2],
        indices.shape[-1], q.dtype, q.device)
    o = torch.empty_like(q)
    lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device)
    return decode.run_paged_attention(plan, q, k_cache, v_cache, indices, block_table,
                                      cu_seqlens_q, seq_lens, softmax_scale=softmax_scale,
                                      out=(o, lse), k_scale=k_scale, v_scale=v_scale)


def indexer_loss(q, k, qi, ki, indices, cu_seqlens_q, cu_seqlens_k, *, block_size, softmax_scale,
                 lse=None, max_seqlen_k=None):
    from msattn.ops.indexer_loss import indexer_loss as triton_indexer_loss

    return triton_indexer_loss(q, k, qi, ki, indices, cu_seqlens_q, cu_seqlens_k,
                               block_size=block_size, softmax_scale=softmax_scale, lse=lse,
                               max_seqlen_k=max_seqlen_k)
