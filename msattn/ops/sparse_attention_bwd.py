"""Backward of the KV-outer MSA sparse attention, and its autograd Function.

The autograd Function lives beside the op it differentiates (as in fla-org/flash-linear-attention,
``fla/ops/nsa/parallel.py``): :class:`SparseAttentionFunction` runs the Triton forward of
:mod:`msattn.ops.sparse_attention` and the kernels below; :func:`sparse_attention_autograd` is the
entry point.

With ``p = exp(q.k * scale - lse)`` over the selected visible keys and the upstream gradients
``do`` (of ``o``) and ``dlse`` (of ``lse``, optional):

    dv = p^T do,   dp = do v^T,   ds = p * (dp - delta),   delta = sum_d do * o - dlse,
    dk = ds^T q * scale,   dq = ds k * scale.

Pipeline (the selection is constant: no gradient flows to ``indices``):

1. ``_preprocess_kernel``: ``delta`` and the LSE in base 2 (``+inf`` for rows that see no key,
   so their probabilities are exactly 0), float32 ``[total_q, H]``.
2. ``_block_backward_kernel`` (KV-outer, like the forward): the selection CSR of all rows
   (:func:`msattn.ops.selection_csr.build_block_csr`, built once) gives every (group, key block)
   bucket the (token, slot) entries that chose it. One program loads one key tile of one bucket
   once and streams tiles of packed (entry, head-of-group) rows, accumulating dK/dV in registers.
   A bucket with more rows than ``block_m * tiles_per_program`` is split over several programs,
   which then add their dK/dV into a float32 buffer with atomics; the others store directly.
   dQ mode ``"atomic"``: the same kernel adds ``ds k * scale`` into a float32 dQ with atomics.
3. ``_finish_kernel``: per bucket, writes zeros for blocks nobody selected and casts the float32
   sums of split buckets into dK/dV.
4. dQ mode ``"query"``: ``_query_dq_kernel``, query-outer (one program per (token, group), the
   group's heads as tile rows, the token's selected blocks in slot order): deterministic, no
   atomics and no float32 dQ buffer.

``deterministic=True`` never splits a bucket and uses the query-outer dQ, so every sum has a fixed
order and results are bitwise repeatable. Nothing synchronises with the host: every size comes
from tensor shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from msattn.ops.selection_csr import build_block_csr, csr_layout, row_positions
from msattn.ops.sparse_attention import LOG2E, sparse_attention
from msattn.ops.utils import (cdiv, dot_options, mma, next_power_of_2, sm90_reductions)

DQ_MODES = ("atomic", "query")


@dataclass(frozen=True)
class BackwardConfig:
    """Launch configuration of the backward kernels.

    Attributes:
        block_m: (entry, head) rows per tile of the KV-outer kernel.
        block_n: keys per KV-outer program (capped at the block size; a larger block is split
            into ``block_size // block_n`` key tiles, one program each).
        tiles_per_program: row tiles of one bucket per KV-outer program; buckets with more rows
            are split over several programs (float32 atomics for dK/dV).
        num_warps, num_stages: of the KV-outer kernel.
        dq_mode: ``"atomic"`` (dQ from the KV-outer kernel through float32 atomics) or
            ``"query"`` (separate query-outer kernel, deterministic; 1.8x slower on an H200 at
            128K).
        atomic_dq_max_bytes, atomic_dq_chunk_bytes: the atomic dQ accumulates into a float32
            ``[rows, H, D]`` buffer (none for float32 q). When all rows need more than
            ``atomic_dq_max_bytes`` (1 GiB: 32K tokens at the M3 shape), the KV-outer kernel
            runs over chunks of query rows whose buffer takes at most ``atomic_dq_chunk_bytes``,
            and dK, dV then accumulate in float32 over the chunks (``[G * blocks, block, D]``
            each). On an H200 at 128K, chunks of 1 GiB took 102.2 ms against 110.3 for one
            4 GiB buffer, with 3.9 GiB of workspace against 7.3
            (benchmarks/results/tuning/tune-backward_nvidia-h200_20261203-124332.json).
        dq_block_n, dq_num_warps, dq_num_stages: of the query-outer dQ kernel (keys per step).
        preprocess_rows, preprocess_warps: (token, head) rows per preprocess program, its warps.
        finish_warps: of the kernel that zero-fills / casts dK and dV.
        bulk_dq: the atomic dQ adds each entry's ``[group_size, D]`` rows of a tile as one
            piece (contiguous in dQ): one TMA bulk reduction (``cp.reduce.async.bulk.tensor``)
            on sm_90+ GPUs instead of an atomic per element; elsewhere ``tl.atomic_add`` per
            piece. Needs ``block_m // group_size`` in (1, 2, 4), a power-of-two group size and
            16-bit q (elementwise atomics otherwise). On an H100 (one run) 420.7 against 433.1
            ms at 512K and 102.5 against 106.3 at 128K
            (tuning/tune-backward_nvidia-h100-80gb-hbm3_20261207-181858.json, -181912.json).
            Measured and dropped in that run: TMA reductions of split buckets' dK/dV tiles
            (no gain: 424.7 ms at 512K) and packed 8-byte ``red.global.add.v2.f32`` atomics
            (slower: 452.0 ms).
    """

    block_m: int = 64
    block_n: int = 128
    tiles_per_program: int = 64
    num_warps: int = 8
    num_stages: int = 2
    dq_mode: str = "atomic"
    atomic_dq_max_bytes: int = 1 << 30
    atomic_dq_chunk_bytes: int = 1 << 30
    dq_block_n: int = 64
    dq_num_warps: int = 4
    dq_num_stages: int = 2
    preprocess_rows: int = 32
    preprocess_warps: int = 4
    finish_warps: int = 4
    bulk_dq: bool = True

    def __post_init__(self):
        if self.dq_mode not in DQ_MODES:
            raise ValueError(f"dq_mode must be one of {DQ_MODES}, got {self.dq_mode!r}")
        for name in ("block_m", "block_n", "dq_block_n", "preprocess_rows"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        if self.tiles_per_program < 1:
            raise ValueError(f"tiles_per_program must be >= 1, got {self.tiles_per_program}")


# Hopper (H100/H200), 16-bit inputs: the fastest of the H200 sweeps at 32K and 128K
# (benchmarks/results/tuning/tune-backward_*.json; 4096 rows a program: 109.7 ms at 128K
# against 120.2 with 512, tune-backward_nvidia-h200_20261203-071405.json).
CUDA_CONFIG = BackwardConfig()
# float32 inputs on CUDA: tiles twice as large in bytes, so fewer rows and keys per program.
CUDA_FP32_CONFIG = BackwardConfig(block_m=32, block_n=64, tiles_per_program=8, num_warps=4,
                                  num_stages=1, dq_block_n=32)
# Triton's CPU interpreter: few, large programs are fastest; small splits so tests exercise them.
INTERPRETER_CONFIG = BackwardConfig(block_m=16, block_n=64, tiles_per_program=2, num_warps=4,
                                    num_stages=1, dq_block_n=64, preprocess_rows=64)


def atomic_dq_chunk_rows(config: BackwardConfig, q: torch.Tensor) -> int:
    """Query rows per KV-outer launch of the atomic dQ (see ``BackwardConfig``) for q
    ``[total_q, H, D]``: all of them, or as many as ``atomic_dq_chunk_bytes`` of float32 hold."""
    total_q = q.shape[0]
    row_bytes = q[0].numel() * 4
    if q.dtype == torch.float32 or total_q * row_bytes <= config.atomic_dq_max_bytes:
        return max(total_q, 1)
    return max(config.atomic_dq_chunk_bytes // row_bytes, 1)


def bulk_dq_entries(config: BackwardConfig, group_size: int, head_dim: int) -> int:
    """Entries (tokens x the group's heads) per row tile whose dQ rows the KV-outer kernel adds
    as one piece each (``config.bulk_dq``), or 0 for elementwise atomics: the tile must hold 1,
    2 or 4 whole entries of a power-of-two group, and a dQ row must be 16-byte aligned (TMA)."""
    entries = config.block_m // group_size
    if (not config.bulk_dq or group_size & (group_size - 1) or config.block_m % group_size
            or entries not in (1, 2, 4) or head_dim % 4):
        return 0
    return entries


def launch_config(q: torch.Tensor) -> BackwardConfig:
    """The default launch configuration for q's device and dtype."""
    if not q.is_cuda:
        return INTERPRETER_CONFIG
    return CUDA_FP32_CONFIG if q.dtype == torch.float32 else CUDA_CONFIG


# One program: PREPROCESS_ROWS flattened (token, head) rows.
# Grid: (cdiv(total_q * H, PREPROCESS_ROWS),). do, o [total_q, H, D]; lse [total_q, H] (natural
# log), dlse [total_q, H] or None (HAS_DLSE); writes delta = sum_d do * o - dlse and
# lse2 = lse * log2(e) (+inf where lse is -inf: the row sees no key), both float32 [total_q * H].
@triton.jit
def _preprocess_kernel(
        do_ptr, o_ptr, lse_ptr, dlse_ptr, delta_ptr, lse2_ptr,
        stride_do_token, stride_do_head, stride_o_token, stride_o_head,
        stride_lse_token, stride_lse_head, stride_dlse_token, stride_dlse_head,
        num_rows, num_heads,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PREPROCESS_ROWS: tl.constexpr,
        HAS_DLSE: tl.constexpr):
    rows = tl.program_id(0) * PREPROCESS_ROWS + tl.arange(0, PREPROCESS_ROWS)
    row_mask = rows < num_rows
    token = (rows // num_heads).to(tl.int64)
    head = rows % num_heads
    dim = tl.arange(0, BLOCK_D)
    mask = row_mask[:, None] & (dim < HEAD_DIM)[None, :]
    do = tl.load(do_ptr + token[:, None] * stride_do_token + head[:, None] * stride_do_head
                 + dim[None, :], mask=mask, other=0.0)
    o = tl.load(o_ptr + token[:, None] * stride_o_token + head[:, None] * stride_o_head
                + dim[None, :], mask=mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    if HAS_DLSE:
        dlse = tl.load(dlse_ptr + token * stride_dlse_token + head * stride_dlse_head,
                       mask=row_mask, other=0.0)
        delta -= dlse.to(tl.float32)
    lse = tl.load(lse_ptr + token * stride_lse_token + head * stride_lse_head, mask=row_mask,
                  other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    tl.store(delta_ptr + rows, delta, mask=row_mask)
    tl.store(lse2_ptr + rows, lse2, mask=row_mask)


@triton.jit
def _store_key_tile(out_ptr, acc_ptr, tile, split, split_slot, key_start, key_offs, dim, mask,
                    group, num_groups, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    CAN_SPLIT: tl.constexpr):
    """A program's dK or dV tile ``[BLOCK_N, BLOCK_D]`` (float32): stored into ``out
    [total_k, G, D]`` at its block's key rows, or, for a split bucket, added with atomics into
    the float32 ``acc [num_split, BLOCK_SIZE, D]`` at the bucket's ``split_slot``."""
    direct = out_ptr + ((key_start + key_offs).to(tl.int64)[:, None] * num_groups + group) * HEAD_DIM \
        + dim[None, :]
    if CAN_SPLIT:
        if split:
            tl.atomic_add(acc_ptr + (split_slot.to(tl.int64) * BLOCK_SIZE + key_offs)[:, None]
                          * HEAD_DIM + dim[None, :], tile, mask=mask, sem="relaxed")
        else:
            tl.store(direct, tile.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(direct, tile.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_dq_entry(dq_desc, dq_acc_ptr, piece, entries_ptr, entry_start, tile_row,
                  slot: tl.constexpr, last_row, num_rows, num_heads, group, dim, dim_mask,
                  GROUP_SIZE: tl.constexpr, TOPK: tl.constexpr, HEAD_DIM: tl.constexpr,
                  TMA: tl.constexpr):
    """Adds ``piece [GROUP_SIZE, BLOCK_D]`` (float32), the dQ rows of the tile's entry ``slot``
    (the group's heads of one token, contiguous in ``dq_acc [num_rows * H, D]``), if the entry
    is in the tile: one TMA bulk reduction (TMA) or ``tl.atomic_add``."""
    first = tile_row + slot * GROUP_SIZE
    if first < last_row:
        entry = tl.load(entries_ptr + entry_start + first // GROUP_SIZE)
        row = ((entry // TOPK) % num_rows) * num_heads + group * GROUP_SIZE
        if TMA:
            dq_desc.atomic_add([row, 0], piece)
        else:
            rows = row.to(tl.int64) + tl.arange(0, GROUP_SIZE)
            tl.atomic_add(dq_acc_ptr + rows[:, None] * HEAD_DIM + dim[None, :], piece,
                          mask=dim_mask[None, :], sem="relaxed")


@triton.jit
def _add_dq_by_entry(dq_desc, dq_acc_ptr, dq, entries_ptr, entry_start, tile_row, last_row,
                     num_rows, num_heads, group, dim, dim_mask, GROUP_SIZE: tl.constexpr,
                     TOPK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     ENTRIES: tl.constexpr, TMA: tl.constexpr):
    """Adds a tile's dQ ``[ENTRIES * GROUP_SIZE, BLOCK_D]`` (rows: entry-major, then head) one
    entry at a time (ENTRIES in 1, 2, 4), splitting the register tile into entry pieces."""
    if ENTRIES == 1:
        _add_dq_entry(dq_desc, dq_acc_ptr, dq, entries_ptr, entry_start, tile_row, 0, last_row,
                      num_rows, num_heads, group, dim, dim_mask, GROUP_SIZE, TOPK, HEAD_DIM, TMA)
    elif ENTRIES == 2:
        e0, e1 = tl.split(tl.permute(tl.reshape(dq, [2, GROUP_SIZE, BLOCK_D]), [1, 2, 0]))
        _add_dq_entry(dq_desc, dq_acc_ptr, e0, entries_ptr, entry_start, tile_row, 0, last_row,
                      num_rows, num_heads, group, dim, dim_mask, GROUP_SIZE, TOPK, HEAD_DIM, TMA)
        _add_dq_entry(dq_desc, dq_acc_ptr, e1, entries_ptr, entry_start, tile_row, 1, last_row,
                      num_rows, num_heads, group, dim, dim_mask, GROUP_SIZE, TOPK, HEAD_DIM, TMA)
    else:
        # [a, b, head, dim] with entry = 2a + b, moved to [head, dim, b, a] and split twice.
        low, high = tl.split(tl.permute(tl.reshape(dq, [2, 2, GROUP_SIZE, BLOCK_D]), [2, 3, 1, 0]))
        e0, e1 = tl.split(low)
        e2, e3 = tl.split(high)
        _add_dq_entry(dq_desc, dq_acc_ptr, e0, entries_ptr, entry_start, tile_row, 0, last_row,
                      num_rows, num_heads, group, dim, dim_mask, GROUP_SIZE, TOPK, HEAD_DIM, TMA)
        _add_dq_entry(dq_desc, dq_acc_ptr, e1, entries_ptr, entry_start, tile_row, 1, last_row,
                      num_rows, num_heads, group, dim, dim_mask, GROUP_SIZE, TOPK, HEAD_DIM, TMA)
        _add_dq_entry(dq_desc, dq_acc_ptr, e2, entries_ptr, entry_start, tile_row, 2, last_row,
                      num_rows, num_heads, group, dim, dim_mask, GROUP_SIZE, TOPK, HEAD_DIM, TMA)
        _add_dq_entry(dq_desc, dq_acc_ptr, e3, entries_ptr, entry_start, tile_row, 3, last_row,
                      num_rows, num_heads, group, dim, dim_mask, GROUP_SIZE, TOPK, HEAD_DIM, TMA)


# One program: key tile program_id(1) (BLOCK_N keys) of one (group, key block) bucket x up to
# rows_per_program of the bucket's packed (entry, head) rows, in tiles of BLOCK_M; K and V of the
# tile are loaded once. Grid: (csr.max_programs, BLOCK_SIZE // BLOCK_N); programs past the real
# ones exit. The CSR covers the query rows [row_start, row_start + num_rows). q, do [total_q, H, D]; k, v
# [total_k, G, D]; lse2, delta float32 [total_q, H].
# Writes dk, dv [total_k, G, D] for unsplit buckets, adds into dk_acc, dv_acc float32
# [num_split, BLOCK_SIZE, D] for split ones (CAN_SPLIT; always_split: every bucket, at slot
# = bucket); COMPUTE_DQ: adds ds k * scale into dq_acc float32 [num_rows, H, D] with atomics
# (DQ_ENTRIES > 0: one piece per entry of the tile, a TMA reduction through dq_desc with DQ_TMA).
@triton.jit
def _block_backward_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse2_ptr, delta_ptr,
        dq_acc_ptr, dq_desc, dk_ptr, dv_ptr, dk_acc_ptr, dv_acc_ptr,
        entries_ptr, bucket_start_ptr, program_start_ptr, program_bucket_ptr, split_slot_ptr,
        block_key_start_ptr, block_position_ptr, block_num_keys_ptr, row_position_ptr,
        stride_q_token, stride_q_head, stride_k_token, stride_k_group,
        stride_v_token, stride_v_group, stride_do_token, stride_do_head,
        row_start, num_rows, num_heads, num_groups, num_buckets, num_blocks, rows_per_program,
        always_split, scale, scale_log2,
        GROUP_SIZE: tl.constexpr, TOPK: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, CAN_SPLIT: tl.constexpr, COMPUTE_DQ: tl.constexpr,
        COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr, NEED_DS: tl.constexpr,
        DQ_ENTRIES: tl.constexpr, DQ_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    if pid < tl.load(program_start_ptr + num_buckets):
        bucket = tl.load(program_bucket_ptr + pid)
        group = bucket // num_blocks
        block = bucket % num_blocks
        first_program = tl.load(program_start_ptr + bucket)
        split = (tl.load(program_start_ptr + bucket + 1) - first_program > 1) | (always_split != 0)
        key_start = tl.load(block_key_start_ptr + block)
        key_position = tl.load(block_position_ptr + block)
        num_keys = tl.load(block_num_keys_ptr + block)
        entry_start = tl.load(bucket_start_ptr + bucket)
        entry_end = tl.load(bucket_start_ptr + bucket + 1)
        first_row = (pid - first_program) * rows_per_program
        last_row = tl.minimum(first_row + rows_per_program, (entry_end - entry_start) * GROUP_SIZE)

        dim = tl.arange(0, BLOCK_D)
        dim_mask = dim < HEAD_DIM
        key_offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        key_mask = key_offs < num_keys
        kv_mask = key_mask[:, None] & dim_mask[None, :]
        key_rows = (key_start + key_offs).to(tl.int64)
        k = tl.load(k_ptr + key_rows[:, None] * stride_k_token + group * stride_k_group + dim[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + key_rows[:, None] * stride_v_token + group * stride_v_group + dim[None, :],
                    mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for tile_row in range(first_row, last_row, BLOCK_M):
            rows_in_bucket = tile_row + tl.arange(0, BLOCK_M)
            entry_index = entry_start + rows_in_bucket // GROUP_SIZE
            row_mask = rows_in_bucket < last_row
            entry = tl.load(entries_ptr + entry_index, mask=row_mask, other=0)
            chunk_row = (entry // TOPK) % num_rows  # row of the launch's chunk
            head = group * GROUP_SIZE + rows_in_bucket % GROUP_SIZE
            position = tl.load(row_position_ptr + chunk_row, mask=row_mask, other=-1)
            token = (row_start + chunk_row).to(tl.int64)
            row_dim_mask = row_mask[:, None] & dim_mask[None, :]
            q = tl.load(q_ptr + token[:, None] * stride_q_token + head[:, None] * stride_q_head
                        + dim[None, :], mask=row_dim_mask, other=0.0)
            do = tl.load(do_ptr + token[:, None] * stride_do_token + head[:, None] * stride_do_head
                         + dim[None, :], mask=row_dim_mask, other=0.0)
            row_flat = token * num_heads + head
            lse2 = tl.load(lse2_ptr + row_flat, mask=row_mask, other=float("inf"))
            # Tiles [BLOCK_N keys, BLOCK_M rows] (k q^T): p^T and ds^T feed dV and dK as they
            # are (measured 1.8x faster at 128K than [BLOCK_M, BLOCK_N] tiles with transposes).
            scores_t = mma(k, tl.trans(q), DOT_PRECISION, DOT_UPCAST) * scale_log2
            visible_t = key_mask[:, None] & ((key_position + key_offs)[:, None] <= position[None, :])
            p_t = tl.where(visible_t, tl.exp2(scores_t - lse2[None, :]), 0.0)
            if COMPUTE_DV:
                dv += mma(p_t.to(do.dtype), do, DOT_PRECISION, DOT_UPCAST)
            if NEED_DS:  # COMPUTE_DK or COMPUTE_DQ
                delta = tl.load(delta_ptr + row_flat, mask=row_mask, other=0.0)
                dp_t = mma(v, tl.trans(do), DOT_PRECISION, DOT_UPCAST)
                ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
                if COMPUTE_DK:
                    dk += mma(ds_t, q, DOT_PRECISION, DOT_UPCAST)
                if COMPUTE_DQ:
                    dq = mma(tl.trans(ds_t), k, DOT_PRECISION, DOT_UPCAST) * scale
                    if DQ_ENTRIES > 0:
                        _add_dq_by_entry(dq_desc, dq_acc_ptr, dq, entries_ptr, entry_start,
                                         tile_row, last_row, num_rows, num_heads, group, dim,
                                         dim_mask, GROUP_SIZE, TOPK, HEAD_DIM, BLOCK_D,
                                         DQ_ENTRIES, DQ_TMA)
                    else:
                        acc_row = chunk_row.to(tl.int64) * num_heads + head
                        tl.atomic_add(dq_acc_ptr + acc_row[:, None] * HEAD_DIM + dim[None, :],
                                      dq, mask=row_dim_mask, sem="relaxed")
        split_slot = bucket * 0  # int32; its slot among the split buckets (CAN_SPLIT)
        if CAN_SPLIT:
            split_slot = tl.load(split_slot_ptr + bucket)
        if COMPUTE_DK:
            _store_key_tile(dk_ptr, dk_acc_ptr, dk * scale, split, split_slot, key_start,
                            key_offs, dim, kv_mask, group, num_groups, HEAD_DIM, BLOCK_SIZE,
                            CAN_SPLIT)
        if COMPUTE_DV:
            _store_key_tile(dv_ptr, dv_acc_ptr, dv, split, split_slot, key_start, key_offs, dim,
                            kv_mask, group, num_groups, HEAD_DIM, BLOCK_SIZE, CAN_SPLIT)


# One program: one (group, key block) bucket, BLOCK_N keys a step. Grid: (G * num_blocks,).
# For a bucket nobody chose (no program), writes zeros into its key rows of dk, dv
# [total_k, G, D]; for a split bucket (CAN_SPLIT), writes its float32 sums dk_acc, dv_acc
# [num_split, BLOCK_SIZE, D] cast to dk's dtype. Unsplit buckets were stored by the KV-outer
# kernel. dk / dv may be None (HAS_DK, HAS_DV).
@triton.jit
def _finish_kernel(
        dk_ptr, dv_ptr, dk_acc_ptr, dv_acc_ptr, program_start_ptr, split_slot_ptr,
        block_key_start_ptr, block_num_keys_ptr, num_groups, num_blocks, always_split,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, CAN_SPLIT: tl.constexpr, HAS_DK: tl.constexpr,
        HAS_DV: tl.constexpr):
    bucket = tl.program_id(0)
    group = bucket // num_blocks
    block = bucket % num_blocks
    programs = tl.load(program_start_ptr + bucket + 1) - tl.load(program_start_ptr + bucket)
    programs = tl.where(always_split != 0, 2, programs)  # every bucket in the float32 sums
    num_keys = tl.load(block_num_keys_ptr + block)
    if (programs != 1) & (num_keys > 0):
        key_start = tl.load(block_key_start_ptr + block)
        dim = tl.arange(0, BLOCK_D)
        dim_mask = dim < HEAD_DIM
        for start in tl.static_range(0, BLOCK_SIZE, BLOCK_N):
            key_offs = start + tl.arange(0, BLOCK_N)
            mask = (key_offs < num_keys)[:, None] & dim_mask[None, :]
            out = ((key_start + key_offs).to(tl.int64)[:, None] * num_groups + group) * HEAD_DIM \
                + dim[None, :]
            dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            if CAN_SPLIT:  # programs > 1: the bucket's float32 sums; 0: zeros
                split_slot = tl.maximum(tl.load(split_slot_ptr + bucket), 0).to(tl.int64)
                acc = (split_slot * BLOCK_SIZE + key_offs)[:, None] * HEAD_DIM + dim[None, :]
                split_mask = mask & ((tl.zeros([BLOCK_N], tl.int32) + programs) > 1)[:, None]
                if HAS_DK:
                    dk = tl.load(dk_acc_ptr + acc, mask=split_mask, other=0.0)
                if HAS_DV:
                    dv = tl.load(dv_acc_ptr + acc, mask=split_mask, other=0.0)
            if HAS_DK:
                tl.store(dk_ptr + out, dk.to(dk_ptr.dtype.element_ty), mask=mask)
            if HAS_DV:
                tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=mask)


# One program: one query token x one group, the group's heads as the BLOCK_H rows of its tiles;
# walks the token's TOPK selected blocks in slot order, DQ_BLOCK_N keys a step (deterministic).
# Grid: (total_q, G). q, do [total_q, H, D]; k, v [total_k, G, D]; indices [G, total_q, TOPK];
# lse2, delta float32 [total_q, H]; row_position, row_key_start int32 [total_q] (the token's
# position in its sequence, its sequence's first key row); writes dq [total_q, H, D].
@triton.jit
def _query_dq_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse2_ptr, delta_ptr, indices_ptr, row_position_ptr,
        row_key_start_ptr, dq_ptr,
        stride_q_token, stride_q_head, stride_k_token, stride_k_group,
        stride_v_token, stride_v_group, stride_do_token, stride_do_head,
        stride_indices_group, stride_indices_token, num_heads, scale, scale_log2,
        GROUP_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, TOPK: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DQ_BLOCK_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    position = tl.load(row_position_ptr + token)
    key_base = tl.load(row_key_start_ptr + token).to(tl.int64)
    heads = group * GROUP_SIZE + tl.arange(0, BLOCK_H)
    head_mask = tl.arange(0, BLOCK_H) < GROUP_SIZE
    dim = tl.arange(0, BLOCK_D)
    dim_mask = dim < HEAD_DIM
    row_dim_mask = head_mask[:, None] & dim_mask[None, :]
    q = tl.load(q_ptr + token * stride_q_token + heads[:, None] * stride_q_head + dim[None, :],
                mask=row_dim_mask, other=0.0)
    do = tl.load(do_ptr + token * stride_do_token + heads[:, None] * stride_do_head + dim[None, :],
                 mask=row_dim_mask, other=0.0)
    lse2 = tl.load(lse2_ptr + token * num_heads + heads, mask=head_mask, other=float("inf"))
    delta = tl.load(delta_ptr + token * num_heads + heads, mask=head_mask, other=0.0)
    offs = tl.arange(0, DQ_BLOCK_N)
    dq = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    index_row = indices_ptr + group.to(tl.int64) * stride_indices_group + token * stride_indices_token
    for slot in range(TOPK):
        block = tl.load(index_row + slot)
        if (block >= 0) & (block * BLOCK_SIZE <= position):
            for start in tl.static_range(0, BLOCK_SIZE, DQ_BLOCK_N):
                key = block * BLOCK_SIZE + start + offs  # position in the sequence
                key_mask = key <= position  # causal; also keeps keys inside the sequence
                kv_mask = key_mask[:, None] & dim_mask[None, :]
                k = tl.load(k_ptr + (key_base + key)[:, None] * stride_k_token + group * stride_k_group
                            + dim[None, :], mask=kv_mask, other=0.0)
                v = tl.load(v_ptr + (key_base + key)[:, None] * stride_v_token + group * stride_v_group
                            + dim[None, :], mask=kv_mask, other=0.0)
                scores = mma(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST) * scale_log2
                p = tl.where(key_mask[None, :], tl.exp2(scores - lse2[:, None]), 0.0)
                dp = mma(do, tl.trans(v), DOT_PRECISION, DOT_UPCAST)
                ds = p * (dp - delta[:, None])
                dq += mma(ds.to(k.dtype), k, DOT_PRECISION, DOT_UPCAST)
    tl.store(dq_ptr + (token * num_heads + heads)[:, None] * HEAD_DIM + dim[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_dim_mask)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def sparse_attention_backward(do: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                              v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                              indices: torch.Tensor, cu_seqlens_q: torch.Tensor,
                              cu_seqlens_k: torch.Tensor, *, block_size: int, softmax_scale: float,
                              dlse: torch.Tensor | None = None, deterministic: bool = False,
                              config: BackwardConfig | None = None,
                              needs: tuple[bool, bool, bool] = (True, True, True),
                              out: tuple | None = None) -> tuple:
    """Gradients of :func:`msattn.ops.sparse_attention.sparse_attention` (the selection is constant).

    Args:
        do: ``[total_q, H, D]`` gradient of ``o`` (None: zero, only ``lse`` has a gradient).
        q: ``[total_q, H, D]``; k, v: ``[total_k, G, D]`` (fp16/bf16/fp32, last dim contiguous).
        o, lse: the forward's results (``o [total_q, H, D]``, ``lse [total_q, H]`` float32).
        indices: ``[G, total_q, topk]`` int32 (distinct valid block ids per row).
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]``.
        dlse: optional ``[total_q, H]`` gradient of ``lse``.
        deterministic: fixed accumulation order everywhere (no split buckets, query-outer dQ).
        config: launch configuration (default: :func:`launch_config`).
        needs: which of ``(dq, dk, dv)`` to compute; the others come back as None.
        out: optional ``(dq, dk, dv)`` contiguous buffers to write into (None entries allocated).
    Returns:
        ``(dq, dk, dv)`` in the dtypes of q, k, v.
    """
    need_dq, need_dk, need_dv = needs
    total_q, num_heads, head_dim = q.shape
    total_k, num_groups, _ = k.shape
    group_size = num_heads // num_groups
    topk = indices.shape[-1]
    device = q.device
    if config is None:
        config = launch_config(q)
    if deterministic:
        config = replace(config, dq_mode="query")
    if not (need_dk or need_dv):  # the KV-outer kernel would run only for dq
        config = replace(config, dq_mode="query")
    out = out if out is not None else (None, None, None)
    dq, dk, dv = (
        (given if given is not None else torch.empty_like(t, memory_format=torch.contiguous_format))
        if need else None for t, given, need in zip((q, k, v), out, needs))
    if not (need_dq or need_dk or need_dv):
        return dq, dk, dv
    if total_q == 0:
        for grad in (dq, dk, dv):
            if grad is not None:
                grad.zero_()
        return dq, dk, dv
    q, k, v, o = (_last_dim_contiguous(t) for t in (q, k, v, o))
    indices = _last_dim_contiguous(indices)
    if do is None:
        do = torch.zeros_like(o)
    do = _last_dim_contiguous(do)
    block_d = max(16, next_power_of_2(head_dim))  # tl.dot needs 16
    dots = dot_options(q.dtype)
    scale_log2 = softmax_scale * LOG2E

    # 1. delta and the base-2 LSE.
    delta = torch.empty(total_q, num_heads, dtype=torch.float32, device=device)
    lse2 = torch.empty(total_q, num_heads, dtype=torch.float32, device=device)
    num_rows = total_q * num_heads
    _preprocess_kernel[(cdiv(num_rows, config.preprocess_rows),)](
        do_ptr=do, o_ptr=o, lse_ptr=lse, dlse_ptr=dlse, delta_ptr=delta, lse2_ptr=lse2,
        stride_do_token=do.stride(0), stride_do_head=do.stride(1), stride_o_token=o.stride(0),
        stride_o_head=o.stride(1), stride_lse_token=lse.stride(0), stride_lse_head=lse.stride(1),
        stride_dlse_token=dlse.stride(0) if dlse is not None else 0,
        stride_dlse_head=dlse.stride(1) if dlse is not None else 0,
        num_rows=num_rows, num_heads=num_heads, HEAD_DIM=head_dim, BLOCK_D=block_d,
        PREPROCESS_ROWS=config.preprocess_rows, HAS_DLSE=dlse is not None,
        num_warps=config.preprocess_warps)

    dq_atomic = need_dq and config.dq_mode == "atomic"
    position = None
    if need_dk or need_dv:
        # 2. KV-outer dK / dV (and dQ through atomics), over chunks of query rows when the
        # float32 dQ of all rows would be too large.
        block_n = min(config.block_n, block_size)
        rows_per_group = total_q * topk * group_size  # bound on the rows of one bucket
        if deterministic:  # one program per bucket (and key tile)
            tiles_per_program = cdiv(rows_per_group, config.block_m)
        else:
            tiles_per_program = config.tiles_per_program
        rows_per_program = config.block_m * tiles_per_program
        chunk_rows = atomic_dq_chunk_rows(config, q) if dq_atomic else total_q
        chunks = [(start, min(start + chunk_rows, total_q)) for start in range(0, total_q, chunk_rows)]
        always_split = len(chunks) > 1  # dK, dV summed over the chunks in float32
        layout = csr_layout(cu_seqlens_q, cu_seqlens_k, total_q=total_q, num_groups=num_groups,
                            block_size=block_size, total_k=total_k)
        num_blocks = layout.num_blocks
        num_buckets = num_groups * num_blocks
        # A split bucket has more than rows_per_program rows: this bounds how many there are.
        max_split = num_buckets if always_split else \
            min(num_buckets, num_groups * rows_per_group // (rows_per_program + 1))
        can_split = max_split > 0 and (always_split or rows_per_program < rows_per_group)
        dk_acc = dv_acc = None
        if can_split:
            acc_shape = (max_split, block_size, head_dim)
            dk_acc = torch.zeros(acc_shape, dtype=torch.float32, device=device) if need_dk else None
            dv_acc = torch.zeros(acc_shape, dtype=torch.float32, device=device) if need_dv else None
        dq_acc = None
        if dq_atomic:
            dq_acc = dq if dq.dtype == torch.float32 and dq.is_contiguous() else \
                torch.empty((chunk_rows,) + q.shape[1:], dtype=torch.float32, device=device)
        dq_entries = bulk_dq_entries(config, group_size, head_dim) \
            if dq_acc is not None and dq_acc is not dq else 0
        dq_tma = dq_entries > 0 and sm90_reductions(device)
        # every bucket its own accumulator slot: 0, 1, ..., num_buckets - 1
        split_slot = torch.arange(num_buckets, dtype=torch.int32, device=device) \
            if always_split else None
        for row_start, row_end in chunks:
            csr = build_block_csr(indices, cu_seqlens_q, cu_seqlens_k, block_size=block_size,
                                  total_k=total_k, row_start=row_start, row_end=row_end,
                                  group_size=group_size, block_m=config.block_m,
                                  tiles_per_program=tiles_per_program, layout=layout)
            if can_split and not always_split:
                programs = csr.program_start[1:] - csr.program_start[:-1]
                split_slot = (torch.cumsum(programs > 1, 0, dtype=torch.int32) - 1).to(torch.int32)
            chunk_dq = dq_acc
            if dq_atomic and dq_acc is not dq:
                chunk_dq = dq_acc[:row_end - row_start]
                chunk_dq.zero_()
            elif dq_atomic:
                dq_acc.zero_()
            dq_desc = None
            if dq_tma:
                dq_desc = TensorDescriptor(chunk_dq, [chunk_dq.shape[0] * num_heads, head_dim],
                                           [head_dim, 1], [group_size, block_d])
            _block_backward_kernel[(csr.max_programs, block_size // block_n)](
                q_ptr=q, k_ptr=k, v_ptr=v, do_ptr=do, lse2_ptr=lse2, delta_ptr=delta,
                dq_acc_ptr=chunk_dq, dq_desc=dq_desc, dk_ptr=dk, dv_ptr=dv, dk_acc_ptr=dk_acc,
                dv_acc_ptr=dv_acc,
                entries_ptr=csr.entries, bucket_start_ptr=csr.bucket_start,
                program_start_ptr=csr.program_start, program_bucket_ptr=csr.program_bucket,
                split_slot_ptr=split_slot, block_key_start_ptr=csr.block_key_start,
                block_position_ptr=csr.block_position, block_num_keys_ptr=csr.block_num_keys,
                row_position_ptr=csr.row_position,
                stride_q_token=q.stride(0), stride_q_head=q.stride(1),
                stride_k_token=k.stride(0), stride_k_group=k.stride(1),
                stride_v_token=v.stride(0), stride_v_group=v.stride(1),
                stride_do_token=do.stride(0), stride_do_head=do.stride(1),
                row_start=row_start, num_rows=row_end - row_start, num_heads=num_heads,
                num_groups=num_groups, num_buckets=num_buckets, num_blocks=num_blocks,
                rows_per_program=rows_per_program, always_split=int(always_split),
                scale=softmax_scale, scale_log2=scale_log2,
                GROUP_SIZE=group_size, TOPK=topk, HEAD_DIM=head_dim, BLOCK_D=block_d,
                BLOCK_M=config.block_m, BLOCK_N=block_n, BLOCK_SIZE=block_size, CAN_SPLIT=can_split,
                COMPUTE_DQ=dq_atomic, COMPUTE_DK=need_dk, COMPUTE_DV=need_dv,
                NEED_DS=need_dk or dq_atomic,
                DQ_ENTRIES=dq_entries, DQ_TMA=dq_tma, **dots,
                num_warps=config.num_warps, num_stages=config.num_stages)
            if dq_atomic and dq_acc is not dq:
                dq[row_start:row_end].copy_(chunk_dq)
        position = layout.row_position
        # 3. Zeros for unselected blocks, casts of split buckets.
        _finish_kernel[(num_buckets,)](
            dk_ptr=dk, dv_ptr=dv, dk_acc_ptr=dk_acc, dv_acc_ptr=dv_acc,
            program_start_ptr=csr.program_start, split_slot_ptr=split_slot,
            block_key_start_ptr=csr.block_key_start, block_num_keys_ptr=csr.block_num_keys,
            num_groups=num_groups, num_blocks=num_blocks, always_split=int(always_split),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=min(32, block_size),
            BLOCK_SIZE=block_size, CAN_SPLIT=can_split, HAS_DK=need_dk, HAS_DV=need_dv,
            num_warps=config.finish_warps)

    if need_dq and not dq_atomic:
        # 4. Query-outer dQ.
        rows = torch.arange(total_q, device=device)
        batch = cu_seqlens_q.numel() - 1
        seq = torch.searchsorted(cu_seqlens_q[1:], rows, right=True).clamp_max(batch - 1)
        row_key_start = cu_seqlens_k[seq].to(torch.int32)
        if position is None:
            position = row_positions(cu_seqlens_q, cu_seqlens_k, 0, total_q).to(torch.int32)
        _query_dq_kernel[(total_q, num_groups)](
            q_ptr=q, k_ptr=k, v_ptr=v, do_ptr=do, lse2_ptr=lse2, delta_ptr=delta,
            indices_ptr=indices, row_position_ptr=position, row_key_start_ptr=row_key_start,
            dq_ptr=dq, stride_q_token=q.stride(0), stride_q_head=q.stride(1),
            stride_k_token=k.stride(0), stride_k_group=k.stride(1),
            stride_v_token=v.stride(0), stride_v_group=v.stride(1),
            stride_do_token=do.stride(0), stride_do_head=do.stride(1),
            stride_indices_group=indices.stride(0), stride_indices_token=indices.stride(1),
            num_heads=num_heads, scale=softmax_scale, scale_log2=scale_log2,
            GROUP_SIZE=group_size, BLOCK_H=max(16, next_power_of_2(group_size)), TOPK=topk,
            HEAD_DIM=head_dim, BLOCK_D=block_d, DQ_BLOCK_N=min(config.dq_block_n, block_size),
            BLOCK_SIZE=block_size, **dots, num_warps=config.dq_num_warps,
            num_stages=config.dq_num_stages)
    return dq, dk, dv


class SparseAttentionFunction(torch.autograd.Function):
    """``(o, lse) = sparse_attention(q, k, v, ...)`` with gradients for q, k, v (and through lse).

    ``indices`` and the ``cu_seqlens`` are integer inputs: they get no gradient (None).
    """

    @staticmethod
    def forward(ctx, q, k, v, indices, cu_seqlens_q, cu_seqlens_k, block_size, softmax_scale,
                deterministic):
        o, lse = sparse_attention(q, k, v, indices, cu_seqlens_q, cu_seqlens_k,
                                  block_size=block_size, softmax_scale=softmax_scale)
        ctx.save_for_backward(q, k, v, o, lse, indices, cu_seqlens_q, cu_seqlens_k)
        ctx.block_size = block_size
        ctx.softmax_scale = softmax_scale
        ctx.deterministic = deterministic
        ctx.set_materialize_grads(False)  # None for an output the loss does not use
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        needs = tuple(ctx.needs_input_grad[:3])
        if not any(needs) or (do is None and dlse is None):  # None gradients count as zeros
            return (None,) * 9
        q, k, v, o, lse, indices, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        dq, dk, dv = sparse_attention_backward(
            do, q, k, v, o, lse, indices, cu_seqlens_q, cu_seqlens_k, block_size=ctx.block_size,
            softmax_scale=ctx.softmax_scale, dlse=dlse, deterministic=ctx.deterministic,
            needs=needs)
        return dq, dk, dv, None, None, None, None, None, None


def sparse_attention_autograd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              indices: torch.Tensor, cu_seqlens_q: torch.Tensor,
                              cu_seqlens_k: torch.Tensor, *, block_size: int, softmax_scale: float,
                              deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable Triton sparse attention: ``(o [total_q, H, D], lse [total_q, H] float32)``
    as :func:`msattn.ops.sparse_attention.sparse_attention`, with dq, dk, dv in backward
    (``deterministic``: bitwise repeatable gradients)."""
    return SparseAttentionFunction.apply(q, k, v, indices, cu_seqlens_q, cu_seqlens_k, block_size,
                                         softmax_scale, deterministic)
