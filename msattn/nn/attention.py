"""``MSAAttention``: the MiniMax-M3 attention block (projections, QK norms, partial rotary, the MSA
index branch), on msattn's kernels.

Parameter names match transformers' ``MiniMaxM3VLAttention`` (``q_proj``, ``k_proj``, ``v_proj``,
``o_proj``, ``q_norm``, ``k_norm``, ``indexer.q_proj``, ``indexer.k_proj``, ``indexer.q_norm``,
``indexer.k_norm``), so a state dict loads either way. The spec's names of the index branch,
``index_q_proj`` / ``index_k_proj`` / ``index_q_norm`` / ``index_k_norm``, are aliases
(properties) of the ``indexer`` submodules.

The arithmetic follows transformers' M3 layer: Gemma-style RMSNorm (fp32, scale ``1 + weight``,
weights start at zero) per head on q, k, the index query and the index key; NeoX rotary on the
first ``rotary_dim`` channels (cos/sin computed in fp32 and cast to the activation dtype before
being applied); the index branch takes the cos/sin truncated to ``index_dim``; softmax scale
``head_dim ** -0.5``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import msattn

__all__ = ["MSAAttention", "MSAIndexBranch", "MSARMSNorm", "apply_partial_rotary", "rotary_cos_sin"]


class MSARMSNorm(nn.Module):
    """Gemma-style RMSNorm over the last dim: ``x * rsqrt(mean(x^2) + eps) * (1 + weight)`` in
    fp32, cast back to ``x.dtype``. ``weight`` float32 ``[dim]``, zero at init."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).type_as(x)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """NeoX cos/sin: ``positions`` int ``[...]`` and ``inv_freq`` float32 ``[rotary_dim / 2]`` ->
    ``(cos, sin)``, each ``[..., rotary_dim]`` in ``dtype`` (computed in fp32)."""
    freqs = positions[..., None].float() * inv_freq.to(device=positions.device, dtype=torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotary on the first ``cos.shape[-1]`` channels of ``x [..., heads, dim]``; cos/sin
    ``[..., r]`` (broadcast over the heads axis); the other channels pass unchanged."""
    r = cos.shape[-1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x_rot, x_pass = x[..., :r], x[..., r:]
    half = r // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


class MSAIndexBranch(nn.Module):
    """The MSA index branch (transformers' ``MiniMaxM3VLIndexer`` parameters): ``q_proj``
    (hidden -> G*Di), ``k_proj`` (hidden -> Di), ``q_norm``, ``k_norm`` (per head, Di)."""

    def __init__(self, hidden_size: int, num_index_heads: int, index_dim: int, eps: float,
                 device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_heads, self.head_dim = num_index_heads, index_dim
        self.q_proj = nn.Linear(hidden_size, num_index_heads * index_dim, bias=False, **kw)
        self.k_proj = nn.Linear(hidden_size, index_dim, bias=False, **kw)
        self.q_norm = MSARMSNorm(index_dim, eps, **kw)
        self.k_norm = MSARMSNorm(index_dim, eps, **kw)

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """``hidden_states [..., hidden]``, cos/sin ``[..., rotary_dim]`` -> ``(qi [..., G, Di],
        ki [..., Di])`` in the hidden dtype."""
        lead = hidden_states.shape[:-1]
        qi = self.q_norm(self.q_proj(hidden_states).view(*lead, self.num_heads, self.head_dim))
        ki = self.k_norm(self.k_proj(hidden_states).view(*lead, 1, self.head_dim))
        cos, sin = cos[..., : self.head_dim], sin[..., : self.head_dim]
        return apply_partial_rotary(qi, cos, sin), apply_partial_rotary(ki, cos, sin)[..., 0, :]


class MSAAttention(nn.Module):
    """The MiniMax-M3 attention block with MSA (or dense causal attention when ``sparse=False``,
    as in M3's first layers).

    Args:
        hidden_size: model width (M3: 6144).
        num_heads, num_kv_heads, head_dim: ``H``, ``G``, ``D`` (M3: 64, 4, 128).
        index_dim: ``Di`` (128); the index branch has ``G`` query heads and one key head.
        block_size, topk, init_blocks, local_blocks: the MSA selection (128, 16, 0, 1).
        rotary_dim: rotated channels of each head (64 of 128); rope_theta: 5e6.
        rms_norm_eps: 1e-6.
        sparse: MSA (with the index branch) or dense causal attention (no index branch).
        backend: msattn backend, ``"auto"``, ``"triton"`` or ``"reference"``.
        device, dtype: of the parameters (the norm weights are float32 unless ``dtype`` is given).
    """

    def __init__(self, hidden_size: int = 6144, num_heads: int = 64, num_kv_heads: int = 4,
                 head_dim: int = 128, index_dim: int = 128, *, block_size: int = 128,
                 topk: int = 16, init_blocks: int = 0, local_blocks: int = 1, rotary_dim: int = 64,
                 rope_theta: float = 5e6, rms_norm_eps: float = 1e-6, sparse: bool = True,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ValueError(f"rotary_dim must be even and in (0, head_dim={head_dim}], got {rotary_dim}")
        self.msa = msattn.MSAConfig(num_heads=num_heads, num_kv_heads=num_kv_heads,
                                    head_dim=head_dim, index_dim=index_dim, block_size=block_size,
                                    topk=topk, init_blocks=init_blocks, local_blocks=local_blocks)
        kw = {"device": device, "dtype": dtype}
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim, self.index_dim, self.rotary_dim = head_dim, index_dim, rotary_dim
        self.rope_theta, self.sparse, self.backend = rope_theta, sparse, backend
        self.scaling = head_dim ** -0.5
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False, **kw)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False, **kw)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False, **kw)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False, **kw)
        self.q_norm = MSARMSNorm(head_dim, rms_norm_eps, **kw)
        self.k_norm = MSARMSNorm(head_dim, rms_norm_eps, **kw)
        self.indexer = (MSAIndexBranch(hidden_size, num_kv_heads, index_dim, rms_norm_eps, **kw)
                        if sparse else None)
        inv_freq = 1.0 / (rope_theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32,
                                                      device=device) / rotary_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    # -- construction from a transformers config ------------------------------------------------

    @classmethod
    def from_config(cls, config, layer_idx: int | None = None, **kwargs) -> "MSAAttention":
        """From a MiniMax-M3 text config (a transformers ``MiniMaxM3VLTextConfig`` or any object
        or dict with its attribute names). ``sparse`` follows ``layer_types[layer_idx]`` when
        ``layer_idx`` is given. The rotary dim is ``head_dim * rope_parameters
        ["partial_rotary_factor"]`` (default 1.0), which is what transformers' M3 model applies
        (it does not read ``rotary_dim``). ``kwargs`` override (``backend``, ``device``...)."""
        get = (config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d))
        text = get("text_config") or config
        if text is not config:
            return cls.from_config(text, layer_idx, **kwargs)
        head_dim = get("head_dim") or get("hidden_size") // get("num_attention_heads")
        rope = get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise NotImplementedError(f"rope_type {rope.get('rope_type')!r}: only 'default' rotary")
        values = {
            "hidden_size": get("hidden_size"), "num_heads": get("num_attention_heads"),
            "num_kv_heads": get("num_key_value_heads"), "head_dim": head_dim,
            "index_dim": get("index_head_dim", 128), "block_size": get("index_block_size", 128),
            "topk": get("index_topk_blocks", 16), "local_blocks": get("index_local_blocks", 1),
            "rotary_dim": int(head_dim * rope.get("partial_rotary_factor", 1.0)),
            "rope_theta": rope.get("rope_theta", 5e6), "rms_norm_eps": get("rms_norm_eps", 1e-6),
        }
        if get("index_n_heads", values["num_kv_heads"]) != values["num_kv_heads"]:
            raise ValueError("index_n_heads must equal num_key_value_heads (one index query per group)")
        if layer_idx is not None and get("layer_types") is not None:
            values["sparse"] = get("layer_types")[layer_idx] == "minimax_m3_sparse"
        values.update(kwargs)
        return cls(**values)

    # -- the spec's names of the index branch --------------------------------------------------

    @property
    def index_q_proj(self) -> nn.Linear:
        return self.indexer.q_proj

    @property
    def index_k_proj(self) -> nn.Linear:
        return self.indexer.k_proj

    @property
    def index_q_norm(self) -> MSARMSNorm:
        return self.indexer.q_norm

    @property
    def index_k_norm(self) -> MSARMSNorm:
        return self.indexer.k_norm

    # -- projections -------------------------------------------------------------------------

    def project(self, hidden_states: torch.Tensor, positions: torch.Tensor):
        """Projections, norms and rotary of ``hidden_states [..., hidden]`` at integer
        ``positions [...]``. Returns ``(q [..., H, D], k [..., G, D], v [..., G, D], qi
        [..., G, Di] or None, ki [..., Di] or None)``, all in the hidden dtype."""
        lead = hidden_states.shape[:-1]
        cos, sin = rotary_cos_sin(positions, self.inv_freq, hidden_states.dtype)
        q = self.q_norm(self.q_proj(hidden_states).view(*lead, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(hidden_states).view(*lead, self.num_kv_heads, self.head_dim))
        v = self.v_proj(hidden_states).view(*lead, self.num_kv_heads, self.head_dim)
        q, k = apply_partial_rotary(q, cos, sin), apply_partial_rotary(k, cos, sin)
        qi = ki = None
        if self.indexer is not None:
            qi, ki = self.indexer(hidden_states, cos, sin)
        return q, k, v, qi, ki

    # -- prefill -----------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None
                ) -> torch.Tensor:
        """Causal prefill of whole sequences.

        Args:
            hidden_states: ``[B, T, hidden]`` (batched) or ``[N, hidden]`` with ``cu_seqlens``
                (varlen); fp32, fp16 or bf16 (the parameters' dtype).
            position_ids: int ``[B, T]`` or ``[T]`` (batched; default ``0..T-1``) or ``[N]``
                (varlen; default ``0..len-1`` per sequence). They only set the rotary phases:
                selection blocks always start at each sequence's first token.
            cu_seqlens: int32 ``[B + 1]`` sequence offsets (flash-attn convention), varlen only.
            max_seqlen: the longest sequence (int, varlen; read from ``cu_seqlens`` if omitted).
        Returns:
            ``[B, T, hidden]`` or ``[N, hidden]`` in the hidden dtype.
        """
        varlen = cu_seqlens is not None
        if varlen:
            if hidden_states.dim() != 2:
                raise ValueError(f"with cu_seqlens, hidden_states must be [N, hidden], got "
                                 f"{tuple(hidden_states.shape)}")
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.long)
            if max_seqlen is None:
                max_seqlen = int(lengths.max()) if lengths.numel() else 0
            if position_ids is None:
                starts = torch.repeat_interleave(cu_seqlens[:-1].to(torch.long), lengths,
                                                 output_size=hidden_states.shape[0])
                position_ids = torch.arange(hidden_states.shape[0], device=hidden_states.device) - starts
        else:
            if hidden_states.dim() != 3:
                raise ValueError(f"hidden_states must be [B, T, hidden] (or [N, hidden] with "
                                 f"cu_seqlens), got {tuple(hidden_states.shape)}")
            batch, length = hidden_states.shape[:2]
            if position_ids is None:
                position_ids = torch.arange(length, device=hidden_states.device)
            position_ids = position_ids.expand(batch, length)
        q, k, v, qi, ki = self.project(hidden_states, position_ids)
        if self.sparse:
            seq = ({"cu_seqlens_q": cu_seqlens, "cu_seqlens_k": cu_seqlens,
                    "max_seqlen_q": max_seqlen, "max_seqlen_k": max_seqlen} if varlen else {})
            o = msattn.msa_attention(q, k, v, qi, ki, **self.msa.selection_kwargs(),
                                     softmax_scale=self.scaling, backend=self.backend, **seq)
        elif varlen:
            o = torch.cat([self._dense(q[a:b][None], k[a:b][None], v[a:b][None])[0]
                           for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())]
                          ) if q.shape[0] else q
        else:
            o = self._dense(q, k, v)
        return self.o_proj(o.reshape(*o.shape[:-2], self.num_heads * self.head_dim))

    def _dense(self, q, k, v):
        """Dense causal GQA attention: q ``[B, T, H, D]``, k/v ``[B, T, G, D]`` -> ``[B, T, H, D]``."""
        rep = self.num_heads // self.num_kv_heads
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(rep, dim=1),
            v.transpose(1, 2).repeat_interleave(rep, dim=1), is_causal=True, scale=self.scaling)
        return o.transpose(1, 2)

    # -- paged decode / chunked prefill -----------------------------------------------------------

    def forward_paged(self, hidden_states: torch.Tensor, positions: torch.Tensor,
                      cache: "msattn.MSAPagedCache", layer: int, block_table: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                      max_seqlen_q: int | None = None) -> torch.Tensor:
        """New tokens against a paged cache (decode: 1-16 tokens per request; chunked prefill).

        Writes the new tokens' K, V and index keys into ``cache`` (layer ``layer``), then runs
        :func:`msattn.msa_paged_attention`. Sparse layers only.

        Args:
            hidden_states: ``[N, hidden]``, the new tokens of all requests, request by request.
            positions: int ``[N]``: each token's position in its request (rotary phases; they
                must be the last ``len_q`` of the request's ``seq_lens`` tokens).
            cache: an :class:`msattn.MSAPagedCache` with ``page_size == block_size``, the layer's
                ``G``, ``D``, ``Di`` and the hidden dtype.
            block_table: int32 ``[B, max_pages]``; cu_seqlens_q: int32 ``[B + 1]``; seq_lens:
                int32 ``[B]`` (tokens of each request, the new ones included).
            max_seqlen_q: the longest query run (int); given, no host sync.
        Returns:
            ``[N, hidden]`` in the hidden dtype.
        """
        if not self.sparse:
            raise NotImplementedError("forward_paged: dense layers have no index keys; only MSA "
                                      "(sparse) layers run on an MSAPagedCache")
        if cache.page_size != self.msa.block_size:
            raise ValueError(f"cache.page_size = {cache.page_size} must equal block_size = "
                             f"{self.msa.block_size}")
        q, k, v, qi, ki = self.project(hidden_states, positions)
        cache.append(layer, k, v, ki, block_table, cu_seqlens_q, seq_lens)
        sel = self.msa.selection_kwargs()
        sel.pop("block_size")
        o = msattn.msa_paged_attention(q, qi, **cache.layer(layer), block_table=block_table,
                                       cu_seqlens_q=cu_seqlens_q, seq_lens=seq_lens, **sel,
                                       softmax_scale=self.scaling, max_seqlen_q=max_seqlen_q,
                                       backend=self.backend)
        return self.o_proj(o.reshape(o.shape[0], self.num_heads * self.head_dim))
