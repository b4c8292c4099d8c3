"""PixArt-α/Σ (``PixArtTransformer2DModel``) and DiT (``DiTTransformer2DModel``): their grid; the processor is the UNet's.

Their blocks are ``BasicTransformerBlock``s with the stock ``AttnProcessor2_0`` (mirrored by
``UNetMethodAttnProcessor``); self-attention (``attn1``) runs over the row-major ``(h, w)`` patch grid,
PixArt's cross-attention (``attn2``) stays stock.
"""

import re

from ._processor import _ModelSpec
from .unet import UNetMethodAttnProcessor

__all__ = []


def _read_patch_grid(model, args: dict) -> tuple[int, int]:
    """``(Y, X)`` = latent ``(H, W)`` of ``hidden_states`` ``(B, C, H, W)`` over ``patch_size``."""
    height, width = args["hidden_states"].shape[-2:]
    patch = model.config.patch_size
    return height // patch, width // patch


_SPEC = _ModelSpec(
    class_name="PixArtTransformer2DModel",
    processor_cls=UNetMethodAttnProcessor,
    self_attention=re.compile(r"transformer_blocks\.\d+\.attn1"),
    read_grid=_read_patch_grid,
    is_video=False,
)
_DIT_SPEC = _ModelSpec(
    class_name="DiTTransformer2DModel",
    processor_cls=UNetMethodAttnProcessor,
    self_attention=re.compile(r"transformer_blocks\.\d+\.attn1"),
    read_grid=_read_patch_grid,
    is_video=False,
)
