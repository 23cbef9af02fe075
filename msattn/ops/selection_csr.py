"""The selection inverted to a CSR: for every (group, key block), the (query token, slot) entries
that chose it. Built on the GPU without host synchronisation: what every chunk of query rows
shares once a call (:func:`csr_layout`: one Triton kernel, and a prefix sum for contiguous
keys), then per chunk two small Triton kernels, one sort, two searches, a prefix sum and three
small torch operations (about ten launches; short prefills were bound by the host's launch time
when this took some forty torch operations a chunk, and the layout another forty a call). The
KV-outer sparse-attention forward and its backward both walk it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


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


@dataclass
class CSRLayout:
    """What the CSRs of all chunks of query rows of one call share (built once a call).

    Attributes:
        row_position: ``[total_q]`` int32 position of each query row in its sequence.
        row_block_offset: ``[total_q]`` int32 global id of the first key block of the row's
            sequence.
        block_key_start, block_position, block_num_keys: as in :class:`BlockCSR`.
        bucket_ids: ``[num_buckets + 1]`` int32 ``0, 1, ..., num_buckets`` (searched for).
        num_blocks: global key blocks of the batch (an upper bound).
    """

    row_position: torch.Tensor
    row_block_offset: torch.Tensor
    block_key_start: torch.Tensor
    block_position: torch.Tensor
    block_num_keys: torch.Tensor
    bucket_ids: torch.Tensor
    num_blocks: int


def row_positions(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, row_start: int,
                  row_end: int) -> torch.Tensor:
    """Absolute position (int64 ``[row_end - row_start]``) of each query row in its sequence."""
    rows = torch.arange(row_start, row_end, device=cu_seqlens_q.device)
    seq = torch.searchsorted(cu_seqlens_q[1:], rows, right=True).clamp_max(cu_seqlens_q.numel() - 2)
    len_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    len_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    return rows - cu_seqlens_q[seq].long() + (len_k - len_q)[seq]


@triton.jit
def _search_right(sorted_ptr, n, x, mask, steps):
    """``torch.searchsorted(sorted[:n], x, right=True)`` for each element of ``x`` where
    ``mask``: the count of ``sorted[i] <= x`` (``sorted_ptr`` int32, nondecreasing; ``steps`` at
    least ``n.bit_length()``)."""
    lo = tl.zeros_like(x)
    hi = lo + n
    for _ in range(steps):
        active = mask & (lo < hi)
        mid = (lo + hi) // 2
        value = tl.load(sorted_ptr + mid, mask=active, other=0)
        right = active & (value <= x)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    return lo


# One program: BLOCK query rows, BLOCK global key blocks and BLOCK bucket ids of a CSRLayout.
# Row r < total_q of sequence s (the last with cu_seqlens_q[s] <= r): row_position = r -
# cu_seqlens_q[s] + len_k(s) - len_q(s), row_block_offset = the global id of s's first block.
# Block b < num_blocks of sequence s (the last whose first block is <= b): block_position = (b -
# first block) * BLOCK_SIZE, block_num_keys (0 past the keys), block_key_start (the key
# row in total_k, or with PAGED the page id block_table[s, b - first block]; sequence s owns
# blocks s * max_pages ...). bucket_ids[i] = i for i <= num_buckets. cu_seqlens_q, cu_seqlens_k
# int32 [batch + 1]; block_offset int32 [batch + 1] the first blocks (unused when PAGED); all
# outputs int32. Grid: (cdiv(max(total_q, num_blocks, num_buckets + 1), BLOCK),).
@triton.jit
def _layout_kernel(cu_seqlens_q_ptr, cu_seqlens_k_ptr, block_offset_ptr, block_table_ptr,
                   row_position_ptr, row_block_offset_ptr, block_key_start_ptr, block_position_ptr,
                   block_num_keys_ptr, bucket_ids_ptr, stride_table_seq, stride_table_page,
                   batch, total_q, num_blocks, num_buckets, max_pages, steps,
                   BLOCK_SIZE: tl.constexpr, PAGED: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(bucket_ids_ptr + i, i, mask=i <= num_buckets)

    row_mask = i < total_q
    seq = tl.minimum(_search_right(cu_seqlens_q_ptr + 1, batch, i, row_mask, steps), batch - 1)
    q_start = tl.load(cu_seqlens_q_ptr + seq, mask=row_mask, other=0)
    len_q = tl.load(cu_seqlens_q_ptr + seq + 1, mask=row_mask, other=0) - q_start
    len_k = tl.load(cu_seqlens_k_ptr + seq + 1, mask=row_mask, other=0) \
        - tl.load(cu_seqlens_k_ptr + seq, mask=row_mask, other=0)
    tl.store(row_position_ptr + i, i - q_start + len_k - len_q, mask=row_mask)
    if PAGED:
        first_block = seq * max_pages
    else:
        first_block = tl.load(block_offset_ptr + seq, mask=row_mask, other=0)
    tl.store(row_block_offset_ptr + i, first_block, mask=row_mask)

    block_mask = i < num_blocks
    if PAGED:
        seq = tl.minimum(i // max_pages, batch - 1)
        first_block = seq * max_pages
    else:
        seq = tl.minimum(_search_right(block_offset_ptr + 1, batch, i, block_mask, steps),
                         batch - 1)
        first_block = tl.load(block_offset_ptr + seq, mask=block_mask, other=0)
    k_start = tl.load(cu_seqlens_k_ptr + seq, mask=block_mask, other=0)
    len_k = tl.load(cu_seqlens_k_ptr + seq + 1, mask=block_mask, other=0) - k_start
    position = (i - first_block) * BLOCK_SIZE
    # 0 past a sequence's keys, so for the blocks past the batch's (the last sequence's)
    num_keys = tl.minimum(tl.maximum(len_k - position, 0), BLOCK_SIZE)
    if PAGED:  # blocks past a sequence's pages have no keys and are never dereferenced
        key_start = tl.load(block_table_ptr + seq.to(tl.int64) * stride_table_seq
                            + (i - first_block) * stride_table_page,
                            mask=block_mask & (num_keys > 0), other=0)
    else:
        key_start = k_start + position
    tl.store(block_position_ptr + i, position, mask=block_mask)
    tl.store(block_num_keys_ptr + i, num_keys, mask=block_mask)
    tl.store(block_key_start_ptr + i, key_start, mask=block_mask)


def csr_layout(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, *, total_q: int,
               num_groups: int, block_size: int, total_k: int,
               block_table: torch.Tensor | None = None) -> CSRLayout:
    """The part of :func:`build_block_csr` that does not depend on the chunk of rows (see
    :class:`CSRLayout`; arguments as there, ``total_q`` the rows of ``indices``): one Triton
    kernel, after two torch operations (the blocks' prefix sum) for contiguous keys."""
    device = cu_seqlens_q.device
    batch = cu_seqlens_q.numel() - 1
    if block_table is None:
        num_blocks = total_k // block_size + batch  # bound on the blocks of all sequences
        max_pages = 0
        seq_blocks = (torch.diff(cu_seqlens_k) + (block_size - 1)) // block_size
        block_offset = torch.cumsum(torch.nn.functional.pad(seq_blocks, (1, 0)), 0,
                                    dtype=torch.int32)
    else:
        max_pages = block_table.shape[1]
        num_blocks = batch * max_pages
        block_offset = cu_seqlens_q  # unused (PAGED)
    num_buckets = num_groups * num_blocks
    out = torch.empty(2 * total_q + 3 * num_blocks + num_buckets + 1, dtype=torch.int32,
                      device=device)
    row_position, row_block_offset, block_key_start, block_position, block_num_keys, bucket_ids = \
        out.split([total_q, total_q, num_blocks, num_blocks, num_blocks, num_buckets + 1])
    table = block_table if block_table is not None else cu_seqlens_q
    block = 1024
    _layout_kernel[(triton.cdiv(max(total_q, num_blocks, num_buckets + 1), block),)](
        cu_seqlens_q, cu_seqlens_k, block_offset, table, row_position, row_block_offset,
        block_key_start, block_position, block_num_keys, bucket_ids,
        table.stride(0), table.stride(-1), batch, total_q, num_blocks, num_buckets, max_pages,
        batch.bit_length(), BLOCK_SIZE=block_size, PAGED=block_table is not None, BLOCK=block)
    return CSRLayout(row_position=row_position, row_block_offset=row_block_offset,
                     block_key_start=block_key_start, block_position=block_position,
                     block_num_keys=block_num_keys, bucket_ids=bucket_ids, num_blocks=num_blocks)


# One program: BLOCK consecutive (group, chunk row, slot) entries of the selection of chunk rows
# [row_start, row_start + rows); entry e = (g * rows + r) * TOPK + slot. Writes bucket [entries]
# int32: g * num_blocks + the global id of the chosen block when that block has a key at or before
# the row (the kernels' rule too), else num_buckets (sorts last). Grid: (cdiv(entries, BLOCK),).
@triton.jit
def _bucket_kernel(indices_ptr, row_position_ptr, row_block_offset_ptr, bucket_ptr,
                   stride_indices_group, stride_indices_token, stride_indices_slot, row_start,
                   rows, num_entries, num_blocks, num_buckets, TOPK: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    entry = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = entry < num_entries
    slot = entry % TOPK
    group = entry // TOPK // rows
    token = row_start + (entry // TOPK) % rows
    chosen = tl.load(indices_ptr + group.to(tl.int64) * stride_indices_group
                     + token.to(tl.int64) * stride_indices_token + slot * stride_indices_slot,
                     mask=mask, other=-1).to(tl.int64)
    position = tl.load(row_position_ptr + token, mask=mask, other=0)
    offset = tl.load(row_block_offset_ptr + token, mask=mask, other=0)
    valid = (chosen >= 0) & (chosen * BLOCK_SIZE <= position)  # int64: no wrap for any id
    bucket = tl.where(valid, group * num_blocks + offset + chosen, num_buckets)
    tl.store(bucket_ptr + entry, bucket.to(tl.int32), mask=mask)


# One program: BLOCK buckets. From bucket_start [num_buckets + 1] writes programs [num_buckets + 1]
# int32: programs[0] = 0, programs[b + 1] = the programs bucket b needs (ceil of its entries x
# group_size rows over rows_per_program), whose prefix sums are the buckets' first programs. Both
# are runtime values (the deterministic backward sizes rows_per_program from total_q).
# Grid: (cdiv(num_buckets + 1, BLOCK),).
@triton.jit
def _bucket_programs_kernel(bucket_start_ptr, programs_ptr, num_buckets, group_size,
                            rows_per_program, BLOCK: tl.constexpr):
    slot = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # programs[slot]: bucket slot - 1
    inside = (slot >= 1) & (slot <= num_buckets)
    count = (tl.load(bucket_start_ptr + slot, mask=inside, other=0)
             - tl.load(bucket_start_ptr + slot - 1, mask=inside, other=0)).to(tl.int64)
    programs = (count * group_size + rows_per_program - 1) // rows_per_program
    tl.store(programs_ptr + slot, programs.to(tl.int32), mask=slot <= num_buckets)


def build_block_csr(indices: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                    *, block_size: int, total_k: int, row_start: int, row_end: int,
                    group_size: int, block_m: int, tiles_per_program: int,
                    block_table: torch.Tensor | None = None,
                    layout: CSRLayout | None = None) -> BlockCSR:
    """Invert the selection of query rows ``[row_start, row_end)`` (see :class:`BlockCSR`).

    Args:
        indices: ``[G, total_q, topk]`` int32 block ids relative to each sequence.
        group_size: query heads per group (rows of a tile are (entry, head) pairs).
        block_m: rows per tile.
        tiles_per_program: row tiles of one bucket handled by one program.
        block_table: int32 ``[B, max_pages]`` for paged K/V (one page per block); then
            ``block_key_start`` holds page ids and sequence ``b`` owns global blocks
            ``b * max_pages ...``.
        layout: :func:`csr_layout` of the same call (same ``cu_seqlens``, ``block_size``,
            ``total_k``, ``block_table``), shared by its chunks; built here when None.
    About ten launches a chunk (two Triton kernels, a sort of several, two searches, a prefix
    sum and three small torch operations), none of which reads anything on the host.
    """
    device = indices.device
    num_groups, total_q, topk = indices.shape
    if layout is None:
        layout = csr_layout(cu_seqlens_q, cu_seqlens_k, total_q=total_q, num_groups=num_groups,
                            block_size=block_size, total_k=total_k, block_table=block_table)
    num_buckets = num_groups * layout.num_blocks
    if layout.bucket_ids.numel() != num_buckets + 1 or layout.row_position.numel() != total_q:
        raise ValueError(f"layout was built for another call: {layout.row_position.numel()} rows "
                         f"and {layout.bucket_ids.numel() - 1} buckets, indices need {total_q} "
                         f"rows and {num_buckets}")
    rows = row_end - row_start
    num_entries = num_groups * rows * topk
    bucket = torch.empty(num_entries, dtype=torch.int32, device=device)
    if num_entries:
        _bucket_kernel[(triton.cdiv(num_entries, 1024),)](
            indices, layout.row_position, layout.row_block_offset, bucket, indices.stride(0),
            indices.stride(1), indices.stride(2), row_start, rows, num_entries, layout.num_blocks,
            num_buckets, TOPK=topk, BLOCK_SIZE=block_size, BLOCK=1024)
    sorted_bucket, order = torch.sort(bucket, stable=True)  # invalid entries last
    bucket_start = torch.searchsorted(sorted_bucket, layout.bucket_ids, out_int32=True)
    rows_per_program = block_m * tiles_per_program
    programs = torch.empty(num_buckets + 1, dtype=torch.int32, device=device)
    _bucket_programs_kernel[(triton.cdiv(num_buckets + 1, 1024),)](
        bucket_start, programs, num_buckets, group_size, rows_per_program, BLOCK=1024)
    program_start = torch.cumsum(programs, 0, dtype=torch.int32)
    max_programs = triton.cdiv(num_entries * group_size, rows_per_program) + num_buckets
    # program -> the last bucket starting at or before it (no host sync)
    program_ids = torch.arange(max_programs + 1, dtype=torch.int32, device=device)
    program_bucket = torch.searchsorted(program_start[:-1], program_ids, right=True,
                                        out_int32=True) - 1
    return BlockCSR(
        entries=order.to(torch.int32), bucket_start=bucket_start, program_start=program_start,
        program_bucket=program_bucket, block_key_start=layout.block_key_start,
        block_position=layout.block_position, block_num_keys=layout.block_num_keys,
        row_position=layout.row_position[row_start:row_end], num_blocks=layout.num_blocks,
        max_programs=max_programs)
