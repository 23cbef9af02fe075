"""Paged K/V and index-key caches for decode and serving (flash-attn / vLLM layout).

Layout of one layer's caches (``page_size`` = MSA ``block_size``):

* ``k_cache, v_cache [num_pages, page_size, G, D]`` fp16 / bf16 / fp32, any strides (a head-major
  physical buffer ``[num_pages, G, page_size, D]`` permuted to this logical view works as is), or
  ``torch.float8_e4m3fn`` with float32 ``k_scale``, ``v_scale`` of shape ``[]`` (per tensor) or
  ``[G]`` (per KV head): real K = ``k_cache.float() * k_scale`` (:func:`quantize_kv`);
* ``index_cache [num_pages, page_size, Di]`` fp16 / bf16 / fp32, or ``torch.float8_e4m3fn`` with
  ``index_scale [num_pages, page_size]`` float32: dequantised key = ``float(fp8) * scale``; or
  4-bit (decode; :mod:`msattn.ops.nvfp4`): ``torch.uint8 [num_pages, page_size, Di / 2]`` e2m1
  codes with ``index_block_scale [num_pages, page_size, Di / 16]`` float8_e4m3fn and the token
  scales ``index_scale``;
* ``block_table [B, max_pages]`` int32: page ``i`` of request ``b`` is ``block_table[b, i]``;
  entries past a request's pages may hold anything (``-1`` included) and are never read;
* ``seq_lens [B]`` int32: tokens written for request ``b``, its new tokens included;
* ``cu_seqlens_q [B + 1]`` int32: the new tokens of request ``b`` are the last
  ``cu_seqlens_q[b + 1] - cu_seqlens_q[b]`` of its ``seq_lens[b]`` tokens.

Token ``p`` (0-based position) of request ``b`` lives in page ``block_table[b, p // page_size]``,
slot ``p % page_size``.

:func:`write_paged_cache` runs without host synchronisation (it can be captured in a CUDA graph);
:func:`gather_paged` (tests, reference) may synchronise. :class:`MSAPagedCache` owns the buffers
of one or more layers and hands out pages.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from msattn._checks import (FLOAT_DTYPES, FP8_DTYPE, KV_DTYPES, NVFP4_DTYPE,
                            PAGED_INDEX_DTYPES, check_4bit_index_dim, check_any_rank,
                            check_batch_layout, check_batch_layout_values, check_dtype_choice,
                            check_index_scale, check_int, check_kv_scale, check_kv_scales, check_same_device,
                            check_shape, check_tensor, dtype_name, request_pages)
from msattn.ops.nvfp4 import quantize_nvfp4

FP8_MAX = 448.0  # largest finite float8_e4m3fn value


# ----------------------------------------------------------------------------------------------
# FP8 index keys
# ----------------------------------------------------------------------------------------------

def quantize_index_keys(index_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise index keys to float8_e4m3fn with one float32 scale per token.

    Args:
        index_keys: ``[..., Di]`` fp16, bf16 or fp32 (e.g. ``[total, Di]``).
    Returns:
        ``(keys_fp8 [..., Di] float8_e4m3fn, scale [...] float32)`` with
        ``scale = amax(|x|) / 448`` over the last dim (1.0 for an all-zero row, whose keys then
        quantise to zeros), so that ``keys_fp8.float() * scale[..., None]`` approximates ``x``
        with a relative error of about 2^-4 of the row's largest value or better.
    """
    check_any_rank("index_keys", index_keys, FLOAT_DTYPES)
    # |x| and its max are exact in the input's dtype: one float32 temporary of the keys' size
    scale = index_keys.abs().amax(dim=-1).float() / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero (or underflowed) rows
    scaled = index_keys.float() / scale[..., None]  # a new tensor even for float32 keys
    scaled.clamp_(-FP8_MAX, FP8_MAX)  # rounding may step past 448
    return scaled.to(FP8_DTYPE), scale


def dequantize_index_keys(keys_fp8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_index_keys`: ``keys_fp8 [..., Di]`` float8_e4m3fn and
    ``scale [...]`` float32 -> float32 ``[..., Di]``."""
    check_any_rank("keys_fp8", keys_fp8, (FP8_DTYPE,))
    check_tensor("scale", scale, keys_fp8.dim() - 1, "[...] (keys_fp8's shape without Di)",
                  (torch.float32,))
    check_shape("scale", scale, keys_fp8.shape[:-1], "keys_fp8.shape[:-1]")
    return keys_fp8.float() * scale[..., None]


# ----------------------------------------------------------------------------------------------
# FP8 K/V
# ----------------------------------------------------------------------------------------------

def _kv_scale_shape(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``scale []`` or ``[G]`` as a factor that broadcasts over ``x [..., G, D]``."""
    return scale[:, None] if scale.dim() == 1 else scale


def quantize_kv(x: torch.Tensor, scale: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise keys or values to float8_e4m3fn with a per-KV-head or per-tensor float32 scale.

    Args:
        x: ``[..., G, D]`` fp16, bf16 or fp32 (e.g. ``[total, G, D]`` or a whole cache).
        scale: float32 ``[]`` (per tensor) or ``[G]`` (per KV head) to quantise with (a cache's
            fixed scale); default: per head, ``amax(|x|) / 448`` over all but the G dim (1.0 for an
            all-zero head).
    Returns:
        ``(x_fp8 [..., G, D] float8_e4m3fn, scale)``: ``x / scale`` rounded to nearest and clamped
        to +-448, so that ``x_fp8.float() * scale`` (:func:`dequantize_kv`) approximates ``x``
        within 2^-4 of each value (2^-10 of the scale below e4m3's normal range), where
        ``|x| <= 448 * scale``.
    """
    check_tensor("x", x, max(2, x.dim()) if isinstance(x, torch.Tensor) else 2, "[..., G, D]",
                 FLOAT_DTYPES)
    values = x.float()
    if scale is None:
        per_head = values.abs().movedim(-2, 0).reshape(x.shape[-2], -1)
        amax = per_head.amax(1) if per_head.shape[1] else per_head.new_zeros(x.shape[-2])
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    check_kv_scale("scale", scale, x.shape[-2], x.device)
    scaled = (values / _kv_scale_shape(x, scale)).clamp(-FP8_MAX, FP8_MAX)
    return scaled.to(FP8_DTYPE), scale


def dequantize_kv(x_fp8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_kv`: ``x_fp8 [..., G, D]`` float8_e4m3fn and ``scale`` float32
    ``[]`` or ``[G]`` -> float32 ``[..., G, D]``."""
    check_tensor("x_fp8", x_fp8, max(2, x_fp8.dim()) if isinstance(x_fp8, torch.Tensor) else 2,
                 "[..., G, D]", (FP8_DTYPE,))
    check_kv_scale("scale", scale, x_fp8.shape[-2], x_fp8.device)
    return x_fp8.float() * _kv_scale_shape(x_fp8, scale)


# ----------------------------------------------------------------------------------------------
# Writing and reading pages
# ----------------------------------------------------------------------------------------------

def token_slots(block_table: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                total_q: int, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Page and slot of every new token, computed on the device without host synchronisation.

    Args:
        block_table: int32 ``[B, max_pages]``; cu_seqlens_q: int32 ``[B + 1]`` with
            ``cu_seqlens_q[-1] == total_q``; seq_lens: int32 ``[B]``.
    Returns:
        ``(pages [total_q], slots [total_q])`` int64: new token ``i`` of request ``b`` (row ``i``
        of the varlen batch) sits at position ``p = seq_lens[b] - cu_seqlens_q[b + 1] + i``, in
        page ``block_table[b, p // page_size]``, slot ``p % page_size``.
    """
    rows = torch.arange(total_q, device=block_table.device, dtype=torch.int32)
    # Request of each row: the first b with cu_seqlens_q[b + 1] > row (empty requests skipped).
    request = torch.searchsorted(cu_seqlens_q[1:].contiguous(), rows, right=True)
    positions = (seq_lens.long()[request] - cu_seqlens_q.long()[request + 1] + rows.long())
    pages = block_table[request, positions // page_size].long()
    return pages, positions % page_size


def write_paged_cache(k, v, index_keys, k_cache, v_cache, index_cache, block_table, cu_seqlens_q,
                      seq_lens, *, index_scale=None, k_scale=None, v_scale=None,
                      index_block_scale=None, check_values=False) -> None:
    """Write the new tokens' K, V and index keys into their pages (in place, through the views).

    Args:
        k, v: ``[total_q, G, D]`` fp16 / bf16 / fp32 (cast to the cache dtype, or quantised with
            ``k_scale`` / ``v_scale`` by :func:`quantize_kv` into fp8 caches), the new tokens of
            all requests in the varlen order of ``cu_seqlens_q``.
        index_keys: ``[total_q, Di]`` fp16 / bf16 / fp32; quantised per token
            (:func:`quantize_index_keys`) when ``index_cache`` is float8_e4m3fn, to 4 bits
            (:func:`msattn.ops.nvfp4.quantize_nvfp4`) when it is uint8.
        k_cache, v_cache: ``[num_pages, page_size, G, D]`` fp16 / bf16 / fp32 / float8_e4m3fn, any
            strides.
        index_cache: ``[num_pages, page_size, Di]`` fp16 / bf16 / fp32 / float8_e4m3fn, or uint8
            ``[num_pages, page_size, Di / 2]`` (4-bit), any strides.
        block_table: int32 ``[B, max_pages]``.
        cu_seqlens_q: int32 ``[B + 1]``, ``cu_seqlens_q[-1] == total_q``.
        seq_lens: int32 ``[B]``, tokens of request ``b`` after this write (new tokens included).
        index_scale: float32 ``[num_pages, page_size]``: required with an fp8 or 4-bit
            ``index_cache``, must be None otherwise.
        index_block_scale: float8_e4m3fn ``[num_pages, page_size, Di / 16]``: required with a
            4-bit ``index_cache``, must be None otherwise.
        k_scale, v_scale: float32 ``[]`` or ``[G]``, the scales of fp8 K/V caches (required with
            them, None otherwise).
        check_values: also check the values of ``cu_seqlens_q``, ``seq_lens`` and the used
            entries of ``block_table`` on the host (synchronises; not capturable). Without it,
            bad values write to wrong pages (or fault on the GPU).

    Only tensor metadata is checked by default: the write itself is pure device work with no host
    synchronisation and can be captured in a CUDA graph.
    """
    check_tensor("k", k, 3, "[total_q, G, D]", FLOAT_DTYPES)
    check_tensor("k_cache", k_cache, 4, "[num_pages, page_size, G, D]", KV_DTYPES)
    check_tensor("v_cache", v_cache, 4, "[num_pages, page_size, G, D]", KV_DTYPES)
    check_tensor("index_cache", index_cache, 3, "[num_pages, page_size, Di]",
                 PAGED_INDEX_DTYPES)
    total_q, num_groups, head_dim = k.shape
    num_pages, page_size = k_cache.shape[:2]
    check_shape("k_cache", k_cache, (num_pages, page_size, num_groups, head_dim),
                 "[num_pages, page_size, G, D] (G, D from k)")
    check_shape("v_cache", v_cache, k_cache.shape, "k_cache.shape")
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(f"v_cache must have the dtype of k_cache ({dtype_name(k_cache.dtype)}), got "
                        f"{dtype_name(v_cache.dtype)}")
    check_kv_scales(k_cache, v_cache, k_scale, v_scale)
    check_tensor("v", v, 3, "[total_q, G, D]", FLOAT_DTYPES)
    check_shape("v", v, k.shape, "k.shape")
    check_tensor("index_keys", index_keys, 2, "[total_q, Di]", FLOAT_DTYPES)
    index_dim = index_keys.shape[1]
    check_shape("index_keys", index_keys, (total_q, index_dim), "[total_q, Di] (total_q from k)")
    four_bit = index_cache.dtype == NVFP4_DTYPE
    if four_bit:
        check_shape("index_cache", index_cache, (num_pages, page_size, index_dim // 2),
                    "[num_pages, page_size, Di / 2] (4-bit; from k_cache and index_keys)")
        check_4bit_index_dim("Di (index_keys.shape[1])", index_dim)
    else:
        check_shape("index_cache", index_cache, (num_pages, page_size, index_dim),
                    "[num_pages, page_size, Di] (from k_cache and index_keys)")
    check_index_scale(index_cache, index_scale, index_block_scale)
    fp8 = index_cache.dtype == FP8_DTYPE
    check_same_device(k_cache=k_cache, k=k, v=v, index_keys=index_keys, v_cache=v_cache,
                       index_cache=index_cache, index_scale=index_scale,
                       index_block_scale=index_block_scale)
    if cu_seqlens_q is None:
        raise TypeError("cu_seqlens_q must be an int32 torch.Tensor of shape [B + 1], got NoneType")
    check_batch_layout(block_table, cu_seqlens_q, seq_lens, k_cache.device)
    if check_values:
        check_batch_layout_values(block_table, cu_seqlens_q, seq_lens, num_pages, page_size, total_q)
    if total_q == 0:
        return

    pages, slots = token_slots(block_table, cu_seqlens_q, seq_lens, total_q, page_size)
    if k_cache.dtype == FP8_DTYPE:
        k_cache[pages, slots] = quantize_kv(k, k_scale)[0]
        v_cache[pages, slots] = quantize_kv(v, v_scale)[0]
    else:
        k_cache[pages, slots] = k.to(k_cache.dtype)
        v_cache[pages, slots] = v.to(v_cache.dtype)
    if fp8:
        keys, scale = quantize_index_keys(index_keys)
        index_cache[pages, slots] = keys
        index_scale[pages, slots] = scale
    elif four_bit:
        packed, block_scale, scale = quantize_nvfp4(index_keys)
        index_cache[pages, slots] = packed
        index_block_scale[pages, slots] = block_scale
        index_scale[pages, slots] = scale
    else:
        index_cache[pages, slots] = index_keys.to(index_cache.dtype)


def gather_paged(cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``seq_lens[b]`` tokens of every request, concatenated (for tests and references).

    Args:
        cache: ``[num_pages, page_size, ...]`` any dtype and strides (a K/V or index cache, or an
            ``index_scale [num_pages, page_size]``).
        block_table: int32 ``[B, max_pages]``; seq_lens: int32 ``[B]``.
    Returns:
        ``(contiguous [sum(seq_lens), ...], cu_seqlens_k int32 [B + 1])`` on ``cache``'s device.
        Synchronises with the device.
    """
    if not isinstance(cache, torch.Tensor) or cache.dim() < 2:
        raise TypeError(f"cache must be a torch.Tensor of shape [num_pages, page_size, ...], got "
                        f"{tuple(cache.shape) if isinstance(cache, torch.Tensor) else type(cache).__name__}")
    check_batch_layout(block_table, None, seq_lens, cache.device)
    num_pages, page_size = cache.shape[:2]
    lens = seq_lens.tolist()
    table = block_table.tolist()
    parts = []
    for b, seq_len in enumerate(lens):
        pages = request_pages(b, seq_len, table[b], page_size, num_pages)
        used = len(pages)
        ids = torch.tensor(pages, dtype=torch.long, device=cache.device)
        parts.append(cache[ids].reshape(used * page_size, *cache.shape[2:])[:seq_len])
    cu = torch.tensor([0, *lens], dtype=torch.int64).cumsum(0).to(torch.int32).to(cache.device)
    return torch.cat(parts) if parts else cache.new_empty((0, *cache.shape[2:])), cu


# ----------------------------------------------------------------------------------------------
# The cache object
# ----------------------------------------------------------------------------------------------

class MSAPagedCache:
    """The paged K/V and index-key caches of ``num_layers`` MSA layers, and their page allocator.

    Attributes (``layer`` indexes the lists):
        k_cache[layer], v_cache[layer]: ``[num_pages, page_size, G, D]`` of ``dtype`` (a view of a
            ``[num_pages, G, page_size, D]`` buffer when ``head_major``);
        k_scale[layer], v_scale[layer]: float32 ``[]`` or ``[G]`` with fp8 K/V (the constructor's
            scales, one copy per layer, which may be updated in place before the first write),
            else None;
        index_cache[layer]: ``[num_pages, page_size, Di]`` of ``index_dtype`` (``[num_pages,
            page_size, Di / 2]`` with ``index_dtype=torch.uint8``: 4-bit keys, decode only);
        index_scale[layer]: float32 ``[num_pages, page_size]`` with fp8 or 4-bit index keys,
            else None; index_block_scale[layer]: float8_e4m3fn ``[num_pages, page_size, Di /
            16]`` with 4-bit keys, else None;
        page_size, num_pages, num_kv_heads, head_dim, index_dim, num_layers.

    Pages are shared by all layers: one page id addresses the same slots in every layer's buffers,
    so one block table serves the whole model. K/V and index buffers start zeroed, index scales
    at one. With ``dtype=torch.float8_e4m3fn`` the K/V writes quantise with ``k_scale`` and
    ``v_scale`` (floats, or float32 tensors ``[]`` / ``[G]``, e.g. from :func:`quantize_kv` on
    calibration data), which are required then.
    """

    def __init__(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 index_dim: int, *, num_layers: int = 1, dtype: torch.dtype = torch.bfloat16,
                 index_dtype: torch.dtype = torch.bfloat16, device=None, head_major: bool = False,
                 k_scale=None, v_scale=None):
        for name, value in (("num_pages", num_pages), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim), ("index_dim", index_dim),
                            ("num_layers", num_layers)):
            check_int(name, value, 1)
        check_int("page_size (the MSA block size)", page_size, 1, power_of_two=True)
        check_dtype_choice("dtype", dtype, KV_DTYPES)
        check_dtype_choice("index_dtype", index_dtype, PAGED_INDEX_DTYPES)
        four_bit = index_dtype == NVFP4_DTYPE
        if four_bit:
            check_4bit_index_dim("index_dim", index_dim)
        self.num_pages, self.page_size, self.num_layers = num_pages, page_size, num_layers
        self.num_kv_heads, self.head_dim, self.index_dim = num_kv_heads, head_dim, index_dim
        self.dtype, self.index_dtype = dtype, index_dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.head_major = head_major

        def kv_buffer():
            if head_major:
                physical = torch.zeros(num_pages, num_kv_heads, page_size, head_dim, dtype=dtype,
                                       device=self.device)
                return physical.permute(0, 2, 1, 3)
            return torch.zeros(num_pages, page_size, num_kv_heads, head_dim, dtype=dtype,
                               device=self.device)

        scaled = index_dtype in (FP8_DTYPE, NVFP4_DTYPE)
        self.k_cache = [kv_buffer() for _ in range(num_layers)]
        self.v_cache = [kv_buffer() for _ in range(num_layers)]
        self.index_cache = [torch.zeros(num_pages, page_size, index_dim // 2 if four_bit else index_dim,
                                        dtype=index_dtype, device=self.device)
                            for _ in range(num_layers)]
        self.index_scale = [torch.ones(num_pages, page_size, dtype=torch.float32, device=self.device)
                            if scaled else None for _ in range(num_layers)]
        self.index_block_scale = [torch.zeros(num_pages, page_size, index_dim // 16, dtype=FP8_DTYPE,
                                              device=self.device) if four_bit else None
                                  for _ in range(num_layers)]
        scales = [torch.tensor(float(s), dtype=torch.float32, device=self.device)
                  if isinstance(s, (int, float)) else s for s in (k_scale, v_scale)]
        check_kv_scales(self.k_cache[0], self.v_cache[0], *scales)
        self.k_scale, self.v_scale = ([None if s is None else s.clone() for _ in range(num_layers)]
                                      for s in scales)
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: pop() hands out low ids first
        self._in_use: set[int] = set()

    # -- allocator --------------------------------------------------------------------------

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def pages_needed(self, num_tokens: int) -> int:
        """Pages that hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.page_size)

    def allocate(self, num_tokens: int) -> list[int]:
        """Page ids for ``num_tokens`` more tokens (``ceil(num_tokens / page_size)`` pages).

        Raises RuntimeError when too few pages are free (nothing is allocated then).
        """
        check_int("num_tokens", num_tokens, 0)
        count = self.pages_needed(num_tokens)
        if count > len(self._free):
            raise RuntimeError(f"out of cache pages: {num_tokens} tokens need {count} pages, "
                               f"{len(self._free)} of {self.num_pages} are free")
        pages = [self._free.pop() for _ in range(count)]
        self._in_use.update(pages)
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Return pages to the allocator; raises ValueError for a page that is not allocated."""
        pages = list(pages)
        bad = [p for p in pages if p not in self._in_use]
        if bad or len(set(pages)) != len(pages):
            raise ValueError(f"pages must be allocated and distinct; not allocated (or repeated): "
                             f"{bad or pages}")
        self._in_use.difference_update(pages)
        self._free.extend(reversed(pages))

    def block_table(self, page_lists: Sequence[Sequence[int]], max_pages: int | None = None,
                    device=None) -> torch.Tensor:
        """int32 ``[B, max_pages]`` block table of per-request page lists, padded with ``-1``.

        ``max_pages`` defaults to the longest list (a fixed value keeps the shape of a graph).
        """
        return build_block_table(page_lists, max_pages=max_pages,
                                 device=self.device if device is None else device)

    # -- writing -----------------------------------------------------------------------------

    def append(self, layer: int, k, v, index_keys, block_table, cu_seqlens_q, seq_lens, *,
               check_values: bool = False) -> None:
        """Write new tokens of ``layer`` into their pages: :func:`write_paged_cache` on this
        layer's buffers (no host synchronisation unless ``check_values``)."""
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        write_paged_cache(k, v, index_keys, self.k_cache[layer], self.v_cache[layer],
                          self.index_cache[layer], block_table, cu_seqlens_q, seq_lens,
                          index_scale=self.index_scale[layer], k_scale=self.k_scale[layer],
                          v_scale=self.v_scale[layer],
                          index_block_scale=self.index_block_scale[layer],
                          check_values=check_values)

    def layer(self, layer: int) -> dict:
        """Keyword arguments of the paged MSA calls for ``layer``: ``k_cache``, ``v_cache``,
        ``index_cache``, ``index_scale``, ``index_block_scale``, ``k_scale``, ``v_scale``."""
        return {"k_cache": self.k_cache[layer], "v_cache": self.v_cache[layer],
                "index_cache": self.index_cache[layer], "index_scale": self.index_scale[layer],
                "index_block_scale": self.index_block_scale[layer],
                "k_scale": self.k_scale[layer], "v_scale": self.v_scale[layer]}

    def __repr__(self) -> str:
        return (f"MSAPagedCache(num_pages={self.num_pages}, page_size={self.page_size}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"index_dim={self.index_dim}, num_layers={self.num_layers}, "
                f"dtype={dtype_name(self.dtype)}, index_dtype={dtype_name(self.index_dtype)}, "
                f"device={self.device}, free={self.num_free_pages})")


def build_block_table(page_lists: Sequence[Sequence[int]], *, max_pages: int | None = None,
                      device=None) -> torch.Tensor:
    """int32 ``[B, max_pages]`` block table of per-request page lists, padded with ``-1``."""
    lists = [list(pages) for pages in page_lists]
    longest = max((len(p) for p in lists), default=0)
    width = longest if max_pages is None else max_pages
    if width < longest:
        raise ValueError(f"max_pages = {max_pages} is smaller than the longest page list ({longest})")
    table = torch.full((len(lists), max(width, 1) if max_pages is None else width), -1,
                       dtype=torch.int32)
    for b, pages in enumerate(lists):
        if pages:
            table[b, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
    return table.to(device) if device is not None else table
