"""Kernel helpers of msattn/ops/utils.py: the float32 atomic add (packed pairs on sm_90+)."""

import pytest
import torch
import triton
import triton.language as tl

from msattn.ops.utils import atomic_add_f32, dot_options, mma, sm90_reductions

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# One program: adds a [BLOCK_M, BLOCK_D] tile, the product a[pid] @ b (an MMA accumulator layout,
# as in the backward's dQ), into rows perm[pid * BLOCK_M + i] of out [rows, out_cols] at column
# offset col0, where the row is < num_valid and the column < num_cols.
@triton.jit
def _tile_kernel(out_ptr, a_ptr, b_ptr, perm_ptr, out_cols, col0, num_valid, num_cols,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PAIRED: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_D)
    a = tl.load(a_ptr + (pid * BLOCK_M + r)[:, None] * BLOCK_D + c[None, :])
    b = tl.load(b_ptr + c[:, None] * BLOCK_D + c[None, :])
    tile = mma(a, b, DOT_PRECISION, DOT_UPCAST)
    row = tl.load(perm_ptr + pid * BLOCK_M + r)
    mask = (row < num_valid)[:, None] & (c < num_cols)[None, :]
    atomic_add_f32(out_ptr + row.to(tl.int64)[:, None] * out_cols + col0 + c[None, :], tile, mask,
                   PAIRED)


# One program: BLOCK elements of a flat float32 tensor, added at out[offset + i] where mask[i].
@triton.jit
def _flat_kernel(out_ptr, values_ptr, mask_ptr, offset, n, BLOCK: tl.constexpr,
                 PAIRED: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    values = tl.load(values_ptr + i, mask=i < n, other=0.0)
    mask = (tl.load(mask_ptr + i, mask=i < n, other=0) != 0) & (i < n)
    atomic_add_f32(out_ptr + offset + i, values, mask, PAIRED)


@pytest.mark.parametrize("col0, num_cols", [(0, 64), (1, 64), (0, 50)])
def test_atomic_add_f32_tile(col0, num_cols):
    """MMA tiles added into random rows (once each, so the float32 sums are exact), with masked
    rows, masked columns and an odd column offset (pairs not 8-byte aligned: scalar fallback)."""
    torch.manual_seed(0)
    block_m, block_d, programs = 16, 64, 6
    rows, out_cols = programs * block_m, 2 * block_d
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    a = torch.randn(rows, block_d, device=DEVICE).to(dtype)
    b = torch.randn(block_d, block_d, device=DEVICE).to(dtype)
    perm = torch.randperm(rows, device=DEVICE).to(torch.int32)
    num_valid = rows - 5
    base = torch.randn(rows, out_cols, device=DEVICE)
    out = base.clone()
    _tile_kernel[(programs,)](out, a, b, perm, out_cols, col0, num_valid, num_cols,
                              BLOCK_M=block_m, BLOCK_D=block_d, PAIRED=sm90_reductions(DEVICE),
                              **dot_options(dtype))
    tile = (a.float() @ b.float())  # bf16 products are exact in float32; sums may round apart
    expected = base.clone()
    valid = perm.long() < num_valid
    expected[perm.long()[valid], col0:col0 + num_cols] += tile[valid][:, :num_cols]
    # Outside the masked-in region nothing may change, bit for bit.
    touched = torch.zeros_like(base, dtype=torch.bool)
    touched[perm.long()[valid], col0:col0 + num_cols] = True
    assert torch.equal(out[~touched], base[~touched])
    torch.testing.assert_close(out[touched], expected[touched], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("offset", [0, 1, 2])
def test_atomic_add_f32_flat_repeated(offset):
    """Random masks, odd offsets, and every element added by 3 launches: the sums equal torch's
    (3 float32 additions in any order agree within rounding)."""
    torch.manual_seed(1)
    n, block = 1000, 128
    base = torch.randn(n + 4, device=DEVICE)
    out = base.clone()
    expected = base.double().clone()
    for _ in range(3):
        values = torch.randn(n, device=DEVICE)
        mask = (torch.rand(n, device=DEVICE) < 0.7).to(torch.int32)
        _flat_kernel[(triton.cdiv(n, block),)](out, values, mask, offset, n, BLOCK=block,
                                               PAIRED=sm90_reductions(DEVICE))
        expected[offset:offset + n] += values.double() * mask
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.gpu
def test_sm90_reductions_on_hopper():
    """The packed path is the one taken on sm_90+ GPUs (so the tests above exercise it there)."""
    major = torch.cuda.get_device_capability()[0]
    assert sm90_reductions(torch.device("cuda")) == (major >= 9)
