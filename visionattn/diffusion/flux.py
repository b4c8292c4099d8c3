"""FLUX.1 (``FluxTransformer2DModel``): the processor for visionattn's methods and how ``apply`` finds the grid.

Joint attention runs over ``[text (512), image (h·w)]`` in both the double-stream blocks (text and image projected
separately, then concatenated) and the single-stream blocks (already concatenated); image tokens are the row-major
``(h, w)`` grid of the 2×2-packed latent, whose coordinates are ``img_ids[:, 1:]``. Text tokens stay global.
"""

import re

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections

from ._processor import _MethodAttnProcessor, _ModelSpec

__all__ = ["FluxMethodAttnProcessor"]


class FluxMethodAttnProcessor(_MethodAttnProcessor):
    """Mirrors ``diffusers.models.transformers.transformer_flux.FluxAttnProcessor`` (diffusers==0.42.1); only the
    attention call differs.

    One class serves every method: the method is the ``method`` strategy (see ``_processor.py``).
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )

        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))

            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)

            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = self._attend(query, key, value, attention_mask, seq_dim=1)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())

            return hidden_states, encoder_hidden_states
        else:
            return hidden_states


def _read_flux_grid(model, args: dict) -> tuple[int, int]:
    """``(h, w)`` from ``img_ids`` ``(N, 3)`` = ``(0, row, col)``; the image tokens must be exactly that grid."""
    img_ids = args["img_ids"]
    img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    rows, cols = (int(img_ids[:, axis].max()) + 1 for axis in (1, 2))
    if rows * cols != img_ids.shape[0] or args["hidden_states"].shape[1] != img_ids.shape[0]:
        raise ValueError(
            f"img_ids must describe one row-major (rows, cols) grid of the {args['hidden_states'].shape[1]} image "
            f"tokens; got {img_ids.shape[0]} ids spanning {rows}x{cols}. Inputs with several images (e.g. FLUX "
            "Kontext references) are not supported by the visionattn methods."
        )
    return rows, cols


_SPEC = _ModelSpec(
    class_name="FluxTransformer2DModel",
    processor_cls=FluxMethodAttnProcessor,
    self_attention=re.compile(r"(single_)?transformer_blocks\.\d+\.attn"),
    read_grid=_read_flux_grid,
    is_video=False,
    text_position="before",
)
