"""Plain-PyTorch re-implementation of the official MAViT / RAVLT forward, over a state dict in the official key layout.

Written from shared/reference/backbones.md §2.2, §2.3, §3.2, §3.3 (qhfan/MALA ``model.py``, qhfan/RALA ``RALA.py``):
NCHW throughout, 1x1 convolutions, downsampling at the end of stages 1-3, Conv1x1 classifier, materialised softmax.
Used as the oracle of the module, converter and whole-model tests (in float64).
"""

import math

import torch
import torch.nn.functional as F

#: Per-stage configuration of the official variants (embed_dims, depths, heads, projection, layer-scale init).
OFFICIAL_VARIANTS = {
    "tiny": dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8)),
    "small": dict(embed_dims=(64, 128, 320, 512), depths=(3, 5, 9, 3), num_heads=(1, 2, 5, 8)),
    "base": dict(embed_dims=(96, 192, 384, 512), depths=(4, 6, 12, 6), num_heads=(1, 2, 6, 8)),
    "large": dict(embed_dims=(96, 192, 448, 640), depths=(4, 7, 19, 8), num_heads=(1, 2, 7, 10)),
}


def rope_tables(rows: int, cols: int, head_dim: int, dtype=torch.float64):
    """``(sin, cos)`` ``(rows·cols, head_dim)``: channel c belongs to pair c // 2; pairs of the first half use the
    row index, pairs of the second half the column index, pair i of each half the frequency 10000^-(i / (d/4 - 1))."""
    quarter = head_dim // 4
    theta = 1.0 / 10000 ** torch.linspace(0, 1, quarter, dtype=dtype)
    ys, xs = torch.meshgrid(torch.arange(rows, dtype=dtype), torch.arange(cols, dtype=dtype), indexing="ij")
    ys, xs = ys.reshape(-1, 1), xs.reshape(-1, 1)
    pair = torch.arange(head_dim) // 2
    angle = torch.where(pair < quarter, ys * theta[pair % quarter], xs * theta[pair % quarter])
    return angle.sin(), angle.cos()


def theta_shift(x, sin, cos):
    rotated = torch.empty_like(x)
    rotated[..., 0::2] = -x[..., 1::2]
    rotated[..., 1::2] = x[..., 0::2]
    return x * cos + rotated * sin


def _heads(t, num_heads):
    b, c, h, w = t.shape
    return t.reshape(b, num_heads, c // num_heads, h * w).transpose(-1, -2)


def _merge(t, h, w):
    b, n, length, d = t.shape
    return t.transpose(-1, -2).reshape(b, n * d, h, w)


def attention(kind: str, x, p: dict, num_heads: int, sin, cos):
    """One official attention module (``AddLinearAttention`` / ``GateLinearAttentionNoSilu`` /
    ``VanillaSelfAttention``) on NCHW ``x``; ``p`` maps ``qkvo``/``lepe``/``proj`` ``.weight``/``.bias`` (convs)."""
    b, c, h, w = x.shape
    n = h * w
    scale = (c // num_heads) ** -0.5
    qkvo = F.conv2d(x, p["qkvo.weight"], p["qkvo.bias"])
    q, k, v, o = qkvo.split(c, dim=1)
    lepe = F.conv2d(v, p["lepe.weight"], p["lepe.bias"], padding=2, groups=c)
    q, k, v = (_heads(t, num_heads) for t in (q, k, v))
    if kind == "softmax":
        q, k = theta_shift(q, sin, cos), theta_shift(k, sin, cos)
        res = torch.softmax(scale * q @ k.transpose(-1, -2), dim=-1) @ v
    else:
        q, k = F.elu(q) + 1, F.elu(k) + 1
        if kind == "mala":
            z = scale * q @ k.mean(dim=-2, keepdim=True).transpose(-1, -2)
            kv = theta_shift(k, sin, cos).transpose(-1, -2) @ v * (scale / n)
            res = theta_shift(q, sin, cos) @ kv * (1 + 1 / (z + 1e-6)) - z * v.mean(dim=-2, keepdim=True)
        else:  # rala
            alpha = torch.softmax(scale * q.mean(dim=-2, keepdim=True) @ k.transpose(-1, -2), dim=-1)
            k = k * alpha.transpose(-1, -2) * n
            z = 1 / (q @ k.mean(dim=-2, keepdim=True).transpose(-1, -2) + 1e-6)
            kv = theta_shift(k, sin, cos).transpose(-1, -2) @ v / n
            res = theta_shift(q, sin, cos) @ kv * z
    res = _merge(res, h, w) + lepe
    return F.conv2d(res * o, p["proj.weight"], p["proj.bias"])


def _sub(sd: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _bn(x, p):
    return F.batch_norm(x, p["running_mean"], p["running_var"], p["weight"], p["bias"], training=False, eps=1e-5)


def _ln2d(x, p):
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], p["weight"], p["bias"], eps=1e-6).permute(0, 3, 1, 2)


def forward(sd: dict, x, *, linear_kind: str, num_heads, attn_types=None):
    """Logits of the official model whose (official-layout) weights are ``sd``; ``attn_types`` defaults to the
    released layout (linear in stages 1-2, softmax in 3-4)."""
    attn_types = attn_types or (linear_kind, linear_kind, "softmax", "softmax")
    stem = _sub(sd, "patch_embed.proj.")
    for i, conv in enumerate((0, 3, 6, 9)):
        x = F.conv2d(x, stem[f"{conv}.weight"], stem[f"{conv}.bias"], stride=2 if i in (0, 3) else 1, padding=1)
        x = _bn(x, _sub(stem, f"{conv + 1}."))
        x = F.gelu(x) if i < 3 else x
    for s, heads in enumerate(num_heads):
        layer = _sub(sd, f"layers.{s}.")
        sin, cos = rope_tables(x.shape[2], x.shape[3], x.shape[1] // heads, x.dtype)
        j = 0
        while f"blocks.{j}.pos.weight" in layer:
            p = _sub(layer, f"blocks.{j}.")
            x = x + F.conv2d(x, p["pos.weight"], p["pos.bias"], padding=1, groups=x.shape[1])
            a = attention(attn_types[s], _ln2d(x, _sub(p, "norm1.norm.")), _sub(p, "attn."), heads, sin, cos)
            x = x + p["gamma_1"] * a
            f = _sub(p, "ffn.")
            y = F.gelu(F.conv2d(_ln2d(x, _sub(p, "norm2.norm.")), f["fc1.weight"], f["fc1.bias"]))
            y = y + F.conv2d(y, f["dwconv.weight"], f["dwconv.bias"], padding=1, groups=y.shape[1])
            x = x + p["gamma_2"] * F.conv2d(y, f["fc2.weight"], f["fc2.bias"])
            j += 1
        if "downsample.reduction.weight" in layer:
            d = _sub(layer, "downsample.")
            x = _bn(F.conv2d(x, d["reduction.weight"], d["reduction.bias"], stride=2, padding=1), _sub(d, "norm."))
    x = _bn(F.conv2d(x, sd["proj.weight"], sd["proj.bias"]), _sub(sd, "norm."))
    x = (x * torch.sigmoid(x)).mean(dim=(2, 3), keepdim=True)
    return F.conv2d(x, sd["head.weight"], sd["head.bias"]).flatten(1)


def official_shapes(embed_dims, depths, num_heads, *, projection, num_classes=1000, mlp_ratio=3.5) -> dict:
    """Key -> shape of the official state dict (``MALA`` / ``RAVLT`` modules) for one configuration."""
    shapes = {}

    def bn(prefix, c):
        shapes.update({f"{prefix}.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")})
        shapes[f"{prefix}.num_batches_tracked"] = ()

    def conv(prefix, cout, cin, k):
        shapes.update({f"{prefix}.weight": (cout, cin, k, k), f"{prefix}.bias": (cout,)})

    c0 = embed_dims[0]
    for i, (cin, cout) in enumerate(((3, c0 // 2), (c0 // 2, c0 // 2), (c0 // 2, c0 // 2), (c0 // 2, c0))):
        conv(f"patch_embed.proj.{3 * i}", cout, cin, 3)
        bn(f"patch_embed.proj.{3 * i + 1}", cout)
    for s, (c, depth, heads) in enumerate(zip(embed_dims, depths, num_heads)):
        shapes[f"layers.{s}.RoPE.angle"] = (c // heads // 2,)
        hidden = int(mlp_ratio * c)
        for j in range(depth):
            b = f"layers.{s}.blocks.{j}"
            conv(f"{b}.pos", c, 1, 3)
            for norm in ("norm1", "norm2"):
                shapes.update({f"{b}.{norm}.norm.weight": (c,), f"{b}.{norm}.norm.bias": (c,)})
            conv(f"{b}.attn.qkvo", 4 * c, c, 1)
            conv(f"{b}.attn.lepe", c, 1, 5)
            conv(f"{b}.attn.proj", c, c, 1)
            conv(f"{b}.ffn.fc1", hidden, c, 1)
            conv(f"{b}.ffn.dwconv", hidden, 1, 3)
            conv(f"{b}.ffn.fc2", c, hidden, 1)
            shapes.update({f"{b}.gamma_1": (1, c, 1, 1), f"{b}.gamma_2": (1, c, 1, 1)})
        if s + 1 < len(embed_dims):
            conv(f"layers.{s}.downsample.reduction", embed_dims[s + 1], c, 3)
            bn(f"layers.{s}.downsample.norm", embed_dims[s + 1])
    conv("proj", projection, embed_dims[-1], 1)
    bn("norm", projection)
    conv("head", num_classes, projection, 1)
    return shapes


def random_official_state_dict(shapes: dict, generator: torch.Generator, dtype=torch.float64) -> dict:
    """Random weights of a well-conditioned network (fan-in scaled convs, positive BN variances)."""
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shape, generator=generator, dtype=dtype) + 0.5
        elif key.endswith("RoPE.angle"):
            quarter = shape[0] // 2
            sd[key] = (1.0 / 10000 ** torch.linspace(0, 1, quarter, dtype=dtype)).repeat_interleave(2)
        elif len(shape) == 4 and not key.endswith(("gamma_1", "gamma_2")):
            fan_in = math.prod(shape[1:])
            sd[key] = torch.randn(shape, generator=generator, dtype=dtype) / math.sqrt(fan_in)
        else:
            sd[key] = 0.5 * torch.randn(shape, generator=generator, dtype=dtype) + (key.endswith("weight") or 0)
    return sd
