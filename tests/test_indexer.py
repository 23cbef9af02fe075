"""The fused Triton indexer against the exact reference (interpreter on CPU, kernels on a GPU)."""

from dataclasses import replace

import pytest
import torch

import msattn
from msattn import reference
from msattn.ops.indexer import launch_config, plan_selection, run_selection, select_blocks
from tests.kernel_cases import DEVICE, assert_selection_matches, cu_seqlens, index_inputs

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
