"""4-bit (NVFP4-style) index keys: quantise/dequantise round trips, the Triton tile helper against
dequantize_nvfp4 bit for bit (the integer decode in the interpreter on CPU, the PTX fp8-conversion
decode on sm_89+ GPUs), selection agreement."""

import pytest
import torch
import triton
import triton.language as tl

from msattn import reference
from msattn.ops.nvfp4 import (dequantize_nvfp4, nvfp4_halves, quantize_nvfp4, selection_agreement)
from msattn.ops.utils import fp8_conversions
from tests.kernel_cases import DEVICE, cu_seqlens

# The tile helper decodes with PTX fp8 conversions where the GPU has them (sm_89+), else with
# integer ops (the interpreter): the tests below check whichever path the device takes.
PTX_DECODE = fp8_conversions(torch.device(DEVICE))
GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _bound(x, block_scale, token_scale):
    """Largest error the format allows per element of ``x [..., Di]`` (quantize_nvfp4's doc)."""
    step = (block_scale.float() * token_scale[..., None]).repeat_interleave(16, dim=-1)
    scaled = x.float().abs() / torch.where(step > 0, step, torch.ones_like(step))
    half_step = torch.where(scaled < 2, 0.25, torch.where(scaled < 4, 0.5, 1.0)) * step
    saturation = 6 * token_scale[..., None] * torch.maximum(
        block_scale.float().repeat_interleave(16, dim=-1) / 15, torch.tensor(2.0 ** -10))
    underflow = 6 * 2.0 ** -10 * token_scale[..., None]
    bound = torch.where(scaled <= 6, half_step, saturation)
    bound = torch.where(step > 0, bound, underflow.expand_as(bound))
    return bound * (1 + 2 ** -20) + 1e-30  # float32 rounding of x / step and of the product


@pytest.mark.parametrize("shape,dtype", [((4, 128), torch.float32), ((3, 5, 64), torch.bfloat16),
                                         ((7, 16), torch.float16), ((2, 48), torch.float32)])
def test_round_trip_error_bound(shape, dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator)
    # Spread the block magnitudes over many binades: e4m3 normal and subnormal block scales.
    x = x * 2.0 ** torch.randint(-14, 4, (*shape[:-1], shape[-1] // 16), generator=generator
                                 ).float().repeat_interleave(16, dim=-1)
    x = x.to(dtype).to(DEVICE)
    packed, block_scale, token_scale = quantize_nvfp4(x)
    assert packed.shape == (*shape[:-1], shape[-1] // 2) and packed.dtype == torch.uint8
    assert block_scale.shape == (*shape[:-1], shape[-1] // 16)
    assert block_scale.dtype == torch.float8_e4m3fn
    assert token_scale.shape == shape[:-1] and token_scale.dtype == torch.float32
    assert float(block_scale.float().amax(-1).min()) == 448.0  # the token's largest block
    y = dequantize_nvfp4(packed, block_scale, token_scale)
    assert y.dtype == torch.float32 and y.shape == shape
    error = (y - x.float()).abs()
    assert (error <= _bound(x, block_scale, token_scale)).all()
    # Every block's largest value keeps most of its size (it is never rounded to 0).
    blocks = x.float().unflatten(-1, (-1, 16)).abs()
    big = blocks.amax(-1) > 2 ** -9 * 6 * token_scale[..., None]
    assert (y.unflatten(-1, (-1, 16)).abs().amax(-1)[big] >= 0.6 * blocks.amax(-1)[big]).all()
    for out_dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(dequantize_nvfp4(packed, block_scale, token_scale, dtype=out_dtype),
                           y.to(out_dtype))


def test_round_to_nearest_even_on_the_grid():
    """Midpoints go to the even code, everything else to the nearest grid value."""
    midpoints = (GRID[:-1] + GRID[1:]) / 2
    even = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0])  # codes 0, 2, 2, 4, 4, 6, 6
    near = torch.cat([GRID, midpoints - 0.01, midpoints + 0.01, midpoints])
    expected = torch.cat([GRID, GRID[:-1], GRID[1:], even])
    values, wanted = torch.cat([near, -near]), torch.cat([expected, -expected])
    # 15 values per token after a 6: amax 6 * 448 gives token scale 1 and block scale 448.
    rows = -(-values.numel() // 15)
    pad = rows * 15 - values.numel()
    x = torch.cat([torch.full((rows, 1), 6.0), torch.cat([values, torch.zeros(pad)]).view(rows, 15)], 1)
    y_expected = torch.cat([torch.full((rows, 1), 6.0),
                            torch.cat([wanted, torch.zeros(pad)]).view(rows, 15)], 1)
    packed, block_scale, token_scale = quantize_nvfp4((x * 448).to(DEVICE))
    assert torch.equal(token_scale.cpu(), torch.ones(rows))
    assert torch.equal(block_scale.float().cpu(), torch.full((rows, 1), 448.0))
    y = dequantize_nvfp4(packed, block_scale, token_scale).cpu() / 448
    assert torch.equal(y, y_expected), (x[y != y_expected], y[y != y_expected])


def _on_grid(rows, index_dim, generator):
    """Values that the format represents exactly: e2m1 codes x e4m3 block scales x a power-of-two
    token scale, every block holding a +-6 and one block per token scaled by 448."""
    codes = GRID[torch.randint(0, 8, (rows, index_dim), generator=generator)]
    codes = codes * torch.where(torch.rand(rows, index_dim, generator=generator) < 0.5, -1.0, 1.0)
    codes.view(rows, -1, 16)[:, :, 3] = 6.0
    e4m3 = torch.arange(1, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    scales = e4m3[torch.randint(0, e4m3.numel(), (rows, index_dim // 16), generator=generator)]
    scales[torch.arange(rows), torch.randint(0, index_dim // 16, (rows,), generator=generator)] = 448.0
    token = 2.0 ** torch.randint(-20, 10, (rows,), generator=generator).float()
    return codes * scales.repeat_interleave(16, dim=-1) * token[:, None], token


@pytest.mark.parametrize("index_dim", [16, 128, 256])
def test_values_on_the_grid_are_exact(index_dim):
    x, token = _on_grid(64, index_dim, torch.Generator().manual_seed(1))
    packed, block_scale, token_scale = quantize_nvfp4(x.to(DEVICE))
    assert torch.equal(token_scale.cpu(), token)
    assert torch.equal(dequantize_nvfp4(packed, block_scale, token_scale).cpu(), x)
    # And the format is idempotent on its own output.
    again = quantize_nvfp4(dequantize_nvfp4(packed, block_scale, token_scale))
    for a, b in zip(again, (packed, block_scale, token_scale)):
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)


def test_packing_layout():
    """Element 2j in the low nibble, 2j + 1 in the high nibble; sign in bit 3; zero is +0."""
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1], x[0, 2], x[0, 3], x[0, 5] = 6.0, -0.5, 1.5, -6.0, -0.0
    x[0, 16], x[0, 17] = -3.0, 2.0
    packed, block_scale, token_scale = quantize_nvfp4(x * 448 / 6 * 2.0 ** -3)
    assert packed[0, :3].tolist() == [0x9 << 4 | 0x7, 0xF << 4 | 0x3, 0x00]
    assert packed[0, 8].tolist() == 0x6 << 4 | 0xF  # block 1: scale 224, -3 -> -6, 2 -> 4
    assert block_scale.float().tolist() == [[448.0, 448.0 / 2]]
    assert token_scale.tolist() == pytest.approx([2.0 ** -3 / 6])


def test_zeros_and_tiny_blocks():
    x = torch.zeros(3, 64)
    x[1, 20] = -1e-30  # a lone tiny value: its own block gets scale 448
    x[2, 0] = 1.0
    x[2, 16:32] = 1e-6  # underflows e4m3 against the token's scale: quantises to zeros
    x[2, 32:48] = -1e-2
    packed, block_scale, token_scale = quantize_nvfp4(x)
    assert token_scale[0] == 1.0 and (packed[0] == 0).all() and (block_scale[0].float() == 0).all()
    y = dequantize_nvfp4(packed, block_scale, token_scale)
    assert torch.equal(y[0], x[0]) and not y[0].signbit().any()
    assert y[1, 20] == pytest.approx(-1e-30, rel=0.26) and (y[1, :20] == 0).all()
    assert block_scale[2, 1].float() == 0 and (y[2, 16:32] == 0).all()
    assert (y[2, 32:48] < 0).all() and (y[2, 48:] == 0).all()
    assert (y - x).abs().le(_bound(x, block_scale, token_scale)).all()
    assert not torch.isnan(y).any() and not torch.isinf(y).any()


def test_large_and_negative_values_do_not_overflow():
    generator = torch.Generator().manual_seed(2)
    x = -torch.rand(8, 128, generator=generator) * torch.tensor([1e30, 3e38, 1.0, 65504.0, 1e-20,
                                                                 1e-38, 7.0, 448.0 * 6])[:, None]
    packed, block_scale, token_scale = quantize_nvfp4(x)
    assert torch.isfinite(block_scale.float()).all() and (block_scale.float() <= 448).all()
    y = dequantize_nvfp4(packed, block_scale, token_scale)
    assert torch.isfinite(y).all() and (y <= 0).all()
    assert (y - x).abs().le(_bound(x, block_scale, token_scale)).all()


# ----------------------------------------------------------------------------------------------
# The Triton helper
# ----------------------------------------------------------------------------------------------

@triton.jit
def _tile_kernel(packed_ptr, block_scale_ptr, token_scale_ptr, block_table_ptr, seq_len, q_ptr,
                 tile_ptr, scores_ptr, stride_packed_page, stride_packed_token,
                 stride_scale_page, stride_scale_token, stride_token_scale_page,
                 PAGE_SIZE: tl.constexpr, DI: tl.constexpr, M: tl.constexpr,
                 PTX_DECODE: tl.constexpr):
    """One program per logical page ``i`` (physical page ``block_table[i]``): writes the page's
    tile ``[PAGE_SIZE, DI]`` (its even and odd elements from ``nvfp4_halves``, zeros past
    ``seq_len``) and ``scores = q [M, DI] . tile^T * token scale`` as the decode indexer takes
    them (two MMAs over the even and odd elements)."""
    i = tl.program_id(0)
    page = tl.load(block_table_ptr + i).to(tl.int64)
    rows = tl.arange(0, PAGE_SIZE)
    row_mask = i * PAGE_SIZE + rows < seq_len
    even, odd = nvfp4_halves(packed_ptr + page * stride_packed_page, stride_packed_token,
                             block_scale_ptr + page * stride_scale_page, stride_scale_token,
                             rows, row_mask, DI, PTX_DECODE)
    out_rows = i * PAGE_SIZE + rows
    half = tl.arange(0, DI // 2)
    tl.store(tile_ptr + out_rows[:, None] * DI + 2 * half[None, :], even)
    tl.store(tile_ptr + out_rows[:, None] * DI + 2 * half[None, :] + 1, odd)
    token_scale = tl.load(token_scale_ptr + page * stride_token_scale_page + rows, mask=row_mask,
                          other=0.0)
    m = tl.arange(0, M)
    q_even = tl.load(q_ptr + m[:, None] * DI + 2 * half[None, :])
    q_odd = tl.load(q_ptr + m[:, None] * DI + 2 * half[None, :] + 1)
    scores = tl.dot(q_even, tl.trans(even), out_dtype=tl.float32)
    scores += tl.dot(q_odd, tl.trans(odd), out_dtype=tl.float32)
    scores = scores * token_scale[None, :]
    tl.store(scores_ptr + m[:, None] * (tl.num_programs(0) * PAGE_SIZE) + out_rows[None, :], scores)


def _pages(num_pages, page_size, index_dim, seed, uint8_scales=False):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_pages, page_size, index_dim, generator=generator)
    x = x * 2.0 ** torch.randint(-12, 12, (num_pages, page_size, 1), generator=generator).float()
    x[0, 3] = 0.0  # an all-zero token
    x[-1, :, :16] *= 2.0 ** -12  # small blocks (subnormal e4m3 scales)
    packed, block_scale, token_scale = quantize_nvfp4(x.to(DEVICE))
    if uint8_scales:
        block_scale = block_scale.view(torch.uint8)
    return packed, block_scale, token_scale


@pytest.mark.parametrize("index_dim,page_size", [(128, 128), (64, 16), (128, 32), (32, 16)])
def test_triton_tile_matches_dequantize(index_dim, page_size):
    num_pages = 4
    packed, block_scale, token_scale = _pages(num_pages, page_size, index_dim, seed=index_dim,
                                              uint8_scales=index_dim == 64)
    # Strided views of bigger buffers (padded rows and pages), pages in random order.
    packed_buffer = torch.full((num_pages + 1, page_size, index_dim // 2 + 8), 0xFF,
                               dtype=torch.uint8, device=DEVICE)
    packed_buffer[1:, :, :index_dim // 2] = packed
    packed_view = packed_buffer[1:, :, :index_dim // 2]
    scale_buffer = torch.zeros(num_pages, page_size, index_dim // 16 + 3, dtype=block_scale.dtype,
                               device=DEVICE)
    scale_buffer[:, :, :index_dim // 16] = block_scale
    scale_view = scale_buffer[:, :, :index_dim // 16]
    block_table = torch.randperm(num_pages, generator=torch.Generator().manual_seed(3)).to(
        torch.int32).to(DEVICE)
    seq_len = num_pages * page_size - 5  # a partial last page
    m = 16
    q = torch.randn(m, index_dim, generator=torch.Generator().manual_seed(4)).half().to(DEVICE)
    tile = torch.empty(num_pages * page_size, index_dim, dtype=torch.float16, device=DEVICE)
    scores = torch.empty(m, num_pages * page_size, dtype=torch.float32, device=DEVICE)
    _tile_kernel[(num_pages,)](
        packed_view, scale_view, token_scale, block_table, seq_len, q, tile, scores,
        packed_view.stride(0), packed_view.stride(1), scale_view.stride(0), scale_view.stride(1),
        token_scale.stride(0), PAGE_SIZE=page_size, DI=index_dim, M=m, PTX_DECODE=PTX_DECODE)
    ordered = block_table.long()
    expected = dequantize_nvfp4(packed[ordered], block_scale[ordered].view(torch.float8_e4m3fn),
                                torch.ones(num_pages, page_size, device=DEVICE), dtype=tile.dtype)
    expected = expected.reshape(-1, index_dim)
    expected[seq_len:] = 0
    assert torch.equal(tile.view(torch.int16), expected.view(torch.int16))  # bit for bit
    keys = dequantize_nvfp4(packed[ordered], block_scale[ordered].view(torch.float8_e4m3fn),
                            token_scale[ordered]).reshape(-1, index_dim)
    keys[seq_len:] = 0
    exact = q.double() @ keys.double().t()
    magnitude = q.double().abs() @ keys.double().abs().t()
    assert ((scores.double() - exact).abs() <= 1e-5 * magnitude + 1e-30).all()


def test_triton_tile_every_code_and_scale():
    """All 16 codes against all 126 finite positive e4m3 scales (and 0), bit for bit."""
    codes = torch.arange(16, dtype=torch.uint8)
    packed = (codes[:, None] | (codes[None, :] << 4)).reshape(-1)  # every (low, high) pair
    page_size, index_dim = 16, 32
    packed = packed.reshape(page_size, index_dim // 2)
    scale_bits = torch.arange(0, 127, dtype=torch.uint8)
    block_scale = torch.cat([scale_bits, torch.zeros(256 - scale_bits.numel(), dtype=torch.uint8)])
    for chunk in range(0, 256, page_size * index_dim // 16):
        scales = block_scale[chunk:chunk + page_size * index_dim // 16].reshape(page_size, -1)
        p, s = packed[None].to(DEVICE), scales.view(torch.float8_e4m3fn)[None].to(DEVICE)
        t = torch.ones(1, page_size, device=DEVICE)
        tile = torch.empty(page_size, index_dim, dtype=torch.float16, device=DEVICE)
        scores = torch.empty(16, page_size, dtype=torch.float32, device=DEVICE)
        q = torch.zeros(16, index_dim, dtype=torch.float16, device=DEVICE)
        _tile_kernel[(1,)](p, s, t, torch.zeros(1, dtype=torch.int32, device=DEVICE), page_size, q,
                           tile, scores, p.stride(0), p.stride(1), s.stride(0), s.stride(1),
                           t.stride(0), PAGE_SIZE=page_size, DI=index_dim, M=16,
                           PTX_DECODE=PTX_DECODE)
        expected = dequantize_nvfp4(p[0], s[0], t[0], dtype=torch.float16)
        assert torch.equal(tile.view(torch.int16), expected.view(torch.int16))


# ----------------------------------------------------------------------------------------------
# Selection agreement
# ----------------------------------------------------------------------------------------------

def test_selection_agreement():
    a = torch.tensor([[[3, 1, 2, -1], [0, 1, 2, 3], [-1, -1, -1, -1], [5, 4, -1, -1]]])
    b = torch.tensor([[[1, 2, 3, -1], [0, 1, 2, 4], [-1, -1, -1, -1], [4, 6, 7, -1]]])
    result = selection_agreement(a, b)
    assert result["rows"] == 4
    assert result["identical_rows"] == 0.5
    assert result["blocks_in_common"] == pytest.approx((1 + 0.75 + 1 + 1 / 3) / 4)
    assert result["shared_blocks"] == pytest.approx((3 + 3 + 0 + 1) / (3 + 4 + 0 + 3))
    assert selection_agreement(a, a)["identical_rows"] == 1.0
    with pytest.raises(ValueError, match="indices_b"):
        selection_agreement(a, b[..., :3])
    with pytest.raises(TypeError, match="indices_a"):
        selection_agreement(a.float(), b)


def test_selection_agreement_of_4bit_keys_on_random_data():
    """Selections from 4-bit keys against bf16 keys on standard-normal data (the reference
    selection, one decode token and a few multi-token requests). e2m1 rounding is much coarser
    than e4m3 (half steps of 1/12-1/6 of a block's largest value), so on i.i.d. keys, where near
    ties are common, fewer rows keep their exact set than with fp8 keys; most blocks still agree."""
    generator = torch.Generator().manual_seed(5)
    lens_q, lens_k, groups, index_dim, block_size = [1, 8, 4], [2048, 1500, 900], 4, 128, 64
    cu_q, cu_k = cu_seqlens(lens_q, device="cpu"), cu_seqlens(lens_k, device="cpu")
    qi = torch.randn(sum(lens_q), groups, index_dim, generator=generator).bfloat16()
    ki = torch.randn(sum(lens_k), index_dim, generator=generator).bfloat16()
    kwargs = dict(block_size=block_size, topk=8, init_blocks=1, local_blocks=1)
    exact = reference.select_blocks(qi, ki, cu_q, cu_k, **kwargs)
    keys = dequantize_nvfp4(*quantize_nvfp4(ki))
    quantised = reference.select_blocks(qi.float(), keys, cu_q, cu_k, **kwargs)
    result = selection_agreement(quantised, exact)
    print("4-bit vs bf16 index keys:", result)
    assert result["rows"] == groups * sum(lens_q)
    assert result["blocks_in_common"] >= 0.8 and result["identical_rows"] >= 0.2, result


# ----------------------------------------------------------------------------------------------
# Bad arguments
# ----------------------------------------------------------------------------------------------

def test_bad_arguments():
    x = torch.randn(4, 128)
    packed, block_scale, token_scale = quantize_nvfp4(x)
    with pytest.raises(ValueError, match="x must have a last dim.*multiple of 16, got 40"):
        quantize_nvfp4(torch.randn(4, 40))
    with pytest.raises(ValueError, match="x must have a last dim"):
        quantize_nvfp4(torch.randn(4, 0))
    with pytest.raises(TypeError, match="x must have dtype"):
        quantize_nvfp4(torch.ones(4, 32, dtype=torch.int32))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        quantize_nvfp4([1.0] * 16)
    with pytest.raises(TypeError, match="packed must have dtype"):
        dequantize_nvfp4(packed.to(torch.int8), block_scale, token_scale)
    with pytest.raises(ValueError, match="packed must have a last dim"):
        dequantize_nvfp4(packed[:, :60], block_scale, token_scale)
    with pytest.raises(TypeError, match="block_scale must have dtype"):
        dequantize_nvfp4(packed, block_scale.float(), token_scale)
    with pytest.raises(ValueError, match="block_scale must have shape"):
        dequantize_nvfp4(packed, block_scale[:, :4], token_scale)
    with pytest.raises(TypeError, match="token_scale must have dtype"):
        dequantize_nvfp4(packed, block_scale, token_scale.half())
    with pytest.raises(ValueError, match="token_scale must have shape"):
        dequantize_nvfp4(packed, block_scale, token_scale[:3])
    with pytest.raises(ValueError, match="token_scale must have shape"):
        dequantize_nvfp4(packed, block_scale, token_scale[:, None])
    with pytest.raises(TypeError, match="dtype must be one of"):
        dequantize_nvfp4(packed, block_scale, token_scale, dtype=torch.int32)
