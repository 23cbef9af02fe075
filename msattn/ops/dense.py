"""Dense causal attention for ``msa_attention(backend="auto")`` on short sequences.

A sequence with ``len_k <= topk * block_size`` has at most ``topk`` blocks, so MSA selects all of
them (whatever ``qi``, ``ki``, ``init_blocks``, ``local_blocks``) and equals dense causal attention
exactly. At the M3 shape that is 2K tokens, far below the measured crossover (on an H200, MSA is
slower than dense up to 16K), so :mod:`msattn.dispatch` then skips the indexer and runs torch's
bundled FlashAttention-2 (varlen, GQA, causal aligned bottom-right), when :func:`available` says
the op exists for the device, dtype and head dim. The decision is made before the call; errors
of the op itself (out of memory included) reach the caller.
"""

from __future__ import annotations

import functools

import torch

DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256  # FlashAttention-2 takes head dims that are multiples of 8, up to 256


def dense_is_exact(max_len_k: int, topk: int, block_size: int) -> bool:
    """Whether MSA equals dense causal attention: no sequence has more than ``topk`` blocks."""
    return max_len_k <= topk * block_size


@functools.lru_cache(maxsize=None)
def _flash_device(index: int) -> bool:
    return (torch.cuda.get_device_capability(index) >= (8, 0)
            and hasattr(torch.ops.aten, "_flash_attention_forward")
            and torch.backends.cuda.is_flash_attention_available())


def available(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether torch's FlashAttention-2 varlen op runs here: CUDA tensors of an sm80+ GPU, a torch
    built with it, fp16/bf16, and a head dim it takes (a multiple of 8 up to 256)."""
    if device.type != "cuda" or dtype not in DTYPES or head_dim % 8 or head_dim > MAX_HEAD_DIM:
        return False
    return _flash_device(device.index if device.index is not None else torch.cuda.current_device())


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
    Call it where :func:`available` holds; it raises what the op raises.
    """
    o, lse = torch.ops.aten._flash_attention_forward(
        q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens_q.contiguous(),
        cu_seqlens_k.contiguous(), max_len_q, max_len_k, 0.0, True, False, scale=softmax_scale)[:2]
    return o, lse_rows(lse, cu_seqlens_q, *q.shape[:2])
