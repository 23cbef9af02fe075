"""MSA against paged caches: decode and chunked prefill, functional and plan/run (CUDA graphs).

Cache layout (flash-attn / vLLM): ``k_cache, v_cache [num_pages, page_size, G, D]`` (any strides
with a contiguous last dim) in q's dtype, or float8_e4m3fn with float32 ``k_scale``, ``v_scale``
of shape ``[]`` (per tensor) or ``[G]`` (per KV head), real K = ``k_cache.float() * k_scale``
(q fp16/bf16), ``index_cache [num_pages, page_size, Di]`` in fp16/bf16, or
float8_e4m3fn with ``index_scale [num_pages, page_size]`` float32 (key = value x scale), or, for
decode, 4-bit (:mod:`msattn.ops.nvfp4`): uint8 ``[num_pages, page_size, Di / 2]`` with
``index_block_scale [num_pages, page_size, Di / 16]`` float8_e4m3fn and ``index_scale``. The page
size is the MSA block size. ``block_table [B, max_pages]`` int32 maps request ``b``'s block ``j``
to a page (entries past a request's pages are never read); ``seq_lens [B]`` int32 counts the
tokens written, the new ones included; the new query tokens of request ``b`` are the last
``cu_seqlens_q[b+1] - cu_seqlens_q[b]`` of its ``seq_lens[b]`` tokens.
"""

from __future__ import annotations

import torch

from msattn import dispatch
from msattn._checks import (FLOAT_DTYPES, FP8_DTYPE, KV_DTYPES, NVFP4_DTYPE,
                            PAGED_INDEX_DTYPES, check_4bit_index_dim, check_batch_layout,
                            check_batch_layout_values, check_block_size, check_dtype_choice,
                            check_index_scale, check_kv_scales, check_optional_int,
                            check_same_device, check_selection_params, check_tensor,
                            softmax_scale_or_default)
from msattn.dispatch import DECODE_MAX_QUERY_LEN


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------

def _check_layout(qi, index_cache, block_table, cu_seqlens_q, seq_lens, index_scale,
                  index_block_scale=None) -> None:
    """Shapes and dtypes of the selection inputs (no host synchronisation)."""
    check_tensor("qi", qi, 3, "[total_q, G, Di]")
    check_tensor("index_cache", index_cache, 3, "[num_pages, page_size, Di]",
                 dtypes=PAGED_INDEX_DTYPES)
    if index_cache.dtype == NVFP4_DTYPE:
        check_4bit_index_dim("Di (qi.shape[2])", qi.shape[2])
        if index_cache.shape[2] * 2 != qi.shape[2]:
            raise ValueError(f"a 4-bit index_cache must have shape [num_pages, page_size, Di / 2 = "
                             f"{qi.shape[2] // 2}] (Di from qi), got {tuple(index_cache.shape)}")
    elif index_cache.shape[2] != qi.shape[2]:
        raise ValueError(f"index_cache must have shape [num_pages, page_size, Di={qi.shape[2]}] to "
                         f"match qi, got {tuple(index_cache.shape)}")
    check_block_size(index_cache.shape[1], "page_size (index_cache.shape[1])")
    check_index_scale(index_cache, index_scale, index_block_scale)
    check_batch_layout(block_table, cu_seqlens_q, seq_lens, index_cache.device)
    check_same_device(qi=qi, index_cache=index_cache, index_scale=index_scale,
                      index_block_scale=index_block_scale)


def _check_4bit_decode(index_cache, max_seqlen_q: int) -> None:
    if index_cache.dtype == NVFP4_DTYPE and max_seqlen_q > DECODE_MAX_QUERY_LEN:
        raise ValueError(f"4-bit index keys are read by the decode selection only: query runs of "
                         f"at most {DECODE_MAX_QUERY_LEN} tokens, got max_seqlen_q = {max_seqlen_q}")


def _check_lengths(total_q: int, block_table, cu_seqlens_q, seq_lens, page_size: int,
                   num_pages: int, max_seqlen_q) -> int:
    """The longest query run: ``max_seqlen_q`` when given (the values are then trusted: no host
    sync), else read back with the values checked (page ids in range, lengths consistent)."""
    check_optional_int("max_seqlen_q", max_seqlen_q)
    if max_seqlen_q is not None:
        return max_seqlen_q
    return check_batch_layout_values(block_table, cu_seqlens_q, seq_lens, num_pages, page_size,
                                     total_q)


def _check_attention_layout(q, qi, k_cache, v_cache, index_cache, k_scale, v_scale) -> None:
    check_tensor("q", q, 3, "[total_q, H, D]")
    check_tensor("k_cache", k_cache, 4, "[num_pages, page_size, G, D]", KV_DTYPES)
    check_tensor("v_cache", v_cache, 4, "[num_pages, page_size, G, D]", KV_DTYPES)
    num_pages, page_size, num_groups, head_dim = k_cache.shape
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"v_cache must have the shape of k_cache {tuple(k_cache.shape)}, got "
                         f"{tuple(v_cache.shape)}")
    if q.shape[2] != head_dim:
        raise ValueError(f"q must have head dim D = {head_dim} (k_cache), got {q.shape[2]}")
    if q.shape[1] % num_groups:
        raise ValueError(f"the number of query heads H = {q.shape[1]} must be a multiple of the "
                         f"number of KV heads G = {num_groups} (q and k_cache)")
    check_kv_scales(k_cache, v_cache, k_scale, v_scale, q_dtype=q.dtype)
    if qi.shape[0] != q.shape[0] or qi.shape[1] != num_groups:
        raise ValueError(f"qi must have shape [total_q={q.shape[0]}, G={num_groups}, Di], got "
                         f"{tuple(qi.shape)}")
    if tuple(index_cache.shape[:2]) != (num_pages, page_size):
        raise ValueError(f"index_cache must have the pages of k_cache [num_pages={num_pages}, "
                         f"page_size={page_size}, Di], got {tuple(index_cache.shape)}")
    for name, tensor in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides "
                             f"{tuple(tensor.stride())}")
    check_same_device(q=q, qi=qi, k_cache=k_cache, v_cache=v_cache)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------

def msa_paged_select(qi, index_cache, block_table, cu_seqlens_q, seq_lens, *, topk=16,
                     init_blocks=0, local_blocks=1, index_scale=None, index_block_scale=None,
                     max_seqlen_q=None, backend="auto"):
    """MSA stage 1 against a paged index-key cache (decode and chunked prefill).

    Args:
        qi: ``[total_q, G, Di]`` fp16/bf16/fp32 index queries of the new tokens.
        index_cache: ``[num_pages, page_size, Di]`` fp16/bf16/fp32, or float8_e4m3fn with
            ``index_scale [num_pages, page_size]`` float32, or 4-bit (decode: query runs of at
            most 16 tokens; :mod:`msattn.ops.nvfp4`) uint8 ``[num_pages, page_size, Di / 2]``
            with ``index_block_scale [num_pages, page_size, Di / 16]`` float8_e4m3fn and the
            token scales ``index_scale``.
        block_table: int32 ``[B, max_pages]``; cu_seqlens_q: int32 ``[B + 1]``; seq_lens: int32 ``[B]``.
        topk, init_blocks, local_blocks: as :func:`msattn.msa_select`; the block size is the page size.
        max_seqlen_q: the longest query run (an int). Given, the call does not synchronise with
            the host and trusts the values of the layout tensors; otherwise they are checked
            (page ids in range, lengths consistent) and read back.
    Returns:
        int32 ``[G, total_q, topk]``: block ids relative to each request (``j`` is the request's
        ``j``-th page), valid entries first, ``-1`` padding.
    """
    check_selection_params(topk, init_blocks, local_blocks)
    _check_layout(qi, index_cache, block_table, cu_seqlens_q, seq_lens, index_scale,
                  index_block_scale)
    max_seqlen_q = _check_lengths(qi.shape[0], block_table, cu_seqlens_q, seq_lens,
                                  index_cache.shape[1], index_cache.shape[0], max_seqlen_q)
    _check_4bit_decode(index_cache, max_seqlen_q)
    path = dispatch.paged_path(backend, qi.device, page_size=index_cache.shape[1],
                               index_dim=qi.shape[2])
    return path.select_impl().paged_select(qi, index_cache, block_table, cu_seqlens_q, seq_lens,
                                           topk=topk, init_blocks=init_blocks,
                                           local_blocks=local_blocks, index_scale=index_scale,
                                           index_block_scale=index_block_scale,
                                           max_seqlen_q=max_seqlen_q)


def msa_paged_attention(q, qi, k_cache, v_cache, index_cache, block_table, cu_seqlens_q, seq_lens,
                        *, topk=16, init_blocks=0, local_blocks=1, softmax_scale=None,
                        index_scale=None, index_block_scale=None, k_scale=None, v_scale=None,
                        max_seqlen_q=None, return_lse=False, backend="auto"):
    """Full MSA for new query tokens against paged K/V and index-key caches.

    Args:
        q: ``[total_q, H, D]`` fp16/bf16/fp32; qi: ``[total_q, G, Di]``.
        k_cache, v_cache: ``[num_pages, page_size, G, D]`` in q's dtype, or float8_e4m3fn (q
            fp16/bf16) with ``k_scale``, ``v_scale``.
        k_scale, v_scale: float32 ``[]`` (per tensor) or ``[G]`` (per KV head) on the caches'
            device, required with fp8 caches and None otherwise: real K = ``k_cache.float() *
            k_scale``, real V = ``v_cache.float() * v_scale``.
        index_cache, index_scale, index_block_scale, block_table, cu_seqlens_q, seq_lens,
            max_seqlen_q: as :func:`msa_paged_select`.
        softmax_scale: defaults to ``D ** -0.5``.
    Returns:
        o ``[total_q, H, D]`` in q's dtype, or ``(o, lse)`` with lse float32 ``[total_q, H]`` when
        ``return_lse``. :func:`msattn.dispatch.paged_path` gives the path the call takes.
    """
    check_selection_params(topk, init_blocks, local_blocks)
    _check_layout(qi, index_cache, block_table, cu_seqlens_q, seq_lens, index_scale,
                  index_block_scale)
    _check_attention_layout(q, qi, k_cache, v_cache, index_cache, k_scale, v_scale)
    max_seqlen_q = _check_lengths(q.shape[0], block_table, cu_seqlens_q, seq_lens,
                                  k_cache.shape[1], k_cache.shape[0], max_seqlen_q)
    _check_4bit_decode(index_cache, max_seqlen_q)
    scale = softmax_scale_or_default(softmax_scale, q.shape[-1])
    o, lse = run_paged_attention(q, qi, k_cache, v_cache, index_cache, block_table, cu_seqlens_q,
                                 seq_lens, topk=topk, init_blocks=init_blocks,
                                 local_blocks=local_blocks, softmax_scale=scale,
                                 index_scale=index_scale, index_block_scale=index_block_scale,
                                 k_scale=k_scale, v_scale=v_scale, max_seqlen_q=max_seqlen_q,
                                 backend=backend)
    return (o, lse) if return_lse else o


def run_paged_attention(q, qi, k_cache, v_cache, index_cache, block_table, cu_seqlens_q, seq_lens,
                        *, topk: int, init_blocks: int, local_blocks: int, softmax_scale: float,
                        index_scale, max_seqlen_q: int, backend: str, k_scale=None, v_scale=None,
                        index_block_scale=None):
    """:func:`msa_paged_attention` on checked inputs (no checks, no host sync): the selection,
    then the decode or the KV-outer attention, on the path of :func:`msattn.dispatch.paged_path`.
    Returns ``(o, lse)``; shared by the custom op of :mod:`msattn.library`."""
    path = dispatch.paged_path(backend, q.device, page_size=k_cache.shape[1], index_dim=qi.shape[2],
                               head_dim=q.shape[2], max_seqlen_q=max_seqlen_q)
    indices = path.select_impl().paged_select(qi, index_cache, block_table, cu_seqlens_q, seq_lens,
                                              topk=topk, init_blocks=init_blocks,
                                              local_blocks=local_blocks, index_scale=index_scale,
                                              index_block_scale=index_block_scale,
                                              max_seqlen_q=max_seqlen_q)
    impl = path.attention_impl()
    attend = impl.paged_decode_attention if path.attention == "triton-decode" else impl.paged_attention
    return attend(q, k_cache, v_cache, indices, block_table, cu_seqlens_q, seq_lens,
                  softmax_scale=softmax_scale, max_seqlen_q=max_seqlen_q, k_scale=k_scale,
                  v_scale=v_scale)


class MSAPagedWrapper:
    """FlashInfer-style plan/run for MSA decode against paged caches, capturable in CUDA graphs.

    ``plan()`` fixes the batch layout (``cu_seqlens_q``, at most ``DECODE_MAX_QUERY_LEN`` tokens
    per request) and the table width, and allocates every workspace and the outputs, outside graph
    capture. ``run()`` then launches the indexer (which merges its key splits) and the attention
    (which merges its slot splits), two kernels and nothing else: no host synchronisation, no
    allocation, no argument reads, so a captured ``run()`` can be replayed after the caches,
    ``block_table`` and ``seq_lens`` are updated in place. ``run()`` does not check its inputs:
    check them once with :func:`msa_paged_attention`.

    Example::

        wrapper = MSAPagedWrapper(num_heads=64, num_kv_heads=4, head_dim=128, index_dim=128,
                                  page_size=128)
        wrapper.plan(cu_seqlens_q, max_pages=block_table.shape[1])  # kv_dtype=torch.float8_e4m3fn
        o = wrapper.run(q, qi, k_cache, v_cache, index_cache, block_table, seq_lens)  # k_scale=...
        # 4-bit index keys (msattn.ops.nvfp4.quantize_nvfp4): plan(..., index_dtype=torch.uint8),
        # run(..., index_scale=token_scale_cache, index_block_scale=block_scale_cache)
    """

    def __init__(self, *, num_heads: int, num_kv_heads: int, head_dim: int, index_dim: int,
                 page_size: int, topk: int = 16, init_blocks: int = 0, local_blocks: int = 1,
                 softmax_scale: float | None = None, device="cuda", backend: str = "auto"):
        check_block_size(page_size)
        check_selection_params(topk, init_blocks, local_blocks)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads = {num_heads} must be a multiple of num_kv_heads = {num_kv_heads}")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.index_dim, self.page_size = head_dim, index_dim, page_size
        self.topk, self.init_blocks, self.local_blocks = topk, init_blocks, local_blocks
        self.softmax_scale = softmax_scale_or_default(softmax_scale, head_dim)
        self.device = torch.device(device)
        path = dispatch.paged_path(backend, self.device, page_size=page_size, index_dim=index_dim,
                                   head_dim=head_dim)
        if path.select != "triton":
            raise ValueError(f"MSAPagedWrapper runs the Triton kernels; backend={backend!r} on "
                             f"{self.device} with page_size {page_size}, D {head_dim}, Di {index_dim} "
                             "cannot (use msa_paged_attention for the reference)")
        self._plan = None

    def plan(self, cu_seqlens_q: torch.Tensor, max_pages: int, *, dtype: torch.dtype = torch.bfloat16,
             kv_dtype: torch.dtype | None = None, index_dtype: torch.dtype = torch.bfloat16,
             selection_config=None, attention_config=None) -> None:
        """Fix the batch layout and allocate the workspaces (call outside graph capture).

        Args:
            cu_seqlens_q: int32 ``[B + 1]`` (host or device): the query tokens of each request,
                1..``DECODE_MAX_QUERY_LEN`` each; fixed until the next ``plan()``.
            max_pages: width of the ``block_table`` that ``run()`` will get.
            dtype: dtype of q and of the output; kv_dtype: of the K/V caches, ``dtype`` when None
                or float8_e4m3fn (then ``dtype`` fp16/bf16, and ``run()`` takes ``k_scale``,
                ``v_scale``); index_dtype: of the index cache: fp16/bf16/fp32, float8_e4m3fn
                (``run(index_scale=)``), or torch.uint8 for 4-bit keys (:mod:`msattn.ops.nvfp4`:
                an index cache ``[num_pages, page_size, Di / 2]`` of e2m1 codes, ``run()`` then
                takes ``index_block_scale`` and ``index_scale``; Di a power of two, at least 32).
            selection_config: an :class:`msattn.ops.indexer.IndexerConfig` instead of the tuned
                one, for tuning.
            attention_config: a :class:`msattn.ops.paged_attention.PagedAttentionConfig` instead
                of the tuned one; ``PagedAttentionConfig(tokens_per_program=8, num_warps=8)``
                reads each page that several tokens of a request chose once for all of them
                (faster only when the tokens mostly share pages and the grid is full: 263 vs 306
                us at 32 x 8 x 64K correlated on an H200, slower on random selections and with
                4 warps; see benchmarks/README.md).
        """
        from msattn.ops import paged_attention
        from msattn.ops.indexer import PageTopkConfig, plan_selection

        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("MSAPagedWrapper.plan() allocates and reads cu_seqlens_q on the "
                               "host: call it before graph capture, then capture run()")
        check_tensor("cu_seqlens_q", cu_seqlens_q, 1, "[B + 1]", dtypes=(torch.int32,))
        check_dtype_choice("dtype", dtype, FLOAT_DTYPES)
        kv_dtype = dtype if kv_dtype is None else kv_dtype
        check_dtype_choice("kv_dtype", kv_dtype, (dtype, FP8_DTYPE))
        if kv_dtype == FP8_DTYPE and dtype == torch.float32:
            raise TypeError("kv_dtype float8_e4m3fn needs dtype float16 or bfloat16 (the queries), "
                            "got float32")
        check_dtype_choice("index_dtype", index_dtype, PAGED_INDEX_DTYPES)
        if index_dtype == NVFP4_DTYPE:
            check_4bit_index_dim("index_dim", self.index_dim)
        if index_dtype == NVFP4_DTYPE and selection_config is not None and \
                not isinstance(selection_config, PageTopkConfig):
            raise ValueError("4-bit index keys are read by the decode selection only: "
                             "selection_config must be a PageTopkConfig or None")
        cu = cu_seqlens_q.tolist()
        lengths = [y - x for x, y in zip(cu, cu[1:])]
        if not lengths or cu[0] != 0 or min(lengths) < 0:
            raise ValueError(f"cu_seqlens_q must be int32 [B + 1] prefix sums from 0, got {cu}")
        max_len_q = max(lengths)
        if max_len_q > DECODE_MAX_QUERY_LEN:
            raise ValueError(f"MSAPagedWrapper serves decode steps of 1..{DECODE_MAX_QUERY_LEN} tokens "
                             f"per request, got {max_len_q}; use msa_paged_attention for longer runs")
        batch, total_q = len(lengths), cu[-1]
        self.cu_seqlens_q = torch.tensor(cu, dtype=torch.int32, device=self.device)
        self.batch, self.total_q, self.max_len_q, self.max_pages = batch, total_q, max_len_q, max_pages
        self.selection_plan = plan_selection(total_q, batch, self.num_kv_heads, max_len_q, max_pages,
                                             topk=self.topk, device=self.device,
                                             config=selection_config,
                                             four_bit_keys=index_dtype == NVFP4_DTYPE)
        self.attention_plan = paged_attention.plan_paged_attention(
            total_q, batch, max_len_q, self.num_heads, self.num_kv_heads, self.head_dim, self.topk,
            dtype, self.device, config=attention_config)
        self.indices = torch.empty(self.num_kv_heads, total_q, self.topk, dtype=torch.int32,
                                   device=self.device)
        self.o = torch.empty(total_q, self.num_heads, self.head_dim, dtype=dtype, device=self.device)
        self.lse = torch.empty(total_q, self.num_heads, dtype=torch.float32, device=self.device)
        self._plan = (dtype, kv_dtype, index_dtype)

    def run(self, q, qi, k_cache, v_cache, index_cache, block_table, seq_lens, *, index_scale=None,
            index_block_scale=None, k_scale=None, v_scale=None, out: torch.Tensor | None = None,
            lse: torch.Tensor | None = None, return_lse: bool = False):
        """One MSA step for the planned layout: ``q [total_q, H, D]``, ``qi [total_q, G, Di]``,
        the caches, ``block_table [B, max_pages]`` and ``seq_lens [B]`` (see the module doc).

        Args:
            index_scale: with an fp8 index cache (float32 ``[num_pages, page_size]``), or the
                token scales of a 4-bit one; index_block_scale: with a 4-bit index cache,
                float8_e4m3fn ``[num_pages, page_size, Di / 16]`` (:mod:`msattn.ops.nvfp4`);
                k_scale, v_scale: float32 ``[]`` or ``[G]`` with fp8 K/V caches (see
                :func:`msa_paged_attention`).
            out: ``[total_q, H, D]`` in the planned dtype, where ``o`` goes (as in FlashInfer), so
                that one plan serves every layer of a model; default: the wrapper's own buffer,
                which the next ``run()`` overwrites.
            lse: float32 ``[total_q, H]``, where the log-sum-exp goes (default: the wrapper's).
        Returns:
            ``o`` (``out`` when given), or ``(o, lse)`` when ``return_lse``. The selection is in
            ``self.indices [G, total_q, topk]`` until the next run.
        """
        from msattn.ops import paged_attention
        from msattn.ops.indexer import run_selection

        if self._plan is None:
            raise RuntimeError("MSAPagedWrapper.run() needs plan() first")
        # dtype rules only (attributes of the tensors, no host synchronisation)
        dtype, kv_dtype, index_dtype = self._plan
        for name, tensor, planned in (("q", q, dtype), ("k_cache", k_cache, kv_dtype),
                                      ("v_cache", v_cache, kv_dtype),
                                      ("index_cache", index_cache, index_dtype)):
            if tensor.dtype != planned:
                raise TypeError(f"{name} must have the planned dtype {planned}, got {tensor.dtype} "
                                "(plan(dtype=, kv_dtype=, index_dtype=) sets them)")
        check_kv_scales(k_cache, v_cache, k_scale, v_scale)  # plan() fixed how dtypes pair up
        o = self.o if out is None else out
        lse = self.lse if lse is None else lse
        run_selection(self.selection_plan, qi, index_cache, self.cu_seqlens_q, seq_lens,
                      block_size=self.page_size, init_blocks=self.init_blocks,
                      local_blocks=self.local_blocks, block_table=block_table,
                      index_scale=index_scale, index_block_scale=index_block_scale,
                      out=self.indices)
        paged_attention.run_paged_attention(
            self.attention_plan, q, k_cache, v_cache, self.indices, block_table, self.cu_seqlens_q,
            seq_lens, softmax_scale=self.softmax_scale, out=(o, lse), k_scale=k_scale,
            v_scale=v_scale)
        return (o, lse) if return_lse else o
