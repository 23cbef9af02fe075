"""The reference backend: exact PyTorch (:mod:`msattn.reference`) on any device; paged caches are
gathered into contiguous tensors first (a host sync). Differentiable through torch autograd."""

from __future__ import annotations

from msattn import reference
from msattn.cache import dequantize_index_keys, dequantize_kv, gather_paged, quantize_index_keys
from msattn.ops.nvfp4 import dequantize_nvfp4


def select_blocks(qi, ki, cu_seqlens_q, cu_seqlens_k, *, block_size, topk, init_blocks,
                  local_blocks, max_seqlen_q=None, max_seqlen_k=None, index_dtype=None):
    if index_dtype is not None:  # the fp8 index path: fp8 keys (per token) against fp8 queries
        ki = dequantize_index_keys(*quantize_index_keys(ki))
        qi = reference.fp8_index_queries(qi)
    return reference.select_blocks(qi, ki, cu_seqlens_q, cu_seqlens_k, block_size=block_size,
                                   topk=topk, init_blocks=init_blocks, local_blocks=local_blocks)


def sparse_attention(q, k, v, indices, cu_seqlens_q, cu_seqlens_k, *, block_size, softmax_scale,
                     deterministic=False):
    return reference.sparse_attention(q, k, v, indices, cu_seqlens_q, cu_seqlens_k,
                                      block_size=block_size, softmax_scale=softmax_scale)


def paged_select(qi, index_cache, block_table, cu_seqlens_q, seq_lens, *, topk, init_blocks,
                 local_blocks, index_scale, max_seqlen_q=None, index_block_scale=None):
    keys, cu_seqlens_k = gather_paged(index_cache, block_table, seq_lens)
    if index_block_scale is not None:  # 4-bit keys: their dequantised values, the queries as given
        keys = dequantize_nvfp4(keys, gather_paged(index_block_scale, block_table, seq_lens)[0],
                                gather_paged(index_scale, block_table, seq_lens)[0])
    elif index_scale is not None:  # the fp8 index path: fp8 keys against fp8 queries
        keys = dequantize_index_keys(keys, gather_paged(index_scale, block_table, seq_lens)[0])
        qi = reference.fp8_index_queries(qi)
    return reference.select_blocks(qi, keys, cu_seqlens_q, cu_seqlens_k,
                                   block_size=index_cache.shape[1], topk=topk,
                                   init_blocks=init_blocks, local_blocks=local_blocks)


def paged_attention(q, k_cache, v_cache, indices, block_table, cu_seqlens_q, seq_lens, *,
                    softmax_scale, max_seqlen_q=None, k_scale=None, v_scale=None):
    k, cu_seqlens_k = gather_paged(k_cache, block_table, seq_lens)
    v, _ = gather_paged(v_cache, block_table, seq_lens)
    if k_scale is not None:  # fp8 K/V: the exact attention on the dequantised (float32) values
        k, v = dequantize_kv(k, k_scale), dequantize_kv(v, v_scale)
    return reference.sparse_attention(q, k, v, indices, cu_seqlens_q, cu_seqlens_k,
                                      block_size=k_cache.shape[1], softmax_scale=softmax_scale)


paged_decode_attention = paged_attention


def indexer_loss(q, k, qi, ki, indices, cu_seqlens_q, cu_seqlens_k, *, block_size, softmax_scale,
                 lse=None, max_seqlen_k=None):
    return reference.indexer_loss(q, k, qi, ki, indices, cu_seqlens_q, cu_seqlens_k,
                                  block_size=block_size, softmax_scale=softmax_scale, lse=lse)
