"""Query-outer MSA sparse attention for decode: few query tokens against a paged K/V cache.

Each program takes one query token and one group, with the group's heads as the rows of its
tiles, and runs an online softmax over the token's selected pages. When those programs alone
cannot fill the GPU, the selected slots are split across programs (one slot each); the last of a
(token, group)'s programs to finish merges the partials by their LSEs
(:func:`msattn.ops.sparse_attention.merge_slot_partials`), in the same launch.

Opt-in (``PagedAttentionConfig.tokens_per_program`` > 1): the shared-pages kernel puts several
tokens of a request in one program (rows = token x head) and reads each page of the union of
their selections once, masked per row; faster only when the tokens share most pages and the grid
stays full (measured in benchmarks/README.md: 32 x 8 x 64K correlated, 8 tokens and 8 warps).
One-token batches keep the per-token kernel and its split.

fp8 K/V caches (float8_e4m3fn with a per-tensor or per-KV-head float32 scale) are converted to
fp16 in registers (exact; bf16 queries are scaled per row into fp16, exactly), so the MMAs run
on fp16 operands; ``k_scale`` is folded into the softmax scale and ``v_scale`` into the output,
one scalar each per program.

Long query runs (chunked prefill against a paged cache) go through the KV-outer kernel of
:mod:`msattn.ops.sparse_attention` instead, which loads each selected page once per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from msattn.ops.sparse_attention import merge_slot_partials, scale_stride
from msattn.ops.utils import (LOG2E, arrive_last, cdiv, device_sm_count, dot_options,
                              finish_softmax, gdc_wait, mma, next_power_of_2, programmatic_launch,
                              rows_to_fp16)


@triton.jit
def _attend_page_tile(q, k_ptr, v_ptr, page, rows, dim, kv_mask, key_mask, group, stride_k_page,
                      stride_k_token, stride_k_group, stride_v_page, stride_v_token,
                      stride_v_group, scale_log2, row_max, row_sum, acc, KV_FP8: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """One online-softmax step of the rows of ``q [R, BLOCK_D]`` over a tile of keys of a page:
    K/V rows ``rows [BLOCK_N]`` of page ``page`` (loaded where ``kv_mask [BLOCK_N, BLOCK_D]``),
    scores kept where ``key_mask`` (``[1 or R, BLOCK_N]``), ``scale_log2`` a scalar or
    ``[R, 1]``. Returns the new
    ``(row_max, row_sum, acc)`` (exp2 domain; rows without a key yet stay at -inf, 0, 0)."""
    k = tl.load(k_ptr + page.to(tl.int64) * stride_k_page + rows[:, None] * stride_k_token
                + group * stride_k_group + dim[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + page.to(tl.int64) * stride_v_page + rows[:, None] * stride_v_token
                + group * stride_v_group + dim[None, :], mask=kv_mask, other=0.0)
    if KV_FP8:  # exact; fp16 q (_fp8_kv_query): one conversion instruction per two values
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    scores = mma(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST) * scale_log2
    scores = tl.where(key_mask, scores, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(scores, axis=1))
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # no key yet: no NaN
    correction = tl.exp2(row_max - safe_max)
    p = tl.exp2(scores - safe_max[:, None])
    row_sum = row_sum * correction + tl.sum(p, axis=1)
    acc = acc * correction[:, None] + mma(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)
    return new_max, row_sum, acc


@triton.jit
def _fp8_kv_query(q, score_scale):
    """The query tile ``q [R, D]`` and score scale ``[R, 1]`` for fp8 K/V tiles. e4m3 widens to
    fp16 in one instruction per two values, to bf16 only through wider types (twice the
    instructions, measured in the SASS): bf16 rows become fp16 scaled by powers of two (exact,
    :func:`rows_to_fp16`) and the score scale is divided by them; fp16 and float32 rows stay."""
    factor = tl.full([q.shape[0]], 1.0, tl.float32)
    if q.dtype == tl.bfloat16:
        q, factor = rows_to_fp16(q)
    return q, (score_scale / factor)[:, None]


# One program: query token ``t`` of request ``b`` (program_id(0) = b * max_len_q + t) x one group
# x one split of its selected slots. q [total_q, H, D]; k/v cache [num_pages, page_size, G, D];
# indices [G, total_q, TOPK]; with KV_FP8, float8_e4m3fn caches and k/v scales [] or [G] (stride 0
# or their G stride). Not split: writes o [total_q, H, D], lse [total_q, H].
# Split (one slot per program): writes partial_o [total_q, H, TOPK, D], partial_lse
# [total_q, H, TOPK]; the last of the TOPK programs of a (token, group) (counters [total_q, G])
# merges them into o and lse. Pages are read in tiles of BLOCK_N keys (TILES_PER_PAGE a page).
# Grid: (B * max_len_q, G, 1 or TOPK).
@triton.jit
def _paged_attention_kernel(
        q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, indices_ptr, block_table_ptr, cu_seqlens_q_ptr, seq_lens_ptr,
        o_ptr, lse_ptr, partial_o_ptr, partial_lse_ptr, counters_ptr,
        stride_q_token, stride_q_head, stride_k_page, stride_k_token, stride_k_group,
        stride_v_page, stride_v_token, stride_v_group, stride_k_scale, stride_v_scale,
        stride_indices_group,
        stride_indices_token, stride_block_table, stride_o_token, stride_o_head,
        max_len_q, num_heads, scale_log2,
        GROUP_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, TOPK: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr, TILES_PER_PAGE: tl.constexpr, SPLIT: tl.constexpr, TOPK_PAD: tl.constexpr, PDL: tl.constexpr, KV_FP8: tl.constexpr,
        DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    batch = tl.program_id(0) // max_len_q
    query = tl.program_id(0) % max_len_q
    group = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + batch)
    len_q = tl.load(cu_seqlens_q_ptr + batch + 1) - q_start
    if query < len_q:
        token = (q_start + query).to(tl.int64)
        position = tl.load(seq_lens_ptr + batch) - len_q + query
        heads = group * GROUP_SIZE + tl.arange(0, BLOCK_H)
        head_mask = tl.arange(0, BLOCK_H) < GROUP_SIZE
        dim = tl.arange(0, BLOCK_D)
        dim_mask = dim < HEAD_DIM
        q = tl.load(q_ptr + token * stride_q_token + heads[:, None] * stride_q_head + dim[None, :],
                    mask=head_mask[:, None] & dim_mask[None, :], other=0.0)
        score_scale = scale_log2
        if KV_FP8:  # real K = k * k_scale: scale the scores instead
            q, score_scale = _fp8_kv_query(
                q, scale_log2 * tl.load(k_scale_ptr + group * stride_k_scale))
        if PDL:  # launched while the indexer drains: wait for its selection
            gdc_wait()
        offs = tl.arange(0, BLOCK_N)
        row_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        if SPLIT:
            slot_from = split
            slot_to = split + 1
        else:
            slot_from = 0
            slot_to = TOPK
        index_row = indices_ptr + group.to(tl.int64) * stride_indices_group + token * stride_indices_token
        # One BLOCK_N-key tile of a selected page an iteration. Masked loads, no branch: the
        # pipeliner keeps the next tiles' index, page and K/V loads in flight (a branch around
        # them made every tile wait for its own chain of dependent loads).
        for tile in range(slot_from * TILES_PER_PAGE, slot_to * TILES_PER_PAGE):
            block = tl.load(index_row + tile // TILES_PER_PAGE)
            keys = block * PAGE_SIZE + (tile % TILES_PER_PAGE) * BLOCK_N + offs
            key_mask = (keys >= 0) & (keys <= position)  # block -1 (padding): all negative
            # a selected block is a block of the sequence; -1 reads entry 0, unused
            page = tl.load(block_table_ptr + batch.to(tl.int64) * stride_block_table
                           + tl.maximum(block, 0))
            rows = (tile % TILES_PER_PAGE) * BLOCK_N + offs
            row_max, row_sum, acc = _attend_page_tile(
                q, k_ptr, v_ptr, page, rows, dim, key_mask[:, None] & dim_mask[None, :],
                key_mask[None, :], group, stride_k_page, stride_k_token, stride_k_group,
                stride_v_page, stride_v_token, stride_v_group, score_scale, row_max, row_sum, acc,
                KV_FP8, DOT_PRECISION, DOT_UPCAST)
        out, lse = finish_softmax(acc, row_max, row_sum)
        if KV_FP8:  # real V = v * v_scale
            out = out * tl.load(v_scale_ptr + group * stride_v_scale)
        has_keys = row_sum > 0
        if SPLIT:
            flat = (token * num_heads + heads) * TOPK + split
            tl.store(partial_lse_ptr + flat, lse, mask=head_mask & has_keys)
            tl.store(partial_o_ptr + flat[:, None] * HEAD_DIM + dim[None, :],
                     out.to(partial_o_ptr.dtype.element_ty),
                     mask=has_keys[:, None] & head_mask[:, None] & dim_mask[None, :])
            if arrive_last(counters_ptr + token * tl.num_programs(1) + group, TOPK):
                merge_slot_partials(partial_o_ptr, partial_lse_ptr, index_row, token, position,
                                    token, group, o_ptr, lse_ptr, stride_o_token, stride_o_head,
                                    num_heads, GROUP_SIZE, BLOCK_H, TOPK, TOPK_PAD, HEAD_DIM,
                                    BLOCK_D, PAGE_SIZE)
        else:
            tl.store(o_ptr + token * stride_o_token + heads[:, None] * stride_o_head + dim[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=head_mask[:, None] & dim_mask[None, :])
            tl.store(lse_ptr + token * num_heads + heads, lse, mask=head_mask)


# One program: TOKENS consecutive query tokens of request ``b`` (chunk ``c`` of them, program_id(0)
# = b * chunks_per_request + c) x one group; its rows are the (token, head of the group) pairs,
# BLOCK_R = TOKENS * BLOCK_H. It reads each page that any of its tokens selected once (the union
# of their selections, in order of first appearance) and masks per row the tokens that did not
# choose it. Shapes as _paged_attention_kernel; writes o [total_q, H, D], lse [total_q, H].
# Grid: (B * chunks_per_request, G).
@triton.jit
def _paged_shared_attention_kernel(
        q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, indices_ptr, block_table_ptr,
        cu_seqlens_q_ptr, seq_lens_ptr, o_ptr, lse_ptr,
        stride_q_token, stride_q_head, stride_k_page, stride_k_token, stride_k_group,
        stride_v_page, stride_v_token, stride_v_group, stride_k_scale, stride_v_scale,
        stride_indices_group, stride_indices_token, stride_block_table, stride_o_token,
        stride_o_head, chunks_per_request, num_heads, scale_log2,
        GROUP_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, TOKENS: tl.constexpr,
        TOPK: tl.constexpr, TOPK_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, TILES_PER_PAGE: tl.constexpr,
        PDL: tl.constexpr, KV_FP8: tl.constexpr, DOT_PRECISION: tl.constexpr,
        DOT_UPCAST: tl.constexpr):
    batch = tl.program_id(0) // chunks_per_request
    first_query = (tl.program_id(0) % chunks_per_request) * TOKENS
    group = tl.program_id(1)
    q_start = tl.load(cu_seqlens_q_ptr + batch)
    len_q = tl.load(cu_seqlens_q_ptr + batch + 1) - q_start
    if first_query < len_q:
        seq_len = tl.load(seq_lens_ptr + batch)
        rows = tl.arange(0, TOKENS * BLOCK_H)
        query = first_query + rows // BLOCK_H  # of the request
        head = rows % BLOCK_H
        row_mask = (head < GROUP_SIZE) & (query < len_q)
        token = (q_start + query).to(tl.int64)
        position = seq_len - len_q + query  # [BLOCK_R]
        heads = group * GROUP_SIZE + head
        dim = tl.arange(0, BLOCK_D)
        dim_mask = dim < HEAD_DIM
        q = tl.load(q_ptr + token[:, None] * stride_q_token + heads[:, None] * stride_q_head
                    + dim[None, :], mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
        score_scale = scale_log2
        if KV_FP8:  # real K = k * k_scale: scale the scores instead
            q, score_scale = _fp8_kv_query(
                q, scale_log2 * tl.load(k_scale_ptr + group * stride_k_scale))
        if PDL:  # launched while the indexer drains: wait for its selection
            gdc_wait()
        index_group = indices_ptr + group.to(tl.int64) * stride_indices_group
        slots = tl.arange(0, TOPK_PAD)
        # each row's selection [BLOCK_R, TOPK_PAD], -1 where none (or beyond its position)
        chosen_blocks = tl.load(index_group + token[:, None] * stride_indices_token + slots[None, :],
                                mask=row_mask[:, None] & (slots < TOPK)[None, :], other=-1)
        chosen_blocks = tl.where(chosen_blocks * PAGE_SIZE <= position[:, None], chosen_blocks, -1)
        # the union of the tokens' selections [TOKENS * TOPK_PAD]: first appearances, in order
        flat = tl.arange(0, TOKENS * TOPK_PAD)
        flat_query = first_query + flat // TOPK_PAD
        flat_slot = flat % TOPK_PAD
        blocks = tl.load(index_group + (q_start + flat_query).to(tl.int64) * stride_indices_token
                         + flat_slot, mask=(flat_query < len_q) & (flat_slot < TOPK), other=-1)
        blocks = tl.where(blocks * PAGE_SIZE <= seq_len - len_q + flat_query, blocks, -1)
        seen = tl.max(((blocks[:, None] == blocks[None, :]) & (flat[None, :] < flat[:, None]))
                      .to(tl.int32), axis=1)
        is_first = (blocks >= 0) & (seen == 0)
        order = tl.cumsum(is_first.to(tl.int32), 0) - 1
        num_pages = tl.sum(is_first.to(tl.int32), 0)
        offs = tl.arange(0, BLOCK_N)
        row_max = tl.full([TOKENS * BLOCK_H], float("-inf"), tl.float32)
        row_sum = tl.zeros([TOKENS * BLOCK_H], tl.float32)
        acc = tl.zeros([TOKENS * BLOCK_H, BLOCK_D], tl.float32)
        for tile in range(0, num_pages * TILES_PER_PAGE):
            block = tl.sum(tl.where(is_first & (order == tile // TILES_PER_PAGE), blocks, 0), 0)
            page = tl.load(block_table_ptr + batch.to(tl.int64) * stride_block_table + block)
            in_page = (tile % TILES_PER_PAGE) * BLOCK_N + offs
            keys = block * PAGE_SIZE + in_page
            row_chose = tl.max((chosen_blocks == block).to(tl.int32), axis=1) > 0
            row_max, row_sum, acc = _attend_page_tile(
                q, k_ptr, v_ptr, page, in_page, dim, (keys < seq_len)[:, None] & dim_mask[None, :],
                row_chose[:, None] & (keys[None, :] <= position[:, None]), group, stride_k_page,
                stride_k_token, stride_k_group, stride_v_page, stride_v_token, stride_v_group,
                score_scale, row_max, row_sum, acc, KV_FP8, DOT_PRECISION, DOT_UPCAST)
        out, lse = finish_softmax(acc, row_max, row_sum)
        if KV_FP8:  # real V = v * v_scale
            out = out * tl.load(v_scale_ptr + group * stride_v_scale)
        tl.store(o_ptr + token[:, None] * stride_o_token + heads[:, None] * stride_o_head
                 + dim[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & dim_mask[None, :])
        tl.store(lse_ptr + token * num_heads + heads, lse, mask=row_mask)


@dataclass(frozen=True)
class PagedAttentionConfig:
    """Launch configuration of the decode attention: keys per tile (``block_n``, at most a
    page), warps and software-pipeline stages; ``tokens_per_program`` > 1 runs the shared-pages
    kernel (a request's tokens in programs of that many, each selected page read once for them;
    the slots are then not split)."""

    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 2
    tokens_per_program: int = 1

    def __post_init__(self):
        for name, least in (("block_n", 16), ("tokens_per_program", 1), ("num_warps", 1)):
            value = getattr(self, name)
            if value < least or value & (value - 1):
                why = " (the K of an MMA)" if name == "block_n" else ""
                raise ValueError(f"{name} must be a power of two of at least {least}{why}, "
                                 f"got {value}")


# Measured on an H200 (benchmarks/results/tuning/tune-decode_nvidia-h200_20261203-122641.json):
# unsplit, whole pages with 4 warps and 2 stages were fastest (8 x 8 x 64K 114.5 us against 132.9
# with 8 warps and 137.6 with 64-key tiles); split one page a program, 8 warps (1 x 1 x 64K 14.9
# us against 19.0 with 4).
UNSPLIT_CONFIG = PagedAttentionConfig()
SPLIT_CONFIG = PagedAttentionConfig(num_warps=8)
# The shared-pages kernel compares every (token, slot) entry of its union with every other one:
# at most this many entries a program.
MAX_SHARED_SLOTS = 256


@dataclass(frozen=True)
class PagedAttentionPlan:
    """Grid and workspace of one decode attention launch (fixed for graph capture)."""

    total_q: int
    batch: int
    max_len_q: int
    num_heads: int
    num_groups: int
    head_dim: int
    topk: int
    split: bool
    pdl: bool  # programmatic dependent launch after the indexer
    config: PagedAttentionConfig
    tokens_per_program: int  # of the shared-pages kernel (a power of two); 1: the per-token one
    partial_o: torch.Tensor | None
    partial_lse: torch.Tensor | None
    counters: torch.Tensor | None  # int32 [total_q, G], zero between launches


def plan_paged_attention(total_q: int, batch: int, max_len_q: int, num_heads: int, num_groups: int,
                         head_dim: int, topk: int, dtype: torch.dtype, device: torch.device,
                         split: bool | None = None,
                         config: PagedAttentionConfig | None = None) -> PagedAttentionPlan:
    """Choose whether to split the slots (when token x group programs cannot fill the GPU) and
    allocate the partial buffers. Launches of one plan must not run concurrently."""
    tokens = 1
    if config is not None and config.tokens_per_program > 1 and max_len_q > 1:
        tokens = min(config.tokens_per_program, next_power_of_2(max_len_q))
        if tokens * next_power_of_2(topk) > MAX_SHARED_SLOTS:
            raise ValueError(f"tokens_per_program x topk (padded to powers of two) must be at most "
                             f"{MAX_SHARED_SLOTS} (the union of the selections is deduplicated "
                             f"in registers), got {tokens} x {next_power_of_2(topk)}")
        split = False  # one program holds the tokens' whole union
    elif split is None:
        split = batch * max_len_q * num_groups < device_sm_count(device)
    partial_o = partial_lse = counters = None
    if split:
        partial_o = torch.empty(total_q * num_heads * topk * head_dim, dtype=dtype, device=device)
        partial_lse = torch.empty(total_q * num_heads * topk, dtype=torch.float32, device=device)
        counters = torch.zeros(total_q * num_groups, dtype=torch.int32, device=device)
    return PagedAttentionPlan(total_q, batch, max_len_q, num_heads, num_groups, head_dim, topk,
                              split, programmatic_launch(device),
                              config or (SPLIT_CONFIG if split else UNSPLIT_CONFIG), tokens,
                              partial_o, partial_lse, counters)


def run_paged_attention(plan: PagedAttentionPlan, q: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, indices: torch.Tensor, block_table: torch.Tensor,
                        cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, *, softmax_scale: float,
                        out: tuple[torch.Tensor, torch.Tensor], k_scale: torch.Tensor | None = None,
                        v_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the decode attention of a plan into ``out = (o, lse)``; no host synchronisation.

    Args:
        q: ``[total_q, H, D]`` in the plan's dtype; k_cache, v_cache: ``[num_pages, page_size, G,
            D]`` (any strides with a contiguous last dim) in q's dtype, or float8_e4m3fn with
            ``k_scale``, ``v_scale`` float32 ``[]`` or ``[G]``; indices: int32 ``[G, total_q, topk]``.
        block_table: int32 ``[B, max_pages]``; cu_seqlens_q int32 ``[B + 1]``; seq_lens int32 ``[B]``.
    """
    o, lse = out
    if plan.total_q == 0:
        return o, lse
    page_size = k_cache.shape[1]
    group_size = plan.num_heads // plan.num_groups
    kv_fp8 = k_scale is not None
    config = plan.config
    block_n = min(config.block_n, page_size)
    tokens = plan.tokens_per_program
    common = dict(
        q_ptr=q, k_ptr=k_cache, v_ptr=v_cache, k_scale_ptr=k_scale, v_scale_ptr=v_scale,
        indices_ptr=indices, block_table_ptr=block_table, cu_seqlens_q_ptr=cu_seqlens_q,
        seq_lens_ptr=seq_lens, o_ptr=o, lse_ptr=lse,
        stride_q_token=q.stride(0), stride_q_head=q.stride(1), stride_k_page=k_cache.stride(0),
        stride_k_token=k_cache.stride(1), stride_k_group=k_cache.stride(2),
        stride_v_page=v_cache.stride(0), stride_v_token=v_cache.stride(1),
        stride_v_group=v_cache.stride(2), stride_k_scale=scale_stride(k_scale),
        stride_v_scale=scale_stride(v_scale), stride_indices_group=indices.stride(0),
        stride_indices_token=indices.stride(1), stride_block_table=block_table.stride(0),
        stride_o_token=o.stride(0), stride_o_head=o.stride(1), num_heads=plan.num_heads,
        scale_log2=softmax_scale * LOG2E, GROUP_SIZE=group_size,
        BLOCK_H=max(next_power_of_2(group_size), 16 // tokens), TOPK=plan.topk,
        TOPK_PAD=next_power_of_2(plan.topk), HEAD_DIM=plan.head_dim,
        BLOCK_D=next_power_of_2(plan.head_dim), PAGE_SIZE=page_size, BLOCK_N=block_n,
        TILES_PER_PAGE=page_size // block_n, PDL=plan.pdl, KV_FP8=kv_fp8, **dot_options(q.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages,
        **({"launch_pdl": True} if plan.pdl else {}))
    if tokens > 1:
        chunks = cdiv(plan.max_len_q, tokens)
        _paged_shared_attention_kernel[(plan.batch * chunks, plan.num_groups)](
            chunks_per_request=chunks, TOKENS=tokens, **common)
        return o, lse
    _paged_attention_kernel[(plan.batch * plan.max_len_q, plan.num_groups, plan.topk if plan.split else 1)](
        partial_o_ptr=plan.partial_o, partial_lse_ptr=plan.partial_lse,
        counters_ptr=plan.counters,  # None unless split
        max_len_q=plan.max_len_q, SPLIT=plan.split, **common)
    return o, lse
