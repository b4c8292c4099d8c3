"""Wan 2.1/2.2 (``WanTransformer3DModel``): the processor for visionattn's methods and how ``apply`` finds the grid.

Self-attention (``attn1``) runs over the frame-major ``(T, Y, X)`` video tokens of the patchified latent; the
cross-attention to text (``attn2``) stays stock. Wan runs classifier-free guidance as two forward passes per step.
"""

import re

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import _get_added_kv_projections, _get_qkv_projections

from ._processor import _MethodAttnProcessor, _ModelSpec

__all__ = ["WanMethodAttnProcessor"]


class WanMethodAttnProcessor(_MethodAttnProcessor):
    """Mirrors ``diffusers.models.transformers.transformer_wan.WanAttnProcessor`` (diffusers==0.42.1); only the
    attention call differs.

    One class serves every method: the method is the ``method`` strategy (see ``_processor.py``).
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        encoder_hidden_states_img = None
        if attn.add_k_proj is not None:
            # 512 is the context length of the text encoder, hardcoded for now
            image_context_length = encoder_hidden_states.shape[1] - 512
            encoder_hidden_states_img = encoder_hidden_states[:, :image_context_length]
            encoder_hidden_states = encoder_hidden_states[:, image_context_length:]

        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        if rotary_emb is not None:

            def apply_rotary_emb(
                hidden_states: torch.Tensor,
                freqs_cos: torch.Tensor,
                freqs_sin: torch.Tensor,
            ):
                x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
                cos = freqs_cos[..., 0::2]
                sin = freqs_sin[..., 1::2]
                out = torch.empty_like(hidden_states)
                out[..., 0::2] = x1 * cos - x2 * sin
                out[..., 1::2] = x1 * sin + x2 * cos
                return out.type_as(hidden_states)

            query = apply_rotary_emb(query, *rotary_emb)
            key = apply_rotary_emb(key, *rotary_emb)

        # I2V task
        hidden_states_img = None
        if encoder_hidden_states_img is not None:
            key_img, value_img = _get_added_kv_projections(attn, encoder_hidden_states_img)
            key_img = attn.norm_added_k(key_img)

            key_img = key_img.unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))

            hidden_states_img = dispatch_attention_fn(
                query,
                key_img,
                value_img,
                attn_mask=None,
                dropout_p=0.0,
                is_causal=False,
                backend=self._attention_backend,
                # Reference: https://github.com/huggingface/diffusers/pull/12909
                parallel_config=None,
            )
            hidden_states_img = hidden_states_img.flatten(2, 3)
            hidden_states_img = hidden_states_img.type_as(query)

        hidden_states = self._attend(query, key, value, attention_mask, seq_dim=1)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.type_as(query)

        if hidden_states_img is not None:
            hidden_states = hidden_states + hidden_states_img

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


def _read_wan_grid(model, args: dict) -> tuple[int, int, int]:
    """``(T, Y, X)`` = latent ``(F, H, W)`` of ``hidden_states`` ``(B, C, F, H, W)`` over ``patch_size``."""
    frames, height, width = args["hidden_states"].shape[2:]
    pt, ph, pw = model.config.patch_size
    return frames // pt, height // ph, width // pw


_SPEC = _ModelSpec(
    class_name="WanTransformer3DModel",
    processor_cls=WanMethodAttnProcessor,
    self_attention=re.compile(r"blocks\.\d+\.attn1"),
    read_grid=_read_wan_grid,
    is_video=True,
)
