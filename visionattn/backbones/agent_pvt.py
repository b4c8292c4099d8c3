"""Agent-PVT: PVT (v1) with agent attention in every block (Han et al., ECCV 2024, arXiv 2312.08874).

Reference: LeapLabTHU/Agent-Attention (MIT), ``agent_transformer/models/agent_pvt.py`` with the released configs
(``attn_type='AAAA'``, agents 9-16-49-49, ``agent_sr_ratios='1111'``: agent attention sees full-resolution K/V, so
PVT's spatial reduction never appears). See ``agent.py`` in this package for the paper, BibTeX and weights.

Layout follows timm's ``pvt_v2``: ``stages[i]`` = patch embedding (non-overlapping conv + LayerNorm), position
embedding, blocks. Like the reference there is no final norm: the head pools stage 4 directly. What changed:
position embeddings and agent biases are resampled to any input size (the reference only handled 224),
patch embeddings pad inputs that their stride does not divide, and the attention's ``q``/``kv`` projections are
one ``qkv`` projection (the converter concatenates them).
"""

import re
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, calculate_drop_path_rates, register_notrace_module, to_2tuple, trunc_normal_
from timm.models import checkpoint, generate_default_cfgs, register_model
from torch import nn

from ..layout import TokenGrid
from ..nn import LayerNorm
from ._timm_api import LinearHeadMixin, StagedBackbone, check_global_pool, create_backbone, init_linear
from .agent import AgentBlock, _agent_bias_to_native, _agent_cfg, _unwrap_state_dict

__all__ = ["AgentPvt"]

# official key -> ours (``patch_embed1``/``pos_embed1``/``block1`` are stage 0); q and kv are merged afterwards
_RENAMES = (
    (re.compile(r"^patch_embed(\d)\."), lambda m: f"stages.{int(m[1]) - 1}.patch_embed."),
    (re.compile(r"^pos_embed(\d)$"), lambda m: f"stages.{int(m[1]) - 1}.pos_embed"),
    (re.compile(r"^block(\d)\.(\d+)\."), lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}."),
)
_Q_KEY = re.compile(r"\.attn\.q\.(weight|bias)$")


@register_notrace_module  # builds the TokenGrid from the feature-map shape
class AgentPvtStage(nn.Module):
    """Patch embedding, resampled position embedding and agent-attention blocks; ``NCHW`` in and out."""

    def __init__(
        self,
        in_chs: int,
        dim: int,
        depth: int,
        num_heads: int,
        patch_size: int,
        feat_size: tuple[int, int],
        agent_num: int,
        agent_shape: tuple[int, int] | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        drop_path: list[float] | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.grad_checkpointing = False
        self.feat_size = tuple(feat_size)
        # the reference's PatchEmbed keeps nn.LayerNorm's default eps (1e-5, LayerNorm's too); blocks use 1e-6
        self.patch_embed = PatchEmbed(
            img_size=None,
            patch_size=patch_size,
            in_chans=in_chs,
            embed_dim=dim,
            norm_layer=LayerNorm,
            output_fmt="NHWC",
            strict_img_size=False,
            dynamic_img_pad=True,
            **dd,
        )
        self.pos_embed = nn.Parameter(torch.empty(1, self.feat_size[0] * self.feat_size[1], dim, **dd))
        self.blocks = nn.ModuleList(
            [
                AgentBlock(
                    dim,
                    num_heads,
                    agent_num=agent_num,
                    bias_size=self.feat_size,
                    agent_shape=agent_shape,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop,
                    drop_path=drop_path[i] if drop_path else 0.0,
                    norm_layer=partial(LayerNorm, eps=1e-6),
                    **dd,
                )
                for i in range(depth)
            ]
        )
        trunc_normal_(self.pos_embed, std=0.02)

    def _pos_embed(self, size: tuple[int, int]) -> torch.Tensor:
        if size == self.feat_size:
            return self.pos_embed
        pos = self.pos_embed.reshape(1, *self.feat_size, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=size, mode="bilinear", align_corners=False)
        return pos.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        batch, height, width, channels = x.shape
        x = x.reshape(batch, height * width, channels) + self._pos_embed((height, width))
        grid = TokenGrid((height, width))
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, grid)
            else:
                x = block(x, grid)
        return x.reshape(batch, height, width, channels).permute(0, 3, 1, 2)


class AgentPvt(StagedBackbone, LinearHeadMixin, nn.Module):
    """Agent-PVT: four ``AgentPvtStage`` (strides 4, 8, 16, 32), average pooling, linear head."""

    has_final_norm = False  # like the reference: forward_intermediates ignores norm, prune_norm has nothing to drop

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depths: tuple[int, ...] = (3, 4, 6, 3),
        embed_dims: tuple[int, ...] = (64, 128, 320, 512),
        num_heads: tuple[int, ...] = (1, 2, 5, 8),
        mlp_ratios: tuple[float, ...] = (8, 8, 4, 4),
        agent_nums: tuple[int, ...] = (9, 16, 49, 49),
        agent_shapes: tuple[tuple[int, int] | None, ...] = (None, None, None, None),
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        device=None,
        dtype=None,
    ):
        """
        Args:
            img_size: training input size; sets the stored size of position embeddings and agent biases.
            in_chans: input channels.
            num_classes: classes (0: no classifier).
            global_pool: ``"avg"`` or ``""`` (no pooling).
            depths: blocks per stage.
            embed_dims: channels per stage.
            num_heads: heads per stage.
            mlp_ratios: MLP ratio per stage.
            agent_nums: agents the biases of each stage are stored for.
            agent_shapes: agents per axis at run time per stage (None: ``sqrt(agent_num)`` each).
            qkv_bias: bias in the qkv projections.
            drop_rate: dropout before the classifier.
            proj_drop_rate: dropout after attention/MLP projections.
            drop_path_rate: stochastic depth rate (linear over blocks).
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        check_global_pool(global_pool)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = embed_dims[-1]
        img_size = to_2tuple(img_size)
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stages, self.feature_info = [], []
        in_chs, stride = in_chans, 1
        for i, depth in enumerate(depths):
            patch_size = 4 if i == 0 else 2
            stride *= patch_size
            stages.append(
                AgentPvtStage(
                    in_chs,
                    embed_dims[i],
                    depth,
                    num_heads[i],
                    patch_size=patch_size,
                    feat_size=(img_size[0] // stride, img_size[1] // stride),
                    agent_num=agent_nums[i],
                    agent_shape=agent_shapes[i],
                    mlp_ratio=mlp_ratios[i],
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate,
                    drop_path=dpr[i],
                    **dd,
                )
            )
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=stride, module=f"stages.{i}"))
            in_chs = embed_dims[i]
        self.stages = nn.Sequential(*stages)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.apply(partial(init_linear, weight_init=trunc_normal_))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # the reference decays every >1-D parameter (its list names only a cls token it does not have)
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stages\.0\.patch_embed", blocks=r"^stages\.(\d+)")

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return x  # each stage starts with its own patch embedding

    def _forward_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x  # no final norm: the head pools stage 4 directly

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict, model: AgentPvt) -> dict:
    """Official Agent-PVT checkpoints (``{"model": ...}``, ``patch_embed1``/``block1.0.attn.q``...) -> this model."""
    state_dict = _unwrap_state_dict(state_dict)
    if "stages.0.pos_embed" in state_dict:
        return state_dict
    renamed = {}
    for k, v in state_dict.items():
        for pattern, repl in _RENAMES:
            k = pattern.sub(repl, k)
        renamed[k] = _agent_bias_to_native(k, v)
    out = {}
    for k, v in renamed.items():
        if _Q_KEY.search(k):  # q (C) and kv (2C) projections -> one qkv (3C) projection
            kv = renamed[k.replace(".attn.q.", ".attn.kv.")]
            out[k.replace(".attn.q.", ".attn.qkv.")] = torch.cat([v, kv], dim=0)
        elif ".attn.kv." not in k:
            out[k] = v
    return out


def _create_agent_pvt(variant: str, pretrained: bool = False, **kwargs) -> AgentPvt:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return create_backbone(AgentPvt, variant, pretrained, checkpoint_filter_fn, out_indices, **kwargs)


def _cfg(url: str = "", **kwargs) -> dict:
    return _agent_cfg(url, first_conv="stages.0.patch_embed.proj", **kwargs)


default_cfgs = generate_default_cfgs(
    {
        "agent_pvt_tiny.in1k": _cfg(notes=("official weights: https://cloud.tsinghua.edu.cn/f/13fdf0e0a7c5498c934f/",)),
        "agent_pvt_small.in1k": _cfg(
            notes=("official weights: https://cloud.tsinghua.edu.cn/f/36b8be9a8863456685a3/",)
        ),
        "agent_pvt_medium.in1k": _cfg(
            notes=("official weights: https://cloud.tsinghua.edu.cn/f/4d00ecacf18b45f9b88c/",)
        ),
        # fine-tuned at 256 (cfgs/agent_pvt_m_256.yaml); fixed_input_size: timm passes img_size=256 to the model
        "agent_pvt_medium.in1k_256": _cfg(
            input_size=(3, 256, 256),
            pool_size=(8, 8),
            fixed_input_size=True,
            notes=("official weights: https://cloud.tsinghua.edu.cn/f/654df734121643b19c52/",),
        ),
        "agent_pvt_large.in1k": _cfg(
            notes=("official weights: https://cloud.tsinghua.edu.cn/f/040cfe0cfbbe4762ad09/",)
        ),
    }
)


@register_model
def agent_pvt_tiny(pretrained: bool = False, **kwargs) -> AgentPvt:
    model_args = dict(depths=(2, 2, 2, 2), agent_nums=(9, 16, 49, 49))
    return _create_agent_pvt("agent_pvt_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_pvt_small(pretrained: bool = False, **kwargs) -> AgentPvt:
    model_args = dict(depths=(3, 4, 6, 3), agent_nums=(9, 16, 49, 49))
    return _create_agent_pvt("agent_pvt_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_pvt_medium(pretrained: bool = False, **kwargs) -> AgentPvt:
    model_args = dict(depths=(3, 4, 18, 3), agent_nums=(9, 16, 49, 49))
    return _create_agent_pvt("agent_pvt_medium", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_pvt_large(pretrained: bool = False, **kwargs) -> AgentPvt:
    model_args = dict(depths=(3, 8, 27, 3), agent_nums=(9, 16, 49, 49))
    return _create_agent_pvt("agent_pvt_large", pretrained=pretrained, **dict(model_args, **kwargs))
