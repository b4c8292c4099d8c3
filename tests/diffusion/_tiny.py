"""Tiny random-weight diffusers models (the constructors of diffusers' own tests) and inputs for them.

``TINY_MODELS[name].build()`` makes the model in fp32 eval mode; ``.inputs(batch, scale, seed)`` returns forward
kwargs, where ``scale`` grows the latent grid (resolution changes between calls). Both take ``head_dim``: ``None``
keeps the CPU-sized heads of diffusers' tests (2 to 16 channels); GPU tests pass ``GPU_HEAD_DIM`` so that every
self-attention layer has a head dim the Triton kernels take (16 to 128; the UNet's mid block gets twice that), and
``backend=None`` really runs the kernels.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import (
    CogVideoXTransformer3DModel,
    FluxTransformer2DModel,
    HunyuanVideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    WanTransformer3DModel,
)

#: Head dim of the GPU variants of the tiny models (Triton kernels need 16..128).
GPU_HEAD_DIM = 32


@dataclass
class TinyModel:
    """``build_fn(head_dim)``, ``inputs_fn(batch, scale, gen, head_dim)``; ``head_dim`` is the CPU default."""

    build_fn: Callable[[int], torch.nn.Module]
    inputs_fn: Callable[[int, int, torch.Generator, int], dict]
    is_video: bool
    head_dim: int

    def build(self, seed: int = 0, head_dim: int | None = None) -> torch.nn.Module:
        torch.manual_seed(seed)
        return self.build_fn(head_dim or self.head_dim).eval()

    def inputs(self, batch: int = 2, scale: int = 1, seed: int = 0, head_dim: int | None = None) -> dict:
        return self.inputs_fn(batch, scale, torch.Generator().manual_seed(seed), head_dim or self.head_dim)


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen)


def _flux_inputs(b, s, gen, d):
    h, w = 4 * s, 6
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    return dict(
        hidden_states=_randn(gen, b, h * w, 4),
        encoder_hidden_states=_randn(gen, b, 8, 32),
        pooled_projections=_randn(gen, b, 32),
        img_ids=img_ids,
        txt_ids=torch.zeros(8, 3),
        timestep=torch.full((b,), 0.7),
    )


TINY_MODELS = {
    "unet": TinyModel(
        # 2 heads of d channels at level 0, 2 of 2d in the mid block (attention_head_dim is the head count here)
        lambda d: UNet2DConditionModel(
            block_out_channels=(2 * d, 4 * d),
            norm_num_groups=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=8,
            attention_head_dim=2,
            out_channels=4,
            in_channels=4,
            layers_per_block=1,
            sample_size=16,
        ),
        lambda b, s, gen, d: dict(
            sample=_randn(gen, b, 4, 8 * s, 6 * s),
            timestep=torch.tensor([10]),
            encoder_hidden_states=_randn(gen, b, 4, 8),
        ),
        is_video=False,
        head_dim=2,
    ),
    "flux": TinyModel(
        lambda d: FluxTransformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=d,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=_rope_axes(d),
        ),
        _flux_inputs,
        is_video=False,
        head_dim=16,
    ),
    "sd3": TinyModel(
        lambda d: SD3Transformer2DModel(
            sample_size=32,
            patch_size=1,
            in_channels=4,
            num_layers=2,
            attention_head_dim=d,
            num_attention_heads=4,
            caption_projection_dim=4 * d,
            joint_attention_dim=32,
            pooled_projection_dim=64,
            out_channels=4,
            pos_embed_max_size=96,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        ),
        lambda b, s, gen, d: dict(
            hidden_states=_randn(gen, b, 4, 6 * s, 8),
            encoder_hidden_states=_randn(gen, b, 8, 32),
            pooled_projections=_randn(gen, b, 64),
            timestep=torch.full((b,), 500.0),
        ),
        is_video=False,
        head_dim=8,
    ),
    "pixart": TinyModel(
        lambda d: PixArtTransformer2DModel(
            sample_size=8,
            num_layers=1,
            patch_size=2,
            attention_head_dim=d,
            num_attention_heads=2,
            in_channels=4,
            cross_attention_dim=8,
            out_channels=8,
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=8,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            use_additional_conditions=False,
            caption_channels=None,
        ),
        lambda b, s, gen, d: dict(
            hidden_states=_randn(gen, b, 4, 8 * s, 12),
            encoder_hidden_states=_randn(gen, b, 8, 8),
            timestep=torch.full((b,), 500),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ),
        is_video=False,
        head_dim=2,
    ),
    "wan": TinyModel(
        lambda d: WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=d,
            in_channels=4,
            out_channels=4,
            text_dim=16,
            freq_dim=256,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        ),
        lambda b, s, gen, d: dict(
            hidden_states=_randn(gen, b, 4, 3, 8 * s, 12),
            encoder_hidden_states=_randn(gen, b, 12, 16),
            timestep=torch.full((b,), 900),
        ),
        is_video=True,
        head_dim=12,
    ),
    "hunyuan_video": TinyModel(
        lambda d: HunyuanVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=d,
            num_layers=1,
            num_single_layers=1,
            num_refiner_layers=1,
            patch_size=1,
            patch_size_t=1,
            guidance_embeds=True,
            text_embed_dim=16,
            pooled_projection_dim=8,
            rope_axes_dim=_rope_axes(d),
            image_condition_type=None,
        ),
        lambda b, s, gen, d: dict(
            hidden_states=_randn(gen, b, 4, 2, 4 * s, 6),
            timestep=torch.full((b,), 900),
            encoder_hidden_states=_randn(gen, b, 12, 16),
            pooled_projections=_randn(gen, b, 8),
            encoder_attention_mask=torch.ones(b, 12),
            guidance=torch.full((b,), 3000.0),
        ),
        is_video=True,
        head_dim=10,
    ),
    "cogvideox": TinyModel(
        lambda d: CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=d,
            in_channels=4,
            out_channels=4,
            time_embed_dim=2,
            text_embed_dim=8,
            num_layers=2,
            sample_width=8,
            sample_height=8,
            sample_frames=8,
            patch_size=2,
            patch_size_t=None,
            temporal_compression_ratio=4,
            max_text_seq_length=8,
            use_rotary_positional_embeddings=True,
        ),
        lambda b, s, gen, d: dict(
            hidden_states=_randn(gen, b, 2, 4, 8 * s, 8),
            encoder_hidden_states=_randn(gen, b, 8, 8),
            timestep=torch.full((b,), 900),
            image_rotary_emb=_cogvideox_rope(2, 4 * s, 4, d),
        ),
        is_video=True,
        head_dim=16,
    ),
    "ltx_video": TinyModel(
        lambda d: LTXVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=d,
            cross_attention_dim=2 * d,
            num_layers=1,
            qk_norm="rms_norm_across_heads",
            caption_channels=16,
        ),
        lambda b, s, gen, d: dict(
            hidden_states=_randn(gen, b, 2 * 4 * s * 6, 4),
            encoder_hidden_states=_randn(gen, b, 8, 16),
            timestep=torch.full((b,), 900),
            encoder_attention_mask=torch.ones(b, 8),
            num_frames=2,
            height=4 * s,
            width=6,
        ),
        is_video=True,
        head_dim=8,
    ),
}


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE channels per (frame, row, col) axis summing to ``head_dim``: 16 -> (4, 4, 8) as in diffusers' tests."""
    quarter = head_dim // 4
    return (quarter, quarter, head_dim - 2 * quarter)


def _cogvideox_rope(frames: int, height: int, width: int, head_dim: int):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    return get_3d_rotary_pos_embed(
        head_dim, (0, 0), ((height, width)), frames, grid_type="slice", max_size=(height, width)
    )
