"""The selection inverted to a CSR: for every (group, key block), the (query token, slot) entries
that chose it. Built on the GPU without host synchronisation: what every chunk of query rows
shares once a call (:func:`csr_layout`: one Triton kernel, and a prefix sum for contiguous
keys), then per chunk a counting sort in two Triton kernels (the forward) or one kernel and a
stable sort (the backward, whose sums run in entry order). Short prefills and chunks are bound
by the host's launch time: this took some forty torch operations a chunk and the layout another
forty a call, then about ten launches a chunk. The KV-outer sparse-attention forward, its
backward and the indexer loss walk it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from msattn.ops.utils import arrive_last, block_visible, cdiv


@dataclass
class BlockCSR:
    """Inverted selection of a chunk of query rows ``[row_start, row_end)``.

    Buckets are (group, global key block) pairs, ``bucket = group * num_blocks + global_block``,
    where global key blocks number the blocks of all sequences one after another.

    Attributes:
        entries: ``[num_entries]`` int32, grouped by bucket (the first ``bucket_start[-1]``; the
            rest unspecified); entry ``(g * rows + r) * topk + slot`` for chunk row ``r``
            (``row_start + r`` in the batch) and selection slot ``slot``. Within a bucket in
            increasing order when built ``stable``, else in the order the counting sort's atomics
            ranked them.
        bucket_start: ``[num_buckets + 1]`` int32 offsets of each bucket's entries.
        program_start: ``[num_buckets + 1]`` int32 offsets of each bucket's programs; a program
            takes ``tiles_per_program`` consecutive row tiles of its bucket.
        program_bucket: ``[max_programs + 1]`` int32 bucket of each program (``num_buckets - 1``
            for the ids past the last program).
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
        bucket_count: ``[num_buckets + 1]`` int32 zeros: the counting sort's counters (each
            chunk's build leaves them zero again).
        num_blocks: global key blocks of the batch (an upper bound).
        zeros: ``[extra_zeros]`` int32 zeros for the caller (the sparse attention's merge
            counters), cleared by the same kernel.
    """

    row_position: torch.Tensor
    row_block_offset: torch.Tensor
    block_key_start: torch.Tensor
    block_position: torch.Tensor
    block_num_keys: torch.Tensor
    bucket_count: torch.Tensor
    num_blocks: int
    zeros: torch.Tensor


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


@triton.jit
def _key_length(key_lengths_ptr, seq, mask, PAGED: tl.constexpr):
    """Keys of sequence ``seq``: ``seq_lens[seq]`` (PAGED) or from the prefix sums ``cu_seqlens_k``."""
    if PAGED:
        return tl.load(key_lengths_ptr + seq, mask=mask, other=0)
    return tl.load(key_lengths_ptr + seq + 1, mask=mask, other=0) \
        - tl.load(key_lengths_ptr + seq, mask=mask, other=0)


# One program: BLOCK query rows, BLOCK global key blocks and BLOCK counters of a CSRLayout.
# Row r < total_q of sequence s (the last with cu_seqlens_q[s] <= r): row_position = r -
# cu_seqlens_q[s] + len_k(s) - len_q(s), row_block_offset = the global id of s's first block.
# Block b < num_blocks of sequence s (the last whose first block is <= b): block_position = (b -
# first block) * BLOCK_SIZE, block_num_keys (0 past the keys), block_key_start (the key
# row in total_k, or with PAGED the page id block_table[s, b - first block]; sequence s owns
# blocks s * max_pages ...). bucket_count[i] = 0 for i < num_zeros (num_buckets + 1 counters,
# then the caller's extra zeros, contiguous). cu_seqlens_q int32
# [batch + 1]; key_lengths: cu_seqlens_k int32 [batch + 1], or seq_lens int32 [batch] when PAGED;
# block_offset int32 [batch + 1] the first blocks (unused when PAGED); all outputs int32.
# Grid: (cdiv(max(total_q, num_blocks, num_zeros), BLOCK),).
@triton.jit
def _layout_kernel(cu_seqlens_q_ptr, key_lengths_ptr, block_offset_ptr, block_table_ptr,
                   row_position_ptr, row_block_offset_ptr, block_key_start_ptr, block_position_ptr,
                   block_num_keys_ptr, bucket_count_ptr, stride_table_seq, stride_table_page,
                   batch, total_q, num_blocks, num_zeros, max_pages, steps,
                   BLOCK_SIZE: tl.constexpr, PAGED: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(bucket_count_ptr + i, tl.zeros_like(i), mask=i < num_zeros)

    row_mask = i < total_q
    seq = tl.minimum(_search_right(cu_seqlens_q_ptr + 1, batch, i, row_mask, steps), batch - 1)
    q_start = tl.load(cu_seqlens_q_ptr + seq, mask=row_mask, other=0)
    len_q = tl.load(cu_seqlens_q_ptr + seq + 1, mask=row_mask, other=0) - q_start
    len_k = _key_length(key_lengths_ptr, seq, row_mask, PAGED)
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
    len_k = _key_length(key_lengths_ptr, seq, block_mask, PAGED)
    position = (i - first_block) * BLOCK_SIZE
    # 0 past a sequence's keys, so for the blocks past the batch's (the last sequence's)
    num_keys = tl.minimum(tl.maximum(len_k - position, 0), BLOCK_SIZE)
    if PAGED:  # blocks past a sequence's pages have no keys and are never dereferenced
        key_start = tl.load(block_table_ptr + seq.to(tl.int64) * stride_table_seq
                            + (i - first_block) * stride_table_page,
                            mask=block_mask & (num_keys > 0), other=0)
    else:
        key_start = tl.load(key_lengths_ptr + seq, mask=block_mask, other=0) + position
    tl.store(block_position_ptr + i, position, mask=block_mask)
    tl.store(block_num_keys_ptr + i, num_keys, mask=block_mask)
    tl.store(block_key_start_ptr + i, key_start, mask=block_mask)


def _key_lengths(cu_seqlens_k, block_table, seq_lens) -> torch.Tensor:
    """The key lengths the layout kernel reads: ``seq_lens`` for paged K/V, else ``cu_seqlens_k``."""
    if block_table is None:
        if cu_seqlens_k is None:
            raise ValueError("cu_seqlens_k (int32 [B + 1]) is needed for contiguous keys")
        return cu_seqlens_k
    if seq_lens is None:
        raise ValueError("seq_lens (int32 [B]) is needed with block_table (paged keys)")
    return seq_lens


def csr_layout(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor | None, *, total_q: int,
               num_groups: int, block_size: int, total_k: int,
               block_table: torch.Tensor | None = None,
               seq_lens: torch.Tensor | None = None, extra_zeros: int = 0) -> CSRLayout:
    """The part of :func:`build_block_csr` that does not depend on the chunk of rows (see
    :class:`CSRLayout`; arguments as there, ``total_q`` the rows of ``indices``; ``extra_zeros``
    int32 zeros more for the caller): one Triton kernel, after two torch operations (the blocks'
    prefix sum) for contiguous keys."""
    device = cu_seqlens_q.device
    batch = cu_seqlens_q.numel() - 1
    key_lengths = _key_lengths(cu_seqlens_k, block_table, seq_lens)
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
    num_zeros = num_buckets + 1 + extra_zeros
    out = torch.empty(2 * total_q + 3 * num_blocks + num_zeros, dtype=torch.int32, device=device)
    (row_position, row_block_offset, block_key_start, block_position, block_num_keys, bucket_count,
     zeros) = out.split([total_q, total_q, num_blocks, num_blocks, num_blocks, num_buckets + 1,
                         extra_zeros])
    table = block_table if block_table is not None else cu_seqlens_q
    block = 1024
    _layout_kernel[(cdiv(max(total_q, num_blocks, num_zeros), block),)](
        cu_seqlens_q, key_lengths, block_offset, table, row_position, row_block_offset,
        block_key_start, block_position, block_num_keys, bucket_count,  # zeros follow it
        table.stride(0), table.stride(-1), batch, total_q, num_blocks, num_zeros, max_pages,
        batch.bit_length(), BLOCK_SIZE=block_size, PAGED=block_table is not None, BLOCK=block)
    return CSRLayout(row_position=row_position, row_block_offset=row_block_offset,
                     block_key_start=block_key_start, block_position=block_position,
                     block_num_keys=block_num_keys, bucket_count=bucket_count,
                     num_blocks=num_blocks, zeros=zeros)


@triton.jit
def _entry_buckets(indices_ptr, row_position_ptr, row_block_offset_ptr, stride_indices_group,
                   stride_indices_token, stride_indices_slot, row_start, rows, num_entries,
                   num_blocks, TOPK: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    """This program's BLOCK (group, chunk row, slot) entries ``entry = (g * rows + r) * TOPK +
    slot`` (``mask``: below ``num_entries``), each one's bucket (int32) and whether it counts
    (``valid``): ``g * num_blocks`` + the global id of the chosen block when that block has a key
    at or before the row (the kernels' rule too). Returns ``(entry, mask, bucket, valid)``."""
    entry = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = entry < num_entries
    slot = entry % TOPK
    rows = tl.maximum(rows, 1)  # no entries when 0
    group = entry // TOPK // rows
    token = row_start + (entry // TOPK) % rows
    chosen = tl.load(indices_ptr + group.to(tl.int64) * stride_indices_group
                     + token.to(tl.int64) * stride_indices_token + slot * stride_indices_slot,
                     mask=mask, other=-1).to(tl.int64)
    position = tl.load(row_position_ptr + token, mask=mask, other=0)
    offset = tl.load(row_block_offset_ptr + token, mask=mask, other=0)
    valid = mask & block_visible(chosen, position, BLOCK_SIZE)
    bucket = tl.where(valid, group * num_blocks + offset + chosen, 0).to(tl.int32)
    return entry, mask, bucket, valid


# One program: BLOCK entries of the selection of chunk rows [row_start, row_start + rows)
# (_entry_buckets), counted into bucket_count [num_buckets + 1] (int32, zero before; the last
# element counts the programs that are done). Writes scratch [num_entries] int32: with
# STORE_RANK the entry's rank among its bucket's entries (the atomic's old count), else its
# bucket (num_buckets when it does not count: sorts last). The last program to finish turns the
# counts into bucket_start [num_buckets + 1] (exclusive prefix sums), program_start
# [num_buckets + 1] (bucket b needs ceil(count x group_size / rows_per_program) programs) and
# program_bucket [max_programs + 1] (num_buckets - 1 past the last program), SCAN_BLOCK buckets
# a step, and zeroes the counters for the next chunk. Grid: (num_programs,), at least 1.
@triton.jit
def _count_kernel(indices_ptr, row_position_ptr, row_block_offset_ptr, scratch_ptr,
                  bucket_count_ptr, bucket_start_ptr, program_start_ptr, program_bucket_ptr,
                  stride_indices_group, stride_indices_token, stride_indices_slot, row_start,
                  rows, num_entries, num_blocks, num_buckets, group_size, rows_per_program,
                  max_programs, num_programs, TOPK: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  STORE_RANK: tl.constexpr, BLOCK: tl.constexpr, SCAN_BLOCK: tl.constexpr):
    entry, mask, bucket, valid = _entry_buckets(
        indices_ptr, row_position_ptr, row_block_offset_ptr, stride_indices_group,
        stride_indices_token, stride_indices_slot, row_start, rows, num_entries, num_blocks, TOPK,
        BLOCK_SIZE, BLOCK)
    rank = tl.atomic_add(bucket_count_ptr + bucket, tl.full([BLOCK], 1, tl.int32), mask=valid,
                         sem="relaxed")
    if STORE_RANK:
        tl.store(scratch_ptr + entry, rank, mask=valid)
    else:
        tl.store(scratch_ptr + entry, tl.where(valid, bucket, num_buckets), mask=mask)
    if arrive_last(bucket_count_ptr + num_buckets, num_programs):
        entries_before = 0
        programs_before = 0
        for start in range(0, num_buckets + 1, SCAN_BLOCK):
            b = start + tl.arange(0, SCAN_BLOCK)
            inside = b < num_buckets
            count = tl.load(bucket_count_ptr + b, mask=inside, other=0, cache_modifier=".cg")
            tl.store(bucket_count_ptr + b, tl.zeros_like(count), mask=inside)
            programs = ((count.to(tl.int64) * group_size + rows_per_program - 1)
                        // rows_per_program).to(tl.int32)
            first_program = programs_before + tl.cumsum(programs, 0) - programs
            tl.store(bucket_start_ptr + b, entries_before + tl.cumsum(count, 0) - count,
                     mask=b <= num_buckets)
            tl.store(program_start_ptr + b, first_program, mask=b <= num_buckets)
            for j in range(tl.max(programs, 0)):
                tl.store(program_bucket_ptr + first_program + j, b, mask=j < programs)
            entries_before += tl.sum(count, 0)
            programs_before += tl.sum(programs, 0)
        last_bucket = tl.maximum(num_buckets - 1, 0)
        for start in range(programs_before, max_programs + 1, SCAN_BLOCK):
            p = start + tl.arange(0, SCAN_BLOCK)
            tl.store(program_bucket_ptr + p, tl.zeros_like(p) + last_bucket, mask=p <= max_programs)


# One program: BLOCK entries (as _count_kernel); each that counts goes to entries
# [bucket_start[bucket] + rank]. Grid: (cdiv(num_entries, BLOCK),).
@triton.jit
def _scatter_kernel(indices_ptr, row_position_ptr, row_block_offset_ptr, rank_ptr,
                    bucket_start_ptr, entries_ptr, stride_indices_group, stride_indices_token,
                    stride_indices_slot, row_start, rows, num_entries, num_blocks,
                    TOPK: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    entry, _, bucket, valid = _entry_buckets(
        indices_ptr, row_position_ptr, row_block_offset_ptr, stride_indices_group,
        stride_indices_token, stride_indices_slot, row_start, rows, num_entries, num_blocks, TOPK,
        BLOCK_SIZE, BLOCK)
    rank = tl.load(rank_ptr + entry, mask=valid, other=0)
    first = tl.load(bucket_start_ptr + bucket, mask=valid, other=0)
    tl.store(entries_ptr + first + rank, entry, mask=valid)


def build_block_csr(indices: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    cu_seqlens_k: torch.Tensor | None, *, block_size: int, total_k: int,
                    row_start: int, row_end: int, group_size: int, block_m: int,
                    tiles_per_program: int, block_table: torch.Tensor | None = None,
                    seq_lens: torch.Tensor | None = None, layout: CSRLayout | None = None,
                    stable: bool = True) -> BlockCSR:
    """Invert the selection of query rows ``[row_start, row_end)`` (see :class:`BlockCSR`).

    Args:
        indices: ``[G, total_q, topk]`` int32 block ids relative to each sequence.
        cu_seqlens_q: int32 ``[B + 1]``; cu_seqlens_k: int32 ``[B + 1]`` (contiguous keys, else
            None).
        group_size: query heads per group (rows of a tile are (entry, head) pairs).
        block_m: rows per tile.
        tiles_per_program: row tiles of one bucket handled by one program.
        block_table, seq_lens: int32 ``[B, max_pages]`` and ``[B]`` for paged K/V (one page per
            block); then ``block_key_start`` holds page ids and sequence ``b`` owns global blocks
            ``b * max_pages ...``.
        layout: :func:`csr_layout` of the same call (same ``cu_seqlens``, ``block_size``,
            ``total_k``, ``block_table``), shared by its chunks; built here when None.
        stable: the entries of a bucket in increasing order (a stable sort: for sums that must
            run in a fixed order); else in the order of the counting sort's atomics (the
            forward, whose rows do not depend on each other).
    Two Triton launches and a split (plus a sort and a cast when ``stable``), none of which
    reads anything on the host.
    """
    device = indices.device
    num_groups, total_q, topk = indices.shape
    if layout is None:
        layout = csr_layout(cu_seqlens_q, cu_seqlens_k, total_q=total_q, num_groups=num_groups,
                            block_size=block_size, total_k=total_k, block_table=block_table,
                            seq_lens=seq_lens)
    num_buckets = num_groups * layout.num_blocks
    if layout.bucket_count.numel() != num_buckets + 1 or layout.row_position.numel() != total_q:
        raise ValueError(f"layout was built for another call: {layout.row_position.numel()} rows "
                         f"and {layout.bucket_count.numel() - 1} buckets, indices need {total_q} "
                         f"rows and {num_buckets}")
    rows = row_end - row_start
    num_entries = num_groups * rows * topk
    rows_per_program = block_m * tiles_per_program
    max_programs = cdiv(num_entries * group_size, rows_per_program) + num_buckets
    out = torch.empty(num_entries * (1 if stable else 2) + 2 * (num_buckets + 1) + max_programs + 1,
                      dtype=torch.int32, device=device)
    scratch, bucket_start, program_start, program_bucket, entries = out.split(
        [num_entries, num_buckets + 1, num_buckets + 1, max_programs + 1,
         0 if stable else num_entries])
    block = 1024
    num_programs = max(1, cdiv(num_entries, block))
    strides = (indices.stride(0), indices.stride(1), indices.stride(2))
    _count_kernel[(num_programs,)](
        indices, layout.row_position, layout.row_block_offset, scratch, layout.bucket_count,
        bucket_start, program_start, program_bucket, *strides, row_start, rows, num_entries,
        layout.num_blocks, num_buckets, group_size, rows_per_program, max_programs, num_programs,
        TOPK=topk, BLOCK_SIZE=block_size, STORE_RANK=not stable, BLOCK=block, SCAN_BLOCK=4096)
    if stable:  # entries that do not count sort last
        entries = torch.sort(scratch, stable=True)[1].to(torch.int32)
    elif num_entries:
        _scatter_kernel[(cdiv(num_entries, block),)](
            indices, layout.row_position, layout.row_block_offset, scratch, bucket_start, entries,
            *strides, row_start, rows, num_entries, layout.num_blocks, TOPK=topk,
            BLOCK_SIZE=block_size, BLOCK=block)
    return BlockCSR(
        entries=entries, bucket_start=bucket_start, program_start=program_start,
        program_bucket=program_bucket, block_key_start=layout.block_key_start,
        block_position=layout.block_position, block_num_keys=layout.block_num_keys,
        row_position=layout.row_position[row_start:row_end], num_blocks=layout.num_blocks,
        max_programs=max_programs)
