"""MiniMax-M3 in Hugging Face transformers through msattn: the ``"msattn"`` attention implementation.

::

    import msattn.integrations.transformers as msattn_tf
    name = msattn_tf.register()                       # "msattn"
    model = MiniMaxM3VLForCausalLM.from_pretrained(path, attn_implementation=name)
    # or: from_config(cfg, attn_implementation=name), or model.set_attn_implementation(name)

What :func:`register` does (all of it undone by :func:`unregister`):

1. ``transformers.AttentionInterface.register("msattn", attention_forward)``: the attention
   function of every layer. In sparse layers (``layer_types[i] == "minimax_m3_sparse"``) it runs
   :func:`msattn.msa_select` on the index queries/keys and :func:`msattn.msa_sparse_attention`;
   in full-attention layers it runs dense causal attention (``torch`` SDPA).
2. ``transformers.AttentionMaskInterface.register("msattn", mask_function)``: the mask the model
   builds once per forward. No ``[B, H, Tq, Tk]`` (or ``[B, 1, Tq, Tk]``) mask is built: it
   returns ``None`` when no key is padded, else the 2-D key-padding mask ``bool [B, Tk]``
   (``True`` = real token). Dense layers build a ``[B, 1, Tq, Tk]`` boolean mask for SDPA only
   when the batch is padded.
3. ``MiniMaxM3VLIndexer.forward`` (the torch Lightning Indexer of transformers) is wrapped at the
   class level. When ``indexer.config._attn_implementation == "msattn"`` the wrapper computes
   only the index queries and keys (the same projections, Gemma norms and rotary as
   transformers, and the same update of the sparse cache layer's ``idx_keys``), and returns an
   :class:`MSAIndexerOutput` instead of the ``[B, G, Tq, topk]`` block indices: the selection
   runs fused in msattn (no ``[Tq, Tk]`` score matrix) inside the attention function, where the
   padding mask is known. For any other attention implementation the original forward runs
   unchanged, so models with ``"sdpa"``/``"eager"`` in the same process are not affected.

Selection contract. transformers' indexer scores ``s = qi . ki`` in fp32 (no ``Di**-0.5``
scale, which does not change the ranking), max-pools causal key blocks of
``index_block_size``, forces the ``index_local_blocks`` blocks ending at the query's block (by
giving them ``+inf``), and keeps the ``min(index_topk_blocks, num_key_blocks)`` best blocks
(``torch.topk``, ties unspecified), ``-1`` for slots that fall on future blocks. It has no
attention-sink (``init``) blocks. That is the MSA rule with ``init_blocks = 0``; msattn breaks
exact ties to the lower block id. Its output ``block_indices`` is int64
``[B, G, Tq, min(topk, num_key_blocks)]`` sorted by score, ``-1`` right-padded; msattn's is
int32 ``[B, G, Tq, topk]``, ``-1`` padded, in no particular order. :func:`to_hf_block_indices`
and :func:`from_hf_block_indices` convert between the two.

Padding. Right padding needs nothing (real queries never see later keys). Left padding (as
``generate()`` builds it) is handled: each row runs as its own sequence starting at its first
unmasked key, so a left-padded row gives the output of the same row unpadded (outputs at pad
positions are zero). Note that transformers' own eager/SDPA sparse path is *not* padding
invariant (its indexer anchors blocks at absolute cache slots; see the ``TODO`` in
``MiniMaxM3VLIndexer``), so on left-padded batches longer than ``topk`` blocks "msattn" and
"sdpa" differ, and "msattn" is the one that matches the unpadded rows. Masks with holes (a
masked key between unmasked ones), packed sequences (``position_ids`` restarting without a
mask), custom mask functions and static caches raise ``NotImplementedError``.

Supported caches: transformers' ``DynamicCache`` (the default of ``generate()``) and no cache.
"""

from __future__ import annotations

import dataclasses
import threading

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import msattn

try:
    import transformers
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as _m3
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError("msattn.integrations.transformers needs transformers>=5.17 with MiniMax-M3 "
                      "(transformers.models.minimax_m3_vl); pip install 'transformers>=5.17'") from exc

__all__ = ["NAME", "MSAIndexerOutput", "attention_forward", "from_hf_block_indices",
           "mask_function", "msa_config", "register", "select_hf_block_indices",
           "to_hf_block_indices", "unregister"]

NAME = "msattn"
SPARSE_LAYER_TYPE = "minimax_m3_sparse"

# SDPA kernels a dense decode step may use: all but cuDNN (see _dense); torch tries them in its
# own order (flash first).
_DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_LOCK = threading.Lock()
_STATE = {"backend": "auto", "original_indexer_forward": None, "registered": False}


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------

def register(name: str = NAME, *, backend: str = "auto") -> str:
    """Register the msattn attention implementation with transformers and return its name.

    Args:
        name: the name to register (``"msattn"``); pass it as ``attn_implementation``.
        backend: the msattn backend the sparse layers use: ``"auto"`` (Triton on CUDA, the
            PyTorch reference on CPU), ``"triton"`` or ``"reference"``. A model may override it
            with a ``msattn_backend`` attribute on its (text) config.
    Returns:
        ``name``. Calling it again only updates ``backend``.
    """
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    global NAME
    with _LOCK:
        _STATE["backend"] = backend
        NAME = name
        AttentionInterface.register(name, attention_forward)
        AttentionMaskInterface.register(name, mask_function)
        indexer_cls = _m3.MiniMaxM3VLIndexer
        if _STATE["original_indexer_forward"] is None:
            _STATE["original_indexer_forward"] = indexer_cls.forward
            indexer_cls.forward = _indexer_forward
        _STATE["registered"] = True
    return name


def unregister() -> None:
    """Undo :func:`register`: restore ``MiniMaxM3VLIndexer.forward`` and remove the attention and
    mask functions from transformers' global registries. Models still configured with
    ``"msattn"`` must be switched (``set_attn_implementation("sdpa")``) before their next call."""
    with _LOCK:
        original = _STATE["original_indexer_forward"]
        if original is not None:
            _m3.MiniMaxM3VLIndexer.forward = original
            _STATE["original_indexer_forward"] = None
        for interface in (AttentionInterface, AttentionMaskInterface):
            mapping = getattr(interface, "_global_mapping", None)
            if isinstance(mapping, dict) and mapping.get(NAME) in (attention_forward, mask_function):
                del mapping[NAME]
        _STATE["registered"] = False


def _is_msattn(config) -> bool:
    return getattr(config, "_attn_implementation", None) == NAME


def _backend(config) -> str:
    return getattr(config, "msattn_backend", None) or _STATE["backend"]


def msa_config(config) -> msattn.MSAConfig:
    """The :class:`msattn.MSAConfig` of a ``MiniMaxM3VLTextConfig`` (or ``MiniMaxM3VLConfig``).

    transformers 5.x keeps the sparse parameters as flat ``index_*`` attributes (it drops
    ``sparse_attention_config``) and has no ``init`` (attention-sink) blocks, so ``init_blocks = 0``
    (:meth:`msattn.MSAConfig.from_hf` reads both forms).
    """
    return msattn.MSAConfig.from_hf(config)


# ----------------------------------------------------------------------------------------------
# The indexer: index queries and keys only; the selection runs in the attention function
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class MSAIndexerOutput:
    """What the wrapped ``MiniMaxM3VLIndexer.forward`` returns under ``"msattn"`` (it is passed
    on as the ``block_indices`` argument of the attention function).

    Attributes:
        qi: index queries ``[B, Tq, G, Di]`` (model dtype), rotary applied.
        ki: index keys ``[B, Tk, Di]`` (model dtype), the whole cached history of this layer.
        block_size, topk, local_blocks: the layer's selection parameters.
    """

    qi: torch.Tensor
    ki: torch.Tensor
    block_size: int
    topk: int
    local_blocks: int

    def selection_kwargs(self) -> dict:
        return {"block_size": self.block_size, "topk": self.topk, "init_blocks": 0,
                "local_blocks": self.local_blocks}


def _indexer_forward(self, hidden_states, position_embeddings, cache=None, position_ids=None,
                     **kwargs):
    """Replacement of ``MiniMaxM3VLIndexer.forward`` installed by :func:`register`: defers to the
    original unless the model runs ``"msattn"``. Arguments as transformers' (``cache`` is called
    ``past_key_values`` before transformers 5.24)."""
    if not _is_msattn(self.config):
        return _STATE["original_indexer_forward"](self, hidden_states, position_embeddings, cache,
                                                  position_ids, **kwargs)
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    batch, q_len, _ = hidden_states.shape
    qi = self.q_norm(self.q_proj(hidden_states).view(batch, q_len, self.num_heads, self.head_dim))
    ki = self.k_norm(self.k_proj(hidden_states).view(batch, q_len, 1, self.head_dim))
    cos, sin = position_embeddings
    # transformers' rotary helper on its own layout ([B, heads, T, Di]), exactly as its indexer
    qi, ki = _m3.apply_rotary_pos_emb(qi.transpose(1, 2), ki.transpose(1, 2),
                                      cos[..., : self.head_dim], sin[..., : self.head_dim])
    if cache is not None:
        layer = cache.layers[self.layer_idx]
        static_cls = getattr(_m3, "MiniMaxM3VLSparseStaticCacheLayer", None)
        if static_cls is not None and isinstance(layer, static_cls):
            raise NotImplementedError("msattn: static caches (cache_implementation='static') are not "
                                      "supported; use the default DynamicCache")
        ki = layer.update_index(ki)  # [B, 1, Tk, Di]
    return MSAIndexerOutput(qi=qi.transpose(1, 2).contiguous(), ki=ki[:, 0].contiguous(),
                            block_size=self.block_size, topk=self.topk_blocks,
                            local_blocks=self.local_blocks)


# ----------------------------------------------------------------------------------------------
# Block-index format conversion
# ----------------------------------------------------------------------------------------------

def to_hf_block_indices(indices: torch.Tensor, key_length: int, block_size: int) -> torch.Tensor:
    """msattn selection -> transformers' ``block_indices`` layout.

    Args:
        indices: int32 ``[B, G, Tq, topk]`` (msattn's batched layout), ``-1`` padded, any order.
        key_length: ``Tk``; block_size: the layer's block size.
    Returns:
        int64 ``[B, G, Tq, min(topk, ceil(Tk / block_size))]``: valid block ids first (in
        descending id order, not transformers' score order), ``-1`` after.
    """
    width = min(indices.shape[-1], -(-key_length // block_size))
    ordered = indices.to(torch.int64).sort(dim=-1, descending=True).values
    if bool((ordered[..., width:] >= 0).any()):
        raise ValueError("more valid blocks than transformers' block_indices can hold")
    return ordered[..., :width].contiguous()


def from_hf_block_indices(block_indices: torch.Tensor) -> torch.Tensor:
    """transformers' ``block_indices`` (int64 ``[B, G, Tq, k]``, ``-1`` padded, distinct block ids
    counted from key slot 0) -> msattn's batched selection (int32 ``[B, G, Tq, k]``)."""
    if block_indices.dim() != 4:
        raise ValueError(f"block_indices must be [B, G, Tq, k], got shape {tuple(block_indices.shape)}")
    return block_indices.to(torch.int32).contiguous()


def select_hf_block_indices(index: MSAIndexerOutput, backend: str = "auto") -> torch.Tensor:
    """The msattn selection of an (unpadded) batch, in transformers' ``block_indices`` layout
    (:func:`to_hf_block_indices`); for comparing with transformers' indexer."""
    indices = msattn.msa_select(index.qi, index.ki, **index.selection_kwargs(), backend=backend)
    return to_hf_block_indices(indices, index.ki.shape[1], index.block_size)


# ----------------------------------------------------------------------------------------------
# The mask function
# ----------------------------------------------------------------------------------------------

def mask_function(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask=None, **kwargs):
    """transformers mask interface of ``"msattn"``: ``None`` without padding, else the key-padding
    mask ``bool [B, kv_length]`` (``True`` = real token). No 4-D mask is built."""
    from transformers.masking_utils import causal_mask_function

    if mask_function is not None and mask_function is not causal_mask_function:
        raise NotImplementedError("msattn supports plain causal masks with padding only (no packed "
                                  "sequences, bidirectional or custom mask functions)")
    if "cache_position" in kwargs and q_offset == 0 and kwargs["cache_position"] is not None:
        q_offset = kwargs["cache_position"][0]
    q_offset = int(q_offset)
    if q_offset + q_length != kv_length + kv_offset:
        raise NotImplementedError(f"msattn needs the queries to be the last keys (got q_offset="
                                  f"{q_offset}, q_length={q_length}, kv_length={kv_length}): "
                                  "static or sliding caches are not supported")
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise NotImplementedError("msattn takes a 2-D [batch, keys] padding mask, got "
                                  f"{attention_mask.dim()}-D")
    padding = attention_mask.to(torch.bool)[:, kv_offset:kv_offset + kv_length]
    if padding.shape[-1] < kv_length:  # unmasked where the 2-D mask ends
        padding = F.pad(padding, (0, kv_length - padding.shape[-1]), value=True)
    if bool(padding.all()):
        return None
    return padding


# ----------------------------------------------------------------------------------------------
# The attention function
# ----------------------------------------------------------------------------------------------

def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      block_indices=None, **kwargs):
    """transformers attention interface of ``"msattn"``.

    Args:
        module: the ``MiniMaxM3VLAttention`` layer (``module.indexer`` is ``None`` in dense layers).
        query: ``[B, H, Tq, D]``; key, value: ``[B, G, Tk, D]`` (the cache included); model dtype.
        attention_mask: ``None`` or the key-padding mask ``bool [B, Tk]`` of :func:`mask_function`.
        scaling: softmax scale (``D ** -0.5`` in M3).
        block_indices: in sparse layers, the :class:`MSAIndexerOutput` of the wrapped indexer, or
            transformers' int64 ``[B, G, Tq, k]`` block indices (then used as given, unpadded
            batches only); ``None`` in dense layers.
    Returns:
        ``(attn_output [B, Tq, H, D] in the query dtype, None)``.
    """
    if dropout and module.training:
        raise NotImplementedError("msattn does not implement attention dropout")
    if kwargs.get("output_attentions"):
        raise NotImplementedError("msattn does not return attention weights (output_attentions)")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or attention_mask.dim() != 2):
        raise NotImplementedError("msattn got a mask it did not build (expected None or a 2-D key "
                                  "padding mask); do not pass 4-D masks with attn_implementation="
                                  "'msattn'")
    q = query.transpose(1, 2)  # [B, Tq, H, D]
    k = key.transpose(1, 2)  # [B, Tk, G, D]
    v = value.transpose(1, 2)
    lead = None if attention_mask is None else _leading_pads(attention_mask)
    if block_indices is None:
        return _dense(q, k, v, scaling, lead), None
    backend = _backend(module.config)
    if isinstance(block_indices, MSAIndexerOutput):
        index = block_indices
        if lead is None:
            o, _ = msattn.msa_sparse_attention(
                q, k, v, msattn.msa_select(index.qi, index.ki, **index.selection_kwargs(),
                                           backend=backend),
                block_size=index.block_size, softmax_scale=scaling, backend=backend)
            return o, None
        return _sparse_varlen(q, k, v, index, scaling, lead, backend), None
    if lead is not None:
        raise NotImplementedError("msattn: precomputed block_indices with a padded batch")
    o, _ = msattn.msa_sparse_attention(q, k, v, from_hf_block_indices(block_indices),
                                       block_size=module.indexer.block_size, softmax_scale=scaling,
                                       backend=backend)
    return o, None


def _leading_pads(padding: torch.Tensor) -> list[int]:
    """Per row, the number of masked keys before the first real one (``Tk`` for a row without
    one). Raises on holes (a masked key between real ones); trailing masked keys (right padding)
    are allowed: only padded queries see them."""
    valid = padding.to(torch.int8)
    rises = (valid[:, 1:] > valid[:, :-1]).sum(-1) + valid[:, 0]
    if bool((rises > 1).any()):
        raise NotImplementedError("msattn supports left and right padding only: the attention mask "
                                  "has a masked key between unmasked ones")
    has_real = padding.any(-1)
    first = torch.where(has_real, valid.long().argmax(-1), torch.full_like(has_real, padding.shape[-1],
                                                                    dtype=torch.long))
    return first.tolist()


def _sparse_varlen(q, k, v, index: MSAIndexerOutput, scaling, lead: list[int], backend):
    """Left-padded batch: every row as its own varlen sequence starting at its first real key."""
    batch, q_len, num_heads, head_dim = q.shape
    k_len = k.shape[1]
    device = q.device
    q_rows, k_rows, cu_q, cu_k = [], [], [0], [0]
    for b, pads in enumerate(lead):
        q_start = max(k_len - q_len, pads)  # first real query slot
        if q_start >= k_len:  # every query of this row is padding
            continue
        q_rows.append(torch.arange(b * q_len + q_start - (k_len - q_len), (b + 1) * q_len,
                                   device=device))
        k_rows.append(torch.arange(b * k_len + pads, (b + 1) * k_len, device=device))
        cu_q.append(cu_q[-1] + k_len - q_start)
        cu_k.append(cu_k[-1] + k_len - pads)
    out = q.new_zeros(batch * q_len, num_heads, head_dim)
    if not q_rows:
        return out.view(batch, q_len, num_heads, head_dim)
    q_idx, k_idx = torch.cat(q_rows), torch.cat(k_rows)
    lens_q = [b - a for a, b in zip(cu_q[:-1], cu_q[1:])]
    lens_k = [b - a for a, b in zip(cu_k[:-1], cu_k[1:])]
    cu_q_t = torch.tensor(cu_q, dtype=torch.int32, device=device)
    cu_k_t = torch.tensor(cu_k, dtype=torch.int32, device=device)
    seq = {"cu_seqlens_q": cu_q_t, "cu_seqlens_k": cu_k_t, "max_seqlen_q": max(lens_q),
           "max_seqlen_k": max(lens_k)}
    num_groups = k.shape[2]
    qi = index.qi.reshape(batch * q_len, *index.qi.shape[2:])[q_idx]
    ki = index.ki.reshape(batch * k_len, index.ki.shape[-1])[k_idx]
    indices = msattn.msa_select(qi, ki, **index.selection_kwargs(), **seq, backend=backend)
    o, _ = msattn.msa_sparse_attention(
        q.reshape(batch * q_len, num_heads, head_dim)[q_idx],
        k.reshape(batch * k_len, num_groups, head_dim)[k_idx],
        v.reshape(batch * k_len, num_groups, head_dim)[k_idx], indices,
        block_size=index.block_size, softmax_scale=scaling, **seq, backend=backend)
    out[q_idx] = o.to(out.dtype)
    return out.view(batch, q_len, num_heads, head_dim)


def _dense(q, k, v, scaling, lead):
    """Dense causal GQA attention (torch SDPA) of the last ``Tq`` of ``Tk`` positions; q
    ``[B, Tq, H, D]``, k/v ``[B, Tk, G, D]`` -> ``[B, Tq, H, D]``. With padding, a boolean
    ``[B, 1, Tq, Tk]`` mask; padded queries give zeros.

    One decode token (``Tq == 1``, no padding) sees every key: no mask, the K/V heads shared by
    the query heads (``enable_gqa``, no copies), and flash first: cuDNN builds a new execution
    plan for every new key length, tens of milliseconds of host time per step."""
    batch, q_len, num_heads, _ = q.shape
    k_len, num_groups = k.shape[1], k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if lead is None and q_len == 1:
        with sdpa_kernel(_DECODE_BACKENDS):
            o = F.scaled_dot_product_attention(qt, kt, vt, scale=scaling, enable_gqa=True)
        return o.transpose(1, 2)
    rep = num_heads // num_groups
    kt = kt.repeat_interleave(rep, dim=1)  # cuDNN, the fastest prefill kernel, takes no GQA
    vt = vt.repeat_interleave(rep, dim=1)
    if lead is None and q_len == k_len:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scaling)
        return o.transpose(1, 2)
    slots_q = torch.arange(k_len - q_len, k_len, device=q.device)
    slots_k = torch.arange(k_len, device=q.device)
    keep = slots_k[None, :] <= slots_q[:, None]  # [Tq, Tk]
    if lead is None:
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=keep, scale=scaling)
        return o.transpose(1, 2)
    first = torch.tensor(lead, device=q.device)
    pad_q = slots_q[None, :] < first[:, None]  # [B, Tq]: padded queries
    real_k = slots_k[None, :] >= first[:, None]  # [B, Tk]
    own = slots_k[None, :] == slots_q[:, None]  # a padded query attends to itself (no empty rows)
    mask = keep[None] & (real_k[:, None, :] | (pad_q[:, :, None] & own[None]))
    o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask[:, None], scale=scaling)
    o = o.transpose(1, 2)
    return o.masked_fill(pad_q[:, :, None, None], 0.0)
