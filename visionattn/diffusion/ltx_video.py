"""LTX-Video (``LTXVideoTransformer3DModel``): the processor for visionattn's methods and its grid.

Self-attention (``attn1``) runs over the frame-major ``(T, Y, X)`` latent tokens; the transformer receives the
latent ``num_frames``, ``height`` and ``width`` explicitly. Cross-attention (``attn2``) stays stock.
"""

import re

import torch
from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

from ._processor import _MethodAttnProcessor, _ModelSpec

__all__ = ["LTXVideoMethodAttnProcessor"]


class LTXVideoMethodAttnProcessor(_MethodAttnProcessor):
    """Mirrors ``diffusers.models.transformers.transformer_ltx.LTXVideoAttnProcessor`` (diffusers==0.42.1); only
    the attention call differs.

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
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states

        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)

        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        hidden_states = self._attend(query, key, value, attention_mask, seq_dim=1)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


def _read_ltx_grid(model, args: dict) -> tuple[int, int, int]:
    """``(T, Y, X)`` from the ``num_frames``, ``height``, ``width`` arguments (latent sizes) over the patch sizes."""
    missing = [name for name in ("num_frames", "height", "width") if args.get(name) is None]
    if missing:
        raise ValueError(f"LTXVideoTransformer3DModel must be called with {missing} for the visionattn methods.")
    pt, p = model.config.patch_size_t, model.config.patch_size
    return args["num_frames"] // pt, args["height"] // p, args["width"] // p


_SPEC = _ModelSpec(
    class_name="LTXVideoTransformer3DModel",
    processor_cls=LTXVideoMethodAttnProcessor,
    self_attention=re.compile(r"transformer_blocks\.\d+\.attn1"),
    read_grid=_read_ltx_grid,
    is_video=True,
)
