"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): the processor for visionattn's methods and its grid.

Joint attention (``attn`` of the dual- and single-stream blocks) runs over ``[video (T·Y·X), text]`` with a
key-padding mask on the padded end of the prompt; the video tokens are frame-major. The token refiner's text-only
attention stays stock. Text tokens stay global.
"""

import re

import torch
from diffusers.models.embeddings import apply_rotary_emb

from ._processor import _MethodAttnProcessor, _ModelSpec

__all__ = ["HunyuanVideoMethodAttnProcessor"]


class HunyuanVideoMethodAttnProcessor(_MethodAttnProcessor):
    """Mirrors ``diffusers.models.transformers.transformer_hunyuan_video.HunyuanVideoAttnProcessor2_0``
    (diffusers==0.42.1); only the attention call differs.

    One class serves every method: the method is the ``method`` strategy (see ``_processor.py``).
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attn.add_q_proj is None and encoder_hidden_states is not None:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        # 1. QKV projections
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        # 2. QK normalization
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # 3. Rotational positional embeddings applied to latent stream
        if image_rotary_emb is not None:
            if attn.add_q_proj is None and encoder_hidden_states is not None:
                query = torch.cat(
                    [
                        apply_rotary_emb(
                            query[:, : -encoder_hidden_states.shape[1]],
                            image_rotary_emb,
                            sequence_dim=1,
                        ),
                        query[:, -encoder_hidden_states.shape[1] :],
                    ],
                    dim=1,
                )
                key = torch.cat(
                    [
                        apply_rotary_emb(
                            key[:, : -encoder_hidden_states.shape[1]],
                            image_rotary_emb,
                            sequence_dim=1,
                        ),
                        key[:, -encoder_hidden_states.shape[1] :],
                    ],
                    dim=1,
                )
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        # 4. Encoder condition QKV projection and normalization
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            encoder_query = attn.add_q_proj(encoder_hidden_states)
            encoder_key = attn.add_k_proj(encoder_hidden_states)
            encoder_value = attn.add_v_proj(encoder_hidden_states)

            encoder_query = encoder_query.unflatten(2, (attn.heads, -1))
            encoder_key = encoder_key.unflatten(2, (attn.heads, -1))
            encoder_value = encoder_value.unflatten(2, (attn.heads, -1))

            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)

            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        # 5. Attention
        hidden_states = self._attend(query, key, value, attention_mask, seq_dim=1)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        # 6. Output projection
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : -encoder_hidden_states.shape[1]],
                hidden_states[:, -encoder_hidden_states.shape[1] :],
            )

            if getattr(attn, "to_out", None) is not None:
                hidden_states = attn.to_out[0](hidden_states)
                hidden_states = attn.to_out[1](hidden_states)

            if getattr(attn, "to_add_out", None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        return hidden_states, encoder_hidden_states


def _read_hunyuan_grid(model, args: dict) -> tuple[int, int, int]:
    """``(T, Y, X)`` = latent ``(F, H, W)`` of ``hidden_states`` ``(B, C, F, H, W)`` over the patch sizes."""
    frames, height, width = args["hidden_states"].shape[2:]
    pt, p = model.config.patch_size_t, model.config.patch_size
    return frames // pt, height // p, width // p


_SPEC = _ModelSpec(
    class_name="HunyuanVideoTransformer3DModel",
    processor_cls=HunyuanVideoMethodAttnProcessor,
    self_attention=re.compile(r"(single_)?transformer_blocks\.\d+\.attn"),
    read_grid=_read_hunyuan_grid,
    is_video=True,
    text_position="after",
)
