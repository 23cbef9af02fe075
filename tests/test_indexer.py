"""The fused Triton indexer against the exact reference (interpreter on CPU, kernels on a GPU)."""

from dataclasses import replace

import pytest
import torch

import msattn
import msattn.cache
from msattn import reference
from msattn.ops import indexer
from msattn.ops.indexer import (BlockTopkPlan, PageTopkConfig, launch_config,
                                plan_selection, select_blocks_fp8,
                                run_selection, select_blocks, select_blocks_paged)
from msattn.ops.nvfp4 import dequantize_nvfp4, quantize_nvfp4
from msattn.ops.utils import device_sm_count
from tests.kernel_cases import DEVICE, assert_selection_matches, cu_seqlens, index_inputs, paginate

# lens_q, lens_k, groups, index_dim, block_size, topk, init_blocks, local_blocks, dtype, integer, splits
CASES = [
    ([100], [100], 1, 16, 16, 4, 0, 1, torch.float32, False, None),
    ([70, 130, 1], [200, 130, 5], 3, 32, 16, 3, 1, 1, torch.float32, True, None),  # varlen, ties
    ([64], [300], 4, 32, 32, 4, 1, 2, torch.float32, False, 3),  # T < S, split keys
    ([5], [500], 1, 16, 16, 8, 0, 1, torch.float32, True, 4),  # short T, long S, ties across splits
    ([40], [400], 2, 16, 16, 6, 1, 1, torch.float32, True, 5),
    ([90], [300], 4, 16, 16, 4, 1, 1, torch.bfloat16, False, None),
    ([150], [150], 6, 16, 64, 5, 0, 1, torch.float16, False, None),
    ([300], [300], 2, 32, 128, 2, 0, 1, torch.float32, False, None),  # partial last block
    ([7, 0], [10, 3], 2, 16, 16, 4, 0, 1, torch.float32, False, None),  # shorter than a block
    ([200], [600], 1, 16, 256, 2, 0, 1, torch.float32, False, None),  # 256 = two key tiles
    ([33], [33], 16, 16, 16, 16, 2, 2, torch.float32, True, None),  # topk > blocks, 16 groups
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_indexer_matches_reference(case):
    lens_q, lens_k, groups, index_dim, block_size, topk, init_blocks, local_blocks, dtype, integer, splits = case
    qi, ki, cu_q, cu_k = index_inputs(lens_q, lens_k, groups, index_dim, dtype, integer=integer, seed=len(lens_q) + topk)
    kwargs = dict(block_size=block_size, topk=topk, init_blocks=init_blocks, local_blocks=local_blocks)
    expected = reference.select_blocks(qi, ki, cu_q, cu_k, **kwargs)
    out = torch.full_like(expected, 12345)  # poison: every element must be written
    select_blocks(qi, ki, cu_q, cu_k, num_splits=splits, out=out, **kwargs)
    assert_selection_matches(out, expected, qi, ki, cu_q, cu_k, block_size=block_size)


@pytest.mark.parametrize("splits", [1, 2, 7])
def test_split_count_does_not_change_selection(splits):
    qi, ki, cu_q, cu_k = index_inputs([20], [700], 2, 16, torch.float32, integer=True, seed=3)
    kwargs = dict(block_size=16, topk=5, init_blocks=1, local_blocks=1)
    one = select_blocks(qi, ki, cu_q, cu_k, num_splits=1, **kwargs)
    many = select_blocks(qi, ki, cu_q, cu_k, num_splits=splits, **kwargs)
    assert torch.equal(one.sort(-1).values, many.sort(-1).values)


@pytest.mark.parametrize("splits", [40, 67])
@pytest.mark.parametrize("fan_in", [8, 16])
def test_two_level_split_merge(splits, fan_in):
    """More splits than one merge level takes: groups of ``fan_in`` splits merge, then the group
    lists (67 splits, fan-in 16: 5 groups, the last of 3 splits); tiles of 32 rows merge up to
    16 rows a step."""
    qi, ki, cu_q, cu_k = index_inputs([40, 3], [3200, 2000], 2, 16, torch.float32, integer=True,
                                      seed=splits)
    kwargs = dict(block_size=16, topk=6, init_blocks=1, local_blocks=1)
    expected = reference.select_blocks(qi, ki, cu_q, cu_k, **kwargs)
    plan = plan_selection(qi.shape[0], 2, 2, 40, 200, topk=6, device=qi.device, num_splits=splits,
                          config=replace(launch_config(80, qi.is_cuda), block_r=32, fan_in=fan_in))
    assert plan.num_splits == splits and plan.level_keys is not None
    for _ in range(2):  # the second launch of the plan finds its counters reset
        out = torch.full_like(expected, 12345)
        run_selection(plan, qi, ki, cu_q, cu_k, block_size=16, init_blocks=1, local_blocks=1,
                      out=out)
        assert_selection_matches(out, expected, qi, ki, cu_q, cu_k, block_size=16)
    assert not plan.counters.any()


def test_public_api_batched_triton_backend():
    generator = torch.Generator().manual_seed(7)
    qi = torch.randn(2, 40, 2, 16, generator=generator).to(DEVICE)
    ki = torch.randn(2, 90, 16, generator=generator).to(DEVICE)
    kwargs = dict(block_size=16, topk=3, init_blocks=1, local_blocks=1)
    out = msattn.msa_select(qi, ki, backend="triton", **kwargs)
    assert msattn.dispatch.select_path("triton", qi.device, block_size=16, index_dim=16).select == "triton"
    expected = msattn.msa_select(qi, ki, backend="reference", **kwargs)
    assert out.shape == (2, 2, 40, 3)
    assert torch.equal(out.sort(-1).values, expected.sort(-1).values)


# lens_q, lens_k, groups, index_dim, block_size, topk, init_blocks, local_blocks, dtype, integer
FP8_CASES = [
    ([70, 130, 1], [200, 130, 5], 3, 32, 16, 3, 1, 1, torch.bfloat16, True),  # varlen, ties, T < S
    ([64], [300], 4, 32, 32, 4, 1, 2, torch.float16, False),  # T < S, partial last block
    ([150], [150], 6, 32, 64, 5, 0, 1, torch.bfloat16, False),
    ([20, 33], [20, 33], 16, 16, 16, 16, 2, 2, torch.float32, True),  # topk > blocks, Di < 32
]


def _fp8_expected(qi, ki, cu_q, cu_k, **kwargs):
    """The exact selection of the fp8 index path: fp8-rounded queries, dequantised keys."""
    rounded = reference.fp8_index_queries(qi)
    keys = msattn.cache.dequantize_index_keys(*msattn.cache.quantize_index_keys(ki))
    return reference.select_blocks(rounded, keys, cu_q, cu_k, **kwargs), rounded, keys


@pytest.mark.parametrize("case", FP8_CASES, ids=[f"case{i}" for i in range(len(FP8_CASES))])
def test_fp8_index_path_matches_reference(case):
    """Prefill on the fp8 index path (contiguous keys quantised per token, queries per row in
    the kernel): the reference's selection on the rounded queries and dequantised keys, up to
    near-ties (the kernel applies the two scales after the dot, the reference before it, so
    exact ties of small integers may round 1 ulp apart)."""
    lens_q, lens_k, groups, index_dim, block_size, topk, init_blocks, local_blocks, dtype, integer = case
    qi, ki, cu_q, cu_k = index_inputs(lens_q, lens_k, groups, index_dim, dtype, integer=integer,
                                      seed=len(lens_q) + topk)
    kwargs = dict(block_size=block_size, topk=topk, init_blocks=init_blocks, local_blocks=local_blocks)
    expected, rounded, keys = _fp8_expected(qi, ki, cu_q, cu_k, **kwargs)
    out = select_blocks_fp8(qi, ki, cu_q, cu_k, **kwargs)
    assert_selection_matches(out, expected, rounded, keys, cu_q, cu_k, block_size=block_size,
                             rel_tol=1e-5)
    if not integer:  # quantising changes some selections of random data, not most
        bf16 = reference.select_blocks(qi, ki, cu_q, cu_k, **kwargs)
        same_rows = (bf16.sort(-1).values == out.sort(-1).values).all(-1).float().mean()
        assert same_rows > 0.5, same_rows


def test_public_api_fp8_index_dtype():
    generator = torch.Generator().manual_seed(9)
    qi = torch.randn(2, 40, 2, 32, generator=generator).to(DEVICE)
    ki = torch.randn(2, 90, 32, generator=generator).to(DEVICE)
    kwargs = dict(block_size=16, topk=3, init_blocks=1, local_blocks=1,
                  index_dtype=torch.float8_e4m3fn)
    out = msattn.msa_select(qi, ki, backend="triton", **kwargs)
    expected = msattn.msa_select(qi, ki, backend="reference", **kwargs)
    assert out.shape == (2, 2, 40, 3)
    # varlen views of the two sequences, for the near-tie check of the fp8 MMA's accumulation
    flat_qi, flat_ki = qi.flatten(0, 1), ki.flatten(0, 1)
    cu_q, cu_k = cu_seqlens([40, 40]), cu_seqlens([90, 90])
    _, rounded, keys = _fp8_expected(flat_qi, flat_ki, cu_q, cu_k, block_size=16, topk=3,
                                     init_blocks=1, local_blocks=1)
    assert_selection_matches(out.transpose(0, 1).flatten(1, 2), expected.transpose(0, 1).flatten(1, 2),
                             rounded, keys, cu_q, cu_k, block_size=16, rel_tol=1e-5,
                             key_error=keys.abs() * 2.0 ** -12)
    with pytest.raises(TypeError, match="index_dtype"):
        msattn.msa_select(qi, ki, block_size=16, topk=3, index_dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("length", [4096, 32768])
def test_gpu_m3_shape_selection_fp8(length):
    """M3 index shape on the fp8 index path against its exact reference: small integers (exact
    ties, sums exact) and random values (near-ties of the fp8 MMA's accumulation aside)."""
    for integer in (True, False):
        qi, ki, cu_q, cu_k = index_inputs([length], [length], 4, 128, torch.bfloat16, integer=integer)
        kwargs = dict(block_size=128, topk=16, init_blocks=0, local_blocks=1)
        expected, rounded, keys = _fp8_expected(qi, ki, cu_q, cu_k, **kwargs)
        out = select_blocks_fp8(qi, ki, cu_q, cu_k, **kwargs)
        # Hopper's fp8 MMA keeps about 14 bits of its running sum (DeepSeek-V3 report, 3.3.2):
        # a score may be off by ~2^-12 of sum |q_d k_d|, so blocks that close are near-ties.
        assert_selection_matches(out, expected, rounded, keys, cu_q, cu_k, block_size=128,
                                 rel_tol=1e-5, key_error=keys.abs() * 2.0 ** -12)


@pytest.mark.gpu
@pytest.mark.parametrize("length", [4096, 32768])
def test_gpu_m3_shape_selection_bf16(length):
    """M3 index shape (G = 4, Di = 128, block 128, top-16) on bf16 inputs.

    Random data: rows may differ only on float32 rounding near-ties. Integer data: exact."""
    for integer in (False, True):
        qi, ki, cu_q, cu_k = index_inputs([length], [length], 4, 128, torch.bfloat16, integer=integer)
        kwargs = dict(block_size=128, topk=16, init_blocks=0, local_blocks=1)
        expected = reference.select_blocks(qi, ki, cu_q, cu_k, **kwargs)
        out = torch.full_like(expected, 12345)
        select_blocks(qi, ki, cu_q, cu_k, out=out, **kwargs)
        assert_selection_matches(out, expected, qi, ki, cu_q, cu_k, block_size=128,
                                 rel_tol=0.0 if integer else 1e-5)


@pytest.mark.gpu
def test_gpu_varlen_chunked_prefill_and_long_sequence():
    lens_q, lens_k = [1000, 16, 131072, 1], [5000, 70000, 131072, 9000]
    qi, ki, cu_q, cu_k = index_inputs(lens_q, lens_k, 4, 128, torch.bfloat16, integer=True, seed=1)
    kwargs = dict(block_size=128, topk=16, init_blocks=1, local_blocks=2)
    expected = reference.select_blocks(qi, ki, cu_q, cu_k, **kwargs)
    out = torch.full_like(expected, 12345)
    select_blocks(qi, ki, cu_q, cu_k, out=out, **kwargs)
    assert_selection_matches(out, expected, qi, ki, cu_q, cu_k, block_size=128)
    assert cu_seqlens(lens_q).equal(cu_q)


# ------------------------------------------------------------------------------------------------
# The decode selection: block-score kernel, then top-k (query runs of at most 16 tokens)
# ------------------------------------------------------------------------------------------------

def _paged_index_case(lens_q, lens_k, groups, index_dim, page_size, dtype, *, integer, seed, fp8=False):
    """Index inputs, their keys scattered over pages in random order (``-1``-padded table), and
    for ``fp8`` the e4m3 keys with per-token power-of-two scales (so the dequantised keys are
    ``ki`` exactly when ``integer``)."""
    qi, ki, cu_q, cu_k = index_inputs(lens_q, lens_k, groups, index_dim, dtype, integer=integer,
                                      seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    key_scale = None
    if fp8:
        key_scale = 2.0 ** torch.randint(-3, 4, (ki.shape[0],), generator=generator).float().to(ki.device)
        values = (ki.float() / key_scale[:, None]).to(torch.float8_e4m3fn)
        ki = values.float() * key_scale[:, None]
        cache, table = paginate(values, cu_k, page_size, generator=torch.Generator().manual_seed(seed), fill=0.0)
        key_scale, _ = paginate(key_scale, cu_k, page_size, generator=torch.Generator().manual_seed(seed))
    else:
        cache, table = paginate(ki, cu_k, page_size, generator=torch.Generator().manual_seed(seed))
    seq_lens = (cu_k[1:] - cu_k[:-1]).to(torch.int32)
    return qi, ki, cu_q, cu_k, cache, table, seq_lens, key_scale


# lens_q, lens_k, groups, index_dim, page_size, topk, init_blocks, local_blocks, dtype, integer,
# segment (rows ranked by tl.topk, or by max rounds where a segment is narrower than topk: case4)
DECODE_CASES = [
    ([1, 1, 1], [300, 17, 64], 2, 16, 16, 4, 0, 1, torch.float32, False, 1024),
    ([4, 16, 1, 7], [200, 90, 500, 7], 4, 32, 16, 5, 1, 2, torch.float32, True, 1024),  # ties
    ([1, 3], [2500, 129], 3, 16, 16, 6, 1, 1, torch.bfloat16, False, 32),  # 5 segments
    ([2, 1], [1000, 40], 1, 16, 32, 8, 0, 1, torch.float16, True, 8),  # ties across segments
    ([16], [33], 6, 16, 16, 16, 2, 2, torch.float32, True, 1024),  # topk > blocks, group 6
    ([1, 3], [2500, 129], 3, 16, 16, 6, 1, 1, torch.float32, True, 32),  # ties across 5 segments
    ([4, 1], [300, 900], 2, 16, 16, 5, 0, 1, torch.bfloat16, False, 1024),  # one segment
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=[f"case{i}" for i in range(len(DECODE_CASES))])
def test_decode_selection_matches_reference(case):
    """The block-score + top-k path on paged keys (random page order, -1 padded table), 1-16
    tokens per request: equal sets, own block last; a plan launched twice (counters reset)."""
    lens_q, lens_k, groups, index_dim, page_size, topk, init_blocks, local_blocks, dtype, integer, segment = case
    qi, ki, cu_q, cu_k, cache, table, seq_lens, _ = _paged_index_case(
        lens_q, lens_k, groups, index_dim, page_size, dtype, integer=integer, seed=len(lens_q) + topk)
    kwargs = dict(topk=topk, init_blocks=init_blocks, local_blocks=local_blocks)
    expected = reference.select_blocks(qi, ki, cu_q, cu_k, block_size=page_size, **kwargs)
    config = PageTopkConfig(segment=segment)
    plan = plan_selection(qi.shape[0], len(lens_q), groups, max(lens_q), table.shape[1], topk=topk,
                          device=qi.device, config=config)
    assert isinstance(plan, BlockTopkPlan) and plan.num_segments == -(-table.shape[1] // min(segment, 1 << (table.shape[1] - 1).bit_length()))
    for _ in range(2):
        out = torch.full_like(expected, 12345)  # poison: every element must be written
        run_selection(plan, qi, cache, cu_q, seq_lens, block_size=page_size, block_table=table,
                      init_blocks=init_blocks, local_blocks=local_blocks, out=out)
        assert_selection_matches(out, expected, qi, ki, cu_q, cu_k, block_size=page_size,
                                 rel_tol=0.0 if integer else 1e-5)
    if plan.counters is not None:
        assert not plan.counters.any()


def test_block_topk_is_the_default_for_decode_and_short_chunks(monkeypatch):
    """Decode runs, and chunks whose row tiles cannot fill the GPU (the fused kernel would split
    the keys) while their block scores fit the budget, take the block-score + top-k kernels."""
    device = torch.device(DEVICE)
    assert isinstance(plan_selection(8, 2, 4, 16, 100, topk=16, device=device), BlockTopkPlan)
    assert isinstance(plan_selection(17, 1, 4, 17, 100, topk=16, device=device), BlockTopkPlan)
    monkeypatch.setattr(indexer, "BLOCK_TOPK_MAX_SCORE_BYTES", 17 * 4 * 100 * 4 - 1)
    assert not isinstance(plan_selection(17, 1, 4, 17, 100, topk=16, device=device), BlockTopkPlan)
    assert isinstance(plan_selection(17, 1, 4, 16, 100, topk=16, device=device), BlockTopkPlan)
    monkeypatch.undo()
    long_run = 256 * device_sm_count(device)  # rows enough for one fused tile per multiprocessor
    assert not isinstance(plan_selection(long_run, 1, 4, long_run, 100, topk=16, device=device),
                          BlockTopkPlan)
    assert not isinstance(plan_selection(8, 2, 4, 4, 100, topk=16, device=device, num_splits=2),
                          BlockTopkPlan)
    # 4-bit keys spread one request's blocks over twice the score programs.
    plain = plan_selection(1, 1, 4, 1, 64 * device_sm_count(device), topk=16, device=device)
    four_bit = plan_selection(1, 1, 4, 1, 64 * device_sm_count(device), topk=16, device=device,
                              four_bit_keys=True)
    assert four_bit.config == indexer.PAGE_TOPK_4BIT and plain.config == indexer.PageTopkConfig()
    assert four_bit.num_chunks == 2 * plain.num_chunks


# lens_q, lens_k, groups, block_size, topk, init_blocks, local_blocks, integer
BLOCK_TOPK_PREFILL_CASES = [
    ([48], [48], 2, 16, 4, 0, 1, False),  # T = S: the score tiles stop at their last row's block
    ([20, 33, 1], [200, 33, 5], 3, 16, 3, 1, 1, True),  # varlen, ties, T < S
    ([12, 0, 9], [400, 20, 9], 4, 32, 5, 1, 2, True),  # an empty query run, topk > blocks
]


@pytest.mark.parametrize("case", BLOCK_TOPK_PREFILL_CASES,
                         ids=[f"case{i}" for i in range(len(BLOCK_TOPK_PREFILL_CASES))])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_block_topk_selects_chunks_as_reference(case, paged):
    """The block-score + top-k kernels on query runs longer than decode's (chunked prefill), on
    contiguous and on paged keys, select as the reference."""
    lens_q, lens_k, groups, block_size, topk, init_blocks, local_blocks, integer = case
    qi, ki, cu_q, cu_k, cache, table, seq_lens, _ = _paged_index_case(
        lens_q, lens_k, groups, 16, block_size, torch.float32, integer=integer, seed=len(lens_q) + topk)
    kwargs = dict(topk=topk, init_blocks=init_blocks, local_blocks=local_blocks)
    expected = reference.select_blocks(qi, ki, cu_q, cu_k, block_size=block_size, **kwargs)
    max_blocks = table.shape[1] if paged else -(-max(lens_k) // block_size)
    plan = plan_selection(qi.shape[0], len(lens_q), groups, max(lens_q), max_blocks, topk=topk,
                          device=qi.device, config=PageTopkConfig())
    out = torch.full_like(expected, 12345)  # poison: every element must be written
    if paged:
        run_selection(plan, qi, cache, cu_q, seq_lens, block_size=block_size, block_table=table,
                      init_blocks=init_blocks, local_blocks=local_blocks, out=out)
    else:
        run_selection(plan, qi, ki, cu_q, cu_k, block_size=block_size, init_blocks=init_blocks,
                      local_blocks=local_blocks, out=out)
    assert_selection_matches(out, expected, qi, ki, cu_q, cu_k, block_size=block_size,
                             rel_tol=0.0 if integer else 1e-5)


@pytest.mark.parametrize("integer", [True, False], ids=["exact", "random"])
def test_decode_selection_fp8_keys_and_queries(integer):
    """fp8 keys are scored against fp8 queries (one scale per (token, group) row): the selection
    is the reference's on those queries (:func:`msattn.reference.fp8_index_queries`) and the
    dequantised keys, exactly on small integers, within float near-ties on random data."""
    lens_q, lens_k = [1, 8, 3], [700, 129, 2000]
    qi, ki, cu_q, cu_k, cache, table, seq_lens, key_scale = _paged_index_case(
        lens_q, lens_k, 4, 32, 16, torch.bfloat16, integer=integer, seed=5, fp8=True)
    kwargs = dict(topk=6, init_blocks=1, local_blocks=1)
    rounded = reference.fp8_index_queries(qi)
    if integer:  # small integers x 224 or 448 are e4m3 values: quantising loses nothing
        assert torch.equal(rounded, qi.float())
    expected = reference.select_blocks(rounded, ki, cu_q, cu_k, block_size=16, **kwargs)
    out = torch.full_like(expected, 12345)
    select_blocks_paged(qi, cache, table, cu_q, seq_lens, index_scale=key_scale, out=out,
                        config=PageTopkConfig(segment=32), **kwargs)
    assert_selection_matches(out, expected, rounded, ki, cu_q, cu_k, block_size=16,
                             rel_tol=0.0 if integer else 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_gpu_decode_selection_long_context_and_graph_replay(fp8):
    """M3 index shape: batch-1 decode at 300K tokens (segments merged) and 4 requests of 1-16
    tokens; a captured plan replays after the lengths change."""
    for lens_q, lens_k in (([1], [300_000]), ([1, 16, 3, 8], [70_000, 150_000, 2_000, 40_000])):
        qi, ki, cu_q, cu_k, cache, table, seq_lens, key_scale = _paged_index_case(
            lens_q, lens_k, 4, 128, 128, torch.bfloat16, integer=True, seed=len(lens_q), fp8=fp8)
        kwargs = dict(init_blocks=0, local_blocks=1)
        plan = plan_selection(qi.shape[0], len(lens_q), 4, max(lens_q), table.shape[1], topk=16,
                              device=qi.device)
        out = torch.full((4, qi.shape[0], 16), 12345, dtype=torch.int32, device=qi.device)
        lengths = seq_lens.clone()
        launch = lambda: run_selection(plan, qi, cache, cu_q, lengths, block_size=128,  # noqa: E731
                                       block_table=table, index_scale=key_scale, out=out, **kwargs)
        launch()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            launch()
        for shorter in (0, 300):
            lengths.copy_(seq_lens - shorter)
            out.fill_(12345)
            graph.replay()
            cu_k_now = torch.cat([cu_k[:1], lengths.cumsum(0)]).to(torch.int32)
            keys = torch.cat([ki[int(cu_k[b]):int(cu_k[b]) + int(lengths[b])] for b in range(len(lens_q))])
            expected = reference.select_blocks(reference.fp8_index_queries(qi) if fp8 else qi, keys,
                                               cu_q, cu_k_now, block_size=128, topk=16, **kwargs)
            torch.cuda.synchronize()
            assert_selection_matches(out, expected, qi, keys, cu_q, cu_k_now, block_size=128)


def test_decode_selection_4bit_keys():
    """4-bit keys (e2m1 codes, e4m3 scale per 16 values, float32 per token) select what their
    dequantised values select, float near-ties aside, in the decode path; the fused path refuses
    them."""
    lens_q, lens_k = [1, 8, 3], [700, 129, 2000]
    qi, ki, cu_q, cu_k = index_inputs(lens_q, lens_k, 4, 32, torch.bfloat16, seed=6)
    packed, block_scale, token_scale = quantize_nvfp4(ki)
    dequantised = dequantize_nvfp4(packed, block_scale, token_scale)
    pages = lambda x, fill: paginate(x, cu_k, 16, generator=torch.Generator().manual_seed(6), fill=fill)  # noqa: E731
    cache, table = pages(packed, 0)
    block_scale_cache, _ = pages(block_scale, 0.0)
    scale_cache, _ = pages(token_scale, 0.0)
    seq_lens = torch.tensor(lens_k, dtype=torch.int32, device=qi.device)
    kwargs = dict(topk=6, init_blocks=1, local_blocks=1)
    expected = reference.select_blocks(qi, dequantised, cu_q, cu_k, block_size=16, **kwargs)
    out = torch.full_like(expected, 12345)
    select_blocks_paged(qi, cache, table, cu_q, seq_lens, index_scale=scale_cache,
                        index_block_scale=block_scale_cache, out=out,
                        config=PageTopkConfig(segment=32), **kwargs)
    assert_selection_matches(out, expected, qi, dequantised, cu_q, cu_k, block_size=16, rel_tol=1e-5)
    with pytest.raises(ValueError, match="decode selection"):
        select_blocks_paged(qi, cache, table, cu_q, seq_lens, index_scale=scale_cache,
                            index_block_scale=block_scale_cache, num_splits=2, **kwargs)
    with pytest.raises(ValueError, match="index_block_scale"):
        select_blocks_paged(qi, cache, table, cu_q, seq_lens, index_scale=scale_cache, **kwargs)
