"""Stable Diffusion 1.x/2.x/XL (``UNet2DConditionModel``): the processor for visionattn's methods and its grid.

Self-attention (``attn1`` of every ``BasicTransformerBlock``) runs over the row-major latent grid of its UNet
level; the grid halves (rounding up) at every downsampling, so the processor finds its level from the token count.
Cross-attention (``attn2``) stays stock. The same stock processor (``AttnProcessor2_0``) serves PixArt.
"""

import re

import torch
from diffusers.utils import deprecate

from ._processor import _MethodAttnProcessor, _ModelSpec

__all__ = ["UNetMethodAttnProcessor"]


class UNetMethodAttnProcessor(_MethodAttnProcessor):
    """Mirrors ``diffusers.models.attention_processor.AttnProcessor2_0`` (diffusers==0.42.1); only the attention
    call differs.

    One class serves every method: the method is the ``method`` strategy (see ``_processor.py``).
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if len(args) > 0 or kwargs.get("scale", None) is not None:
            deprecation_message = "The `scale` argument is deprecated and will be ignored. Please remove it, as passing it will raise an error in the future. `scale` should directly be passed while calling the underlying pipeline component i.e., via `cross_attention_kwargs`."
            deprecate("scale", "1.0.0", deprecation_message)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim

        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # scaled_dot_product_attention expects attention_mask shape to be
            # (batch, heads, source_length, target_length)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # the output of sdp = (batch, num_heads, seq_len, head_dim)
        hidden_states = self._attend(query, key, value, attention_mask, seq_dim=2)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)

        if attn.residual_connection:
            hidden_states = hidden_states + residual

        hidden_states = hidden_states / attn.rescale_output_factor

        return hidden_states


def _read_latent_grid(model, args: dict) -> tuple[int, int]:
    """``(Y, X)`` of the latent ``sample`` ``(B, C, H, W)`` (UNet level 0)."""
    return tuple(args["sample"].shape[-2:])


_SPEC = _ModelSpec(
    class_name="UNet2DConditionModel",
    processor_cls=UNetMethodAttnProcessor,
    self_attention=re.compile(r".*\.attn1"),
    read_grid=_read_latent_grid,
    is_video=False,
    multi_level=True,
)
