"""Public API of msattn: selection, sparse attention and the fused MSA call.

Two layouts, as in flash-attn:

* varlen: ``q [total_q, H, D]``, ``k, v [total_k, G, D]``, ``qi [total_q, G, Di]``, ``ki [total_k, Di]``
  with ``cu_seqlens_q`` / ``cu_seqlens_k`` int32 ``[B + 1]``; ``indices [G, total_q, topk]``.
* batched: ``q [B, T, H, D]``, ``k, v [B, S, G, D]``, ``qi [B, T, G, Di]``, ``ki [B, S, Di]``;
  ``indices [B, G, T, topk]``.

The queries of a sequence are always the last ``len_q`` positions of its ``len_k`` keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from msattn import dispatch
from msattn._checks import (FP8_DTYPE, check_block_size, check_cu_seqlens,
                            check_optional_int, check_same_device, check_selection_params,
                            check_tensor, dtype_name, softmax_scale_or_default)
from msattn.ops import dense


# ----------------------------------------------------------------------------------------------
# Argument checks and layouts
# ----------------------------------------------------------------------------------------------

def _check_varlen_form(batched: bool, cu_seqlens_q, cu_seqlens_k) -> None:
    if batched and (cu_seqlens_q is not None or cu_seqlens_k is not None):
        raise ValueError("cu_seqlens_q / cu_seqlens_k must be None for batched (4-D) inputs; pass "
                         "3-D varlen inputs to use them")
    if not batched and (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")


@dataclass(frozen=True)
class _Layout:
    """How the caller's tensors map to the varlen layout used inside."""

    batch: int | None  # None for varlen inputs
    len_q: int = 0
    len_k: int = 0
    max_seqlen_q: int | None = None  # longest sequences, when known without a host sync
    max_seqlen_k: int | None = None


def _varlen_layout(cu_seqlens_q, cu_seqlens_k, total_q: int, total_k: int, device,
                   max_seqlen_q, max_seqlen_k):
    """``(cu_q, cu_k, layout)`` of varlen inputs. Given both ``max_seqlen_*`` (ints, as in
    flash-attn), only the metadata of the ``cu_seqlens`` is checked (no host sync); otherwise their
    values are checked too and the longest lengths taken from them (one host sync)."""
    check_optional_int("max_seqlen_q", max_seqlen_q)
    check_optional_int("max_seqlen_k", max_seqlen_k)
    if cu_seqlens_q is None:
        if total_q > total_k:
            raise ValueError(f"sequence 0 has len_q = {total_q} > len_k = {total_k}: queries must be "
                             "the last positions of their keys")
        return (_uniform_cu_seqlens(1, total_q, device), _uniform_cu_seqlens(1, total_k, device),
                _Layout(None, max_seqlen_q=total_q, max_seqlen_k=total_k))
    given = max_seqlen_q is not None and max_seqlen_k is not None
    lengths = check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, total_q, total_k, check_values=not given)
    if given:
        lengths = (max_seqlen_q, max_seqlen_k)
    return cu_seqlens_q, cu_seqlens_k, _Layout(None, max_seqlen_q=lengths[0], max_seqlen_k=lengths[1])


def _uniform_cu_seqlens(batch: int, length: int, device) -> torch.Tensor:
    return torch.arange(batch + 1, dtype=torch.int32, device=device) * length


def _to_varlen_index(qi, ki, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None):
    """Check index inputs; return ``(qi [total_q, G, Di], ki [total_k, Di], cu_q, cu_k, layout)``."""
    batched = isinstance(qi, torch.Tensor) and qi.dim() == 4
    _check_varlen_form(batched, cu_seqlens_q, cu_seqlens_k)
    if batched:
        check_tensor("qi", qi, 4, "[B, T, G, Di]")
        check_tensor("ki", ki, 3, "[B, S, Di]")
        batch, len_q, _, index_dim = qi.shape
        if ki.shape[0] != batch or ki.shape[2] != index_dim:
            raise ValueError(f"ki must have shape [B={batch}, S, Di={index_dim}] to match qi, got "
                             f"{tuple(ki.shape)}")
        len_k = ki.shape[1]
        if len_q > len_k:
            raise ValueError(f"qi has T = {len_q} queries but ki has S = {len_k} keys: T must be <= S")
        check_same_device(qi=qi, ki=ki)
        cu_q = _uniform_cu_seqlens(batch, len_q, qi.device)
        cu_k = _uniform_cu_seqlens(batch, len_k, qi.device)
        return (qi.reshape(batch * len_q, *qi.shape[2:]), ki.reshape(batch * len_k, index_dim),
                cu_q, cu_k, _Layout(batch, len_q, len_k, len_q, len_k))
    check_tensor("qi", qi, 3, "[total_q, G, Di] (or batched [B, T, G, Di])")
    check_tensor("ki", ki, 2, "[total_k, Di]")
    if ki.shape[1] != qi.shape[2]:
        raise ValueError(f"ki must have shape [total_k, Di={qi.shape[2]}] to match qi, got {tuple(ki.shape)}")
    check_same_device(qi=qi, ki=ki, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    cu_q, cu_k, layout = _varlen_layout(cu_seqlens_q, cu_seqlens_k, qi.shape[0], ki.shape[0],
                                        qi.device, max_seqlen_q, max_seqlen_k)
    return qi, ki, cu_q, cu_k, layout


def _to_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None):
    """Check main-branch inputs; return ``(q, k, v, cu_q, cu_k, layout)`` in the varlen layout."""
    batched = isinstance(q, torch.Tensor) and q.dim() == 4
    _check_varlen_form(batched, cu_seqlens_q, cu_seqlens_k)
    if batched:
        check_tensor("q", q, 4, "[B, T, H, D]")
        check_tensor("k", k, 4, "[B, S, G, D]")
        check_tensor("v", v, 4, "[B, S, G, D]")
        batch, len_q, num_heads, head_dim = q.shape
        len_k, num_groups = k.shape[1], k.shape[2]
        expected_kv = (batch, len_k, num_groups, head_dim)
        kv_text = f"[B={batch}, S, G, D={head_dim}]"
    else:
        check_tensor("q", q, 3, "[total_q, H, D] (or batched [B, T, H, D])")
        check_tensor("k", k, 3, "[total_k, G, D]")
        check_tensor("v", v, 3, "[total_k, G, D]")
        _, num_heads, head_dim = q.shape
        num_groups = k.shape[1]
        expected_kv = (k.shape[0], num_groups, head_dim)
        kv_text = f"[total_k, G, D={head_dim}]"
    if tuple(k.shape) != expected_kv:
        raise ValueError(f"k must have shape {kv_text} to match q, got {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if num_groups == 0 or num_heads % num_groups:
        raise ValueError(f"the number of query heads H = {num_heads} must be a multiple of the number "
                         f"of KV heads G = {num_groups} (q and k)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    if batched:
        if len_q > len_k:
            raise ValueError(f"q has T = {len_q} queries but k has S = {len_k} keys: T must be <= S")
        cu_q = _uniform_cu_seqlens(batch, len_q, q.device)
        cu_k = _uniform_cu_seqlens(batch, len_k, q.device)
        return (q.reshape(batch * len_q, num_heads, head_dim),
                k.reshape(batch * len_k, num_groups, head_dim),
                v.reshape(batch * len_k, num_groups, head_dim), cu_q, cu_k,
                _Layout(batch, len_q, len_k, len_q, len_k))
    cu_q, cu_k, layout = _varlen_layout(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0],
                                        q.device, max_seqlen_q, max_seqlen_k)
    return q, k, v, cu_q, cu_k, layout


def _check_index_matches(q, qi, ki, layout_main: _Layout, layout_index: _Layout, k) -> None:
    if (layout_main.batch is None) != (layout_index.batch is None):
        raise ValueError("q and qi must use the same layout (both batched 4-D or both varlen 3-D)")
    if layout_main.batch is not None and layout_index != layout_main:
        raise ValueError(f"qi [B, T, G, Di] and ki [B, S, Di] must match q [B, T, H, D] and k [B, S, G, D]: "
                         f"got B, T, S = {layout_index.batch}, {layout_index.len_q}, {layout_index.len_k} "
                         f"for qi/ki and {layout_main.batch}, {layout_main.len_q}, {layout_main.len_k} for q/k")
    if qi.shape[0] != q.shape[0]:
        raise ValueError(f"qi must have one row per query token ({q.shape[0]}), got {qi.shape[0]}")
    if qi.shape[1] != k.shape[1]:
        raise ValueError(f"qi must have G = {k.shape[1]} index heads (one per KV head of k), got {qi.shape[1]}")
    if ki.shape[0] != k.shape[0]:
        raise ValueError(f"ki must have one row per key token ({k.shape[0]}), got {ki.shape[0]}")
    check_same_device(q=q, qi=qi)


def _index_inputs(q, k, qi, ki, cu_q, cu_k, layout: _Layout):
    """Check the index branch's inputs against the main branch's (already in the varlen layout);
    return ``(qi [total_q, G, Di], ki [total_k, Di])``."""
    if isinstance(qi, torch.Tensor) and (qi.dim() == 4) != (layout.batch is not None):
        raise ValueError("q and qi must use the same layout (both batched 4-D or both varlen 3-D), got "
                         f"q with {4 if layout.batch is not None else 3} dims and qi with {qi.dim()}")
    varlen = layout.batch is None
    if varlen and isinstance(qi, torch.Tensor) and qi.dim() == 3 and qi.shape[0] != q.shape[0]:
        raise ValueError(f"qi must have one row per query token ({q.shape[0]}), got {qi.shape[0]}")
    if varlen and isinstance(ki, torch.Tensor) and ki.dim() == 2 and ki.shape[0] != k.shape[0]:
        raise ValueError(f"ki must have one row per key token ({k.shape[0]}), got {ki.shape[0]}")
    qi, ki, _, _, layout_index = _to_varlen_index(
        qi, ki, cu_q if varlen else None, cu_k if varlen else None,
        layout.max_seqlen_q if varlen else None, layout.max_seqlen_k if varlen else None)
    _check_index_matches(q, qi, ki, layout, layout_index, k)
    return qi, ki


def _check_indices(indices, num_groups: int, total_q: int, layout: _Layout) -> torch.Tensor:
    """Check ``indices`` and return it in the varlen layout ``[G, total_q, topk]``."""
    if layout.batch is not None:
        check_tensor("indices", indices, 4, "[B, G, T, topk]", dtypes=(torch.int32,))
        expected = (layout.batch, num_groups, layout.len_q)
        if tuple(indices.shape[:3]) != expected:
            raise ValueError(f"indices must have shape [B={layout.batch}, G={num_groups}, T={layout.len_q}, topk], "
                             f"got {tuple(indices.shape)}")
        return indices.transpose(0, 1).reshape(num_groups, total_q, indices.shape[-1])
    check_tensor("indices", indices, 3, "[G, total_q, topk]", dtypes=(torch.int32,))
    if tuple(indices.shape[:2]) != (num_groups, total_q):
        raise ValueError(f"indices must have shape [G={num_groups}, total_q={total_q}, topk], got "
                         f"{tuple(indices.shape)}")
    return indices


def _indices_out(indices: torch.Tensor, layout: _Layout) -> torch.Tensor:
    if layout.batch is None:
        return indices
    num_groups, _, topk = indices.shape
    return indices.view(num_groups, layout.batch, layout.len_q, topk).transpose(0, 1).contiguous()


def _attention_out(o, lse, layout: _Layout):
    if layout.batch is None:
        return o, lse
    return (o.view(layout.batch, layout.len_q, *o.shape[1:]),
            lse.view(layout.batch, layout.len_q, lse.shape[-1]))


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------

def _check_index_dtype(index_dtype) -> None:
    if index_dtype is not None and index_dtype != FP8_DTYPE:
        got = dtype_name(index_dtype) if isinstance(index_dtype, torch.dtype) else repr(index_dtype)
        raise TypeError(f"index_dtype must be None (score in the index tensors' dtype) or "
                        f"torch.float8_e4m3fn (the fp8 index path), got {got}")


def msa_select(qi, ki, *, block_size=128, topk=16, init_blocks=0, local_blocks=1,
               cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
               index_dtype=None, backend="auto"):
    """MSA stage 1: the KV blocks every query token of every group attends to.

    Args:
        qi: index queries, ``[total_q, G, Di]`` (varlen) or ``[B, T, G, Di]``; fp16, bf16 or fp32.
        ki: index keys (one head shared by the groups), ``[total_k, Di]`` or ``[B, S, Di]``.
        block_size: KV block size, a power of two.
        topk: blocks kept per (query, group), the forced ones included.
        init_blocks: leading blocks always kept (attention sinks).
        local_blocks: trailing blocks always kept, ending at the query's own block (>= 1).
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]`` (varlen only); queries of sequence ``b`` are
            the last ``len_q(b)`` positions of its ``len_k(b)`` keys.
        max_seqlen_q, max_seqlen_k: the longest ``len_q`` and ``len_k`` (ints, varlen only, as in
            flash-attn). Given both, the call does not synchronise with the host (the values of
            the ``cu_seqlens`` are then trusted); otherwise they are checked and read back.
        index_dtype: ``None``, or ``torch.float8_e4m3fn`` for the fp8 index path: keys quantised
            per token (one float32 scale each, as in the paged cache), queries per (token,
            group) row, scored by an fp8 x fp8 dot with the scales applied after it; it selects
            as the exact selection on :func:`msattn.reference.fp8_index_queries` and
            :func:`msattn.cache.quantize_index_keys`'s dequantised keys (float near-ties aside).
        backend: ``"auto"``, ``"reference"`` or ``"triton"`` (:func:`msattn.dispatch.select_path`).
    Returns:
        int32 ``[G, total_q, topk]`` (varlen) or ``[B, G, T, topk]``: block ids relative to the
        sequence start, valid entries first, ``-1`` padding (the order of the valid entries is
        not part of the contract).
    """
    check_block_size(block_size)
    check_selection_params(topk, init_blocks, local_blocks)
    _check_index_dtype(index_dtype)
    qi, ki, cu_q, cu_k, layout = _to_varlen_index(qi, ki, cu_seqlens_q, cu_seqlens_k,
                                                  max_seqlen_q, max_seqlen_k)
    path = dispatch.select_path(backend, qi.device, block_size=block_size, index_dim=qi.shape[-1])
    indices = path.select_impl().select_blocks(
        qi, ki, cu_q, cu_k, block_size=block_size, topk=topk, init_blocks=init_blocks,
        local_blocks=local_blocks, max_seqlen_q=layout.max_seqlen_q,
        max_seqlen_k=layout.max_seqlen_k, index_dtype=index_dtype)
    return _indices_out(indices, layout)


def msa_sparse_attention(q, k, v, indices, *, block_size=128, softmax_scale=None,
                         cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                         max_seqlen_k=None, deterministic=False, backend="auto"):
    """MSA stage 2: exact softmax attention of every query head over its group's selected blocks.

    Differentiable in ``q``, ``k`` and ``v`` (the selection is a constant).

    Args:
        q: ``[total_q, H, D]`` or ``[B, T, H, D]``; k, v: ``[total_k, G, D]`` or ``[B, S, G, D]``,
            one dtype (fp16, bf16 or fp32); ``H`` a multiple of ``G``.
        indices: int32 ``[G, total_q, topk]`` or ``[B, G, T, topk]`` as returned by
            :func:`msa_select`; entries of a row must be distinct, negative ones are ignored.
        softmax_scale: defaults to ``D ** -0.5``.
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k: as :func:`msa_select`.
        deterministic: a fixed accumulation order in the backward (bitwise repeatable gradients).
    Returns:
        ``(o, lse)``: o like q in q's dtype; lse float32 ``[total_q, H]`` or ``[B, T, H]``,
        natural log.
    """
    check_block_size(block_size)
    q, k, v, cu_q, cu_k, layout = _to_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                       max_seqlen_q, max_seqlen_k)
    indices = _check_indices(indices, k.shape[1], q.shape[0], layout)
    check_same_device(q=q, indices=indices)
    scale = softmax_scale_or_default(softmax_scale, q.shape[-1])
    path = dispatch.sparse_attention_path(backend, q.device, block_size=block_size,
                                          head_dim=q.shape[-1])
    o, lse = path.attention_impl().sparse_attention(q, k, v, indices, cu_q, cu_k,
                                                    block_size=block_size, softmax_scale=scale,
                                                    deterministic=bool(deterministic))
    return _attention_out(o, lse, layout)


def msa_attention(q, k, v, qi, ki, *, block_size=128, topk=16, init_blocks=0, local_blocks=1,
                  softmax_scale=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                  max_seqlen_k=None, return_lse=False, deterministic=False, index_dtype=None,
                  backend="auto"):
    """Full MSA: select blocks with the index branch, then attend over them.

    Shapes and arguments as :func:`msa_select` (``index_dtype`` too) and
    :func:`msa_sparse_attention`; differentiable
    in ``q``, ``k`` and ``v``, never in ``qi`` and ``ki`` (train those with
    :func:`msa_indexer_loss`). Returns ``o`` (like q), or ``(o, lse)`` when ``return_lse``.
    :func:`msattn.dispatch.attention_path` with the same arguments gives the path the call takes:
    with ``backend="auto"`` on CUDA (fp16/bf16), when every sequence has
    ``len_k <= topk * block_size`` (so MSA selects every causal block), dense causal attention
    runs instead (:mod:`msattn.ops.dense`).
    """
    check_block_size(block_size)
    check_selection_params(topk, init_blocks, local_blocks)
    _check_index_dtype(index_dtype)
    q, k, v, cu_q, cu_k, layout = _to_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                       max_seqlen_q, max_seqlen_k)
    qi, ki = _index_inputs(q, k, qi, ki, cu_q, cu_k, layout)
    scale = softmax_scale_or_default(softmax_scale, q.shape[-1])
    path = dispatch.attention_path(backend, q.device, q.dtype, block_size=block_size, topk=topk,
                                   head_dim=q.shape[-1], index_dim=qi.shape[-1],
                                   max_seqlen_k=layout.max_seqlen_k)
    if path.attention == "dense":
        o, lse = dense.flash_varlen(q, k, v, cu_q, cu_k, layout.max_seqlen_q, layout.max_seqlen_k,
                                    scale)
    else:
        indices = path.select_impl().select_blocks(
            qi.detach(), ki.detach(), cu_q, cu_k, block_size=block_size, topk=topk,
            init_blocks=init_blocks, local_blocks=local_blocks, max_seqlen_q=layout.max_seqlen_q,
            max_seqlen_k=layout.max_seqlen_k, index_dtype=index_dtype)
        o, lse = path.attention_impl().sparse_attention(
            q, k, v, indices, cu_q, cu_k, block_size=block_size, softmax_scale=scale,
            deterministic=bool(deterministic))
    o, lse = _attention_out(o, lse, layout)
    return (o, lse) if return_lse else o


def msa_indexer_loss(q, k, qi, ki, indices, *, block_size=128, cu_seqlens_q=None, cu_seqlens_k=None,
                     max_seqlen_q=None, max_seqlen_k=None, lse=None, softmax_scale=None,
                     backend="auto"):
    """The index branch's distillation loss: mean over (query token, group) of ``KL(P || Q)``.

    ``P`` is the main branch's attention probabilities averaged over the heads of the group, over
    the causal keys of the selected blocks; ``Q`` is the softmax of ``qi . ki * Di**-0.5`` over the
    same keys (docs/MSA.md, Training). ``P`` is a constant: gradients reach ``qi`` and ``ki`` only.

    Args:
        q, k: the main branch's queries and keys, as :func:`msa_sparse_attention` (no gradient).
        qi, ki: index queries and keys, as :func:`msa_select`.
        indices: the selection, as :func:`msa_select` returns it, or None for the dense warm-up
            (every causal key; the teacher is dense attention).
        lse: float32 ``[total_q, H]`` (or ``[B, T, H]``), the main branch's log-sum-exp over the
            same keys (``return_lse=True``), which saves recomputing the teacher's normaliser.
        block_size, softmax_scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            backend: as :func:`msa_attention` (:func:`msattn.dispatch.indexer_loss_path`).
    Returns:
        A 0-d float32 tensor. With a selection and gradients wanted (grad mode on, ``qi`` or
        ``ki`` requiring grad), the Triton backend computes the gradients in this call, in one
        pass over the selected blocks with the loss, and holds them in float32 until the
        backward (``4 * (total_q * G + total_k) * Di`` bytes); the backward only scales them.
    """
    check_block_size(block_size)
    q, k, _, cu_q, cu_k, layout = _to_varlen_attention(q, k, k, cu_seqlens_q, cu_seqlens_k,
                                                       max_seqlen_q, max_seqlen_k)
    qi, ki = _index_inputs(q, k, qi, ki, cu_q, cu_k, layout)
    if indices is not None:
        indices = _check_indices(indices, k.shape[1], q.shape[0], layout)
        check_same_device(q=q, indices=indices)
    if lse is not None:
        batched = layout.batch is not None
        check_tensor("lse", lse, 3 if batched else 2, "[B, T, H]" if batched else "[total_q, H]",
                     dtypes=(torch.float32,))
        lse = lse.reshape(-1, lse.shape[-1])
        if tuple(lse.shape) != tuple(q.shape[:2]):
            raise ValueError(f"lse must have one row per query token and head {tuple(q.shape[:2])}, "
                             f"got {tuple(lse.shape)}")
        check_same_device(q=q, lse=lse)
        lse = lse.detach()
    scale = softmax_scale_or_default(softmax_scale, q.shape[-1])
    path = dispatch.indexer_loss_path(backend, q.device, block_size=block_size,
                                      head_dim=q.shape[-1], index_dim=qi.shape[-1])
    return path.attention_impl().indexer_loss(
        q.detach(), k.detach(), qi, ki, indices, cu_q, cu_k, block_size=block_size,
        softmax_scale=scale, lse=lse, max_seqlen_k=layout.max_seqlen_k)
