"""The official hustvl/ViG models as functions of their own state dicts (float64 oracles for the ViG tests).

Written from the reference code (``classification/models/vig.py`` ``ViG`` / ``GLABlock`` / ``GatedLinearAttention``,
``vig_h.py`` ``HierViG`` / ``VSSBlock`` / ``GLA2D`` with the released configs; shared/reference/backbones.md §4):
official key names and shapes, official op order. Only the GLA scan itself comes from
``gated_linear_attention_reference``, which tests/ops checks against ViG's flip form.
"""

import math

import torch
import torch.nn.functional as F

from visionattn.ops import gated_linear_attention_reference

#: eps of ViG's RMSNorms (``GLAConfig.rms_norm_eps``) and of its LayerNorm2d (``nn.LayerNorm`` default).
RMS_EPS, LN_EPS = 1e-6, 1e-5


def _swiglu_width(dim: int, multiple: int) -> int:
    width = int(dim * 4 * 2 / 3)
    return multiple * ((width + multiple - 1) // multiple)


def _attention_shapes(prefix: str, dim: int, heads: int) -> dict:
    return {
        f"{prefix}in_proj.0.weight": (dim, 1, 3, 3),
        f"{prefix}qkv_proj.weight": (2 * (dim // 2) + dim, dim),
        f"{prefix}gk_proj.0.weight": (16, dim),
        f"{prefix}gk_proj.1.weight": (2 * (dim // 2), 16),
        f"{prefix}gk_proj.1.bias": (2 * (dim // 2),),
        f"{prefix}o_proj.weight": (dim, dim),
        f"{prefix}g_norm.weight": (dim // heads,),
        f"{prefix}l_norm.weight": (dim // heads,),
        f"{prefix}g_proj.weight": (dim, dim),
        f"{prefix}g_proj.bias": (dim,),
    }


def vig_shapes(embed_dim: int, num_heads: int, depth: int = 12, num_classes: int = 1000) -> dict:
    """Key -> shape of the official plain ViG state dict (released configs: v2 stem, abs pos embed, SwiGLU)."""
    c, half, width = embed_dim, embed_dim // 2, _swiglu_width(embed_dim, 256)
    shapes = {
        "patch_embed.proj.0.weight": (half, 3, 9, 9),
        "patch_embed.proj.0.bias": (half,),
        "patch_embed.proj.1.weight": (half,),
        "patch_embed.proj.1.bias": (half,),
        "patch_embed.proj.3.weight": (c, half, 3, 3),
        "patch_embed.proj.3.bias": (c,),
        "patch_embed.proj.4.weight": (c,),
        "patch_embed.proj.4.bias": (c,),
        "pos_embed": (1, 196, c),
    }
    for i in range(depth):
        shapes[f"blocks.{i}.attn_norm.weight"] = (c,)
        shapes.update(_attention_shapes(f"blocks.{i}.attn.", c, num_heads))
        shapes[f"blocks.{i}.mlp_norm.weight"] = (c,)
        shapes[f"blocks.{i}.mlp.gate_proj.weight"] = (2 * width, c)
        shapes[f"blocks.{i}.mlp.down_proj.weight"] = (c, width)
    shapes.update({"norm.weight": (c,), "head.weight": (num_classes, c), "head.bias": (num_classes,)})
    return shapes


def vig_h_shapes(dims, depths, num_heads, num_classes: int = 1000) -> dict:
    """Key -> shape of the official HierViG state dict (ln2d, v2 stem, v3 downsample, gMLP)."""
    half = dims[0] // 2
    shapes = {
        "patch_embed.0.weight": (half, 3, 3, 3),
        "patch_embed.0.bias": (half,),
        "patch_embed.2.weight": (half,),
        "patch_embed.2.bias": (half,),
        "patch_embed.5.weight": (dims[0], half, 3, 3),
        "patch_embed.5.bias": (dims[0],),
        "patch_embed.7.weight": (dims[0],),
        "patch_embed.7.bias": (dims[0],),
    }
    for i, (c, depth, heads) in enumerate(zip(dims, depths, num_heads)):
        width = _swiglu_width(c, 32)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            shapes.update({f"{p}norm.weight": (c,), f"{p}norm.bias": (c,)})
            shapes.update(_attention_shapes(f"{p}op.", c, heads))
            shapes.update({f"{p}norm2.weight": (c,), f"{p}norm2.bias": (c,)})
            shapes.update({f"{p}mlp.fc1.weight": (2 * width, c), f"{p}mlp.fc2.weight": (c, width)})
        if i + 1 < len(dims):
            shapes[f"layers.{i}.downsample.1.weight"] = (dims[i + 1], c, 3, 3)
            shapes[f"layers.{i}.downsample.1.bias"] = (dims[i + 1],)
            shapes[f"layers.{i}.downsample.3.weight"] = (dims[i + 1],)
            shapes[f"layers.{i}.downsample.3.bias"] = (dims[i + 1],)
    c = dims[-1]
    shapes.update({"classifier.norm.weight": (c,), "classifier.norm.bias": (c,)})
    shapes.update({"classifier.head.weight": (num_classes, c), "classifier.head.bias": (num_classes,)})
    return shapes


def random_state_dict(shapes: dict, gen: torch.Generator, dtype=torch.float64) -> dict:
    """Random values of a sensible scale: norm weights near 1, fan-in-scaled weights, small biases."""
    sd = {}
    for key, shape in shapes.items():
        if "norm" in key or key.startswith("patch_embed.proj.1") or key.startswith("patch_embed.proj.4"):
            value = 1 + 0.1 * torch.randn(shape, generator=gen, dtype=dtype)
        elif len(shape) >= 2 and key != "pos_embed":
            value = torch.randn(shape, generator=gen, dtype=dtype) / math.sqrt(math.prod(shape[1:]))
        else:
            value = 0.1 * torch.randn(shape, generator=gen, dtype=dtype)
        sd[key] = value
    return sd


def _rms(x, weight):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS) * weight


def _ln2d(x, sd, key):
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], sd[f"{key}.weight"], sd[f"{key}.bias"], LN_EPS).permute(
        0, 3, 1, 2
    )


def gla_forward(sd: dict, p: str, x: torch.Tensor, heads: int, conv_act: bool, out_act: bool) -> torch.Tensor:
    """``GatedLinearAttention`` / ``GLA2D`` on a ``(B, C, h, w)`` input; returns ``(B, h·w, C)``."""
    b, c = x.shape[:2]
    local = F.conv2d(x, sd[f"{p}in_proj.0.weight"], padding=1, groups=c)
    local = F.silu(local) if conv_act else local
    xs = local.flatten(2).transpose(1, 2)
    dk = sd[f"{p}gk_proj.1.weight"].shape[0] // 2
    q, k, v = (xs @ sd[f"{p}qkv_proj.weight"].T).split([dk, dk, c], dim=-1)
    gk = (xs @ sd[f"{p}gk_proj.0.weight"].T) @ sd[f"{p}gk_proj.1.weight"].T + sd[f"{p}gk_proj.1.bias"]
    fw, bw = (F.logsigmoid(gk) / 16).chunk(2, dim=-1)
    split = lambda t: t.reshape(b, t.shape[1], heads, -1).transpose(1, 2)
    o = gated_linear_attention_reference(split(q), split(k), split(v), split(fw), split(bw)).transpose(1, 2)
    g = torch.sigmoid(xs @ sd[f"{p}g_proj.weight"].T + sd[f"{p}g_proj.bias"]).reshape(o.shape)
    o = _rms(o, sd[f"{p}g_norm.weight"]) * g + _rms(xs.reshape(o.shape), sd[f"{p}l_norm.weight"]) * (1 - g)
    o = o.flatten(2)
    return (F.silu(o) if out_act else o) @ sd[f"{p}o_proj.weight"].T


def _swiglu(x, w_in, w_out):
    gate, y = (x @ w_in.T).chunk(2, dim=-1)
    return (F.silu(gate) * y) @ w_out.T


def vig_forward(sd: dict, x: torch.Tensor, heads: int, conv_act: bool, out_act: bool) -> torch.Tensor:
    """Official ``ViG.forward`` (avgpool classification) for ``(B, 3, H, W)`` images."""
    x = F.conv2d(x, sd["patch_embed.proj.0.weight"], sd["patch_embed.proj.0.bias"], stride=8, padding=1)
    x = F.silu(_ln2d(x, sd, "patch_embed.proj.1"))
    x = F.conv2d(x, sd["patch_embed.proj.3.weight"], sd["patch_embed.proj.3.bias"], stride=2, padding=1)
    x = _ln2d(x, sd, "patch_embed.proj.4")
    b, c, h, w = x.shape
    pos = sd["pos_embed"].reshape(1, 14, 14, c).permute(0, 3, 1, 2)
    if (h, w) != (14, 14):  # resize_pos_embed: bicubic in float32 ("only accepts float32"), cast back
        pos = F.interpolate(pos.float(), size=(h, w), mode="bicubic", align_corners=False).to(pos.dtype)
    x = x.flatten(2).transpose(1, 2) + pos.flatten(2).transpose(1, 2)
    depth = len([k for k in sd if k.endswith("attn_norm.weight")])
    for i in range(depth):
        p = f"blocks.{i}."
        hidden = _rms(x, sd[f"{p}attn_norm.weight"]).transpose(1, 2).reshape(b, c, h, w)
        x = x + gla_forward(sd, f"{p}attn.", hidden, heads, conv_act, out_act)
        x = x + _swiglu(
            _rms(x, sd[f"{p}mlp_norm.weight"]), sd[f"{p}mlp.gate_proj.weight"], sd[f"{p}mlp.down_proj.weight"]
        )
    x = _rms(x, sd["norm.weight"]).mean(1)
    return x @ sd["head.weight"].T + sd["head.bias"]


def vig_h_forward(sd: dict, x: torch.Tensor, depths, num_heads) -> torch.Tensor:
    """Official ``HierViG.forward`` (channel-first, ln2d) for ``(B, 3, H, W)`` images."""
    x = F.conv2d(x, sd["patch_embed.0.weight"], sd["patch_embed.0.bias"], stride=2, padding=1)
    x = F.gelu(_ln2d(x, sd, "patch_embed.2"))
    x = _ln2d(
        F.conv2d(x, sd["patch_embed.5.weight"], sd["patch_embed.5.bias"], stride=2, padding=1), sd, "patch_embed.7"
    )
    for i, (depth, heads) in enumerate(zip(depths, num_heads)):
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            b, c, h, w = x.shape
            attn = gla_forward(sd, f"{p}op.", _ln2d(x, sd, f"{p}norm"), heads, False, False)
            x = x + attn.transpose(1, 2).reshape(b, c, h, w)
            mlp = _swiglu(
                _ln2d(x, sd, f"{p}norm2").permute(0, 2, 3, 1), sd[f"{p}mlp.fc1.weight"], sd[f"{p}mlp.fc2.weight"]
            )
            x = x + mlp.permute(0, 3, 1, 2)
        if f"layers.{i}.downsample.1.weight" in sd:
            x = F.conv2d(
                x, sd[f"layers.{i}.downsample.1.weight"], sd[f"layers.{i}.downsample.1.bias"], stride=2, padding=1
            )
            x = _ln2d(x, sd, f"layers.{i}.downsample.3")
    x = _ln2d(x, sd, "classifier.norm").mean((2, 3))
    return x @ sd["classifier.head.weight"].T + sd["classifier.head.bias"]
