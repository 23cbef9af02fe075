"""KL-distillation loss of the MSA index branch: Triton kernels, launchers and autograd.

For query token ``t`` and group ``g`` over the key set ``J(t, g)`` (the causal keys of the selected
blocks, or every causal key for the dense warm-up), the teacher ``P`` is the main branch's
attention averaged over the heads of the group (a constant) and the student ``Q`` the softmax of
the index scores ``qi . ki * Di**-0.5``; the loss is the mean over ``(t, g)`` of ``KL(P || Q)``.
:func:`msattn.reference.indexer_loss` is the exact definition this module matches.

As in fla-org/flash-linear-attention, the autograd function (:class:`IndexerLossFunction`) lives
beside the op it differentiates.

* Forward (``_indexer_loss_fwd_kernel``), query-outer: one program per (query token, group), the
  group's heads the rows of the teacher tile. Without ``lse`` a first pass over the token's blocks
  finds each head's normaliser (and stores it for the backward). The second pass keeps, online,
  the student log-normaliser ``L`` (running max and sum of exp), ``sum P log P``, ``sum P s`` and
  ``sum P``; the row's loss is ``sum P log P - sum P s + L sum P``.
* Backward (``_indexer_loss_bwd_kernel``), KV-outer: one program per (group, key block) and a
  range of the query rows that see the block (from the selection CSR of
  :mod:`msattn.ops.selection_csr`, or every causal row when dense). It recomputes ``P`` and ``Q``
  for the block, ``ds = Q sum(P) - P``, accumulates ``dki`` of the block's keys in the program
  over its rows (then one fp32 atomic add per program) and adds ``ds @ ki`` to ``dqi`` with fp32
  atomics. Why KV-outer rather than query-outer with ``dki`` atomics: query-outer would issue
  ``topk * bs * Di`` atomics per (token, group) (7e10 at 64K tokens in the M3 shape) onto a few
  hot blocks; KV-outer divides the ``dki`` atomics by the rows a program handles, and its ``dqi``
  atomics (``topk * Di`` per row) spread over distinct rows. The teacher recompute is the same
  either way.

No host synchronisation in forward or backward, except the dense variant's bound on the blocks of
a sequence when ``max_seqlen_k`` is not given (derived once, in the forward, by one ``.item()``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from msattn.ops.selection_csr import build_block_csr, row_positions
from msattn.ops.utils import dot_options, mma

_LOG2E = 1.4426950408889634
LOG2E = tl.constexpr(_LOG2E)
LN2 = tl.constexpr(0.6931471805599453)


@dataclass(frozen=True)
class IndexerLossConfig:
    """Launch configuration of the loss kernels.

    Attributes:
        forward_warps, forward_stages: the query-outer forward.
        block_e: query rows per backward tile (>= 16).
        tiles_per_program: backward tiles of one key block per program (the block's K and ki are
            loaded once for them, and its ``dki`` is added once).
        backward_warps, backward_stages: the KV-outer backward.
    """

    forward_warps: int = 4
    forward_stages: int = 2
    block_e: int = 64
    tiles_per_program: int = 4
    backward_warps: int = 8
    backward_stages: int = 1


# Not yet tuned on a GPU (first guesses for the M3 shape, bf16).
CUDA_CONFIG = IndexerLossConfig()
CUDA_FP32_CONFIG = IndexerLossConfig(block_e=32, tiles_per_program=8)
INTERPRETER_CONFIG = IndexerLossConfig(block_e=16, tiles_per_program=2, forward_stages=1)


def launch_config(qi: torch.Tensor) -> IndexerLossConfig:
    if not qi.is_cuda:
        return INTERPRETER_CONFIG
    return CUDA_FP32_CONFIG if qi.dtype == torch.float32 else CUDA_CONFIG


# One program: one query token x one group; the group's heads are the BLOCK_H rows of the teacher
# tile, the index query row 0 of a 16-row student tile. Grid: (total_q, G).
# q [total_q, H, D], k [total_k, G, D], qi [total_q, G, Di], ki [total_k, Di], indices
# [G, total_q, TOPK] (absent when DENSE: every causal block), lse [total_q, H] (when HAS_LSE).
# Writes row_loss, student_lse (natural log), teacher_mass (sum of P) [total_q, G] float32 and,
# without lse, the teacher's log-sum-exp teacher_lse [total_q, H] float32.
@triton.jit
def _indexer_loss_fwd_kernel(
        q_ptr, k_ptr, qi_ptr, ki_ptr, indices_ptr, lse_ptr, position_ptr, key_start_ptr,
        row_loss_ptr, student_lse_ptr, teacher_mass_ptr, teacher_lse_ptr,
        stride_q_token, stride_q_head, stride_k_token, stride_k_group, stride_qi_token,
        stride_qi_group, stride_ki_token, stride_indices_group, stride_indices_token,
        stride_lse_token, num_heads, num_groups, scale_log2, index_scale_log2,
        GROUP_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr, INDEX_DIM: tl.constexpr, BLOCK_DI: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, TOPK: tl.constexpr, DENSE: tl.constexpr,
        HAS_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    position = tl.load(position_ptr + token)
    key_start = tl.load(key_start_ptr + token).to(tl.int64)
    head_ids = tl.arange(0, BLOCK_H)
    heads = group * GROUP_SIZE + head_ids
    head_mask = head_ids < GROUP_SIZE
    dim = tl.arange(0, BLOCK_D)
    dim_mask = dim < HEAD_DIM
    idim = tl.arange(0, BLOCK_DI)
    idim_mask = idim < INDEX_DIM
    offs = tl.arange(0, BLOCK_SIZE)
    q = tl.load(q_ptr + token * stride_q_token + heads[:, None] * stride_q_head + dim[None, :],
                mask=head_mask[:, None] & dim_mask[None, :], other=0.0)
    # The index query as row 0 of a 16-row tile: its scores come from the tensor cores.
    qi_rows = tl.arange(0, 16)
    qi = tl.load(qi_ptr + token * stride_qi_token + group * stride_qi_group
                 + tl.zeros([16], tl.int64)[:, None] + idim[None, :],
                 mask=(qi_rows == 0)[:, None] & idim_mask[None, :], other=0.0)
    if DENSE:
        num_steps = position // BLOCK_SIZE + 1
        index_row = indices_ptr  # unused
    else:
        num_steps = TOPK
        index_row = indices_ptr + group * stride_indices_group + token * stride_indices_token

    # Masked loads rather than a branch per block (a -1 slot or a block after the query loads
    # nothing): the loop body has no control flow for the software pipeliner to stop at.
    if HAS_LSE:
        lse2 = tl.load(lse_ptr + token * stride_lse_token + heads, mask=head_mask,
                       other=0.0) * LOG2E
    else:  # first pass: each head's normaliser over the token's keys
        head_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
        head_sum = tl.zeros([BLOCK_H], tl.float32)
        for step in range(num_steps):
            if DENSE:
                block = step
            else:
                block = tl.load(index_row + step)
            key = block * BLOCK_SIZE + offs
            key_mask = (key >= 0) & (key <= position)  # a negative block id: keys < 0
            k = tl.load(k_ptr + (key_start + key)[:, None] * stride_k_token
                        + group * stride_k_group + dim[None, :],
                        mask=key_mask[:, None] & dim_mask[None, :], other=0.0)
            scores = mma(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST) * scale_log2
            scores = tl.where(key_mask[None, :], scores, float("-inf"))
            new_max = tl.maximum(head_max, tl.max(scores, axis=1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            head_sum = (head_sum * tl.exp2(head_max - safe_max)
                        + tl.sum(tl.exp2(scores - safe_max[:, None]), axis=1))
            head_max = new_max
        has_keys = head_sum > 0
        lse2 = tl.where(has_keys, head_max + tl.log2(tl.where(has_keys, head_sum, 1.0)),
                        float("-inf"))
        tl.store(teacher_lse_ptr + token * num_heads + heads, lse2 * LN2, mask=head_mask)

    student_max = tl.full([1], float("-inf"), tl.float32)
    student_sum = tl.zeros([1], tl.float32)
    p_log_p = tl.zeros([1], tl.float32)  # log2 units
    p_s = tl.zeros([1], tl.float32)  # log2 units
    mass = tl.zeros([1], tl.float32)
    for step in range(num_steps):
        if DENSE:
            block = step
        else:
            block = tl.load(index_row + step)
        key = block * BLOCK_SIZE + offs
        key_mask = (key >= 0) & (key <= position)
        k = tl.load(k_ptr + (key_start + key)[:, None] * stride_k_token
                    + group * stride_k_group + dim[None, :],
                    mask=key_mask[:, None] & dim_mask[None, :], other=0.0)
        ki = tl.load(ki_ptr + (key_start + key)[:, None] * stride_ki_token + idim[None, :],
                     mask=key_mask[:, None] & idim_mask[None, :], other=0.0)
        scores = mma(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST) * scale_log2
        p = tl.where(head_mask[:, None] & key_mask[None, :],
                     tl.exp2(scores - lse2[:, None]), 0.0)
        p = tl.sum(p, axis=0) / GROUP_SIZE  # [BLOCK_SIZE]
        s = tl.sum(mma(qi, tl.trans(ki), DOT_PRECISION, DOT_UPCAST), axis=0) * index_scale_log2
        p_s += tl.sum(tl.where(key_mask, p * s, 0.0), axis=0)
        s = tl.where(key_mask, s, float("-inf"))
        new_max = tl.maximum(student_max, tl.max(s, axis=0))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        student_sum = student_sum * tl.exp2(student_max - safe_max) + tl.sum(
            tl.exp2(s - safe_max), axis=0)
        student_max = new_max
        p_log_p += tl.sum(tl.where(p > 0, p * tl.log2(tl.where(p > 0, p, 1.0)), 0.0), axis=0)
        mass += tl.sum(p, axis=0)
    has_keys = student_sum > 0
    student_lse2 = tl.where(has_keys, student_max + tl.log2(tl.where(has_keys, student_sum, 1.0)),
                            0.0)
    loss = tl.where(has_keys, (p_log_p - p_s + student_lse2 * mass) * LN2, 0.0)
    out = token * num_groups + group + tl.arange(0, 1)
    tl.store(row_loss_ptr + out, loss)
    tl.store(student_lse_ptr + out, student_lse2 * LN2)
    tl.store(teacher_mass_ptr + out, mass)


# One program: one group x one key block x up to TILES_PER_PROGRAM tiles of BLOCK_E query rows that
# see the block. Sparse: the rows are the block's entries in the selection CSR (grid:
# (csr.max_programs,); programs past the real ones exit). DENSE: the rows are the block's
# sequence's queries at or after the block start (grid: (num_blocks, G, row splits)).
# q [total_q, H, D], k [total_k, G, D], qi [total_q, G, Di], ki [total_k, Di], teacher_lse
# [total_q, H], student_lse and teacher_mass [total_q, G] (float32, natural log).
# Adds (fp32 atomics) ds @ ki to dqi [total_q, G, Di] and ds^T @ qi to dki [total_k, Di], both
# float32 and without the factor grad * Di**-0.5 / (total_q * G), where ds = Q * sum(P) - P.
@triton.jit
def _indexer_loss_bwd_kernel(
        q_ptr, k_ptr, qi_ptr, ki_ptr, teacher_lse_ptr, student_lse_ptr, teacher_mass_ptr,
        dqi_ptr, dki_ptr,
        entries_ptr, bucket_start_ptr, program_start_ptr, program_bucket_ptr,
        block_key_start_ptr, block_position_ptr, block_num_keys_ptr, block_seq_ptr,
        row_position_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
        stride_q_token, stride_q_head, stride_k_token, stride_k_group, stride_qi_token,
        stride_qi_group, stride_ki_token, stride_lse_token,
        num_heads, num_groups, num_buckets, num_blocks, rows, scale_log2, index_scale_log2,
        GROUP_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        INDEX_DIM: tl.constexpr, BLOCK_DI: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        TOPK: tl.constexpr, BLOCK_E: tl.constexpr, TILES_PER_PROGRAM: tl.constexpr,
        DENSE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    rows_per_program = TILES_PER_PROGRAM * BLOCK_E
    if DENSE:
        block = tl.program_id(0)
        group = tl.program_id(1)
        seq = tl.load(block_seq_ptr + block)
        q_start = tl.load(cu_seqlens_q_ptr + seq)
        len_q = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
        len_k = tl.load(cu_seqlens_k_ptr + seq + 1) - tl.load(cu_seqlens_k_ptr + seq)
        # First query row of the sequence that sees the block (position >= block start).
        first = tl.maximum(tl.load(block_position_ptr + block) - (len_k - len_q), 0)
        row_from = first + tl.program_id(2) * rows_per_program
        row_to = tl.minimum(row_from + rows_per_program, len_q)
        active = tl.load(block_num_keys_ptr + block) > 0
        entry_start = 0
        entry_end = 0
    else:
        pid = tl.program_id(0)
        active = pid < tl.load(program_start_ptr + num_buckets)
        bucket = tl.load(program_bucket_ptr + pid)
        group = bucket // num_blocks
        block = bucket % num_blocks
        entry_start = tl.load(bucket_start_ptr + bucket, mask=active, other=0)
        entry_end = tl.load(bucket_start_ptr + bucket + 1, mask=active, other=0)
        row_from = (pid - tl.load(program_start_ptr + bucket, mask=active, other=0)) * rows_per_program
        row_to = tl.minimum(row_from + rows_per_program, entry_end - entry_start)
        q_start = 0
        len_q = 0
        len_k = 0
    if active:
        key_start = tl.load(block_key_start_ptr + block).to(tl.int64)
        key_position = tl.load(block_position_ptr + block)
        num_keys = tl.load(block_num_keys_ptr + block)
        dim = tl.arange(0, BLOCK_D)
        dim_mask = dim < HEAD_DIM
        idim = tl.arange(0, BLOCK_DI)
        idim_mask = idim < INDEX_DIM
        offs = tl.arange(0, BLOCK_SIZE)
        key_mask = offs < num_keys
        keys = key_start + offs
        k = tl.load(k_ptr + keys[:, None] * stride_k_token + group * stride_k_group + dim[None, :],
                    mask=key_mask[:, None] & dim_mask[None, :], other=0.0)
        ki = tl.load(ki_ptr + keys[:, None] * stride_ki_token + idim[None, :],
                     mask=key_mask[:, None] & idim_mask[None, :], other=0.0)
        k_t = tl.trans(k)
        ki_t = tl.trans(ki)
        dki = tl.zeros([BLOCK_SIZE, BLOCK_DI], tl.float32)
        for tile_row in range(row_from, row_to, BLOCK_E):
            r = tile_row + tl.arange(0, BLOCK_E)
            row_mask = r < row_to
            if DENSE:
                token = (q_start + r).to(tl.int64)
                position = len_k - len_q + r
            else:
                entry = tl.load(entries_ptr + entry_start + r, mask=row_mask, other=0)
                token = ((entry // TOPK) % rows).to(tl.int64)
                position = tl.load(row_position_ptr + token, mask=row_mask, other=-1)
            visible = (row_mask[:, None] & key_mask[None, :]
                       & ((key_position + offs)[None, :] <= position[:, None]))
            p = tl.zeros([BLOCK_E, BLOCK_SIZE], tl.float32)
            for h in range(GROUP_SIZE):
                head = group * GROUP_SIZE + h
                q = tl.load(q_ptr + token[:, None] * stride_q_token + head * stride_q_head
                            + dim[None, :], mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
                scores = mma(q, k_t, DOT_PRECISION, DOT_UPCAST) * scale_log2
                lse2 = tl.load(teacher_lse_ptr + token * stride_lse_token + head, mask=row_mask,
                               other=0.0) * LOG2E
                p += tl.where(visible, tl.exp2(scores - lse2[:, None]), 0.0)
            p = p / GROUP_SIZE
            row = token * num_groups + group
            qi = tl.load(qi_ptr + token[:, None] * stride_qi_token + group * stride_qi_group
                         + idim[None, :], mask=row_mask[:, None] & idim_mask[None, :], other=0.0)
            s = mma(qi, ki_t, DOT_PRECISION, DOT_UPCAST) * index_scale_log2
            student_lse2 = tl.load(student_lse_ptr + row, mask=row_mask, other=0.0) * LOG2E
            mass = tl.load(teacher_mass_ptr + row, mask=row_mask, other=0.0)
            ds = tl.where(visible, tl.exp2(s - student_lse2[:, None]) * mass[:, None] - p, 0.0)
            dqi = mma(ds.to(ki.dtype), ki, DOT_PRECISION, DOT_UPCAST)
            tl.atomic_add(dqi_ptr + row[:, None] * INDEX_DIM + idim[None, :], dqi,
                          mask=row_mask[:, None] & idim_mask[None, :], sem="relaxed")
            dki += mma(tl.trans(ds.to(qi.dtype)), qi, DOT_PRECISION, DOT_UPCAST)
        tl.atomic_add(dki_ptr + keys[:, None] * INDEX_DIM + idim[None, :], dki,
                      mask=key_mask[:, None] & idim_mask[None, :], sem="relaxed")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _dims(q: torch.Tensor, k: torch.Tensor, qi: torch.Tensor) -> dict:
    num_heads, head_dim = q.shape[1:]
    num_groups = k.shape[1]
    index_dim = qi.shape[-1]
    return dict(GROUP_SIZE=num_heads // num_groups, HEAD_DIM=head_dim,
                BLOCK_D=max(16, triton.next_power_of_2(head_dim)), INDEX_DIM=index_dim,
                BLOCK_DI=max(16, triton.next_power_of_2(index_dim)))


def indexer_loss_rows(q: torch.Tensor, k: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor,
                      indices: torch.Tensor | None, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, *, block_size: int, softmax_scale: float,
                      lse: torch.Tensor | None = None, config: IndexerLossConfig | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward kernel: per (token, group) terms of the loss (no autograd).

    Returns ``(row_loss, student_lse, teacher_mass, teacher_lse)``: ``[total_q, G]`` float32
    ``KL(P || Q)``, the student's log-normaliser and ``sum(P)`` of every row, and the teacher
    log-sum-exp ``[total_q, H]`` float32 (``lse`` itself when given). The loss is
    ``row_loss.sum() / (total_q * G)``.
    """
    total_q, num_heads, _ = q.shape
    num_groups = k.shape[1]
    config = config or launch_config(qi)
    q, k, qi, ki = (_last_dim_contiguous(t) for t in (q, k, qi, ki))
    dense = indices is None
    if not dense:
        indices = _last_dim_contiguous(indices)
    device = qi.device
    row_loss = torch.empty(total_q, num_groups, dtype=torch.float32, device=device)
    student_lse = torch.empty_like(row_loss)
    teacher_mass = torch.empty_like(row_loss)
    if lse is None:
        teacher_lse = torch.empty(total_q, num_heads, dtype=torch.float32, device=device)
    else:
        teacher_lse = _last_dim_contiguous(lse.float())
    if total_q == 0:
        return row_loss, student_lse, teacher_mass, teacher_lse
    position = row_positions(cu_seqlens_q, cu_seqlens_k, 0, total_q)
    seq = torch.searchsorted(cu_seqlens_q[1:], torch.arange(total_q, device=device),
                             right=True).clamp_max(cu_seqlens_q.numel() - 2)
    key_start = cu_seqlens_k[seq].to(torch.int32)
    dims = _dims(q, k, qi)
    _indexer_loss_fwd_kernel[(total_q, num_groups)](
        q_ptr=q, k_ptr=k, qi_ptr=qi, ki_ptr=ki, indices_ptr=indices,
        lse_ptr=None if lse is None else teacher_lse, position_ptr=position.to(torch.int32),
        key_start_ptr=key_start, row_loss_ptr=row_loss, student_lse_ptr=student_lse,
        teacher_mass_ptr=teacher_mass, teacher_lse_ptr=teacher_lse if lse is None else None,
        stride_q_token=q.stride(0), stride_q_head=q.stride(1), stride_k_token=k.stride(0),
        stride_k_group=k.stride(1), stride_qi_token=qi.stride(0), stride_qi_group=qi.stride(1),
        stride_ki_token=ki.stride(0),
        stride_indices_group=0 if dense else indices.stride(0),
        stride_indices_token=0 if dense else indices.stride(1),
        stride_lse_token=teacher_lse.stride(0), num_heads=num_heads, num_groups=num_groups,
        scale_log2=softmax_scale * _LOG2E,
        index_scale_log2=qi.shape[-1] ** -0.5 * _LOG2E,
        BLOCK_H=max(16, triton.next_power_of_2(dims["GROUP_SIZE"])), BLOCK_SIZE=block_size,
        TOPK=1 if dense else indices.shape[-1], DENSE=dense, HAS_LSE=lse is not None,
        **dims, **dot_options(qi.dtype), num_warps=config.forward_warps,
        num_stages=config.forward_stages)
    return row_loss, student_lse, teacher_mass, teacher_lse


def _dense_key_blocks(cu_seqlens_k: torch.Tensor, *, block_size: int, total_k: int):
    """Global key blocks (all sequences one after another, as in the selection CSR):
    ``(key_start, position, num_keys, seq)`` int32 ``[num_blocks]`` and ``num_blocks``, a host
    bound (``total_k // block_size + B``; unused ids have no keys)."""
    device = cu_seqlens_k.device
    batch = cu_seqlens_k.numel() - 1
    num_blocks = total_k // block_size + batch
    len_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    block_offset = torch.zeros(batch + 1, dtype=torch.int64, device=device)
    torch.cumsum((len_k + block_size - 1) // block_size, 0, out=block_offset[1:])
    global_block = torch.arange(num_blocks, device=device)
    seq = torch.searchsorted(block_offset[1:], global_block, right=True).clamp_max(batch - 1)
    position = (global_block - block_offset[seq]) * block_size
    num_keys = (len_k[seq] - position).clamp(0, block_size)
    num_keys = torch.where(global_block < block_offset[-1], num_keys, 0)
    key_start = cu_seqlens_k[seq].long() + position
    return (key_start.to(torch.int32), position.to(torch.int32), num_keys.to(torch.int32),
            seq.to(torch.int32), num_blocks)


def indexer_loss_grads(q: torch.Tensor, k: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor,
                       indices: torch.Tensor | None, cu_seqlens_q: torch.Tensor,
                       cu_seqlens_k: torch.Tensor, teacher_lse: torch.Tensor,
                       student_lse: torch.Tensor, teacher_mass: torch.Tensor,
                       grad: torch.Tensor, *, block_size: int, softmax_scale: float,
                       max_seqlen_k: int | None = None, config: IndexerLossConfig | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward kernel: ``(dqi, dki)`` in the dtypes of qi, ki for the upstream gradient
    ``grad`` (0-d tensor) of the loss, from the forward's ``teacher_lse``, ``student_lse``,
    ``teacher_mass`` (see :func:`indexer_loss_rows`). Dense needs ``max_seqlen_k``."""
    total_q, num_heads, _ = q.shape
    num_groups = k.shape[1]
    total_k = k.shape[0]
    config = config or launch_config(qi)
    q, k, qi, ki = (_last_dim_contiguous(t) for t in (q, k, qi, ki))
    dense = indices is None
    device = qi.device
    dqi = torch.zeros(total_q, num_groups, qi.shape[-1], dtype=torch.float32, device=device)
    dki = torch.zeros(total_k, ki.shape[-1], dtype=torch.float32, device=device)
    if total_q > 0 and total_k > 0:
        rows_per_program = config.block_e * config.tiles_per_program
        common = dict(
            q_ptr=q, k_ptr=k, qi_ptr=qi, ki_ptr=ki, teacher_lse_ptr=teacher_lse,
            student_lse_ptr=student_lse, teacher_mass_ptr=teacher_mass, dqi_ptr=dqi,
            dki_ptr=dki, stride_q_token=q.stride(0), stride_q_head=q.stride(1),
            stride_k_token=k.stride(0), stride_k_group=k.stride(1),
            stride_qi_token=qi.stride(0), stride_qi_group=qi.stride(1),
            stride_ki_token=ki.stride(0), stride_lse_token=teacher_lse.stride(0),
            num_heads=num_heads, num_groups=num_groups, rows=total_q,
            scale_log2=softmax_scale * _LOG2E,
            index_scale_log2=qi.shape[-1] ** -0.5 * _LOG2E, BLOCK_SIZE=block_size,
            BLOCK_E=config.block_e, TILES_PER_PROGRAM=config.tiles_per_program, DENSE=dense,
            **_dims(q, k, qi), **dot_options(qi.dtype), num_warps=config.backward_warps,
            num_stages=config.backward_stages)
        if dense:
            if max_seqlen_k is None:
                raise ValueError("the dense indexer-loss backward needs max_seqlen_k")
            key_start, position, num_keys, block_seq, num_blocks = _dense_key_blocks(
                cu_seqlens_k, block_size=block_size, total_k=total_k)
            grid = (num_blocks, num_groups, triton.cdiv(max(max_seqlen_k, 1), rows_per_program))
            _indexer_loss_bwd_kernel[grid](
                entries_ptr=None, bucket_start_ptr=None, program_start_ptr=None,
                program_bucket_ptr=None, block_key_start_ptr=key_start,
                block_position_ptr=position, block_num_keys_ptr=num_keys,
                block_seq_ptr=block_seq, row_position_ptr=None, cu_seqlens_q_ptr=cu_seqlens_q,
                cu_seqlens_k_ptr=cu_seqlens_k, num_buckets=0, num_blocks=num_blocks, TOPK=1,
                **common)
        else:
            indices = _last_dim_contiguous(indices)
            csr = build_block_csr(indices, cu_seqlens_q, cu_seqlens_k, block_size=block_size,
                                  total_k=total_k, row_start=0, row_end=total_q, group_size=1,
                                  block_m=config.block_e,
                                  tiles_per_program=config.tiles_per_program)
            _indexer_loss_bwd_kernel[(csr.max_programs,)](
                entries_ptr=csr.entries, bucket_start_ptr=csr.bucket_start,
                program_start_ptr=csr.program_start, program_bucket_ptr=csr.program_bucket,
                block_key_start_ptr=csr.block_key_start, block_position_ptr=csr.block_position,
                block_num_keys_ptr=csr.block_num_keys, block_seq_ptr=None,
                row_position_ptr=csr.row_position, cu_seqlens_q_ptr=None, cu_seqlens_k_ptr=None,
                num_buckets=num_groups * csr.num_blocks, num_blocks=csr.num_blocks,
                TOPK=indices.shape[-1], **common)
    factor = grad.float() * (qi.shape[-1] ** -0.5 / max(total_q * num_groups, 1))
    return (dqi * factor).to(qi.dtype), (dki * factor).to(ki.dtype)


class IndexerLossFunction(torch.autograd.Function):
    """Autograd of the indexer loss: gradients to ``qi`` and ``ki`` only (the teacher is a
    constant; q, k and lse get None)."""

    @staticmethod
    def forward(ctx, qi, ki, q, k, indices, cu_seqlens_q, cu_seqlens_k, block_size,
                softmax_scale, lse, max_seqlen_k, config):
        row_loss, student_lse, teacher_mass, teacher_lse = indexer_loss_rows(
            q, k, qi, ki, indices, cu_seqlens_q, cu_seqlens_k, block_size=block_size,
            softmax_scale=softmax_scale, lse=lse, config=config)
        if indices is None and max_seqlen_k is None and ctx.needs_input_grad[:2] != (False, False):
            # Host synchronisation: the dense backward's grid needs a bound on a sequence's keys.
            max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max().item()) if \
                cu_seqlens_k.numel() > 1 else 0
        ctx.save_for_backward(q, k, qi, ki, indices, cu_seqlens_q, cu_seqlens_k, teacher_lse,
                              student_lse, teacher_mass)
        ctx.block_size, ctx.softmax_scale = block_size, softmax_scale
        ctx.max_seqlen_k, ctx.config = max_seqlen_k, config
        return row_loss.sum() / max(row_loss.numel(), 1)

    @staticmethod
    def backward(ctx, grad):
        (q, k, qi, ki, indices, cu_seqlens_q, cu_seqlens_k, teacher_lse, student_lse,
         teacher_mass) = ctx.saved_tensors
        dqi, dki = indexer_loss_grads(
            q, k, qi, ki, indices, cu_seqlens_q, cu_seqlens_k, teacher_lse, student_lse,
            teacher_mass, grad, block_size=ctx.block_size, softmax_scale=ctx.softmax_scale,
            max_seqlen_k=ctx.max_seqlen_k, config=ctx.config)
        return (dqi, dki) + (None,) * 10


def indexer_loss(q: torch.Tensor, k: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor,
                 indices: torch.Tensor | None, cu_seqlens_q: torch.Tensor,
                 cu_seqlens_k: torch.Tensor, *, block_size: int, softmax_scale: float,
                 lse: torch.Tensor | None = None, max_seqlen_k: int | None = None,
                 config: IndexerLossConfig | None = None) -> torch.Tensor:
    """Triton version of :func:`msattn.reference.indexer_loss` (same arguments and result).

    Args:
        q: ``[total_q, H, D]``; k: ``[total_k, G, D]``; qi: ``[total_q, G, Di]``;
            ki: ``[total_k, Di]`` (fp16/bf16/fp32, last dims contiguous or copied).
        indices: ``[G, total_q, topk]`` int32 (block ids relative to the sequence, distinct per
            row, ``-1`` padding), or None for the dense warm-up (every causal key).
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]``.
        lse: optional ``[total_q, H]`` float32 log-sum-exp of the main branch over the same keys
            (saves the forward's normaliser pass).
        max_seqlen_k: the longest sequence's keys, for the dense backward's grid; when None (and
            dense, with grad) it is derived in the forward by one host synchronisation.
        config: launch configuration instead of :func:`launch_config`'s.
    Returns:
        0-d float32 loss; differentiable in ``qi`` and ``ki`` (q, k get no gradient).
    """
    return IndexerLossFunction.apply(qi, ki, q, k, indices, cu_seqlens_q, cu_seqlens_k,
                                     block_size, softmax_scale, lse, max_seqlen_k, config)
