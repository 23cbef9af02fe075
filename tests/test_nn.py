"""msattn.nn.MSAAttention: loads transformers' MiniMax-M3 attention weights (both ways) and gives
its output; varlen equals batched; paged decode equals prefill."""

import os

import pytest
import torch

import msattn
from msattn.nn import MSAAttention

HIDDEN, H, G, D, DI, BLOCK, TOPK = 64, 4, 2, 32, 32, 16, 2


def tiny_layer(sparse=True, backend="auto", seed=0, **kw):
    torch.manual_seed(seed)
    layer = MSAAttention(HIDDEN, H, G, D, DI, block_size=BLOCK, topk=TOPK, rotary_dim=16,
                         sparse=sparse, backend=backend, **kw)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.2)
    return layer.eval()


def hf_config():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("transformers.models.minimax_m3_vl")
    cfg = transformers.MiniMaxM3VLTextConfig(
        vocab_size=128, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=H,
        num_key_value_heads=G, head_dim=D, index_n_heads=G, index_head_dim=DI,
        index_block_size=BLOCK, index_topk_blocks=TOPK,
        layer_types=["full_attention", "minimax_m3_sparse"], bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5})
    cfg._attn_implementation = "sdpa"
    return cfg


def hf_layer_output(hf_layer, cfg, h):
    from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as m3

    pos = torch.arange(h.shape[1], device=h.device)[None].expand(h.shape[0], -1)
    rotary = m3.MiniMaxM3VLRotaryEmbedding(cfg).to(h.device)
    causal = torch.ones(h.shape[1], h.shape[1], dtype=torch.bool, device=h.device).tril()
    mask = None if hf_layer.indexer is not None else causal[None, None].expand(h.shape[0], 1, -1, -1)
    with torch.no_grad():
        return hf_layer(h, rotary(h, pos), mask, position_ids=pos)[0]


@pytest.mark.parametrize("layer_idx", [0, 1])  # 0: dense layer, 1: MSA layer
def test_matches_transformers_layer_both_ways(layer_idx):
    cfg = hf_config()
    from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as m3

    torch.manual_seed(0)
    hf = m3.MiniMaxM3VLAttention(cfg, layer_idx).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    ours = MSAAttention.from_config(cfg, layer_idx).eval()
    assert ours.sparse == (layer_idx == 1) and ours.rotary_dim == 16
    ours.load_state_dict(hf.state_dict())  # strict: the same names and shapes
    h = torch.randn(2, 90, HIDDEN)
    torch.testing.assert_close(ours(h), hf_layer_output(hf, cfg, h), rtol=1e-5, atol=1e-5)
    back = m3.MiniMaxM3VLAttention(cfg, layer_idx).eval()
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(hf_layer_output(back, cfg, h), ours(h), rtol=1e-5, atol=1e-5)
    if layer_idx == 1:
        assert ours.index_q_proj is ours.indexer.q_proj
        assert ours.index_q_proj.weight.shape == (G * DI, HIDDEN)
        assert ours.index_k_proj.weight.shape == (DI, HIDDEN)


def test_varlen_equals_batched_and_sparse_is_not_dense():
    layer = tiny_layer()
    lengths = [90, 37]
    h = torch.randn(sum(lengths), HIDDEN)
    cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32)
    with torch.no_grad():
        out = layer(h, cu_seqlens=cu)
        for (a, b) in ((0, 90), (90, 127)):
            torch.testing.assert_close(out[a:b], layer(h[a:b][None])[0], rtol=1e-5, atol=1e-5)
        dense = tiny_layer(sparse=False)
        dense.load_state_dict(layer.state_dict(), strict=False)
        full = dense(h[:90][None])[0]
    # sequences of at most TOPK blocks: MSA is dense attention; longer ones: it is not
    torch.testing.assert_close(out[:TOPK * BLOCK], full[:TOPK * BLOCK], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[:90][-10:], full[-10:], atol=1e-3)


def test_paged_prefill_then_decode_equals_prefill():
    layer = tiny_layer()
    length, chunk = 70, 60
    h = torch.randn(length, HIDDEN)
    with torch.no_grad():
        expected = layer(h[None])[0]
        cache = msattn.MSAPagedCache(16, BLOCK, G, D, DI, dtype=torch.float32,
                                     index_dtype=torch.float32)
        pages = cache.allocate(length)
        table = cache.block_table([pages])
        got = [layer.forward_paged(h[:chunk], torch.arange(chunk), cache, 0, table,
                                   torch.tensor([0, chunk], dtype=torch.int32),
                                   torch.tensor([chunk], dtype=torch.int32))]
        for t in range(chunk, length):  # one token per step
            got.append(layer.forward_paged(h[t:t + 1], torch.tensor([t]), cache, 0, table,
                                           torch.tensor([0, 1], dtype=torch.int32),
                                           torch.tensor([t + 1], dtype=torch.int32)))
    torch.testing.assert_close(torch.cat(got), expected, rtol=1e-5, atol=1e-5)


def test_dense_layer_rejects_paged():
    layer = tiny_layer(sparse=False)
    cache = msattn.MSAPagedCache(4, BLOCK, G, D, DI, dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="dense layers"):
        layer.forward_paged(torch.randn(1, HIDDEN), torch.tensor([0]), cache, 0,
                            cache.block_table([[0]]), torch.tensor([0, 1], dtype=torch.int32),
                            torch.tensor([1], dtype=torch.int32))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                    reason="the CPU run of the Triton kernels needs TRITON_INTERPRET=1")
def test_triton_interpreter_matches_reference():
    pytest.importorskip("triton")
    h = torch.randn(1, 48, HIDDEN)  # 3 blocks, 2 selected
    with torch.no_grad():
        ref = tiny_layer(backend="reference")(h)
        tri = tiny_layer(backend="triton")(h)
    torch.testing.assert_close(tri, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_cuda_bf16_matches_transformers_layer():
    cfg = hf_config()
    from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as m3

    torch.manual_seed(0)
    hf = m3.MiniMaxM3VLAttention(cfg, 1).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf = hf.to("cuda", torch.bfloat16)
    ours = MSAAttention.from_config(cfg, 1, device="cuda", dtype=torch.bfloat16).eval()
    ours.load_state_dict(hf.state_dict())
    h = torch.randn(2, 300, HIDDEN, device="cuda", dtype=torch.bfloat16)
    ref, out = hf_layer_output(hf, cfg, h).float(), ours(h).float()
    # bf16: rounding and rare near-tie block swaps
    assert (out - ref).abs().mean() < 2e-2 * ref.abs().mean()
    ours32 = MSAAttention.from_config(cfg, 1, device="cuda").eval()
    ours32.load_state_dict(hf.float().state_dict())
    torch.testing.assert_close(ours32(h.float()), hf_layer_output(hf.float(), cfg, h.float()),
                               rtol=1e-4, atol=1e-4)
