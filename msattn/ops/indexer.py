"""Fused MSA indexer: index scores, causal block max-pool and an exact running top-k in one pass.

The ``[T, S / block_size]`` score matrix is never written. Each program owns a tile of
``BLOCK_R`` flattened (query token, group) rows of one sequence, so the groups of a token share
every index-key load, and streams the index keys block by block:
``qi . ki^T`` on the tensor cores, causal mask, max over the block, then the block enters the
running top-k list of a row when it beats the row's worst entry (value, then lower id wins).

With few query tiles and a long key range (chunked prefill, short T) the key blocks are split
across programs; each writes its partial top-k list and a merge kernel combines them exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from msattn.ops.utils import device_sm_count, dot_options, mma

# Launch configuration on CUDA (rows per program, warps, pipeline stages), tuned on an H200.
CUDA_CONFIG = {"block_r": 256, "num_warps": 16, "num_stages": 3}

# Sentinel id for the slots that pad ``topk`` to a power of two: never evicted, never written.
_PAD_ID = tl.constexpr(1 << 30)


@triton.jit
def _tile_rows(cu_seqlens_q_ptr, cu_seqlens_k_ptr, batch, tile, NUM_GROUPS: tl.constexpr,
               BLOCK_R: tl.constexpr):
    """Rows of one tile: flattened (token, group) rows ``tile * BLOCK_R ...`` of sequence ``batch``."""
    q_start = tl.load(cu_seqlens_q_ptr + batch)
    len_q = tl.load(cu_seqlens_q_ptr + batch + 1) - q_start
    k_start = tl.load(cu_seqlens_k_ptr + batch)
    len_k = tl.load(cu_seqlens_k_ptr + batch + 1) - k_start
    rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < len_q * NUM_GROUPS
    token = rows // NUM_GROUPS
    group = rows % NUM_GROUPS
    position = len_k - len_q + token  # absolute position of the query in its sequence
    return q_start, len_q, k_start, len_k, row_mask, token, group, position


@triton.jit
def _topk_insert(vals, ids, new_val, new_id):
    """Insert one candidate per row into the running lists ``vals, ids [R, TOPK]``.

    The worst entry is the lowest value, and among equal values the highest id; the candidate
    replaces it when it ranks higher (greater value, or equal value and lower id).
    """
    worst_val = tl.min(vals, axis=1)
    worst_id = tl.max(tl.where(vals == worst_val[:, None], ids, -2147483647), axis=1)
    better = (new_val > worst_val) | ((new_val == worst_val) & (new_id < worst_id) & (new_id >= 0))
    replace = (ids == worst_id[:, None]) & better[:, None]
    return tl.where(replace, new_val[:, None], vals), tl.where(replace, new_id[:, None], ids)


@triton.jit
def _empty_lists(BLOCK_R: tl.constexpr, TOPK: tl.constexpr, TOPK_PAD: tl.constexpr):
    """Running lists with ``TOPK`` empty slots (-inf, distinct negative ids) and pad slots."""
    slot = tl.arange(0, TOPK_PAD)[None, :] + tl.zeros([BLOCK_R, TOPK_PAD], dtype=tl.int32)
    is_pad = slot >= TOPK
    vals = tl.where(is_pad, float("inf"), float("-inf"))
    ids = tl.where(is_pad, _PAD_ID, -1 - slot)
    return vals, ids


@triton.jit
def _store_selection(out_ptr, stride_out_group, stride_out_token, global_token, group, row_mask,
                     own_block, ids, TOPK_PAD: tl.constexpr):
    """Write a row's final list: valid ids, the own block last among them, then -1 padding."""
    real = ids < _PAD_ID
    valid = real & (ids >= 0)
    invalid = real & (ids < 0)
    is_own = ids == own_block[:, None]
    num_valid = tl.sum(valid.to(tl.int32), axis=1)[:, None]
    rank_other = tl.cumsum((valid & (ids != own_block[:, None])).to(tl.int32), axis=1) - 1
    rank_invalid = num_valid + tl.cumsum(invalid.to(tl.int32), axis=1) - 1
    dest = tl.where(is_own, num_valid - 1, tl.where(valid, rank_other, rank_invalid))
    row_ptr = out_ptr + group.to(tl.int64) * stride_out_group + global_token.to(tl.int64) * stride_out_token
    tl.store(row_ptr[:, None] + dest, tl.where(valid, ids, -1), mask=row_mask[:, None] & real)


@triton.jit
def _scan_blocks(q, ki_ptr, stride_ki_token, k_start, dim, dim_mask, position, own_block,
                 block_from, block_to, vals, ids, threshold, scale,
                 BLOCK_R: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 INIT_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr, MASKED: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """Stream key blocks ``[block_from, block_to)`` into the running top-k lists.

    ``MASKED`` applies the causal mask (blocks that reach past the tile's first query).
    """
    for block in range(block_from, block_to):
        block_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
        for sub in tl.static_range(BLOCK_SIZE // BLOCK_N):
            keys = block * BLOCK_SIZE + sub * BLOCK_N + tl.arange(0, BLOCK_N)
            key_ptrs = ki_ptr + (k_start + keys).to(tl.int64)[:, None] * stride_ki_token + dim[None, :]
            if MASKED:
                k = tl.load(key_ptrs, mask=(keys[:, None] <= tl.max(position)) & dim_mask[None, :],
                            other=0.0)
            else:
                k = tl.load(key_ptrs, mask=dim_mask[None, :], other=0.0)
            scores = mma(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST)
            if MASKED:
                scores = tl.where(keys[None, :] <= position[:, None], scores, float("-inf"))
            block_max = tl.maximum(block_max, tl.max(scores, axis=1))
        # max commutes with the (monotone) scaling, so scale the B maxima instead of B x N scores.
        block_max = block_max * scale
        forced = (block <= own_block) & ((block < INIT_BLOCKS) | (block > own_block - LOCAL_BLOCKS))
        block_max = tl.where(forced, float("inf"), block_max)
        if tl.max((block_max > threshold).to(tl.int32), axis=0) > 0:
            vals, ids = _topk_insert(vals, ids, block_max, tl.full([BLOCK_R], block, tl.int32))
            threshold = tl.min(vals, axis=1)
    return vals, ids, threshold


# One program: BLOCK_R flattened (token, group) rows of one sequence x one split of its key blocks.
# Grid: (query tiles of the longest sequence, B, splits). qi [total_q, G, Di], ki [total_k, Di];
# writes indices [G, total_q, TOPK] (one split) or the partial lists of each split.
@triton.jit
def _indexer_kernel(qi_ptr, ki_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr, out_ptr,
                    partial_vals_ptr, partial_ids_ptr,
                    stride_qi_token, stride_qi_group, stride_ki_token,
                    stride_out_group, stride_out_token, scale, blocks_per_split, total_rows,
                    NUM_GROUPS: tl.constexpr, INDEX_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    TOPK: tl.constexpr, TOPK_PAD: tl.constexpr, INIT_BLOCKS: tl.constexpr,
                    LOCAL_BLOCKS: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    DOT_UPCAST: tl.constexpr):
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest (latest) tiles first
    batch = tl.program_id(1)
    split = tl.program_id(2)
    q_start, len_q, k_start, len_k, row_mask, token, group, position = _tile_rows(
        cu_seqlens_q_ptr, cu_seqlens_k_ptr, batch, tile, NUM_GROUPS, BLOCK_R)
    if tile * BLOCK_R < len_q * NUM_GROUPS:
        dim = tl.arange(0, BLOCK_D)
        dim_mask = dim < INDEX_DIM
        global_token = q_start + token
        q = tl.load(qi_ptr + global_token.to(tl.int64)[:, None] * stride_qi_token
                    + group[:, None] * stride_qi_group + dim[None, :],
                    mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
        position = tl.where(row_mask, position, -1)  # rows past the sequence see no key
        own_block = position // BLOCK_SIZE
        first_position = len_k - len_q + tile * BLOCK_R // NUM_GROUPS
        block_end = tl.max(position) // BLOCK_SIZE + 1
        block_lo = split * blocks_per_split
        block_hi = tl.minimum(block_end, block_lo + blocks_per_split)
        unmasked_end = tl.maximum(tl.minimum(block_hi, first_position // BLOCK_SIZE), block_lo)
        vals, ids = _empty_lists(BLOCK_R, TOPK, TOPK_PAD)
        threshold = tl.full([BLOCK_R], float("-inf"), tl.float32)
        vals, ids, threshold = _scan_blocks(
            q, ki_ptr, stride_ki_token, k_start, dim, dim_mask, position, own_block, block_lo,
            unmasked_end, vals, ids, threshold, scale, BLOCK_R, BLOCK_SIZE, BLOCK_N, INIT_BLOCKS,
            LOCAL_BLOCKS, False, DOT_PRECISION, DOT_UPCAST)
        vals, ids, threshold = _scan_blocks(
            q, ki_ptr, stride_ki_token, k_start, dim, dim_mask, position, own_block, unmasked_end,
            block_hi, vals, ids, threshold, scale, BLOCK_R, BLOCK_SIZE, BLOCK_N, INIT_BLOCKS,
            LOCAL_BLOCKS, True, DOT_PRECISION, DOT_UPCAST)
        if SPLIT:
            flat = (split * total_rows + global_token.to(tl.int64) * NUM_GROUPS + group) * TOPK_PAD
            offsets = flat[:, None] + tl.arange(0, TOPK_PAD)[None, :]
            tl.store(partial_vals_ptr + offsets, vals, mask=row_mask[:, None])
            tl.store(partial_ids_ptr + offsets, ids, mask=row_mask[:, None])
        else:
            _store_selection(out_ptr, stride_out_group, stride_out_token, global_token, group,
                             row_mask, own_block, ids, TOPK_PAD)


# One program: BLOCK_R flattened (token, group) rows of one sequence; merges the partial top-k
# lists of all splits (candidates in ascending split order) and writes the final selection.
# Grid: (query tiles of the longest sequence, B).
@triton.jit
def _merge_kernel(partial_vals_ptr, partial_ids_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr, out_ptr,
                  stride_out_group, stride_out_token, num_splits, total_rows,
                  NUM_GROUPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  TOPK: tl.constexpr, TOPK_PAD: tl.constexpr):
    tile = tl.program_id(0)
    batch = tl.program_id(1)
    q_start, len_q, k_start, len_k, row_mask, token, group, position = _tile_rows(
        cu_seqlens_q_ptr, cu_seqlens_k_ptr, batch, tile, NUM_GROUPS, BLOCK_R)
    if tile * BLOCK_R < len_q * NUM_GROUPS:
        global_token = q_start + token
        row = global_token.to(tl.int64) * NUM_GROUPS + group
        vals, ids = _empty_lists(BLOCK_R, TOPK, TOPK_PAD)
        for split in range(num_splits):
            for slot in range(TOPK):
                offset = (split * total_rows + row) * TOPK_PAD + slot
                cand_val = tl.load(partial_vals_ptr + offset, mask=row_mask, other=float("-inf"))
                cand_id = tl.load(partial_ids_ptr + offset, mask=row_mask, other=-1)
                vals, ids = _topk_insert(vals, ids, cand_val, cand_id)
        _store_selection(out_ptr, stride_out_group, stride_out_token, global_token, group,
                         row_mask, position // BLOCK_SIZE, ids, TOPK_PAD)


def _num_splits(num_tiles: int, max_blocks: int, device: torch.device) -> int:
    """Split the key range when the query tiles alone cannot fill the GPU."""
    sms = device_sm_count(device)
    if num_tiles >= sms or max_blocks < 8:
        return 1
    return max(1, min(triton.cdiv(2 * sms, num_tiles), max_blocks // 4))


def select_blocks(qi: torch.Tensor, ki: torch.Tensor, cu_seqlens_q: torch.Tensor,
                  cu_seqlens_k: torch.Tensor, *, block_size: int, topk: int, init_blocks: int,
                  local_blocks: int, num_splits: int | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of :func:`msattn.reference.select_blocks` (same arguments and result).

    Args:
        qi: ``[total_q, G, Di]`` fp16/bf16/fp32; ki: ``[total_k, Di]``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]``.
        num_splits: key-range splits (default: chosen from the grid size).
        out: optional int32 ``[G, total_q, topk]`` buffer to write into.
    Returns:
        int32 ``[G, total_q, topk]``.
    """
    total_q, num_groups, index_dim = qi.shape
    dtype = torch.promote_types(qi.dtype, ki.dtype)
    qi = qi.to(dtype)
    ki = ki.to(dtype)
    if qi.stride(-1) != 1:
        qi = qi.contiguous()
    if ki.stride(-1) != 1:
        ki = ki.contiguous()
    if out is None:
        out = torch.empty(num_groups, total_q, topk, dtype=torch.int32, device=qi.device)
    batch = cu_seqlens_q.numel() - 1
    if total_q == 0:
        return out
    len_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item()
    len_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max().item()
    config = CUDA_CONFIG if qi.is_cuda else {"block_r": 32, "num_warps": 4, "num_stages": 1}
    block_r = config["block_r"]
    num_tiles = triton.cdiv(len_q * num_groups, block_r)
    max_blocks = triton.cdiv(len_k, block_size)
    if num_splits is None:
        num_splits = _num_splits(num_tiles * batch, max_blocks, qi.device)
    num_splits = max(1, min(num_splits, max_blocks))
    blocks_per_split = triton.cdiv(max_blocks, num_splits)
    topk_pad = max(4, triton.next_power_of_2(topk))  # Triton 3.6 fails to lower a 2-wide scan
    total_rows = total_q * num_groups
    if num_splits > 1:
        partial_vals = torch.empty(num_splits * total_rows * topk_pad, dtype=torch.float32,
                                   device=qi.device)
        partial_ids = torch.empty(num_splits * total_rows * topk_pad, dtype=torch.int32,
                                  device=qi.device)
    else:
        partial_vals = partial_ids = out  # unused
    common = dict(NUM_GROUPS=num_groups, BLOCK_R=block_r, BLOCK_SIZE=block_size, TOPK=topk,
                  TOPK_PAD=topk_pad)
    _indexer_kernel[(num_tiles, batch, num_splits)](
        qi, ki, cu_seqlens_q, cu_seqlens_k, out, partial_vals, partial_ids,
        qi.stride(0), qi.stride(1), ki.stride(0), out.stride(0), out.stride(1),
        index_dim ** -0.5, blocks_per_split, total_rows,
        INDEX_DIM=index_dim, BLOCK_D=triton.next_power_of_2(index_dim),
        BLOCK_N=min(block_size, 128), INIT_BLOCKS=init_blocks, LOCAL_BLOCKS=local_blocks,
        SPLIT=num_splits > 1, **dot_options(dtype),
        num_warps=config["num_warps"], num_stages=config["num_stages"], **common)
    if num_splits > 1:
        _merge_kernel[(num_tiles, batch)](
            partial_vals, partial_ids, cu_seqlens_q, cu_seqlens_k, out, out.stride(0),
            out.stride(1), num_splits, total_rows, num_warps=4, **common)
    return out

