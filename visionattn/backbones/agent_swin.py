"""Agent-Swin: Swin Transformer with agent attention in its first blocks (Han et al., ECCV 2024, arXiv 2312.08874).

Reference: LeapLabTHU/Agent-Attention (MIT), ``agent_transformer/models/agent_swin.py`` with the released configs
``cfgs/agent_swin_{t,s,b}.yaml`` (``WINDOW_SIZE: 56``, ``ATTN_TYPE`` AAAB / AABB / AAMB2, agents 9-16-49-49). See
``agent.py`` in this package for the paper, BibTeX and weights.

An A-type block's window (56) covers the whole stage map at 224, so agent attention is global over the stage;
B-type blocks are timm's ``SwinTransformerBlock`` (7x7 shifted windows with relative position bias, the
reference's ``max(7, 56 // 8)``). The per-stage ``agent_blocks`` tuple says how many leading blocks of each stage
are A-type (AAAB = (2, 2, 6, 0) for tiny; AAMB2 = (2, 2, 2, 0) for base). Layout and API follow timm's
``swin_transformer`` (``layers[i]`` starts with its patch merging, ``NHWC`` features, ``head.fc``). What changed:
agent biases are resampled to any input size and agent count, shift masks are built per input size, and inputs
the patch size does not divide are padded (the reference asserted 224).
"""

import re
from functools import partial

import torch
from timm.layers import ClassifierHead, PatchEmbed, calculate_drop_path_rates, register_notrace_module
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock
from torch import nn

from ..layout import TokenGrid
from ..nn import LayerNorm
from ._timm_api import ClassifierHeadMixin, StagedBackbone, create_backbone, init_linear, stage_group_matcher
from .agent import AgentBlock, _agent_bias_to_native, _agent_cfg, _unwrap_state_dict

__all__ = ["AgentSwinTransformer"]

# the reference merges patches at the end of stage i, timm at the start of stage i + 1
_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample")


@register_notrace_module  # builds the TokenGrid from the feature-map shape
class AgentSwinBlock(AgentBlock):
    """``AgentBlock`` on an ``NHWC`` feature map (the whole map is one agent-attention window)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        out = super().forward(x.reshape(batch, height * width, channels), TokenGrid((height, width)))
        return out.reshape(batch, height, width, channels)


@register_notrace_module  # timm's shifted-window blocks build their masks from the input shape (dynamic_mask)
class AgentSwinStage(nn.Module):
    """Optional patch merging, then ``agent_blocks`` agent blocks and Swin window blocks; ``NHWC`` in and out."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        feat_size: tuple[int, int],
        depth: int,
        agent_blocks: int,
        downsample: bool,
        num_heads: int,
        window_size: int,
        agent_num: int,
        agent_shape: tuple[int, int] | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: list[float] | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.grad_checkpointing = False
        self.downsample = PatchMerging(dim, out_dim, norm_layer=LayerNorm, **dd) if downsample else nn.Identity()
        drop_path = drop_path or [0.0] * depth
        blocks = []
        for i in range(depth):
            if i < agent_blocks:
                block = AgentSwinBlock(
                    out_dim,
                    num_heads,
                    agent_num=agent_num,
                    bias_size=feat_size,
                    agent_shape=agent_shape,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop,
                    drop_path=drop_path[i],
                    **dd,
                )
            else:
                block = SwinTransformerBlock(
                    out_dim,
                    input_resolution=feat_size,
                    num_heads=num_heads,
                    window_size=window_size,
                    shift_size=0 if i % 2 == 0 else window_size // 2,
                    dynamic_mask=True,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop,
                    attn_drop=attn_drop,
                    drop_path=drop_path[i],
                    norm_layer=LayerNorm,
                    **dd,
                )
            blocks.append(block)
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class AgentSwinTransformer(StagedBackbone, ClassifierHeadMixin, nn.Module):
    """Agent-Swin: patch embedding, four ``AgentSwinStage`` (strides 4-32), LayerNorm, pooled linear head."""

    stages_attr = "layers"  # Swin's name, kept for the official checkpoints
    output_fmt = "NHWC"

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        agent_blocks: tuple[int, ...] = (2, 2, 6, 0),
        agent_nums: tuple[int, ...] = (9, 16, 49, 49),
        agent_shapes: tuple[tuple[int, int] | None, ...] = (None, None, None, None),
        window_size: int | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        device=None,
        dtype=None,
    ):
        """
        Args:
            img_size: training input size; sets the stored size of the agent biases.
            patch_size: patch size of the stem.
            in_chans: input channels.
            num_classes: classes (0: no classifier).
            global_pool: timm pooling type (``"avg"``, ``""``, ...).
            embed_dim: channels of stage 1 (doubling per stage).
            depths: blocks per stage.
            num_heads: heads per stage.
            agent_blocks: leading blocks per stage that use agent attention (the rest: Swin window attention).
            agent_nums: agents the biases of each stage are stored for.
            agent_shapes: agents per axis at run time per stage (None: ``sqrt(agent_num)`` each).
            window_size: window of the Swin blocks (None: the reference's ``max(7, (img_size / patch_size) // 8)``:
                7 at 224, 9 at 288, 12 at 384).
            mlp_ratio: MLP ratio.
            qkv_bias: bias in the qkv projections.
            drop_rate: dropout before the classifier.
            proj_drop_rate: dropout after attention/MLP projections.
            attn_drop_rate: attention dropout of the Swin blocks.
            drop_path_rate: stochastic depth rate (linear over blocks; the released recipes use 0.2/0.3/0.5).
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.num_features = self.head_hidden_size = dims[-1]
        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            norm_layer=LayerNorm,
            strict_img_size=False,
            output_fmt="NHWC",
            dynamic_img_pad=True,
            **dd,
        )
        grid = self.patch_embed.grid_size
        if window_size is None:
            window_size = max(7, min(grid) // 8)
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stages, self.feature_info = [], []
        for i, depth in enumerate(depths):
            scale = 2**i
            stages.append(
                AgentSwinStage(
                    dims[max(i - 1, 0)],
                    dims[i],
                    feat_size=(grid[0] // scale, grid[1] // scale),
                    depth=depth,
                    agent_blocks=agent_blocks[i],
                    downsample=i > 0,
                    num_heads=num_heads[i],
                    window_size=window_size,
                    agent_num=agent_nums[i],
                    agent_shape=agent_shapes[i],
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i],
                    **dd,
                )
            )
            self.feature_info.append(dict(num_chs=dims[i], reduction=patch_size * scale, module=f"layers.{i}"))
        self.layers = nn.Sequential(*stages)
        self.norm = LayerNorm(self.num_features, **dd)
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt="NHWC", **dd
        )
        self.apply(partial(init_linear, weight_init=nn.init.trunc_normal_))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"*.relative_position_bias_table"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return stage_group_matcher(coarse, stem=r"^patch_embed", final=r"^norm", stages="layers", blocks=r"\w+")

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layers(self.patch_embed(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict, model: AgentSwinTransformer) -> dict:
    """Official Agent-Swin checkpoints (``{"model": ...}``, Swin's original layout) -> this model."""
    state_dict = _unwrap_state_dict(state_dict)
    if "head.fc.weight" in state_dict or "layers.0.downsample.reduction.weight" not in state_dict:
        return state_dict
    out = {}
    for k, v in state_dict.items():
        if k.endswith(("relative_position_index", "attn_mask")):
            continue  # buffers rebuilt by the model
        k = _DOWNSAMPLE.sub(lambda m: f"layers.{int(m[1]) + 1}.downsample", k)
        k = k.replace("head.", "head.fc.", 1) if k.startswith("head.") else k
        out[k] = _agent_bias_to_native(k, v)
    return out


def _create_agent_swin(variant: str, pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return create_backbone(AgentSwinTransformer, variant, pretrained, checkpoint_filter_fn, out_indices, **kwargs)


def _cfg(url: str = "", **kwargs) -> dict:
    return _agent_cfg(url, classifier="head.fc", **kwargs)


default_cfgs = generate_default_cfgs(
    {
        "agent_swin_tiny.in1k": _cfg(
            notes=("official weights: https://cloud.tsinghua.edu.cn/f/a2ddc1190c224f768a41/",)
        ),
        "agent_swin_small.in1k": _cfg(
            notes=("official weights: https://cloud.tsinghua.edu.cn/f/f607172c9fea4d6e99bb/",)
        ),
        "agent_swin_base.in1k": _cfg(
            notes=("official weights: https://cloud.tsinghua.edu.cn/f/4fcd2d0114bb490483c3/",)
        ),
        # fine-tuned at 288/384 (cfgs/agent_swin_{s_288,b_384}.yaml: Swin windows 9/12, evaluated resized to the
        # input without a crop); fixed_input_size: timm passes img_size to the model, which sizes the agent biases
        # and the windows from it
        "agent_swin_small.in1k_288": _cfg(
            input_size=(3, 288, 288),
            pool_size=(9, 9),
            crop_pct=1.0,
            crop_mode="squash",
            fixed_input_size=True,
            notes=("official weights: https://cloud.tsinghua.edu.cn/f/09760394e93b4046a25e/",),
        ),
        "agent_swin_base.in1k_384": _cfg(
            input_size=(3, 384, 384),
            pool_size=(12, 12),
            crop_pct=1.0,
            crop_mode="squash",
            fixed_input_size=True,
            notes=("official weights: https://cloud.tsinghua.edu.cn/f/bb84ee9058954706a557/",),
        ),
    }
)


@register_model
def agent_swin_tiny(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    model_args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), agent_blocks=(2, 2, 6, 0))
    return _create_agent_swin("agent_swin_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_swin_small(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    model_args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), agent_blocks=(2, 2, 0, 0))
    return _create_agent_swin("agent_swin_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_swin_base(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    model_args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), agent_blocks=(2, 2, 2, 0))
    return _create_agent_swin("agent_swin_base", pretrained=pretrained, **dict(model_args, **kwargs))
