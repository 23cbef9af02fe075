"""Training through the public API: gradients of msa_attention / msa_sparse_attention reach q, k
and v only, msa_indexer_loss reaches qi and ki only, in both layouts and on both backends
(interpreter on CPU), against float64 torch autograd through the reference."""

from __future__ import annotations

import pytest
import torch

import msattn
from msattn import dispatch
from tests.kernel_cases import DEVICE, cu_seqlens

BACKENDS = ["reference", "triton"] if dispatch.TRITON.available(torch.device(DEVICE)) else ["reference"]
SEL = dict(block_size=16, topk=2, init_blocks=0, local_blocks=1)


def _inputs(lens_q, lens_k, heads=4, groups=2, head_dim=16, index_dim=16, dtype=torch.float32,
            seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE).requires_grad_()

    total_q, total_k = sum(lens_q), sum(lens_k)
    return dict(q=rand(total_q, heads, head_dim), k=rand(total_k, groups, head_dim),
                v=rand(total_k, groups, head_dim), qi=rand(total_q, groups, index_dim),
                ki=rand(total_k, index_dim), cu_seqlens_q=cu_seqlens(lens_q),
                cu_seqlens_k=cu_seqlens(lens_k))


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("backend", BACKENDS)
def test_msa_attention_gradients_reach_q_k_v_only(backend):
    x = _inputs([20, 37], [50, 37])
    cus = dict(cu_seqlens_q=x["cu_seqlens_q"], cu_seqlens_k=x["cu_seqlens_k"])
    o, lse = msattn.msa_attention(x["q"], x["k"], x["v"], x["qi"], x["ki"], **SEL, **cus,
                                  return_lse=True, backend=backend)
    weight = torch.randn_like(o)
    loss = (o * weight).sum() + lse.sum()
    dq, dk, dv, dqi, dki = _grads(loss, [x[n] for n in ("q", "k", "v", "qi", "ki")])
    assert dqi is None and dki is None
    # float64 reference with the same selection
    indices = msattn.msa_select(x["qi"], x["ki"], **SEL, **cus, backend="reference")
    ref = {n: x[n].detach().double().requires_grad_() for n in ("q", "k", "v")}
    o64, lse64 = msattn.reference.sparse_attention(ref["q"], ref["k"], ref["v"], indices,
                                                   x["cu_seqlens_q"], x["cu_seqlens_k"],
                                                   block_size=16, softmax_scale=16 ** -0.5)
    expected = _grads((o64 * weight.double()).sum() + lse64.sum(), list(ref.values()))
    for got, want in zip((dq, dk, dv), expected):
        assert _rel(got, want) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_sparse_attention_gradients_match_varlen(backend):
    x = _inputs([24, 24], [40, 40])
    cus = dict(cu_seqlens_q=x["cu_seqlens_q"], cu_seqlens_k=x["cu_seqlens_k"])
    indices = msattn.msa_select(x["qi"], x["ki"], **SEL, **cus, backend="reference")
    o, _ = msattn.msa_sparse_attention(x["q"], x["k"], x["v"], indices, block_size=16, **cus,
                                       backend=backend)
    weight = torch.randn_like(o)
    varlen = _grads((o * weight).sum(), [x["q"], x["k"], x["v"]])
    qb, kb, vb = (x[n].detach().view(2, -1, *x[n].shape[1:]).requires_grad_() for n in ("q", "k", "v"))
    batched_indices = indices.view(indices.shape[0], 2, 24, -1).transpose(0, 1)
    ob, _ = msattn.msa_sparse_attention(qb, kb, vb, batched_indices, block_size=16, backend=backend)
    batched = _grads((ob * weight.view_as(ob)).sum(), [qb, kb, vb])
    for a, b in zip(varlen, batched):
        assert _rel(b.reshape_as(a), a) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense-warmup"])
def test_indexer_loss_public_api(backend, dense):
    x = _inputs([20, 37], [50, 37], seed=1)
    cus = dict(cu_seqlens_q=x["cu_seqlens_q"], cu_seqlens_k=x["cu_seqlens_k"])
    indices = None if dense else msattn.msa_select(x["qi"], x["ki"], **SEL, **cus, backend="reference")
    lse = None
    if not dense:  # the main branch's normaliser over the same keys
        _, lse = msattn.msa_sparse_attention(x["q"], x["k"], x["v"], indices, block_size=16, **cus,
                                             backend="reference")
    loss = msattn.msa_indexer_loss(x["q"], x["k"], x["qi"], x["ki"], indices, block_size=16,
                                   **cus, lse=lse, backend=backend)
    assert loss.dim() == 0 and loss.dtype == torch.float32 and loss.item() > 0
    dq, dk, dqi, dki = _grads(loss, [x["q"], x["k"], x["qi"], x["ki"]])
    assert dq is None and dk is None
    ref = {n: x[n].detach().double().requires_grad_() for n in ("qi", "ki")}
    expected_loss = msattn.reference.indexer_loss(
        x["q"].detach().double(), x["k"].detach().double(), ref["qi"], ref["ki"], indices,
        x["cu_seqlens_q"], x["cu_seqlens_k"], block_size=16, softmax_scale=16 ** -0.5)
    expected = _grads(expected_loss, [ref["qi"], ref["ki"]])
    assert abs(loss.item() - expected_loss.item()) <= 1e-4 * abs(expected_loss.item())
    assert _rel(dqi, expected[0]) < 1e-4 and _rel(dki, expected[1]) < 1e-4


def test_indexer_loss_batched_and_errors():
    x = _inputs([24, 24], [40, 40], seed=2)
    cus = dict(cu_seqlens_q=x["cu_seqlens_q"], cu_seqlens_k=x["cu_seqlens_k"])
    indices = msattn.msa_select(x["qi"], x["ki"], **SEL, **cus, backend="reference")
    varlen = msattn.msa_indexer_loss(x["q"], x["k"], x["qi"], x["ki"], indices, block_size=16,
                                     **cus, backend="reference")
    b = {n: x[n].detach().view(2, -1, *x[n].shape[1:]) for n in ("q", "k", "qi", "ki")}
    batched_indices = indices.view(indices.shape[0], 2, 24, -1).transpose(0, 1)
    batched = msattn.msa_indexer_loss(b["q"], b["k"], b["qi"], b["ki"], batched_indices,
                                      block_size=16, backend="reference")
    assert torch.allclose(batched, varlen.detach(), rtol=1e-6)
    with pytest.raises(ValueError, match="lse must have one row per query token"):
        msattn.msa_indexer_loss(x["q"], x["k"], x["qi"], x["ki"], indices, block_size=16, **cus,
                                lse=torch.zeros(3, 4, device=DEVICE))
    with pytest.raises(TypeError, match="lse must have dtype"):
        msattn.msa_indexer_loss(x["q"], x["k"], x["qi"], x["ki"], indices, block_size=16, **cus,
                                lse=torch.zeros(48, 4, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="indices must have shape"):
        msattn.msa_indexer_loss(x["q"], x["k"], x["qi"], x["ki"], indices[:1], block_size=16, **cus)


def test_no_grad_forward_and_subset_requires_grad():
    x = _inputs([20], [50], seed=3)
    with torch.no_grad():
        o = msattn.msa_attention(x["q"], x["k"], x["v"], x["qi"], x["ki"], **SEL,
                                 backend=BACKENDS[-1])
    assert not o.requires_grad
    k = x["k"].detach()
    o = msattn.msa_attention(x["q"], k, x["v"].detach(), x["qi"], x["ki"], **SEL,
                             backend=BACKENDS[-1])
    (dq,) = torch.autograd.grad(o.sum(), [x["q"]])
    assert dq.shape == x["q"].shape and torch.isfinite(dq).all()
