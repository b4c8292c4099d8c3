"""Gated 2D softmax attention of the hybrid MAViT/RAVLT stages (qhfan/MALA and qhfan/RALA ``VanillaSelfAttention``).

Same parameters as :class:`visionattn.nn.LinearAttention2d` (``qkvo`` with an un-activated output gate, LePE 5x5
on ``v``, ``proj``); RoPE rotates ``q`` and ``k`` and the attention is ``softmax(d^-1/2·q̃k̃ᵀ)v`` through
``F.scaled_dot_product_attention`` (flash / memory-efficient kernels instead of the reference's materialised
``N x N`` matrix). The released MAViT and RAVLT models use it in stages 3 and 4.
"""

import torch.nn.functional as F

from .linear_attention2d import _GatedAttention2d
from .rope2d import apply_rope2d

__all__ = ["SoftmaxAttention2d"]


class SoftmaxAttention2d(_GatedAttention2d):
    """Gated 2D softmax self-attention with LePE and 2D RoPE (the softmax stages of MAViT and RAVLT).

    Args:
        dim: channels ``C``.
        num_heads: heads ``H`` (``C / H`` must be a multiple of 4 for 2D RoPE).
        device: parameter device.
        dtype: parameter dtype.
    """

    def _attend(self, q, k, v, rope):
        # Rotate with fp32 tables and round once (as the reference does under autocast), then attend in v's dtype.
        q, k = (apply_rope2d(t, *rope).to(v.dtype) for t in (q, k))
        return F.scaled_dot_product_attention(q, k, v, scale=self.scale)
