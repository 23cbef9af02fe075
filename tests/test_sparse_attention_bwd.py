"""Backward of the Triton sparse attention (msattn.ops.sparse_attention_bwd) against float64 torch
autograd through the exact reference (CPU interpreter), and against a chunked float32 reference
backward at the M3 shape (GPU only)."""

import math

import pytest
import torch

from msattn import reference
from msattn.ops.selection_csr import build_block_csr
from msattn.ops.sparse_attention import sparse_attention
from msattn.ops.sparse_attention_bwd import (INTERPRETER_CONFIG, BackwardConfig,
                                             SparseAttentionFunction, launch_config,
                                             sparse_attention_autograd, sparse_attention_backward)
from tests.kernel_cases import DEVICE, cu_seqlens, index_inputs, random_tensor

# lens_q, lens_k, heads, groups, head_dim, block_size, topk
# (CPU-interpreter sized: the query-outer dQ and the forward's combine run a program per
# (token, group), so tokens x groups stay small.)
CASES = {
    "group1": ([40], [40], 2, 2, 32, 16, 3),
    "varlen_group3_partial": ([16, 24, 0, 3], [60, 24, 9, 37], 6, 2, 16, 32, 3),
    "t_lt_s_group6": ([24], [150], 12, 2, 32, 64, 2),
    "group16": ([30], [75], 16, 1, 16, 16, 4),
}


def _random_selection(lens_q, lens_k, groups, block_size, topk, generator, *, own=0.9, pad=0.15):
    """Random distinct block ids per (group, token): blocks anywhere in the sequence (also after
    the query), the query's own block with probability ``own``, ``-1`` padding with ``pad``."""
    rows = []
    for len_q, len_k in zip(lens_q, lens_k):
        num_blocks = max(1, math.ceil(len_k / block_size))
        for t in range(len_q):
            position = len_k - len_q + t
            per_group = []
            for _ in range(groups):
                order = torch.randperm(num_blocks + 1, generator=generator).tolist()
                chosen = [b for b in order if b < num_blocks][:topk]  # +1: sometimes fewer
                own_block = position // block_size
                if own_block not in chosen and float(torch.rand((), generator=generator)) < own:
                    chosen[0] = own_block
                chosen = [b if float(torch.rand((), generator=generator)) >= pad else -1 for b in chosen]
                per_group.append(chosen + [-1] * (topk - len(chosen)))
            rows.append(per_group)
    if not rows:
        return torch.empty(groups, 0, topk, dtype=torch.int32, device=DEVICE)
    return torch.tensor(rows, dtype=torch.int32).transpose(0, 1).contiguous().to(DEVICE)


def _inputs(lens_q, lens_k, heads, groups, head_dim, block_size, topk, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = random_tensor((sum(lens_q), heads, head_dim), dtype, generator=generator)
    k = random_tensor((sum(lens_k), groups, head_dim), dtype, generator=generator)
    v = random_tensor((sum(lens_k), groups, head_dim), dtype, generator=generator)
    do = random_tensor((sum(lens_q), heads, head_dim), dtype, generator=generator)
    dlse = random_tensor((sum(lens_q), heads), torch.float32, generator=generator)
    indices = _random_selection(lens_q, lens_k, groups, block_size, topk, generator)
    return q, k, v, do, dlse, indices, cu_seqlens(lens_q), cu_seqlens(lens_k)


def _reference_grads(q, k, v, indices, cu_q, cu_k, do, dlse, *, block_size, scale):
    """dq, dk, dv (float64) by torch autograd through the reference on float64 copies."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o, lse = reference.sparse_attention(*leaves, indices, cu_q, cu_k, block_size=block_size,
                                        softmax_scale=scale)
    loss = (o * do.double()).sum()
    if dlse is not None:
        loss = loss + (lse.masked_fill(~torch.isfinite(lse), 0.0) * dlse.double()).sum()
    grads = torch.autograd.grad(loss, leaves)
    assert all(torch.isfinite(g).all() for g in grads)
    return grads


def _poisoned(*tensors):
    return tuple(torch.full_like(t, float("nan")) for t in tensors)


def _triton_grads(q, k, v, indices, cu_q, cu_k, do, dlse, *, block_size, scale,
                  triton_forward=False, **kwargs):
    """The Triton backward (into NaN-filled outputs) of the forward's (o, lse): the Triton
    forward's, or (faster in the interpreter) the reference's in the same dtypes."""
    forward = sparse_attention if triton_forward else reference.sparse_attention
    o, lse = forward(q, k, v, indices, cu_q, cu_k, block_size=block_size, softmax_scale=scale)
    return sparse_attention_backward(do, q, k, v, o, lse, indices, cu_q, cu_k,
                                     block_size=block_size, softmax_scale=scale, dlse=dlse,
                                     out=_poisoned(q, k, v), **kwargs)


def _rel_error(actual, expected):
    expected = expected.double()
    return float((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30))


def _cosine(actual, expected):
    return float(torch.nn.functional.cosine_similarity(actual.double().flatten(),
                                                       expected.double().flatten(), dim=0))


def _check_fp32(grads, expected, tol=1e-4):
    for name, grad, ref in zip(("dq", "dk", "dv"), grads, expected):
        assert grad.dtype == torch.float32 and not grad.isnan().any(), name
        assert _rel_error(grad, ref) < tol, (name, _rel_error(grad, ref))


def _check_16bit(grads, expected, cos_tol=0.999, rel_tol=2e-2):
    for name, grad, ref in zip(("dq", "dk", "dv"), grads, expected):
        assert not grad.isnan().any(), name
        assert _cosine(grad, ref) > cos_tol, (name, _cosine(grad, ref))
        assert _rel_error(grad, ref) < rel_tol, (name, _rel_error(grad, ref))


def _config(**changes):
    return BackwardConfig(**{**INTERPRETER_CONFIG.__dict__, **changes})


@pytest.mark.parametrize("dq_mode", ["atomic", "query"])
@pytest.mark.parametrize("name", list(CASES))
def test_backward_matches_reference_fp32(name, dq_mode):
    lens_q, lens_k, heads, groups, head_dim, block_size, topk = CASES[name]
    q, k, v, do, dlse, indices, cu_q, cu_k = _inputs(lens_q, lens_k, heads, groups, head_dim,
                                                     block_size, topk, torch.float32)
    dlse = dlse if name in ("group1", "t_lt_s_group6") else None  # lse in the loss or not
    scale = head_dim ** -0.5
    grads = _triton_grads(q, k, v, indices, cu_q, cu_k, do, dlse, block_size=block_size,
                          scale=scale, config=_config(dq_mode=dq_mode))
    expected = _reference_grads(q, k, v, indices, cu_q, cu_k, do, dlse, block_size=block_size,
                                scale=scale)
    _check_fp32(grads, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_16bit(dtype):
    q, k, v, do, dlse, indices, cu_q, cu_k = _inputs([30, 10], [100, 10], 6, 2, 32, 32, 3, dtype,
                                                     seed=3)
    grads = _triton_grads(q, k, v, indices, cu_q, cu_k, do, dlse, block_size=32, scale=32 ** -0.5,
                          triton_forward=dtype == torch.bfloat16)
    assert all(g.dtype == dtype for g in grads)
    expected = _reference_grads(q, k, v, indices, cu_q, cu_k, do, dlse, block_size=32,
                                scale=32 ** -0.5)
    _check_16bit(grads, expected)


ATOMICS = {"elementwise": {"bulk_dq": False}, "bulk": {"bulk_dq": True}}


@pytest.mark.parametrize("atomics", list(ATOMICS))
def test_split_buckets_and_key_tiles(atomics):
    """Every token selects block 0: its bucket takes many programs (float32 atomics for dK, dV
    and dQ: elementwise, or one piece per entry with bulk_dq); 16-key tiles of 64-key blocks
    (four programs a bucket)."""
    lens = [80]
    q, k, v, do, dlse, _, cu_q, cu_k = _inputs(lens, lens, 2, 1, 16, 64, 2, torch.float32, seed=4)
    indices = torch.full((1, 80, 2), -1, dtype=torch.int32, device=DEVICE)
    indices[:, :, 0] = 0
    indices[:, 64:, 1] = 1
    config = _config(block_m=16, block_n=16, tiles_per_program=1, dq_mode="atomic",
                     **ATOMICS[atomics])
    csr = build_block_csr(indices, cu_q, cu_k, block_size=64, total_k=80, row_start=0,
                          row_end=80, group_size=2, block_m=16, tiles_per_program=1)
    programs = csr.program_start[1:] - csr.program_start[:-1]
    assert programs[:2].tolist() == [10, 2]  # 80 tokens x 2 heads / 16 rows; 16 x 2 / 16
    expected = _reference_grads(q, k, v, indices, cu_q, cu_k, do, dlse, block_size=64, scale=0.25)
    grads = _triton_grads(q, k, v, indices, cu_q, cu_k, do, dlse, block_size=64, scale=0.25,
                          config=config)
    _check_fp32(grads, expected)


def replace_config(config, **changes):
    return BackwardConfig(**{**config.__dict__, **changes})


@pytest.mark.parametrize("atomics", list(ATOMICS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_atomic_dq_in_row_chunks(dtype, atomics):
    """A float32 dQ buffer bound of 7 rows: the KV-outer kernel runs over chunks of query rows
    (dK, dV summed over them in float32); same gradients, and exact zeros for unselected blocks."""
    from msattn.ops.sparse_attention_bwd import atomic_dq_chunk_rows

    q, k, v, do, dlse, indices, cu_q, cu_k = _inputs([30, 10], [100, 10], 6, 2, 32, 32, 3, dtype,
                                                     seed=12)
    row_bytes = 6 * 32 * 4
    config = _config(atomic_dq_max_bytes=row_bytes * 39, atomic_dq_chunk_bytes=row_bytes * 7,
                     **ATOMICS[atomics])
    assert atomic_dq_chunk_rows(config, q) == 7
    assert atomic_dq_chunk_rows(_config(atomic_dq_max_bytes=row_bytes * 40), q) == 40
    assert atomic_dq_chunk_rows(config, q.float()) == 40  # a float32 dQ accumulates in place
    indices = torch.where(indices == 1, -1, indices)  # block 1 (keys 32-63): chosen by nobody
    grads = _triton_grads(q, k, v, indices, cu_q, cu_k, do, dlse, block_size=32, scale=32 ** -0.5,
                          config=config)
    expected = _reference_grads(q, k, v, indices, cu_q, cu_k, do, dlse, block_size=32,
                                scale=32 ** -0.5)
    _check_16bit(grads, expected)
    for grad in grads[1:]:
        assert torch.equal(grad[32:64], torch.zeros_like(grad[32:64]))


@pytest.mark.parametrize("heads,groups,block_m,entries,head_dim", [
    (8, 2, 16, 4, 16), (16, 2, 16, 2, 16), (16, 1, 16, 1, 16), (16, 2, 32, 4, 16),
    (8, 2, 16, 4, 24)])
def test_bulk_dq_by_entry(heads, groups, block_m, entries, head_dim):
    """bulk_dq: each entry's (token's) group-of-heads dQ rows go in as one piece (a TMA bulk
    reduction on sm_90+ GPUs, tl.atomic_add per piece elsewhere), tiles of 1, 2 and 4 entries,
    partial last tiles, a head dim below its power of two, over chunks of query rows; same
    gradients as the reference."""
    from msattn.ops.sparse_attention_bwd import bulk_dq_entries

    q, k, v, do, dlse, indices, cu_q, cu_k = _inputs([21, 9], [70, 9], heads, groups, head_dim,
                                                     16, 3, torch.bfloat16, seed=heads + block_m)
    row_bytes = heads * head_dim * 4
    config = _config(block_m=block_m, tiles_per_program=2, bulk_dq=True,
                     atomic_dq_max_bytes=row_bytes * 20, atomic_dq_chunk_bytes=row_bytes * 11)
    assert bulk_dq_entries(config, heads // groups, head_dim) == entries
    assert bulk_dq_entries(replace_config(config, bulk_dq=False), heads // groups, head_dim) == 0
    grads = _triton_grads(q, k, v, indices, cu_q, cu_k, do, dlse, block_size=16, scale=0.25,
                          config=config)
    expected = _reference_grads(q, k, v, indices, cu_q, cu_k, do, dlse, block_size=16, scale=0.25)
    _check_16bit(grads, expected)


def test_bulk_dq_falls_back():
    """Groups of 3 or 6 heads, or tiles of 8 entries, keep the elementwise atomics."""
    from msattn.ops.sparse_attention_bwd import bulk_dq_entries

    config = _config(block_m=64, bulk_dq=True)
    entries = [bulk_dq_entries(config, g, 128) for g in (3, 6, 8, 16, 32, 64, 128)]
    assert entries == [0, 0, 0, 4, 2, 1, 0]
    assert bulk_dq_entries(config, 16, 30) == 0


@pytest.mark.gpu
def test_gpu_bulk_dq_takes_tma_on_sm90():
    """On sm_90+ GPUs the bulk dQ pieces are TMA reductions (the GPU tests above exercise them);
    older GPUs keep tl.atomic_add per piece."""
    from msattn.ops.utils import sm90_reductions

    major = torch.cuda.get_device_capability()[0]
    assert sm90_reductions(torch.device("cuda")) == (major >= 9)
    assert BackwardConfig().bulk_dq


def test_unselected_blocks_get_exact_zeros():
    """Blocks nobody selects, or only queries before them select, get dK = dV = 0 exactly
    (the outputs start as NaN); rows that see no key get dq = 0."""
    q, k, v, do, dlse, _, cu_q, cu_k = _inputs([40], [80], 4, 2, 16, 16, 2, torch.float32, seed=6)
    indices = torch.full((2, 40, 2), -1, dtype=torch.int32, device=DEVICE)
    # Query rows 0..39 are positions 40..79; blocks 0..4 hold keys 0-15, ..., 64-79.
    indices[0, :, 0] = 0
    indices[0, :, 1] = 4  # visible from row 24 (position 64) on
    indices[0, :10, 1] = 3  # visible to rows 8, 9 only (positions 48, 49)
    indices[1, 10:, 0] = 2
    indices[1, 5, 0] = 4  # position 45 < 64: invisible; rows 0..9 of group 1 see nothing
    for dq_mode, deterministic in (("atomic", False), ("query", False), ("query", True)):
        dq, dk, dv = _triton_grads(q, k, v, indices, cu_q, cu_k, do, dlse, block_size=16,
                                   scale=0.25, config=_config(dq_mode=dq_mode),
                                   deterministic=deterministic)
        expected = _reference_grads(q, k, v, indices, cu_q, cu_k, do, dlse, block_size=16,
                                    scale=0.25)
        _check_fp32((dq, dk, dv), expected)
        for grad in (dk, dv):
            assert torch.equal(grad[16:48, 0], torch.zeros_like(grad[16:48, 0]))  # blocks 1, 2 of group 0
            assert torch.equal(grad[:32, 1], torch.zeros_like(grad[:32, 1]))  # blocks 0, 1 of group 1
            assert torch.equal(grad[48:, 1], torch.zeros_like(grad[48:, 1]))  # 3 unused, 4 invisible
        heads_of_group1 = slice(2, 4)
        assert torch.equal(dq[:10, heads_of_group1], torch.zeros_like(dq[:10, heads_of_group1]))


def test_deterministic_is_bitwise_repeatable():
    case = ([12, 20], [40, 20], 6, 2, 16, 32, 3)
    q, k, v, do, dlse, indices, cu_q, cu_k = _inputs(*case, torch.bfloat16, seed=7)
    runs = [_triton_grads(q, k, v, indices, cu_q, cu_k, do, dlse, block_size=32, scale=0.25,
                          deterministic=True, config=_config(tiles_per_program=1))
            for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    expected = _reference_grads(q, k, v, indices, cu_q, cu_k, do, dlse, block_size=32, scale=0.25)
    _check_16bit(runs[0], expected)


def _autograd_loss(o, lse, do, dlse):
    return (o.float() * do.float()).sum() + (lse.masked_fill(~torch.isfinite(lse), 0.0) * dlse).sum()


@pytest.mark.parametrize("deterministic", [False, True])
def test_autograd_function(deterministic):
    """sparse_attention_autograd: o and lse in the loss; grads of q, k, v; none for the rest."""
    q, k, v, do, dlse, indices, cu_q, cu_k = _inputs([12, 15], [40, 15], 6, 2, 16, 16, 3,
                                                     torch.float32, seed=8)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, lse = sparse_attention_autograd(*leaves, indices, cu_q, cu_k, block_size=16,
                                       softmax_scale=0.25, deterministic=deterministic)
    assert o.requires_grad and lse.requires_grad
    _autograd_loss(o, lse, do, dlse).backward()
    expected = _reference_grads(q, k, v, indices, cu_q, cu_k, do, dlse, block_size=16, scale=0.25)
    _check_fp32([t.grad for t in leaves], expected)


def test_lse_only_loss():
    """A loss of lse alone: o's gradient is None inside backward (delta = -dlse)."""
    q, k, v, _, dlse, indices, cu_q, cu_k = _inputs([20], [60], 4, 1, 16, 16, 3, torch.float32,
                                                    seed=9)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    _, lse = sparse_attention_autograd(*leaves, indices, cu_q, cu_k, block_size=16,
                                       softmax_scale=0.25)
    (lse.masked_fill(~torch.isfinite(lse), 0.0) * dlse).sum().backward()
    expected = _reference_grads(q, k, v, indices, cu_q, cu_k, torch.zeros_like(q), dlse,
                                block_size=16, scale=0.25)
    _check_fp32([leaves[0].grad, leaves[1].grad], expected[:2])
    assert torch.equal(leaves[2].grad, torch.zeros_like(v))  # lse does not depend on v


@pytest.mark.parametrize("which", [(True, False, False), (False, True, True), (False, False, True),
                                   (False, True, False)])
def test_requires_grad_subset(which, monkeypatch):
    """Only the inputs that require grad get one, and the backward skips the others."""
    from msattn.ops import sparse_attention_bwd as module

    q, k, v, do, dlse, indices, cu_q, cu_k = _inputs([20], [50], 4, 1, 16, 16, 3, torch.float32,
                                                     seed=10)
    seen = []
    original = module.sparse_attention_backward

    def spy(*args, **kwargs):
        seen.append(kwargs["needs"])
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "sparse_attention_backward", spy)
    inputs = [t.clone().requires_grad_(flag) for t, flag in zip((q, k, v), which)]
    o, lse = sparse_attention_autograd(*inputs, indices, cu_q, cu_k, block_size=16,
                                       softmax_scale=0.25)
    _autograd_loss(o, lse, do, dlse).backward()
    assert seen == [which]
    expected = _reference_grads(q, k, v, indices, cu_q, cu_k, do, dlse, block_size=16, scale=0.25)
    for tensor, flag, ref in zip(inputs, which, expected):
        if flag:
            assert _rel_error(tensor.grad, ref) < 1e-4
        else:
            assert tensor.grad is None


def test_no_grad_forward():
    q, k, v, _, _, indices, cu_q, cu_k = _inputs([16], [40], 4, 1, 16, 16, 2, torch.float32, seed=11)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with torch.no_grad():
        o, lse = sparse_attention_autograd(*leaves, indices, cu_q, cu_k, block_size=16,
                                           softmax_scale=0.25)
    assert not o.requires_grad and not lse.requires_grad and o.grad_fn is None
    expected_o, expected_lse = sparse_attention(q, k, v, indices, cu_q, cu_k, block_size=16,
                                                softmax_scale=0.25)
    assert torch.equal(o, expected_o) and torch.equal(lse, expected_lse)


def test_config():
    assert launch_config(torch.empty(1)) == INTERPRETER_CONFIG
    with pytest.raises(ValueError, match="dq_mode"):
        BackwardConfig(dq_mode="fast")
    with pytest.raises(ValueError, match="block_m"):
        BackwardConfig(block_m=48)
    with pytest.raises(Exception):  # frozen
        INTERPRETER_CONFIG.block_m = 32
    assert SparseAttentionFunction.apply is not None


def test_reference_gradcheck():
    """The reference is differentiable (float64 gradcheck, o and lse), so autograd through it is
    a valid oracle."""
    generator = torch.Generator().manual_seed(12)
    q = torch.randn(6, 2, 4, generator=generator, dtype=torch.float64).to(DEVICE)
    k = torch.randn(9, 1, 4, generator=generator, dtype=torch.float64).to(DEVICE)
    v = torch.randn(9, 1, 4, generator=generator, dtype=torch.float64).to(DEVICE)
    indices = torch.tensor([[[0, 2], [2, 0], [1, -1], [2, 1], [0, 1], [2, -1]]],
                           dtype=torch.int32, device=DEVICE)
    cu_q, cu_k = cu_seqlens([6]), cu_seqlens([9])

    def function(q, k, v):  # o only: the reference returns lse in float32 even for float64
        return reference.sparse_attention(q, k, v, indices, cu_q, cu_k, block_size=4,
                                          softmax_scale=0.5)[0]

    leaves = [t.requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(function, leaves)


def _chunked_reference_backward(q, k, v, indices, cu_q, cu_k, do, dlse, *, block_size, scale,
                                dtype=torch.float64, chunk=64):
    """Explicit backward of the reference math in ``dtype``, a chunk of query rows at a time
    (bounded memory at 64K tokens on a GPU): returns dq, dk, dv."""
    total_q, num_heads, head_dim = q.shape
    total_k, num_groups, _ = k.shape
    group_size = num_heads // num_groups
    dq = torch.zeros(total_q, num_heads, head_dim, dtype=dtype, device=q.device)
    dk = torch.zeros(total_k * num_groups, head_dim, dtype=dtype, device=q.device)
    dv = torch.zeros_like(dk)
    k_flat, v_flat = k.reshape(-1, head_dim), v.reshape(-1, head_dim)
    offsets = torch.arange(block_size, device=q.device)
    group_ids = torch.arange(num_groups, device=q.device)[:, None, None]
    bounds = zip(cu_q.tolist()[:-1], cu_q.tolist()[1:], cu_k.tolist()[:-1], cu_k.tolist()[1:])
    for q_start, q_end, k_start, k_end in bounds:
        len_q, len_k = q_end - q_start, k_end - k_start
        for i0 in range(0, len_q, chunk):
            i1 = min(len_q, i0 + chunk)
            rows = slice(q_start + i0, q_start + i1)
            positions = torch.arange(len_k - len_q + i0, len_k - len_q + i1, device=q.device)
            blocks = indices[:, rows].long()
            keys = (blocks[..., None] * block_size + offsets).flatten(-2)  # [G, C, span]
            valid = ((blocks >= 0)[..., None].expand(-1, -1, -1, block_size).flatten(-2)
                     & (keys <= positions[None, :, None]) & (keys < len_k))
            flat = (k_start + keys.clamp(0, max(len_k - 1, 0))) * num_groups + group_ids
            k_sel, v_sel = k_flat[flat].to(dtype), v_flat[flat].to(dtype)  # [G, C, span, D]
            shape = (i1 - i0, num_groups, group_size, head_dim)
            q_c = q[rows].to(dtype).view(shape).transpose(0, 1)  # [G, C, gs, D]
            do_c = do[rows].to(dtype).view(shape).transpose(0, 1)
            scores = torch.einsum("gchd,gcld->gchl", q_c, k_sel) * scale
            scores = scores.masked_fill(~valid[:, :, None, :], -math.inf)
            lse = torch.logsumexp(scores, dim=-1)
            p = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
            o = torch.einsum("gchl,gcld->gchd", p, v_sel)
            delta = (do_c * o).sum(-1)
            if dlse is not None:
                delta = delta - dlse[rows].to(dtype).view(shape[:-1]).transpose(0, 1)
            ds = p * (torch.einsum("gchd,gcld->gchl", do_c, v_sel) - delta[..., None])
            dq[rows] = (torch.einsum("gchl,gcld->gchd", ds, k_sel) * scale).transpose(0, 1) \
                .reshape(i1 - i0, num_heads, head_dim)
            dk.index_add_(0, flat.flatten(),
                          (torch.einsum("gchl,gchd->gcld", ds, q_c) * scale).reshape(-1, head_dim))
            dv.index_add_(0, flat.flatten(), torch.einsum("gchl,gchd->gcld", p, do_c).reshape(-1, head_dim))
    return dq, dk.view(k.shape), dv.view(v.shape)


def test_chunked_reference_backward_matches_autograd():
    """The explicit backward the GPU tests use equals autograd through the reference."""
    case = ([16, 24, 0, 3], [60, 24, 9, 37], 6, 2, 16, 32, 3)
    q, k, v, do, dlse, indices, cu_q, cu_k = _inputs(*case, torch.float32, seed=13)
    expected = _reference_grads(q, k, v, indices, cu_q, cu_k, do, dlse, block_size=32, scale=0.25)
    actual = _chunked_reference_backward(q, k, v, indices, cu_q, cu_k, do, dlse, block_size=32,
                                         scale=0.25, chunk=16)
    for grad, ref in zip(actual, expected):
        assert _rel_error(grad, ref) < 1e-12


# ----------------------------------------------------------------------------------------------
# GPU: the M3 shape (64 heads, 4 KV heads, D = 128, block 128, top-16) in bf16.
# ----------------------------------------------------------------------------------------------

def _m3_inputs(lens_q, lens_k, seed=0):
    generator = torch.Generator().manual_seed(seed)
    total_q, total_k = sum(lens_q), sum(lens_k)
    q = random_tensor((total_q, 64, 128), torch.bfloat16, generator=generator)
    k = random_tensor((total_k, 4, 128), torch.bfloat16, generator=generator)
    v = random_tensor((total_k, 4, 128), torch.bfloat16, generator=generator)
    do = random_tensor((total_q, 64, 128), torch.bfloat16, generator=generator)
    dlse = random_tensor((total_q, 64), torch.float32, generator=generator)
    qi, ki, cu_q, cu_k = index_inputs(lens_q, lens_k, 4, 32, torch.float32, seed=seed + 1)
    indices = reference.select_blocks(qi, ki, cu_q, cu_k, block_size=128, topk=16,
                                      init_blocks=0, local_blocks=1)
    return q, k, v, do, dlse, indices, cu_q, cu_k


@pytest.mark.gpu
@pytest.mark.parametrize("lens_q,lens_k", [([8192], [8192]), ([3000, 1, 20000], [9000, 50000, 20000]),
                                           ([65536], [65536])])
def test_gpu_m3_shape(lens_q, lens_k):
    q, k, v, do, dlse, indices, cu_q, cu_k = _m3_inputs(lens_q, lens_k)
    scale = 128 ** -0.5
    expected = _chunked_reference_backward(q, k, v, indices, cu_q, cu_k, do, dlse, block_size=128,
                                           scale=scale, dtype=torch.float32, chunk=64)
    o, lse = sparse_attention(q, k, v, indices, cu_q, cu_k, block_size=128, softmax_scale=scale)
    for dq_mode, deterministic, bulk in (("atomic", False, True), ("atomic", False, False),
                                         ("query", False, True), ("atomic", True, True)):
        config = replace_config(launch_config(q), dq_mode=dq_mode, bulk_dq=bulk)
        grads = sparse_attention_backward(do, q, k, v, o, lse, indices, cu_q, cu_k, block_size=128,
                                          softmax_scale=scale, dlse=dlse, config=config,
                                          deterministic=deterministic, out=_poisoned(q, k, v))
        _check_16bit(grads, expected)


@pytest.mark.gpu
def test_gpu_deterministic_bitwise_and_autograd():
    q, k, v, do, dlse, indices, cu_q, cu_k = _m3_inputs([16384], [16384], seed=2)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o, lse = sparse_attention_autograd(*leaves, indices, cu_q, cu_k, block_size=128,
                                           softmax_scale=128 ** -0.5, deterministic=True)
        _autograd_loss(o, lse, do, dlse).backward()
        runs.append([t.grad for t in leaves])
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    expected = _chunked_reference_backward(q, k, v, indices, cu_q, cu_k, do, dlse, block_size=128,
                                           scale=128 ** -0.5, dtype=torch.float32)
    _check_16bit(runs[0], expected)


@pytest.mark.gpu
def test_gpu_float32_and_random_selection():
    """float32 on the GPU (IEEE dots), user selections with padding and blocks after the query."""
    case = ([300, 700], [1000, 700], 16, 4, 64, 64, 4)
    q, k, v, do, dlse, indices, cu_q, cu_k = _inputs(*case, torch.float32, seed=14)
    for dq_mode in ("atomic", "query"):
        grads = _triton_grads(q, k, v, indices, cu_q, cu_k, do, dlse, block_size=64, scale=0.125,
                              config=replace_config(launch_config(q), dq_mode=dq_mode))
        expected = _reference_grads(q, k, v, indices, cu_q, cu_k, do, dlse, block_size=64,
                                    scale=0.125)
        _check_fp32(grads, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_no_host_synchronisation(deterministic):
    """Forward and backward through the autograd Function never synchronise with the host
    (torch raises on a synchronising call in sync debug mode "error")."""
    q, k, v, do, dlse, indices, cu_q, cu_k = _m3_inputs([3000, 5000], [3000, 9000], seed=3)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        o, lse = sparse_attention_autograd(*leaves, indices, cu_q, cu_k, block_size=128,
                                           softmax_scale=128 ** -0.5, deterministic=deterministic)
        torch.autograd.backward((o, lse), (do, dlse))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
