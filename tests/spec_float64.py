"""A deliberately naive float64 implementation of MSA, written from docs/MSA.md alone.

It shares no code with :mod:`msattn.reference`: plain Python loops over sequences, query tokens,
groups and blocks, float64 arithmetic, and its own top-k (repeated arg-max, lowest id on ties).
Only the varlen layout: ``q [total_q, H, D]``, ``k, v [total_k, G, D]``, ``qi [total_q, G, Di]``,
``ki [total_k, Di]``, ``cu_seqlens`` as int tensors or lists.

Slow by design; keep the shapes small.
"""

from __future__ import annotations

import math

import torch


def _bounds(cu_seqlens_q, cu_seqlens_k):
    cq = [int(x) for x in (cu_seqlens_q.tolist() if torch.is_tensor(cu_seqlens_q) else cu_seqlens_q)]
    ck = [int(x) for x in (cu_seqlens_k.tolist() if torch.is_tensor(cu_seqlens_k) else cu_seqlens_k)]
    assert len(cq) == len(ck)
    return [(cq[b], cq[b + 1], ck[b], ck[b + 1]) for b in range(len(cq) - 1)]


def block_max_scores(qi_row, ki_seq, t, block_size):
    """``u(t, g, c)`` for c = 0 .. t // block_size, as a Python list of floats (float64).

    qi_row: ``[Di]`` float64; ki_seq: ``[S, Di]`` float64; t: absolute position of the query.
    """
    scale = 1.0 / math.sqrt(qi_row.shape[0])
    own = t // block_size
    u = []
    for c in range(own + 1):
        best = -math.inf
        for j in range(c * block_size, min((c + 1) * block_size, t + 1)):
            s = float(torch.dot(qi_row, ki_seq[j])) * scale
            if s > best:
                best = s
        u.append(best)
    return u


def topk_blocks(u, own, topk, init_blocks, local_blocks):
    """The selected set of one (query, group), own block last.

    Forced blocks first (never counted twice), then the best of the rest by repeated arg-max;
    a strictly greater score is needed to displace an earlier (lower) block id.
    """
    forced = []
    for c in range(own + 1):
        if c < init_blocks or c > own - local_blocks:
            forced.append(c)
    chosen = list(forced)
    remaining = [c for c in range(own + 1) if c not in forced]
    while len(chosen) < topk and remaining:
        best = remaining[0]
        for c in remaining[1:]:
            if u[c] > u[best]:
                best = c
        chosen.append(best)
        remaining.remove(best)
    chosen.remove(own)
    chosen.append(own)
    return chosen


def select(qi, ki, cu_seqlens_q, cu_seqlens_k, *, block_size, topk, init_blocks=0, local_blocks=1):
    """Stage 1. Returns ``(rows, scores)``: nested lists indexed ``[g][row]``.

    ``rows[g][r]`` is the list of selected block ids (own block last, length
    ``min(topk, own + 1)``), ``scores[g][r]`` the list of ``u`` for blocks ``0 .. own``.
    Rows of zero-length query sequences do not exist (total_q counts only real rows).
    """
    qi = qi.detach().to(torch.float64)
    ki = ki.detach().to(torch.float64)
    total_q, num_groups, _ = qi.shape
    rows = [[None] * total_q for _ in range(num_groups)]
    scores = [[None] * total_q for _ in range(num_groups)]
    for q0, q1, k0, k1 in _bounds(cu_seqlens_q, cu_seqlens_k):
        len_q, len_k = q1 - q0, k1 - k0
        ki_seq = ki[k0:k1]
        for i in range(len_q):
            t = len_k - len_q + i
            own = t // block_size
            for g in range(num_groups):
                u = block_max_scores(qi[q0 + i, g], ki_seq, t, block_size)
                rows[g][q0 + i] = topk_blocks(u, own, topk, init_blocks, local_blocks)
                scores[g][q0 + i] = u
    return rows, scores


def rows_to_tensor(rows, topk):
    """``[G, total_q, topk]`` int32 with -1 padding, from the nested lists of :func:`select`."""
    num_groups = len(rows)
    total_q = len(rows[0]) if num_groups else 0
    out = torch.full((num_groups, total_q, topk), -1, dtype=torch.int32)
    for g in range(num_groups):
        for r in range(total_q):
            for n, c in enumerate(rows[g][r]):
                out[g, r, n] = c
    return out


def attention(q, k, v, indices, cu_seqlens_q, cu_seqlens_k, *, block_size, softmax_scale=None):
    """Stage 2 over a given selection.

    ``indices``: ``[G, total_q, topk]`` tensor (negative entries ignored) or nested lists ``[g][row]``.
    Returns ``(o [total_q, H, D], lse [total_q, H])`` float64; a row that sees no key gets o = 0,
    lse = -inf.
    """
    q = q.detach().to(torch.float64)
    k = k.detach().to(torch.float64)
    v = v.detach().to(torch.float64)
    total_q, num_heads, head_dim = q.shape
    num_groups = k.shape[1]
    heads_per_group = num_heads // num_groups
    scale = head_dim ** -0.5 if softmax_scale is None else float(softmax_scale)
    if torch.is_tensor(indices):
        indices = indices.tolist()
    o = torch.zeros(total_q, num_heads, head_dim, dtype=torch.float64)
    lse = torch.full((total_q, num_heads), -math.inf, dtype=torch.float64)
    for q0, q1, k0, k1 in _bounds(cu_seqlens_q, cu_seqlens_k):
        len_q, len_k = q1 - q0, k1 - k0
        for i in range(len_q):
            t = len_k - len_q + i
            for h in range(num_heads):
                g = h // heads_per_group
                keys = []
                for c in indices[g][q0 + i]:
                    if c < 0:
                        continue
                    for j in range(c * block_size, (c + 1) * block_size):
                        if j <= t and j < len_k:
                            keys.append(j)
                if not keys:
                    continue
                logits = [float(torch.dot(q[q0 + i, h], k[k0 + j, g])) * scale for j in keys]
                m = max(logits)
                weights = [math.exp(x - m) for x in logits]
                total = sum(weights)
                acc = torch.zeros(head_dim, dtype=torch.float64)
                for w, j in zip(weights, keys):
                    acc += (w / total) * v[k0 + j, g]
                o[q0 + i, h] = acc
                lse[q0 + i, h] = m + math.log(total)
    return o, lse


def msa(q, k, v, qi, ki, cu_seqlens_q, cu_seqlens_k, *, block_size, topk, init_blocks=0,
        local_blocks=1, softmax_scale=None):
    """Both stages. Returns ``(o, lse, rows)``."""
    rows, _ = select(qi, ki, cu_seqlens_q, cu_seqlens_k, block_size=block_size, topk=topk,
                     init_blocks=init_blocks, local_blocks=local_blocks)
    o, lse = attention(q, k, v, rows, cu_seqlens_q, cu_seqlens_k, block_size=block_size,
                       softmax_scale=softmax_scale)
    return o, lse, rows
