"""Dense fallback of ``msa_attention(backend="auto")``.

A sequence with ``len_k <= topk * block_size`` has at most ``topk`` blocks, so MSA selects all of
them (whatever ``qi``, ``ki``, ``init_blocks``, ``local_blocks``) and equals dense causal attention
exactly. At the M3 shape that is 2K tokens, far below the measured crossover (on an H200, MSA is
slower than dense up to 16K), so ``auto`` then skips the indexer and runs torch's bundled
FlashAttention-2 (varlen, GQA, causal aligned bottom-right); if that op is missing or raises, the
sparse path runs.
"""

from __future__ import annotations

from typing import Callable

import torch

from msattn import backends

PATH = "dense (flash varlen; every sequence <= topk*block_size)"
DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256  # FlashAttention-2 takes head dims that are multiples of 8, up to 256


def dense_is_exact(max_len_k: int, topk: int, block_size: int) -> bool:
    """Whether MSA equals dense causal attention: no sequence has more than ``topk`` blocks."""
    return max_len_k <= topk * block_size


def dense_supported(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the dense path may run at all: ``backend == "auto"``, CUDA tensors, fp16/bf16, and a
    head dim FlashAttention-2 takes (an explicit ``"triton"`` or ``"reference"`` never takes it)."""
    return (backend == "auto" and device.type == "cuda" and dtype in DTYPES
            and head_dim % 8 == 0 and head_dim <= MAX_HEAD_DIM)


def lse_rows(lse: torch.Tensor, cu_seqlens_q: torch.Tensor, total_q: int, num_heads: int) -> torch.Tensor:
    """FlashAttention's varlen log-sum-exp as float32 ``[total_q, H]``.

    torch returns it unpadded, ``[H, total_q]``; older FlashAttention builds padded it per sequence,
    ``[B, H, max_q]``. ``cu_seqlens_q``: int32 ``[B + 1]``.
    """
    if tuple(lse.shape) == (num_heads, total_q):
        return lse.t().float().contiguous()
    if lse.dim() == 3 and tuple(lse.shape[:2]) == (cu_seqlens_q.numel() - 1, num_heads):
        cu = cu_seqlens_q.long()
        rows = torch.arange(total_q, device=lse.device)
        seq = torch.searchsorted(cu[1:], rows, right=True)
        return lse[seq, :, rows - cu[seq]].float()
    raise RuntimeError(f"unexpected FlashAttention log-sum-exp shape {tuple(lse.shape)} for "
                       f"total_q = {total_q}, H = {num_heads}")


def flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_len_q: int, max_len_k: int,
                 softmax_scale: float):
    """Dense causal attention, the queries of each sequence being the last ``len_q`` of ``len_k`` keys.

    Args:
        q: ``[total_q, H, D]``; k, v: ``[total_k, G, D]``; fp16 or bf16 on CUDA, ``H`` a multiple of ``G``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]``; max_len_q, max_len_k: their longest sequences.
    Returns:
        ``(o [total_q, H, D] in q's dtype, lse float32 [total_q, H])``, natural log.
    Raises whatever ``torch.ops.aten._flash_attention_forward`` raises (e.g. no such op, no kernel
    for this GPU, dtype or head dim).
    """
    o, lse = torch.ops.aten._flash_attention_forward(
        q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens_q.contiguous(),
        cu_seqlens_k.contiguous(), max_len_q, max_len_k, 0.0, True, False, scale=softmax_scale)[:2]
    return o, lse_rows(lse, cu_seqlens_q, *q.shape[:2])


def attention_or(sparse: Callable, backend: str, q, k, v, cu_seqlens_q, cu_seqlens_k, *,
                 max_lens: tuple[int, int] | None, block_size: int, topk: int, softmax_scale: float):
    """``msa_attention``'s main call: :func:`flash_varlen` when :func:`dense_supported` and
    :func:`dense_is_exact`, else ``sparse()`` (the backend's ``attention``); also ``sparse()`` when the
    flash op is missing or raises, and ``LAST_PATH["attention"]`` then says so.

    ``max_lens``: ``(max len_q, max len_k)`` when the shapes give them (batched layout), else None
    (read from the int32 ``[B + 1]`` ``cu_seqlens``, one host sync).
    """
    if q.shape[0] == 0 or not dense_supported(backend, q.device, q.dtype, q.shape[-1]):
        return sparse()
    if max_lens is None:
        max_lens = tuple(torch.stack((cu_seqlens_q.diff(), cu_seqlens_k.diff())).amax(dim=1).tolist())
    if not dense_is_exact(max_lens[1], topk, block_size):
        return sparse()
    try:
        o, lse = flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *max_lens, softmax_scale)
    except (AttributeError, RuntimeError, TypeError) as error:  # no such op, or it cannot run here
        failure = type(error).__name__
    else:
        backends.record_path("select", "skipped (dense)")
        backends.record_path("attention", PATH)
        return o, lse
    o, lse = sparse()
    backends.record_path("attention",
                         f"{backends.LAST_PATH.get('attention')} (dense flash failed: {failure})")
    return o, lse
