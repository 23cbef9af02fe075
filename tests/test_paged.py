"""Paged MSA (decode, chunked prefill, plan/run) against the contiguous reference.

Caches are built from contiguous sequences in a random physical page order, with unused slots
poisoned (NaN) and block tables padded with -1, so a read of a wrong page or slot shows.
"""

import math
from dataclasses import replace

import pytest
import torch

import msattn
from msattn import dispatch, reference
from msattn.backends import triton as triton_backend
from msattn.cache import (dequantize_index_keys, dequantize_kv, gather_paged, quantize_index_keys,
                          quantize_kv, write_paged_cache)
from msattn.ops.indexer import BlockTopkPlan, launch_config, plan_selection, select_blocks_paged
from msattn.ops.nvfp4 import dequantize_nvfp4, quantize_nvfp4
from msattn.ops.paged_attention import (PagedAttentionConfig, plan_paged_attention,
                                        run_paged_attention)
from tests.kernel_cases import (DEVICE, assert_selection_matches, cu_seqlens, paginate,
                                random_tensor)

FP8 = torch.float8_e4m3fn


def _case(lens_q, lens_k, heads, groups, head_dim, index_dim, page_size, dtype, *, fp8=False,
          seed=0):
    """Contiguous inputs, their paged caches and the exact contiguous selection and attention."""
    generator = torch.Generator().manual_seed(seed)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    q = random_tensor((sum(lens_q), heads, head_dim), dtype, generator=generator)
    k = random_tensor((sum(lens_k), groups, head_dim), dtype, generator=generator)
    v = random_tensor((sum(lens_k), groups, head_dim), dtype, generator=generator)
    qi = random_tensor((sum(lens_q), groups, index_dim), dtype, integer=fp8, generator=generator)
    if fp8:  # small integers x powers of two: fp8 keys and their dequantised values are exact
        ki_values = random_tensor((sum(lens_k), index_dim), torch.float32, integer=True,
                                  generator=generator)
        scale = 2.0 ** torch.randint(-3, 4, (sum(lens_k),), generator=generator).float().to(DEVICE)
        ki = ki_values * scale[:, None]
    else:
        ki = random_tensor((sum(lens_k), index_dim), dtype, generator=generator)
    page_generator = torch.Generator().manual_seed(seed + 100)
    k_cache, table = paginate(k, cu_k, page_size, generator=page_generator)
    page_generator = torch.Generator().manual_seed(seed + 100)  # same page order for every cache
    v_cache, _ = paginate(v, cu_k, page_size, generator=page_generator)
    page_generator = torch.Generator().manual_seed(seed + 100)
    if fp8:
        index_cache, _ = paginate(ki_values.to(FP8), cu_k, page_size, generator=page_generator,
                                  fill=0.0)
        page_generator = torch.Generator().manual_seed(seed + 100)
        index_scale, _ = paginate(scale, cu_k, page_size, generator=page_generator)
    else:
        index_cache, _ = paginate(ki, cu_k, page_size, generator=page_generator)
        index_scale = None
    seq_lens = torch.tensor(lens_k, dtype=torch.int32, device=DEVICE)
    return dict(q=q, k=k, v=v, qi=qi, ki=ki, cu_q=cu_q, cu_k=cu_k, k_cache=k_cache,
                v_cache=v_cache, index_cache=index_cache, index_scale=index_scale,
                block_table=table, seq_lens=seq_lens)


# lens_q, lens_k, groups, index_dim, page_size, topk, init_blocks, local_blocks, dtype, fp8, splits
SELECT_CASES = [
    ([1, 1, 1], [300, 17, 64], 2, 16, 16, 4, 0, 1, torch.float32, False, None),  # decode
    ([4, 16, 1], [200, 90, 500], 4, 32, 16, 5, 1, 2, torch.bfloat16, False, 7),  # multi-token, split
    ([1, 3], [700, 129], 4, 16, 32, 4, 0, 1, torch.bfloat16, True, 5),  # fp8 index keys, split
    ([50, 1], [400, 30], 3, 16, 16, 6, 1, 1, torch.float16, False, None),  # chunked prefill
    ([2], [2], 1, 16, 64, 2, 0, 1, torch.float32, True, None),  # shorter than a page
    ([1, 2], [3000, 1500], 4, 16, 16, 8, 0, 1, torch.bfloat16, False, 70),  # two-level merge
    ([3], [2500], 2, 16, 16, 5, 1, 1, torch.bfloat16, True, 40),  # fp8, two-level merge
]


@pytest.mark.parametrize("case", SELECT_CASES, ids=[f"case{i}" for i in range(len(SELECT_CASES))])
def test_paged_select_matches_contiguous(case):
    lens_q, lens_k, groups, index_dim, page_size, topk, init_blocks, local_blocks, dtype, fp8, splits = case
    c = _case(lens_q, lens_k, 2 * groups, groups, 16, index_dim, page_size, dtype, fp8=fp8,
              seed=len(lens_q) + topk)
    kwargs = dict(topk=topk, init_blocks=init_blocks, local_blocks=local_blocks)
    expected = reference.select_blocks(c["qi"].float() if fp8 else c["qi"], c["ki"], c["cu_q"],
                                       c["cu_k"], block_size=page_size, **kwargs)
    out = torch.full_like(expected, 12345)  # poison: every element must be written
    select_blocks_paged(c["qi"], c["index_cache"], c["block_table"], c["cu_q"], c["seq_lens"],
                        index_scale=c["index_scale"], num_splits=splits, out=out, **kwargs)
    assert_selection_matches(out, expected, c["qi"], c["ki"], c["cu_q"], c["cu_k"],
                             block_size=page_size)


@pytest.mark.parametrize("query_scale", [99840.0, 2.0 ** -26])
def test_fp8_keys_with_bf16_queries_of_any_magnitude(query_scale):
    """bf16 index queries beyond fp16's range (or deep in its subnormals) select as the reference:
    the fp8 path quantises each query row with its own float32 scale (max |row| / 448)."""
    c = _case([1, 3], [700, 129], 8, 4, 16, 16, 32, torch.bfloat16, fp8=True, seed=9)
    qi = (c["qi"].float() * query_scale).to(torch.bfloat16)  # exact: small integers x (2^k or 99840)
    kwargs = dict(topk=4, init_blocks=0, local_blocks=1)
    expected = reference.select_blocks(qi.float(), c["ki"], c["cu_q"], c["cu_k"], block_size=32,
                                       **kwargs)
    out = torch.full_like(expected, 12345)
    select_blocks_paged(qi, c["index_cache"], c["block_table"], c["cu_q"], c["seq_lens"],
                        index_scale=c["index_scale"], num_splits=3, out=out, **kwargs)
    assert_selection_matches(out, expected, qi, c["ki"], c["cu_q"], c["cu_k"], block_size=32)


# lens_q, lens_k, heads, groups, head_dim, page_size, topk, dtype, split
ATTENTION_CASES = [  # (..., split, block_n: keys per tile of the kernel)
    ([1, 1, 1], [300, 17, 64], 8, 2, 32, 16, 4, torch.float32, True, 64),  # decode, slots split
    ([1, 1, 1], [300, 17, 64], 8, 2, 32, 16, 4, torch.float32, False, 64),  # decode, one program
    ([4, 16, 1], [200, 90, 500], 12, 2, 16, 16, 5, torch.bfloat16, True, 64),  # group 6
    ([3, 2], [100, 2], 3, 3, 64, 32, 3, torch.float16, False, 16),  # group 1, two tiles a page
    ([1, 3], [700, 260], 8, 2, 32, 64, 3, torch.float32, True, 16),  # four tiles a page, split
    ([2, 5], [129, 400], 4, 1, 32, 64, 4, torch.bfloat16, False, 32),  # partial last tiles
]


def _poisoned(q):
    return (torch.full_like(q, float("nan")),
            torch.full(q.shape[:2], float("nan"), dtype=torch.float32, device=q.device))


def _check(o, lse, expected_o, expected_lse):
    tol = 1e-5 if o.dtype == torch.float32 else 2e-2
    error = (o.float() - expected_o.float()).norm() / expected_o.float().norm()
    assert not o.isnan().any() and error < tol, float(error)
    assert torch.isfinite(lse).all() and (lse - expected_lse).abs().max() < 1e-3


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=[f"case{i}" for i in range(len(ATTENTION_CASES))])
def test_decode_attention_matches_contiguous(case):
    lens_q, lens_k, heads, groups, head_dim, page_size, topk, dtype, split, block_n = case
    c = _case(lens_q, lens_k, heads, groups, head_dim, 16, page_size, dtype, seed=topk)
    indices = reference.select_blocks(c["qi"], c["ki"], c["cu_q"], c["cu_k"], block_size=page_size,
                                      topk=topk, init_blocks=0, local_blocks=1)
    scale = head_dim ** -0.5
    expected_o, expected_lse = reference.sparse_attention(c["q"], c["k"], c["v"], indices, c["cu_q"],
                                                          c["cu_k"], block_size=page_size,
                                                          softmax_scale=scale)
    plan = plan_paged_attention(c["q"].shape[0], len(lens_q), max(lens_q), heads, groups, head_dim,
                                topk, dtype, c["q"].device, split=split,
                                config=PagedAttentionConfig(block_n=block_n))
    for _ in range(2):  # the second launch of the plan finds its merge counters reset
        o, lse = run_paged_attention(plan, c["q"], c["k_cache"], c["v_cache"], indices,
                                     c["block_table"], c["cu_q"], c["seq_lens"],
                                     softmax_scale=scale, out=_poisoned(c["q"]))
        _check(o, lse, expected_o, expected_lse)
    assert not split or not plan.counters.any()


SHARED_CASES = [  # (lens_q, lens_k, heads, groups, head_dim, page_size, topk, dtype, tokens, block_n)
    ([8, 1, 5], [700, 90, 400], 32, 2, 32, 32, 6, torch.float32, 8, 16),  # varlen, 2 tiles a page
    ([16, 3], [900, 300], 12, 2, 16, 64, 4, torch.bfloat16, 4, 64),  # group 6, 4 chunks
    ([2, 7], [40, 129], 3, 3, 64, 16, 3, torch.float16, 2, 16),  # group 1, partial last page
]


@pytest.mark.parametrize("case", SHARED_CASES, ids=[f"case{i}" for i in range(len(SHARED_CASES))])
@pytest.mark.parametrize("correlated", [False, True], ids=["random", "correlated"])
def test_shared_pages_attention_matches_contiguous(case, correlated):
    """The shared-pages kernel (a request's tokens in one program, each page read once) against
    the contiguous reference: random selections and ones that the tokens mostly share."""
    lens_q, lens_k, heads, groups, head_dim, page_size, topk, dtype, tokens, block_n = case
    c = _case(lens_q, lens_k, heads, groups, head_dim, 16, page_size, dtype, seed=tokens)
    qi = c["qi"]
    if correlated:  # every token of a request near its request's first index query
        starts = c["cu_q"][:-1].long().repeat_interleave(torch.tensor(lens_q, device=qi.device))
        qi = qi[starts] + 0.05 * qi
    indices = reference.select_blocks(qi, c["ki"], c["cu_q"], c["cu_k"], block_size=page_size,
                                      topk=topk, init_blocks=0, local_blocks=1)
    scale = head_dim ** -0.5
    expected_o, expected_lse = reference.sparse_attention(c["q"], c["k"], c["v"], indices, c["cu_q"],
                                                          c["cu_k"], block_size=page_size,
                                                          softmax_scale=scale)
    config = PagedAttentionConfig(block_n=block_n, tokens_per_program=tokens)
    plan = plan_paged_attention(c["q"].shape[0], len(lens_q), max(lens_q), heads, groups, head_dim,
                                topk, dtype, c["q"].device, config=config)
    assert not plan.split
    o, lse = run_paged_attention(plan, c["q"], c["k_cache"], c["v_cache"], indices,
                                 c["block_table"], c["cu_q"], c["seq_lens"], softmax_scale=scale,
                                 out=_poisoned(c["q"]))
    _check(o, lse, expected_o, expected_lse)


def test_attention_config_rejects_non_powers_of_two():
    with pytest.raises(ValueError, match="tokens_per_program"):
        PagedAttentionConfig(tokens_per_program=3)
    with pytest.raises(ValueError, match="block_n"):
        PagedAttentionConfig(block_n=48)
    with pytest.raises(ValueError, match="block_n"):
        PagedAttentionConfig(block_n=8)  # below an MMA's K
    with pytest.raises(ValueError, match="tokens_per_program x topk"):
        plan_paged_attention(64, 4, 16, 8, 2, 32, 32, torch.float32, torch.device(DEVICE),
                             config=PagedAttentionConfig(tokens_per_program=16))


def test_shared_pages_config_keeps_the_split_for_one_token():
    """With one token per request the shared-pages config runs the per-token kernel, still split
    when the grid is small."""
    config = PagedAttentionConfig(tokens_per_program=8)
    one = plan_paged_attention(1, 1, 1, 8, 2, 32, 4, torch.float32, torch.device(DEVICE),
                               config=config)
    many = plan_paged_attention(8, 2, 4, 8, 2, 32, 4, torch.float32, torch.device(DEVICE),
                                config=config)
    assert one.split and not many.split
    assert (one.tokens_per_program, many.tokens_per_program) == (1, 4)  # capped at max_len_q


def _head_major(cache):
    """The same logical cache ``[P, page, G, D]`` stored head-major ``[P, G, page, D]``."""
    return cache.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)


@pytest.mark.parametrize("lens_q", [[1, 1], [5, 16], [40, 1]], ids=["decode", "multi", "chunked"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_public_paged_attention_matches_contiguous(lens_q, fp8, monkeypatch):
    lens_k = [330, 170]
    c = _case(lens_q, lens_k, 8, 2, 32, 16, 16, torch.bfloat16, fp8=fp8, seed=3)
    kwargs = dict(topk=4, init_blocks=1, local_blocks=1)
    expected_o, expected_lse = msattn.msa_attention(
        c["q"], c["k"], c["v"], c["qi"].float() if fp8 else c["qi"], c["ki"], block_size=16,
        cu_seqlens_q=c["cu_q"], cu_seqlens_k=c["cu_k"], return_lse=True, backend="reference",
        **kwargs)
    ran = []
    for name in ("paged_attention", "paged_decode_attention"):
        function = getattr(triton_backend, name)
        monkeypatch.setattr(triton_backend, name,
                            lambda *a, _f=function, _n=name, **kw: ran.append(_n) or _f(*a, **kw))
    o, lse = msattn.msa_paged_attention(
        c["q"], c["qi"], _head_major(c["k_cache"]), _head_major(c["v_cache"]), c["index_cache"],
        c["block_table"], c["cu_q"], c["seq_lens"], index_scale=c["index_scale"],
        return_lse=True, backend="triton", **kwargs)
    decode = max(lens_q) <= dispatch.DECODE_MAX_QUERY_LEN
    path = dispatch.paged_path("triton", c["q"].device, page_size=16, index_dim=c["qi"].shape[2],
                               head_dim=c["q"].shape[2], max_seqlen_q=max(lens_q))
    assert path == dispatch.Path("triton", "triton-decode" if decode else "triton")
    assert ran == ["paged_decode_attention" if decode else "paged_attention"]
    _check(o, lse, expected_o, expected_lse)
    indices = msattn.msa_paged_select(c["qi"], c["index_cache"], c["block_table"], c["cu_q"],
                                      c["seq_lens"], index_scale=c["index_scale"], backend="triton",
                                      **kwargs)
    expected = msattn.msa_select(c["qi"].float() if fp8 else c["qi"], c["ki"], block_size=16,
                                 cu_seqlens_q=c["cu_q"], cu_seqlens_k=c["cu_k"],
                                 backend="reference", **kwargs)
    assert torch.equal(indices.sort(-1).values, expected.sort(-1).values)


def test_wrapper_run_matches_functional_and_is_reusable():
    lens_q, lens_k = [1, 3, 2], [300, 45, 160]
    c = _case(lens_q, lens_k, 8, 2, 32, 16, 16, torch.bfloat16, seed=5)
    kwargs = dict(topk=4, init_blocks=0, local_blocks=2)
    wrapper = msattn.MSAPagedWrapper(num_heads=8, num_kv_heads=2, head_dim=32, index_dim=16,
                                     page_size=16, device=DEVICE, backend="triton", **kwargs)
    wrapper.plan(c["cu_q"], c["block_table"].shape[1])
    args = (c["q"], c["qi"], c["k_cache"], c["v_cache"], c["index_cache"], c["block_table"])
    for step in range(2):  # the second run reuses the workspaces with longer sequences
        seq_lens = c["seq_lens"] - 5 + 5 * step
        expected_o, expected_lse = msattn.msa_paged_attention(
            *args, c["cu_q"], seq_lens, return_lse=True, backend="triton", **kwargs)
        o, lse = wrapper.run(*args, seq_lens, return_lse=True)
        assert torch.equal(o, expected_o) and torch.equal(lse, expected_lse)
    # Caller buffers (one plan for every layer): written in place, the wrapper's left alone.
    out, lse_out = torch.full_like(o, float("nan")), torch.full_like(lse, float("nan"))
    own_o = wrapper.o.clone()
    got = wrapper.run(*args, seq_lens, out=out, lse=lse_out, return_lse=True)
    assert got[0] is out and got[1] is lse_out
    assert torch.equal(out, expected_o) and torch.equal(lse_out, expected_lse)
    assert torch.equal(wrapper.o, own_o)


def test_wrapper_shared_pages_attention_config():
    """plan(attention_config=) with tokens_per_program runs the shared-pages kernel: the same
    output as the per-token kernel within bf16 rounding (another accumulation order)."""
    lens_q, lens_k = [4, 1, 3], [300, 45, 160]
    c = _case(lens_q, lens_k, 8, 2, 32, 16, 16, torch.bfloat16, seed=6)
    kwargs = dict(topk=4, init_blocks=0, local_blocks=1)
    args = (c["q"], c["qi"], c["k_cache"], c["v_cache"], c["index_cache"], c["block_table"],
            c["seq_lens"])
    expected_o, expected_lse = msattn.msa_paged_attention(*args[:6], c["cu_q"], c["seq_lens"],
                                                          return_lse=True, backend="triton",
                                                          **kwargs)
    wrapper = msattn.MSAPagedWrapper(num_heads=8, num_kv_heads=2, head_dim=32, index_dim=16,
                                     page_size=16, device=DEVICE, backend="triton", **kwargs)
    wrapper.plan(c["cu_q"], c["block_table"].shape[1],
                 attention_config=PagedAttentionConfig(tokens_per_program=4))
    assert not wrapper.attention_plan.split
    o, lse = wrapper.run(*args, return_lse=True)
    _check(o, lse, expected_o.float(), expected_lse)


def _4bit_index_cache(c, seed):
    """``c``'s index keys as 4-bit caches in ``c``'s page order (:func:`_case` with ``seed``):
    ``(index_cache, index_block_scale, index_scale, dequantised contiguous keys)``."""
    packed, block_scale, token_scale = quantize_nvfp4(c["ki"])
    caches = []
    for contiguous, fill in ((packed, 0), (block_scale, 0.0), (token_scale, 0.0)):
        generator = torch.Generator().manual_seed(seed + 100)
        caches.append(paginate(contiguous, c["cu_k"], c["k_cache"].shape[1], generator=generator,
                               fill=fill)[0])
    return (*caches, dequantize_nvfp4(packed, block_scale, token_scale))


def test_4bit_index_keys_functional_and_wrapper():
    """4-bit index keys (msattn.ops.nvfp4) through msa_paged_select / msa_paged_attention (both
    backends) and MSAPagedWrapper.plan(index_dtype=torch.uint8): the Triton selection is the
    dequantised keys' selection (float near-ties aside), the wrapper equals the functional call
    bit for bit, the attention is the reference's over that selection; bad inputs are refused."""
    lens_q, lens_k = [1, 4, 2], [300, 45, 160]
    c = _case(lens_q, lens_k, 8, 2, 32, 32, 16, torch.bfloat16, seed=8)
    index_cache, index_block_scale, index_scale, dequantised = _4bit_index_cache(c, 8)
    kwargs = dict(topk=4, init_blocks=1, local_blocks=1)
    layout = (c["block_table"], c["cu_q"], c["seq_lens"])
    scales = dict(index_scale=index_scale, index_block_scale=index_block_scale)
    expected = reference.select_blocks(c["qi"], dequantised, c["cu_q"], c["cu_k"], block_size=16,
                                       **kwargs)
    for backend in ("reference", "triton"):
        indices = msattn.msa_paged_select(c["qi"], index_cache, *layout, backend=backend,
                                          **scales, **kwargs)
        assert_selection_matches(indices, expected, c["qi"], dequantised, c["cu_q"], c["cu_k"],
                                 block_size=16, rel_tol=1e-5)
        o, lse = msattn.msa_paged_attention(c["q"], c["qi"], c["k_cache"], c["v_cache"],
                                            index_cache, *layout, return_lse=True,
                                            backend=backend, **scales, **kwargs)
        _check(o, lse, *reference.sparse_attention(c["q"], c["k"], c["v"], indices, c["cu_q"],
                                                   c["cu_k"], block_size=16,
                                                   softmax_scale=32 ** -0.5))
    wrapper = msattn.MSAPagedWrapper(num_heads=8, num_kv_heads=2, head_dim=32, index_dim=32,
                                     page_size=16, device=DEVICE, backend="triton", **kwargs)
    wrapper.plan(c["cu_q"], c["block_table"].shape[1], index_dtype=torch.uint8)
    wrapper.indices.fill_(12345)
    got_o, got_lse = wrapper.run(c["q"], c["qi"], c["k_cache"], c["v_cache"], index_cache,
                                 c["block_table"], c["seq_lens"], return_lse=True, **scales)
    assert torch.equal(wrapper.indices, indices)
    assert torch.equal(got_o, o) and torch.equal(got_lse, lse)
    from msattn import library  # the custom ops take the block scales too

    assert torch.equal(library.paged_select(c["qi"], index_cache, *layout, max_seqlen_q=4,
                                            backend="triton", **scales, **kwargs), indices)
    op_o, op_lse = library.paged_attention(c["q"], c["qi"], c["k_cache"], c["v_cache"],
                                           index_cache, *layout, max_seqlen_q=4,
                                           backend="triton", **scales, **kwargs)
    assert torch.equal(op_o, o) and torch.equal(op_lse, lse)

    # block scales whose last dim is not contiguous: the same selection
    strided = index_block_scale.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    assert strided.stride(-1) != 1
    assert torch.equal(msattn.msa_paged_select(c["qi"], index_cache, *layout, backend="triton",
                                               index_scale=index_scale,
                                               index_block_scale=strided, **kwargs), indices)
    with pytest.raises(ValueError, match="index_block_scale"):
        msattn.msa_paged_select(c["qi"], index_cache, *layout, index_scale=index_scale, **kwargs)
    with pytest.raises(ValueError, match="power of two"):  # Di = 48: the kernels need 2^n >= 32
        msattn.msa_paged_select(torch.cat([c["qi"], c["qi"][..., :16]], -1),
                                torch.zeros(*index_cache.shape[:2], 24, dtype=torch.uint8,
                                            device=DEVICE), *layout, index_scale=index_scale,
                                index_block_scale=index_block_scale[..., :3].contiguous(),
                                **kwargs)
    with pytest.raises(ValueError, match="index_block_scale must have shape"):
        msattn.msa_paged_select(c["qi"], index_cache, *layout, index_scale=index_scale,
                                index_block_scale=index_block_scale[..., :1], **kwargs)
    with pytest.raises(ValueError, match="only used with a 4-bit"):
        msattn.msa_paged_select(c["qi"], c["index_cache"], *layout,
                                index_block_scale=index_block_scale, **kwargs)
    with pytest.raises(ValueError, match="decode selection only"):
        msattn.msa_paged_select(c["qi"], index_cache, *layout, max_seqlen_q=17, **scales,
                                **kwargs)
    with pytest.raises(ValueError, match="missing|index_block_scale"):
        wrapper.run(c["q"], c["qi"], c["k_cache"], c["v_cache"], index_cache, c["block_table"],
                    c["seq_lens"], index_scale=index_scale)
    narrow = msattn.MSAPagedWrapper(num_heads=8, num_kv_heads=2, head_dim=32, index_dim=16,
                                    page_size=16, device=DEVICE, backend="triton")
    with pytest.raises(ValueError, match="4-bit index keys"):
        narrow.plan(c["cu_q"], 8, index_dtype=torch.uint8)


def test_wrapper_rejects_long_query_runs():
    wrapper = msattn.MSAPagedWrapper(num_heads=8, num_kv_heads=2, head_dim=32, index_dim=16,
                                     page_size=16, device=DEVICE, backend="triton")
    with pytest.raises(ValueError, match="1..16 tokens"):
        wrapper.plan(cu_seqlens([1, 17]), 8)
    with pytest.raises(RuntimeError, match="plan"):
        wrapper.run(*([None] * 7))


@pytest.mark.gpu
def test_wrapper_plan_refuses_graph_capture():
    wrapper = msattn.MSAPagedWrapper(num_heads=8, num_kv_heads=2, head_dim=32, index_dim=16,
                                     page_size=16, device="cuda", backend="triton")
    cu = cu_seqlens([1, 1], "cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="before graph capture"):
        with torch.cuda.graph(graph):
            wrapper.plan(cu, 8)


def test_decode_token_by_token_equals_prefill_rows():
    """Each decode step (seq_lens grows by one) equals the matching row of one full prefill."""
    length = 150
    c = _case([length], [length], 4, 2, 16, 16, 16, torch.float32, seed=9)
    kwargs = dict(topk=3, init_blocks=1, local_blocks=1)
    prefill_o = msattn.msa_attention(c["q"], c["k"], c["v"], c["qi"], c["ki"], block_size=16,
                                     backend="reference", **kwargs)
    for position in (0, 15, 16, 63, 100, 149):
        seq_lens = torch.tensor([position + 1], dtype=torch.int32, device=DEVICE)
        o = msattn.msa_paged_attention(
            c["q"][position:position + 1], c["qi"][position:position + 1], c["k_cache"],
            c["v_cache"], c["index_cache"], c["block_table"], cu_seqlens([1]), seq_lens,
            backend="triton", **kwargs)
        torch.testing.assert_close(o, prefill_o[position:position + 1], rtol=1e-5, atol=1e-5)


def _serve_with_stale_index(c, lens_q, lens_k, page_size, stale_write):
    """Write the batch of ``c`` into a two-layer :class:`msattn.MSAPagedCache` as a server does, in
    three varlen writes (each request's first half of its history, e.g. a prefix-cache hit; the
    rest of its history, a prefill chunk; its new tokens), into pages that an earlier request wrote
    and freed. Layer 0 gets every write. Layer 1 gets the same K/V, but the index keys of write
    ``stale_write`` go to a scratch buffer, so those slots keep the earlier request's index keys:
    an index cache that was not carried along with its K/V pages. Returns ``(cache, block_table)``."""
    (_, groups, head_dim), index_dim = c["k"].shape, c["ki"].shape[1]
    cache = msattn.MSAPagedCache(sum(-(-n // page_size) for n in lens_k) + 2, page_size, groups,
                                 head_dim, index_dim, num_layers=2, dtype=c["k"].dtype,
                                 index_dtype=c["ki"].dtype, device=DEVICE)
    total = cache.num_pages * page_size
    earlier = cache.allocate(total)
    generator = torch.Generator().manual_seed(1)
    old = [random_tensor(shape, c["k"].dtype, generator=generator)
           for shape in ((total, groups, head_dim), (total, groups, head_dim), (total, index_dim))]
    lengths = lambda values: torch.tensor(values, dtype=torch.int32, device=DEVICE)  # noqa: E731
    for layer in range(2):
        cache.append(layer, *old, cache.block_table([earlier]), cu_seqlens([total]), lengths([total]))
    cache.free(earlier)
    table = cache.block_table([cache.allocate(n) for n in lens_k])  # the earlier request's pages
    bounds = [(0, (n - len_q) // 2, n - len_q, n) for len_q, n in zip(lens_q, lens_k)]
    for write in range(3):
        rows = torch.cat([torch.arange(start + ends[write], start + ends[write + 1])
                          for start, ends in zip(c["cu_k"].tolist(), bounds)]).to(DEVICE)
        new_tokens = (c["k"][rows], c["v"][rows], c["ki"][rows])
        layout = (table, cu_seqlens([ends[write + 1] - ends[write] for ends in bounds]),
                  lengths([ends[write + 1] for ends in bounds]))
        cache.append(0, *new_tokens, *layout, check_values=True)
        index_cache = cache.index_cache[1]
        write_paged_cache(*new_tokens, cache.k_cache[1], cache.v_cache[1],
                          torch.empty_like(index_cache) if write == stale_write else index_cache,
                          *layout, check_values=True)
    return cache, table


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("lens_k, stale_write", [([300, 200, 170], 0), ([300, 200, 170], 1),
                                                 ([64, 40, 20], 0)],
                         ids=["long-prefix", "long-chunk", "short-prefix"])
def test_stale_index_cache_is_caught_past_topk_pages(lens_k, stale_write, backend):
    """Layer 0 of the cache is written in full and equals the contiguous reference. Layer 1 missed
    the index keys of one write (earlier keys left in those slots): it selects exactly what the keys
    it holds select, and that is not the true selection, so its output fails the accuracy check,
    once a request has more than topk pages. At <= topk * page_size tokens every block is selected
    whatever the index keys say, so the same stale cache gives the exact output: short contexts
    hide a stale index cache."""
    lens_q, page_size, kwargs = [1, 5, 1], 16, dict(topk=4, init_blocks=0, local_blocks=1)
    c = _case(lens_q, lens_k, 4, 2, 16, 16, page_size, torch.float32, seed=21)
    cache, table = _serve_with_stale_index(c, lens_q, lens_k, page_size, stale_write)
    select = lambda ki: reference.select_blocks(c["qi"], ki, c["cu_q"], c["cu_k"],  # noqa: E731
                                                block_size=page_size, **kwargs)
    check = dict(cu_q=c["cu_q"], cu_k=c["cu_k"], block_size=page_size)
    exact = select(c["ki"])
    expected = reference.sparse_attention(c["q"], c["k"], c["v"], exact, c["cu_q"], c["cu_k"],
                                          block_size=page_size, softmax_scale=16 ** -0.5)
    long_context = min(lens_k) > kwargs["topk"] * page_size
    layout = dict(block_table=table, cu_seqlens_q=c["cu_q"], seq_lens=c["seq_lens"],
                  backend=backend, **kwargs)
    for layer in (0, 1):
        held, _ = gather_paged(cache.index_cache[layer], table, c["seq_lens"])  # keys in the cache
        assert torch.equal(held, c["ki"]) == (layer == 0)
        indices = msattn.msa_paged_select(c["qi"], cache.index_cache[layer], **layout)
        assert_selection_matches(indices, select(held), c["qi"], held, **check)
        o, lse = msattn.msa_paged_attention(c["q"], c["qi"], **cache.layer(layer), return_lse=True,
                                            **layout)
        if layer == 0 or not long_context:
            assert_selection_matches(indices, exact, c["qi"], c["ki"], **check)
            _check(o, lse, *expected)
        else:
            differs = (indices.sort(-1).values != exact.sort(-1).values).any(-1)
            assert differs.float().mean() > 0.5, differs
            with pytest.raises(AssertionError):
                _check(o, lse, *expected)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_fp8_index_keys_on_random_data(backend):
    """Standard-normal bf16 index keys quantised to e4m3 with per-token scales, decode (1 token)
    and multi-token (3, 8) requests past topk * page_size tokens.

    Selection: the fp8 cache selects what its dequantised keys select against the fp8-rounded
    queries (reference.fp8_index_queries; float near-ties aside).
    Against the original bf16 keys it may differ only where e4m3 rounding (<= 2^-4 of each key
    value, 2^-10 of its scale below e4m3's normal range) can swap two blocks. On i.i.d. random keys
    such near-ties are common: seeds 0-9 keep 85-94% of the (token, group) rows' block sets and
    96-99% of the selected blocks, so ">= 95% agreement" is asserted per selected block, rows
    >= 80%. (Only rounding fp32 random keys to bf16 already changes 3-5% of rows at M3's shape.)

    Attention: rows whose blocks agree stay within bf16 tolerance of the exact-selection output. A
    row that selected another block attends over other (independent random) keys and can differ by
    about its own size, so over all rows the relative error is bounded by the square root of the
    fraction of differing rows, and the whole output is exact for the fp8 path's own selection.
    """
    lens_q, lens_k, page_size = [1, 8, 1, 3], [400, 300, 250, 170], 16
    heads, groups, kwargs = 8, 4, dict(topk=4, init_blocks=0, local_blocks=1)
    c = _case(lens_q, lens_k, heads, groups, 16, 32, page_size, torch.bfloat16, seed=4)
    # Per token, so these are the pages of the quantised ki; unused slots stay NaN (scale 1).
    keys_fp8, key_scale = quantize_index_keys(c["index_cache"])
    contiguous_fp8, contiguous_scale = quantize_index_keys(c["ki"])
    dequantised = dequantize_index_keys(contiguous_fp8, contiguous_scale)
    layout = dict(block_table=c["block_table"], cu_seqlens_q=c["cu_q"], seq_lens=c["seq_lens"],
                  index_scale=key_scale, backend=backend, **kwargs)
    indices = msattn.msa_paged_select(c["qi"], keys_fp8, **layout)
    select = lambda qi, ki: reference.select_blocks(qi, ki, c["cu_q"], c["cu_k"],  # noqa: E731
                                                    block_size=page_size, **kwargs)
    check = dict(cu_q=c["cu_q"], cu_k=c["cu_k"], block_size=page_size, rel_tol=1e-5)
    rounded = reference.fp8_index_queries(c["qi"])  # fp8 keys are scored against fp8 queries
    assert_selection_matches(indices, select(rounded, dequantised), rounded, dequantised, **check)
    exact = select(c["qi"], c["ki"])
    key_error = 2 ** -4 * (c["ki"].float().abs() + 2 ** -6 * contiguous_scale[:, None])
    assert_selection_matches(indices, exact, c["qi"], c["ki"], key_error=key_error, **check)
    same_rows = (indices.sort(-1).values == exact.sort(-1).values).all(-1)  # [G, total_q]
    shared = ((indices[..., :, None] == exact[..., None, :]).any(-1) & (indices >= 0)).sum()
    assert same_rows.float().mean() >= 0.8 and shared / (exact >= 0).sum() >= 0.95, \
        (same_rows.float().mean(), shared / (exact >= 0).sum())

    o = msattn.msa_paged_attention(c["q"], c["qi"], c["k_cache"], c["v_cache"], keys_fp8, **layout)
    attend = lambda selection: reference.sparse_attention(  # noqa: E731
        c["q"], c["k"], c["v"], selection, c["cu_q"], c["cu_k"], block_size=page_size,
        softmax_scale=16 ** -0.5)[0].float()
    error = lambda a, b: float((a.float() - b).norm() / b.norm())  # noqa: E731
    exact_o, agreeing = attend(exact), same_rows.t().repeat_interleave(heads // groups, dim=1)
    assert error(o, attend(indices)) < 2e-2
    assert error(o[agreeing], exact_o[agreeing]) < 2e-2
    assert error(o, exact_o) < 2e-2 + math.sqrt(1 - same_rows.float().mean()), error(o, exact_o)


def _bad_call(**overrides):
    c = _case([1, 2], [40, 20], 4, 2, 16, 16, 16, torch.bfloat16, seed=1)
    args = dict(q=c["q"], qi=c["qi"], k_cache=c["k_cache"], v_cache=c["v_cache"],
                index_cache=c["index_cache"], block_table=c["block_table"], cu_seqlens_q=c["cu_q"],
                seq_lens=c["seq_lens"])
    args.update(overrides)
    names = ("q", "qi", "k_cache", "v_cache", "index_cache", "block_table", "cu_seqlens_q", "seq_lens")
    kwargs = {key: value for key, value in args.items() if key not in names}
    return msattn.msa_paged_attention(*(args[name] for name in names), topk=2, backend="reference",
                                      **kwargs)


@pytest.mark.parametrize("overrides, error, message", [
    (dict(block_table=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "block_table"),
    (dict(seq_lens=torch.tensor([40], dtype=torch.int32)), ValueError, "seq_lens"),
    (dict(seq_lens=torch.tensor([40, 1], dtype=torch.int32)), ValueError, "seq_lens"),
    (dict(seq_lens=torch.tensor([400, 20], dtype=torch.int32)), ValueError, "block_table"),
    (dict(cu_seqlens_q=torch.tensor([0, 1, 4], dtype=torch.int32)), ValueError, "cu_seqlens_q"),
    (dict(index_cache=torch.zeros(3, 16, 16, dtype=FP8)), ValueError, "index_scale"),
    (dict(index_scale=torch.ones(3, 16)), ValueError, "index_scale"),
    (dict(k_cache=torch.zeros(3, 16, 2, 8, dtype=torch.bfloat16)), ValueError, "k_cache"),
    (dict(q=torch.zeros(3, 5, 16, dtype=torch.bfloat16)), ValueError, "multiple"),
    (dict(block_table=torch.full((2, 5), 99, dtype=torch.int32)), ValueError, "page ids"),
])
def test_paged_bad_inputs(overrides, error, message):
    with pytest.raises(error, match=message):
        _bad_call(**{key: value.to(DEVICE) for key, value in overrides.items()})


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_decode_m3_shape_and_cuda_graph(fp8):
    """M3 shape, 1 and 8 tokens per request at 20K context: functional = contiguous reference,
    and a captured wrapper.run() replays with new lengths."""
    lens_q, lens_k = [1, 8, 1], [20000, 9000, 300]
    c = _case(lens_q, lens_k, 64, 4, 128, 128, 128, torch.bfloat16, fp8=fp8, seed=11)
    kwargs = dict(topk=16, init_blocks=0, local_blocks=1)
    expected_o, expected_lse = msattn.msa_attention(
        c["q"], c["k"], c["v"], c["qi"].float() if fp8 else c["qi"], c["ki"], block_size=128,
        cu_seqlens_q=c["cu_q"], cu_seqlens_k=c["cu_k"], return_lse=True, backend="reference",
        **kwargs)
    caches = (c["k_cache"], c["v_cache"], c["index_cache"])
    o, lse = msattn.msa_paged_attention(c["q"], c["qi"], *caches, c["block_table"], c["cu_q"],
                                        c["seq_lens"], index_scale=c["index_scale"],
                                        return_lse=True, **kwargs)
    _check(o, lse, expected_o, expected_lse)
    wrapper = msattn.MSAPagedWrapper(num_heads=64, num_kv_heads=4, head_dim=128, index_dim=128,
                                     page_size=128, **kwargs)
    wrapper.plan(c["cu_q"], c["block_table"].shape[1], index_dtype=FP8 if fp8 else torch.bfloat16)
    seq_lens = c["seq_lens"].clone()
    args = (c["q"], c["qi"], *caches, c["block_table"], seq_lens)
    wrapper.run(*args, index_scale=c["index_scale"])  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        wrapper.run(*args, index_scale=c["index_scale"])
    for shorter in (0, 150):
        seq_lens.copy_(c["seq_lens"] - shorter)
        graph.replay()
        expected = msattn.msa_paged_attention(c["q"], c["qi"], *caches, c["block_table"], c["cu_q"],
                                              seq_lens, index_scale=c["index_scale"], **kwargs)
        torch.cuda.synchronize()
        assert torch.equal(wrapper.o, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("fan_in", [8, 16])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_gpu_decode_selection_long_context(fp8, fan_in):
    """Batch-1 decode at 300K tokens (the two-level split merge of a full GPU grid) and 4 requests
    of 1-16 query tokens, M3 index shape: the paged selection equals the contiguous reference
    (exact on the fp8 case's exactly representable keys; within float32 near-ties on bf16)."""
    for lens_q, lens_k in (([1], [300_000]), ([1, 16, 3, 8], [70_000, 150_000, 2_000, 40_000])):
        c = _case(lens_q, lens_k, 4, 4, 16, 128, 128, torch.bfloat16, fp8=fp8, seed=len(lens_q))
        kwargs = dict(topk=16, init_blocks=0, local_blocks=1)
        expected = reference.select_blocks(c["qi"].float() if fp8 else c["qi"], c["ki"], c["cu_q"],
                                           c["cu_k"], block_size=128, **kwargs)
        out = torch.full_like(expected, 12345)
        select_blocks_paged(c["qi"], c["index_cache"], c["block_table"], c["cu_q"], c["seq_lens"],
                            index_scale=c["index_scale"], out=out,
                            config=replace(launch_config(max(lens_q) * 4, True), fan_in=fan_in),
                            **kwargs)
        assert_selection_matches(out, expected, c["qi"], c["ki"], c["cu_q"], c["cu_k"],
                                 block_size=128, rel_tol=0.0 if fp8 else 1e-5)


@pytest.mark.gpu
def test_gpu_chunk_selection_both_kernels():
    """Chunked prefill at the M3 index shape through the default dispatch: a 1K chunk on a 16K
    prefix takes the block-score + top-k kernels, 2K chunks of two requests on 64K and 28K
    prefixes the fused kernel (``indexer.BLOCK_TOPK_MAX_SCORE_BYTES``); both select as the
    contiguous reference, within float32 near-ties."""
    kwargs = dict(topk=16, init_blocks=0, local_blocks=1)
    for lens_q, lens_k, block_topk in (([1024], [17408], True),
                                       ([2048, 2048], [67584, 30000], False)):
        c = _case(lens_q, lens_k, 4, 4, 16, 128, 128, torch.bfloat16, seed=len(lens_q))
        plan = plan_selection(c["qi"].shape[0], len(lens_q), 4, max(lens_q),
                              c["block_table"].shape[1], topk=16, device=c["qi"].device)
        assert isinstance(plan, BlockTopkPlan) == block_topk
        expected = reference.select_blocks(c["qi"], c["ki"], c["cu_q"], c["cu_k"], block_size=128,
                                           **kwargs)
        out = torch.full_like(expected, 12345)
        select_blocks_paged(c["qi"], c["index_cache"], c["block_table"], c["cu_q"], c["seq_lens"],
                            max_len_q=max(lens_q), out=out, **kwargs)
        assert_selection_matches(out, expected, c["qi"], c["ki"], c["cu_q"], c["cu_k"],
                                 block_size=128, rel_tol=1e-5)


# ----------------------------------------------------------------------------------------------
# fp8 K/V caches
# ----------------------------------------------------------------------------------------------

def _fp8_kv_case(lens_q, lens_k, per_head, dtype=torch.bfloat16, seed=3):
    """:func:`_case` (8 heads, 2 groups, D 32, pages of 16) with K and V of very different sizes
    per group, quantised into fp8 caches with per-tensor or per-group scales (the unused slots
    stay NaN); ``k``, ``v`` become the dequantised float32 values that the caches hold."""
    c = _case(lens_q, lens_k, 8, 2, 32, 16, 16, dtype, seed=seed)
    sizes = torch.tensor([0.02, 30.0], device=DEVICE)[:, None]
    for name in ("k", "v"):
        values = c[name].float() * sizes
        cache = c[f"{name}_cache"].float() * sizes
        scale = quantize_kv(values)[1] if per_head else values.abs().amax() / 448
        c[f"{name}_cache"] = quantize_kv(cache, scale)[0]
        c[name] = dequantize_kv(quantize_kv(values, scale)[0], scale)
        c[f"{name}_scale"] = scale
    assert c["k_cache"].dtype == FP8 and c["k_scale"].shape == ((2,) if per_head else ())
    return c


def _fp8_expected(c, **kwargs):
    indices = reference.select_blocks(c["qi"], c["ki"], c["cu_q"], c["cu_k"], block_size=16,
                                      **kwargs)
    return indices, reference.sparse_attention(c["q"], c["k"], c["v"], indices, c["cu_q"],
                                               c["cu_k"], block_size=16, softmax_scale=32 ** -0.5)


@pytest.mark.parametrize("split", [False, True], ids=["one-program", "split"])
@pytest.mark.parametrize("per_head", [False, True], ids=["per-tensor", "per-head"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_kv_decode_kernel(dtype, per_head, split):
    c = _fp8_kv_case([1, 16, 5], [330, 170, 40], per_head, dtype)
    indices, (expected_o, expected_lse) = _fp8_expected(c, topk=4, init_blocks=0, local_blocks=1)
    plan = plan_paged_attention(c["q"].shape[0], 3, 16, 8, 2, 32, 4, dtype, c["q"].device,
                                split=split)
    o, lse = run_paged_attention(plan, c["q"], c["k_cache"], c["v_cache"], indices,
                                 c["block_table"], c["cu_q"], c["seq_lens"],
                                 softmax_scale=32 ** -0.5, out=_poisoned(c["q"]),
                                 k_scale=c["k_scale"], v_scale=c["v_scale"])
    _check(o, lse, expected_o, expected_lse)


@pytest.mark.parametrize("power", [17, -30, -122],
                         ids=["beyond-fp16-max", "below-fp16-normals", "scaled-by-2^126-at-most"])
@pytest.mark.parametrize("kernel", ["one-program", "split", "shared-pages"])
def test_fp8_kv_decode_queries_of_any_magnitude(kernel, power):
    """fp8 K/V run the MMAs in fp16, so bf16 query rows are brought into fp16's range by a power
    of two each: queries 2^power times larger with a softmax scale 2^power times smaller give
    the same scores exactly, hence the same output as the reference at the usual magnitude.
    Queries are multiples of 1/4 (at most 2^6 apart within a row), so even 2^-122 times them
    are bf16 normals: rows below 2^-113 are scaled by 2^126 only (2^shift stays finite)."""
    c = _fp8_kv_case([1, 8, 5], [330, 170, 40], True)
    c["q"] = ((c["q"].float() * 4).round() / 4).to(c["q"].dtype)
    indices, (expected_o, expected_lse) = _fp8_expected(c, topk=4, init_blocks=0, local_blocks=1)
    config = PagedAttentionConfig(tokens_per_program=4 if kernel == "shared-pages" else 1)
    plan = plan_paged_attention(c["q"].shape[0], 3, 8, 8, 2, 32, 4, torch.bfloat16, c["q"].device,
                                split=kernel == "split", config=config)
    assert (plan.tokens_per_program > 1) == (kernel == "shared-pages")
    q = c["q"] * 2.0 ** power  # exact in bf16
    assert torch.isfinite(q).all() and q.abs().amax() > 65504 if power > 0 else q.abs().amax() < 2 ** -14
    o, lse = run_paged_attention(plan, q, c["k_cache"], c["v_cache"], indices, c["block_table"],
                                 c["cu_q"], c["seq_lens"], softmax_scale=32 ** -0.5 * 2.0 ** -power,
                                 out=_poisoned(c["q"]), k_scale=c["k_scale"], v_scale=c["v_scale"])
    _check(o, lse, expected_o, expected_lse)


@pytest.mark.parametrize("lens_q", [[1, 1], [5, 16], [40, 1]], ids=["decode", "multi", "chunked"])
@pytest.mark.parametrize("per_head", [False, True], ids=["per-tensor", "per-head"])
def test_fp8_kv_public_paged_attention(lens_q, per_head, monkeypatch):
    """msa_paged_attention on fp8 K/V (decode kernel up to 16 tokens a request, the KV-outer
    kernel beyond) and the reference backend, against the exact attention on the dequantised K/V."""
    c = _fp8_kv_case(lens_q, [330, 170], per_head)
    kwargs = dict(topk=4, init_blocks=1, local_blocks=1)
    _, (expected_o, expected_lse) = _fp8_expected(c, **kwargs)
    ran = []
    for name in ("paged_attention", "paged_decode_attention"):
        function = getattr(triton_backend, name)
        monkeypatch.setattr(triton_backend, name,
                            lambda *a, _f=function, _n=name, **kw: ran.append(_n) or _f(*a, **kw))
    args = (c["q"], c["qi"], _head_major(c["k_cache"]), _head_major(c["v_cache"]),
            c["index_cache"], c["block_table"], c["cu_q"], c["seq_lens"])
    scales = dict(k_scale=c["k_scale"], v_scale=c["v_scale"])
    for backend in ("triton", "reference"):
        o, lse = msattn.msa_paged_attention(*args, return_lse=True, backend=backend, **scales,
                                            **kwargs)
        _check(o, lse, expected_o, expected_lse)
    decode = max(lens_q) <= dispatch.DECODE_MAX_QUERY_LEN
    assert ran == ["paged_decode_attention" if decode else "paged_attention"]


def test_fp8_kv_wrapper_run():
    lens_q, lens_k = [1, 3, 16], [300, 45, 160]
    c = _fp8_kv_case(lens_q, lens_k, True, seed=5)
    kwargs = dict(topk=4, init_blocks=0, local_blocks=2)
    wrapper = msattn.MSAPagedWrapper(num_heads=8, num_kv_heads=2, head_dim=32, index_dim=16,
                                     page_size=16, device=DEVICE, backend="triton", **kwargs)
    wrapper.plan(c["cu_q"], c["block_table"].shape[1], dtype=torch.bfloat16, kv_dtype=FP8)
    args = (c["q"], c["qi"], c["k_cache"], c["v_cache"], c["index_cache"], c["block_table"],
            c["seq_lens"])
    scales = dict(k_scale=c["k_scale"], v_scale=c["v_scale"])
    out, lse_out = _poisoned(c["q"])
    o, lse = wrapper.run(*args, **scales, out=out, lse=lse_out, return_lse=True)
    assert o is out and lse is lse_out
    _check(o, lse, *_fp8_expected(c, **kwargs)[1])
    expected_o, expected_lse = msattn.msa_paged_attention(
        *args[:6], c["cu_q"], c["seq_lens"], return_lse=True, backend="triton", **scales, **kwargs)
    assert torch.equal(o, expected_o) and torch.equal(lse, expected_lse)
    # the run checks the planned dtypes and the scales of fp8 caches (no host sync)
    with pytest.raises(ValueError, match="k_scale .* is required"):
        wrapper.run(*args, v_scale=c["v_scale"])
    bf16_caches = (c["k_cache"].bfloat16(), c["v_cache"].bfloat16())
    with pytest.raises(TypeError, match="k_cache must have the planned dtype"):
        wrapper.run(*args[:2], *bf16_caches, *args[4:])
    with pytest.raises(TypeError, match="q must have the planned dtype"):
        wrapper.run(c["q"].half(), *args[1:], **scales)


def test_fp8_kv_wrapper_plan_dtypes():
    wrapper = msattn.MSAPagedWrapper(num_heads=8, num_kv_heads=2, head_dim=32, index_dim=16,
                                     page_size=16, device=DEVICE, backend="triton")
    cu = cu_seqlens([1, 2])
    with pytest.raises(TypeError, match="kv_dtype float8_e4m3fn needs dtype float16 or bfloat16"):
        wrapper.plan(cu, 8, dtype=torch.float32, kv_dtype=FP8)
    with pytest.raises(TypeError, match="kv_dtype must be one of bfloat16, float8_e4m3fn"):
        wrapper.plan(cu, 8, dtype=torch.bfloat16, kv_dtype=torch.float16)
    wrapper.plan(cu, 8, dtype=torch.float16, kv_dtype=FP8)
    assert wrapper.o.dtype == torch.float16


def test_fp8_kv_bad_inputs():
    c = _fp8_kv_case([1, 2], [40, 20], True)
    fp8, bf16 = (c["k_cache"], c["v_cache"]), (c["k_cache"].bfloat16(), c["v_cache"].bfloat16())
    scale = c["k_scale"]
    cases = [
        (dict(caches=fp8, k_scale=None, v_scale=scale), ValueError, "k_scale .* is required"),
        (dict(caches=fp8, k_scale=scale, v_scale=None), ValueError, "v_scale .* is required"),
        (dict(caches=(fp8[0], bf16[1])), TypeError, "k_cache and v_cache must both"),
        (dict(caches=bf16, k_scale=scale, v_scale=None), ValueError, "k_scale is only used"),
        (dict(k_scale=scale.repeat(2)), ValueError, r"k_scale must have shape \[\] .*\[G=2\]"),
        (dict(v_scale=scale[:, None]), ValueError, "v_scale must have shape"),
        (dict(k_scale=scale.double()), TypeError, "k_scale must have dtype float32"),
        (dict(v_scale=0.5), TypeError, "v_scale must be a float32 torch.Tensor"),
        (dict(q=c["q"].float()), TypeError, "float8_e4m3fn K/V caches need float16 or bfloat16"),
    ]
    if torch.device(DEVICE).type == "cuda":
        cases.append((dict(k_scale=scale.cpu()), ValueError, "k_scale is on cpu"))
    for overrides, error, message in cases:
        args = dict(q=c["q"], caches=fp8, k_scale=scale, v_scale=c["v_scale"])
        args.update(overrides)
        with pytest.raises(error, match=message):
            msattn.msa_paged_attention(args["q"], c["qi"], *args["caches"], c["index_cache"],
                                       c["block_table"], c["cu_q"], c["seq_lens"], topk=2,
                                       k_scale=args["k_scale"], v_scale=args["v_scale"],
                                       backend="reference")
