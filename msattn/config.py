"""MSAConfig: the shape and selection parameters of an MSA layer, with MiniMax-M3 defaults."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

# Keys of ``text_config.sparse_attention_config`` in a MiniMax-M3 config.json -> MSAConfig fields.
_HF_SPARSE_KEYS = {
    "sparse_index_dim": "index_dim",
    "sparse_num_index_heads": "num_index_heads",
    "sparse_topk_blocks": "topk",
    "sparse_block_size": "block_size",
    "sparse_init_block": "init_blocks",
    "sparse_local_block": "local_blocks",
    "sparse_score_type": "score_type",
}
# transformers 5.x (``MiniMaxM3VLTextConfig``) keeps them as flat attributes of the text config;
# it has no attention-sink (init) blocks.
_HF_FLAT_KEYS = {
    "index_head_dim": "index_dim",
    "index_n_heads": "num_index_heads",
    "index_topk_blocks": "topk",
    "index_block_size": "block_size",
    "index_local_blocks": "local_blocks",
}
_HF_MODEL_KEYS = {
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "head_dim": "head_dim",
}


@dataclass(frozen=True)
class MSAConfig:
    """MSA layer parameters. Defaults are MiniMax-M3's.

    ``num_index_heads`` (index query heads) defaults to ``None``, which means "equal to
    ``num_kv_heads``" (one index query per GQA group); a given value must equal ``num_kv_heads``.
    """

    num_heads: int = 64
    num_kv_heads: int = 4
    head_dim: int = 128
    index_dim: int = 128
    num_index_heads: int | None = None
    block_size: int = 128
    topk: int = 16
    init_blocks: int = 0
    local_blocks: int = 1
    score_type: str = "max"

    def __post_init__(self):
        from msattn._checks import check_block_size, check_selection_params

        if self.num_index_heads is None:  # frozen dataclass: set the derived default directly
            object.__setattr__(self, "num_index_heads", self.num_kv_heads)
        check_block_size(self.block_size)
        check_selection_params(self.topk, self.init_blocks, self.local_blocks)
        if self.score_type != "max":
            raise ValueError(f"sparse_score_type must be 'max' (block max-pooling, the only score MSA "
                             f"defines), got {self.score_type!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads = {self.num_heads} must be a multiple of num_kv_heads = "
                             f"{self.num_kv_heads}")
        if self.num_index_heads != self.num_kv_heads:
            raise ValueError(f"sparse_num_index_heads = {self.num_index_heads} must equal "
                             f"num_key_value_heads = {self.num_kv_heads} (one index query per GQA group)")

    @classmethod
    def from_hf(cls, config) -> "MSAConfig":
        """Read a MiniMax-M3 config: a path to ``config.json`` (or its folder), a dict, or an object
        with attributes (a ``transformers`` config: ``MiniMaxM3VLConfig`` or its text config, whose
        flat ``index_*`` attributes are read). Uses ``text_config`` when present."""
        if isinstance(config, (str, os.PathLike)):
            path = os.path.join(config, "config.json") if os.path.isdir(config) else config
            with open(path) as f:
                config = json.load(f)
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        text = _get(config, "text_config", None) or config
        sparse = _get(text, "sparse_attention_config", None)
        if sparse is not None:
            sparse_keys = _HF_SPARSE_KEYS
        elif _get(text, "index_topk_blocks", None) is not None:
            sparse, sparse_keys = text, _HF_FLAT_KEYS
        else:
            raise ValueError("config has no text_config.sparse_attention_config (nor the index_* "
                             "attributes of transformers' MiniMaxM3VLTextConfig): not an MSA "
                             "(MiniMax-M3) config")
        values = {}
        for hf_key, field in _HF_MODEL_KEYS.items():
            value = _get(text, hf_key, None)
            if value is not None:
                values[field] = value
        if "head_dim" not in values and "num_heads" in values and _get(text, "hidden_size", None):
            values["head_dim"] = _get(text, "hidden_size", None) // values["num_heads"]
        for hf_key, field in sparse_keys.items():
            value = _get(sparse, hf_key, None)
            if value is not None:
                values[field] = value
        return cls(**values)

    def selection_kwargs(self) -> dict:
        """Keyword arguments of :func:`msattn.msa_select` / :func:`msattn.msa_attention`."""
        return {"block_size": self.block_size, "topk": self.topk, "init_blocks": self.init_blocks,
                "local_blocks": self.local_blocks}

    def to_dict(self) -> dict:
        return asdict(self)


def _get(obj, key, default):
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)
