"""The spec's cost model (useful FLOPs of causal prefill) and statistics of a selection."""

from __future__ import annotations

import math

import torch

from msattn.config import MSAConfig


def indexer_flops(config: MSAConfig, seq_len: int, batch: int = 1) -> int:
    """Index branch: ``N^2 * Di * G`` per sequence."""
    return batch * seq_len ** 2 * config.index_dim * config.num_kv_heads


def sparse_attention_flops(config: MSAConfig, seq_len: int, batch: int = 1) -> int:
    """Sparse main branch: ``4 * N * (k * bs) * D * H`` per sequence."""
    return batch * 4 * seq_len * config.topk * config.block_size * config.head_dim * config.num_heads


def dense_attention_flops(config: MSAConfig, seq_len: int, batch: int = 1) -> int:
    """Dense causal attention: ``2 * N^2 * D * H`` per sequence."""
    return batch * 2 * seq_len ** 2 * config.head_dim * config.num_heads


def tflops(flops: int, ms: float | None) -> float | None:
    return None if not ms else flops / (ms * 1e9)


def _distinct_per_query_block(blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Size of the union of the selected blocks of each run of ``block_size`` queries.

    ``blocks [N, topk]`` int64 of one (sequence, group), ``-1`` padding; returns ``[ceil(N / bs)]``.
    """
    seq_len, topk = blocks.shape
    pad = -seq_len % block_size
    if pad:
        blocks = torch.cat([blocks, blocks.new_full((pad, topk), -1)])
    ids = blocks.view(-1, block_size * topk).sort(dim=-1).values
    first = ids[:, 0] >= 0
    new = (ids[:, 1:] >= 0) & (ids[:, 1:] != ids[:, :-1])
    return first.long() + new.sum(dim=-1)


def selection_stats(indices: torch.Tensor, *, seq_len: int, block_size: int) -> dict:
    """Statistics of a prefill selection ``indices [G, B * seq_len, topk]`` (B equal sequences).

    Returns:
        selected_block_fraction: selected blocks over causal blocks, summed over (query, group);
        full_row_fraction: share of (query, group) rows that select every causal block (dense rows);
        distinct_blocks_per_query_block: mean size of the union of the selections of the
            ``block_size`` queries of a query block, per group: the blocks a kernel tiled by query
            blocks must load;
        key_sparsity: 1 - attended keys / causal keys.
    """
    positions = torch.arange(seq_len, device=indices.device)
    causal_blocks = positions // block_size + 1
    selected = full = attended = distinct = 0
    rows = indices.reshape(-1, seq_len, indices.shape[-1])  # [G * batch, N, topk]
    for blocks in rows:
        blocks = blocks.long()
        valid = blocks >= 0
        count = valid.sum(dim=-1)
        selected += int(count.sum())
        full += int((count == causal_blocks).sum())
        keys = (positions[:, None] - blocks * block_size + 1).clamp(0, block_size)
        attended += int((keys * valid).sum())
        distinct += int(_distinct_per_query_block(blocks, block_size).sum())
    num_rows = rows.shape[0]
    return {
        "selected_block_fraction": selected / (num_rows * int(causal_blocks.sum())),
        "full_row_fraction": full / (num_rows * seq_len),
        "distinct_blocks_per_query_block": distinct / (num_rows * math.ceil(seq_len / block_size)),
        "key_sparsity": 1 - attended / (num_rows * seq_len * (seq_len + 1) // 2),
    }


def max_abs_diff(a: torch.Tensor, b: torch.Tensor, rows: int = 1 << 16) -> float:
    """Largest ``|a - b|`` of two tensors of one shape (``[N, ...]`` or 0-d), ``rows`` rows at a
    time in float32 (at 1M tokens of M3's shape a whole float32 copy of q is 32 GiB)."""
    if a.dim() == 0:
        a, b = a.reshape(1), b.reshape(1)
    return max((float((a[i:i + rows].float() - b[i:i + rows].float()).abs().max())
                for i in range(0, a.shape[0], rows)), default=0.0)
