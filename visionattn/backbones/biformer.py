"""BiFormer: Vision Transformer with Bi-Level Routing Attention.

Paper: Zhu, Wang, Ke, Zhang, Lau, "BiFormer: Vision Transformer with Bi-Level Routing Attention", CVPR 2023,
arXiv 2303.08810::

    @inproceedings{zhu2023biformer,
      title={BiFormer: Vision Transformer with Bi-Level Routing Attention},
      author={Zhu, Lei and Wang, Xinjiang and Ke, Zhanghan and Zhang, Wayne and Lau, Rynson},
      booktitle={IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)}, year={2023}}

Reference code: github.com/rayleizhu/BiFormer (MIT licence), ``models/biformer.py`` with ``ops/bra_legacy.py`` (the
attention of the released checkpoints). Official ImageNet-1k weights are OneDrive links in ``model_urls`` of that
file (not on the Hugging Face hub): load them with ``pretrained=True, pretrained_cfg_overlay=dict(file=<.pth>)``.

Architecture as released: 2-conv stem, Conv3x3-s2+BN downsampling, blocks of CPE (DWConv3x3) -> LN -> attention ->
LN -> MLP (ratio 3), BatchNorm + average pooling + linear head. Stages 1-3 use bi-level routing attention over
7x7 regions with top-k 1/4/16 (so 64 tokens per query at 224), stage 4 full attention with LePE; the reference's
quirks are kept (attention scale over the full channel dim, stage 4 always 8 heads, LePE of the input there).
What changed: the routed attention runs as block-sparse attention without the top-k-fold K/V gather, maps that
``n_win`` does not divide are padded (the reference's ``auto_pad``, used by its dense-prediction backbones)
instead of rejected, and the layout follows timm (``stem``, ``stages[i].downsample``, ``stages[i].blocks``).
"""

import re
from functools import partial

import torch
from timm.layers import DropPath, Mlp, calculate_drop_path_rates, register_notrace_module
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from torch import nn

from ..layout import TokenGrid
from ..nn import BiLevelRoutingAttention, LayerNorm, LePEAttention
from ._timm_api import (
    LinearHeadMixin,
    StagedBackbone,
    check_global_pool,
    create_backbone,
    imagenet_cfg,
    init_linear,
    stage_group_matcher,
)

__all__ = ["BiFormer"]

#: ``topk`` value that selects full attention with LePE (the reference's ``topk=-2`` code).
_FULL_ATTENTION = -2

# official key -> ours
_RENAMES = (
    (re.compile(r"^downsample_layers\.0\."), "stem."),
    (re.compile(r"^downsample_layers\.(\d)\."), r"stages.\1.downsample."),
    (re.compile(r"^stages\.(\d)\.(\d+)\."), r"stages.\1.blocks.\2."),
    (re.compile(r"\.attn\.qkv\.qkv\."), ".attn.qkv."),  # bra_legacy's QKVLinear wrapper
    (re.compile(r"\.attn\.wo\."), ".attn.proj."),
    (re.compile(r"\.mlp\.0\."), ".mlp.fc1."),  # Sequential(Linear, Identity, GELU, Linear)
    (re.compile(r"\.mlp\.3\."), ".mlp.fc2."),
)


@register_notrace_module  # builds the TokenGrid from the feature-map shape
class BiFormerBlock(nn.Module):
    """CPE, then pre-norm routing (or full) attention and MLP; ``NCHW`` in and out."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        topk: int,
        n_win: int = 7,
        mlp_ratio: float = 3.0,
        drop_path: float = 0.0,
        backend: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.pos_embed = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, **dd)
        # eps 1e-6: "important to avoid attention collapsing" (reference comment)
        self.norm1 = LayerNorm(dim, eps=1e-6, **dd)
        if topk == _FULL_ATTENTION:
            self.attn = LePEAttention(dim, num_heads=num_heads, **dd)
        else:
            self.attn = BiLevelRoutingAttention(dim, num_heads=num_heads, n_win=n_win, topk=topk, backend=backend, **dd)
        self.norm2 = LayerNorm(dim, eps=1e-6, **dd)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        batch, channels, height, width = x.shape
        grid = TokenGrid((height, width))
        t = x.flatten(2).transpose(1, 2)
        t = t + self.drop_path(self.attn(self.norm1(t), grid))
        t = t + self.drop_path(self.mlp(self.norm2(t)))
        return t.reshape(batch, height, width, channels).permute(0, 3, 1, 2)  # channels_last: no copy


class BiFormerStage(nn.Module):
    """Optional Conv3x3-s2 + BN downsampling, then ``BiFormerBlock``s; ``NCHW`` in and out."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        topk: int,
        downsample: bool,
        n_win: int = 7,
        mlp_ratio: float = 3.0,
        drop_path: list[float] | None = None,
        backend: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.grad_checkpointing = False
        if downsample:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_dim, dim, kernel_size=3, stride=2, padding=1, **dd), nn.BatchNorm2d(dim, **dd)
            )
        else:
            self.downsample = nn.Identity()
        drop_path = drop_path or [0.0] * depth
        self.blocks = nn.Sequential(
            *[
                BiFormerBlock(
                    dim,
                    num_heads,
                    topk,
                    n_win=n_win,
                    mlp_ratio=mlp_ratio,
                    drop_path=drop_path[i],
                    backend=backend,
                    **dd,
                )
                for i in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class BiFormer(StagedBackbone, LinearHeadMixin, nn.Module):
    """BiFormer: stem (stride 4), four ``BiFormerStage`` (strides 4-32), BatchNorm, average pooling, linear head."""

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depths: tuple[int, ...] = (2, 2, 8, 2),
        embed_dims: tuple[int, ...] = (64, 128, 256, 512),
        num_heads: tuple[int, ...] = (2, 4, 8, 8),
        topks: tuple[int, ...] = (1, 4, 16, _FULL_ATTENTION),
        n_win: int = 7,
        mlp_ratio: float = 3.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        backend: str | None = None,
        device=None,
        dtype=None,
    ):
        """
        Args:
            in_chans: input channels.
            num_classes: classes (0: no classifier).
            global_pool: ``"avg"`` or ``""`` (no pooling).
            depths: blocks per stage.
            embed_dims: channels per stage.
            num_heads: heads per stage (routing stages: ``dim / 32``; the full-attention stage: 8 as released).
            topks: routed regions per stage; ``_FULL_ATTENTION`` (-2) for full attention with LePE.
            n_win: regions per side of the routing stages (7 for ImageNet; 16/8 in the reference's dense configs).
            mlp_ratio: MLP ratio.
            drop_rate: dropout before the classifier.
            drop_path_rate: stochastic depth rate (linear over blocks).
            backend: ``block_sparse_attention`` backend of the routing stages (None: Triton on CUDA, else the
                reference).
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        check_global_pool(global_pool)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = embed_dims[-1]
        half = embed_dims[0] // 2
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, half, kernel_size=3, stride=2, padding=1, **dd),
            nn.BatchNorm2d(half, **dd),
            nn.GELU(),
            nn.Conv2d(half, embed_dims[0], kernel_size=3, stride=2, padding=1, **dd),
            nn.BatchNorm2d(embed_dims[0], **dd),
        )
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stages, self.feature_info = [], []
        for i, depth in enumerate(depths):
            stages.append(
                BiFormerStage(
                    embed_dims[max(i - 1, 0)],
                    embed_dims[i],
                    depth,
                    num_heads[i],
                    topks[i],
                    downsample=i > 0,
                    n_win=n_win,
                    mlp_ratio=mlp_ratio,
                    drop_path=dpr[i],
                    backend=backend,
                    **dd,
                )
            )
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(self.num_features, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.apply(partial(init_linear, weight_init=nn.init.trunc_normal_))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # the reference names only parameters it does not have (pos_embed, cls_token): everything >1-D decays
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return stage_group_matcher(coarse, stem=r"^stem", final=r"^norm")

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        # channels_last maps: each block's (B, N, C) token view of its NCHW map is then contiguous, no copies
        return self.stem(x.contiguous(memory_format=torch.channels_last))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.stages(self._forward_stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict, model: BiFormer) -> dict:
    """Official BiFormer checkpoints (``{"model": ...}``, ``downsample_layers``/``stages.i.j``) -> this model."""
    if "model" in state_dict:
        state_dict = state_dict["model"]
    if "stem.0.weight" in state_dict:
        return state_dict
    out = {}
    for k, v in state_dict.items():
        for pattern, repl in _RENAMES:
            k = pattern.sub(repl, k)
        out[k] = v
    return out


def _create_biformer(variant: str, pretrained: bool = False, **kwargs) -> BiFormer:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return create_backbone(BiFormer, variant, pretrained, checkpoint_filter_fn, out_indices, **kwargs)


def _cfg(url: str = "", **kwargs) -> dict:
    return imagenet_cfg(
        url=url,
        pool_size=(7, 7),
        first_conv="stem.0",
        classifier="head",
        license="mit",
        paper_ids="arXiv:2303.08810",
        paper_name="BiFormer: Vision Transformer with Bi-Level Routing Attention",
        origin_url="https://github.com/rayleizhu/BiFormer",
        **kwargs,
    )


_ONEDRIVE = "https://api.onedrive.com/v1.0/shares/s!{}/root/content"
default_cfgs = generate_default_cfgs(
    {
        "biformer_tiny.in1k": _cfg(notes=("official weights: " + _ONEDRIVE.format("AkBbczdRlZvChHEOoGkgwgQzEDlM"),)),
        "biformer_small.in1k": _cfg(notes=("official weights: " + _ONEDRIVE.format("AkBbczdRlZvChHDyM-x9KWRBZ832"),)),
        "biformer_base.in1k": _cfg(notes=("official weights: " + _ONEDRIVE.format("AkBbczdRlZvChHI_XPhoadjaNxtO"),)),
    }
)


@register_model
def biformer_tiny(pretrained: bool = False, **kwargs) -> BiFormer:
    model_args = dict(depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 8), topks=(1, 4, 16, -2))
    return _create_biformer("biformer_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_small(pretrained: bool = False, **kwargs) -> BiFormer:
    model_args = dict(
        depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 8), topks=(1, 4, 16, -2)
    )
    return _create_biformer("biformer_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_base(pretrained: bool = False, **kwargs) -> BiFormer:
    model_args = dict(
        depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 8), topks=(1, 4, 16, -2)
    )
    return _create_biformer("biformer_base", pretrained=pretrained, **dict(model_args, **kwargs))
