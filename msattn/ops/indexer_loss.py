"""KL-distillation loss of the MSA index branch: Triton kernels, launchers and autograd.

For query token ``t`` and group ``g`` over the key set ``J(t, g)`` (the causal keys of the selected
blocks, or every causal key for the dense warm-up), the teacher ``P`` is the main branch's
attention averaged over the heads of the group (a constant) and the student ``Q`` the softmax of
the index scores ``qi . ki * Di**-0.5``; the loss is the mean over ``(t, g)`` of ``KL(P || Q)``.
:func:`msattn.reference.indexer_loss` is the exact definition this module matches.

As in fla-org/flash-linear-attention, the autograd function (:class:`IndexerLossFunction`) lives
beside the op it differentiates.

* With a selection, KV-outer (``_indexer_loss_kv_kernel``): one program per (group, key block)
  and a range of the entries that chose the block (the selection CSR of
  :mod:`msattn.ops.selection_csr`); the block's ``k`` and ``ki`` stay on chip while the entries'
  rows stream past. One pass recomputes the teacher ``P`` (heads looped, from the main branch's
  LSE) and the index scores ``s``, and adds each row's ``sum P log P``, ``sum P s``, ``sum P``
  (fp32 atomics), stores each entry's partial student normaliser (max and sum of exp over the
  block) and, when gradients are wanted, adds the ``-P`` part of ``ds = Q sum(P) - P`` to
  ``dqi`` (atomics) and ``dki`` (accumulated over the program's rows, one atomic add). The rows'
  student log-normalisers ``L`` come from their entries' partials; the loss of a row is
  ``sum P log P - sum P s + L sum P``. A second, student-only pass (no ``k``, no heads) adds the
  ``Q sum(P)`` part. The backward only scales the float32 gradients by the upstream gradient.
  Without ``lse`` a query-outer pass (``_indexer_loss_fwd_kernel``, ``LSE_ONLY``) first finds
  each head's normaliser over the token's selected keys.
* Dense warm-up: the query-outer ``_indexer_loss_fwd_kernel`` (one program per (query token,
  group), the group's heads the rows of the teacher tile; without ``lse`` a first pass finds
  each head's normaliser) keeps, online, ``L``, ``sum P log P``, ``sum P s`` and ``sum P``; the
  backward runs the KV-outer kernel over every causal (row, block) pair with ``ds`` whole.
  Why KV-outer for the gradients: query-outer would issue ``topk * bs * Di`` ``dki`` atomics
  per (token, group) (7e10 at 64K tokens in the M3 shape) onto a few hot blocks; KV-outer
  divides them by the rows a program handles, and its ``dqi`` atomics (``topk * Di`` per row)
  spread over distinct rows. Why KV-outer for the selected forward too: query-outer reloads a
  block's ``k`` for every token that chose it (0.5 TB of cache traffic at 128K).

No host synchronisation in forward or backward, except the dense variant's bound on the blocks of
a sequence when ``max_seqlen_k`` is not given (derived once, in the forward, by one ``.item()``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from msattn.ops.selection_csr import BlockCSR, build_block_csr, row_positions
from msattn.ops.utils import (cdiv, dot_options, mma, next_power_of_2)

_LOG2E = 1.4426950408889634
LOG2E = tl.constexpr(_LOG2E)
LN2 = tl.constexpr(0.6931471805599453)


@dataclass(frozen=True)
class IndexerLossConfig:
    """Launch configuration of the loss kernels.

    Attributes:
        forward_warps, forward_stages: the query-outer kernel (dense warm-up, teacher LSE).
        block_e: query rows per KV-outer tile (>= 16).
        tiles_per_program: KV-outer tiles of one key block per program (the block's K and ki
            are loaded once for them, and its ``dki`` is added once).
        backward_warps, backward_stages: the KV-outer kernel.
    """

    forward_warps: int = 4
    forward_stages: int = 2
    block_e: int = 64
    tiles_per_program: int = 4
    backward_warps: int = 8
    backward_stages: int = 1


# Tuned on an H200 at 128K, M3 shape, bf16 (benchmarks/results/tuning/tune-loss_*.json).
CUDA_CONFIG = IndexerLossConfig(backward_stages=2)
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
# without lse, the teacher's log-sum-exp teacher_lse [total_q, H] float32 (LSE_ONLY: that alone).
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
        HAS_LSE: tl.constexpr, LSE_ONLY: tl.constexpr, DOT_PRECISION: tl.constexpr,
        DOT_UPCAST: tl.constexpr):
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
        index_row = indices_ptr + group.to(tl.int64) * stride_indices_group + token * stride_indices_token

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

    if not LSE_ONLY:  # second pass: the loss terms of the row
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
# [total_q, H] (natural log). What it computes over the (row, key) tile, with P the teacher
# (TEACHER: recomputed from q, k, teacher_lse) and Q the student (STUDENT: exp of the index
# scores minus student_lse, times teacher_mass, both float32 [total_q, G]):
# * TERMS: adds sum P log2 P, sum P s2, sum P (s2: index scores in log2 units) into row_terms
#   float32 [3, total_q * G], and stores each entry's max of s2 and sum of exp2(s2 - max) at the
#   entry's id in entry_max, entry_sum float32 [G * total_q * TOPK].
# * GRAD: with ds = mass * Q - P (the terms present), adds ds @ ki to dqi [total_q, G, Di] and
#   ds^T @ qi to dki [total_k, Di] (float32 atomics; without the factor grad * Di**-0.5 / rows).
@triton.jit
def _indexer_loss_kv_kernel(
        q_ptr, k_ptr, qi_ptr, ki_ptr, teacher_lse_ptr, student_lse_ptr, teacher_mass_ptr,
        dqi_ptr, dki_ptr, row_terms_ptr, entry_max_ptr, entry_sum_ptr,
        entries_ptr, bucket_start_ptr, program_start_ptr, program_bucket_ptr,
        block_key_start_ptr, block_position_ptr, block_num_keys_ptr, block_seq_ptr,
        row_position_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
        stride_q_token, stride_q_head, stride_k_token, stride_k_group, stride_qi_token,
        stride_qi_group, stride_ki_token, stride_lse_token,
        num_heads, num_groups, num_buckets, num_blocks, rows, scale_log2, index_scale_log2,
        GROUP_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        INDEX_DIM: tl.constexpr, BLOCK_DI: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        TOPK: tl.constexpr, BLOCK_E: tl.constexpr, TILES_PER_PROGRAM: tl.constexpr,
        DENSE: tl.constexpr, TEACHER: tl.constexpr, STUDENT: tl.constexpr, TERMS: tl.constexpr,
        GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
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
        ki = tl.load(ki_ptr + keys[:, None] * stride_ki_token + idim[None, :],
                     mask=key_mask[:, None] & idim_mask[None, :], other=0.0)
        ki_t = tl.trans(ki)
        if TEACHER:
            k_t = tl.trans(tl.load(k_ptr + keys[:, None] * stride_k_token + group * stride_k_group
                                   + dim[None, :], mask=key_mask[:, None] & dim_mask[None, :],
                                   other=0.0))
        dki = tl.zeros([BLOCK_SIZE, BLOCK_DI], tl.float32)
        for tile_row in range(row_from, row_to, BLOCK_E):
            r = tile_row + tl.arange(0, BLOCK_E)
            row_mask = r < row_to
            if DENSE:
                token = (q_start + r).to(tl.int64)
                position = len_k - len_q + r
                entry = r  # unused
            else:
                entry = tl.load(entries_ptr + entry_start + r, mask=row_mask, other=0)
                token = ((entry // TOPK) % rows).to(tl.int64)
                position = tl.load(row_position_ptr + token, mask=row_mask, other=-1)
            visible = (row_mask[:, None] & key_mask[None, :]
                       & ((key_position + offs)[None, :] <= position[:, None]))
            row = token * num_groups + group
            qi = tl.load(qi_ptr + token[:, None] * stride_qi_token + group * stride_qi_group
                         + idim[None, :], mask=row_mask[:, None] & idim_mask[None, :], other=0.0)
            s = mma(qi, ki_t, DOT_PRECISION, DOT_UPCAST) * index_scale_log2
            ds = tl.zeros([BLOCK_E, BLOCK_SIZE], tl.float32)
            if TEACHER:
                p = tl.zeros([BLOCK_E, BLOCK_SIZE], tl.float32)
                for h in range(GROUP_SIZE):
                    head = group * GROUP_SIZE + h
                    q = tl.load(q_ptr + token[:, None] * stride_q_token + head * stride_q_head
                                + dim[None, :], mask=row_mask[:, None] & dim_mask[None, :],
                                other=0.0)
                    scores = mma(q, k_t, DOT_PRECISION, DOT_UPCAST) * scale_log2
                    lse2 = tl.load(teacher_lse_ptr + token * stride_lse_token + head,
                                   mask=row_mask, other=0.0) * LOG2E
                    p += tl.where(visible, tl.exp2(scores - lse2[:, None]), 0.0)
                p = p / GROUP_SIZE
                ds -= p
                if TERMS:
                    p_log_p = tl.sum(tl.where(p > 0, p * tl.log2(tl.where(p > 0, p, 1.0)), 0.0), axis=1)
                    tl.atomic_add(row_terms_ptr + row, p_log_p, mask=row_mask, sem="relaxed")
                    tl.atomic_add(row_terms_ptr + rows * num_groups + row, tl.sum(p * s, axis=1),
                                  mask=row_mask, sem="relaxed")
                    tl.atomic_add(row_terms_ptr + 2 * rows * num_groups + row, tl.sum(p, axis=1),
                                  mask=row_mask, sem="relaxed")
            if TERMS:  # the entry's partial log-normaliser of the student (a valid entry sees a key)
                s_max = tl.max(tl.where(visible, s, float("-inf")), axis=1)
                s_sum = tl.sum(tl.where(visible, tl.exp2(s - s_max[:, None]), 0.0), axis=1)
                tl.store(entry_max_ptr + entry, s_max, mask=row_mask)
                tl.store(entry_sum_ptr + entry, s_sum, mask=row_mask)
            if STUDENT:
                student_lse2 = tl.load(student_lse_ptr + row, mask=row_mask, other=0.0) * LOG2E
                mass = tl.load(teacher_mass_ptr + row, mask=row_mask, other=0.0)
                ds += tl.where(visible, tl.exp2(s - student_lse2[:, None]) * mass[:, None], 0.0)
            if GRAD:
                dqi = mma(ds.to(ki.dtype), ki, DOT_PRECISION, DOT_UPCAST)
                tl.atomic_add(dqi_ptr + row[:, None] * INDEX_DIM + idim[None, :], dqi,
                              mask=row_mask[:, None] & idim_mask[None, :], sem="relaxed")
                dki += mma(tl.trans(ds.to(qi.dtype)), qi, DOT_PRECISION, DOT_UPCAST)
        if GRAD:
            tl.atomic_add(dki_ptr + keys[:, None] * INDEX_DIM + idim[None, :], dki,
                          mask=key_mask[:, None] & idim_mask[None, :], sem="relaxed")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _dims(q: torch.Tensor, k: torch.Tensor, qi: torch.Tensor) -> dict:
    num_heads, head_dim = q.shape[1:]
    num_groups = k.shape[1]
    index_dim = qi.shape[-1]
    return dict(GROUP_SIZE=num_heads // num_groups, HEAD_DIM=head_dim,
                BLOCK_D=max(16, next_power_of_2(head_dim)), INDEX_DIM=index_dim,
                BLOCK_DI=max(16, next_power_of_2(index_dim)))


def _teacher_rows(q: torch.Tensor, k: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor,
                  indices: torch.Tensor | None, cu_seqlens_q: torch.Tensor,
                  cu_seqlens_k: torch.Tensor, *, block_size: int, softmax_scale: float,
                  lse: torch.Tensor | None, lse_only: bool, config: IndexerLossConfig):
    """The query-outer kernel: ``(row_loss, student_lse, teacher_mass, teacher_lse)`` (see the
    kernel), or with ``lse_only`` the teacher's log-sum-exp ``[total_q, H]`` float32 alone."""
    total_q, num_heads, _ = q.shape
    num_groups = k.shape[1]
    device = qi.device
    dense = indices is None
    row_loss = torch.empty(total_q, num_groups, dtype=torch.float32, device=device)
    student_lse = torch.empty_like(row_loss)
    teacher_mass = torch.empty_like(row_loss)
    if lse is None:
        teacher_lse = torch.empty(total_q, num_heads, dtype=torch.float32, device=device)
    else:
        teacher_lse = _last_dim_contiguous(lse.float())
    if total_q > 0:
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
            stride_k_group=k.stride(1), stride_qi_token=qi.stride(0),
            stride_qi_group=qi.stride(1), stride_ki_token=ki.stride(0),
            stride_indices_group=0 if dense else indices.stride(0),
            stride_indices_token=0 if dense else indices.stride(1),
            stride_lse_token=teacher_lse.stride(0), num_heads=num_heads, num_groups=num_groups,
            scale_log2=softmax_scale * _LOG2E,
            index_scale_log2=qi.shape[-1] ** -0.5 * _LOG2E,
            BLOCK_H=max(16, next_power_of_2(dims["GROUP_SIZE"])), BLOCK_SIZE=block_size,
            TOPK=1 if dense else indices.shape[-1], DENSE=dense, HAS_LSE=lse is not None,
            LSE_ONLY=lse_only, **dims, **dot_options(qi.dtype), num_warps=config.forward_warps,
            num_stages=config.forward_stages)
    if lse_only:
        return teacher_lse
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


def _launch_kv(q, k, qi, ki, *, csr: BlockCSR | None, cu_seqlens_q, cu_seqlens_k, topk: int,
               max_seqlen_k: int | None, block_size: int, softmax_scale: float,
               config: IndexerLossConfig, teacher_lse=None, student_lse=None,
               teacher_mass=None, dqi=None, dki=None, row_terms=None, entry_max=None,
               entry_sum=None) -> None:
    """One launch of ``_indexer_loss_kv_kernel`` over the rows of ``csr`` (sparse) or every
    causal (row, block) pair (``csr=None``: dense, needs ``max_seqlen_k``). The terms computed
    follow from the buffers given: TEACHER with ``teacher_lse``, STUDENT with ``student_lse``
    and ``teacher_mass``, GRAD with ``dqi``/``dki``, TERMS with ``row_terms``."""
    num_heads = q.shape[1]
    total_k, num_groups = k.shape[:2]
    rows_per_program = config.block_e * config.tiles_per_program
    common = dict(
        q_ptr=q, k_ptr=k, qi_ptr=qi, ki_ptr=ki, teacher_lse_ptr=teacher_lse,
        student_lse_ptr=student_lse, teacher_mass_ptr=teacher_mass, dqi_ptr=dqi, dki_ptr=dki,
        row_terms_ptr=row_terms, entry_max_ptr=entry_max, entry_sum_ptr=entry_sum,
        stride_q_token=q.stride(0), stride_q_head=q.stride(1), stride_k_token=k.stride(0),
        stride_k_group=k.stride(1), stride_qi_token=qi.stride(0), stride_qi_group=qi.stride(1),
        stride_ki_token=ki.stride(0),
        stride_lse_token=0 if teacher_lse is None else teacher_lse.stride(0),
        num_heads=num_heads, num_groups=num_groups, rows=q.shape[0],
        scale_log2=softmax_scale * _LOG2E, index_scale_log2=qi.shape[-1] ** -0.5 * _LOG2E,
        BLOCK_SIZE=block_size, BLOCK_E=config.block_e, TOPK=topk,
        TILES_PER_PROGRAM=config.tiles_per_program, DENSE=csr is None,
        TEACHER=teacher_lse is not None, STUDENT=student_lse is not None,
        TERMS=row_terms is not None, GRAD=dqi is not None, **_dims(q, k, qi),
        **dot_options(qi.dtype), num_warps=config.backward_warps,
        num_stages=config.backward_stages)
    if csr is None:
        if max_seqlen_k is None:
            raise ValueError("the dense indexer-loss backward needs max_seqlen_k")
        key_start, position, num_keys, block_seq, num_blocks = _dense_key_blocks(
            cu_seqlens_k, block_size=block_size, total_k=total_k)
        grid = (num_blocks, num_groups, cdiv(max(max_seqlen_k, 1), rows_per_program))
        _indexer_loss_kv_kernel[grid](
            entries_ptr=None, bucket_start_ptr=None, program_start_ptr=None,
            program_bucket_ptr=None, block_key_start_ptr=key_start, block_position_ptr=position,
            block_num_keys_ptr=num_keys, block_seq_ptr=block_seq, row_position_ptr=None,
            cu_seqlens_q_ptr=cu_seqlens_q, cu_seqlens_k_ptr=cu_seqlens_k, num_buckets=0,
            num_blocks=num_blocks, **common)
    else:
        _indexer_loss_kv_kernel[(csr.max_programs,)](
            entries_ptr=csr.entries, bucket_start_ptr=csr.bucket_start,
            program_start_ptr=csr.program_start, program_bucket_ptr=csr.program_bucket,
            block_key_start_ptr=csr.block_key_start, block_position_ptr=csr.block_position,
            block_num_keys_ptr=csr.block_num_keys, block_seq_ptr=None,
            row_position_ptr=csr.row_position, cu_seqlens_q_ptr=None, cu_seqlens_k_ptr=None,
            num_buckets=num_groups * csr.num_blocks, num_blocks=csr.num_blocks, **common)


def _sparse_rows(q, k, qi, ki, indices, cu_seqlens_q, cu_seqlens_k, *, block_size: int,
                 softmax_scale: float, lse: torch.Tensor | None, with_grad: bool,
                 config: IndexerLossConfig):
    """The selected-blocks loss, KV-outer: ``(row_loss [total_q, G], dqi, dki)`` float32, the
    gradients unscaled (see ``_indexer_loss_kv_kernel``) or None without ``with_grad``.

    1. (without ``lse``) the teacher's log-sum-exp, query-outer;
    2. one KV-outer pass: the teacher's terms of every row, each entry's partial student
       normaliser and, with grad, the ``-P`` part of the gradients;
    3. the rows' student log-normalisers from their entries' partials (torch);
    4. with grad, a second, student-only KV-outer pass adds the ``sum(P) * Q`` part.
    """
    total_q, num_groups = qi.shape[:2]
    device = qi.device
    topk = indices.shape[-1]
    if lse is None:
        teacher_lse = _teacher_rows(q, k, qi, ki, indices, cu_seqlens_q, cu_seqlens_k,
                                    block_size=block_size, softmax_scale=softmax_scale, lse=None,
                                    lse_only=True, config=config)
    else:
        teacher_lse = _last_dim_contiguous(lse.float())
    csr = build_block_csr(indices, cu_seqlens_q, cu_seqlens_k, block_size=block_size,
                          total_k=k.shape[0], row_start=0, row_end=total_q, group_size=1,
                          block_m=config.block_e, tiles_per_program=config.tiles_per_program)
    row_terms = torch.zeros(3, total_q, num_groups, dtype=torch.float32, device=device)
    entry_max = torch.full((num_groups, total_q, topk), float("-inf"), dtype=torch.float32,
                           device=device)
    entry_sum = torch.zeros_like(entry_max)
    dqi = dki = None
    if with_grad:
        dqi = torch.zeros(total_q, num_groups, qi.shape[-1], dtype=torch.float32, device=device)
        dki = torch.zeros(ki.shape, dtype=torch.float32, device=device)
    kv = dict(csr=csr, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, topk=topk,
              max_seqlen_k=None, block_size=block_size, softmax_scale=softmax_scale,
              config=config, dqi=dqi, dki=dki)
    if total_q > 0 and k.shape[0] > 0:
        _launch_kv(q, k, qi, ki, teacher_lse=teacher_lse, row_terms=row_terms,
                   entry_max=entry_max, entry_sum=entry_sum, **kv)
    row_max = entry_max.amax(-1, keepdim=True)
    row_max = torch.where(row_max == float("-inf"), 0.0, row_max)
    row_sum = (entry_sum * torch.exp2(entry_max - row_max)).sum(-1)  # [G, total_q]
    has_keys = (row_sum > 0).t()
    student_lse2 = torch.where(has_keys, (row_max[..., 0] + torch.log2(row_sum)).t(), 0.0)
    p_log_p, p_s, mass = row_terms.unbind(0)
    row_loss = torch.where(has_keys, (p_log_p - p_s + student_lse2 * mass) * (1 / _LOG2E), 0.0)
    if with_grad and total_q > 0 and k.shape[0] > 0:
        _launch_kv(q, k, qi, ki, student_lse=(student_lse2 * (1 / _LOG2E)).contiguous(),
                   teacher_mass=mass, **kv)
    return row_loss, dqi, dki


def indexer_loss_rows(q: torch.Tensor, k: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor,
                      indices: torch.Tensor | None, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, *, block_size: int, softmax_scale: float,
                      lse: torch.Tensor | None = None, config: IndexerLossConfig | None = None
                      ) -> torch.Tensor:
    """``KL(P || Q)`` of every (token, group): ``[total_q, G]`` float32 (no autograd); the loss
    is ``row_loss.sum() / (total_q * G)``."""
    config = config or launch_config(qi)
    q, k, qi, ki = (_last_dim_contiguous(t) for t in (q, k, qi, ki))
    kwargs = dict(block_size=block_size, softmax_scale=softmax_scale, lse=lse, config=config)
    if indices is None:
        return _teacher_rows(q, k, qi, ki, None, cu_seqlens_q, cu_seqlens_k, lse_only=False,
                             **kwargs)[0]
    return _sparse_rows(q, k, qi, ki, _last_dim_contiguous(indices), cu_seqlens_q, cu_seqlens_k,
                        with_grad=False, **kwargs)[0]


class IndexerLossFunction(torch.autograd.Function):
    """Autograd of the indexer loss: gradients to ``qi`` and ``ki`` only (the teacher is a
    constant; q, k and lse get None). With a selection the forward computes the float32
    gradients too (when asked for: ``with_grad``) and the backward only scales them; the dense
    warm-up computes them in the backward."""

    @staticmethod
    def forward(ctx, qi, ki, q, k, indices, cu_seqlens_q, cu_seqlens_k, block_size,
                softmax_scale, lse, max_seqlen_k, config, with_grad):
        config = config or launch_config(qi)
        ctx.dtypes = qi.dtype, ki.dtype
        q, k, qi, ki = (_last_dim_contiguous(t) for t in (q, k, qi, ki))
        kwargs = dict(block_size=block_size, softmax_scale=softmax_scale, lse=lse, config=config)
        ctx.dense = indices is None
        if ctx.dense:
            row_loss, student_lse, teacher_mass, teacher_lse = _teacher_rows(
                q, k, qi, ki, None, cu_seqlens_q, cu_seqlens_k, lse_only=False, **kwargs)
            if with_grad and max_seqlen_k is None:
                # Host synchronisation: the dense backward's grid needs a bound on a sequence's keys.
                max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max().item()) if \
                    cu_seqlens_k.numel() > 1 else 0
            ctx.save_for_backward(q, k, qi, ki, cu_seqlens_q, cu_seqlens_k, teacher_lse,
                                  student_lse, teacher_mass)
            ctx.block_size, ctx.softmax_scale = block_size, softmax_scale
            ctx.max_seqlen_k, ctx.config = max_seqlen_k, config
        else:
            row_loss, dqi, dki = _sparse_rows(q, k, qi, ki, _last_dim_contiguous(indices),
                                              cu_seqlens_q, cu_seqlens_k, with_grad=with_grad,
                                              **kwargs)
            ctx.save_for_backward(dqi, dki)
        ctx.factor = qi.shape[-1] ** -0.5 / max(row_loss.numel(), 1)
        return row_loss.sum() / max(row_loss.numel(), 1)

    @staticmethod
    def backward(ctx, grad):
        if ctx.dense:
            (q, k, qi, ki, cu_seqlens_q, cu_seqlens_k, teacher_lse, student_lse,
             teacher_mass) = ctx.saved_tensors
            dqi = torch.zeros(qi.shape, dtype=torch.float32, device=qi.device)
            dki = torch.zeros(ki.shape, dtype=torch.float32, device=ki.device)
            if q.shape[0] > 0 and k.shape[0] > 0:
                _launch_kv(q, k, qi, ki, csr=None, cu_seqlens_q=cu_seqlens_q,
                           cu_seqlens_k=cu_seqlens_k, topk=1, max_seqlen_k=ctx.max_seqlen_k,
                           block_size=ctx.block_size, softmax_scale=ctx.softmax_scale,
                           config=ctx.config, teacher_lse=teacher_lse, student_lse=student_lse,
                           teacher_mass=teacher_mass, dqi=dqi, dki=dki)
        else:
            dqi, dki = ctx.saved_tensors
            if dqi is None:
                raise RuntimeError("msattn indexer loss: the forward ran without gradients "
                                   "(under torch.no_grad() or with qi, ki not requiring grad)")
        factor = grad.float() * ctx.factor
        need_dqi, need_dki = ctx.needs_input_grad[:2]
        return ((dqi * factor).to(ctx.dtypes[0]) if need_dqi else None,
                (dki * factor).to(ctx.dtypes[1]) if need_dki else None) + (None,) * 11


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
        0-d float32 loss; differentiable in ``qi`` and ``ki`` (q, k get no gradient). With a
        selection and grad enabled, the gradients are computed in this call (float32, held
        until the backward): ``[total_q, G, Di]`` and ``[total_k, Di]``.
    """
    with_grad = torch.is_grad_enabled() and (qi.requires_grad or ki.requires_grad)
    return IndexerLossFunction.apply(qi, ki, q, k, indices, cu_seqlens_q, cu_seqlens_k,
                                     block_size, softmax_scale, lse, max_seqlen_k, config,
                                     with_grad)
