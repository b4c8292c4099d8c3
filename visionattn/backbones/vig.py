"""ViG: plain (non-hierarchical) vision backbones built on bidirectional gated linear attention.

"ViG: Linear-complexity Visual Sequence Learning with Gated Linear Attention", Bencheng Liao, Xinggang Wang,
Lianghui Zhu, Qian Zhang, Chang Huang, AAAI 2025, arXiv 2405.18425.

    @inproceedings{liao2025vig,
      title={ViG: Linear-complexity Visual Sequence Learning with Gated Linear Attention},
      author={Liao, Bencheng and Wang, Xinggang and Zhu, Lianghui and Zhang, Qian and Huang, Chang},
      booktitle={AAAI}, year={2025}
    }

Reference implementation: https://github.com/hustvl/ViG (``classification/models/vig.py``, MIT licence); weights on
the Hugging Face hub at ``hustvl/ViG`` (apache-2.0). Re-implemented for timm: the attention is
``visionattn.nn.GatedLinearAttention2d`` (one code path for training and inference, the reference switched kernels
and scaled the inference output by an extra 1/2 before an RMSNorm), tokens stay ``(B, Y, X, C)`` between blocks, and the
stem, block and MLP are shared with the hierarchical family in ``vig_h.py``. ``checkpoint_filter_fn`` converts
the official checkpoints.
"""

import math
import re
from collections.abc import Callable
from functools import partial

import torch
from timm.layers import (
    ClassifierHead,
    DropPath,
    LayerNorm2d,
    calculate_drop_path_rates,
    register_notrace_function,
    resample_abs_pos_embed,
    to_2tuple,
    trunc_normal_,
)
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint, checkpoint_seq
from torch import nn

from ..layout import TokenGrid
from ..nn import GatedLinearAttention2d, GluMlp, RmsNorm
from ._timm_api import ClassifierHeadMixin, check_output_fmt, create_backbone, imagenet_cfg, init_linear

# token_grid and add_pos_embed are public: torch.fx only autowraps (keeps as leaves) functions whose global name has
# no leading underscore, and both build Python values from shapes.
__all__ = ["ViG", "ViGBlock", "ViGStem", "add_pos_embed", "token_grid"]

#: Total stride of the plain ViG stem (the reference's ``patch_size``).
_PATCH_SIZE = 16
#: eps of every RMSNorm in plain ViG (``GLAConfig.rms_norm_eps``).
_RMS_EPS = 1e-6
#: ``output_fmt`` values of ``forward_intermediates`` (ViG and ViG-H).
_INTERMEDIATE_FMTS = ("NCHW", "NHWC")


@register_notrace_function
def token_grid(x: torch.Tensor) -> TokenGrid:
    """The 2D grid of a ``(B, Y, X, C)`` token map (a leaf under torch.fx, where shapes are symbolic)."""
    return TokenGrid((int(x.shape[1]), int(x.shape[2])))


@register_notrace_function
def add_pos_embed(x: torch.Tensor, pos_embed: torch.Tensor, pos_grid: tuple[int, int]) -> torch.Tensor:
    """Add the learned ``(1, Y0·X0, C)`` position embedding, bicubically resized to the ``(B, Y, X, C)`` grid of ``x``.

    Same resize as the reference's ``resize_pos_embed`` (bicubic, ``align_corners=False``, no antialiasing).
    """
    height, width = int(x.shape[1]), int(x.shape[2])
    pos = resample_abs_pos_embed(pos_embed, (height, width), pos_grid, num_prefix_tokens=0, antialias=False)
    return x + pos.view(1, height, width, -1)


def _swiglu_hidden_dim(dim: int, multiple_of: int) -> int:
    """ViG's SwiGLU width: 2/3 of ``4·dim``, rounded up to a multiple of ``multiple_of`` (256 plain, 32 in ViG-H)."""
    return multiple_of * math.ceil(int(dim * 4 * 2 / 3) / multiple_of)


class ViGStem(nn.Module):
    """Two strided convolutions with a LayerNorm after each and an activation between them; NCHW in, NHWC out.

    Plain ViG's overlapping ``V2PatchEmbed`` (kernels 9/3, strides 8/2, SiLU: stride 16) and ViG-H's stride-4 stem
    (kernels 3/3, strides 2/2, GELU) are both this module.
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_sizes: tuple[int, int],
        strides: tuple[int, int],
        act_layer: Callable[[], nn.Module],
        device=None,
        dtype=None,
    ):
        """
        Args:
            in_chans: image channels.
            out_chans: output channels; the first conv gives ``out_chans // 2``.
            kernel_sizes: kernel of each conv (both padded by 1, as in the reference).
            strides: stride of each conv.
            act_layer: activation between the two convs.
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        mid = out_chans // 2
        self.conv1 = nn.Conv2d(in_chans, mid, kernel_sizes[0], stride=strides[0], padding=1, **dd)
        self.norm1 = LayerNorm2d(mid, eps=1e-5, **dd)
        self.act = act_layer()
        self.conv2 = nn.Conv2d(mid, out_chans, kernel_sizes[1], stride=strides[1], padding=1, **dd)
        self.norm2 = nn.LayerNorm(out_chans, eps=1e-5, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.conv1(x)))
        return self.norm2(self.conv2(x).permute(0, 2, 3, 1))


class ViGBlock(nn.Module):
    """Pre-norm residual block: gated linear attention, then a SwiGLU MLP; ``(B, Y, X, C)`` in and out.

    Plain ViG's ``GLABlock`` (RMSNorm, MLP width rounded to 256) and ViG-H's ``VSSBlock`` (LayerNorm, rounded to 32).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden_dim: int,
        norm_layer: Callable[..., nn.Module],
        conv_act: bool = False,
        out_act: bool = False,
        drop_path: float = 0.0,
        backend: str | None = None,
        device=None,
        dtype=None,
    ):
        """
        Args:
            dim: channels.
            num_heads: attention heads.
            mlp_hidden_dim: SwiGLU width (the fused first projection has twice this many outputs, gate first).
            norm_layer: the two pre-norms, called as ``norm_layer(dim, device=..., dtype=...)``.
            conv_act: SiLU after the attention's depthwise conv.
            out_act: SiLU before the attention's output projection.
            drop_path: stochastic-depth rate of both branches.
            backend: backend of the gated linear attention and SwiGLU ops.
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = norm_layer(dim, **dd)
        self.attn = GatedLinearAttention2d(
            dim, num_heads, conv_act=conv_act, out_act=out_act, norm_eps=_RMS_EPS, backend=backend, **dd
        )
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = GluMlp(
            dim, 2 * mlp_hidden_dim, act_layer=nn.SiLU, bias=False, gate_last=False, backend=backend, **dd
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = token_grid(x)
        x = x + self.drop_path(self.attn(self.norm1(x).flatten(1, 2), grid).view_as(x))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViG(ClassifierHeadMixin, nn.Module):
    """Plain ViG: conv stem (stride 16), learned absolute position embedding, ``depth`` blocks, RMSNorm, avg pool.

    ``forward_features`` returns the normed ``(B, Y, X, C)`` token map (``output_fmt = 'NHWC'``).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_multiple_of: int = 256,
        conv_act: bool = False,
        out_act: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        backend: str | None = None,
        device=None,
        dtype=None,
    ):
        """
        Args:
            img_size: training resolution; fixes the position-embedding grid ``img_size // 16`` (other input sizes
                resize it bicubically on the fly).
            in_chans: image channels.
            num_classes: classifier outputs (0: no classifier).
            global_pool: ``'avg'`` or ``''`` (no pooling).
            embed_dim: channels ``C``.
            depth: number of blocks.
            num_heads: attention heads (head dims ``C/2/H`` for keys, ``C/H`` for values).
            mlp_multiple_of: the SwiGLU width is rounded up to a multiple of this.
            conv_act: SiLU after each attention's depthwise conv (ViG-T).
            out_act: SiLU before each attention's output projection (ViG-T).
            drop_rate: dropout before the classifier.
            pos_drop_rate: dropout after adding the position embedding.
            drop_path_rate: stochastic depth, rising linearly over the blocks to this value.
            backend: backend of the gated linear attention, gated-norm, RMSNorm and SwiGLU ops (None: Triton where
                it applies, else reference).
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        img_size = to_2tuple(img_size)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = embed_dim
        self.output_fmt = "NHWC"
        self.grad_checkpointing = False
        self.pos_grid = (img_size[0] // _PATCH_SIZE, img_size[1] // _PATCH_SIZE)

        self.stem = ViGStem(in_chans, embed_dim, kernel_sizes=(9, 3), strides=(8, 2), act_layer=nn.SiLU, **dd)
        self.pos_embed = nn.Parameter(torch.empty(1, self.pos_grid[0] * self.pos_grid[1], embed_dim, **dd))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        # timm's RmsNorm (same state dict) computed by visionattn's many-rows-per-program kernel where it applies
        norm_layer = partial(RmsNorm, eps=_RMS_EPS, backend=backend)
        mlp_hidden_dim = _swiglu_hidden_dim(embed_dim, mlp_multiple_of)
        self.blocks = nn.Sequential(
            *[
                ViGBlock(
                    embed_dim,
                    num_heads,
                    mlp_hidden_dim,
                    norm_layer,
                    conv_act=conv_act,
                    out_act=out_act,
                    drop_path=rate,
                    backend=backend,
                    **dd,
                )
                for rate in calculate_drop_path_rates(drop_path_rate, depth)
            ]
        )
        self.feature_info = [dict(num_chs=embed_dim, reduction=_PATCH_SIZE, module=f"blocks.{i}") for i in range(depth)]
        self.norm = norm_layer(embed_dim, **dd)
        self.head = ClassifierHead(
            embed_dim, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt="NHWC", **dd
        )
        self.init_weights()

    def init_weights(self) -> None:
        """The reference's init: N(0, 0.02) linears, zero biases, then ViG's own attention init; pos embed trunc-normal."""
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(partial(init_linear, weight_init=nn.init.normal_))
        for module in self.modules():
            if isinstance(module, GatedLinearAttention2d):
                module.reset_parameters()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^stem|^pos_embed",
            blocks=r"^blocks\.(\d+)" if coarse else [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Features after the blocks in ``indices``.

        Args:
            x: ``(B, in_chans, H_img, W_img)`` images.
            indices: block indices to take (None: all; int n: the last n).
            norm: apply the final norm to each taken feature.
            stop_early: skip the blocks after the last taken one.
            output_fmt: ``'NCHW'`` or ``'NHWC'`` for the taken features.
            intermediates_only: return only the list of features.

        Returns:
            The list of ``(B, C, Y, X)`` (or ``(B, Y, X, C)``) features, preceded by ``forward_features(x)`` unless
            ``intermediates_only``.
        """
        check_output_fmt(output_fmt, _INTERMEDIATE_FMTS)
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x = self.pos_drop(add_pos_embed(self.stem(x), self.pos_embed, self.pos_grid))
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[: max_index + 1]
        intermediates = []
        for i, block in enumerate(blocks):
            x = checkpoint(block, x) if self.grad_checkpointing and not torch.jit.is_scripting() else block(x)
            if i in take_indices:
                feat = self.norm(x) if norm else x
                intermediates.append(feat.permute(0, 3, 1, 2) if output_fmt == "NCHW" else feat)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last of ``indices`` (and optionally the final norm and the head)."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_drop(add_pos_embed(self.stem(x), self.pos_embed, self.pos_grid))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _rename(key: str, rules: tuple) -> str:
    for pattern, replacement in rules:
        key = pattern.sub(replacement, key)
    return key


#: Attention parameters, ``GatedLinearAttention`` (vig.py) and ``GLA2D`` (vig_h.py) -> ``GatedLinearAttention2d``.
_ATTENTION_RENAMES = (
    (re.compile(r"\.in_proj\.0\."), ".dwconv."),  # depthwise 3x3 conv (in_proj.1 is the parameter-free SiLU)
    (re.compile(r"\.qkv_proj\."), ".qkv."),
    (re.compile(r"\.gk_proj\."), ".forget_gate."),  # low-rank forget gates, both directions
    (re.compile(r"\.g_proj\."), ".out_gate."),  # locality-injection gate
    (re.compile(r"\.g_norm\."), ".norm_attn."),
    (re.compile(r"\.l_norm\."), ".norm_local."),
    (re.compile(r"\.o_proj\."), ".proj."),
)

#: Official plain-ViG checkpoints (hustvl/ViG ``ViG`` state dict, e.g. ``vig_t_77p2acc.pth``) -> ``ViG``.
_VIG_RENAMES = (
    (re.compile(r"^module\."), ""),  # saved from a DistributedDataParallel wrapper
    (re.compile(r"^patch_embed\.proj\.0\."), "stem.conv1."),
    (re.compile(r"^patch_embed\.proj\.1\."), "stem.norm1."),  # proj.2 is the parameter-free SiLU
    (re.compile(r"^patch_embed\.proj\.3\."), "stem.conv2."),
    (re.compile(r"^patch_embed\.proj\.4\."), "stem.norm2."),
    (re.compile(r"\.attn_norm\."), ".norm1."),
    (re.compile(r"\.mlp_norm\."), ".norm2."),
    (re.compile(r"\.mlp\.gate_proj\."), ".mlp.fc1."),  # fused [gate; value] projection of the SwiGLU
    (re.compile(r"\.mlp\.down_proj\."), ".mlp.fc2."),
    *_ATTENTION_RENAMES,
    (re.compile(r"^head\."), "head.fc."),
)


def checkpoint_filter_fn(state_dict: dict, model: ViG) -> dict:
    """Convert an official hustvl/ViG plain checkpoint (or its ``{'model': ...}`` training wrapper) to ``ViG``.

    The position embedding is resized when ``model`` was built for another ``img_size``.
    """
    state_dict = state_dict.get("model", state_dict)
    if "stem.conv1.weight" in state_dict:
        return state_dict
    out = {}
    for key, value in state_dict.items():
        key = _rename(key, _VIG_RENAMES)
        if key == "pos_embed" and value.shape != model.pos_embed.shape:
            value = resample_abs_pos_embed(value, model.pos_grid, num_prefix_tokens=0, antialias=False)
        out[key] = value
    return out


def _create_vig(variant: str, pretrained: bool = False, **kwargs) -> ViG:
    return create_backbone(ViG, variant, pretrained, checkpoint_filter_fn, 3, **kwargs)


def _cfg(pool_size: tuple[int, int] = (14, 14), **kwargs) -> dict:
    """Pretrained cfg of the hustvl/ViG releases (plain and, with ``pool_size=(7, 7)``, hierarchical)."""
    return imagenet_cfg(
        url="",
        pool_size=pool_size,
        first_conv="stem.conv1",
        classifier="head.fc",
        license="apache-2.0",
        paper_ids="arXiv:2405.18425",
        paper_name="ViG: Linear-complexity Visual Sequence Learning with Gated Linear Attention",
        origin_url="https://github.com/hustvl/ViG",
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {
        "vig_tiny.hustvl_in1k": _cfg(hf_hub_id="hustvl/ViG", hf_hub_filename="vig_t_77p2acc.pth"),
        "vig_small.hustvl_in1k": _cfg(hf_hub_id="hustvl/ViG", hf_hub_filename="vig_s_81p7acc.pth"),
        "vig_base.hustvl_in1k": _cfg(hf_hub_id="hustvl/ViG", hf_hub_filename="vig_b_82p6acc.pth"),
    }
)


@register_model
def vig_tiny(pretrained: bool = False, **kwargs) -> ViG:
    model_args = dict(embed_dim=192, depth=12, num_heads=3, conv_act=True, out_act=True)
    return _create_vig("vig_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vig_small(pretrained: bool = False, **kwargs) -> ViG:
    model_args = dict(embed_dim=384, depth=12, num_heads=6, conv_act=False, out_act=False)
    return _create_vig("vig_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vig_base(pretrained: bool = False, **kwargs) -> ViG:
    model_args = dict(embed_dim=768, depth=12, num_heads=12, conv_act=False, out_act=False)
    return _create_vig("vig_base", pretrained=pretrained, **dict(model_args, **kwargs))
