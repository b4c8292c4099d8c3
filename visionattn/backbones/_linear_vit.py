"""The hierarchical skeleton shared by MAViT (MALA) and RAVLT (RALA), both by Qihang Fan et al.

Reference code: qhfan/MALA ``classfication_release/model.py`` and qhfan/RALA ``classfication/RALA.py`` (no licence
file in either repository); this is a re-implementation, not a copy. The skeleton: a 4-conv BatchNorm stem of
stride 4; four stages of blocks ``x += DWConv3x3(x)`` (CPE), ``x += drop_path(γ1·attn(LN(x)))``,
``x += drop_path(γ2·FFN(LN(x)))`` with per-stage 2D RoPE; FFN = 1x1 conv, GELU, depthwise 3x3 conv with a residual,
1x1 conv; Conv3x3-s2 + BatchNorm downsampling; head = 1x1 projection conv + BatchNorm + swish, average pool,
classifier. The released models use linear attention in stages 1-2 and softmax attention in stages 3-4.

Changes from the reference (weights convert with :func:`checkpoint_filter_fn`):

- downsampling sits at the start of the next stage (``stages.{i+1}.downsample``), not at the end of stage ``i``,
  so that ``stages.i`` outputs are the stride-``4·2^i`` feature maps of ``features_only`` / ``forward_intermediates``;
- the 1x1 convolutions ``attn.qkvo`` / ``attn.proj`` are ``nn.Linear`` on ``(B, N, C)`` tokens, the Conv1x1
  classifier ``head`` is ``head.fc`` (``nn.Linear``), the first LayerNorm works on the NHWC view;
- the projection conv + BatchNorm + swish run in ``forward_features`` (``num_features`` is the projection width),
  so that pooling is the last step before the classifier as timm's head API expects;
- softmax stages run through ``F.scaled_dot_product_attention``; RoPE tables are not stored as buffers.

Layer-scale parameters keep the reference's ``(1, C, 1, 1)`` shape, so that timm's optimizer factory applies
weight decay to them exactly as the reference training (DeiT codebase, no ``no_weight_decay`` entries) did.
"""

import re

import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead, DropPath, register_notrace_function, register_notrace_module
from timm.models import checkpoint
from torch import nn

from ..layout import TokenGrid
from ..nn import LayerNorm, LayerNorm2d, LinearAttention2d, RoPE2d, SoftmaxAttention2d
from ._timm_api import ClassifierHeadMixin, StagedBackbone, create_backbone, imagenet_cfg, stage_group_matcher

__all__ = [
    "LinearViT",
    "LinearViTBlock",
    "LinearViTStage",
    "checkpoint_filter_fn",
    "create_linear_vit",
    "feature_map_grid",
    "linear_vit_cfg",
]

_ATTN_TYPES = ("mala", "rala", "softmax")
_ATTN_LAYOUTS = ("hybrid", "linear")

# Shape-dependent Python (grid construction, RoPE tables, attention reshapes) stays out of FX graphs.
register_notrace_module(RoPE2d)
register_notrace_module(LinearAttention2d)
register_notrace_module(SoftmaxAttention2d)


# Public: torch.fx only auto-wraps global functions whose names do not start with "_".
@register_notrace_function
def feature_map_grid(x: torch.Tensor) -> TokenGrid:
    """The ``TokenGrid((H, W))`` of an NCHW feature map (an FX leaf: shapes are runtime values)."""
    return TokenGrid((x.shape[-2], x.shape[-1]))


def _per_stage(name: str, value, num_stages: int) -> tuple:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * num_stages
    if len(values) != num_stages:
        raise ValueError(f"{name} must have one entry per stage ({num_stages}); got {name}={value!r}.")
    return values


def _init_weights(module: nn.Module) -> None:
    """The reference init: truncated normal (std 0.02) for conv and linear weights, zero biases."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class _ConvStem(nn.Module):
    """Stride-4 stem: Conv3x3-s2, two Conv3x3, Conv3x3-s2, each with BatchNorm (GELU between).

    The images enter in ``channels_last`` memory format, so every feature map after it is NCHW-shaped but NHWC in
    memory: the blocks' token views ``(B, Y·X, C)`` (norms, attention, residual adds) are then copies-free, where
    NCHW-contiguous maps cost a transposing copy per view and strided element-wise kernels (measured on an H100,
    mavit_tiny at 1024 px: most of the forward time before this).
    """

    def __init__(self, in_chans: int, dim: int, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        mid = dim // 2
        layers = []
        for i, (cin, cout, stride) in enumerate(((in_chans, mid, 2), (mid, mid, 1), (mid, mid, 1), (mid, dim, 2))):
            layers += [nn.Conv2d(cin, cout, 3, stride, 1, **dd), nn.BatchNorm2d(cout, **dd)]
            if i < 3:
                layers.append(nn.GELU())
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.contiguous(memory_format=torch.channels_last))


class _Downsample(nn.Module):
    """Conv3x3 stride 2 + BatchNorm."""

    def __init__(self, in_dim: int, out_dim: int, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.reduction = nn.Conv2d(in_dim, out_dim, 3, 2, 1, **dd)
        self.norm = nn.BatchNorm2d(out_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x))


class _FeedForward2d(nn.Module):
    """1x1 conv, GELU, depthwise 3x3 conv with a residual, 1x1 conv (NCHW maps, best in channels_last memory).

    ``fc2(h + dwconv(h))`` with ``h = GELU(fc1(x))``. The 1x1 convs run as GEMMs over the map's ``(B, Y, X, C)``
    view with the bias in the GEMM's epilogue, and the depthwise conv's bias ``b_dw`` is folded into fc2's:
    ``fc2(h + dw(h) + b_dw) = W₂(h + dw(h)) + (b₂ + W₂ b_dw)``. cuDNN convolutions add their bias in a separate
    broadcasting pass over the output; on the hidden map (3.5x the channels) those passes were a quarter of
    mavit_tiny's forward at 1024 px on an H100. Parameters keep the conv layout of the released checkpoints.
    """

    def __init__(self, dim: int, hidden_dim: int, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1, **dd)
        self.act = nn.GELU()
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, 1, 1, groups=hidden_dim, **dd)
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act(F.linear(x.permute(0, 2, 3, 1), self.fc1.weight.flatten(1), self.fc1.bias))
        hidden = hidden.permute(0, 3, 1, 2)
        hidden = hidden + F.conv2d(hidden, self.dwconv.weight, None, padding=1, groups=self.dwconv.groups)
        bias = torch.addmv(self.fc2.bias, self.fc2.weight.flatten(1), self.dwconv.bias)
        return F.linear(hidden.permute(0, 2, 3, 1), self.fc2.weight.flatten(1), bias).permute(0, 3, 1, 2)


class LinearViTBlock(nn.Module):
    """CPE, attention and FFN residual branches with per-channel layer scale and stochastic depth (NCHW)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attn_type: str,
        mlp_ratio: float = 3.5,
        layer_scale_init_value: float = 1.0,
        drop_path: float = 0.0,
        attn_backend: str | None = None,
        device=None,
        dtype=None,
    ):
        """
        Args:
            dim: channels.
            num_heads: attention heads.
            attn_type: ``"mala"``, ``"rala"`` (linear attention) or ``"softmax"``.
            mlp_ratio: FFN hidden width over ``dim``.
            layer_scale_init_value: initial value of the layer-scale parameters ``gamma_1``/``gamma_2``.
            drop_path: stochastic depth rate of both residual branches.
            attn_backend: ``visionattn.ops.linear_attention`` backend of the linear-attention blocks.
            device: parameter device.
            dtype: parameter dtype.
        """
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.pos = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim, **dd)
        self.norm1 = LayerNorm(dim, eps=1e-6, **dd)
        if attn_type == "softmax":
            self.attn = SoftmaxAttention2d(dim, num_heads, **dd)
        else:
            self.attn = LinearAttention2d(dim, num_heads, kind=attn_type, backend=attn_backend, **dd)
        self.gamma_1 = nn.Parameter(torch.full((1, dim, 1, 1), float(layer_scale_init_value), **dd))
        self.norm2 = LayerNorm2d(dim, eps=1e-6, **dd)
        self.ffn = _FeedForward2d(dim, int(mlp_ratio * dim), **dd)
        self.gamma_2 = nn.Parameter(torch.full((1, dim, 1, 1), float(layer_scale_init_value), **dd))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: TokenGrid, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.pos(x)
        batch, channels, rows, cols = x.shape
        tokens = self.norm1(x.permute(0, 2, 3, 1)).reshape(batch, rows * cols, channels)
        mixed = self.attn(tokens, grid, rope).reshape(batch, rows, cols, channels).permute(0, 3, 1, 2)
        x = x + self.drop_path(self.gamma_1 * mixed)
        return x + self.drop_path(self.gamma_2 * self.ffn(self.norm2(x)))


class LinearViTStage(nn.Module):
    """Optional stride-2 downsampling, then blocks sharing one set of 2D RoPE tables."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        attn_type: str,
        downsample: bool,
        mlp_ratio: float = 3.5,
        layer_scale_init_value: float = 1.0,
        drop_path: tuple[float, ...] | list[float] = (),
        attn_backend: str | None = None,
        device=None,
        dtype=None,
    ):
        """
        Args:
            in_dim: channels of the input (of the previous stage).
            dim: channels of this stage.
            depth: blocks.
            num_heads: attention heads.
            attn_type: ``"mala"``, ``"rala"`` or ``"softmax"``.
            downsample: start with a Conv3x3-s2 + BatchNorm from ``in_dim`` to ``dim`` (all stages but the first).
            mlp_ratio: FFN hidden width over ``dim``.
            layer_scale_init_value: initial layer-scale value of every block.
            drop_path: stochastic depth rate per block (empty: none).
            attn_backend: ``visionattn.ops.linear_attention`` backend of the linear-attention blocks.
            device: parameter device.
            dtype: parameter dtype.
        """
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = _Downsample(in_dim, dim, **dd) if downsample else nn.Identity()
        # linear stages take the half-size pair tables; softmax blocks rotate with apply_rope2d's full tables
        self.rope = RoPE2d(dim // num_heads, pairs=attn_type != "softmax")
        drop_path = list(drop_path) or [0.0] * depth
        self.blocks = nn.ModuleList(
            LinearViTBlock(
                dim,
                num_heads,
                attn_type,
                mlp_ratio=mlp_ratio,
                layer_scale_init_value=layer_scale_init_value,
                drop_path=drop_path[i],
                attn_backend=attn_backend,
                **dd,
            )
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        grid = feature_map_grid(x)
        rope = self.rope(grid, x)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, grid, rope)
            else:
                x = block(x, grid, rope)
        return x


class LinearViT(StagedBackbone, ClassifierHeadMixin, nn.Module):
    """MAViT / RAVLT backbone: conv stem, four attention stages, projection head (see the module docstring)."""

    # ``norm`` is the projection's BatchNorm, part of the head: forward_intermediates(norm=True) leaves the stage
    # outputs as they are, and prune_intermediate_layers drops it with the head (prune_head), not with prune_norm.
    has_final_norm = False

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dims: tuple[int, ...] = (64, 128, 256, 512),
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (1, 2, 4, 8),
        attn_types: tuple[str, ...] = ("mala", "mala", "softmax", "softmax"),
        attn_layout: str = "hybrid",
        mlp_ratios: float | tuple[float, ...] = 3.5,
        layer_scale_init_values: float | tuple[float, ...] = 1.0,
        projection_dim: int = 2048,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attn_backend: str | None = None,
        device=None,
        dtype=None,
    ):
        """
        Args:
            in_chans: input image channels.
            num_classes: classifier outputs (0: no classifier).
            global_pool: ``timm`` pooling type of the head (``""``: no pooling).
            embed_dims: channels per stage.
            depths: blocks per stage.
            num_heads: attention heads per stage.
            attn_types: per stage ``"mala"``, ``"rala"`` (linear) or ``"softmax"``.
            attn_layout: ``"hybrid"`` uses ``attn_types`` as given (the released models); ``"linear"`` replaces
                every softmax stage by the model's linear attention (pure-linear comparisons, high resolution).
            mlp_ratios: FFN hidden width over the stage width, per stage or one for all.
            layer_scale_init_values: layer-scale init per stage or one for all.
            projection_dim: channels of the 1x1 projection before pooling (``num_features``).
            drop_rate: dropout before the classifier.
            drop_path_rate: stochastic depth of the last block (linear in block index from 0).
            attn_backend: ``visionattn.ops.linear_attention`` backend (None: Triton on CUDA, else the reference).
            device: parameter device.
            dtype: parameter dtype.
        """
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        num_stages = len(depths)
        embed_dims = _per_stage("embed_dims", embed_dims, num_stages)
        num_heads = _per_stage("num_heads", num_heads, num_stages)
        attn_types = _per_stage("attn_types", attn_types, num_stages)
        mlp_ratios = _per_stage("mlp_ratios", mlp_ratios, num_stages)
        layer_scale_init_values = _per_stage("layer_scale_init_values", layer_scale_init_values, num_stages)
        if any(t not in _ATTN_TYPES for t in attn_types):
            raise ValueError(f"attn_types must contain only {_ATTN_TYPES}; got {attn_types=}.")
        if attn_layout not in _ATTN_LAYOUTS:
            raise ValueError(f"attn_layout must be one of {_ATTN_LAYOUTS}; got {attn_layout=}.")
        if attn_layout == "linear":
            linear_kinds = [t for t in attn_types if t != "softmax"]
            if not linear_kinds:
                raise ValueError(f"attn_layout='linear' needs a linear stage in attn_types; got {attn_types=}.")
            attn_types = tuple(linear_kinds[0] if t == "softmax" else t for t in attn_types)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.attn_types = attn_types
        self.num_features = self.head_hidden_size = projection_dim

        self.patch_embed = _ConvStem(in_chans, embed_dims[0], **dd)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        stages, self.feature_info = [], []
        for i in range(num_stages):
            stages.append(
                LinearViTStage(
                    embed_dims[max(i - 1, 0)],
                    embed_dims[i],
                    depths[i],
                    num_heads[i],
                    attn_types[i],
                    downsample=i > 0,
                    mlp_ratio=mlp_ratios[i],
                    layer_scale_init_value=layer_scale_init_values[i],
                    drop_path=rates[sum(depths[:i]) : sum(depths[: i + 1])],
                    attn_backend=attn_backend,
                    **dd,
                )
            )
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.proj = nn.Conv2d(embed_dims[-1], projection_dim, 1, **dd)
        self.norm = nn.BatchNorm2d(projection_dim, **dd)
        self.act = nn.SiLU()
        self.head = ClassifierHead(projection_dim, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # The reference training decays every >1-D parameter, layer scale included (see the module docstring).
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return stage_group_matcher(coarse, stem=r"^patch_embed", final=r"^proj|^norm")

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x)

    def _forward_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.proj(x)))

    def _prune_head(self) -> None:
        self.proj, self.norm, self.act = nn.Identity(), nn.Identity(), nn.Identity()
        self.reset_classifier(0, "")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_norm(self.stages(self.patch_embed(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# Official key layout (qhfan/MALA model.py, qhfan/RALA RALA.py) -> ours; one rule per line, applied in order.
_OFFICIAL_RENAMES = [
    # RoPE angles are a persistent buffer there; recomputed here.
    (re.compile(r"^layers\.\d+\.RoPE\.angle$"), None),
    # downsampling at the end of stage i there, at the start of stage i + 1 here (the index shifts in the function).
    (re.compile(r"^layers\.(\d+)\.downsample\."), "stages.{next}.downsample."),
    (re.compile(r"^layers\.(\d+)\.blocks\."), r"stages.\1.blocks."),
    # LayerNorm2d wrappers hold an inner nn.LayerNorm called ``norm`` there.
    (re.compile(r"\.norm([12])\.norm\."), r".norm\1."),
    # Conv1x1 classifier there, ClassifierHead's Linear here.
    (re.compile(r"^head\."), "head.fc."),
]
#: Conv1x1 weights that are nn.Linear weights here: ``(O, I, 1, 1) -> (O, I)``.
_CONV1X1_TO_LINEAR = re.compile(r"(\.attn\.qkvo|\.attn\.proj|^head\.fc)\.weight$")
#: Checkpoint wrappers (DeiT-codebase training checkpoints), EMA first as in ``timm.models.load_state_dict``.
_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Convert an official MAViT / RAVLT checkpoint (or its DeiT-style training wrapper) to this layout."""
    for key in _WRAPPER_KEYS:
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    if "head.fc.weight" in state_dict or "stages.0.blocks.0.pos.weight" in state_dict:
        return state_dict
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in _OFFICIAL_RENAMES:
            match = pattern.search(key)
            if match is None:
                continue
            if replacement is None:
                break
            if "{next}" in replacement:
                replacement = replacement.replace("{next}", str(int(match.group(1)) + 1))
            key = pattern.sub(replacement, key)
        else:
            if _CONV1X1_TO_LINEAR.search(key) and value.ndim == 4:
                value = value.flatten(1)
            out[key] = value
    return out


def create_linear_vit(model_cls: type, variant: str, pretrained: bool = False, **kwargs) -> LinearViT:
    """Build a MAViT/RAVLT variant with timm's builder (official checkpoints go through ``checkpoint_filter_fn``)."""
    return create_backbone(model_cls, variant, pretrained, checkpoint_filter_fn, (0, 1, 2, 3), **kwargs)


def linear_vit_cfg(hf_hub_id: str, file_name: str, **kwargs) -> dict:
    """Pretrained cfg shared by the MAViT/RAVLT releases (224 px, ImageNet mean/std, bicubic, crop 0.875).

    ``license="unknown"`` (timm's value for that case): neither qhfan/MALA nor qhfan/RALA has a licence file.
    """
    return imagenet_cfg(
        hf_hub_id=hf_hub_id,
        hf_hub_filename=file_name,
        pool_size=(7, 7),
        first_conv="patch_embed.proj.0",
        classifier="head.fc",
        license="unknown",
        **kwargs,
    )
