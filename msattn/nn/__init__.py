"""torch.nn modules on msattn: :class:`MSAAttention`, the MiniMax-M3 attention block."""

from msattn.nn.attention import (MSAAttention, MSAIndexBranch, MSARMSNorm, apply_partial_rotary,
                                 rotary_cos_sin)

__all__ = ["MSAAttention", "MSAIndexBranch", "MSARMSNorm", "apply_partial_rotary", "rotary_cos_sin"]
