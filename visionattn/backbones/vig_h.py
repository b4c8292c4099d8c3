"""ViG-H: hierarchical (4-stage) vision backbones built on bidirectional gated linear attention.

"ViG: Linear-complexity Visual Sequence Learning with Gated Linear Attention", Bencheng Liao, Xinggang Wang,
Lianghui Zhu, Qian Zhang, Chang Huang, AAAI 2025, arXiv 2405.18425 (BibTeX in ``vig.py``).

Reference implementation: https://github.com/hustvl/ViG (``classification/models/vig_h.py``, ``HierViG`` with
``norm_layer='ln2d'``, ``downsample_version='v3'``, ``patchembed_version='v2'``, ``gmlp=True``; MIT licence); weights
on the Hugging Face hub at ``hustvl/ViG`` (apache-2.0). Re-implemented for timm: tokens stay ``(B, Y, X, C)`` so the
reference's LayerNorm2d is a LayerNorm over the last axis (same math and parameters), each stage downsamples at its
start (the reference downsampled at the end of the previous stage, so ``feature_info`` points at stage outputs
before downsampling, as its ``Backbone_HierViG`` did), and the stem, block and attention are shared with ``vig.py``.
The reference's per-stage kernel choice (chunked / recurrent) is a backend detail of the op here.
"""

import re
from functools import partial

import torch
from timm.layers import ClassifierHead, calculate_drop_path_rates, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint_seq
from torch import nn

from ..nn import LayerNorm
from ._timm_api import ClassifierHeadMixin, StagedBackbone, create_backbone, init_linear, stage_group_matcher
from .vig import _ATTENTION_RENAMES, _INTERMEDIATE_FMTS, ViGBlock, ViGStem, _rename, _swiglu_hidden_dim
from .vig import _cfg as _vig_cfg

__all__ = ["HierViG", "HierViGDownsample", "HierViGStage"]

#: Total stride of the ViG-H stem (the reference's ``patch_size``).
_STEM_STRIDE = 4


class HierViGDownsample(nn.Module):
    """The reference's ``downsample_version='v3'``: 3x3 conv with stride 2, then LayerNorm; ``(B, Y, X, C)`` in and out."""

    def __init__(self, dim: int, out_dim: int, device=None, dtype=None):
        """
        Args:
            dim: input channels.
            out_dim: output channels.
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(dim, out_dim, kernel_size=3, stride=2, padding=1, **dd)
        self.norm = LayerNorm(out_dim, eps=1e-5, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class HierViGStage(nn.Module):
    """Optional downsampling, then ``depth`` ViG blocks with LayerNorm and a SwiGLU MLP rounded to 32."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        depth: int,
        num_heads: int,
        downsample: bool,
        drop_path: list[float],
        mlp_multiple_of: int = 32,
        backend: str | None = None,
        device=None,
        dtype=None,
    ):
        """
        Args:
            dim: input channels.
            out_dim: channels of the blocks.
            depth: number of blocks.
            num_heads: attention heads.
            downsample: halve the grid with ``HierViGDownsample`` first (else ``dim`` must equal ``out_dim``).
            drop_path: stochastic-depth rate of each block.
            mlp_multiple_of: the SwiGLU width is rounded up to a multiple of this.
            backend: backend of the gated linear attention op.
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.grad_checkpointing = False
        self.downsample = HierViGDownsample(dim, out_dim, **dd) if downsample else nn.Identity()
        norm_layer = partial(LayerNorm, eps=1e-5)
        mlp_hidden_dim = _swiglu_hidden_dim(out_dim, mlp_multiple_of)
        self.blocks = nn.Sequential(
            *[
                ViGBlock(out_dim, num_heads, mlp_hidden_dim, norm_layer, drop_path=drop_path[i], backend=backend, **dd)
                for i in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class HierViG(StagedBackbone, ClassifierHeadMixin, nn.Module):
    """ViG-H: stride-4 conv stem, four stages of ViG blocks with conv downsampling, LayerNorm, avg pool.

    ``forward_features`` returns the normed ``(B, Y, X, C)`` map of the last stage (``output_fmt = 'NHWC'``).
    """

    output_fmt = "NHWC"
    intermediate_fmts = _INTERMEDIATE_FMTS

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        dims: tuple[int, ...] = (96, 192, 384, 768),
        depths: tuple[int, ...] = (2, 2, 5, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        mlp_multiple_of: int = 32,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        backend: str | None = None,
        device=None,
        dtype=None,
    ):
        """
        Args:
            in_chans: image channels.
            num_classes: classifier outputs (0: no classifier).
            global_pool: ``'avg'`` or ``''`` (no pooling).
            dims: channels per stage.
            depths: blocks per stage.
            num_heads: attention heads per stage.
            mlp_multiple_of: the SwiGLU width is rounded up to a multiple of this.
            drop_rate: dropout before the classifier.
            drop_path_rate: stochastic depth, rising linearly over all blocks to this value.
            backend: backend of the gated linear attention op (None: Triton where it applies, else reference).
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if not len(dims) == len(depths) == len(num_heads):
            raise ValueError(
                f"dims, depths and num_heads must have one entry per stage; got {dims=}, {depths=}, {num_heads=}."
            )
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = dims[-1]

        self.stem = ViGStem(in_chans, dims[0], kernel_sizes=(3, 3), strides=(2, 2), act_layer=nn.GELU, **dd)
        rates = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)  # per block, split by stage
        stages, self.feature_info = [], []
        for i, (dim, depth, heads) in enumerate(zip(dims, depths, num_heads)):
            prev = dims[max(i - 1, 0)]
            stages.append(
                HierViGStage(prev, dim, depth, heads, i > 0, rates[i], mlp_multiple_of, backend=backend, **dd)
            )
            self.feature_info.append(dict(num_chs=dim, reduction=_STEM_STRIDE * 2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = LayerNorm(dims[-1], eps=1e-5, **dd)
        self.head = ClassifierHead(
            dims[-1], num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt="NHWC", **dd
        )
        # The reference's init: truncated-normal linears (the attention's included) with zero bias; the attention's
        # depthwise conv keeps its xavier init and the stem/downsample convs PyTorch's default.
        self.apply(partial(init_linear, weight_init=trunc_normal_))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return stage_group_matcher(coarse, stem=r"^stem", final=r"^norm")

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.stages(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _downsample_of_next_stage(part: str):
    """Replacement for ``layers.i.downsample.<n>.``: that module starts stage ``i + 1`` here."""
    return lambda match: f"stages.{int(match[1]) + 1}.downsample.{part}."


#: Official ViG-H checkpoints (hustvl/ViG ``HierViG`` state dict, e.g. ``vig_h_t_82p8acc.pth``) -> ``HierViG``.
_VIG_H_RENAMES = (
    (re.compile(r"^module\."), ""),  # saved from a DistributedDataParallel wrapper
    (re.compile(r"^patch_embed\.0\."), "stem.conv1."),
    (re.compile(r"^patch_embed\.2\."), "stem.norm1."),  # .1/.3 are Identity (channel-first), .4 GELU
    (re.compile(r"^patch_embed\.5\."), "stem.conv2."),
    (re.compile(r"^patch_embed\.7\."), "stem.norm2."),
    # layers.i.downsample ends stage i there and starts stage i+1 here; .0/.2 are Identity (channel-first)
    (re.compile(r"^layers\.(\d+)\.downsample\.1\."), _downsample_of_next_stage("conv")),
    (re.compile(r"^layers\.(\d+)\.downsample\.3\."), _downsample_of_next_stage("norm")),
    (re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.norm\."), r"stages.\1.blocks.\2.norm1."),
    (re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.op\."), r"stages.\1.blocks.\2.attn."),
    (re.compile(r"^layers\.(\d+)\.blocks\."), r"stages.\1.blocks."),  # norm2 and mlp.fc1/fc2 keep their names
    *_ATTENTION_RENAMES,
    (re.compile(r"^classifier\.norm\."), "norm."),
    (re.compile(r"^classifier\.head\."), "head.fc."),
)


def checkpoint_filter_fn(state_dict: dict, model: HierViG) -> dict:
    """Convert an official hustvl/ViG hierarchical checkpoint (or its ``{'model': ...}`` wrapper) to ``HierViG``.

    The reference's channel-first ``Linear2d`` weights are stored ``(out, in)`` like ``nn.Linear``, so no reshape.
    """
    state_dict = state_dict.get("model", state_dict)
    if "stem.conv1.weight" in state_dict:
        return state_dict
    return {_rename(key, _VIG_H_RENAMES): value for key, value in state_dict.items()}


def _create_hier_vig(variant: str, pretrained: bool = False, **kwargs) -> HierViG:
    return create_backbone(HierViG, variant, pretrained, checkpoint_filter_fn, (0, 1, 2, 3), **kwargs)


def _cfg(**kwargs) -> dict:
    return _vig_cfg(pool_size=(7, 7), **kwargs)


default_cfgs = generate_default_cfgs(
    {
        "vig_h_tiny.hustvl_in1k": _cfg(hf_hub_id="hustvl/ViG", hf_hub_filename="vig_h_t_82p8acc.pth"),
        "vig_h_small.hustvl_in1k": _cfg(hf_hub_id="hustvl/ViG", hf_hub_filename="vig_h_s_83p8acc.pth"),
        "vig_h_base.hustvl_in1k": _cfg(hf_hub_id="hustvl/ViG", hf_hub_filename="vig_h_b_84p2acc.pth"),
    }
)


@register_model
def vig_h_tiny(pretrained: bool = False, **kwargs) -> HierViG:
    model_args = dict(dims=(96, 192, 384, 768), depths=(2, 2, 5, 2), num_heads=(3, 6, 12, 24))
    return _create_hier_vig("vig_h_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vig_h_small(pretrained: bool = False, **kwargs) -> HierViG:
    model_args = dict(dims=(96, 192, 384, 768), depths=(2, 2, 17, 2), num_heads=(3, 6, 12, 24))
    return _create_hier_vig("vig_h_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vig_h_base(pretrained: bool = False, **kwargs) -> HierViG:
    model_args = dict(dims=(128, 256, 512, 1024), depths=(2, 2, 17, 2), num_heads=(4, 8, 16, 32))
    return _create_hier_vig("vig_h_base", pretrained=pretrained, **dict(model_args, **kwargs))
