"""Exact PyTorch reference of MiniMax Sparse Attention (the contract in docs/MSA.md).

Everything here is plain PyTorch that runs on any device. Scores and softmax accumulate in
float32 (float64 when the inputs are float64). Queries are processed in chunks so that memory
stays bounded: a 64K-token sequence runs on a CPU machine with a few GB to spare.

All functions take the varlen layout (flash-attn convention); the public API in
:mod:`msattn.interface` converts the batched layout to it.

Selection rule (per query position ``t``, absolute in its sequence, and group ``g``):

* ``s(t, g, j) = qi[t, g] . ki[j] * Di**-0.5`` for ``j <= t``;
* ``u(t, g, c) = max_{j in block c, j <= t} s(t, g, j)``;
* forced blocks (the first ``init_blocks`` and the ``local_blocks`` ending at ``t // block_size``)
  always win and use slots of the ``topk`` budget; the other slots go to the highest ``u``,
  ties to the lower block id;
* output row: valid block ids first, the query's own block as the LAST valid entry, then ``-1``.
"""

from __future__ import annotations

import math

import torch

# Elements of the largest float32 intermediate one chunk may hold (128 MiB).
_CHUNK_ELEMENTS = 1 << 25


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _sequence_bounds(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor):
    """Yield ``(q_start, q_end, k_start, k_end)`` for every sequence of a varlen batch."""
    starts_q = cu_seqlens_q.tolist()
    starts_k = cu_seqlens_k.tolist()
    for b in range(len(starts_q) - 1):
        yield starts_q[b], starts_q[b + 1], starts_k[b], starts_k[b + 1]


def forced_block_mask(positions: torch.Tensor, num_blocks: int, block_size: int,
                      init_blocks: int, local_blocks: int) -> torch.Tensor:
    """Blocks every query must select.

    Args:
        positions: ``[C]`` int64, absolute query positions in their sequence.
    Returns:
        ``[C, num_blocks]`` bool: the first ``init_blocks`` blocks and the ``local_blocks`` blocks
        ending at the query's own block, restricted to blocks at or before the own block.
    """
    own = (positions // block_size)[:, None]
    block = torch.arange(num_blocks, device=positions.device)[None, :]
    return ((block < init_blocks) | (block > own - local_blocks)) & (block <= own)


def arrange_selection(selected: torch.Tensor, valid: torch.Tensor, own_block: torch.Tensor,
                      topk: int) -> torch.Tensor:
    """Put a selection in the output format: valid ids, the own block last among them, then -1.

    Args:
        selected: ``[..., n]`` int64 block ids, ``n <= topk``.
        valid: ``[..., n]`` bool, which of them are real selections.
        own_block: ``[...]`` int64, the block holding each query (always among the valid ids).
    Returns:
        ``[..., topk]`` int32.
    """
    is_own = selected == own_block[..., None]
    # 0: valid and not own, 1: own, 2: padding; a stable sort keeps the ranking inside each class.
    category = torch.where(valid, is_own.to(torch.int64), torch.full_like(selected, 2))
    order = torch.sort(category, dim=-1, stable=True).indices
    selected = torch.gather(selected, -1, order)
    valid = torch.gather(valid, -1, order)
    out = torch.where(valid, selected, torch.full_like(selected, -1))
    if out.shape[-1] < topk:
        pad = out.new_full((*out.shape[:-1], topk - out.shape[-1]), -1)
        out = torch.cat([out, pad], dim=-1)
    return out.to(torch.int32)


def block_scores(qi: torch.Tensor, ki: torch.Tensor, positions: torch.Tensor,
                 block_size: int) -> torch.Tensor:
    """Causal block max-pooled index scores ``u`` for a chunk of queries of one sequence.

    Args:
        qi: ``[C, G, Di]`` index queries (any float dtype).
        ki: ``[S, Di]`` index keys of the sequence.
        positions: ``[C]`` int64 absolute query positions, ``< S``.
    Returns:
        ``[C, G, ceil(S' / block_size)]`` float32 (float64 for float64 inputs) where ``S'`` is the
        number of keys the chunk can see; ``-inf`` for blocks entirely after a query.
    """
    dtype = _compute_dtype(qi)
    num_keys = int(positions.max().item()) + 1
    num_blocks = math.ceil(num_keys / block_size)
    scale = qi.shape[-1] ** -0.5
    scores = torch.einsum("cgd,sd->cgs", qi.to(dtype), ki[:num_keys].to(dtype)) * scale
    key_pos = torch.arange(num_keys, device=qi.device)
    causal = key_pos[None, :] <= positions[:, None]
    scores = scores.masked_fill(~causal[:, None, :], -math.inf)
    pad = num_blocks * block_size - num_keys
    if pad:
        scores = torch.nn.functional.pad(scores, (0, pad), value=-math.inf)
    return scores.view(*scores.shape[:2], num_blocks, block_size).amax(dim=-1)


def fp8_index_queries(qi: torch.Tensor) -> torch.Tensor:
    """Index queries as the fp8 index path scores them against fp8 index keys (a native
    fp8 x fp8 dot): each (token, group) row ``qi [total_q, G, Di]`` divided by ``scale =
    max|row| / 448`` (1 for an all-zero row), rounded to float8_e4m3fn (to nearest, even), and
    multiplied back. Returns float32 ``[total_q, G, Di]``; selections on these queries and the
    dequantised keys are what the fp8 path selects, float near-ties aside."""
    q = qi.float()
    row_abs_max = q.abs().amax(-1, keepdim=True)
    scale = torch.where(row_abs_max > 0, row_abs_max / 448.0, torch.ones_like(row_abs_max))
    return (q / scale).to(torch.float8_e4m3fn).float() * scale


def select_blocks(qi: torch.Tensor, ki: torch.Tensor, cu_seqlens_q: torch.Tensor,
                  cu_seqlens_k: torch.Tensor, *, block_size: int, topk: int, init_blocks: int,
                  local_blocks: int) -> torch.Tensor:
    """Stage 1 of MSA: the top-k KV blocks of every query token and group.

    Args:
        qi: ``[total_q, G, Di]`` index queries.
        ki: ``[total_k, Di]`` index keys.
        cu_seqlens_q, cu_seqlens_k: ``[B + 1]`` int32 prefix sums of the lengths; the queries of
            sequence ``b`` are the last ``len_q(b)`` positions of its ``len_k(b)`` keys.
    Returns:
        ``[G, total_q, topk]`` int32 block ids relative to the sequence's first key; valid entries
        first, the query's own block the last valid one, ``-1`` padding after.
    """
    total_q, num_groups, _ = qi.shape
    out = torch.full((num_groups, total_q, topk), -1, dtype=torch.int32, device=qi.device)
    for q_start, q_end, k_start, k_end in _sequence_bounds(cu_seqlens_q, cu_seqlens_k):
        len_q, len_k = q_end - q_start, k_end - k_start
        if len_q == 0:
            continue
        chunk = max(1, _CHUNK_ELEMENTS // (num_groups * len_k))
        for i0 in range(0, len_q, chunk):
            i1 = min(len_q, i0 + chunk)
            positions = torch.arange(len_k - len_q + i0, len_k - len_q + i1, device=qi.device)
            scores = block_scores(qi[q_start + i0:q_start + i1], ki[k_start:k_end], positions,
                                  block_size)
            forced = forced_block_mask(positions, scores.shape[-1], block_size, init_blocks,
                                       local_blocks)
            scores = scores.masked_fill(forced[:, None, :], math.inf)
            # Stable descending sort: equal scores keep ascending block order (ties -> lower id).
            ranked = torch.sort(scores, dim=-1, descending=True, stable=True)
            num_kept = min(topk, scores.shape[-1])
            selected = ranked.indices[..., :num_kept]
            valid = ranked.values[..., :num_kept] > -math.inf
            own = (positions // block_size)[:, None].expand(-1, num_groups)
            rows = arrange_selection(selected, valid, own, topk)  # [C, G, topk]
            out[:, q_start + i0:q_start + i1] = rows.transpose(0, 1)
    return out


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, *, block_size: int,
                     softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2 of MSA: exact softmax attention of every head over its group's selected blocks.

    Args:
        q: ``[total_q, H, D]``; k, v: ``[total_k, G, D]``.
        indices: ``[G, total_q, topk]`` int32 block ids (distinct per row; negative entries are
            ignored; keys after the query or past the sequence are masked).
    Returns:
        o: ``[total_q, H, D]`` in q's dtype (zero for a row that sees no key);
        lse: ``[total_q, H]`` float32 natural-log sum of ``exp(q.k * softmax_scale)``
        (``-inf`` for a row that sees no key).
    """
    total_q, num_heads, head_dim = q.shape
    num_groups = k.shape[1]
    group_size = num_heads // num_groups
    topk = indices.shape[-1]
    dtype = _compute_dtype(q)
    o = torch.zeros(total_q, num_heads, head_dim, dtype=dtype, device=q.device)
    lse = torch.full((total_q, num_heads), -math.inf, dtype=dtype, device=q.device)
    span = topk * block_size
    offsets = torch.arange(block_size, device=q.device)
    group_ids = torch.arange(num_groups, device=q.device)[:, None, None]
    for q_start, q_end, k_start, k_end in _sequence_bounds(cu_seqlens_q, cu_seqlens_k):
        len_q, len_k = q_end - q_start, k_end - k_start
        if len_q == 0:
            continue
        k_seq = k[k_start:k_end].transpose(0, 1).to(dtype)  # [G, S, D]
        v_seq = v[k_start:k_end].transpose(0, 1).to(dtype)
        chunk = max(1, _CHUNK_ELEMENTS // (num_groups * span * head_dim))
        for i0 in range(0, len_q, chunk):
            i1 = min(len_q, i0 + chunk)
            positions = torch.arange(len_k - len_q + i0, len_k - len_q + i1, device=q.device)
            blocks = indices[:, q_start + i0:q_start + i1].to(torch.int64)  # [G, C, topk]
            keys = (blocks[..., None] * block_size + offsets).flatten(-2)  # [G, C, span]
            valid = ((blocks >= 0)[..., None].expand(-1, -1, -1, block_size).flatten(-2)
                     & (keys <= positions[None, :, None]) & (keys < len_k))
            keys = keys.clamp(0, max(len_k - 1, 0))
            k_sel = k_seq[group_ids, keys]  # [G, C, span, D]
            v_sel = v_seq[group_ids, keys]
            q_chunk = q[q_start + i0:q_start + i1].to(dtype)
            q_chunk = q_chunk.view(i1 - i0, num_groups, group_size, head_dim).transpose(0, 1)
            scores = torch.einsum("gchd,gcld->gchl", q_chunk, k_sel) * softmax_scale
            scores = scores.masked_fill(~valid[:, :, None, :], -math.inf)
            row_lse = torch.logsumexp(scores, dim=-1)  # [G, C, group_size]
            finite = torch.isfinite(row_lse)
            probs = torch.exp(scores - torch.where(finite, row_lse, 0.0)[..., None])
            out = torch.einsum("gchl,gcld->gchd", probs, v_sel)  # masked probs are exp(-inf)=0
            o[q_start + i0:q_start + i1] = out.transpose(0, 1).reshape(i1 - i0, num_heads,
                                                                       head_dim)
            lse[q_start + i0:q_start + i1] = row_lse.transpose(0, 1).reshape(i1 - i0, num_heads)
    return o.to(q.dtype), lse.to(torch.float32)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    cu_seqlens_k: torch.Tensor, *, softmax_scale: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense causal GQA attention (queries are the last keys), the MSA limit for short sequences.

    Shapes as :func:`sparse_attention`; returns ``(o [total_q, H, D], lse [total_q, H])``.
    """
    num_blocks_needed = max(
        (k_end - k_start for _, _, k_start, k_end in _sequence_bounds(cu_seqlens_q, cu_seqlens_k)),
        default=0)
    block_size = max(1, num_blocks_needed)
    indices = torch.zeros(k.shape[1], q.shape[0], 1, dtype=torch.int32, device=q.device)
    return sparse_attention(q, k, v, indices, cu_seqlens_q, cu_seqlens_k, block_size=block_size,
                            softmax_scale=softmax_scale)


def _indexer_loss_chunk(q_c: torch.Tensor, qi_c: torch.Tensor, k_keys: torch.Tensor,
                        ki_keys: torch.Tensor, valid: torch.Tensor, lse_c: torch.Tensor | None,
                        softmax_scale: float, dense: bool) -> torch.Tensor:
    """Sum over a chunk's (token, group) rows of ``KL(P || Q)`` (see :func:`indexer_loss`).

    Args:
        q_c: ``[G, C, group_size, D]``; qi_c: ``[G, C, Di]`` (compute dtype).
        k_keys, ki_keys: dense: ``[G, L, D]`` and ``[L, Di]`` (the first ``L`` keys of the
            sequence); sparse: ``[G, C, L, D]`` and ``[G, C, L, Di]`` (each row's gathered keys).
        valid: ``[G or 1, C, L]`` bool, the keys of each row's set ``J``.
        lse_c: ``[G, C, group_size]`` teacher log-sum-exp, or None to normalise here.
    """
    with torch.no_grad():  # the teacher is a constant
        pattern = "gchd,gld->gchl" if dense else "gchd,gcld->gchl"
        scores = torch.einsum(pattern, q_c, k_keys) * softmax_scale
        if lse_c is None:
            log_p = torch.log_softmax(scores.masked_fill(~valid[:, :, None], -math.inf), dim=-1)
        else:
            log_p = scores - lse_c[..., None]
        # Rows without keys give NaN above; masked_fill overwrites them with 0.
        p = torch.exp(log_p).masked_fill(~valid[:, :, None], 0.0).mean(dim=2)  # [G, C, L]
    pattern = "gcd,ld->gcl" if dense else "gcd,gcld->gcl"
    s = torch.einsum(pattern, qi_c, ki_keys) * qi_c.shape[-1] ** -0.5
    s = s.masked_fill(~valid, -math.inf)
    # A row without keys contributes 0; give it finite scores so that log_softmax stays finite.
    s = s.masked_fill(~valid.any(dim=-1, keepdim=True), 0.0)
    log_q = torch.log_softmax(s, dim=-1).masked_fill(~valid, 0.0)
    return (torch.xlogy(p, p) - p * log_q).sum()


def indexer_loss(q: torch.Tensor, k: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor,
                 indices: torch.Tensor | None, cu_seqlens_q: torch.Tensor,
                 cu_seqlens_k: torch.Tensor, *, block_size: int, softmax_scale: float,
                 lse: torch.Tensor | None = None) -> torch.Tensor:
    """KL-distillation loss of the index branch: mean over (token, group) of ``KL(P || Q)``.

    For query token ``t`` (position ``pos(t)`` in its sequence) and group ``g``, the key set
    ``J(t, g)`` is the keys ``j <= pos(t)`` of the blocks ``indices[g, t]`` (all causal keys when
    ``indices`` is None: the dense warm-up). Over ``J``:

    * teacher ``P(t, g, j)`` = mean over the heads ``h`` of group ``g`` of
      ``softmax_j(q[t, h] . k[j, g] * softmax_scale)``, a constant (no gradient to q or k); with
      ``lse`` given, ``P = exp(q.k * softmax_scale - lse)`` (the main branch's log-sum-exp);
    * student ``Q(t, g, j)`` = ``softmax_j(qi[t, g] . ki[j] * Di**-0.5)``.

    A row with no key contributes 0 (it still counts in the mean). The gradient reaches ``qi``
    and ``ki`` only (torch autograd; ``d loss / d s = (Q * sum(P) - P) / (total_q * G)``).
    Queries are processed in chunks; with autograd on, each chunk is checkpointed
    (``torch.utils.checkpoint``) so that the saved gathered keys do not grow with the batch.

    Args:
        q: ``[total_q, H, D]``; k: ``[total_k, G, D]``; qi: ``[total_q, G, Di]``;
            ki: ``[total_k, Di]``.
        indices: ``[G, total_q, topk]`` int32 block ids relative to the sequence (distinct per
            row; negative entries ignored), or None for the dense warm-up.
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]``; queries are the last positions of the keys.
        lse: optional ``[total_q, H]`` float32 main-branch log-sum-exp over the same keys.
    Returns:
        A 0-d float32 tensor (float64 for float64 qi).
    """
    total_q, num_heads, head_dim = q.shape
    num_groups = k.shape[1]
    group_size = num_heads // num_groups
    index_dim = qi.shape[-1]
    dtype = _compute_dtype(qi)
    dense = indices is None
    track = torch.is_grad_enabled() and (qi.requires_grad or ki.requires_grad)
    total = torch.zeros((), dtype=dtype, device=qi.device)
    offsets = torch.arange(block_size, device=q.device)
    group_ids = torch.arange(num_groups, device=q.device)[:, None, None]
    width = max(head_dim, index_dim, group_size)

    def chunk_loss(qi_c, ki_seq, q_c, k_seq, positions, blocks, lse_c, len_k, num_keys):
        qi_c = qi_c.to(dtype).transpose(0, 1)  # [G, C, Di]
        ki_seq = ki_seq.to(dtype)
        if dense:
            keys = torch.arange(num_keys, device=q.device)
            valid = (keys[None, :] <= positions[:, None])[None]  # [1, C, L]
            k_keys, ki_keys = k_seq[:, :num_keys], ki_seq[:num_keys]
        else:
            keys = (blocks[..., None] * block_size + offsets).flatten(-2)  # [G, C, span]
            valid = ((blocks >= 0)[..., None].expand(-1, -1, -1, block_size).flatten(-2)
                     & (keys <= positions[None, :, None]) & (keys < len_k))
            keys = keys.clamp(0, max(len_k - 1, 0))
            k_keys, ki_keys = k_seq[group_ids, keys], ki_seq[keys]
        return _indexer_loss_chunk(q_c, qi_c, k_keys, ki_keys, valid, lse_c, softmax_scale, dense)

    for q_start, q_end, k_start, k_end in _sequence_bounds(cu_seqlens_q, cu_seqlens_k):
        len_q, len_k = q_end - q_start, k_end - k_start
        if len_q == 0:
            continue
        k_seq = k[k_start:k_end].transpose(0, 1).to(dtype)  # [G, S, D]
        span = len_k if dense else indices.shape[-1] * block_size
        chunk = max(1, _CHUNK_ELEMENTS // (num_groups * max(span, 1) * width))
        for i0 in range(0, len_q, chunk):
            i1 = min(len_q, i0 + chunk)
            positions = torch.arange(len_k - len_q + i0, len_k - len_q + i1, device=q.device)
            blocks = None if dense else indices[:, q_start + i0:q_start + i1].to(torch.int64)
            q_c = q[q_start + i0:q_start + i1].to(dtype)
            q_c = q_c.view(i1 - i0, num_groups, group_size, head_dim).transpose(0, 1)
            lse_c = None
            if lse is not None:
                lse_c = lse[q_start + i0:q_start + i1].to(dtype)
                lse_c = lse_c.view(i1 - i0, num_groups, group_size).transpose(0, 1)
            args = (qi[q_start + i0:q_start + i1], ki[k_start:k_end], q_c, k_seq, positions,
                    blocks, lse_c, len_k, len_k - len_q + i1)
            if track:
                total = total + torch.utils.checkpoint.checkpoint(chunk_loss, *args,
                                                                  use_reentrant=False)
            else:
                total = total + chunk_loss(*args)
    return total / max(total_q * num_groups, 1)
