"""The exact PyTorch reference (backend="reference") against the contract in docs/MSA.md.

The oracle is tests/spec_float64.py, a naive float64 implementation written from the spec alone,
and (for short sequences, where MSA must equal it) dense causal attention through torch SDPA.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import msattn
from msattn import reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spec_float64 as spec  # noqa: E402

OUT_ATOL = 2e-4  # float32 inputs vs the float64 spec
LSE_ATOL = 1e-4
# Index scores of float32 inputs differ from float64 ones by ~1e-6; a selection may differ from
# the spec only between blocks whose float64 scores are this close (never for integer inputs).
NEAR_TIE = 1e-4


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def cu(lengths):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


def make_inputs(lens_q, lens_k, *, heads, groups, dim, index_dim, seed, integer=False,
                dtype=torch.float32):
    """Fresh random varlen inputs. integer=True draws small integers (-2..2) so that many block
    maxima tie exactly (and every float32 score is exact)."""
    gen = torch.Generator().manual_seed(seed)
    total_q, total_k = sum(lens_q), sum(lens_k)

    def draw(*shape):
        if integer:
            return torch.randint(-2, 3, shape, generator=gen).to(dtype)
        return torch.randn(*shape, generator=gen).to(dtype)

    return dict(q=draw(total_q, heads, dim), k=draw(total_k, groups, dim), v=draw(total_k, groups, dim),
                qi=draw(total_q, groups, index_dim), ki=draw(total_k, index_dim),
                cu_seqlens_q=cu(lens_q), cu_seqlens_k=cu(lens_k))


def positions_and_rows(cu_q, cu_k):
    """Yield (row, absolute position t) for every query row of a varlen batch."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        len_q, len_k = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        for i in range(len_q):
            yield cq[b] + i, len_k - len_q + i


def check_format(indices, cu_q, cu_k, *, block_size, topk, init_blocks, local_blocks):
    """Layout of a selection: int32 [G, total_q, topk]; valid ids first and distinct, the own block
    the last valid one, exactly min(topk, own + 1) of them, forced blocks present, -1 after."""
    num_groups, total_q, k = indices.shape
    assert indices.dtype == torch.int32
    assert k == topk
    assert total_q == int(cu_q[-1])
    seen_rows = 0
    for row, t in positions_and_rows(cu_q, cu_k):
        seen_rows += 1
        own = t // block_size
        n_valid = min(topk, own + 1)
        forced = {c for c in range(own + 1) if c < init_blocks or c > own - local_blocks}
        for g in range(num_groups):
            entries = indices[g, row].tolist()
            valid, pad = entries[:n_valid], entries[n_valid:]
            assert all(e == -1 for e in pad), (g, row, entries)
            assert all(0 <= e <= own for e in valid), (g, row, entries, own)
            assert len(set(valid)) == n_valid, (g, row, entries)
            assert valid[-1] == own, (g, row, entries, own)
            assert forced <= set(valid), (g, row, entries, forced)
    assert seen_rows == total_q


def check_same_selection(indices, rows, scores, *, tol):
    """Selections equal as sets per row; with tol > 0 a difference is allowed only between blocks
    whose float64 scores are within tol of each other (float32 rounding at a near-tie)."""
    num_groups = indices.shape[0]
    for g in range(num_groups):
        for r, want in enumerate(rows[g]):
            got = [c for c in indices[g, r].tolist() if c >= 0]
            if set(got) == set(want):
                continue
            assert tol > 0, (g, r, got, want)
            assert len(got) == len(want), (g, r, got, want)
            u = scores[g][r]
            extra, missing = set(got) - set(want), set(want) - set(got)
            for a in extra:
                for b in missing:
                    assert abs(u[a] - u[b]) <= tol, (g, r, got, want, u)


def dense_causal(q, k, v, cu_q, cu_k, *, softmax_scale=None):
    """Dense causal GQA attention (queries = last keys) in float64 through torch SDPA."""
    q, k, v = (x.detach().to(torch.float64) for x in (q, k, v))
    heads, dim = q.shape[1], q.shape[2]
    rep = heads // k.shape[1]
    scale = dim ** -0.5 if softmax_scale is None else softmax_scale
    o = torch.zeros_like(q)
    lse = torch.full(q.shape[:2], -math.inf, dtype=torch.float64)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        len_q, len_k = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        if len_q == 0:
            continue
        qs = q[cq[b]:cq[b + 1]].transpose(0, 1)  # [H, T, D]
        ks = k[ck[b]:ck[b + 1]].repeat_interleave(rep, dim=1).transpose(0, 1)  # [H, S, D]
        vs = v[ck[b]:ck[b + 1]].repeat_interleave(rep, dim=1).transpose(0, 1)
        pos = torch.arange(len_k - len_q, len_k)
        mask = torch.arange(len_k)[None, :] <= pos[:, None]  # [T, S]
        out = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
        o[cq[b]:cq[b + 1]] = out.transpose(0, 1)
        logits = (qs @ ks.transpose(-1, -2) * scale).masked_fill(~mask, -math.inf)
        lse[cq[b]:cq[b + 1]] = torch.logsumexp(logits, dim=-1).transpose(0, 1)
    return o, lse


def assert_close(actual, expected, atol):
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64), atol=atol, rtol=0)


def run_and_check(lens_q, lens_k, *, heads, groups, dim, index_dim, block_size, topk, init_blocks=0,
                  local_blocks=1, seed=0, integer=False, softmax_scale=None):
    """Reference (select, sparse attention, fused) vs the float64 spec; backend="auto" identical."""
    x = make_inputs(lens_q, lens_k, heads=heads, groups=groups, dim=dim, index_dim=index_dim,
                    seed=seed, integer=integer)
    sel = dict(block_size=block_size, topk=topk, init_blocks=init_blocks, local_blocks=local_blocks)
    cus = dict(cu_seqlens_q=x["cu_seqlens_q"], cu_seqlens_k=x["cu_seqlens_k"])
    indices = msattn.msa_select(x["qi"], x["ki"], **sel, **cus, backend="reference")
    check_format(indices, x["cu_seqlens_q"], x["cu_seqlens_k"], **sel)
    rows, scores = spec.select(x["qi"], x["ki"], x["cu_seqlens_q"], x["cu_seqlens_k"], **sel)
    check_same_selection(indices, rows, scores, tol=0.0 if integer else NEAR_TIE)

    # The spec's attention over the (now verified) selection of the reference.
    o_spec, lse_spec = spec.attention(x["q"], x["k"], x["v"], indices, x["cu_seqlens_q"],
                                      x["cu_seqlens_k"], block_size=block_size,
                                      softmax_scale=softmax_scale)
    o, lse = msattn.msa_sparse_attention(x["q"], x["k"], x["v"], indices, block_size=block_size,
                                         softmax_scale=softmax_scale, **cus, backend="reference")
    assert o.dtype == torch.float32 and lse.dtype == torch.float32
    assert o.shape == x["q"].shape and lse.shape == x["q"].shape[:2]
    assert_close(o, o_spec, OUT_ATOL)
    assert_close(lse, lse_spec, LSE_ATOL)

    o2, lse2 = msattn.msa_attention(x["q"], x["k"], x["v"], x["qi"], x["ki"], **sel,
                                    softmax_scale=softmax_scale, **cus, return_lse=True,
                                    backend="reference")
    assert_close(o2, o_spec, OUT_ATOL)
    assert_close(lse2, lse_spec, LSE_ATOL)
    o3 = msattn.msa_attention(x["q"], x["k"], x["v"], x["qi"], x["ki"], **sel,
                              softmax_scale=softmax_scale, **cus, backend="reference")
    assert torch.equal(o3, o2)

    # backend="auto" on CPU tensors is the reference: identical results.
    assert torch.equal(msattn.msa_select(x["qi"], x["ki"], **sel, **cus, backend="auto"), indices)
    o4, lse4 = msattn.msa_attention(x["q"], x["k"], x["v"], x["qi"], x["ki"], **sel,
                                    softmax_scale=softmax_scale, **cus, return_lse=True, backend="auto")
    assert torch.equal(o4, o2) and torch.equal(lse4, lse2)
    return x, indices, o2, lse2


SHAPE = dict(heads=4, groups=2, dim=16, index_dim=16)


# ----------------------------------------------------------------------------------------------
# Agreement with the float64 spec
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prefill_varlen_matches_spec(seed):
    # Partial last blocks (37, 21), a sequence shorter than one block (3), a long-ish one (70).
    run_and_check([37, 3, 70, 21], [37, 3, 70, 21], **SHAPE, block_size=8, topk=3, seed=seed)


@pytest.mark.parametrize("seed", [0, 1])
def test_t_less_than_s_and_zero_length_query_sequence(seed):
    # Sequence 1 has no queries (but keys), sequence 3 has neither queries nor keys.
    run_and_check([5, 0, 1, 0, 16], [60, 19, 44, 0, 33], **SHAPE, block_size=4, topk=4, seed=seed)


@pytest.mark.parametrize("init_blocks,local_blocks,topk", [(1, 1, 3), (2, 1, 4), (0, 2, 3),
                                                          (1, 3, 5), (2, 2, 4), (3, 1, 4)])
def test_forced_blocks_match_spec(init_blocks, local_blocks, topk):
    run_and_check([50, 9], [50, 30], **SHAPE, block_size=4, topk=topk, init_blocks=init_blocks,
                  local_blocks=local_blocks, seed=init_blocks * 10 + local_blocks)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("init_blocks,local_blocks", [(0, 1), (1, 2)])
def test_ties_match_spec_exactly(seed, init_blocks, local_blocks):
    # Small-integer inputs: many block maxima tie exactly; the lower block id must win every time.
    x, indices, _, _ = run_and_check([40, 17], [40, 29], heads=2, groups=2, dim=4, index_dim=2,
                                     block_size=2, topk=5, init_blocks=init_blocks,
                                     local_blocks=local_blocks, seed=seed, integer=True)
    # The test is only meaningful if ties at the selection boundary actually happen.
    rows, scores = spec.select(x["qi"], x["ki"], x["cu_seqlens_q"], x["cu_seqlens_k"], block_size=2,
                               topk=5, init_blocks=init_blocks, local_blocks=local_blocks)
    boundary_ties = 0
    for g in range(len(rows)):
        for r, chosen in enumerate(rows[g]):
            u = scores[g][r]
            own = len(u) - 1
            forced = {c for c in range(own + 1) if c < init_blocks or c > own - local_blocks}
            ranked = [c for c in chosen if c not in forced]
            unchosen = [c for c in range(own + 1) if c not in chosen]
            if ranked and unchosen and min(u[c] for c in ranked) == max(u[c] for c in unchosen):
                boundary_ties += 1
    assert boundary_ties > 10


def test_custom_softmax_scale_matches_spec():
    run_and_check([20, 7], [33, 7], **SHAPE, block_size=4, topk=2, seed=5, softmax_scale=0.37)


def test_chunked_reference_matches_unchunked(monkeypatch):
    # Force many tiny query chunks inside the reference: results must not change.
    x = make_inputs([45, 6], [45, 50], **SHAPE, seed=11)
    sel = dict(block_size=4, topk=3, init_blocks=1, local_blocks=2,
               cu_seqlens_q=x["cu_seqlens_q"], cu_seqlens_k=x["cu_seqlens_k"])
    args = (x["q"], x["k"], x["v"], x["qi"], x["ki"])
    idx_big = msattn.msa_select(x["qi"], x["ki"], **sel, backend="reference")
    o_big, lse_big = msattn.msa_attention(*args, **sel, return_lse=True, backend="reference")
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 500)
    idx_small = msattn.msa_select(x["qi"], x["ki"], **sel, backend="reference")
    o_small, lse_small = msattn.msa_attention(*args, **sel, return_lse=True, backend="reference")
    assert torch.equal(idx_small, idx_big)
    assert_close(o_small, o_big, 1e-6)
    assert_close(lse_small, lse_big, 1e-6)


# ----------------------------------------------------------------------------------------------
# Dense limit: S <= topk * block_size
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lens_q,lens_k,block_size,topk", [
    ([16, 5, 1], [16, 5, 1], 4, 4),           # prefill, exactly topk * block_size keys
    ([3, 9, 0, 2], [30, 9, 12, 32], 8, 4),    # T < S, zero-length query sequence
    ([13], [13], 16, 1),                      # one block
    ([7, 40], [64, 64], 8, 8),
])
@pytest.mark.parametrize("heads,groups", [(4, 2), (3, 3), (6, 1)])
def test_dense_limit_equals_dense_causal_attention(lens_q, lens_k, block_size, topk, heads, groups):
    assert max(lens_k) <= topk * block_size
    x = make_inputs(lens_q, lens_k, heads=heads, groups=groups, dim=8, index_dim=8, seed=len(lens_q))
    o_ref, lse_ref = dense_causal(x["q"], x["k"], x["v"], x["cu_seqlens_q"], x["cu_seqlens_k"])
    for backend in ("reference", "auto"):
        o, lse = msattn.msa_attention(x["q"], x["k"], x["v"], x["qi"], x["ki"], block_size=block_size,
                                      topk=topk, cu_seqlens_q=x["cu_seqlens_q"],
                                      cu_seqlens_k=x["cu_seqlens_k"], return_lse=True, backend=backend)
        assert_close(o, o_ref, OUT_ATOL)
        assert_close(lse, lse_ref, LSE_ATOL)


def test_dense_limit_fails_when_sparse():
    # Sanity check of the oracle above: past topk * block_size keys MSA is NOT dense attention.
    x = make_inputs([40], [40], **SHAPE, seed=3)
    o_ref, _ = dense_causal(x["q"], x["k"], x["v"], x["cu_seqlens_q"], x["cu_seqlens_k"])
    o = msattn.msa_attention(x["q"], x["k"], x["v"], x["qi"], x["ki"], block_size=4, topk=2,
                             cu_seqlens_q=x["cu_seqlens_q"], cu_seqlens_k=x["cu_seqlens_k"],
                             backend="reference")
    assert_close(o[:8], o_ref[:8], OUT_ATOL)  # the first 2 blocks are still dense
    assert (o[8:] - o_ref[8:]).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_dense_limit(dtype):
    x = make_inputs([9, 4], [20, 4], **SHAPE, seed=7, dtype=dtype)
    o_ref, lse_ref = dense_causal(x["q"], x["k"], x["v"], x["cu_seqlens_q"], x["cu_seqlens_k"])
    o, lse = msattn.msa_attention(x["q"], x["k"], x["v"], x["qi"], x["ki"], block_size=8, topk=3,
                                  cu_seqlens_q=x["cu_seqlens_q"], cu_seqlens_k=x["cu_seqlens_k"],
                                  return_lse=True, backend="reference")
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert_close(o, o_ref, 2e-2)
    assert_close(lse, lse_ref, 1e-3)


# ----------------------------------------------------------------------------------------------
# Tie-breaking and forced blocks on constructed scores
# ----------------------------------------------------------------------------------------------

def constructed_select(block_maxima, *, block_size=4, topk, init_blocks=0, local_blocks=1):
    """Select for one query at the last position of len(block_maxima) full blocks, with Di = 1,
    qi = 1 and one key per block carrying the wanted block maximum (the others far below)."""
    num_blocks = len(block_maxima)
    ki = torch.full((num_blocks * block_size, 1), -50.0)
    for c, m in enumerate(block_maxima):
        ki[c * block_size + (c % block_size), 0] = m  # the maximum sits at varying offsets
    qi = torch.ones(1, 1, 1)
    indices = msattn.msa_select(qi, ki, block_size=block_size, topk=topk, init_blocks=init_blocks,
                                local_blocks=local_blocks, backend="reference")
    auto = msattn.msa_select(qi, ki, block_size=block_size, topk=topk, init_blocks=init_blocks,
                             local_blocks=local_blocks, backend="auto")
    assert torch.equal(auto, indices)
    row = indices[0, 0].tolist()
    assert row[len([c for c in row if c >= 0]) - 1] == num_blocks - 1  # own block last valid
    return row


def test_tie_for_last_slot_goes_to_lower_block():
    # Own block 5 forced; slot 1 -> block 2 (score 4); blocks 1 and 3 tie (2.0) for the last slot.
    row = constructed_select([1.0, 2.0, 4.0, 2.0, 1.0, 0.0], topk=3)
    assert sorted(row) == [1, 2, 5]
    # The tied pair is 1 and 4 (3.0), after block 5 (7.0) took the first slot.
    row = constructed_select([0.5, 3.0, 0.0, 1.0, 3.0, 7.0, -1.0], topk=3)
    assert sorted(row) == [1, 5, 6]
    # A three-way tie with room for two: the two lowest ids win.
    row = constructed_select([1.0, 2.0, 1.0, 2.0, 2.0, -3.0], topk=3)
    assert sorted(row) == [1, 3, 5]


def test_all_equal_scores_pick_lowest_ids():
    row = constructed_select([0.0] * 8, topk=4)
    assert row[-1] == 7 and sorted(row) == [0, 1, 2, 7]


def test_higher_score_beats_lower_id():
    row = constructed_select([1.0, 1.0, 1.0, 1.5, 0.0], topk=2)
    assert sorted(row) == [3, 4]


def test_forced_blocks_win_over_higher_scores_and_use_budget():
    maxima = [-9.0, 5.0, 6.0, 7.0, -9.0, -8.0, -9.0]
    # init 1, local 2: forced {0, 5, 6}; topk 4 leaves one slot -> block 3 (7.0).
    row = constructed_select(maxima, topk=4, init_blocks=1, local_blocks=2)
    assert sorted(row) == [0, 3, 5, 6] and row[-1] == 6 and row[:4].count(-1) == 0
    # topk == init + local: only the forced blocks.
    row = constructed_select(maxima, topk=3, init_blocks=1, local_blocks=2)
    assert sorted(row) == [0, 5, 6]
    # Overlapping forced sets are not counted twice: init 3 and local 5 over 7 blocks = all 7.
    row = constructed_select(maxima, topk=8, init_blocks=3, local_blocks=5)
    assert sorted(row[:7]) == list(range(7)) and row[7] == -1 and row[6] == 6


def test_local_blocks_reaching_before_block_zero():
    # Query in block 1 with local_blocks=4: forced {0, 1}; two valid entries, then padding.
    qi = torch.randn(1, 2, 8)
    ki = torch.randn(6, 8)
    indices = msattn.msa_select(qi, ki, block_size=4, topk=5, local_blocks=4, backend="reference")
    assert indices.shape == (2, 1, 5)
    for g in range(2):
        assert indices[g, 0].tolist() == [0, 1, -1, -1, -1]


# ----------------------------------------------------------------------------------------------
# Structural equalities
# ----------------------------------------------------------------------------------------------

def test_varlen_equals_per_sequence_calls():
    lens_q, lens_k = [12, 0, 30, 5], [40, 8, 30, 5]
    x = make_inputs(lens_q, lens_k, **SHAPE, seed=21)
    sel = dict(block_size=4, topk=3, init_blocks=1, local_blocks=1)
    indices = msattn.msa_select(x["qi"], x["ki"], **sel, cu_seqlens_q=x["cu_seqlens_q"],
                                cu_seqlens_k=x["cu_seqlens_k"], backend="reference")
    o, lse = msattn.msa_attention(x["q"], x["k"], x["v"], x["qi"], x["ki"], **sel,
                                  cu_seqlens_q=x["cu_seqlens_q"], cu_seqlens_k=x["cu_seqlens_k"],
                                  return_lse=True, backend="reference")
    cq, ck = x["cu_seqlens_q"].tolist(), x["cu_seqlens_k"].tolist()
    for b in range(len(lens_q)):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        idx_b = msattn.msa_select(x["qi"][qs], x["ki"][ks], **sel, cu_seqlens_q=cu([lens_q[b]]),
                                  cu_seqlens_k=cu([lens_k[b]]), backend="reference")
        assert torch.equal(idx_b, indices[:, qs])
        o_b, lse_b = msattn.msa_attention(x["q"][qs], x["k"][ks], x["v"][ks], x["qi"][qs], x["ki"][ks],
                                          **sel, cu_seqlens_q=cu([lens_q[b]]),
                                          cu_seqlens_k=cu([lens_k[b]]), return_lse=True,
                                          backend="reference")
        assert_close(o_b, o[qs], 1e-6)
        assert_close(lse_b, lse[qs], 1e-6)
        if lens_q[b] == lens_k[b]:
            # Without cu_seqlens a varlen call is one sequence with T == S.
            o_n = msattn.msa_attention(x["q"][qs], x["k"][ks], x["v"][ks], x["qi"][qs], x["ki"][ks],
                                       **sel, backend="reference")
            assert_close(o_n, o[qs], 1e-6)


@pytest.mark.parametrize("len_q", [1, 5, 16, 33])
def test_suffix_queries_equal_last_rows_of_prefill(len_q):
    len_k = 47
    x = make_inputs([len_k], [len_k], **SHAPE, seed=31)
    sel = dict(block_size=4, topk=4, init_blocks=1, local_blocks=2)
    idx_full = msattn.msa_select(x["qi"], x["ki"], **sel, backend="reference")
    o_full, lse_full = msattn.msa_attention(x["q"], x["k"], x["v"], x["qi"], x["ki"], **sel,
                                            return_lse=True, backend="reference")
    tail = slice(len_k - len_q, len_k)
    cus = dict(cu_seqlens_q=cu([len_q]), cu_seqlens_k=cu([len_k]))
    idx = msattn.msa_select(x["qi"][tail], x["ki"], **sel, **cus, backend="reference")
    assert torch.equal(idx, idx_full[:, tail])
    o, lse = msattn.msa_attention(x["q"][tail], x["k"], x["v"], x["qi"][tail], x["ki"], **sel, **cus,
                                  return_lse=True, backend="reference")
    assert_close(o, o_full[tail], 1e-6)
    assert_close(lse, lse_full[tail], 1e-6)
    o2, lse2 = msattn.msa_sparse_attention(x["q"][tail], x["k"], x["v"], idx, block_size=4, **cus,
                                           backend="reference")
    assert_close(o2, o_full[tail], 1e-6)
    assert_close(lse2, lse_full[tail], 1e-6)
    # Batched decode form (T < S) gives the same.
    o3 = msattn.msa_attention(x["q"][None, tail], x["k"][None], x["v"][None], x["qi"][None, tail],
                              x["ki"][None], **sel, backend="reference")
    assert_close(o3[0], o_full[tail], 1e-6)


@pytest.mark.parametrize("len_q,len_k", [(24, 24), (3, 26)])
def test_batched_equals_varlen(len_q, len_k):
    batch, heads, groups, dim, index_dim = 3, 6, 2, 8, 8
    gen = torch.Generator().manual_seed(41)
    q = torch.randn(batch, len_q, heads, dim, generator=gen)
    k = torch.randn(batch, len_k, groups, dim, generator=gen)
    v = torch.randn(batch, len_k, groups, dim, generator=gen)
    qi = torch.randn(batch, len_q, groups, index_dim, generator=gen)
    ki = torch.randn(batch, len_k, index_dim, generator=gen)
    sel = dict(block_size=4, topk=3, init_blocks=0, local_blocks=2)
    cus = dict(cu_seqlens_q=cu([len_q] * batch), cu_seqlens_k=cu([len_k] * batch))
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731

    idx_b = msattn.msa_select(qi, ki, **sel, backend="reference")
    idx_v = msattn.msa_select(flat(qi), flat(ki), **sel, **cus, backend="reference")
    assert idx_b.shape == (batch, groups, len_q, 3) and idx_b.dtype == torch.int32
    assert idx_v.shape == (groups, batch * len_q, 3)
    # [B, G, T, k] vs [G, B*T, k]
    assert torch.equal(idx_b.permute(1, 0, 2, 3).reshape(groups, batch * len_q, 3), idx_v)

    o_b, lse_b = msattn.msa_sparse_attention(q, k, v, idx_b, block_size=4, backend="reference")
    o_v, lse_v = msattn.msa_sparse_attention(flat(q), flat(k), flat(v), idx_v, block_size=4, **cus,
                                             backend="reference")
    assert o_b.shape == (batch, len_q, heads, dim) and lse_b.shape == (batch, len_q, heads)
    assert lse_b.dtype == torch.float32
    assert_close(flat(o_b), o_v, 1e-6)
    assert_close(flat(lse_b), lse_v, 1e-6)

    o_f, lse_f = msattn.msa_attention(q, k, v, qi, ki, **sel, return_lse=True, backend="reference")
    assert o_f.shape == (batch, len_q, heads, dim)
    assert_close(o_f, o_b, 1e-6)
    assert_close(lse_f, lse_b, 1e-6)
    o_a = msattn.msa_attention(q, k, v, qi, ki, **sel, backend="auto")
    assert torch.equal(o_a, o_f)


@pytest.mark.parametrize("group_size", [1, 3, 6, 16])
def test_group_sizes_match_spec(group_size):
    groups = 2 if group_size < 16 else 1
    run_and_check([21, 6], [21, 14], heads=groups * group_size, groups=groups, dim=8, index_dim=8,
                  block_size=4, topk=3, seed=group_size)


def test_heads_of_a_group_share_the_group_selection():
    # All heads of one group see the same keys: with identical q rows for the heads of a group,
    # their outputs must be identical, while different groups differ.
    x = make_inputs([30], [30], heads=6, groups=2, dim=8, index_dim=8, seed=9)
    q = x["q"].clone()
    q[:, 1:3] = q[:, :1]
    q[:, 4:6] = q[:, 3:4]
    o = msattn.msa_attention(q, x["k"], x["v"], x["qi"], x["ki"], block_size=4, topk=2,
                             backend="reference")
    assert torch.equal(o[:, 0], o[:, 1]) and torch.equal(o[:, 0], o[:, 2])
    assert torch.equal(o[:, 3], o[:, 5])
    assert not torch.allclose(o[:, 0], o[:, 3])


@pytest.mark.parametrize("block_size", [8, 16, 32, 64, 128, 256])
def test_block_sizes_match_spec(block_size):
    len_k = 3 * block_size + 5  # four blocks, the last one partial; top-2 is truly sparse
    len_q = 6
    run_and_check([len_q], [len_k], heads=2, groups=1, dim=8, index_dim=8, block_size=block_size,
                  topk=2, seed=block_size)


@pytest.mark.parametrize("block_size", [1, 2])
def test_tiny_block_sizes_match_spec(block_size):
    run_and_check([19, 4], [19, 11], **SHAPE, block_size=block_size, topk=5, init_blocks=1,
                  local_blocks=2, seed=block_size)


@pytest.mark.parametrize("topk,init_blocks,local_blocks", [
    (1, 0, 1), (2, 0, 1), (2, 1, 1), (3, 0, 3), (4, 2, 2), (7, 1, 1), (40, 0, 1), (40, 3, 4)])
def test_topk_budgets_match_spec(topk, init_blocks, local_blocks):
    run_and_check([26, 3], [26, 41], **SHAPE, block_size=4, topk=topk, init_blocks=init_blocks,
                  local_blocks=local_blocks, seed=topk + init_blocks + local_blocks)


# ----------------------------------------------------------------------------------------------
# Sparse attention on hand-made indices
# ----------------------------------------------------------------------------------------------

def test_all_padding_row_gives_zero_output_and_minus_inf_lse():
    x = make_inputs([10], [10], **SHAPE, seed=13)
    indices = msattn.msa_select(x["qi"], x["ki"], block_size=4, topk=2, backend="reference")
    indices[1, 7] = -1  # group 1, row 7: nothing selected
    indices[0, 2] = torch.tensor([2, -1], dtype=torch.int32)  # only a block after the query (t=2)
    o, lse = msattn.msa_sparse_attention(x["q"], x["k"], x["v"], indices, block_size=4,
                                         backend="reference")
    heads_g1 = slice(2, 4)  # heads of group 1 (group size 2)
    assert torch.equal(o[7, heads_g1], torch.zeros(2, 16))
    assert torch.isneginf(lse[7, heads_g1]).all()
    assert torch.equal(o[2, :2], torch.zeros(2, 16)) and torch.isneginf(lse[2, :2]).all()
    assert torch.isfinite(lse[7, :2]).all() and o[7, :2].abs().sum() > 0  # other group unaffected
    assert torch.isfinite(lse[2, 2:]).all()
    assert not torch.isnan(o).any()
    o_spec, lse_spec = spec.attention(x["q"], x["k"], x["v"], indices, [0, 10], [0, 10], block_size=4)
    assert_close(o, o_spec, OUT_ATOL)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_spec))
    finite = torch.isfinite(lse_spec)
    assert_close(lse[finite], lse_spec[finite], LSE_ATOL)


def test_sparse_attention_masks_keys_after_the_query_and_past_the_sequence():
    # Hand-made selections that include the own block (causal inside it) and blocks past len_k.
    x = make_inputs([6, 5], [14, 5], **SHAPE, seed=17)
    cus = dict(cu_seqlens_q=x["cu_seqlens_q"], cu_seqlens_k=x["cu_seqlens_k"])
    gen = torch.Generator().manual_seed(0)
    indices = torch.full((2, 11, 3), -1, dtype=torch.int32)
    for g in range(2):
        for r in range(11):
            indices[g, r] = torch.randperm(5, generator=gen)[:3].to(torch.int32)  # ids 0..4, some > own
    o, lse = msattn.msa_sparse_attention(x["q"], x["k"], x["v"], indices, block_size=4, **cus,
                                         backend="reference")
    o_spec, lse_spec = spec.attention(x["q"], x["k"], x["v"], indices, x["cu_seqlens_q"],
                                      x["cu_seqlens_k"], block_size=4)
    assert_close(o, o_spec, OUT_ATOL)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_spec))
    finite = torch.isfinite(lse_spec)
    assert_close(lse[finite], lse_spec[finite], LSE_ATOL)


def test_order_of_valid_entries_does_not_matter():
    x = make_inputs([30], [30], **SHAPE, seed=19)
    indices = msattn.msa_select(x["qi"], x["ki"], block_size=4, topk=4, backend="reference")
    o, lse = msattn.msa_sparse_attention(x["q"], x["k"], x["v"], indices, block_size=4,
                                         backend="reference")
    shuffled = indices.flip(-1).contiguous()  # padding first, own block first
    o2, lse2 = msattn.msa_sparse_attention(x["q"], x["k"], x["v"], shuffled, block_size=4,
                                           backend="reference")
    assert_close(o2, o, 1e-6)
    assert_close(lse2, lse, 1e-6)


# ----------------------------------------------------------------------------------------------
# Property test over random shapes
# ----------------------------------------------------------------------------------------------

@st.composite
def msa_cases(draw):
    batch = draw(st.integers(1, 3))
    lens_k = [draw(st.integers(0, 36)) for _ in range(batch)]
    lens_q = [draw(st.integers(0, n)) for n in lens_k]
    groups = draw(st.integers(1, 3))
    group_size = draw(st.sampled_from([1, 2, 3, 4]))
    init_blocks = draw(st.integers(0, 2))
    local_blocks = draw(st.integers(1, 3))
    return dict(lens_q=lens_q, lens_k=lens_k, groups=groups, heads=groups * group_size,
                dim=draw(st.sampled_from([4, 8, 16])), index_dim=draw(st.sampled_from([1, 4, 8, 32])),
                block_size=draw(st.sampled_from([1, 2, 4, 8, 16])),
                topk=draw(st.integers(init_blocks + local_blocks, init_blocks + local_blocks + 4)),
                init_blocks=init_blocks, local_blocks=local_blocks, seed=draw(st.integers(0, 2**31)),
                integer=draw(st.booleans()))


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=msa_cases())
def test_property_reference_matches_spec(case):
    lens_q, lens_k = case.pop("lens_q"), case.pop("lens_k")
    run_and_check(lens_q, lens_k, **case)
