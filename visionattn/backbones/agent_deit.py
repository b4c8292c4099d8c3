"""Agent-DeiT: DeiT with agent attention (Han et al., ECCV 2024, arXiv 2312.08874).

Reference: LeapLabTHU/Agent-Attention (MIT), ``agent_transformer/models/agent_deit.py``. See ``agent.py`` in this
package for the paper, BibTeX and where the official weights live.

Built on timm's ``VisionTransformer``: every DeiT piece (patch embedding, cls token, position embedding, softmax
blocks, head, pooling, ``set_input_size``) is timm's; the first ``agent_depth`` blocks use agent attention (all 12
for tiny/small, the first 4 for base, as released). What changed from the reference: the agent biases, stored
for the 14x14 training grid, are resampled to any grid and agent count (the reference asserted a square 224 input),
the position embedding is resampled per input (``dynamic_img_size``), and inputs the patch size does not divide
are zero-padded at the bottom/right (``dynamic_img_pad``).
"""

from functools import partial

import torch
from timm.layers import resample_abs_pos_embed, to_2tuple
from timm.models import checkpoint, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ..layout import TokenGrid
from ..nn import LayerNorm
from ._timm_api import create_backbone
from .agent import AgentBlock, _agent_bias_to_native, _agent_cfg, _unwrap_state_dict

__all__ = ["AgentVisionTransformer"]


@torch.fx.wrap  # builds Python data from the feature-map shape: a leaf call under FX
def _token_grid(x: torch.Tensor, num_prefix_tokens: int) -> TokenGrid:
    return TokenGrid((x.shape[1], x.shape[2]), extra_before=num_prefix_tokens)


@torch.fx.wrap  # resamples to the input's grid: a leaf call under FX
def _add_pos_embed(
    x: torch.Tensor, cls_token: torch.Tensor, pos_embed: torch.Tensor, old_size: tuple[int, int]
) -> torch.Tensor:
    """Prepend the cls token and add the position embedding resampled to ``x``'s grid: ``(B, Y, X, C)`` ->
    ``(B, 1 + Y*X, C)`` (timm's ``dynamic_img_size`` rule)."""
    batch, height, width, channels = x.shape
    pos = resample_abs_pos_embed(pos_embed, new_size=(height, width), old_size=old_size, num_prefix_tokens=1)
    return torch.cat([cls_token.expand(batch, -1, -1), x.reshape(batch, -1, channels)], dim=1) + pos


def _deit_block(
    *,
    depth: int,
    agent_depth: int,
    agent_num: int,
    bias_size: tuple[int, int],
    agent_shape: tuple[int, int] | None,
    **block_kwargs,
) -> nn.Module:
    """timm's ``block_fn``: block ``depth`` is an ``AgentBlock`` below ``agent_depth``, else timm's ``Block``."""
    if depth >= agent_depth:
        return Block(depth=depth, **block_kwargs)
    kw = block_kwargs
    return AgentBlock(
        kw["dim"],
        kw["num_heads"],
        agent_num=agent_num,
        bias_size=bias_size,
        agent_shape=agent_shape,
        num_prefix_tokens=1,
        mlp_ratio=kw["mlp_ratio"],
        qkv_bias=kw["qkv_bias"],
        proj_drop=kw["proj_drop"],
        drop_path=kw["drop_path"],
        norm_layer=kw["norm_layer"],
        act_layer=kw["act_layer"],
        device=kw["device"],
        dtype=kw["dtype"],
    )


class AgentVisionTransformer(VisionTransformer):
    """DeiT whose first ``agent_depth`` blocks use agent attention with the cls token (Agent-DeiT)."""

    def __init__(
        self,
        agent_num: int = 49,
        agent_depth: int | None = None,
        agent_shape: tuple[int, int] | None = None,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        depth: int = 12,
        dynamic_img_pad: bool = True,
        **kwargs,
    ):
        """
        Args:
            agent_num: agents the agent biases are stored for (49 for tiny/small, 81 for base).
            agent_depth: how many leading blocks use agent attention (None: all).
            agent_shape: agents per axis at run time (None: ``sqrt(agent_num)`` each).
            img_size: training input size; sets the stored size of the position embedding and agent biases.
            patch_size: patch size.
            depth: number of blocks.
            dynamic_img_pad: zero-pad inputs the patch size does not divide (bottom/right, timm's rule); False
                makes such inputs an error, as in timm's ViT.
            **kwargs: the rest of timm's ``VisionTransformer`` arguments (``embed_dim``, ``num_heads``, ...);
                ``norm_layer`` defaults to visionattn's ``LayerNorm`` with timm's eps (1e-6).
        """
        kwargs.setdefault("norm_layer", partial(LayerNorm, eps=1e-6))
        bias_size = tuple(s // patch_size for s in to_2tuple(img_size))
        block_fn = partial(
            _deit_block,
            agent_depth=depth if agent_depth is None else agent_depth,
            agent_num=agent_num,
            bias_size=bias_size,
            agent_shape=agent_shape,
        )
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            depth=depth,
            block_fn=block_fn,
            dynamic_img_size=True,
            dynamic_img_pad=dynamic_img_pad,
            **kwargs,
        )

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, TokenGrid]:
        x = self.patch_embed(x)
        grid = _token_grid(x, self.num_prefix_tokens)
        x = self.pos_drop(_add_pos_embed(x, self.cls_token, self.pos_embed, self.patch_embed.grid_size))
        return self.norm_pre(self.patch_drop(x)), grid

    def _block(self, block: nn.Module, x: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
        args = (x, grid) if isinstance(block, AgentBlock) else (x,)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(block, *args)
        return block(*args)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Features of the blocks in ``indices`` (``NCHW`` or ``NLC``), and the final normed tokens.

        Args:
            x: images ``(B, C, H, W)``.
            indices: last n blocks if int, all if None, else the block indices to take.
            return_prefix_tokens: return ``(spatial, cls)`` pairs.
            norm: apply the final norm to the intermediates.
            stop_early: stop after the last requested block.
            output_fmt: ``"NCHW"`` or ``"NLC"``.
            intermediates_only: return only the intermediates.

        Returns:
            The intermediates, or ``(final_features, intermediates)``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC'; got {output_fmt=}.")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        batch = x.shape[0]
        x, grid = self._embed(x)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            x = self._block(block, x, grid)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        prefix_tokens = [y[:, : self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens :] for y in intermediates]
        if output_fmt == "NCHW":
            height, width = grid.shape
            intermediates = [y.reshape(batch, height, width, -1).permute(0, 3, 1, 2) for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, grid = self._embed(x)
        for block in self.blocks:
            x = self._block(block, x, grid)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict, model: AgentVisionTransformer) -> dict:
    """Official Agent-DeiT checkpoints (``{"model": ...}``, timm-0.4 DeiT names) -> this model."""
    state_dict = _unwrap_state_dict(state_dict)
    out = {}
    for k, v in state_dict.items():
        if k == "pos_embed" and v.shape != model.pos_embed.shape:
            # a checkpoint trained at another resolution (e.g. the 448 Agent-DeiT-S)
            v = resample_abs_pos_embed(v, new_size=model.patch_embed.grid_size, num_prefix_tokens=1)
        out[k] = _agent_bias_to_native(k, v)
    return out


def _create_agent_deit(variant: str, pretrained: bool = False, **kwargs) -> AgentVisionTransformer:
    out_indices = kwargs.pop("out_indices", 3)
    return create_backbone(AgentVisionTransformer, variant, pretrained, checkpoint_filter_fn, out_indices, **kwargs)


def _cfg(url: str = "", **kwargs) -> dict:
    return _agent_cfg(url, pool_size=None, **kwargs)


default_cfgs = generate_default_cfgs(
    {
        "agent_deit_tiny.in1k": _cfg(
            notes=("official weights: https://cloud.tsinghua.edu.cn/f/57e0904221824ee7b7af/",)
        ),
        "agent_deit_small.in1k": _cfg(
            notes=("official weights: https://cloud.tsinghua.edu.cn/f/fdd43304372541db8ea7/",)
        ),
        # fine-tuned at 448 (cfgs/agent_deit_s_448.yaml); fixed_input_size: timm passes img_size=448 to the model,
        # which sizes the position embedding (28x28 + cls) and the agent biases from it
        "agent_deit_small.in1k_448": _cfg(
            input_size=(3, 448, 448),
            fixed_input_size=True,
            notes=("official weights: https://cloud.tsinghua.edu.cn/f/a228f86241c445f1969b/",),
        ),
        "agent_deit_base.in1k": _cfg(
            notes=("official weights: https://cloud.tsinghua.edu.cn/f/5115f15fdd7e4ab58fbc/",)
        ),
    }
)


@register_model
def agent_deit_tiny(pretrained: bool = False, **kwargs) -> AgentVisionTransformer:
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, agent_num=49, agent_depth=12)
    return _create_agent_deit("agent_deit_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_deit_small(pretrained: bool = False, **kwargs) -> AgentVisionTransformer:
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, agent_num=49, agent_depth=12)
    return _create_agent_deit("agent_deit_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_deit_base(pretrained: bool = False, **kwargs) -> AgentVisionTransformer:
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, agent_num=81, agent_depth=4)
    return _create_agent_deit("agent_deit_base", pretrained=pretrained, **dict(model_args, **kwargs))
