"""msattn: MiniMax Sparse Attention (MSA) for Hopper and any GPU Triton supports."""

from msattn.config import MSAConfig
from msattn.interface import msa_attention, msa_select, msa_sparse_attention

__version__ = "0.1.0"
__all__ = ["MSAConfig", "msa_attention", "msa_select", "msa_sparse_attention", "__version__"]
