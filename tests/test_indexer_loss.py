"""The index branch's KL-distillation loss: reference against an independent float64 computation,
the Triton kernels (msattn.ops.indexer_loss) against float64 autograd of the reference."""

import math

import pytest
import torch

from msattn import reference
from msattn.ops.indexer_loss import indexer_loss, indexer_loss_rows
from tests.kernel_cases import DEVICE, cu_seqlens, random_tensor


def _kl_float64(q, k, qi, ki, indices, cu_q, cu_k, *, block_size, softmax_scale, lse=None):
    """The loss from its definition: dense softmaxes over each row's masked keys, float64."""
    num_heads, num_groups = q.shape[1], k.shape[1]
    group_size = num_heads // num_groups
    total = torch.zeros((), dtype=torch.float64)
    bounds = cu_q.tolist(), cu_k.tolist()
    for b in range(len(bounds[0]) - 1):
        q_start, q_end = bounds[0][b], bounds[0][b + 1]
        k_start, k_end = bounds[1][b], bounds[1][b + 1]
        len_q, len_k = q_end - q_start, k_end - k_start
        if len_q == 0:
            continue
        key = torch.arange(len_k)
        position = torch.arange(len_k - len_q, len_k)
        causal = key[None, :] <= position[:, None]  # [T, S]
        for g in range(num_groups):
            if indices is None:
                mask = causal
            else:
                chosen = indices[g, q_start:q_end].long().cpu()  # [T, topk]
                member = (chosen[:, :, None] == (key // block_size)[None, None, :]) & (chosen[:, :, None] >= 0)
                mask = causal & member.any(dim=1)
            teacher = torch.zeros(len_q, len_k, dtype=torch.float64)
            for h in range(g * group_size, (g + 1) * group_size):
                scores = q[q_start:q_end, h].double().cpu() @ k[k_start:k_end, g].double().cpu().T
                scores = scores * softmax_scale
                if lse is None:
                    probs = torch.softmax(scores.masked_fill(~mask, -math.inf), dim=-1)
                else:
                    probs = torch.exp(scores - lse[q_start:q_end, h].double().cpu()[:, None])
                teacher += torch.where(mask, probs, 0.0)
            p = teacher / group_size
            s = qi[q_start:q_end, g].double().cpu() @ ki[k_start:k_end].double().cpu().T
            log_q = torch.log_softmax((s * qi.shape[-1] ** -0.5).masked_fill(~mask, -math.inf), dim=-1)
            total += torch.where(mask & (p > 0), p * (torch.log(p) - log_q), 0.0).sum()
    return total / (q.shape[0] * num_groups)


def _random_selection(cu_q, cu_k, groups, *, block_size, topk, generator):
    """Distinct random block ids per row (blocks after the query included), some -1 anywhere."""
    rows = []
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for b in range(len(bq) - 1):
        num_blocks = -(-(bk[b + 1] - bk[b]) // block_size)
        for _ in range(bq[b + 1] - bq[b]):
            row = []
            for _ in range(groups):
                chosen = torch.randperm(max(num_blocks, 1), generator=generator)[:topk]
                chosen = torch.cat([chosen, torch.full((topk - chosen.numel(),), -1)])
                drop = torch.rand(topk, generator=generator) < 0.25
                row.append(torch.where(drop, -1, chosen))
            rows.append(torch.stack(row))
    if not rows:
        return torch.empty(groups, 0, topk, dtype=torch.int32, device=DEVICE)
    return torch.stack(rows, dim=1).to(torch.int32).to(DEVICE)


def _inputs(lens_q, lens_k, heads, groups, head_dim, index_dim, block_size, topk, dtype, *,
            selection="select", use_lse=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    q = random_tensor((sum(lens_q), heads, head_dim), dtype, generator=generator)
    k = random_tensor((sum(lens_k), groups, head_dim), dtype, generator=generator)
    qi = random_tensor((sum(lens_q), groups, index_dim), dtype, generator=generator)
    ki = random_tensor((sum(lens_k), index_dim), dtype, generator=generator)
    if selection == "dense":
        indices = None
    elif selection == "random":
        indices = _random_selection(cu_q, cu_k, groups, block_size=block_size, topk=topk,
                                    generator=generator)
    else:
        indices = reference.select_blocks(qi.float(), ki.float(), cu_q, cu_k, block_size=block_size,
                                          topk=topk, init_blocks=0, local_blocks=1)
    scale = head_dim ** -0.5
    lse = None
    if use_lse:  # the main branch's log-sum-exp over the same keys
        v = random_tensor(k.shape, dtype, generator=generator)
        if indices is None:
            _, lse = reference.dense_attention(q, k, v, cu_q, cu_k, softmax_scale=scale)
        else:
            _, lse = reference.sparse_attention(q, k, v, indices, cu_q, cu_k,
                                                block_size=block_size, softmax_scale=scale)
    return q, k, qi, ki, indices, cu_q, cu_k, scale, lse


# lens_q, lens_k, heads, groups, head_dim, index_dim, block_size, topk, dtype, selection, use_lse
CASES = [
    ([18], [24], 6, 2, 32, 16, 16, 2, torch.float32, "select", False),  # group 3
    ([20, 9, 0], [50, 9, 5], 6, 1, 16, 32, 16, 3, torch.float32, "select", True),  # varlen, group 6
    ([12], [100], 16, 1, 32, 32, 32, 2, torch.float32, "random", False),  # group 16, -1 anywhere
    ([10], [45], 3, 3, 16, 16, 16, 4, torch.float32, "dense", False),  # dense, group 1, T < S
    ([8, 12], [40, 12], 4, 2, 16, 16, 16, 4, torch.float32, "dense", True),  # dense with lse
    ([16], [150], 4, 2, 32, 16, 64, 2, torch.float32, "random", True),  # block 64, partial block
    ([20], [70], 6, 1, 32, 32, 32, 3, torch.bfloat16, "select", False),  # bf16
    ([10, 6], [30, 40], 6, 2, 16, 16, 16, 4, torch.bfloat16, "dense", True),  # bf16 dense, lse
]


def _case_id(case):
    return f"{case[9]}-g{case[2] // case[3]}-bs{case[6]}-{str(case[8])[6:]}{'-lse' if case[10] else ''}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_reference_matches_float64_definition(case):
    lens_q, lens_k, heads, groups, head_dim, index_dim, block_size, topk, _, selection, use_lse = case
    q, k, qi, ki, indices, cu_q, cu_k, scale, lse = _inputs(
        lens_q, lens_k, heads, groups, head_dim, index_dim, block_size, topk, torch.float64,
        selection=selection, use_lse=use_lse, seed=11)
    expected = _kl_float64(q, k, qi, ki, indices, cu_q, cu_k, block_size=block_size,
                           softmax_scale=scale, lse=lse)
    loss = reference.indexer_loss(q, k, qi, ki, indices, cu_q, cu_k, block_size=block_size,
                                  softmax_scale=scale, lse=lse)
    assert loss.dtype == torch.float64 and loss.shape == ()
    assert abs(float(loss) - float(expected)) <= 1e-10 * abs(float(expected)), (loss, expected)
    loss32 = reference.indexer_loss(q.float(), k.float(), qi.float(), ki.float(), indices, cu_q,
                                    cu_k, block_size=block_size, softmax_scale=scale, lse=lse)
    assert loss32.dtype == torch.float32
    assert abs(float(loss32) - float(expected)) <= 1e-5 * abs(float(expected))


def _covered_keys(indices, cu_q, cu_k, block_size, total_k):
    """Keys in at least one selected block of a query that can see the block."""
    covered = torch.zeros(total_k, dtype=torch.bool)
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for b in range(len(bq) - 1):
        len_q, len_k = bq[b + 1] - bq[b], bk[b + 1] - bk[b]
        for row in range(len_q):
            position = len_k - len_q + row
            for block in indices[:, bq[b] + row].flatten().tolist():
                if block >= 0 and block * block_size <= position:
                    start = bk[b] + block * block_size
                    covered[start:min(start + block_size, bk[b + 1])] = True
    return covered


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_triton_matches_reference(case):
    lens_q, lens_k, heads, groups, head_dim, index_dim, block_size, topk, dtype, selection, use_lse = case
    q, k, qi, ki, indices, cu_q, cu_k, scale, lse = _inputs(
        lens_q, lens_k, heads, groups, head_dim, index_dim, block_size, topk, dtype,
        selection=selection, use_lse=use_lse, seed=3)
    qi64 = qi.detach().double().requires_grad_()
    ki64 = ki.detach().double().requires_grad_()
    expected = reference.indexer_loss(q.double(), k.double(), qi64, ki64, indices, cu_q, cu_k,
                                      block_size=block_size, softmax_scale=scale, lse=lse)
    expected.backward()
    expected = expected.detach()
    qi.requires_grad_()
    ki.requires_grad_()
    q.requires_grad_()  # the teacher is a constant: q and k get no gradient
    k.requires_grad_()
    loss = indexer_loss(q, k, qi, ki, indices, cu_q, cu_k, block_size=block_size,
                        softmax_scale=scale, lse=lse,
                        max_seqlen_k=max(lens_k) if selection == "dense" else None)
    assert loss.dtype == torch.float32 and loss.shape == ()
    loss.backward()
    loss = loss.detach()
    assert q.grad is None and k.grad is None
    assert qi.grad.dtype == dtype and ki.grad.dtype == dtype
    assert abs(float(loss) - float(expected)) <= 1e-4 * abs(float(expected)), (loss, expected)
    for got, want in ((qi.grad, qi64.grad), (ki.grad, ki64.grad)):
        got, want = got.double().cpu(), want.cpu()
        assert torch.isfinite(got).all()
        if dtype == torch.float32:
            error = (got - want).norm() / want.norm()
            assert error < 1e-4, float(error)
        else:
            cosine = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
            assert cosine > 0.999, float(cosine)
    if indices is not None:  # keys in no selected block get exactly zero
        covered = _covered_keys(indices.cpu(), cu_q.cpu(), cu_k.cpu(), block_size, ki.shape[0])
        assert covered.any()
        assert torch.equal(ki.grad.cpu()[~covered], torch.zeros_like(ki.grad.cpu()[~covered]))


def test_selection_with_a_foreign_lse_and_grad_subsets():
    """A selection with the dense attention's lse (the teacher's mass over the selected keys is
    then below 1, so the sum(P) * Q term of the gradient is exercised); the loss without grad
    equals the loss with; only ki requiring grad gets only dki."""
    q, k, qi, ki, indices, cu_q, cu_k, scale, _ = _inputs([20, 9], [60, 9], 4, 2, 16, 16, 16, 2,
                                                          torch.float32, seed=11)
    _, lse = reference.dense_attention(q, k, torch.randn_like(k), cu_q, cu_k, softmax_scale=scale)
    qi64 = qi.double().requires_grad_()
    ki64 = ki.double().requires_grad_()
    expected = reference.indexer_loss(q.double(), k.double(), qi64, ki64, indices, cu_q, cu_k,
                                      block_size=16, softmax_scale=scale, lse=lse)
    expected.backward()
    expected = expected.detach()
    with torch.no_grad():
        no_grad = indexer_loss(q, k, qi, ki, indices, cu_q, cu_k, block_size=16,
                               softmax_scale=scale, lse=lse)
    assert abs(float(no_grad) - float(expected)) <= 1e-4 * abs(float(expected))
    ki.requires_grad_()
    loss = indexer_loss(q, k, qi, ki, indices, cu_q, cu_k, block_size=16, softmax_scale=scale,
                        lse=lse)
    loss.backward()
    assert float(loss) == float(no_grad)
    assert qi.grad is None
    error = (ki.grad.double() - ki64.grad).norm() / ki64.grad.norm()
    assert error < 1e-4, float(error)
    qi.requires_grad_()
    indexer_loss(q, k, qi, ki, indices, cu_q, cu_k, block_size=16, softmax_scale=scale,
                 lse=lse).backward()
    error = (qi.grad.double() - qi64.grad).norm() / qi64.grad.norm()
    assert error < 1e-4, float(error)


def test_reference_gives_no_gradient_to_q_k():
    q, k, qi, ki, indices, cu_q, cu_k, scale, _ = _inputs([10], [30], 4, 2, 16, 16, 16, 2,
                                                         torch.float32, seed=5)
    for t in (q, k, qi, ki):
        t.requires_grad_()
    reference.indexer_loss(q, k, qi, ki, indices, cu_q, cu_k, block_size=16,
                           softmax_scale=scale).backward()
    assert q.grad is None and k.grad is None
    assert qi.grad.abs().sum() > 0 and ki.grad.abs().sum() > 0


@pytest.mark.parametrize("selection", ["select", "dense"])
def test_reference_gradcheck(selection):
    q, k, qi, ki, indices, cu_q, cu_k, scale, _ = _inputs(
        [4, 2], [11, 2], 4, 2, 8, 4, 4, 2, torch.float64, selection=selection, seed=7)
    qi.requires_grad_()
    ki.requires_grad_()

    def loss(qi, ki):
        return reference.indexer_loss(q, k, qi, ki, indices, cu_q, cu_k, block_size=4,
                                      softmax_scale=scale)

    assert torch.autograd.gradcheck(loss, (qi, ki), fast_mode=True)


@pytest.mark.parametrize("selection", ["select", "dense"])
def test_loss_vanishes_when_student_equals_teacher(selection):
    """q[t, h] = qi[t, g] for the heads of g, k[j, g] = ki[j], softmax_scale = Di**-0.5: P == Q."""
    generator = torch.Generator().manual_seed(9)
    lens_q, lens_k, groups, group_size, dim = [12, 7], [40, 7], 2, 3, 32
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    qi = random_tensor((sum(lens_q), groups, dim), torch.float32, generator=generator)
    ki = random_tensor((sum(lens_k), dim), torch.float32, generator=generator)
    q = qi.repeat_interleave(group_size, dim=1).contiguous()
    k = ki[:, None, :].expand(-1, groups, -1).contiguous()
    indices = None
    if selection == "select":
        indices = reference.select_blocks(qi, ki, cu_q, cu_k, block_size=16, topk=2,
                                          init_blocks=0, local_blocks=1)
    args = (q, k, qi.requires_grad_(), ki.requires_grad_(), indices, cu_q, cu_k)
    loss = indexer_loss(*args, block_size=16, softmax_scale=dim ** -0.5)
    expected = reference.indexer_loss(*args, block_size=16, softmax_scale=dim ** -0.5).detach()
    loss.backward()
    loss = loss.detach()
    assert abs(float(expected)) < 1e-6 and abs(float(loss)) < 1e-6, (float(expected), float(loss))
    assert qi.grad.abs().max() < 1e-6 and ki.grad.abs().max() < 1e-6
    with torch.no_grad():
        nonzero = reference.indexer_loss(q, k, qi, ki * 0.5, indices, cu_q, cu_k, block_size=16,
                                         softmax_scale=dim ** -0.5)
    assert float(nonzero) > 1e-3


# ---------------------------------------------------------------------------------------------
# GPU (M3 shape: H=64, G=4, D=Di=128, block 128, topk 16).

def _m3_inputs(length, dtype=torch.bfloat16, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    heads, groups, dim = 64, 4, 128

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device="cuda").to(dtype)

    cu = torch.tensor([0, length], dtype=torch.int32, device="cuda")
    q, k, qi, ki = randn(length, heads, dim), randn(length, groups, dim), randn(length, groups, dim), randn(length, dim)
    indices = reference.select_blocks(qi, ki, cu, cu, block_size=128, topk=16, init_blocks=0,
                                      local_blocks=1)
    return q, k, qi, ki, indices, cu


def _cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


@pytest.mark.gpu
@pytest.mark.parametrize("use_lse", [False, True])
@pytest.mark.parametrize("selection", ["select", "dense"])
def test_m3_16k_matches_reference(selection, use_lse):
    q, k, qi, ki, indices, cu = _m3_inputs(16384)
    if selection == "dense":
        indices = None
    scale = 128 ** -0.5
    lse = None
    if use_lse:
        v = torch.randn_like(k)
        if indices is None:
            _, lse = reference.dense_attention(q, k, v, cu, cu, softmax_scale=scale)
        else:
            _, lse = reference.sparse_attention(q, k, v, indices, cu, cu, block_size=128,
                                                softmax_scale=scale)
    qi_ref, ki_ref = qi.detach().float().requires_grad_(), ki.detach().float().requires_grad_()
    expected = reference.indexer_loss(q, k, qi_ref, ki_ref, indices, cu, cu, block_size=128,
                                      softmax_scale=scale, lse=lse)
    expected.backward()
    qi.requires_grad_()
    ki.requires_grad_()
    loss = indexer_loss(q, k, qi, ki, indices, cu, cu, block_size=128, softmax_scale=scale,
                        lse=lse, max_seqlen_k=16384)
    loss.backward()
    assert abs(float(loss) - float(expected)) <= 1e-3 * abs(float(expected)), (float(loss), float(expected))
    assert _cosine(qi.grad, qi_ref.grad) > 0.999 and _cosine(ki.grad, ki_ref.grad) > 0.999


@pytest.mark.gpu
def test_m3_64k_rows_match_reference():
    """64K tokens: the kernels' loss terms and dqi of a run of rows against the reference on the
    sub-problem of those rows (keys truncated after the last: exact, by causality)."""
    length, first, last = 65536, 60000, 60256
    q, k, qi, ki, indices, cu = _m3_inputs(length, seed=1)
    scale = 128 ** -0.5
    rows = indexer_loss_rows(q, k, qi, ki, indices, cu, cu, block_size=128, softmax_scale=scale)
    qi.requires_grad_()
    ki.requires_grad_()
    indexer_loss(q, k, qi, ki, indices, cu, cu, block_size=128, softmax_scale=scale).backward()
    assert torch.isfinite(ki.grad).all()
    sub_q = torch.tensor([0, last - first], dtype=torch.int32, device="cuda")
    sub_k = torch.tensor([0, last], dtype=torch.int32, device="cuda")
    qi_ref = qi.detach()[first:last].float().requires_grad_()
    expected = reference.indexer_loss(q[first:last], k[:last], qi_ref, ki.detach()[:last],
                                      indices[:, first:last].contiguous(), sub_q, sub_k,
                                      block_size=128, softmax_scale=scale)
    expected.backward()
    got = rows[first:last].sum() / ((last - first) * 4)
    assert abs(float(got) - float(expected)) <= 1e-3 * abs(float(expected))
    assert _cosine(qi.grad[first:last], qi_ref.grad) > 0.999
