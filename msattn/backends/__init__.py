"""Backend modules: one per implementation, each with the same functions (the varlen and paged
signatures below), loaded lazily by :mod:`msattn.dispatch`. Inputs are already checked.

* ``select_blocks(qi, ki, cu_seqlens_q, cu_seqlens_k, *, block_size, topk, init_blocks,
  local_blocks, max_seqlen_q, max_seqlen_k) -> indices [G, total_q, topk]``
* ``sparse_attention(q, k, v, indices, cu_seqlens_q, cu_seqlens_k, *, block_size, softmax_scale,
  deterministic) -> (o, lse)`` (differentiable in q, k, v)
* ``paged_select(qi, index_cache, block_table, cu_seqlens_q, seq_lens, *, topk, init_blocks,
  local_blocks, index_scale, max_seqlen_q) -> indices``
* ``paged_attention(q, k_cache, v_cache, indices, block_table, cu_seqlens_q, seq_lens, *,
  softmax_scale, max_seqlen_q) -> (o, lse)`` (chunked prefill) and ``paged_decode_attention``
  (the same signature; query runs of at most ``DECODE_MAX_QUERY_LEN`` tokens).
* ``indexer_loss(q, k, qi, ki, indices, cu_seqlens_q, cu_seqlens_k, *, block_size, softmax_scale,
  lse, max_seqlen_k) -> loss`` (0-d float32, differentiable in qi and ki)
"""

FUNCTIONS = ("select_blocks", "sparse_attention", "paged_select", "paged_attention",
             "paged_decode_attention", "indexer_loss")
