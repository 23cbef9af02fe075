"""The dense fallback of ``msa_attention(backend="auto")``: when it is taken, and on a GPU that it
equals the reference (MSA over every causal block)."""

from __future__ import annotations

import pytest
import torch

import msattn
from msattn import dispatch
from msattn.ops import dense
from tests.kernel_cases import DEVICE, cu_seqlens, random_tensor

M3 = dict(block_size=128, topk=16)


def _inputs(lens_q, lens_k, heads, groups, head_dim, dtype, device=DEVICE, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: random_tensor(shape, dtype, generator=gen, device=device)  # noqa: E731
    total_q, total_k = sum(lens_q), sum(lens_k)
    return dict(q=rand(total_q, heads, head_dim), k=rand(total_k, groups, head_dim),
                v=rand(total_k, groups, head_dim), qi=rand(total_q, groups, 32), ki=rand(total_k, 32),
                cu_seqlens_q=cu_seqlens(lens_q, device), cu_seqlens_k=cu_seqlens(lens_k, device))


def _path(x, backend, block_size, topk):
    """The dispatch decision for ``msa_attention`` on the inputs ``x``."""
    path = dispatch.attention_path(backend, x["q"].device, x["q"].dtype, block_size=block_size,
                                   topk=topk, head_dim=x["q"].shape[-1], index_dim=x["qi"].shape[-1],
                                   max_seqlen_k=int(x["cu_seqlens_k"].diff().max())
                                   if "cu_seqlens_k" in x else x["k"].shape[1])
    return path.select, path.attention


def _run(x, backend, **sel):
    args = {name: x[name] for name in ("q", "k", "v", "qi", "ki")}
    cus = {name: x[name] for name in ("cu_seqlens_q", "cu_seqlens_k") if name in x}
    return msattn.msa_attention(*args.values(), **sel, **cus, return_lse=True, backend=backend)


# ----------------------------------------------------------------------------------------------
# The decision (CPU)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_len_k,topk,block_size,exact", [
    (0, 16, 128, True), (1, 1, 16, True), (2047, 16, 128, True), (2048, 16, 128, True),
    (2049, 16, 128, False), (64, 3, 16, False), (48, 3, 16, True)])
def test_dense_is_exact(max_len_k, topk, block_size, exact):
    assert dense.dense_is_exact(max_len_k, topk, block_size) is exact


CUDA = torch.device("cuda")


@pytest.mark.parametrize("backend,device,dtype,head_dim,possible", [
    ("auto", CUDA, torch.bfloat16, 128, True), ("auto", CUDA, torch.float16, 64, True),
    ("auto", CUDA, torch.bfloat16, 256, True), ("auto", CUDA, torch.bfloat16, 8, True),
    ("triton", CUDA, torch.bfloat16, 128, False), ("reference", CUDA, torch.bfloat16, 128, False),
    ("auto", torch.device("cpu"), torch.bfloat16, 128, False),
    ("auto", CUDA, torch.float32, 128, False), ("auto", CUDA, torch.bfloat16, 12, False),
    ("auto", CUDA, torch.bfloat16, 264, False)])
def test_dense_possible(backend, device, dtype, head_dim, possible, monkeypatch):
    """The dtype, head dim and backend rules, with the device's flash support forced on."""
    monkeypatch.setattr(dense, "_flash_device", lambda index: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert dispatch.dense_possible(backend, device, dtype, head_dim) is possible


def test_lse_rows_both_layouts():
    """Unpadded ``[H, total_q]`` (torch) and padded ``[B, H, max_q]`` (older builds) give ``[total_q, H]``."""
    lens_q, heads = [3, 0, 5, 1], 4
    cu = cu_seqlens(lens_q, "cpu")
    expected = torch.randn(sum(lens_q), heads)
    assert torch.equal(dense.lse_rows(expected.t().contiguous(), cu, sum(lens_q), heads), expected)
    padded = torch.full((len(lens_q), heads, max(lens_q)), float("nan"))
    for b, (start, length) in enumerate(zip(cu.tolist(), lens_q)):
        padded[b, :, :length] = expected[start:start + length].t()
    out = dense.lse_rows(padded, cu, sum(lens_q), heads)
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    with pytest.raises(RuntimeError, match="log-sum-exp shape"):
        dense.lse_rows(torch.zeros(heads, sum(lens_q) + 1), cu, sum(lens_q), heads)


def test_auto_on_cpu_runs_reference():
    x = _inputs([5, 40], [30, 40], 4, 2, 16, torch.bfloat16, device="cpu")
    assert _path(x, "auto", 16, 3) == ("reference", "reference")
    o, lse = _run(x, "auto", block_size=16, topk=3)  # every sequence <= 48 = topk * block_size
    expected_o, expected_lse = _run(x, "reference", block_size=16, topk=3)
    assert torch.equal(o, expected_o) and torch.equal(lse, expected_lse)


def test_dispatch_plumbing(monkeypatch):
    """With the device check forced (CPU has no flash kernel): the dense call gets the longest
    lengths (given or read from the cu_seqlens), too-long sequences and explicit backends never
    take it, and errors of the op reach the caller (no silent fallback)."""
    x = _inputs([5, 40], [30, 40], 4, 2, 16, torch.bfloat16, device="cpu")
    monkeypatch.setattr(dispatch.dense, "available", lambda device, dtype, head_dim: True)
    calls = []

    def fake_flash(q, k, v, cu_q, cu_k, max_len_q, max_len_k, softmax_scale):
        calls.append((max_len_q, max_len_k, softmax_scale))
        return q * 2, torch.zeros(q.shape[:2])

    monkeypatch.setattr(dense, "flash_varlen", fake_flash)
    assert _path(x, "auto", 16, 3) == ("skipped", "dense")
    o, _ = _run(x, "auto", block_size=16, topk=3)
    assert calls == [(40, 40, 16 ** -0.5)] and torch.equal(o, x["q"] * 2)
    msattn.msa_attention(*(x[n] for n in ("q", "k", "v", "qi", "ki")), block_size=16, topk=3,
                         cu_seqlens_q=x["cu_seqlens_q"], cu_seqlens_k=x["cu_seqlens_k"],
                         max_seqlen_q=7, max_seqlen_k=41)
    assert calls[-1] == (7, 41, 16 ** -0.5)  # given lengths are used as they are
    batched = {name: x[name][:40].unsqueeze(0) for name in ("q", "k", "v", "qi", "ki")}
    _run(batched, "auto", block_size=16, topk=3, softmax_scale=0.5)
    assert calls[-1] == (40, 40, 0.5)
    assert _path(x, "auto", 16, 2) == ("reference", "reference")  # 40 > 32 = topk * block_size
    expected = _run(x, "reference", block_size=16, topk=2)
    o, lse = _run(x, "auto", block_size=16, topk=2)
    assert len(calls) == 3 and torch.equal(o, expected[0]) and torch.equal(lse, expected[1])
    _run(x, "reference", block_size=16, topk=3)
    assert len(calls) == 3

    def failing_flash(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(dense, "flash_varlen", failing_flash)
    with pytest.raises(torch.OutOfMemoryError):
        _run(x, "auto", block_size=16, topk=3)


# ----------------------------------------------------------------------------------------------
# On a GPU: dense equals the reference
# ----------------------------------------------------------------------------------------------

# lens_q, lens_k, heads, groups, head_dim, dtype (M3 selection: block 128, top-16, so <= 2048 keys)
GPU_CASES = [
    ([2048], [2048], 16, 16, 128, torch.bfloat16),  # exactly topk * block_size, group 1
    ([300, 1, 777, 0], [300, 64, 2048, 50], 16, 4, 128, torch.bfloat16),  # varlen, chunked, group 4
    ([64, 500], [1000, 500], 16, 1, 64, torch.float16),  # chunked prefill, group 16
    ([1, 1, 1], [2048, 5, 1000], 16, 4, 128, torch.bfloat16),  # one query per sequence (decode)
]


def _check(o, lse, expected_o, expected_lse):
    assert o.shape == expected_o.shape and o.dtype == expected_o.dtype
    assert lse.shape == expected_lse.shape and lse.dtype == torch.float32
    error = (o.float() - expected_o.float()).norm() / expected_o.float().norm()
    assert error < 2e-2, float(error)
    assert (lse - expected_lse).abs().max() < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[f"case{i}" for i in range(len(GPU_CASES))])
@pytest.mark.parametrize("init_blocks", [0, 1])
def test_gpu_dense_matches_reference(case, init_blocks):
    lens_q, lens_k, heads, groups, head_dim, dtype = case
    x = _inputs(lens_q, lens_k, heads, groups, head_dim, dtype)
    sel = dict(**M3, init_blocks=init_blocks, local_blocks=1)
    assert _path(x, "auto", 128, 16) == ("skipped", "dense")
    o, lse = _run(x, "auto", **sel)
    _check(o, lse, *_run(x, "reference", **sel))


@pytest.mark.gpu
@pytest.mark.parametrize("len_q", [1000, 600])
def test_gpu_dense_batched(len_q):
    x = _inputs([len_q] * 2, [1000] * 2, 16, 4, 128, torch.bfloat16)
    batched = {name: x[name].view(2, -1, *x[name].shape[1:]) for name in ("q", "qi")}
    batched.update({name: x[name].view(2, 1000, *x[name].shape[1:]) for name in ("k", "v", "ki")})
    assert _path(batched, "auto", **M3) == ("skipped", "dense")
    o, lse = _run(batched, "auto", **M3)
    assert o.shape == (2, len_q, 16, 128) and lse.shape == (2, len_q, 16)
    _check(o, lse, *_run(batched, "reference", **M3))


@pytest.mark.gpu
def test_gpu_long_or_explicit_backend_takes_sparse_path():
    x = _inputs([100, 2049], [100, 2049], 16, 4, 128, torch.bfloat16)  # one sequence > 2048
    assert _path(x, "auto", **M3) == ("triton", "triton")
    short = _inputs([100], [2048], 16, 4, 128, torch.bfloat16)
    assert _path(short, "auto", **M3) == ("skipped", "dense")
    assert _path(short, "triton", **M3) == ("triton", "triton")
    as_float = {**short, "q": short["q"].float(), "k": short["k"].float(), "v": short["v"].float()}
    assert _path(as_float, "auto", **M3) == ("triton", "triton")  # float32: no flash kernel
    _check(*_run(as_float, "auto", **M3), *_run(as_float, "reference", **M3))
