"""MAViT / RAVLT (issue 7) against timm's DeiT, Swin and ConvNeXt, and against the reference-style attention.

Inference rows run bf16 weights under ``torch.no_grad``; training rows run one forward + backward of the
cross-entropy loss with fp32 weights under bf16 autocast. ``items`` is the batch, so the report gives images/s.
Targets (issue 7, H100 bf16): at 224 px, batch 256, mavit_tiny and ravlt_tiny >= swin_tiny's images/s; at 1024 px
with ``attn_layout="linear"``, >= 3x deit_tiny's images/s.

The "reference-style" rows run the same model with its attention computed the way qhfan/MALA and qhfan/RALA do
(plain PyTorch in the activation dtype: ELU+1, mean, theta_shift, two matmuls; softmax stages materialise the
N x N score matrix), re-implemented here from the official modules' equations.

    python tools/bench.py models --cases models_mavit --mode both --dtype bf16 --out docs/benchmarks/models_mavit_h100
"""

import contextlib
import functools

import timm
import torch
import torch.nn.functional as F

import visionattn  # noqa: F401  (registers the models)
import visionattn.nn.linear_attention2d as linear_attention2d
from tools.bench_cases._common import BenchCase, image_batch, model_step
from visionattn.nn import SoftmaxAttention2d, apply_rope2d

__all__ = ["cases"]

_SWIN = ("swin_tiny", "swin_tiny_patch4_window7_224")
_CONVNEXT = ("convnext_tiny", "convnext_tiny")
_DEIT_TINY = ("deit_tiny", "deit_tiny_patch16_224")
_DEIT_SMALL = ("deit_small", "deit_small_patch16_224")

#: Groups that also time ``torch.compile``d models (ours and the peers alike).
_COMPILED_GROUPS = ("infer 224px tiny vs swin_tiny", "infer 1024px tiny linear vs deit_tiny")
#: (group, mode, img, batch, model kwargs, ours, [(impl, timm name, is_baseline)])
_GPU_ROWS = [
    (
        "infer 224px tiny vs swin_tiny",
        "fwd",
        224,
        256,
        {},
        ("mavit_tiny", "ravlt_tiny"),
        [(*_SWIN, True), (*_CONVNEXT, False)],
    ),
    ("infer 224px small vs swin_tiny", "fwd", 224, 256, {}, ("mavit_small", "ravlt_small"), [(*_SWIN, True)]),
    (
        "infer 1024px tiny linear vs deit_tiny",
        "fwd",
        1024,
        32,
        {"attn_layout": "linear"},
        ("mavit_tiny", "ravlt_tiny"),
        [(*_DEIT_TINY, True)],
    ),
    ("infer 1024px tiny hybrid vs deit_tiny", "fwd", 1024, 32, {}, ("mavit_tiny", "ravlt_tiny"), [(*_DEIT_TINY, True)]),
    ("train 224px tiny vs swin_tiny", "fwd+bwd", 224, 128, {}, ("mavit_tiny", "ravlt_tiny"), [(*_SWIN, True)]),
    (
        "train 1024px tiny linear vs deit_small",
        "fwd+bwd",
        1024,
        8,
        {"attn_layout": "linear"},
        ("mavit_tiny", "ravlt_tiny"),
        [(*_DEIT_SMALL, True)],
    ),
]
_CPU_ROWS = [
    ("infer 64px tiny vs deit_tiny", "fwd", 64, 2, {}, ("mavit_tiny", "ravlt_tiny"), [(*_DEIT_TINY, True)]),
    ("train 64px tiny linear", "fwd+bwd", 64, 2, {"attn_layout": "linear"}, ("ravlt_tiny",), []),
]


def _rotate(x, rope):
    """``apply_rope2d`` with the stage's tables; the linear stages pass pair tables ``(N, D/2)``, expanded here."""
    cos, sin = (t.repeat_interleave(2, -1) if 2 * t.shape[-1] == x.shape[-1] else t for t in rope)
    return apply_rope2d(x, cos.to(x.dtype), sin.to(x.dtype))


def _reference_linear(q, k, v, *, normalize, key_weight, rope, scale, **_):
    """MALA / RALA as the official modules compute them (activation dtype, no fused kernels)."""
    n = q.shape[-2]
    q, k = F.elu(q) + 1, F.elu(k) + 1
    if key_weight == "rala":
        alpha = torch.softmax(scale * q.mean(dim=-2, keepdim=True) @ k.transpose(-1, -2), dim=-1)
        k = k * alpha.transpose(-1, -2) * n
        z = 1 / (q @ k.mean(dim=-2, keepdim=True).transpose(-1, -2) + 1e-6)
        kv = (_rotate(k, rope).transpose(-1, -2) * n**-0.5) @ (v * n**-0.5)
        return _rotate(q, rope) @ kv * z
    z = q @ k.mean(dim=-2, keepdim=True).transpose(-1, -2) * scale
    kv = (_rotate(k, rope).transpose(-1, -2) * (scale / n) ** 0.5) @ (v * (scale / n) ** 0.5)
    return _rotate(q, rope) @ kv * (1 + 1 / (z + 1e-6)) - z * v.mean(dim=-2, keepdim=True)


def _reference_softmax(self, q, k, v, rope):
    """``VanillaSelfAttention``: materialised ``softmax(scale·q̃k̃ᵀ)v``."""
    q, k = _rotate(q, rope), _rotate(k, rope)
    return torch.softmax(self.scale * q @ k.transpose(-1, -2), dim=-1) @ v


@contextlib.contextmanager
def _reference_style_attention():
    """Route the linear op and the softmax stages to the reference-style computations for the duration."""
    linear, softmax = linear_attention2d.linear_attention, SoftmaxAttention2d._attend
    linear_attention2d.linear_attention = lambda q, k, v, **kw: _reference_linear(q, k, v, **kw)
    SoftmaxAttention2d._attend = _reference_softmax
    try:
        yield
    finally:
        linear_attention2d.linear_attention, SoftmaxAttention2d._attend = linear, softmax


@contextlib.contextmanager
def _attention_free():
    """Skip every attention (linear and softmax stages return ``v``) for the duration: the model's time outside the
    attention, the bound on what any attention kernel can give."""
    linear, softmax = linear_attention2d.linear_attention, SoftmaxAttention2d._attend
    linear_attention2d.linear_attention = lambda q, k, v, **_: v
    SoftmaxAttention2d._attend = lambda self, q, k, v, rope: v
    try:
        yield
    finally:
        linear_attention2d.linear_attention, SoftmaxAttention2d._attend = linear, softmax


def _build(name: str, img: int, mode: str, args, **kwargs):
    if name.startswith("deit") or name.startswith("swin"):
        kwargs["img_size"] = img
    model = timm.create_model(name, **kwargs).to(args.device, memory_format=torch.channels_last)
    if mode == "fwd":
        return model.eval().to(args.dtype)
    return model.train()


def _row(name: str, img: int, batch: int, mode: str, args, *, compiled=False, context=None, **kwargs):
    """``BenchCase.make`` of one row: the model (``torch.compile``d if asked) and a batch, built when timed;
    ``context``: wraps the forward (``_reference_style_attention``, ``_attention_free``)."""

    def make():
        dtype = args.dtype if mode == "fwd" else torch.float32
        images, labels = image_batch(batch, img, device=args.device, dtype=dtype, channels_last=True)
        model = _build(name, img, mode, args, **kwargs)
        model = torch.compile(model) if compiled else model
        return model_step(model, images, labels, mode, context or contextlib.nullcontext)

    return make


def cases(args) -> list[BenchCase]:
    on_gpu = args.device == "cuda"
    # On CPU the Triton interpreter would be picked for fp32; the reference op is the CPU path.
    ours_kwargs = {} if on_gpu else {"attn_backend": "reference"}
    rows = []
    for group, mode, img, batch, model_kwargs, ours, peers in _GPU_ROWS if on_gpu else _CPU_ROWS:
        common = dict(group=f"{group} B{batch}", mode=mode, items=batch)
        compiled = on_gpu and group in _COMPILED_GROUPS
        row = functools.partial(_row, img=img, batch=batch, mode=mode, args=args)
        for name in ours:
            kwargs = {**model_kwargs, **ours_kwargs}
            rows.append(BenchCase(impl=f"{name} (ours)", make=row(name, **kwargs), **common))
            make = row(name, context=_reference_style_attention, **kwargs)
            rows.append(BenchCase(impl=f"{name} reference-style attention", make=make, **common))
            make = row(name, context=_attention_free, **kwargs)
            rows.append(BenchCase(impl=f"{name} attention-free (bound)", make=make, **common))
            if compiled:
                make = row(name, compiled=True, **kwargs)
                rows.append(BenchCase(impl=f"{name} (ours, torch.compile)", make=make, **common))
        for impl, name, baseline in peers:
            rows.append(BenchCase(impl=f"{impl} (timm)", make=row(name), baseline=baseline, **common))
            if compiled:
                rows.append(BenchCase(impl=f"{impl} (timm, torch.compile)", make=row(name, compiled=True), **common))
    return rows
