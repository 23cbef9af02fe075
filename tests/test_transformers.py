"""The "msattn" attention implementation of MiniMax-M3 in transformers equals transformers' own
eager/SDPA path (logits, selection, greedy generate), and left-padded batches match their rows."""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("transformers.models.minimax_m3_vl")

from transformers import AutoModelForCausalLM, MiniMaxM3VLForCausalLM, MiniMaxM3VLTextConfig  # noqa: E402
from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as m3  # noqa: E402

import msattn.integrations.transformers as msattn_tf  # noqa: E402

BLOCK, TOPK = 16, 2  # 16-token blocks, 2 selected: a 90-token sequence has 6 blocks


def tiny_config(**overrides):
    values = dict(
        vocab_size=128, hidden_size=64, intermediate_size=32, dense_intermediate_size=64,
        shared_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, index_n_heads=2, index_head_dim=32,
        index_block_size=BLOCK, index_topk_blocks=TOPK, index_local_blocks=1,
        num_local_experts=4, num_experts_per_tok=2,
        layer_types=["full_attention", "minimax_m3_sparse", "minimax_m3_sparse"],
        mlp_layer_types=["dense", "sparse", "dense"], pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5})
    values.update(overrides)
    return MiniMaxM3VLTextConfig(**values)


def randomise_norms(model, seed=1):
    """The RMSNorm weights start at zero (scale 1 + w); give them random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.fixture(scope="module")
def name():
    return msattn_tf.register()


@pytest.fixture(scope="module")
def model(name):
    torch.manual_seed(0)
    model = MiniMaxM3VLForCausalLM(tiny_config()).eval()
    randomise_norms(model)
    return model


def logits(model, impl, ids, **kwargs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(ids, **kwargs).logits


def capture_indexer_outputs(model):
    """Forward hooks recording what every sparse layer's indexer returns."""
    outputs, handles = [], []
    for layer in model.model.layers:
        if layer.self_attn.indexer is not None:
            handles.append(layer.self_attn.indexer.register_forward_hook(
                lambda mod, args, out: outputs.append(out)))
    return outputs, handles


def test_logits_and_selection_match_sdpa_and_eager(model, name):
    ids = torch.randint(3, 128, (2, 90), generator=torch.Generator().manual_seed(2))
    hf_sel, handles = capture_indexer_outputs(model)
    ref = logits(model, "sdpa", ids)
    for h in handles:
        h.remove()
    eager = logits(model, "eager", ids)
    ours_sel, handles = capture_indexer_outputs(model)
    out = logits(model, name, ids)
    for h in handles:
        h.remove()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=2e-5)
    # the same blocks: transformers' int64 [B, G, T, k] vs msattn's selection, converted
    assert len(hf_sel) == len(ours_sel) == 2
    for hf, ours in zip(hf_sel, ours_sel):
        assert isinstance(ours, msattn_tf.MSAIndexerOutput)
        converted = msattn_tf.select_hf_block_indices(ours)
        assert converted.shape == hf.shape and converted.dtype == hf.dtype
        assert torch.equal(converted, hf.sort(dim=-1, descending=True).values)
        # really sparse: late queries keep TOPK of their 6 blocks
        assert (hf[:, :, -1] >= 0).sum(-1).eq(TOPK).all()


def test_generate_matches_sdpa(model, name):
    prompt = torch.randint(3, 128, (2, 50), generator=torch.Generator().manual_seed(3))
    tokens = {}
    for impl in ("sdpa", name):
        model.set_attn_implementation(impl)
        tokens[impl] = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                      max_new_tokens=6, do_sample=False)
    assert tokens[name].shape[1] == 56
    assert torch.equal(tokens[name], tokens["sdpa"])


def test_left_padding_matches_rows(model, name):
    gen = torch.Generator().manual_seed(4)
    lengths, width = [70, 41], 70
    rows = [torch.randint(3, 128, (n,), generator=gen) for n in lengths]
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = row
        mask[b, width - len(row):] = 1
    padded = logits(model, name, ids, attention_mask=mask)
    for b, row in enumerate(rows):
        single = logits(model, name, row[None])
        torch.testing.assert_close(padded[b, width - len(row):], single[0], rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(single, logits(model, "sdpa", row[None]), rtol=1e-5, atol=2e-5)
    model.set_attn_implementation(name)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    for b, row in enumerate(rows):
        alone = model.generate(row[None], attention_mask=torch.ones_like(row[None]),
                               max_new_tokens=5, do_sample=False)
        assert torch.equal(out[b, width:], alone[0, len(row):])


def test_unsupported_masks_raise(model, name):
    ids = torch.randint(3, 128, (1, 20))
    hole = torch.ones_like(ids)
    hole[0, 5] = 0
    with pytest.raises(NotImplementedError, match="left and right padding"):
        logits(model, name, ids, attention_mask=hole)
    right = torch.ones_like(ids)
    right[0, -3:] = 0  # right padding is fine: real queries never see the padded keys
    torch.testing.assert_close(logits(model, name, ids, attention_mask=right)[0, :-3],
                               logits(model, name, ids[:, :-3])[0], rtol=1e-5, atol=2e-5)


def test_from_config_from_pretrained_registration_and_unregister(name, tmp_path):
    cfg = tiny_config(num_hidden_layers=2, layer_types=["full_attention", "minimax_m3_sparse"],
                      mlp_layer_types=["dense", "dense"])
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=name)
    assert isinstance(model, MiniMaxM3VLForCausalLM)
    assert model.config._attn_implementation == name
    model.save_pretrained(tmp_path)
    loaded = MiniMaxM3VLForCausalLM.from_pretrained(tmp_path, attn_implementation=name).eval()
    assert loaded.config._attn_implementation == name
    ids = torch.randint(3, 128, (1, 40))
    torch.testing.assert_close(logits(loaded, name, ids), logits(loaded, "sdpa", ids),
                               rtol=1e-5, atol=2e-5)
    mc = msattn_tf.msa_config(cfg)
    assert (mc.block_size, mc.topk, mc.local_blocks, mc.init_blocks) == (BLOCK, TOPK, 1, 0)
    assert m3.MiniMaxM3VLIndexer.forward is msattn_tf._indexer_forward
    msattn_tf.unregister()
    try:
        assert m3.MiniMaxM3VLIndexer.forward is not msattn_tf._indexer_forward
    finally:
        assert msattn_tf.register() == name
    assert m3.MiniMaxM3VLIndexer.forward is msattn_tf._indexer_forward


def test_block_index_conversion():
    ours = torch.tensor([[[[3, 0, -1, -1], [-1, -1, -1, -1]]]], dtype=torch.int32)  # [1,1,2,4]
    hf = msattn_tf.to_hf_block_indices(ours, key_length=40, block_size=16)  # 3 blocks
    assert hf.dtype == torch.int64 and hf.tolist() == [[[[3, 0, -1], [-1, -1, -1]]]]
    back = msattn_tf.from_hf_block_indices(hf)
    assert back.dtype == torch.int32 and back.shape == (1, 1, 2, 3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_logits_and_generate(name, dtype):
    torch.manual_seed(0)
    cfg = tiny_config(index_block_size=32, index_topk_blocks=3)
    model = MiniMaxM3VLForCausalLM(cfg).eval()
    randomise_norms(model)
    model = model.to("cuda", dtype)
    ids = torch.randint(3, 128, (2, 300), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(5))
    ref, out = logits(model, "sdpa", ids), logits(model, name, ids)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    else:  # bf16: near-tie block swaps and bf16 rounding; compare loosely, and the argmax
        assert (out.float() - ref.float()).abs().mean() < 2e-2
        assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    prompt = ids[:, :120]
    tokens = {}
    for impl in ("sdpa", name):
        model.set_attn_implementation(impl)
        tokens[impl] = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                      max_new_tokens=8, do_sample=False)
    assert tokens[name].shape == (2, 128) and torch.equal(tokens[name][:, :120], prompt)
    if dtype == torch.float32:  # bf16 greedy paths may part at a near-tie, as sdpa vs eager do
        assert torch.equal(tokens[name], tokens["sdpa"])
