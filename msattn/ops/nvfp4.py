"""4-bit (NVFP4-style) index keys: e2m1 values, an e4m3 scale per 16 values, a float32 token scale.

Layout of one token's index key ``x [Di]`` (``Di`` a multiple of 16, typically 128):

* ``packed [Di // 2]`` uint8: e2m1 codes, two per byte, element ``2j`` in the low nibble and
  ``2j + 1`` in the high nibble. A code is ``sign << 3 | exponent << 1 | mantissa`` (exponent bias
  1, no inf/NaN): magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 for codes 0-7, codes 8-15 their negatives
  (the quantiser writes +0 for zero, never code 8);
* ``block_scale [Di // 16]`` float8_e4m3fn: one scale per 16 consecutive values (block ``j`` covers
  elements ``16j ... 16j + 15``, i.e. bytes ``8j ... 8j + 7`` of ``packed``), in [0, 448];
* ``token_scale []`` float32, positive.

Dequantised value of element ``i``: ``e2m1(code_i) * block_scale[i // 16] * token_scale``. The
product of the first two is exact in fp16/bf16/fp32 (at most 6 significant bits, magnitude in
[2^-10, 2688]), so a kernel decodes ``e2m1 * block_scale`` into an fp16 tile, takes the dot with
the queries and multiplies the scores by the token scale afterwards, as with fp8 keys.

Scales (:func:`quantize_nvfp4`): ``token_scale = amax(|x|) / (6 * 448)`` so that the largest block
scale is e4m3's largest value, 448, and the others use e4m3's range below it;
``block_scale = amax(|x_block|) / (6 * token_scale)`` rounded to nearest (even) e4m3, clamped to
448 (so it cannot overflow; a block whose scale underflows e4m3, below 2^-10, quantises to zeros);
the values ``x / (block_scale * token_scale)`` round to nearest (even) e2m1, saturating at 6. An
all-zero token gets ``token_scale = 1``, zero block scales and zero codes.

Bytes per token: ``Di / 2 + Di / 16 + 4`` (76 for ``Di = 128``: 4.75 bits per value, against 132
for fp8 keys with a float32 scale and 256 for bf16).

:func:`nvfp4_halves` is the ``@triton.jit`` helper that loads a tile of keys (e.g. one page) in
this format, as its even and odd elements; :func:`selection_agreement` compares two top-k block
selections.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from msattn._checks import (FLOAT_DTYPES, FP8_DTYPE, check_any_rank, check_shape, check_tensor,
                            dtype_name)

E2M1_MAX = 6.0  # largest e2m1 magnitude
E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
NVFP4_BLOCK = 16  # values per e4m3 block scale

# Magnitudes of the e2m1 codes 0-7.
_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Round to nearest, ties to the even code: magnitude code = number of thresholds passed, where a
# tie (the midpoint of two grid values) passes only when the upper code is even.
_UP_IF_ABOVE = (0.25, 1.25, 2.5, 5.0)  # ties go down (to codes 0, 2, 4, 6)
_UP_IF_AT_LEAST = (0.75, 1.75, 3.5)  # ties go up (to codes 2, 4, 6)
_INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)  # block ids of a selection


def _check_index_dim(name: str, index_dim: int, text: str) -> None:
    if index_dim == 0 or index_dim % NVFP4_BLOCK:
        raise ValueError(f"{name} must have a last dim ({text}) that is a positive multiple of "
                         f"{NVFP4_BLOCK}, got {index_dim}")


def quantize_nvfp4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise index keys to the 4-bit format (module docstring), on any device.

    Args:
        x: ``[..., Di]`` fp16, bf16 or fp32, ``Di`` a positive multiple of 16; finite values.
    Returns:
        ``(packed [..., Di // 2] uint8, block_scale [..., Di // 16] float8_e4m3fn,
        token_scale [...] float32)``. Each value's error is at most half the e2m1 grid step at
        its magnitude times ``step = block_scale * token_scale`` (0.25, 0.5, 1 of ``step`` where
        ``|x| / step`` is below 2, 4, 6); values past ``6 * step`` (the block scale rounded down)
        saturate, losing at most ``6 * token_scale * max(block_scale / 15, 2^-10)``; a block
        whose scale underflows e4m3 (to 0) holds ``|x| <= 6 * 2^-10 * token_scale``.
    """
    check_any_rank("x", x, FLOAT_DTYPES)
    index_dim = x.shape[-1]
    _check_index_dim("x", index_dim, "Di")
    x32 = x.float()
    token_scale = x32.abs().amax(dim=-1) / (E2M1_MAX * E4M3_MAX)
    token_scale = torch.where(token_scale > 0, token_scale, torch.ones_like(token_scale))
    blocks = x32.unflatten(-1, (index_dim // NVFP4_BLOCK, NVFP4_BLOCK))
    block_amax = blocks.abs().amax(dim=-1)
    # Rounding of the divisions may step just past 448: clamp before the (RNE) conversion.
    block_scale = (block_amax / (E2M1_MAX * token_scale[..., None])).clamp(0.0, E4M3_MAX)
    block_scale = block_scale.to(FP8_DTYPE)
    step = block_scale.float() * token_scale[..., None]  # one rounding; 0 where it underflowed
    scaled = blocks / torch.where(step > 0, step, torch.ones_like(step))[..., None]
    scaled = torch.where(step[..., None] > 0, scaled, torch.zeros_like(scaled))
    magnitude = scaled.abs()
    code = torch.zeros(magnitude.shape, dtype=torch.uint8, device=x.device)
    for threshold in _UP_IF_ABOVE:
        code += (magnitude > threshold).to(torch.uint8)
    for threshold in _UP_IF_AT_LEAST:
        code += (magnitude >= threshold).to(torch.uint8)
    code |= ((scaled < 0) & (code > 0)).to(torch.uint8) << 3  # +0 for zero
    code = code.flatten(-2)
    packed = code[..., 0::2] | (code[..., 1::2] << 4)
    return packed.contiguous(), block_scale, token_scale


def dequantize_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, token_scale: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_nvfp4`, on any device.

    Args:
        packed: ``[..., Di // 2]`` uint8; block_scale: ``[..., Di // 16]`` float8_e4m3fn;
            token_scale: ``[...]`` float32 (all ones gives ``e2m1 * block_scale``, which is what
            :func:`nvfp4_halves` returns, exactly in fp16).
        dtype: fp16, bf16 or fp32 of the result.
    Returns:
        ``[..., Di]`` of ``dtype``: ``e2m1 * block_scale`` (exact) times ``token_scale`` in
        float32, then rounded once to ``dtype``.
    """
    check_any_rank("packed", packed, (torch.uint8,))
    if packed.shape[-1] == 0 or packed.shape[-1] % (NVFP4_BLOCK // 2):
        raise ValueError(f"packed must have a last dim (Di // 2) that is a positive multiple of "
                         f"{NVFP4_BLOCK // 2}, got {packed.shape[-1]}")
    index_dim = 2 * packed.shape[-1]
    lead = tuple(packed.shape[:-1])
    check_tensor("block_scale", block_scale, packed.dim(), "[..., Di // 16]", (FP8_DTYPE,))
    check_shape("block_scale", block_scale, (*lead, index_dim // NVFP4_BLOCK),
                "[..., Di // 16] (from packed [..., Di // 2])")
    check_tensor("token_scale", token_scale, packed.dim() - 1,
                 "[...] (packed's shape without Di // 2)", (torch.float32,))
    check_shape("token_scale", token_scale, lead, "packed.shape[:-1]")
    if dtype not in FLOAT_DTYPES:
        names = ", ".join(dtype_name(d) for d in FLOAT_DTYPES)
        raise TypeError(f"dtype must be one of ({names}), got {dtype}")
    for name, tensor in (("block_scale", block_scale), ("token_scale", token_scale)):
        if tensor.device != packed.device:
            raise ValueError(f"{name} must be on packed's device ({packed.device}), got "
                             f"{tensor.device}")
    code = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2).long()
    values = torch.tensor(_E2M1_VALUES + tuple(-v for v in _E2M1_VALUES), dtype=torch.float32,
                          device=packed.device)[code]
    values = values.unflatten(-1, (index_dim // NVFP4_BLOCK, NVFP4_BLOCK))
    values = values * block_scale.float()[..., None]  # exact
    return (values.flatten(-2) * token_scale[..., None]).to(dtype)


@triton.jit
def _e2m1_to_fp16(code):
    """e2m1 codes (int32, 0-15) -> fp16 with integer ops: magnitude code ``m`` >= 2 has fp16 bits
    ``(m << 9) + 0x3800`` (exponent field ``e + 14``, mantissa bit ``m & 1`` at bit 9), ``m = 1``
    (0.5) is ``0x3800``, ``m = 0`` is 0; the sign moves from bit 3 to bit 15."""
    magnitude = code & 7
    bits = tl.where(magnitude >= 2, (magnitude << 9) + 0x3800, tl.where(magnitude == 1, 0x3800, 0))
    bits = bits | ((code & 8) << 12)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True)


@triton.jit
def nvfp4_halves(packed_ptr, stride_packed_row, block_scale_ptr, stride_block_scale_row, rows,
                 row_mask, DI: tl.constexpr, PTX_DECODE: tl.constexpr):
    """Load rows of 4-bit keys as their even and odd elements, ``e2m1 * block_scale`` (no token
    scale), two ``[N, DI // 2]`` fp16 tiles: element ``2j`` of a row (low nibble of byte ``j``)
    and element ``2j + 1`` (high nibble). A kernel takes ``q[:, 0::2] . even^T + q[:, 1::2] .
    odd^T`` (two MMAs with K = DI / 2), so the nibbles are never interleaved in registers, and
    multiplies the scores by the float32 token scale afterwards.

    The tile is decoded as ``[N, DI // 16, 8]`` (row, scale block, byte), so each block scale is
    loaded once and broadcast over its 8 bytes in registers.

    Args:
        packed_ptr: uint8 pointer, e.g. the first byte of a page ``packed[page]``; row ``r`` starts
            at ``packed_ptr + r * stride_packed_row`` (bytes, ``DI // 2`` of them, contiguous).
        block_scale_ptr: float8e4nv (or uint8) pointer to the same rows' block scales, row ``r``
            at ``block_scale_ptr + r * stride_block_scale_row`` (``DI // 16`` contiguous).
        rows: ``[N]`` integer row offsets (``tl.arange(0, PAGE_SIZE)`` for a page; pass int64
            when ``rows * stride`` may pass 2^31).
        row_mask: ``[N]`` bool; masked rows are not read and come back as zeros.
        DI: index dim, a power of two of at least 32 (MMAs need K = DI / 2 >= 16).
        PTX_DECODE: decode four bytes at a time with e4m3 conversions (sm_89+ GPUs,
            :func:`msattn.ops.utils.fp8_conversions`); otherwise with integer ops per value (the
            CPU interpreter). Both give the same bits.
    Returns:
        ``(even, odd)``, ``[N, DI // 2]`` fp16 each, bit for bit the even and odd columns of
        ``dequantize_nvfp4(packed, block_scale, ones)`` (the products are exact in fp16).
    """
    tl.static_assert(DI >= 32, "DI must be at least 32")
    BLOCKS: tl.constexpr = DI // 16
    block = tl.arange(0, BLOCKS)
    half = tl.arange(0, DI // 2)
    packed = tl.load(packed_ptr + rows[:, None] * stride_packed_row + half[None, :],
                     mask=row_mask[:, None], other=0)
    packed = tl.reshape(packed, (packed.shape[0], BLOCKS, 8))
    block_scale = tl.load(block_scale_ptr + rows[:, None] * stride_block_scale_row
                          + block[None, :], mask=row_mask[:, None], other=0.0)
    block_scale = block_scale.to(tl.float8e4nv, bitcast=True).to(tl.float16)[:, :, None]  # exact
    if PTX_DECODE:
        # Four bytes -> their low and high nibbles as fp16 ``e2m1 * 2^-6``. An e2m1 code
        # ``s ee m`` moved into an e4m3 byte as ``s 00ee m00`` is exactly ``e2m1 * 2^-6`` (exponent
        # bias 7 against 1; code 1, 0.5, lands on the subnormal 2^-7), which sm_89's
        # ``cvt.rn.f16x2.e4m3x2`` widens two at a time: 9 integer operations and 4 conversions
        # for 8 values. $0, $1: the low nibbles of bytes 0-1 and 2-3 (fp16x2); $2, $3 the high
        # ones; $4 the four bytes.
        even, odd = tl.inline_asm_elementwise(
            "{ .reg .b32 a, b, lo, hi; .reg .b16 l0, l1, h0, h1; "
            "and.b32 a, $4, 0x07070707; shl.b32 a, a, 2; and.b32 b, $4, 0x08080808; "
            "shl.b32 b, b, 4; or.b32 lo, a, b; shr.u32 a, $4, 2; and.b32 a, a, 0x1C1C1C1C; "
            "and.b32 b, $4, 0x80808080; or.b32 hi, a, b; mov.b32 {l0, l1}, lo; "
            "mov.b32 {h0, h1}, hi; cvt.rn.f16x2.e4m3x2 $0, l0; cvt.rn.f16x2.e4m3x2 $1, l1; "
            "cvt.rn.f16x2.e4m3x2 $2, h0; cvt.rn.f16x2.e4m3x2 $3, h1; }",
            "=r,=r,=r,=r,r", [packed], dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
        block_scale = block_scale * 64.0  # exact (a power of two; at most 448 * 64 < 65504)
    else:
        packed = packed.to(tl.int32)
        even = _e2m1_to_fp16(packed & 0xF)
        odd = _e2m1_to_fp16(packed >> 4)
    return (tl.reshape(even * block_scale, (even.shape[0], DI // 2)),
            tl.reshape(odd * block_scale, (odd.shape[0], DI // 2)))


def selection_agreement(indices_a: torch.Tensor, indices_b: torch.Tensor) -> dict:
    """How far two top-k block selections agree (e.g. 4-bit keys against bf16 keys).

    Args:
        indices_a, indices_b: integer ``[..., topk]`` of one shape (e.g. ``[G, total_q, topk]``
            from ``msa_select`` / ``reference.select_blocks``), each row a set of distinct block
            ids in any order, ``-1`` entries padding.
    Returns:
        ``{"rows": number of rows, "identical_rows": fraction of rows whose two sets are equal,
        "blocks_in_common": mean over rows of |A & B| / max(|A|, |B|) (1 for two empty rows),
        "shared_blocks": sum |A & B| / sum max(|A|, |B|)}`` (floats; fractions 1.0 with no rows).
    """
    for name, tensor in (("indices_a", indices_a), ("indices_b", indices_b)):
        check_tensor(name, tensor, max(1, tensor.dim()) if isinstance(tensor, torch.Tensor) else 1,
                     "[..., topk]", _INDEX_DTYPES)
    check_shape("indices_b", indices_b, indices_a.shape, "indices_a.shape")
    a = indices_a.reshape(-1, indices_a.shape[-1]).long()
    b = indices_b.reshape(-1, indices_b.shape[-1]).long().to(a.device)
    if a.shape[0] == 0:
        return {"rows": 0, "identical_rows": 1.0, "blocks_in_common": 1.0, "shared_blocks": 1.0}
    b_sorted = b.sort(dim=-1).values
    position = torch.searchsorted(b_sorted, a).clamp(max=b.shape[-1] - 1)
    common = ((b_sorted.gather(-1, position) == a) & (a >= 0)).sum(-1)
    size_a, size_b = (a >= 0).sum(-1), (b >= 0).sum(-1)
    larger = torch.maximum(size_a, size_b)
    identical = (common == size_a) & (common == size_b)
    fraction = torch.where(larger > 0, common / larger.clamp(min=1), 1.0)
    total = int(larger.sum())
    return {"rows": a.shape[0], "identical_rows": float(identical.float().mean()),
            "blocks_in_common": float(fraction.float().mean()),
            "shared_blocks": float(common.sum()) / total if total else 1.0}
