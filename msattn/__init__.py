"""msattn: MiniMax Sparse Attention (MSA) for Hopper and any GPU Triton supports."""

from msattn.cache import (MSAPagedCache, dequantize_kv, gather_paged, quantize_index_keys,
                          quantize_kv, write_paged_cache)
from msattn.config import MSAConfig
from msattn.interface import msa_attention, msa_indexer_loss, msa_select, msa_sparse_attention
from msattn.paged import MSAPagedWrapper, msa_paged_attention, msa_paged_select

__version__ = "0.1.0"
__all__ = ["MSAConfig", "MSAPagedCache", "MSAPagedWrapper", "dequantize_kv", "gather_paged",
           "quantize_index_keys", "quantize_kv", "write_paged_cache", "msa_attention", "msa_paged_attention",
           "msa_indexer_loss", "msa_paged_select", "msa_select", "msa_sparse_attention",
           "__version__"]
