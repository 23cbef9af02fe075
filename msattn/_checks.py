"""Argument checks shared by the public API, the paged API and the caches (one copy each).

Every check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape or value)
naming the argument and what was expected. Checks of tensor metadata never synchronise with the
device; the checks of tensor *values* (``check_cu_seqlens_values``, ``check_batch_layout_values``)
read them back and say so.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP8_DTYPE = torch.float8_e4m3fn
INDEX_DTYPES = (*FLOAT_DTYPES, FP8_DTYPE)
NVFP4_DTYPE = torch.uint8  # a 4-bit index cache: two e2m1 codes a byte (msattn.ops.nvfp4)
PAGED_INDEX_DTYPES = (*INDEX_DTYPES, NVFP4_DTYPE)  # index caches (4-bit: decode only)
KV_DTYPES = (*FLOAT_DTYPES, FP8_DTYPE)  # K/V caches: fp8 with k_scale / v_scale


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def check_tensor(name: str, tensor, ndim: int, shape_text: str, dtypes=FLOAT_DTYPES) -> None:
    """A ``torch.Tensor`` with ``ndim`` dims and a dtype among ``dtypes``."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_text}, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_text} ({ndim} dims), got {tuple(tensor.shape)}")
    if tensor.dtype not in dtypes:
        names = ", ".join(dtype_name(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {dtype_name(tensor.dtype)}")


def check_dtype_choice(name: str, dtype, choices) -> None:
    """``dtype`` (a ``torch.dtype``) among ``choices``."""
    if dtype not in choices:
        names = ", ".join(dtype_name(d) for d in choices)
        got = dtype_name(dtype) if isinstance(dtype, torch.dtype) else repr(dtype)
        raise TypeError(f"{name} must be one of {names}, got {got}")


def check_shape(name: str, tensor: torch.Tensor, expected: Sequence[int], shape_text: str) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {shape_text} = {tuple(expected)}, got {tuple(tensor.shape)}")


def check_any_rank(name: str, tensor, dtypes) -> None:
    """A tensor ``[..., Di]`` (at least one dim) of one of ``dtypes``."""
    check_tensor(name, tensor, max(1, tensor.dim()) if isinstance(tensor, torch.Tensor) else 1,
                 "[..., Di]", dtypes)


def check_int(name: str, value, minimum: int, *, power_of_two: bool = False) -> None:
    """An ``int`` (not a bool) at least ``minimum``, optionally a power of two."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if power_of_two and value & (value - 1):
        raise ValueError(f"{name} must be a power of two, got {value}")


def check_block_size(block_size, name: str = "block_size") -> None:
    check_int(name, block_size, 1, power_of_two=True)


def check_selection_params(topk, init_blocks, local_blocks) -> None:
    check_int("topk", topk, 1)
    check_int("init_blocks", init_blocks, 0)
    check_int("local_blocks", local_blocks, 1)
    if topk < init_blocks + local_blocks:
        raise ValueError(f"topk must be >= init_blocks + local_blocks = {init_blocks + local_blocks} "
                         f"(forced blocks use slots of the budget), got topk={topk}")


def check_optional_int(name: str, value, minimum: int = 0) -> None:
    if value is not None:
        check_int(name, value, minimum)


def softmax_scale_or_default(softmax_scale, head_dim: int) -> float:
    """``softmax_scale`` as a float, ``head_dim ** -0.5`` when None."""
    if softmax_scale is None:
        return head_dim ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    return float(softmax_scale)


def check_same_device(**tensors) -> None:
    """All the given tensors (None entries skipped) on one device."""
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    first_name, first = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first:
            raise ValueError(f"{name} is on {device} but {first_name} is on {first}: all tensors must "
                             "be on one device")


def check_cu_seqlens_meta(name: str, cu) -> None:
    """An int32 ``[B + 1]`` tensor with ``B >= 1`` (metadata only, no host sync)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor of shape [B + 1], got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype int32, got {dtype_name(cu.dtype)}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must have shape [B + 1] with B >= 1, got {tuple(cu.shape)}")


def check_prefix_sums(name: str, values: list[int], total: int | None, rows: str) -> None:
    """Host values of a prefix-sum tensor: from 0, non-decreasing, ending at ``total``."""
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    if any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must be non-decreasing, got {values}")
    if total is not None and values[-1] != total:
        raise ValueError(f"{name}[-1] must equal {rows} = {total}, got {values[-1]}")


def check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, total_q: int, total_k: int, *,
                     check_values: bool = True) -> tuple[int, int] | None:
    """Varlen prefix sums: int32 ``[B + 1]`` each, the same ``B``; with ``check_values`` (reads
    them: a host sync) also from 0, non-decreasing, matching totals and ``len_q <= len_k``, and
    returns the longest ``(len_q, len_k)``."""
    values = {}
    for name, cu, total, rows in (("cu_seqlens_q", cu_seqlens_q, total_q, "total_q"),
                                  ("cu_seqlens_k", cu_seqlens_k, total_k, "total_k")):
        check_cu_seqlens_meta(name, cu)
        if check_values:
            values[name] = cu.tolist()
            check_prefix_sums(name, values[name], total, rows)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length B + 1, got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    if not check_values:
        return None
    values_q, values_k = values["cu_seqlens_q"], values["cu_seqlens_k"]
    for b in range(len(values_q) - 1):
        lq, lk = values_q[b + 1] - values_q[b], values_k[b + 1] - values_k[b]
        if lq > lk:
            raise ValueError(f"sequence {b} has len_q = {lq} > len_k = {lk}: queries must be the last "
                             "positions of their keys (cu_seqlens_q / cu_seqlens_k)")
    return (max(b - a for a, b in zip(values_q, values_q[1:])),
            max(b - a for a, b in zip(values_k, values_k[1:])))


def check_4bit_index_dim(name: str, index_dim: int) -> None:
    """4-bit index keys (:mod:`msattn.ops.nvfp4`) are read by kernels whose MMAs take ``Di / 2``
    values a row: ``Di`` must be a power of two of at least 32."""
    if index_dim < 32 or index_dim & (index_dim - 1):
        raise ValueError(f"4-bit index keys (index_dtype torch.uint8) need {name} a power of two "
                         f"of at least 32, got {index_dim}")


def check_index_scale(index_cache: torch.Tensor, index_scale, index_block_scale=None) -> None:
    """The fp8 rule: a float8_e4m3fn ``index_cache [num_pages, page_size, Di]`` needs a float32
    ``index_scale [num_pages, page_size]`` (key = value x scale). The 4-bit rule: a uint8
    ``index_cache [num_pages, page_size, Di / 2]`` needs float8_e4m3fn ``index_block_scale
    [num_pages, page_size, Di / 16]`` and the token scales ``index_scale`` (as for fp8). Other
    index dtypes take neither."""
    if index_cache.dtype == NVFP4_DTYPE:
        if index_block_scale is None or index_scale is None:
            raise ValueError("a 4-bit (uint8) index_cache [num_pages, page_size, Di / 2] needs "
                             "index_block_scale [num_pages, page_size, Di / 16] float8_e4m3fn and "
                             "index_scale [num_pages, page_size] float32 (msattn.ops.nvfp4)")
        check_tensor("index_block_scale", index_block_scale, 3,
                     "[num_pages, page_size, Di / 16]", (FP8_DTYPE,))
        check_shape("index_block_scale", index_block_scale,
                    (*index_cache.shape[:2], index_cache.shape[2] // 8),
                    "[num_pages, page_size, Di / 16] (index_cache is [num_pages, page_size, Di / 2])")
        check_tensor("index_scale", index_scale, 2, "[num_pages, page_size]", (torch.float32,))
        check_shape("index_scale", index_scale, index_cache.shape[:2], "[num_pages, page_size]")
        return
    if index_block_scale is not None:
        raise ValueError("index_block_scale is only used with a 4-bit (uint8) index_cache; got "
                         f"it with a {dtype_name(index_cache.dtype)} index_cache")
    if index_cache.dtype == FP8_DTYPE:
        if index_scale is None:
            raise ValueError("index_scale [num_pages, page_size] float32 is required with a "
                             "float8_e4m3fn index_cache")
        check_tensor("index_scale", index_scale, 2, "[num_pages, page_size]", (torch.float32,))
        check_shape("index_scale", index_scale, index_cache.shape[:2], "[num_pages, page_size]")
    elif index_scale is not None:
        raise ValueError("index_scale is only used with a float8_e4m3fn index_cache; got index_scale "
                         f"with a {dtype_name(index_cache.dtype)} index_cache")


def check_kv_scales(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale, v_scale, *,
                    q_dtype: torch.dtype | None = None) -> None:
    """The fp8 K/V rule: float8_e4m3fn ``k_cache``, ``v_cache [num_pages, page_size, G, D]`` (both
    or neither) need float32 ``k_scale`` and ``v_scale`` of shape ``[]`` (per tensor) or ``[G]``
    (per KV head) on the caches' device (real K = ``k_cache.float() * k_scale``), and 16-bit
    queries (``q_dtype``, when given); 16-bit or float32 caches take no scale and share
    ``q_dtype``."""
    fp8 = k_cache.dtype == FP8_DTYPE
    if (v_cache.dtype == FP8_DTYPE) != fp8:
        raise TypeError(f"k_cache and v_cache must both be float8_e4m3fn or neither, got "
                        f"{dtype_name(k_cache.dtype)} and {dtype_name(v_cache.dtype)}")
    if not fp8:
        for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
            if scale is not None:
                raise ValueError(f"{name} is only used with float8_e4m3fn K/V caches; got {name} "
                                 f"with {dtype_name(k_cache.dtype)} caches")
        if q_dtype is not None and (k_cache.dtype != q_dtype or v_cache.dtype != q_dtype):
            raise TypeError(f"q, k_cache and v_cache must share one dtype (or the caches be "
                            f"float8_e4m3fn), got {dtype_name(q_dtype)}, "
                            f"{dtype_name(k_cache.dtype)}, {dtype_name(v_cache.dtype)}")
        return
    if q_dtype is not None and q_dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"float8_e4m3fn K/V caches need float16 or bfloat16 queries, got "
                        f"{dtype_name(q_dtype)}")
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is None:
            raise ValueError(f"{name} (float32 [] per tensor or [G={k_cache.shape[2]}] per KV head) "
                             "is required with float8_e4m3fn K/V caches")
        check_kv_scale(name, scale, k_cache.shape[2], k_cache.device)


def check_kv_scale(name: str, scale, num_groups: int, device: torch.device) -> None:
    """A float32 ``[]`` (per tensor) or ``[G]`` (per KV head) scale of fp8 K/V on ``device``."""
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"{name} must be a float32 torch.Tensor of shape [] or [G={num_groups}], "
                        f"got {type(scale).__name__}")
    if scale.dtype != torch.float32:
        raise TypeError(f"{name} must have dtype float32, got {dtype_name(scale.dtype)}")
    if tuple(scale.shape) not in ((), (num_groups,)):
        raise ValueError(f"{name} must have shape [] (per tensor) or [G={num_groups}] (per KV "
                         f"head), got {tuple(scale.shape)}")
    if scale.device != device:
        raise ValueError(f"{name} is on {scale.device} but the K/V are on {device}")


def check_batch_layout(block_table, cu_seqlens_q, seq_lens, device) -> int:
    """``block_table [B, max_pages]``, ``cu_seqlens_q [B + 1]`` (may be None) and ``seq_lens
    [B]``, int32, on ``device`` (metadata only); returns B."""
    check_tensor("block_table", block_table, 2, "[B, max_pages]", (torch.int32,))
    check_tensor("seq_lens", seq_lens, 1, "[B]", (torch.int32,))
    batch = block_table.shape[0]
    check_shape("seq_lens", seq_lens, (batch,), "[B] (B from block_table)")
    if cu_seqlens_q is not None:
        check_tensor("cu_seqlens_q", cu_seqlens_q, 1, "[B + 1]", (torch.int32,))
        check_shape("cu_seqlens_q", cu_seqlens_q, (batch + 1,), "[B + 1] (B from block_table)")
    check_same_device(block_table=block_table, seq_lens=seq_lens, cu_seqlens_q=cu_seqlens_q)
    if block_table.device != device:
        raise ValueError(f"block_table is on {block_table.device} but the caches are on {device}")
    return batch


def check_batch_layout_values(block_table, cu_seqlens_q, seq_lens, num_pages: int, page_size: int,
                              total_q: int) -> int:
    """The batch layout's values (reads them back: a host sync): prefix sums, ``seq_lens`` at
    least the new tokens, and every page in use inside ``[0, num_pages)``. Returns the longest
    query run."""
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    if cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])) or cu[-1] != total_q:
        raise ValueError(f"cu_seqlens_q must start at 0, be non-decreasing and end at total_q = "
                         f"{total_q}, got {cu}")
    table = block_table.tolist()
    for b, seq_len in enumerate(lens):
        len_q = cu[b + 1] - cu[b]
        if seq_len < len_q:
            raise ValueError(f"seq_lens[{b}] = {seq_len} is smaller than the {len_q} new tokens of "
                             f"request {b} (cu_seqlens_q): seq_lens counts the new tokens too")
        request_pages(b, seq_len, table[b], page_size, num_pages)
    return max((y - x for x, y in zip(cu, cu[1:])), default=0)


def request_pages(b: int, seq_len: int, table_row: list[int], page_size: int, num_pages: int) -> list[int]:
    """The page ids of request ``b``'s ``seq_len`` tokens (host values of its ``block_table``
    row), each checked to lie in ``[0, num_pages)``."""
    if seq_len < 0:
        raise ValueError(f"seq_lens[{b}] must be >= 0, got {seq_len}")
    used = math.ceil(seq_len / page_size)
    if used > len(table_row):
        raise ValueError(f"seq_lens[{b}] = {seq_len} needs {used} pages but block_table has "
                         f"{len(table_row)} columns")
    pages = table_row[:used]
    bad = [p for p in pages if not 0 <= p < num_pages]
    if bad:
        raise ValueError(f"block_table[{b}] holds page ids {bad} outside [0, {num_pages}) "
                         f"among the {used} pages of its {seq_len} tokens")
    return pages
