"""The selection inverted to a CSR: for every (group, key block), the (query token, slot) entries
that chose it. Built on the GPU with sorts and searches only (no host synchronisation); the
KV-outer sparse-attention forward and its backward both walk it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton


@dataclass
class BlockCSR:
    """Inverted selection of a chunk of query rows ``[row_start, row_end)``.

    Buckets are (group, global key block) pairs, ``bucket = group * num_blocks + global_block``,
    where global key blocks number the blocks of all sequences one after another.

    Attributes:
        entries: ``[num_entries]`` int32, sorted by bucket; entry ``(g * rows + r) * topk + slot``
            for chunk row ``r`` (``row_start + r`` in the batch) and selection slot ``slot``.
        bucket_start: ``[num_buckets + 1]`` int32 offsets of each bucket's entries.
        program_start: ``[num_buckets + 1]`` int32 offsets of each bucket's programs; a program
            takes ``tiles_per_program`` consecutive row tiles of its bucket.
        program_bucket: ``[max_programs + 1]`` int32 bucket of each program.
        block_key_start: ``[num_blocks]`` int32 first key row (in ``total_k``) of each block, or
            its page id for paged K/V.
        block_position: ``[num_blocks]`` int32 position of that key in its sequence.
        block_num_keys: ``[num_blocks]`` int32 keys in the block (0 for unused ids).
        row_position: ``[rows]`` int32 absolute position of each query row in its sequence.
        max_programs: host upper bound on the number of programs (the grid size).
    """

    entries: torch.Tensor
    bucket_start: torch.Tensor
    program_start: torch.Tensor
    program_bucket: torch.Tensor
    block_key_start: torch.Tensor
    block_position: torch.Tensor
    block_num_keys: torch.Tensor
    row_position: torch.Tensor
    num_blocks: int
    max_programs: int


def row_positions(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, row_start: int,
                  row_end: int) -> torch.Tensor:
    """Absolute position (int64 ``[row_end - row_start]``) of each query row in its sequence."""
    rows = torch.arange(row_start, row_end, device=cu_seqlens_q.device)
    seq = torch.searchsorted(cu_seqlens_q[1:], rows, right=True).clamp_max(cu_seqlens_q.numel() - 2)
    len_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    len_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    return rows - cu_seqlens_q[seq].long() + (len_k - len_q)[seq]


def build_block_csr(indices: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                    *, block_size: int, total_k: int, row_start: int, row_end: int,
                    group_size: int, block_m: int, tiles_per_program: int,
                    block_table: torch.Tensor | None = None) -> BlockCSR:
    """Invert the selection of query rows ``[row_start, row_end)`` (see :class:`BlockCSR`).

    Args:
        indices: ``[G, total_q, topk]`` int32 block ids relative to each sequence.
        group_size: query heads per group (rows of a tile are (entry, head) pairs).
        block_m: rows per tile.
        tiles_per_program: row tiles of one bucket handled by one program.
        block_table: int32 ``[B, max_pages]`` for paged K/V (one page per block); then
            ``block_key_start`` holds page ids and sequence ``b`` owns global blocks
            ``b * max_pages ...``.
    """
    device = indices.device
    num_groups, _, topk = indices.shape
    batch = cu_seqlens_q.numel() - 1
    rows = row_end - row_start
    len_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    if block_table is None:
        num_blocks = total_k // block_size + batch  # bound on the blocks of all sequences
        seq_blocks = (len_k + block_size - 1) // block_size
    else:
        num_blocks = batch * block_table.shape[1]
        seq_blocks = torch.full_like(len_k, block_table.shape[1])
    num_buckets = num_groups * num_blocks
    block_offset = torch.zeros(batch + 1, dtype=torch.int64, device=device)
    torch.cumsum(seq_blocks, 0, out=block_offset[1:])

    position = row_positions(cu_seqlens_q, cu_seqlens_k, row_start, row_end)
    seq = torch.searchsorted(cu_seqlens_q[1:], torch.arange(row_start, row_end, device=device),
                             right=True).clamp_max(batch - 1)
    chosen = indices[:, row_start:row_end].long()  # [G, rows, topk]
    # An entry counts when its block has a key at or before the query (the kernels' rule too).
    valid = (chosen >= 0) & (chosen * block_size <= position[None, :, None])
    group = torch.arange(num_groups, device=device)[:, None, None]
    bucket = group * num_blocks + block_offset[seq][None, :, None] + chosen
    bucket = torch.where(valid, bucket, num_buckets).flatten()  # invalid entries sort last
    sorted_bucket, order = torch.sort(bucket, stable=True)
    bucket_start = torch.searchsorted(sorted_bucket, torch.arange(num_buckets + 1, device=device))
    counts = bucket_start[1:] - bucket_start[:-1]
    rows_per_program = block_m * tiles_per_program
    programs = (counts * group_size + rows_per_program - 1) // rows_per_program
    program_start = torch.zeros(num_buckets + 1, dtype=torch.int64, device=device)
    torch.cumsum(programs, 0, out=program_start[1:])
    max_programs = (triton.cdiv(num_groups * rows * topk * group_size, rows_per_program)
                    + num_buckets)
    # program -> bucket without a host sync: mark each bucket's first program, prefix-sum.
    marks = torch.zeros(max_programs + 1, dtype=torch.int32, device=device)
    marks.index_add_(0, program_start[:-1], torch.ones(num_buckets, dtype=torch.int32, device=device))
    program_bucket = torch.cumsum(marks, 0, dtype=torch.int32) - 1

    global_block = torch.arange(num_blocks, device=device)
    block_seq = torch.searchsorted(block_offset[1:], global_block, right=True).clamp_max(batch - 1)
    local_block = global_block - block_offset[block_seq]
    block_position = local_block * block_size
    block_num_keys = (len_k[block_seq] - block_position).clamp(0, block_size)
    block_num_keys = torch.where(global_block < block_offset[-1], block_num_keys, 0)
    if block_table is None:
        block_key_start = cu_seqlens_k[block_seq].long() + block_position
    else:  # page ids; blocks past a sequence's pages have no keys and are never dereferenced
        block_key_start = torch.where(block_num_keys > 0, block_table.flatten().long(), 0)

    return BlockCSR(
        entries=order.to(torch.int32), bucket_start=bucket_start.to(torch.int32),
        program_start=program_start.to(torch.int32), program_bucket=program_bucket,
        block_key_start=block_key_start.to(torch.int32),
        block_position=block_position.to(torch.int32), block_num_keys=block_num_keys.to(torch.int32),
        row_position=position.to(torch.int32), num_blocks=num_blocks, max_programs=max_programs)
