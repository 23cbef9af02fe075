"""Fused MSA indexer: index scores, causal block max-pool and an exact running top-k in one pass.

The ``[T, S / block_size]`` score matrix is never written. Each program owns a tile of
``BLOCK_R`` flattened (query token, group) rows of one sequence, so the groups of a token share
every index-key load, and streams the index keys block by block:
``qi . ki^T`` on the tensor cores, causal mask, max over the block, then the block enters the
running top-k list of a row when it beats the row's worst entry (value, then lower id wins).

With few query tiles and a long key range (chunked prefill, decode) the key blocks are split
across programs. Each writes its partial top-k list as int64 ranking keys and counts itself in
with an atomic; the last program of a group of ``FAN_IN`` splits merges that group's lists, and
the last of those group merges writes the exact selection (a two-level tree in the same launch,
so no merge kernel).

Index keys come either contiguous (``ki [total_k, Di]`` with ``cu_seqlens_k``) or paged
(``index_cache [num_pages, page_size, Di]`` with ``block_table`` and ``seq_lens``, one page per
key block), in fp16/bf16 or in float8_e4m3fn with a float32 scale per key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from msattn.cache import quantize_index_keys
from msattn.ops.nvfp4 import nvfp4_halves
from msattn.ops.utils import (arrive_last, cdiv, device_sm_count, dot_options, fp8_conversions,
                              gdc_launch_dependents, gdc_wait, interpreted, mma, next_power_of_2,
                              programmatic_launch, rows_to_fp16)

# Split programs merge in a two-level tree: groups of fan_in splits, then the group lists; up to
# 2 * fan_in splits merge in one level. (H200, 1M-token decode: fan-in 8 and 16 within 2%.)
FAN_IN = 8
MAX_SPLITS = 512
# Elements (rows x candidates) of one merge step's tile: bounds the merging program's registers.
MERGE_TILE = 4096
# Query runs too short for the fused kernel's row tiles to fill the GPU (short prefills, chunks)
# make it split the keys and merge partial lists, a serial tail: up to this many bytes of float32
# block scores ((token, group) rows x key blocks x 4) they take the block-score + top-k kernels of
# decode instead. H100 (benchmarks/results/tuning/, M3 shape), fused against block-top-k, ms:
# chunks of 512 and 1K tokens on a 16K prefix 0.264 / 0.043 and 0.216 / 0.078, a 4K prefill
# 0.278 / 0.221 (scores of 1-2 MiB); an 8K prefill 0.262 / 0.376 (8 MiB), a 2K chunk on a 64K
# prefix 0.615 / 0.647 (16 MiB), 4 x 2K on 64K 1.28 / 2.23 (64 MiB).
BLOCK_TOPK_MAX_SCORE_BYTES = 4 << 20



@dataclass(frozen=True)
class IndexerConfig:
    """Launch configuration of the indexer.

    Attributes:
        block_r: flattened (token, group) rows per program; num_warps, num_stages: as in Triton.
        splits_per_sm: key-range splits per multiprocessor when the query tiles cannot fill the
            GPU (H200, 1M-token decode: 2 beats 1 and 4 by about 20%).
        fan_in: splits per first-level merge.
    """

    block_r: int = 256
    num_warps: int = 16
    num_stages: int = 2
    splits_per_sm: int = 2
    fan_in: int = FAN_IN


# Prefill on CUDA (256-row tiles), tuned on an H100 (benchmarks/results/tuning/).
CUDA_CONFIG = IndexerConfig()
# The fp8 index path: fp8 key tiles take half the shared memory, so three stages fit (H200,
# 256K tokens: 52.8 ms against 61.5 with two; benchmarks/results/tuning/).
FP8_CUDA_CONFIG = IndexerConfig(num_stages=3)

# Sentinel id for the slots that pad ``topk`` to a power of two: never evicted, never written.
_PAD_ID = tl.constexpr(1 << 30)


@triton.jit
def _tile_rows(cu_seqlens_q_ptr, key_lengths_ptr, batch, tile, NUM_GROUPS: tl.constexpr,
               BLOCK_R: tl.constexpr, PAGED: tl.constexpr):
    """Rows of one tile: flattened (token, group) rows ``tile * BLOCK_R ...`` of sequence ``batch``.

    ``key_lengths_ptr`` is ``cu_seqlens_k`` (contiguous keys) or ``seq_lens`` (``PAGED``).
    """
    q_start = tl.load(cu_seqlens_q_ptr + batch)
    len_q = tl.load(cu_seqlens_q_ptr + batch + 1) - q_start
    if PAGED:
        k_start = 0
        len_k = tl.load(key_lengths_ptr + batch)
    else:
        k_start = tl.load(key_lengths_ptr + batch)
        len_k = tl.load(key_lengths_ptr + batch + 1) - k_start
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
def _scan_blocks(q, ki_ptr, key_scale_ptr, page_row_ptr, stride_ki_token, stride_ki_page,
                 stride_scale_page, k_start, dim, dim_mask, position, own_block,
                 block_from, block_to, vals, ids, threshold, scale,
                 BLOCK_R: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 INIT_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr, MASKED: tl.constexpr,
                 PAGED: tl.constexpr, KEY_SCALE: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """Stream key blocks ``[block_from, block_to)`` into the running top-k lists.

    ``MASKED`` applies the causal mask (blocks that reach past the tile's first query). ``PAGED``
    reads block ``b`` from page ``page_row_ptr[b]``; ``KEY_SCALE`` multiplies each key's scores
    by its float32 scale (fp8 keys: ``[num_pages, page_size]``, or ``[total_k]`` when contiguous).
    """
    for block in range(block_from, block_to):
        if PAGED:
            page = tl.load(page_row_ptr + block).to(tl.int64)
            block_base = page * stride_ki_page
        else:
            block_base = (k_start + block * BLOCK_SIZE).to(tl.int64) * stride_ki_token
        block_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
        for sub in tl.static_range(BLOCK_SIZE // BLOCK_N):
            offs = sub * BLOCK_N + tl.arange(0, BLOCK_N)
            keys = block * BLOCK_SIZE + offs
            key_ptrs = ki_ptr + block_base + offs[:, None] * stride_ki_token + dim[None, :]
            if MASKED:
                key_mask = keys <= tl.max(position)
                k = tl.load(key_ptrs, mask=key_mask[:, None] & dim_mask[None, :], other=0.0)
            else:
                key_mask = keys >= 0
                k = tl.load(key_ptrs, mask=dim_mask[None, :], other=0.0)
            if KEY_SCALE:
                if PAGED:
                    scale_ptrs = key_scale_ptr + page * stride_scale_page + offs
                else:
                    scale_ptrs = key_scale_ptr + k_start + block * BLOCK_SIZE + offs
                key_scale = tl.load(scale_ptrs, mask=key_mask, other=0.0)
                scores = _fp8_dot(q, k, DOT_UPCAST) * key_scale[None, :]
            else:
                scores = mma(q, tl.trans(k.to(q.dtype)), DOT_PRECISION, DOT_UPCAST)
            if MASKED:
                scores = tl.where(keys[None, :] <= position[:, None], scores, float("-inf"))
            block_max = tl.maximum(block_max, tl.max(scores, axis=1))
        # max commutes with the (monotone) scaling, so scale the B maxima instead of B x N scores.
        block_max = block_max * scale
        block_max = tl.where(_forced(block, own_block, INIT_BLOCKS, LOCAL_BLOCKS), float("inf"), block_max)
        if tl.max((block_max > threshold).to(tl.int32), axis=0) > 0:
            vals, ids = _topk_insert(vals, ids, block_max, tl.full([BLOCK_R], block, tl.int32))
            threshold = tl.min(vals, axis=1)
    return vals, ids, threshold


@triton.jit
def _forced(block, own_block, INIT_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr):
    """Whether ``block`` is forced for each row (init blocks, or the local blocks ending at its own)."""
    return (block <= own_block) & ((block < INIT_BLOCKS) | (block > own_block - LOCAL_BLOCKS))


@triton.jit
def _unmasked_block_max(q, ki_ptr, key_scale_ptr, key_row, stride_ki_token, dim, dim_mask,
                        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, KEY_SCALE: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """Max score of each row over one key block (first key row ``key_row``) that every row sees
    entirely: unscaled, or with fp8 keys (``KEY_SCALE``) each key's scores times its scale."""
    block_max = tl.full([q.shape[0]], float("-inf"), tl.float32)
    for sub in tl.static_range(BLOCK_SIZE // BLOCK_N):
        offs = sub * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.load(ki_ptr + (key_row + offs)[:, None] * stride_ki_token + dim[None, :],
                    mask=dim_mask[None, :], other=0.0)
        if KEY_SCALE:
            scores = _fp8_dot(q, k, DOT_UPCAST) * tl.load(key_scale_ptr + key_row + offs)[None, :]
        else:
            scores = mma(q, tl.trans(k.to(q.dtype)), DOT_PRECISION, DOT_UPCAST)
        block_max = tl.maximum(block_max, tl.max(scores, axis=1))
    return block_max


@triton.jit
def _scan_block_pairs(q, ki_ptr, key_scale_ptr, stride_ki_token, k_start, dim, dim_mask,
                      own_block, block_from, block_to, vals, ids, threshold, scale,
                      BLOCK_R: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                      INIT_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr,
                      KEY_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      DOT_UPCAST: tl.constexpr):
    """Unmasked contiguous keys, two blocks per step (``block_to - block_from`` even), both always
    inserted: no tile-wide test against the lists, so no barrier between the steps (H100, 256K
    tokens: 513 -> 608 TFLOP/s over one block per step with the test)."""
    for block in range(block_from, block_to, 2):
        key_row = (k_start + block * BLOCK_SIZE).to(tl.int64)
        first_max = _unmasked_block_max(q, ki_ptr, key_scale_ptr, key_row, stride_ki_token, dim,
                                        dim_mask, BLOCK_SIZE, BLOCK_N, KEY_SCALE, DOT_PRECISION,
                                        DOT_UPCAST) * scale
        second_max = _unmasked_block_max(q, ki_ptr, key_scale_ptr, key_row + BLOCK_SIZE,
                                         stride_ki_token, dim, dim_mask, BLOCK_SIZE, BLOCK_N,
                                         KEY_SCALE, DOT_PRECISION, DOT_UPCAST) * scale
        first_max = tl.where(_forced(block, own_block, INIT_BLOCKS, LOCAL_BLOCKS), float("inf"), first_max)
        second_max = tl.where(_forced(block + 1, own_block, INIT_BLOCKS, LOCAL_BLOCKS), float("inf"),
                              second_max)
        vals, ids = _topk_insert(vals, ids, first_max, tl.full([BLOCK_R], block, tl.int32))
        vals, ids = _topk_insert(vals, ids, second_max, tl.full([BLOCK_R], block + 1, tl.int32))
    return vals, ids, tl.min(vals, axis=1)


# One program: BLOCK_R flattened (token, group) rows of one sequence x one split of its key blocks.
# Grid: (query tiles of the longest sequence, B, splits). qi [total_q, G, Di]; keys ki [total_k, Di]
# (+ key_scale [total_k] for fp8) or paged index_cache [num_pages, page_size, Di] (+ key_scale
# [num_pages, page_size] for fp8);
# writes indices [G, total_q, TOPK]: directly (one split), or split programs write partial lists
# (int64 keys [splits, total_q * G, TOPK_PAD]) and the last arrivers merge them (_merge_splits).
@triton.jit
def _indexer_kernel(qi_ptr, ki_ptr, key_scale_ptr, block_table_ptr, cu_seqlens_q_ptr,
                    key_lengths_ptr, out_ptr, partial_keys_ptr, level_keys_ptr, counters_ptr,
                    stride_qi_token, stride_qi_group, stride_ki_token, stride_ki_page,
                    stride_scale_page, stride_block_table, stride_out_group, stride_out_token,
                    scale, blocks_per_split, total_rows,
                    NUM_GROUPS: tl.constexpr, INDEX_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    TOPK: tl.constexpr, TOPK_PAD: tl.constexpr, INIT_BLOCKS: tl.constexpr,
                    LOCAL_BLOCKS: tl.constexpr, SPLIT: tl.constexpr, PAGED: tl.constexpr,
                    KEY_SCALE: tl.constexpr, PAIRS: tl.constexpr,
                    FAN_IN: tl.constexpr, NUM_SPLITS: tl.constexpr, MERGE_ROWS: tl.constexpr,
                    CANDIDATES_PAD: tl.constexpr, LEVEL_MERGE_ROWS: tl.constexpr,
                    LEVEL_CANDIDATES_PAD: tl.constexpr, PDL_TRIGGER: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest (latest) tiles first
    batch = tl.program_id(1)
    split = tl.program_id(2)
    q_start, len_q, k_start, len_k, row_mask, token, group, position = _tile_rows(
        cu_seqlens_q_ptr, key_lengths_ptr, batch, tile, NUM_GROUPS, BLOCK_R, PAGED)
    if tile * BLOCK_R < len_q * NUM_GROUPS:
        dim = tl.arange(0, BLOCK_D)
        dim_mask = dim < INDEX_DIM
        global_token = q_start + token
        q = tl.load(qi_ptr + global_token.to(tl.int64)[:, None] * stride_qi_token
                    + group[:, None] * stride_qi_group + dim[None, :],
                    mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
        row_scale = tl.full([BLOCK_R], scale, tl.float32)
        if KEY_SCALE:  # fp8 keys: fp8 queries (one scale per row), a native fp8 MMA
            q, query_scale = _quantize_rows_fp8(q, DOT_UPCAST)
            row_scale = row_scale * query_scale
        position = tl.where(row_mask, position, -1)  # rows past the sequence see no key
        own_block = position // BLOCK_SIZE
        first_position = len_k - len_q + tile * BLOCK_R // NUM_GROUPS
        block_end = tl.max(position) // BLOCK_SIZE + 1
        block_lo = split * blocks_per_split
        block_hi = tl.minimum(block_end, block_lo + blocks_per_split)
        unmasked_end = tl.maximum(tl.minimum(block_hi, first_position // BLOCK_SIZE), block_lo)
        if PAGED:
            page_row_ptr = block_table_ptr + batch.to(tl.int64) * stride_block_table
        else:
            page_row_ptr = block_table_ptr  # None: contiguous keys
        vals, ids = _empty_lists(BLOCK_R, TOPK, TOPK_PAD)
        threshold = tl.full([BLOCK_R], float("-inf"), tl.float32)
        single_from = block_lo
        if PAIRS:
            single_from = block_lo + (unmasked_end - block_lo) // 2 * 2
            vals, ids, threshold = _scan_block_pairs(
                q, ki_ptr, key_scale_ptr, stride_ki_token, k_start, dim, dim_mask, own_block,
                block_lo, single_from, vals, ids, threshold, row_scale, BLOCK_R, BLOCK_SIZE,
                BLOCK_N, INIT_BLOCKS, LOCAL_BLOCKS, KEY_SCALE, DOT_PRECISION, DOT_UPCAST)
        vals, ids, threshold = _scan_blocks(
            q, ki_ptr, key_scale_ptr, page_row_ptr, stride_ki_token, stride_ki_page,
            stride_scale_page, k_start, dim, dim_mask, position, own_block, single_from,
            unmasked_end, vals, ids, threshold, row_scale, BLOCK_R, BLOCK_SIZE, BLOCK_N, INIT_BLOCKS,
            LOCAL_BLOCKS, False, PAGED, KEY_SCALE, DOT_PRECISION, DOT_UPCAST)
        vals, ids, threshold = _scan_blocks(
            q, ki_ptr, key_scale_ptr, page_row_ptr, stride_ki_token, stride_ki_page,
            stride_scale_page, k_start, dim, dim_mask, position, own_block, unmasked_end,
            block_hi, vals, ids, threshold, row_scale, BLOCK_R, BLOCK_SIZE, BLOCK_N, INIT_BLOCKS,
            LOCAL_BLOCKS, True, PAGED, KEY_SCALE, DOT_PRECISION, DOT_UPCAST)
        if PDL_TRIGGER:  # the attention may launch now; it waits for this grid to finish
            gdc_launch_dependents()
        if SPLIT:
            _merge_splits(partial_keys_ptr, level_keys_ptr, counters_ptr, out_ptr, vals, ids,
                          stride_out_group, stride_out_token, q_start, len_q, len_k, tile, batch,
                          split, total_rows, NUM_GROUPS, BLOCK_R, BLOCK_SIZE, TOPK, TOPK_PAD,
                          FAN_IN, NUM_SPLITS, MERGE_ROWS, CANDIDATES_PAD, LEVEL_MERGE_ROWS,
                          LEVEL_CANDIDATES_PAD)
        else:
            _store_selection(out_ptr, stride_out_group, stride_out_token, global_token, group,
                             row_mask, own_block, ids, TOPK_PAD)


@triton.jit
def _empty_key():
    """The ranking key of an empty slot: below the key of every real candidate."""
    return tl.full([1, 1], -2139095041, tl.int32).to(tl.int64) << 32  # ordered(-inf), low word 0


@triton.jit
def _list_keys(vals, ids):
    """int64 keys that order candidates as the selection does: greater value first, then lower
    id. High word: the float32 value's bits mapped to a monotone int32; low word: ``2^31-1 - id``
    (positive for every real id). Empty and pad slots (negative or pad ids) get the empty key."""
    bits = vals.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    real = (ids >= 0) & (ids < _PAD_ID)
    keys = (ordered.to(tl.int64) << 32) | (2147483647 - tl.where(real, ids, 0)).to(tl.int64)
    return tl.where(real, keys, _empty_key())


@triton.jit
def _take_best(keys, TOPK: tl.constexpr, TOPK_PAD: tl.constexpr):
    """The ``TOPK`` largest keys of each row of ``keys [R, C]`` (real keys are distinct) as
    ``[R, TOPK_PAD]``, empty keys after a row runs out and in the pad slots."""
    empty = _empty_key()
    slots = tl.arange(0, TOPK_PAD)[None, :]
    best_keys = tl.zeros([keys.shape[0], TOPK_PAD], tl.int64) + empty
    for rank in range(TOPK):
        best = tl.max(keys, axis=1)
        keys = tl.where(keys == best[:, None], empty, keys)
        best_keys = tl.where(slots == rank, best[:, None], best_keys)
    return best_keys


@triton.jit
def _store_ranked(out_ptr, stride_out_group, stride_out_token, global_token, group, row_mask,
                  own_block, best_keys, TOPK: tl.constexpr, TOPK_PAD: tl.constexpr):
    """Write rows of ranked keys (``_take_best``: real keys first, then empty ones) as the
    selection: their ids with the own block moved to the last valid slot, then -1 padding.
    (A permutation of the slots, no prefix scan.)"""
    low = (best_keys & 0xFFFFFFFF).to(tl.int32)
    valid = low > 0
    ids = 2147483647 - low
    slots = tl.arange(0, TOPK_PAD)[None, :]
    num_valid = tl.sum(valid.to(tl.int32), axis=1)[:, None]
    is_own = valid & (ids == own_block[:, None])
    own_slot = tl.max(tl.where(is_own, slots, -1), axis=1)[:, None]
    last = slots == num_valid - 1
    dest = tl.where(is_own, num_valid - 1, tl.where(last & (own_slot >= 0), own_slot, slots))
    row_ptr = out_ptr + group.to(tl.int64) * stride_out_group + global_token.to(tl.int64) * stride_out_token
    tl.store(row_ptr[:, None] + dest, tl.where(valid, ids, -1), mask=row_mask[:, None] & (slots < TOPK))


@triton.jit
def _merge_lists(src_ptr, first_list, num_lists, dst_ptr, dst_list, out_ptr, stride_out_group,
                 stride_out_token, q_start, len_q, len_k, tile, total_rows, FINAL: tl.constexpr,
                 NUM_GROUPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 TOPK: tl.constexpr, TOPK_PAD: tl.constexpr, MERGE_ROWS: tl.constexpr,
                 CANDIDATES_PAD: tl.constexpr):
    """Merge lists ``[first_list, first_list + num_lists)`` of ``src [lists, total_rows, TOPK_PAD]``
    for the rows of one tile, ``MERGE_ROWS`` rows at a time: into list ``dst_list`` of ``dst``,
    or (``FINAL``) into the selection ``out``."""
    candidate = tl.arange(0, CANDIDATES_PAD)
    source = candidate // TOPK_PAD
    slot = candidate % TOPK_PAD
    candidate_mask = (source < num_lists) & (slot < TOPK)
    for row_from in range(0, tl.minimum(BLOCK_R, len_q * NUM_GROUPS - tile * BLOCK_R), MERGE_ROWS):
        local_rows = tile * BLOCK_R + row_from + tl.arange(0, MERGE_ROWS)
        row_mask = local_rows < len_q * NUM_GROUPS
        flat_rows = (q_start * NUM_GROUPS + local_rows).to(tl.int64)
        offsets = (((first_list + source).to(tl.int64) * total_rows)[None, :] + flat_rows[:, None]) \
            * TOPK_PAD + slot[None, :]
        # .cg: read at L2, where the other programs' stores landed.
        load_mask = row_mask[:, None] & candidate_mask[None, :]
        keys = tl.load(src_ptr + offsets, mask=load_mask, other=0, cache_modifier=".cg")
        best = _take_best(tl.where(load_mask, keys, _empty_key()), TOPK, TOPK_PAD)
        slots = tl.arange(0, TOPK_PAD)[None, :]
        if FINAL:
            token = local_rows // NUM_GROUPS
            own_block = (len_k - len_q + token) // BLOCK_SIZE
            _store_ranked(out_ptr, stride_out_group, stride_out_token, q_start + token,
                          local_rows % NUM_GROUPS, row_mask, own_block, best, TOPK, TOPK_PAD)
        else:
            dst = (dst_list.to(tl.int64) * total_rows + flat_rows)[:, None] * TOPK_PAD + slots
            tl.store(dst_ptr + dst, best, mask=row_mask[:, None])


@triton.jit
def _merge_splits(partial_keys_ptr, level_keys_ptr, counters_ptr, out_ptr, vals, ids,
                  stride_out_group, stride_out_token, q_start, len_q, len_k, tile, batch, split,
                  total_rows, NUM_GROUPS: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr, TOPK: tl.constexpr, TOPK_PAD: tl.constexpr,
                  FAN_IN: tl.constexpr, NUM_SPLITS: tl.constexpr, MERGE_ROWS: tl.constexpr,
                  CANDIDATES_PAD: tl.constexpr, LEVEL_MERGE_ROWS: tl.constexpr,
                  LEVEL_CANDIDATES_PAD: tl.constexpr):
    """Store this split's lists, then merge as the last arriver of its group of ``FAN_IN`` splits
    (and, with several groups, as the last group merge, from the group lists in ``level_keys``).

    Counters: ``NUM_SPLIT_GROUPS + 1`` int32 per (tile, sequence), zero between launches."""
    NUM_SPLIT_GROUPS: tl.constexpr = (NUM_SPLITS + FAN_IN - 1) // FAN_IN
    local_rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
    flat_rows = (q_start * NUM_GROUPS + local_rows).to(tl.int64)
    offsets = (split * total_rows + flat_rows)[:, None] * TOPK_PAD + tl.arange(0, TOPK_PAD)[None, :]
    tl.store(partial_keys_ptr + offsets, _list_keys(vals, ids),
             mask=(local_rows < len_q * NUM_GROUPS)[:, None])
    counter = counters_ptr + (tile * tl.num_programs(1) + batch) * (NUM_SPLIT_GROUPS + 1)
    split_group = split // FAN_IN
    members = tl.minimum(FAN_IN, NUM_SPLITS - split_group * FAN_IN)
    if arrive_last(counter + split_group, members):
        if NUM_SPLIT_GROUPS == 1:
            _merge_lists(partial_keys_ptr, 0, NUM_SPLITS, level_keys_ptr, 0, out_ptr,
                         stride_out_group, stride_out_token, q_start, len_q, len_k, tile,
                         total_rows, True, NUM_GROUPS, BLOCK_R, BLOCK_SIZE, TOPK, TOPK_PAD,
                         MERGE_ROWS, CANDIDATES_PAD)
        else:
            _merge_lists(partial_keys_ptr, split_group * FAN_IN, members, level_keys_ptr,
                         split_group, out_ptr, stride_out_group, stride_out_token, q_start, len_q,
                         len_k, tile, total_rows, False, NUM_GROUPS, BLOCK_R, BLOCK_SIZE, TOPK,
                         TOPK_PAD, MERGE_ROWS, CANDIDATES_PAD)
            if arrive_last(counter + NUM_SPLIT_GROUPS, NUM_SPLIT_GROUPS):
                _merge_lists(level_keys_ptr, 0, NUM_SPLIT_GROUPS, level_keys_ptr, 0, out_ptr,
                             stride_out_group, stride_out_token, q_start, len_q, len_k, tile,
                             total_rows, True, NUM_GROUPS, BLOCK_R, BLOCK_SIZE, TOPK, TOPK_PAD,
                             LEVEL_MERGE_ROWS, LEVEL_CANDIDATES_PAD)


# ----------------------------------------------------------------------------------------------
# Decode (query runs of at most PAGE_TOPK_MAX_QUERY_LEN tokens): block scores, then an exact top-k.
#
# Decode has a few (token, group) rows against a long key range, so the fused kernel above must
# split the keys and merge partial lists, a serial tail on every step. Instead, one kernel
# streams the index keys across the whole GPU and writes only each row's float32 block maxima
# (32 KiB per row at 1M tokens), and a second one selects the top-k of each row, one program per
# (row, segment of blocks), the last segment of a row merging the segments' lists (one level).
# Both are chained with programmatic dependent launch, and so is the attention after them.
# ----------------------------------------------------------------------------------------------

PAGE_TOPK_MAX_QUERY_LEN = 16


@dataclass(frozen=True)
class PageTopkConfig:
    """Launch configuration of the decode selection (block scores, then top-k).

    The defaults won on an H200 (benchmarks/results/tuning/tune-decode_nvidia-h200_20261202-143927.json,
    graphs of 8 steps): ``tl.topk`` over max rounds by 2-12 us a step (64K: 21.4 -> 19.4 us, 1M
    bf16: 86.7 -> 80.6 us), 8 score programs per SM only with several requests (32 x 8 x 64K:
    443 -> 421 us; 1 x 1M: 80.6 -> 84.6 us).

    Attributes:
        programs_per_sm: score programs per multiprocessor the key blocks are spread over (one
            request); batched_programs_per_sm: the same with several requests.
        block_n: keys per score tile; score_warps, score_stages: as in Triton.
        segment: most blocks of a row one top-k program ranks (a power of two); rows with more
            blocks are ranked in segments whose lists the row's last segment merges.
        topk_warps: warps of a top-k program.
    """

    programs_per_sm: int = 4
    batched_programs_per_sm: int = 8
    block_n: int = 128
    score_warps: int = 4
    score_stages: int = 2
    segment: int = 1024
    topk_warps: int = 4


# 4-bit keys: their score tiles are short on bytes and long on latency (decode, shared-memory
# round trip), so one request's blocks are spread over twice the programs. H100, 1M tokens, one
# step (benchmarks/results/tuning/tune-decode_nvidia-h100-80gb-hbm3_20261207-2156.log): 84.3 us
# against 103.3 with 4 programs per SM.
PAGE_TOPK_4BIT = PageTopkConfig(programs_per_sm=8)


@triton.jit
def _fp8_dot(q, k, EMULATED: tl.constexpr):
    """``q [R, Di] . k [N, Di]^T`` in float32 for fp8 queries (:func:`_quantize_rows_fp8`; float32
    values on e4m3's grid when ``EMULATED``) and fp8 keys: a native fp8 MMA where Di >= 32, else
    an fp16 one on the same (exactly converted) values."""
    if EMULATED:
        return tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    elif q.shape[1] >= 32:
        return tl.dot(q, tl.trans(k))
    else:
        return tl.dot(q.to(tl.float16), tl.trans(k.to(tl.float16)))


@triton.jit
def _quantize_rows_fp8(q, EMULATE: tl.constexpr):
    """Rows of ``q [R, Di]`` as float8_e4m3fn values ``q / scale`` (rounded to nearest, even)
    and the float32 ``scale [R]`` (the row's largest magnitude maps to 448; 1 for an all-zero
    row). ``EMULATE`` (the interpreter, whose float32 -> e4m3 conversion drops the carry into
    the exponent, 124.9 -> 64) rounds in float32 instead and returns float32 values on e4m3's
    grid: 3 mantissa bits for normals, multiples of 2^-9 below 2^-6."""
    q32 = q.to(tl.float32)
    row_abs_max = tl.max(tl.abs(q32), axis=1)
    row_scale = tl.where(row_abs_max > 0, row_abs_max / 448.0, 1.0)
    x = q32 / row_scale[:, None]
    if EMULATE:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000  # 23 -> 3 mantissa bits
        subnormal = (x + 24576.0) - 24576.0  # 1.5 * 2^14: float32's spacing there is 2^-9
        return tl.where(tl.abs(x) < 0.015625, subnormal, bits.to(tl.float32, bitcast=True)), row_scale
    return x.to(tl.float8e4nv), row_scale


# One program: the rows of one tile of request ``batch`` (its flattened (token, group) rows)
# x ``blocks_per_program`` consecutive key blocks. Grid: (block chunks, B, row tiles).
# qi [total_q, G, Di]; keys ki [total_k, Di] or paged [num_pages, page_size, Di] (KEY_FORMAT 0:
# fp16/bf16/fp32; 1: fp8 with key_scale [num_pages, page_size]; 2: 4-bit codes [num_pages,
# page_size, Di / 2] uint8 with block_scale [num_pages, page_size, Di / 16] e4m3 and key_scale,
# msattn.ops.nvfp4); writes block_scores [total_q * G, max_blocks] float32:
# the scaled max score of each causal block, +inf for forced blocks, -inf past the row's own
# block (blocks past the request's last are not written).
@triton.jit
def _block_scores_kernel(qi_ptr, ki_ptr, key_scale_ptr, block_scale_ptr, block_table_ptr,
                         cu_seqlens_q_ptr, key_lengths_ptr, scores_ptr, stride_qi_token,
                         stride_qi_group, stride_ki_token, stride_ki_page, stride_scale_page,
                         stride_block_scale_token, stride_block_scale_page, stride_block_table,
                         stride_scores_row, scale, blocks_per_program,
                         NUM_GROUPS: tl.constexpr, INDEX_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         INIT_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr,
                         PAGED: tl.constexpr, KEY_FORMAT: tl.constexpr, PTX_DECODE: tl.constexpr,
                         PDL_TRIGGER: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         DOT_UPCAST: tl.constexpr):
    chunk = tl.program_id(0)
    batch = tl.program_id(1)
    tile = tl.program_id(2)
    q_start, len_q, k_start, len_k, row_mask, token, group, position = _tile_rows(
        cu_seqlens_q_ptr, key_lengths_ptr, batch, tile, NUM_GROUPS, BLOCK_R, PAGED)
    block_lo = chunk * blocks_per_program
    block_hi = tl.minimum(block_lo + blocks_per_program, tl.cdiv(len_k, BLOCK_SIZE))
    if PDL_TRIGGER:  # the top-k kernel may launch now; it waits for this grid to finish
        gdc_launch_dependents()
    if (tile * BLOCK_R < len_q * NUM_GROUPS) & (block_lo < block_hi):
        dim = tl.arange(0, BLOCK_D)
        dim_mask = dim < INDEX_DIM
        q_rows = qi_ptr + (q_start + token).to(tl.int64)[:, None] * stride_qi_token \
            + group[:, None] * stride_qi_group
        row_scale = tl.full([BLOCK_R], scale, tl.float32)
        if KEY_FORMAT == 2:  # 4-bit keys decode to fp16 even and odd elements (nvfp4_halves)
            half = tl.arange(0, BLOCK_D // 2)
            q_even = tl.load(q_rows + 2 * half[None, :], mask=row_mask[:, None], other=0.0)
            q_odd = tl.load(q_rows + 2 * half[None, :] + 1, mask=row_mask[:, None], other=0.0)
            q_even, factor = rows_to_fp16(q_even, tl.max(tl.abs(q_odd.to(tl.float32)), axis=1))
            q_odd = (q_odd.to(tl.float32) * factor[:, None]).to(tl.float16)
            row_scale = row_scale / factor
        else:
            q = tl.load(q_rows + dim[None, :], mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
            if KEY_FORMAT == 1:  # fp8 keys: fp8 queries too, so that the dot is a native fp8 MMA
                q, query_scale = _quantize_rows_fp8(q, DOT_UPCAST)
                row_scale = row_scale * query_scale
        position = tl.where(row_mask, position, -1)  # rows past the sequence see no key
        own_block = position // BLOCK_SIZE
        rows = (q_start * NUM_GROUPS + tile * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        row_ptr = scores_ptr + rows * stride_scores_row
        # Blocks after the tile's last row's own block are seen by none of its rows (the top-k
        # kernel reads a row's blocks up to its own only).
        for block in range(block_lo, tl.minimum(block_hi, tl.max(own_block) + 1)):
            if PAGED:
                page = tl.load(block_table_ptr + batch.to(tl.int64) * stride_block_table + block).to(tl.int64)
                block_base = page * stride_ki_page
            else:
                block_base = (k_start + block * BLOCK_SIZE).to(tl.int64) * stride_ki_token
            block_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
            for sub in tl.static_range(BLOCK_SIZE // BLOCK_N):
                offs = sub * BLOCK_N + tl.arange(0, BLOCK_N)
                keys = block * BLOCK_SIZE + offs
                key_mask = keys < len_k
                if KEY_FORMAT == 2:
                    k_even, k_odd = nvfp4_halves(ki_ptr + block_base, stride_ki_token,
                                                 block_scale_ptr + page * stride_block_scale_page,
                                                 stride_block_scale_token, offs, key_mask, BLOCK_D,
                                                 PTX_DECODE)
                    scores = mma(q_even, tl.trans(k_even), DOT_PRECISION, DOT_UPCAST)
                    scores += mma(q_odd, tl.trans(k_odd), DOT_PRECISION, DOT_UPCAST)
                    key_scale = tl.load(key_scale_ptr + page * stride_scale_page + offs,
                                        mask=key_mask, other=0.0)
                    scores = scores * key_scale[None, :]
                elif KEY_FORMAT == 1:
                    k = tl.load(ki_ptr + block_base + offs[:, None] * stride_ki_token + dim[None, :],
                                mask=key_mask[:, None] & dim_mask[None, :], other=0.0)
                    scores = _fp8_dot(q, k, DOT_UPCAST)
                    key_scale = tl.load(key_scale_ptr + page * stride_scale_page + offs,
                                        mask=key_mask, other=0.0)
                    scores = scores * key_scale[None, :]
                else:
                    k = tl.load(ki_ptr + block_base + offs[:, None] * stride_ki_token + dim[None, :],
                                mask=key_mask[:, None] & dim_mask[None, :], other=0.0)
                    scores = mma(q, tl.trans(k.to(q.dtype)), DOT_PRECISION, DOT_UPCAST)
                scores = tl.where(keys[None, :] <= position[:, None], scores, float("-inf"))
                block_max = tl.maximum(block_max, tl.max(scores, axis=1))
            # max commutes with the positive row scale: scale the maxima, not the scores.
            block_max = block_max * row_scale
            block_max = tl.where(_forced(block, own_block, INIT_BLOCKS, LOCAL_BLOCKS),
                                 float("inf"), block_max)
            tl.store(row_ptr + block, block_max, mask=row_mask)


@triton.jit
def _best_keys(keys, TOPK: tl.constexpr, TOPK_PAD: tl.constexpr, BITONIC: tl.constexpr):
    """:func:`_take_best` of ``keys [R, C]``, or with ``BITONIC`` the same from ``tl.topk``
    (``C >= TOPK_PAD``)."""
    if BITONIC:
        best = tl.topk(keys, TOPK_PAD)
        return tl.where(tl.arange(0, TOPK_PAD)[None, :] < TOPK, best, _empty_key())
    return _take_best(keys, TOPK, TOPK_PAD)


# One program: one (token, group) row x one segment of SEGMENT key blocks; program_id(0) =
# b * max_len_q + t (the tokens of a request adjacent). Grid: (B * max_len_q, G, segments).
# Reads block_scores [total_q * G, max_blocks]; one segment: writes the row's selection into
# indices [G, total_q, TOPK]; several: writes its list (int64 keys, candidates
# [total_q * G, segments, TOPK_PAD]) and the last segment of the row (counters [total_q * G])
# merges them into the selection.
@triton.jit
def _block_topk_kernel(scores_ptr, cu_seqlens_q_ptr, key_lengths_ptr, out_ptr, candidates_ptr,
                       counters_ptr, stride_scores_row, stride_out_group, stride_out_token,
                       max_len_q, NUM_GROUPS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                       SEGMENT: tl.constexpr, NUM_SEGMENTS: tl.constexpr,
                       CANDIDATES_PAD: tl.constexpr, TOPK: tl.constexpr,
                       TOPK_PAD: tl.constexpr, PAGED: tl.constexpr, BITONIC: tl.constexpr,
                       PDL: tl.constexpr):
    batch = tl.program_id(0) // max_len_q
    query = tl.program_id(0) % max_len_q
    group = tl.program_id(1)
    segment = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + batch)
    len_q = tl.load(cu_seqlens_q_ptr + batch + 1) - q_start
    if PAGED:
        len_k = tl.load(key_lengths_ptr + batch)
    else:
        len_k = tl.load(key_lengths_ptr + batch + 1) - tl.load(key_lengths_ptr + batch)
    if query < len_q:
        token = q_start + query
        own_block = (len_k - len_q + query) // BLOCK_SIZE
        row = token.to(tl.int64) * NUM_GROUPS + group
        blocks = segment * SEGMENT + tl.arange(0, SEGMENT)
        causal = blocks <= own_block
        if PDL:  # launched while the score kernel drains: wait for its scores
            gdc_wait()
            gdc_launch_dependents()
        scores = tl.load(scores_ptr + row * stride_scores_row + blocks, mask=causal,
                         other=float("-inf"))
        ids = tl.where(causal & (scores > float("-inf")), blocks, -1)
        best = _best_keys(_list_keys(scores[None, :], ids[None, :]), TOPK, TOPK_PAD, BITONIC)
        token_row = tl.full([1], token, tl.int32)
        group_row = tl.full([1], group, tl.int32)
        own_row = tl.full([1], own_block, tl.int32)
        row_mask = tl.full([1], 1, tl.int1)
        if NUM_SEGMENTS == 1:
            _store_ranked(out_ptr, stride_out_group, stride_out_token, token_row, group_row,
                          row_mask, own_row, best, TOPK, TOPK_PAD)
        else:
            slots = tl.arange(0, TOPK_PAD)[None, :]
            tl.store(candidates_ptr + (row * NUM_SEGMENTS + segment) * TOPK_PAD + slots, best)
            if arrive_last(counters_ptr + row, NUM_SEGMENTS):
                candidates = tl.arange(0, CANDIDATES_PAD)[None, :]
                keys = tl.load(candidates_ptr + row * NUM_SEGMENTS * TOPK_PAD + candidates,
                               mask=candidates < NUM_SEGMENTS * TOPK_PAD, other=_empty_key(),
                               cache_modifier=".cg")
                _store_ranked(out_ptr, stride_out_group, stride_out_token, token_row, group_row,
                              row_mask, own_row, _best_keys(keys, TOPK, TOPK_PAD, BITONIC), TOPK,
                              TOPK_PAD)


def _num_splits(num_tiles: int, max_blocks: int, splits_per_sm: int, device: torch.device) -> int:
    """Split the key range when the query tiles alone cannot fill the GPU."""
    sms = device_sm_count(device)
    if num_tiles >= sms or max_blocks < 8:
        return 1
    return max(1, min(cdiv(splits_per_sm * sms, num_tiles), max_blocks // 4, MAX_SPLITS))


def launch_config(rows_per_sequence: int, is_cuda: bool) -> IndexerConfig:
    """The tuned configuration: 256-row tiles for prefill, small tiles for decode rows."""
    if not is_cuda:
        return IndexerConfig(block_r=32 if rows_per_sequence > 16 else 16, num_warps=4, num_stages=1)
    if rows_per_sequence > 128:
        return CUDA_CONFIG
    return IndexerConfig(block_r=max(16, next_power_of_2(rows_per_sequence)), num_warps=4,
                         num_stages=4)


def _longest_sequences(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> list[int]:
    """``[max_seqlen_q, max_seqlen_k]`` read from the prefix sums (one host sync)."""
    return torch.stack((cu_seqlens_q.diff(), cu_seqlens_k.diff())).amax(1).tolist()


def _fp8_launch_config(rows_per_sequence: int, is_cuda: bool) -> IndexerConfig:
    """:func:`launch_config` for the fp8 index path (:data:`FP8_CUDA_CONFIG` for prefill tiles)."""
    config = launch_config(rows_per_sequence, is_cuda)
    return FP8_CUDA_CONFIG if config == CUDA_CONFIG else config


def select_blocks(qi: torch.Tensor, ki: torch.Tensor, cu_seqlens_q: torch.Tensor,
                  cu_seqlens_k: torch.Tensor, *, block_size: int, topk: int, init_blocks: int,
                  local_blocks: int, max_seqlen_q: int | None = None,
                  max_seqlen_k: int | None = None, num_splits: int | None = None,
                  out: torch.Tensor | None = None, config: IndexerConfig | None = None) -> torch.Tensor:
    """Triton version of :func:`msattn.reference.select_blocks` (same arguments and result).

    Args:
        qi: ``[total_q, G, Di]`` fp16/bf16/fp32; ki: ``[total_k, Di]``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]``.
        max_seqlen_q, max_seqlen_k: the longest query and key sequences (when None, read from
            the ``cu_seqlens``: one host sync).
        num_splits: key-range splits (default: chosen from the grid size).
        out: optional int32 ``[G, total_q, topk]`` buffer to write into.
        config: the launch configuration (default: :func:`launch_config`).
    Returns:
        int32 ``[G, total_q, topk]``.
    """
    dtype = torch.promote_types(qi.dtype, ki.dtype)
    qi, ki = qi.to(dtype), ki.to(dtype)
    if ki.stride(-1) != 1:
        ki = ki.contiguous()
    if qi.shape[0] == 0:
        return _output(qi, topk, out)
    if max_seqlen_q is None or max_seqlen_k is None:
        max_seqlen_q, max_seqlen_k = _longest_sequences(cu_seqlens_q, cu_seqlens_k)
    plan = plan_selection(qi.shape[0], cu_seqlens_q.numel() - 1, qi.shape[1], max_seqlen_q,
                          cdiv(max_seqlen_k, block_size), topk=topk, device=qi.device,
                          num_splits=num_splits, config=config)
    return run_selection(plan, qi, ki, cu_seqlens_q, cu_seqlens_k, block_size=block_size,
                         init_blocks=init_blocks, local_blocks=local_blocks, out=out)


def select_blocks_fp8(qi: torch.Tensor, ki: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, *, block_size: int, topk: int, init_blocks: int,
                      local_blocks: int, max_seqlen_q: int | None = None,
                      max_seqlen_k: int | None = None, config: IndexerConfig | None = None) -> torch.Tensor:
    """:func:`select_blocks` on the fp8 index path: keys quantised per token
    (:func:`msattn.cache.quantize_index_keys`), queries per (token, group) row in the kernel, the
    scores a native fp8 x fp8 MMA times the two scales. Selects as
    :func:`msattn.reference.select_blocks` on :func:`msattn.reference.fp8_index_queries` and the
    dequantised keys, float near-ties aside. Arguments and result as :func:`select_blocks`
    (without ``num_splits`` and ``out``). On CUDA it needs fp8 MMAs (compute capability 8.9+)."""
    if qi.is_cuda and torch.cuda.get_device_capability(qi.device) < (8, 9):
        raise ValueError("index_dtype=torch.float8_e4m3fn needs a GPU with fp8 MMAs (compute "
                         f"capability 8.9 or newer), got {torch.cuda.get_device_name(qi.device)}")
    if qi.shape[0] == 0:
        return _output(qi, topk, None)
    if max_seqlen_q is None or max_seqlen_k is None:
        max_seqlen_q, max_seqlen_k = _longest_sequences(cu_seqlens_q, cu_seqlens_k)
    keys, key_scale = quantize_index_keys(ki)
    # the fused kernel (an IndexerConfig) whatever the query runs: it reads contiguous fp8 keys
    plan = plan_selection(qi.shape[0], cu_seqlens_q.numel() - 1, qi.shape[1], max_seqlen_q,
                          cdiv(max_seqlen_k, block_size), topk=topk, device=qi.device,
                          config=config or _fp8_launch_config(max(1, max_seqlen_q * qi.shape[1]), qi.is_cuda))
    return run_selection(plan, qi, keys, cu_seqlens_q, cu_seqlens_k, block_size=block_size,
                         init_blocks=init_blocks, local_blocks=local_blocks, index_scale=key_scale)


def select_blocks_paged(qi: torch.Tensor, index_cache: torch.Tensor, block_table: torch.Tensor,
                        cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, *, topk: int,
                        init_blocks: int, local_blocks: int, index_scale: torch.Tensor | None = None,
                        index_block_scale: torch.Tensor | None = None,
                        max_len_q: int | None = None, num_splits: int | None = None,
                        out: torch.Tensor | None = None, config: IndexerConfig | None = None) -> torch.Tensor:
    """Selection against a paged index-key cache (one page per key block).

    Args:
        qi: ``[total_q, G, Di]`` fp16/bf16.
        index_cache: ``[num_pages, page_size, Di]`` fp16/bf16, or float8_e4m3fn with
            ``index_scale [num_pages, page_size]`` float32 (key = value x scale), or 4-bit
            (:mod:`msattn.ops.nvfp4`, decode only): uint8 ``[num_pages, page_size, Di / 2]`` with
            ``index_block_scale [num_pages, page_size, Di / 16]`` float8_e4m3fn and ``index_scale``.
        block_table: int32 ``[B, max_pages]``; cu_seqlens_q int32 ``[B + 1]``; seq_lens int32 ``[B]``.
        max_len_q: the longest query run (default: read from ``cu_seqlens_q``, a host sync).
        config: the launch configuration (default: :func:`launch_config`).
    Returns:
        int32 ``[G, total_q, topk]``, block ids relative to each request.
    """
    if qi.shape[0] == 0:
        return _output(qi, topk, out)
    if max_len_q is None:
        max_len_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    plan = plan_selection(qi.shape[0], block_table.shape[0], qi.shape[1], max_len_q,
                          block_table.shape[1], topk=topk, device=qi.device, num_splits=num_splits,
                          config=config, four_bit_keys=index_cache.dtype == torch.uint8)
    return run_selection(plan, qi, index_cache, cu_seqlens_q, seq_lens, block_size=index_cache.shape[1],
                         init_blocks=init_blocks, local_blocks=local_blocks, block_table=block_table,
                         index_scale=index_scale, index_block_scale=index_block_scale, out=out)


def _output(qi: torch.Tensor, topk: int, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        out = torch.empty(qi.shape[1], qi.shape[0], topk, dtype=torch.int32, device=qi.device)
    return out


@dataclass(frozen=True)
class SelectionPlan:
    """Grid and workspace of one selection launch (fixed, so that it can be graph-captured)."""

    total_q: int
    batch: int
    num_groups: int
    topk: int
    topk_pad: int
    num_tiles: int
    num_splits: int
    blocks_per_split: int
    config: IndexerConfig
    fan_in: int  # splits per first-level merge group (all of them for a one-level merge)
    merge_shape: tuple[int, int]  # (rows, padded candidates) of a first-level merge step
    level_merge_shape: tuple[int, int]  # the same for the merge of the group lists
    partial_keys: torch.Tensor | None  # int64 [splits, total_q * G, topk_pad]
    level_keys: torch.Tensor | None  # int64 [split groups, total_q * G, topk_pad] (two levels)
    counters: torch.Tensor | None  # int32 [tiles, B, split groups + 1], zero between launches


def _merge_shape(num_lists: int, topk_pad: int, block_r: int, rows_per_sequence: int):
    candidates_pad = next_power_of_2(num_lists * topk_pad)
    rows = min(block_r, next_power_of_2(rows_per_sequence), max(1, MERGE_TILE // candidates_pad))
    return rows, candidates_pad


@dataclass(frozen=True)
class BlockTopkPlan:
    """Grids and workspace of the decode selection (block scores, then top-k), fixed for graph
    capture."""

    total_q: int
    batch: int
    num_groups: int
    topk: int
    topk_pad: int
    max_len_q: int
    config: PageTopkConfig
    block_r: int  # (token, group) rows per score program
    num_tiles: int  # row tiles of a request
    blocks_per_program: int
    num_chunks: int  # score programs per (request, row tile)
    segment: int  # blocks per top-k program
    num_segments: int
    scores: torch.Tensor  # float32 [total_q * G, max_blocks]
    candidates: torch.Tensor | None  # int64 [total_q * G, segments, topk_pad] (several segments)
    counters: torch.Tensor | None  # int32 [total_q * G], zero between launches


def _plan_block_topk(total_q: int, batch: int, num_groups: int, max_len_q: int, max_blocks: int, *,
                     topk: int, device: torch.device, config: PageTopkConfig) -> BlockTopkPlan:
    rows_per_sequence = max(1, max_len_q * num_groups)
    block_r = min(64, max(16, next_power_of_2(rows_per_sequence)))
    num_tiles = cdiv(rows_per_sequence, block_r)
    max_blocks = max(1, max_blocks)
    programs = (config.programs_per_sm if batch == 1 else config.batched_programs_per_sm) \
        * device_sm_count(device)
    num_chunks = max(1, min(max_blocks, cdiv(programs, batch * num_tiles)))
    blocks_per_program = cdiv(max_blocks, num_chunks)
    num_chunks = cdiv(max_blocks, blocks_per_program)
    segment = min(config.segment, next_power_of_2(max_blocks))
    num_segments = cdiv(max_blocks, segment)
    topk_pad = max(4, next_power_of_2(topk))
    rows = total_q * num_groups
    scores = torch.empty(rows, max_blocks, dtype=torch.float32, device=device)
    candidates = counters = None
    if num_segments > 1:
        candidates = torch.empty(rows * num_segments * topk_pad, dtype=torch.int64, device=device)
        counters = torch.zeros(rows, dtype=torch.int32, device=device)
    return BlockTopkPlan(total_q, batch, num_groups, topk, topk_pad, max_len_q, config, block_r,
                         num_tiles, blocks_per_program, num_chunks, segment, num_segments, scores,
                         candidates, counters)


def _run_block_topk(plan: BlockTopkPlan, qi, keys, cu_seqlens_q, key_lengths, *, block_size: int,
                    init_blocks: int, local_blocks: int, block_table, index_scale,
                    index_block_scale, out) -> None:
    paged = block_table is not None
    key_format = 2 if keys.dtype == torch.uint8 else int(index_scale is not None)
    index_dim = qi.shape[-1]
    if key_format and not paged:
        raise ValueError("quantised index keys (index_scale) need the paged layout (block_table)")
    if key_format == 2 and (index_block_scale is None or index_scale is None or index_dim < 32
                            or index_dim != next_power_of_2(index_dim)):
        raise ValueError("4-bit index keys (uint8 index_cache [num_pages, page_size, Di / 2]) need "
                         "index_block_scale [num_pages, page_size, Di / 16] float8_e4m3fn, "
                         f"index_scale [num_pages, page_size] float32 and a power-of-two Di >= 32, got Di={index_dim}")
    pdl = programmatic_launch(qi.device)
    config = plan.config
    _block_scores_kernel[(plan.num_chunks, plan.batch, plan.num_tiles)](
        qi_ptr=qi, ki_ptr=keys, key_scale_ptr=index_scale, block_scale_ptr=index_block_scale,
        block_table_ptr=block_table, cu_seqlens_q_ptr=cu_seqlens_q, key_lengths_ptr=key_lengths,
        scores_ptr=plan.scores, stride_qi_token=qi.stride(0), stride_qi_group=qi.stride(1),
        stride_ki_token=keys.stride(1) if paged else keys.stride(0),
        stride_ki_page=keys.stride(0) if paged else 0,
        stride_scale_page=index_scale.stride(0) if index_scale is not None else 0,
        stride_block_scale_token=index_block_scale.stride(1) if key_format == 2 else 0,
        stride_block_scale_page=index_block_scale.stride(0) if key_format == 2 else 0,
        stride_block_table=block_table.stride(0) if paged else 0,
        stride_scores_row=plan.scores.stride(0), scale=index_dim ** -0.5,
        blocks_per_program=plan.blocks_per_program, NUM_GROUPS=plan.num_groups,
        INDEX_DIM=index_dim, BLOCK_D=next_power_of_2(index_dim), BLOCK_R=plan.block_r,
        BLOCK_N=min(block_size, config.block_n), BLOCK_SIZE=block_size, INIT_BLOCKS=init_blocks,
        LOCAL_BLOCKS=local_blocks, PAGED=paged, KEY_FORMAT=key_format,
        PTX_DECODE=key_format == 2 and fp8_conversions(qi.device), PDL_TRIGGER=pdl,
        **_score_dot_options(qi.dtype, key_format),
        num_warps=config.score_warps, num_stages=config.score_stages)
    _block_topk_kernel[(plan.batch * plan.max_len_q, plan.num_groups, plan.num_segments)](
        scores_ptr=plan.scores, cu_seqlens_q_ptr=cu_seqlens_q, key_lengths_ptr=key_lengths,
        out_ptr=out, candidates_ptr=plan.candidates, counters_ptr=plan.counters,
        stride_scores_row=plan.scores.stride(0), stride_out_group=out.stride(0),
        stride_out_token=out.stride(1), max_len_q=plan.max_len_q, NUM_GROUPS=plan.num_groups,
        BLOCK_SIZE=block_size, SEGMENT=plan.segment, NUM_SEGMENTS=plan.num_segments,
        CANDIDATES_PAD=next_power_of_2(plan.num_segments * plan.topk_pad), TOPK=plan.topk,
        TOPK_PAD=plan.topk_pad, PAGED=paged, BITONIC=plan.segment >= plan.topk_pad,
        PDL=pdl, num_warps=config.topk_warps,
        **({"launch_pdl": True} if pdl else {}))


def _score_dot_options(dtype: torch.dtype, key_format: int) -> dict:
    """:func:`dot_options` of the score kernel's operands: q's dtype with 16-bit keys, fp8 with
    fp8 keys (which the interpreter multiplies in float32, exactly), fp16 with 4-bit keys."""
    if key_format == 1:
        return {**dot_options(dtype), "DOT_UPCAST": interpreted()}
    return dot_options(torch.float16 if key_format == 2 else dtype)


def plan_selection(total_q: int, batch: int, num_groups: int, max_len_q: int, max_blocks: int, *,
                   topk: int, device: torch.device, num_splits: int | None = None,
                   config: IndexerConfig | PageTopkConfig | None = None,
                   four_bit_keys: bool = False) -> SelectionPlan | BlockTopkPlan:
    """Choose the selection's kernels and size their grids and workspaces.

    Query runs of at most :data:`PAGE_TOPK_MAX_QUERY_LEN` tokens (decode), and runs whose row
    tiles cannot fill the GPU (the fused kernel would split the keys) while their block scores
    take at most :data:`BLOCK_TOPK_MAX_SCORE_BYTES` (short chunks), get the block-score and top-k
    kernels (a :class:`BlockTopkPlan`); the others, or a given ``num_splits`` or
    :class:`IndexerConfig`, the fused kernel (a :class:`SelectionPlan`: query tiles x B x key
    splits). A plan's workspace serves one launch at a time: launches of one plan must not run
    concurrently (on different streams).

    Args:
        max_len_q: longest query run of a sequence; max_blocks: most key blocks of a sequence
            (the width of the block table for paged keys).
        num_splits: key-range splits of the fused kernel (default: chosen from the grid size).
        config: a launch configuration (default: :func:`launch_config` or :class:`PageTopkConfig`,
            :data:`PAGE_TOPK_4BIT` with ``four_bit_keys``).
        four_bit_keys: the keys are 4-bit (:mod:`msattn.ops.nvfp4`; decode selection only).
    """
    by_rule = config is None and num_splits is None
    if isinstance(config, PageTopkConfig) or (by_rule and max_len_q <= PAGE_TOPK_MAX_QUERY_LEN):
        return _plan_block_topk(total_q, batch, num_groups, max_len_q, max_blocks, topk=topk,
                                device=device,
                                config=config or (PAGE_TOPK_4BIT if four_bit_keys else PageTopkConfig()))
    rows_per_sequence = max(1, max_len_q * num_groups)
    if config is None:
        config = launch_config(rows_per_sequence, device.type == "cuda")
    num_tiles = cdiv(rows_per_sequence, config.block_r)
    topk_pad = max(4, next_power_of_2(topk))  # Triton 3.6 fails to lower a 2-wide scan
    max_blocks = max(1, max_blocks)
    if num_splits is None:
        num_splits = _num_splits(num_tiles * batch, max_blocks, config.splits_per_sm, device)
        if (by_rule and num_splits > 1
                and total_q * num_groups * max_blocks * 4 <= BLOCK_TOPK_MAX_SCORE_BYTES):
            return _plan_block_topk(total_q, batch, num_groups, max_len_q, max_blocks, topk=topk,
                                    device=device, config=PageTopkConfig())
    num_splits = max(1, min(num_splits, max_blocks, MAX_SPLITS))
    blocks_per_split = cdiv(max_blocks, num_splits)
    num_splits = cdiv(max_blocks, blocks_per_split)
    fan_in = num_splits if num_splits <= 2 * config.fan_in else config.fan_in
    num_split_groups = cdiv(num_splits, fan_in)
    merge_shape = _merge_shape(fan_in, topk_pad, config.block_r, rows_per_sequence)
    level_merge_shape = _merge_shape(num_split_groups, topk_pad, config.block_r, rows_per_sequence)
    partial_keys = level_keys = counters = None
    if num_splits > 1:
        rows = total_q * num_groups * topk_pad
        partial_keys = torch.empty(num_splits * rows, dtype=torch.int64, device=device)
        if num_split_groups > 1:
            level_keys = torch.empty(num_split_groups * rows, dtype=torch.int64, device=device)
        counters = torch.zeros(num_tiles * batch * (num_split_groups + 1), dtype=torch.int32,
                               device=device)
    return SelectionPlan(total_q, batch, num_groups, topk, topk_pad, num_tiles, num_splits,
                         blocks_per_split, config, fan_in, merge_shape, level_merge_shape,
                         partial_keys, level_keys, counters)


def run_selection(plan: SelectionPlan | BlockTopkPlan, qi: torch.Tensor, keys: torch.Tensor,
                  cu_seqlens_q: torch.Tensor, key_lengths: torch.Tensor, *, block_size: int,
                  init_blocks: int, local_blocks: int, block_table: torch.Tensor | None = None,
                  index_scale: torch.Tensor | None = None,
                  index_block_scale: torch.Tensor | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the selection kernels of a plan (:func:`plan_selection`); no host synchronisation.

    ``keys`` is ``ki [total_k, Di]`` with ``key_lengths = cu_seqlens_k``, or, with ``block_table``,
    the paged ``index_cache [num_pages, page_size, Di]`` with ``key_lengths = seq_lens`` (fp8
    with ``index_scale``; or 4-bit, :mod:`msattn.ops.nvfp4`: uint8 ``[num_pages, page_size,
    Di / 2]`` with ``index_block_scale [num_pages, page_size, Di / 16]`` and ``index_scale``).
    """
    out = _output(qi, plan.topk, out)
    if plan.total_q == 0:
        return out
    if qi.stride(-1) != 1:
        qi = qi.contiguous()
    paged = block_table is not None
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    if index_scale is not None and index_scale.stride(-1) != 1:
        index_scale = index_scale.contiguous()
    if index_block_scale is not None and index_block_scale.stride(-1) != 1:
        index_block_scale = index_block_scale.contiguous()
    if isinstance(plan, BlockTopkPlan):
        _run_block_topk(plan, qi, keys, cu_seqlens_q, key_lengths, block_size=block_size,
                        init_blocks=init_blocks, local_blocks=local_blocks,
                        block_table=block_table, index_scale=index_scale,
                        index_block_scale=index_block_scale, out=out)
        return out
    if keys.dtype == torch.uint8:
        raise ValueError("4-bit index keys are read by the decode selection only (query runs of "
                         f"at most {PAGE_TOPK_MAX_QUERY_LEN} tokens)")
    split = plan.num_splits > 1
    index_dim = qi.shape[-1]
    _indexer_kernel[(plan.num_tiles, plan.batch, plan.num_splits)](
        qi_ptr=qi, ki_ptr=keys, key_scale_ptr=index_scale, block_table_ptr=block_table,
        cu_seqlens_q_ptr=cu_seqlens_q, key_lengths_ptr=key_lengths, out_ptr=out,
        partial_keys_ptr=plan.partial_keys if split else None,
        level_keys_ptr=plan.level_keys if split and plan.level_keys is not None else None,
        counters_ptr=plan.counters if split else None,
        stride_qi_token=qi.stride(0), stride_qi_group=qi.stride(1),
        stride_ki_token=keys.stride(1) if paged else keys.stride(0),
        stride_ki_page=keys.stride(0) if paged else 0,
        stride_scale_page=index_scale.stride(0) if index_scale is not None else 0,
        stride_block_table=block_table.stride(0) if paged else 0,
        stride_out_group=out.stride(0), stride_out_token=out.stride(1),
        scale=index_dim ** -0.5, blocks_per_split=plan.blocks_per_split,
        total_rows=plan.total_q * plan.num_groups,
        NUM_GROUPS=plan.num_groups, INDEX_DIM=index_dim, BLOCK_D=next_power_of_2(index_dim),
        BLOCK_R=plan.config.block_r, BLOCK_N=min(block_size, 128), BLOCK_SIZE=block_size,
        TOPK=plan.topk, TOPK_PAD=plan.topk_pad, INIT_BLOCKS=init_blocks,
        LOCAL_BLOCKS=local_blocks, SPLIT=split, PAGED=paged, KEY_SCALE=index_scale is not None,
        # Two blocks a step where the keys are contiguous (prefill) and fit in shared memory.
        PAIRS=not paged and block_size <= 128 and (qi.element_size() <= 2 or not qi.is_cuda),
        FAN_IN=plan.fan_in, NUM_SPLITS=plan.num_splits,
        MERGE_ROWS=plan.merge_shape[0], CANDIDATES_PAD=plan.merge_shape[1],
        LEVEL_MERGE_ROWS=plan.level_merge_shape[0], LEVEL_CANDIDATES_PAD=plan.level_merge_shape[1],
        PDL_TRIGGER=programmatic_launch(qi.device),
        **_score_dot_options(qi.dtype, int(index_scale is not None)), num_warps=plan.config.num_warps,
        num_stages=plan.config.num_stages)
    return out
