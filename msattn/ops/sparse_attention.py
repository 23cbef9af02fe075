"""KV-outer MSA sparse attention: each selected K/V block is loaded once per group of queries.

Pipeline for a chunk of query rows (chunks bound the memory of the partial results):

1. :func:`msattn.ops.selection_csr.build_block_csr` inverts the selection
   ``indices [G, total_q, topk]`` into, for every
   (group, key block), the list of (query token, slot) entries that chose it: a CSR built by a
   counting sort on the GPU (no host synchronisation). The order of a bucket's entries is
   whatever the sort's atomics give: a row's result does not depend on the rows beside it in a
   tile, so the order does not change the output.
2. ``_block_attention_kernel``: one program takes one K/V block of one group and a tile of
   ``BLOCK_M`` gathered (entry, head) rows, and writes each row's softmax-normalised partial
   output and log-sum-exp for that block.
3. ``_combine_kernel`` merges the ``topk`` partials of every (token, head) by their LSEs; or,
   with ``AttentionConfig(merge=True)``, the block kernel's tile that stores a (token, group)'s
   last partial merges them (counted by atomics), in the same launch.

K/V may be float8_e4m3fn with a per-tensor or per-group float32 scale (fp8 paged caches): the
block kernel converts them to q's 16-bit dtype in registers (exact) and applies ``k_scale`` to the
scores and ``v_scale`` to the output, one scalar each per program.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from msattn.ops.selection_csr import build_block_csr, csr_layout
from msattn.ops.utils import (LOG2E, block_visible, cdiv, dot_options, finish_softmax, mma,
                              next_power_of_2, tensor_atomics_reach_every_thread)

# Memory for the partial outputs of one chunk of query rows: 5 GiB / 4 holds 4,096 rows of the M3
# shape (266 KB a row), so that a 16K prefill runs in 4 equal chunks (1 GiB made it 4 x 4,036 rows
# and one of 240; H200: 6.36 against 6.65 ms for its attention, tuning/tune-attention_*-175704).
PARTIAL_BUDGET_BYTES = 5 << 28


@dataclass(frozen=True)
class AttentionConfig:
    """Launch configuration of the KV-outer sparse attention.

    Attributes:
        block_m: gathered (entry, head) rows per tile (fewer for blocks above 128 keys).
        num_warps, num_stages: of the block kernel.
        tiles_per_program: row tiles of one (group, key block) bucket per program: amortises the
            program's K/V load and lets the pipeliner overlap the next tile's loads with this
            tile's math.
        merge: the block kernel merges a (token, group)'s partials when its last slot is
            stored (atomic counts; the tile that completes it reads them back), instead of a
            combine kernel after it. Off until measured on a GPU: it saves the combine's
            launch and its pass over the partials (16K: 4.3 GB read), and adds the merges' reads
            to the block kernel's tail (2026-12-08: correct on the CPU interpreter; compiled for
            sm_90 with 255 registers, 1 spilled). Needs Triton 3.5 or newer (the combine kernel
            runs otherwise: :func:`~msattn.ops.utils.tensor_atomics_reach_every_thread`).
        combine_warps: warps of the combine kernel (H100, 1M tokens: 8 beat 4, 477 -> 453 ms).
    """

    block_m: int = 64
    num_warps: int = 4
    num_stages: int = 1
    tiles_per_program: int = 16
    merge: bool = False
    combine_warps: int = 8


# On CUDA for 16-bit inputs, tuned on an H100 (benchmarks/results/tuning/).
CUDA_CONFIG = AttentionConfig()


# One program: one (group, key block) bucket x up to TILES_PER_PROGRAM tiles of BLOCK_M gathered
# (entry, head) rows of it; the block's K and V are loaded once for all its tiles.
# Grid: (empty_programs + upper bound on the programs,); programs past the real ones exit.
# MERGE: each tile counts its rows into counters [rows, G] (int32, zero before; left zero) and
# merges the (row, group)s it completes into o [total_q, H, D], lse [total_q, H]; the first
# empty_programs programs write the rows with no visible block (BLOCK_M (row, group) pairs each).
# q [total_q, H, D], k/v [total_k, G, D] (a block starts at row block_key_start) or paged
# [num_pages, page_size, G, D] (block_key_start is the page); with KV_FP8, float8_e4m3fn K/V and
# k/v scales [] or [G] (stride 0 or their G stride); writes partial_o [rows, H, TOPK, D] (q's dtype)
# and partial_lse [rows, H, TOPK] (float32, natural log) for the rows of its entries.
@triton.jit
def _block_attention_kernel(
        q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, partial_o_ptr, partial_lse_ptr,
        entries_ptr, bucket_start_ptr, program_start_ptr, program_bucket_ptr, block_key_start_ptr,
        block_position_ptr, block_num_keys_ptr, row_position_ptr, indices_ptr, o_ptr, lse_ptr,
        counters_ptr,
        stride_q_token, stride_q_head, stride_k_block, stride_k_token, stride_k_group,
        stride_v_block, stride_v_token, stride_v_group, stride_k_scale, stride_v_scale,
        stride_indices_group, stride_indices_token, stride_o_token, stride_o_head,
        row_start, rows, num_heads, num_groups, num_buckets, num_blocks, empty_programs, scale_log2,
        GROUP_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, TOPK: tl.constexpr,
        TOPK_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        TILES_PER_PROGRAM: tl.constexpr, MERGE: tl.constexpr,
        KV_FP8: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    if pid < empty_programs:
        # BLOCK_M (row, group) pairs of the chunk: the rows that selected no visible block get
        # their output here (0, and -inf LSE); no tile ever merges them.
        pair = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        pair_mask = pair < rows * num_groups
        pair_row = pair // num_groups
        pair_group = pair % num_groups
        pair_token = (row_start + pair_row).to(tl.int64)
        pair_position = tl.load(row_position_ptr + pair_row, mask=pair_mask, other=-1)
        visible = _visible_slots(indices_ptr + pair_group.to(tl.int64) * stride_indices_group
                                 + pair_token * stride_indices_token, pair_position, pair_mask,
                                 TOPK, TOPK_PAD, BLOCK_SIZE)
        empty = pair_mask & (visible == 0)
        if tl.sum(empty.to(tl.int32), 0) > 0:
            dim = tl.arange(0, BLOCK_D)
            for head_in_group in range(GROUP_SIZE):
                head = pair_group * GROUP_SIZE + head_in_group
                tl.store(o_ptr + pair_token[:, None] * stride_o_token + head[:, None] * stride_o_head
                         + dim[None, :], tl.zeros([BLOCK_M, BLOCK_D], o_ptr.dtype.element_ty),
                         mask=empty[:, None] & (dim < HEAD_DIM)[None, :])
                tl.store(lse_ptr + pair_token * num_heads + head,
                         tl.full([BLOCK_M], float("-inf"), tl.float32), mask=empty)
    pid -= empty_programs
    if (pid >= 0) & (pid < tl.load(program_start_ptr + num_buckets)):
        bucket = tl.load(program_bucket_ptr + pid)
        group = bucket // num_blocks
        block = bucket % num_blocks
        key_start = tl.load(block_key_start_ptr + block)
        key_position = tl.load(block_position_ptr + block)
        num_keys = tl.load(block_num_keys_ptr + block)
        entry_start = tl.load(bucket_start_ptr + bucket)
        entry_end = tl.load(bucket_start_ptr + bucket + 1)
        first_row = (pid - tl.load(program_start_ptr + bucket)) * TILES_PER_PROGRAM * BLOCK_M
        last_row = tl.minimum(first_row + TILES_PER_PROGRAM * BLOCK_M, (entry_end - entry_start) * GROUP_SIZE)

        dim = tl.arange(0, BLOCK_D)
        dim_mask = dim < HEAD_DIM
        offs = tl.arange(0, BLOCK_SIZE)
        key_mask = offs < num_keys
        kv_mask = key_mask[:, None] & dim_mask[None, :]
        k = tl.load(k_ptr + key_start.to(tl.int64) * stride_k_block + offs[:, None] * stride_k_token
                    + group * stride_k_group + dim[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + key_start.to(tl.int64) * stride_v_block + offs[:, None] * stride_v_token
                    + group * stride_v_group + dim[None, :], mask=kv_mask, other=0.0)
        if KV_FP8:  # exact in fp16 and bf16; real K, V = k * k_scale, v * v_scale
            k = k.to(q_ptr.dtype.element_ty)
            v = v.to(q_ptr.dtype.element_ty)
            scale_log2 = scale_log2 * tl.load(k_scale_ptr + group * stride_k_scale)
            v_factor = tl.load(v_scale_ptr + group * stride_v_scale)  # applied to p @ v
        k_t = tl.trans(k)
        for tile_row in range(first_row, last_row, BLOCK_M):
            rows_in_bucket = tile_row + tl.arange(0, BLOCK_M)
            entry_index = entry_start + rows_in_bucket // GROUP_SIZE
            row_mask = entry_index < entry_end
            entry = tl.load(entries_ptr + entry_index, mask=row_mask, other=0)
            slot = entry % TOPK
            row = (entry // TOPK) % rows  # row of the chunk
            head = group * GROUP_SIZE + rows_in_bucket % GROUP_SIZE
            position = tl.load(row_position_ptr + row, mask=row_mask, other=-1)
            token = (row_start + row).to(tl.int64)
            q = tl.load(q_ptr + token[:, None] * stride_q_token + head[:, None] * stride_q_head
                        + dim[None, :], mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
            scores = mma(q, k_t, DOT_PRECISION, DOT_UPCAST) * scale_log2
            visible = key_mask[None, :] & ((key_position + offs)[None, :] <= position[:, None])
            scores = tl.where(visible, scores, float("-inf"))
            row_max = tl.max(scores, axis=1)
            row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
            p = tl.exp2(scores - row_max[:, None])
            row_sum = tl.sum(p, axis=1)
            out = mma(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)
            if KV_FP8:
                out = out * v_factor
            out, lse = finish_softmax(out, row_max, row_sum)
            flat = (row.to(tl.int64) * num_heads + head) * TOPK + slot
            # Evict-first: the partials stream through the L2 without pushing out the K/V blocks
            # and query rows other programs still read (H200, 128K: 52.8 -> 51.7 ms).
            tl.store(partial_lse_ptr + flat, lse, mask=row_mask, eviction_policy="evict_first")
            tl.store(partial_o_ptr + flat[:, None] * HEAD_DIM + dim[None, :],
                     out.to(partial_o_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :],
                     eviction_policy="evict_first")
            if MERGE:
                # Count the tile's (entry, head) rows in at their (row, group): the row whose
                # count completes the row's visible slots x GROUP_SIZE merges its partials.
                index_row = indices_ptr + group.to(tl.int64) * stride_indices_group + token * stride_indices_token
                expected = _visible_slots(index_row, position, row_mask, TOPK, TOPK_PAD,
                                          BLOCK_SIZE) * GROUP_SIZE
                tl.debug_barrier()  # the tile's partials are stored before they are counted
                arrived = tl.atomic_add(counters_ptr + row * num_groups + group, 1, mask=row_mask,
                                        sem="acq_rel", scope="gpu")
                done = row_mask & (arrived == expected - 1)
                num_done = tl.sum(done.to(tl.int32), 0)
                if num_done > 0:
                    tl.debug_barrier()  # the completing threads' acquires before every read
                    rank = tl.cumsum(done.to(tl.int32), 0) - 1
                    for i in range(num_done):
                        pick = done & (rank == i)
                        merge_row = tl.sum(tl.where(pick, row, 0), 0)
                        merge_token = row_start + merge_row
                        tl.store(counters_ptr + merge_row * num_groups + group, 0)  # next chunk
                        merge_slot_partials(
                            partial_o_ptr, partial_lse_ptr,
                            indices_ptr + group.to(tl.int64) * stride_indices_group
                            + merge_token.to(tl.int64) * stride_indices_token, merge_row,
                            tl.sum(tl.where(pick, position, 0), 0), merge_token, group, o_ptr,
                            lse_ptr, stride_o_token, stride_o_head, num_heads, GROUP_SIZE,
                            BLOCK_H, TOPK, TOPK_PAD, HEAD_DIM, BLOCK_D, BLOCK_SIZE)


@triton.jit
def _visible_slots(index_rows, position, mask, TOPK: tl.constexpr, TOPK_PAD: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr):
    """How many of the ``TOPK`` slots of each row (``index_rows [R]``: pointers to the rows'
    selected blocks) choose a block with a key at or before the row's ``position [R]`` (the
    rule of the CSR and of :func:`merge_slot_partials`); 0 where not ``mask [R]``."""
    slots = tl.arange(0, TOPK_PAD)
    blocks = tl.load(index_rows[:, None] + slots[None, :], mask=mask[:, None] & (slots < TOPK)[None, :],
                     other=-1)
    return tl.sum(block_visible(blocks, position[:, None], BLOCK_SIZE).to(tl.int32), axis=1)


@triton.jit
def merge_slot_partials(partial_o_ptr, partial_lse_ptr, index_row_ptr, partial_row, position,
                        token, group, o_ptr, lse_ptr, stride_o_token, stride_o_head, num_heads,
                        GROUP_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, TOPK: tl.constexpr,
                        TOPK_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_SIZE: tl.constexpr):
    """Merge the ``TOPK`` partial outputs of the heads of ``group`` for one query token by their
    LSEs (rows ``partial_row`` of ``partial_o [rows, H, TOPK, D]``, ``partial_lse [rows, H, TOPK]``)
    into ``o [total_q, H, D]``, ``lse [total_q, H]``. A slot counts when its block (from
    ``index_row_ptr``, the token's ``TOPK`` selected blocks) holds a key at or before ``position``.
    Partials are read at L2 (``.cg``): other programs of the same launch may have written them."""
    heads = group * GROUP_SIZE + tl.arange(0, BLOCK_H)
    head_mask = tl.arange(0, BLOCK_H) < GROUP_SIZE
    slots = tl.arange(0, TOPK_PAD)
    blocks = tl.load(index_row_ptr + slots, mask=slots < TOPK, other=-1)
    slot_valid = block_visible(blocks, position, BLOCK_SIZE)
    partial_rows = (partial_row.to(tl.int64) * num_heads + heads) * TOPK  # [BLOCK_H]
    lse = tl.load(partial_lse_ptr + partial_rows[:, None] + slots[None, :],
                  mask=head_mask[:, None] & slot_valid[None, :], other=float("-inf"),
                  cache_modifier=".cg")
    lse_max = tl.max(lse, axis=1)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weights = tl.exp(lse - lse_max[:, None])
    total = tl.sum(weights, axis=1)
    dim = tl.arange(0, BLOCK_D)
    dim_mask = dim < HEAD_DIM
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    # Masked loads rather than branches: the loads of all slots can be in flight together.
    for slot in tl.static_range(TOPK):
        block = tl.zeros([BLOCK_H], tl.int32) + tl.load(index_row_ptr + slot)  # one per head
        use = head_mask & block_visible(block, position, BLOCK_SIZE)
        slot_lse = tl.load(partial_lse_ptr + partial_rows + slot, mask=use, other=float("-inf"),
                           cache_modifier=".cg")
        part = tl.load(partial_o_ptr + (partial_rows + slot)[:, None] * HEAD_DIM + dim[None, :],
                       mask=use[:, None] & dim_mask[None, :], other=0.0, cache_modifier=".cg")
        acc += tl.exp(slot_lse - lse_max)[:, None] * part.to(tl.float32)
    has_keys = total > 0
    out = acc / tl.where(has_keys, total, 1.0)[:, None]
    row_lse = tl.where(has_keys, lse_max + tl.log(tl.where(has_keys, total, 1.0)), float("-inf"))
    token = token.to(tl.int64)
    tl.store(o_ptr + token * stride_o_token + heads[:, None] * stride_o_head + dim[None, :],
             out.to(o_ptr.dtype.element_ty), mask=head_mask[:, None] & dim_mask[None, :])
    tl.store(lse_ptr + token * num_heads + heads, row_lse, mask=head_mask)


# One program: one query row of the chunk x the heads of one group (merge_slot_partials).
# Grid: (rows, G). partial_o [rows, H, TOPK, D]; writes o [total_q, H, D] and lse [total_q, H].
@triton.jit
def _combine_kernel(partial_o_ptr, partial_lse_ptr, indices_ptr, row_position_ptr, o_ptr, lse_ptr,
                    stride_indices_group, stride_indices_token, stride_o_token, stride_o_head,
                    row_start, num_heads,
                    GROUP_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, TOPK: tl.constexpr,
                    TOPK_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0)
    group = tl.program_id(1)
    token = row_start + row
    index_row = indices_ptr + group.to(tl.int64) * stride_indices_group + token.to(tl.int64) * stride_indices_token
    merge_slot_partials(partial_o_ptr, partial_lse_ptr, index_row, row,
                        tl.load(row_position_ptr + row), token, group, o_ptr, lse_ptr,
                        stride_o_token, stride_o_head, num_heads, GROUP_SIZE, BLOCK_H, TOPK,
                        TOPK_PAD, HEAD_DIM, BLOCK_D, BLOCK_SIZE)


def scale_stride(scale: torch.Tensor | None) -> int:
    """Element stride between the groups' entries of an fp8 K/V scale ``[]`` (0) or ``[G]``."""
    return scale.stride(0) if scale is not None and scale.dim() == 1 else 0


def launch_config(q: torch.Tensor) -> AttentionConfig:
    """The tuned launch configuration for q's device (16-row tiles in the CPU interpreter)."""
    return CUDA_CONFIG if q.is_cuda else replace(CUDA_CONFIG, block_m=16)


class _Workspace:
    """Where the partials of each chunk of query rows go.

    A chunk's partials take ``per_row`` bytes a row, 16x the row's output: at 1M tokens a 1.25 GiB
    buffer holds only ~5K rows, and every chunk reloads the K/V blocks it selects. The output
    rows after a chunk are not written yet, so while they can hold its partials they are the
    workspace: chunks then cover about 1/17 of the rows left (60K rows first at 1M), which cuts
    the chunks, and the K/V reloads, about fourfold. The last rows use a buffer of at most
    ``PARTIAL_BUDGET_BYTES`` (or ``chunk_rows`` rows when given: fixed chunks, no output reuse),
    in chunks of equal size: a short last chunk would pay a launch sequence and a grid's tail
    for a few rows.
    """

    def __init__(self, o: torch.Tensor, topk: int, chunk_rows: int | None):
        self.total_q, num_heads, self.head_dim = o.shape
        self.o_bytes = o.view(-1).view(torch.uint8) if o.is_contiguous() and o.data_ptr() % 16 == 0 else None
        self.partial_o_row = num_heads * topk * self.head_dim * o.element_size()
        self.per_row = self.partial_o_row + num_heads * topk * 4  # partial outputs + their LSEs
        self.out_row = num_heads * self.head_dim * o.element_size()
        self.reuse_output = chunk_rows is None and self.o_bytes is not None
        self.buffer_rows = min(self.total_q, chunk_rows or max(1, PARTIAL_BUDGET_BYTES // self.per_row))
        self.slots = num_heads * topk  # partials a row
        self.buffer = None  # (partial_o, partial_lse) of buffer_rows rows, allocated on first use
        self.dtype, self.device = o.dtype, o.device

    def _tail_rows(self, remaining: int) -> int:
        """Rows whose partials fit in the output rows after them, of ``remaining`` rows."""
        return remaining * self.out_row // (self.per_row + self.out_row) if self.reuse_output else 0

    def max_rows(self) -> int:
        """The most rows a chunk of :meth:`chunks` has (the first chunk is the largest)."""
        return max(self.buffer_rows, self._tail_rows(self.total_q))

    def chunks(self):
        """Yield ``(row_start, row_end, partial_o, partial_lse)`` covering the output's rows (the
        partial buffers hold at least ``row_end - row_start`` rows)."""
        row_start = 0
        while row_start < self.total_q:
            remaining = self.total_q - row_start
            # rows * per_row bytes fit in the (remaining - rows) output rows after the chunk.
            tail_rows = self._tail_rows(remaining)
            if tail_rows > self.buffer_rows:
                rows = tail_rows
                start = (row_start + rows) * self.out_row  # a multiple of 16 bytes
                space = self.o_bytes[start:start + rows * self.per_row]
                partial_o = space[:rows * self.partial_o_row].view(self.dtype)
                partial_lse = space[rows * self.partial_o_row:].view(torch.float32)
            else:
                rows = cdiv(remaining, cdiv(remaining, self.buffer_rows))
                if self.buffer is None:  # two allocations: fewer host operations than views
                    self.buffer = (
                        torch.empty(self.buffer_rows * self.slots * self.head_dim,
                                    dtype=self.dtype, device=self.device),
                        torch.empty(self.buffer_rows * self.slots, dtype=torch.float32,
                                    device=self.device))
                partial_o, partial_lse = self.buffer  # the kernels use the first rows
            yield row_start, row_start + rows, partial_o, partial_lse
            row_start += rows


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor | None, *, block_size: int,
                     softmax_scale: float, chunk_rows: int | None = None,
                     out: tuple[torch.Tensor, torch.Tensor] | None = None,
                     block_table: torch.Tensor | None = None, seq_lens: torch.Tensor | None = None,
                     config: AttentionConfig | None = None,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`msattn.reference.sparse_attention` (same arguments and result).

    Args:
        q: ``[total_q, H, D]``; k, v: ``[total_k, G, D]`` (fp16/bf16/fp32, last dim contiguous),
            or paged ``[num_pages, block_size, G, D]`` with ``block_table``; or float8_e4m3fn
            with ``k_scale``, ``v_scale`` float32 ``[]`` or ``[G]`` (real K = ``k.float() *
            k_scale``; q then fp16/bf16; forward only).
        indices: ``[G, total_q, topk]`` int32.
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]`` (cu_seqlens_k None for paged K/V).
        chunk_rows: query rows per chunk, with a separate partial buffer (default: chunks sized
            to the unwritten output rows, then to a buffer of at most 1 GiB; see ``_Workspace``).
        out: optional ``(o, lse)`` buffers to write into (o contiguous).
        block_table, seq_lens: int32 ``[B, max_pages]`` (page of each key block) and ``[B]``
            (keys of each sequence), for paged K/V.
        config: the launch configuration (default: :func:`launch_config`).
    Returns:
        o ``[total_q, H, D]`` in q's dtype, lse ``[total_q, H]`` float32.
    """
    total_q, num_heads, head_dim = q.shape
    num_groups = k.shape[-2]
    group_size = num_heads // num_groups
    topk = indices.shape[-1]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    indices = indices if indices.stride(-1) == 1 else indices.contiguous()
    if out is None:
        out = (torch.empty_like(q), torch.empty(total_q, num_heads, dtype=torch.float32, device=q.device))
    o, lse = out
    if total_q == 0:
        return o, lse
    if block_table is None:  # a block starts at key row block_key_start
        k_strides = (k.stride(0), k.stride(0), k.stride(1))
        v_strides = (v.stride(0), v.stride(0), v.stride(1))
    else:  # a block is the page block_key_start
        k_strides = (k.stride(0), k.stride(1), k.stride(2))
        v_strides = (v.stride(0), v.stride(1), v.stride(2))
    if config is None:
        config = launch_config(q)
    # A program holds a whole K/V block: fewer query rows per tile for large blocks.
    block_m = max(16, min(config.block_m, config.block_m * 128 // block_size))
    block_d = next_power_of_2(head_dim)
    workspace = _Workspace(o, topk, chunk_rows)
    # The merge reads the old values of a tensor atomic smaller than the program's threads.
    merge = config.merge and tensor_atomics_reach_every_thread()
    layout = csr_layout(cu_seqlens_q, cu_seqlens_k, total_q=total_q, num_groups=num_groups,
                        block_size=block_size, total_k=k.shape[0], block_table=block_table,
                        seq_lens=seq_lens,
                        extra_zeros=workspace.max_rows() * num_groups if merge else 0)
    counters = layout.zeros if merge else None  # int32 [rows, G]: zero, left zero
    for row_start, row_end, partial_o, partial_lse in workspace.chunks():
        rows = row_end - row_start
        csr = build_block_csr(indices, cu_seqlens_q, cu_seqlens_k, block_size=block_size,
                              total_k=k.shape[0], row_start=row_start, row_end=row_end,
                              group_size=group_size, block_m=block_m,
                              tiles_per_program=config.tiles_per_program, layout=layout,
                              stable=False)
        num_buckets = num_groups * csr.num_blocks
        empty_programs = cdiv(rows * num_groups, block_m) if merge else 0
        _block_attention_kernel[(empty_programs + csr.max_programs,)](
            q_ptr=q, k_ptr=k, v_ptr=v, k_scale_ptr=k_scale, v_scale_ptr=v_scale, partial_o_ptr=partial_o, partial_lse_ptr=partial_lse,
            entries_ptr=csr.entries, bucket_start_ptr=csr.bucket_start,
            program_start_ptr=csr.program_start, program_bucket_ptr=csr.program_bucket,
            block_key_start_ptr=csr.block_key_start, block_position_ptr=csr.block_position,
            block_num_keys_ptr=csr.block_num_keys, row_position_ptr=csr.row_position,
            indices_ptr=indices, o_ptr=o, lse_ptr=lse, counters_ptr=counters,
            stride_q_token=q.stride(0), stride_q_head=q.stride(1),
            stride_k_block=k_strides[0], stride_k_token=k_strides[1], stride_k_group=k_strides[2],
            stride_v_block=v_strides[0], stride_v_token=v_strides[1], stride_v_group=v_strides[2],
            stride_k_scale=scale_stride(k_scale), stride_v_scale=scale_stride(v_scale),
            stride_indices_group=indices.stride(0), stride_indices_token=indices.stride(1),
            stride_o_token=o.stride(0), stride_o_head=o.stride(1),
            row_start=row_start, rows=rows, num_heads=num_heads, num_groups=num_groups,
            num_buckets=num_buckets, num_blocks=csr.num_blocks, empty_programs=empty_programs,
            scale_log2=softmax_scale * LOG2E, GROUP_SIZE=group_size,
            BLOCK_H=next_power_of_2(group_size), TOPK=topk,
            TOPK_PAD=next_power_of_2(topk), HEAD_DIM=head_dim, BLOCK_D=block_d,
            BLOCK_M=block_m, BLOCK_SIZE=block_size, TILES_PER_PROGRAM=config.tiles_per_program,
            MERGE=merge, KV_FP8=k_scale is not None, **dot_options(q.dtype),
            num_warps=config.num_warps, num_stages=config.num_stages)
        if not merge:
            combine_partials(partial_o, partial_lse, indices, csr.row_position, o, lse,
                             row_start=row_start, rows=rows, block_size=block_size,
                             num_warps=config.combine_warps)
    return o, lse


def combine_partials(partial_o: torch.Tensor, partial_lse: torch.Tensor, indices: torch.Tensor,
                     row_position: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, *,
                     row_start: int, rows: int, block_size: int, num_warps: int = 4) -> None:
    """Merge the per-slot partials ``partial_o [rows, H, topk, D]``, ``partial_lse [rows, H, topk]``
    of query rows ``[row_start, row_start + rows)`` into ``o [total_q, H, D]`` and ``lse [total_q, H]``.

    ``row_position`` int32 ``[rows]`` is each row's position in its sequence (a slot counts when
    its block holds a key at or before it); ``indices`` is ``[G, total_q, topk]``.
    """
    num_groups, _, topk = indices.shape
    _, num_heads, head_dim = o.shape
    group_size = num_heads // num_groups
    _combine_kernel[(rows, num_groups)](
        partial_o_ptr=partial_o, partial_lse_ptr=partial_lse, indices_ptr=indices,
        row_position_ptr=row_position, o_ptr=o, lse_ptr=lse,
        stride_indices_group=indices.stride(0), stride_indices_token=indices.stride(1),
        stride_o_token=o.stride(0), stride_o_head=o.stride(1), row_start=row_start,
        num_heads=num_heads, GROUP_SIZE=group_size, BLOCK_H=next_power_of_2(group_size),
        TOPK=topk, TOPK_PAD=next_power_of_2(topk), HEAD_DIM=head_dim,
        BLOCK_D=next_power_of_2(head_dim), BLOCK_SIZE=block_size, num_warps=num_warps)
