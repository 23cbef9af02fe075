"""MSAConfig: MiniMax-M3 defaults and reading a Hugging Face config."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest
import torch

import msattn
from msattn import MSAConfig

M3_SPARSE = {
    "sparse_index_dim": 128,
    "sparse_num_index_heads": 4,
    "sparse_topk_blocks": 16,
    "sparse_block_size": 128,
    "sparse_init_block": 0,
    "sparse_local_block": 1,
    "sparse_score_type": "max",
}
M3_TEXT = {"num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128, "hidden_size": 6144,
           "sparse_attention_config": M3_SPARSE}

# A non-default config: every field differs from the M3 defaults.
OTHER_SPARSE = {
    "sparse_index_dim": 64,
    "sparse_num_index_heads": 8,
    "sparse_topk_blocks": 8,
    "sparse_block_size": 64,
    "sparse_init_block": 2,
    "sparse_local_block": 3,
    "sparse_score_type": "max",
}
OTHER_TEXT = {"num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 96, "hidden_size": 4096,
              "sparse_attention_config": OTHER_SPARSE}
OTHER = MSAConfig(num_heads=32, num_kv_heads=8, head_dim=96, index_dim=64, num_index_heads=8, block_size=64,
                  topk=8, init_blocks=2, local_blocks=3)


def namespace(obj):
    """A dict turned into nested attribute objects (like a transformers config)."""
    if isinstance(obj, dict):
        return types.SimpleNamespace(**{k: namespace(v) for k, v in obj.items()})
    return obj


def test_defaults_are_minimax_m3():
    c = MSAConfig()
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.index_dim, c.num_index_heads) == (64, 4, 128, 128, 4)
    assert (c.block_size, c.topk, c.init_blocks, c.local_blocks, c.score_type) == (128, 16, 0, 1, "max")
    assert c.to_dict() == {"num_heads": 64, "num_kv_heads": 4, "head_dim": 128, "index_dim": 128,
                           "num_index_heads": 4, "block_size": 128, "topk": 16, "init_blocks": 0,
                           "local_blocks": 1, "score_type": "max"}
    assert c.selection_kwargs() == {"block_size": 128, "topk": 16, "init_blocks": 0, "local_blocks": 1}


def test_index_heads_default_to_kv_heads():
    c = MSAConfig(num_heads=48, num_kv_heads=8)
    assert c.num_index_heads == 8 == c.num_kv_heads
    assert c.to_dict()["num_index_heads"] == 8
    # The derived default and the explicit value give the same (equal, equally hashed) config.
    assert c == MSAConfig(num_heads=48, num_kv_heads=8, num_index_heads=8)
    assert hash(c) == hash(MSAConfig(num_heads=48, num_kv_heads=8, num_index_heads=8))
    assert MSAConfig(num_index_heads=None).num_index_heads == 4


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        MSAConfig().topk = 8


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("text,expected", [(M3_TEXT, MSAConfig()), (OTHER_TEXT, OTHER)])
def test_from_hf_dict(nested, text, expected):
    config = {"model_type": "minimax_m3", "text_config": text} if nested else dict(text)
    assert MSAConfig.from_hf(config) == expected


@pytest.mark.parametrize("nested", [True, False])
def test_from_hf_object(nested):
    config = namespace({"model_type": "minimax_m3", "text_config": OTHER_TEXT} if nested else OTHER_TEXT)
    assert MSAConfig.from_hf(config) == OTHER


def test_from_hf_object_with_dict_sparse_config():
    # transformers keeps sparse_attention_config as a plain dict attribute of the text config.
    text = types.SimpleNamespace(**{k: v for k, v in OTHER_TEXT.items()})
    assert isinstance(text.sparse_attention_config, dict)
    assert MSAConfig.from_hf(types.SimpleNamespace(text_config=text)) == OTHER


@pytest.mark.parametrize("nested", [True, False])
def test_from_hf_path(tmp_path, nested):
    config = {"architectures": ["MiniMaxM3ForCausalLM"], "text_config": OTHER_TEXT} if nested else OTHER_TEXT
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert MSAConfig.from_hf(path) == OTHER  # os.PathLike
    assert MSAConfig.from_hf(str(path)) == OTHER  # str
    assert MSAConfig.from_hf(tmp_path) == OTHER  # the model folder


def test_from_hf_derives_head_dim_from_hidden_size():
    text = {k: v for k, v in OTHER_TEXT.items() if k != "head_dim"}  # 4096 / 32 = 128
    assert MSAConfig.from_hf({"text_config": text}).head_dim == 128


def test_from_hf_missing_keys_keep_defaults():
    cfg = MSAConfig.from_hf({"text_config": {"sparse_attention_config": {"sparse_topk_blocks": 8}}})
    assert cfg == dataclasses.replace(MSAConfig(), topk=8)


def test_from_hf_index_heads_default_to_kv_heads():
    sparse = {k: v for k, v in OTHER_SPARSE.items() if k != "sparse_num_index_heads"}
    cfg = MSAConfig.from_hf({"text_config": {**OTHER_TEXT, "sparse_attention_config": sparse}})
    assert cfg.num_index_heads == 8 == cfg.num_kv_heads


def test_from_hf_without_sparse_config_is_rejected():
    with pytest.raises(ValueError, match="sparse_attention_config"):
        MSAConfig.from_hf({"text_config": {"num_attention_heads": 64}})
    with pytest.raises(ValueError, match="sparse_attention_config"):
        MSAConfig.from_hf(types.SimpleNamespace(num_attention_heads=64))


@pytest.mark.parametrize("score_type", ["mean", "sum", "MAX", ""])
def test_score_type_other_than_max_is_rejected(score_type):
    sparse = {**M3_SPARSE, "sparse_score_type": score_type}
    with pytest.raises(ValueError, match=r"sparse_score_type must be 'max'"):
        MSAConfig.from_hf({"text_config": {**M3_TEXT, "sparse_attention_config": sparse}})
    with pytest.raises(ValueError, match=r"sparse_score_type must be 'max'"):
        MSAConfig(score_type=score_type)


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_size=96), r"block_size must be a power of two"),
    (dict(topk=2, init_blocks=2, local_blocks=1), r"topk must be >= init_blocks \+ local_blocks"),
    (dict(local_blocks=0), r"local_blocks must be >= 1"),
    (dict(num_heads=60, num_kv_heads=8, num_index_heads=8), r"num_heads = 60 must be a multiple of num_kv_heads = 8"),
    (dict(num_index_heads=2), r"sparse_num_index_heads = 2 must equal num_key_value_heads = 4"),
])
def test_invalid_configs_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MSAConfig(**kwargs)


def test_invalid_hf_values_are_rejected():
    sparse = {**M3_SPARSE, "sparse_block_size": 100}
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        MSAConfig.from_hf({"text_config": {**M3_TEXT, "sparse_attention_config": sparse}})


def test_selection_kwargs_work_with_msa_select_and_msa_attention():
    cfg = MSAConfig(num_heads=6, num_kv_heads=2, head_dim=8, index_dim=4, num_index_heads=2, block_size=4,
                    topk=3, init_blocks=1, local_blocks=1)
    gen = torch.Generator().manual_seed(0)
    seq = 30
    qi = torch.randn(1, seq, cfg.num_index_heads, cfg.index_dim, generator=gen)
    ki = torch.randn(1, seq, cfg.index_dim, generator=gen)
    q = torch.randn(1, seq, cfg.num_heads, cfg.head_dim, generator=gen)
    k = torch.randn(1, seq, cfg.num_kv_heads, cfg.head_dim, generator=gen)
    v = torch.randn(1, seq, cfg.num_kv_heads, cfg.head_dim, generator=gen)
    idx = msattn.msa_select(qi, ki, **cfg.selection_kwargs(), backend="reference")
    explicit = msattn.msa_select(qi, ki, block_size=4, topk=3, init_blocks=1, local_blocks=1,
                                 backend="reference")
    assert idx.shape == (1, 2, seq, 3)
    assert torch.equal(idx, explicit)
    # The config's init block is honoured: block 0 is in every row of every group.
    assert bool((idx == 0).any(dim=-1).all())
    o = msattn.msa_attention(q, k, v, qi, ki, **cfg.selection_kwargs(), backend="reference")
    o2, _ = msattn.msa_sparse_attention(q, k, v, idx, block_size=cfg.block_size, backend="reference")
    assert torch.equal(o, o2)


def test_from_hf_reads_transformers_text_config():
    """transformers 5.x's MiniMaxM3VLTextConfig keeps the sparse parameters as flat index_*
    attributes (no sparse_attention_config); from_hf reads them, from the text config or the
    composite config."""
    transformers = pytest.importorskip("transformers")
    text = transformers.MiniMaxM3VLTextConfig(index_topk_blocks=8, index_block_size=64,
                                              index_local_blocks=2)
    cfg = MSAConfig.from_hf(text)
    assert (cfg.topk, cfg.block_size, cfg.local_blocks, cfg.init_blocks) == (8, 64, 2, 0)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.index_dim) == (
        text.num_attention_heads, text.num_key_value_heads, text.index_head_dim)
    composite = transformers.MiniMaxM3VLConfig(text_config=text.to_dict())
    assert MSAConfig.from_hf(composite) == cfg
