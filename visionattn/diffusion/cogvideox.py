"""CogVideoX (``CogVideoXTransformer3DModel``): the processor for visionattn's methods and its grid.

Joint attention (``attn1``) runs over ``[text, video (T·Y·X)]``, video tokens frame-major; text stays global.
"""

import re

import torch
from diffusers.models.embeddings import apply_rotary_emb

from ._processor import _MethodAttnProcessor, _ModelSpec

__all__ = ["CogVideoXMethodAttnProcessor"]


class CogVideoXMethodAttnProcessor(_MethodAttnProcessor):
    """Mirrors ``diffusers.models.attention_processor.CogVideoXAttnProcessor2_0`` (diffusers==0.42.1); only the
    attention call differs.

    One class serves every method: the method is the ``method`` strategy (see ``_processor.py``).
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        text_seq_length = encoder_hidden_states.size(1)

        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)

        batch_size, sequence_length, _ = hidden_states.shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # Apply RoPE if needed
        if image_rotary_emb is not None:
            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)

        hidden_states = self._attend(query, key, value, attention_mask, seq_dim=2)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1
        )
        return hidden_states, encoder_hidden_states


def _read_cogvideox_grid(model, args: dict) -> tuple[int, int, int]:
    """``(T, Y, X)`` from ``hidden_states`` ``(B, F, C, H, W)``; frames are patched only with ``patch_size_t``."""
    batch, frames, channels, height, width = args["hidden_states"].shape
    pt, p = model.config.patch_size_t or 1, model.config.patch_size
    return frames // pt, height // p, width // p


_SPEC = _ModelSpec(
    class_name="CogVideoXTransformer3DModel",
    processor_cls=CogVideoXMethodAttnProcessor,
    self_attention=re.compile(r"transformer_blocks\.\d+\.attn1"),
    read_grid=_read_cogvideox_grid,
    is_video=True,
    text_position="before",
)
