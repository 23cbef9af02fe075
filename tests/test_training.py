"""Training a toy causal LM with MSA: the LM loss and the index branch's distillation loss both
fall, and the index branch is trained by the distillation loss only.

The model: token embedding, 2 blocks (pre-norm, attention from the parameters of
``msattn.nn.MSAAttention``, MLP), final norm, head. In each block the main branch runs
``msa_select`` (no gradient) + ``msa_sparse_attention`` (with ``lse``); the index branch
(``MSAAttention.indexer``) reads the *detached* hidden states, so ``msa_indexer_loss`` (which
detaches q and k itself) trains only the index projections and norms, and the LM loss never
reaches them (the selection is integer-valued). The objective is ``lm_loss + indexer_loss``.

Task (:func:`periodic_batch`): a random segment of ``period`` tokens, a walk in which every token
has 2 possible successors, repeated to fill the sequence. The LM loss falls from ``ln(vocab)``
to ``ln 2`` by learning the successors (MLP, no attention needed), and below by copying the token
``period`` positions back, which needs the selected blocks to hold an earlier copy.
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import msattn
from msattn.nn import MSAAttention
from msattn.nn.attention import apply_partial_rotary, rotary_cos_sin


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads, head_dim, index_dim, block_size, topk, backend,
                 attn_dtype):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.attn = MSAAttention(dim, heads, kv_heads, head_dim, index_dim, block_size=block_size,
                                 topk=topk, rotary_dim=head_dim // 2, rope_theta=1e4,
                                 backend=backend)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.attn_dtype = attn_dtype

    def attention(self, h, positions):
        """``h [B, T, dim]`` -> ``(out [B, T, dim], indexer_loss, indices)``."""
        a, lead = self.attn, h.shape[:-1]
        cos, sin = rotary_cos_sin(positions, a.inv_freq, h.dtype)
        q = a.q_norm(a.q_proj(h).view(*lead, a.num_heads, a.head_dim))
        k = a.k_norm(a.k_proj(h).view(*lead, a.num_kv_heads, a.head_dim))
        v = a.v_proj(h).view(*lead, a.num_kv_heads, a.head_dim)
        q, k = apply_partial_rotary(q, cos, sin), apply_partial_rotary(k, cos, sin)
        qi, ki = a.indexer(h.detach(), cos, sin)  # the index branch sees no LM gradient path
        q, k, v, qi, ki = (t.to(self.attn_dtype) for t in (q, k, v, qi, ki))
        sel = a.msa.selection_kwargs()
        with torch.no_grad():
            indices = msattn.msa_select(qi, ki, **sel, backend=a.backend)
        o, lse = msattn.msa_sparse_attention(q, k, v, indices, block_size=sel["block_size"],
                                             softmax_scale=a.scaling, backend=a.backend)
        index_loss = msattn.msa_indexer_loss(q, k, qi, ki, indices, block_size=sel["block_size"],
                                             lse=lse, softmax_scale=a.scaling, backend=a.backend)
        out = a.o_proj(o.to(h.dtype).reshape(*lead, a.num_heads * a.head_dim))
        return out, index_loss, indices

    def forward(self, h, positions):
        out, index_loss, indices = self.attention(self.norm1(h), positions)
        h = h + out
        return h + self.mlp(self.norm2(h)), index_loss, indices


class ToyLM(nn.Module):
    def __init__(self, vocab, dim, layers=2, **block):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, **block) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        """Returns ``(lm_loss, indexer_loss summed over the blocks, indices of each block)``."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        h, index_loss, selections = self.embed(ids), 0.0, []
        for block in self.blocks:
            h, block_loss, indices = block(h, positions)
            index_loss = index_loss + block_loss
            selections.append(indices)
        logits = self.head(self.norm(h)).float()
        lm_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        return lm_loss, index_loss, selections

    def index_parameters(self):
        return [p for block in self.blocks for p in block.attn.indexer.parameters()]


SUCCESSORS = 2  # the segment is a random walk in which every token has 2 possible successors


def periodic_batch(batch, length, period, vocab, generator, device):
    """``[batch, length]`` token ids: a random segment of ``period`` tokens, repeated. The
    segment is a walk on a fixed random graph (token ``x`` is followed by one of
    ``SUCCESSORS`` tokens, ``(x * 7 + 1 + j * 5) % vocab``), so the next token is partly
    predictable from the current one (a bigram, ``ln 2`` nats) and, after the first period,
    exactly predictable by copying the token ``period`` positions back."""
    segment = torch.empty(batch, period, dtype=torch.long)
    segment[:, 0] = torch.randint(0, vocab, (batch,), generator=generator)
    for t in range(1, period):
        step = torch.randint(0, SUCCESSORS, (batch,), generator=generator)
        segment[:, t] = (segment[:, t - 1] * 7 + 1 + step * 5) % vocab
    return segment.repeat(1, math.ceil(length / period))[:, :length].to(device)


def train(model, steps, *, batch, length, period, vocab, lr, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    lm_losses, index_losses = [], []
    for _ in range(steps):
        ids = periodic_batch(batch, length, period, vocab, gen, device)
        lm_loss, index_loss, _ = model(ids)
        optimizer.zero_grad(set_to_none=True)
        (lm_loss + index_loss).backward()
        optimizer.step()
        lm_losses.append(float(lm_loss.detach()))
        index_losses.append(float(index_loss.detach()))
    return lm_losses, index_losses


def _mean(values):
    return sum(values) / len(values)


def test_index_branch_gets_only_the_distillation_gradient_cpu():
    """Tiny CPU run (reference backend): finite losses, and the detach structure of the gradients."""
    torch.manual_seed(0)
    vocab, length, block_size = 16, 96, 16  # 6 blocks, top-2: sparse past the second block
    model = ToyLM(vocab, 32, heads=2, kv_heads=1, head_dim=16, index_dim=16,
                  block_size=block_size, topk=2, backend="reference", attn_dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    ids = periodic_batch(2, length, 24, vocab, gen, "cpu")
    lm_loss, index_loss, selections = model(ids)
    assert (selections[0][:, :, -1] >= 0).sum(-1).eq(2).all()  # last query: 2 of 6 blocks
    index_params = model.index_parameters()
    index_ids = {id(p) for p in index_params}
    main_params = [p for p in model.parameters() if id(p) not in index_ids]
    # the LM loss does not reach the index branch
    assert all(g is None for g in torch.autograd.grad(lm_loss, index_params, retain_graph=True,
                                                      allow_unused=True))
    # the distillation loss reaches only the index branch (its projections and norms)
    assert all(g is None for g in torch.autograd.grad(index_loss, main_params, retain_graph=True,
                                                      allow_unused=True))
    grads = torch.autograd.grad(index_loss, index_params, allow_unused=True)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)

    lm_losses, index_losses = train(model, 20, batch=2, length=length, period=24, vocab=vocab,
                                    lr=3e-3, device="cpu")
    assert all(math.isfinite(x) for x in lm_losses + index_losses)
    assert all(x >= 0 for x in index_losses)


@pytest.mark.gpu
def test_lm_and_indexer_losses_fall_cuda():
    """2-layer toy LM, bf16 attention (Triton) with fp32 master weights, 300 AdamW steps at
    512 tokens (16 blocks of 32, top-4)."""
    torch.manual_seed(0)
    device, vocab, length, period, steps = "cuda", 64, 512, 64, 300
    model = ToyLM(vocab, 128, heads=4, kv_heads=2, head_dim=32, index_dim=32, block_size=32,
                  topk=4, backend="triton", attn_dtype=torch.bfloat16).to(device)
    lm_losses, index_losses = train(model, steps, batch=8, length=length, period=period,
                                    vocab=vocab, lr=2e-3, device=device)
    assert all(math.isfinite(x) for x in lm_losses + index_losses)
    first_lm, last_lm = _mean(lm_losses[:20]), _mean(lm_losses[-20:])
    first_index, last_index = _mean(index_losses[:20]), _mean(index_losses[-20:])
    assert last_lm < 0.8 * first_lm, (first_lm, last_lm)
    assert last_index < first_index, (first_index, last_index)
    # the selection is sparse: the last query keeps 4 of its 16 blocks
    with torch.no_grad():
        ids = periodic_batch(2, length, period, vocab, torch.Generator().manual_seed(9), device)
        _, _, selections = model(ids)
    assert (selections[-1][:, :, -1] >= 0).sum(-1).eq(4).all()
