"""Diffusion (issue 10): one denoising step of Wan2.1-1.3B (480p x 81 frames, 32,760 tokens) and FLUX.1 (2048 px,
16,384 image + 512 text tokens) with random weights, dense (SDPA cuDNN) against every method, plus the attention
call alone at the same shapes.

Rows: group ``... step`` times ``transformer(**inputs)`` (bf16, batch 1, no schedule: every layer runs the method);
group ``... attention`` times the method's attention call of one layer on random ``(B, H, N, D)`` q/k/v. ``density``
is the fraction of query-key pairs the method computes with softmax (None for linear attention).

    python tools/bench.py diffusion --mode fwd --dtype bf16 --out docs/benchmarks/diffusion_h100
"""

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tools.bench_cases._common import BenchCase, attention_flops, random_qkv
from visionattn.diffusion import apply, remove
from visionattn.diffusion._hooks import DiffusionState
from visionattn.diffusion._methods import _METHODS
from visionattn.layout import TokenGrid

__all__ = ["cases"]

#: Wan2.1-T2V-1.3B transformer config (diffusers' Wan-AI/Wan2.1-T2V-1.3B-Diffusers).
_WAN_13B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
#: FLUX.1-dev transformer config (black-forest-labs/FLUX.1-dev).
_FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
#: (method, options) per model; schedule off so the step measures the method in every layer.
_WAN_METHODS = [
    ("radial", dict(decay_factor=1.0)),
    ("radial", dict(decay_factor=0.2)),
    ("local", dict(kernel_size=(11, 16, 24), stride=(1, 8, 8))),
    ("sparse_linear", dict(topk=0.05, block_q=128, block_k=64)),
    ("linear", {}),
]
_FLUX_METHODS = [
    ("local", dict(kernel_size=48, stride=16)),
    ("local", dict(kernel_size=64, stride=16)),
    ("local", dict(window="circle", radius=16)),
    ("linear", {}),
]


def _label(method: str, options: dict) -> str:
    return method + "".join(f" {k}={v}" for k, v in options.items())


@contextlib.contextmanager
def _default_dtype(dtype):
    """Build parameters directly in ``dtype``: FLUX.1's 12B parameters do not fit an fp32 copy beside bf16."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _wan(tiny: bool, device, dtype):
    from diffusers import WanTransformer3DModel

    config = dict(_WAN_13B, num_attention_heads=2, attention_head_dim=16, ffn_dim=32, num_layers=2, text_dim=16)
    with torch.device(device), _default_dtype(dtype):
        model = _keep_fp32(WanTransformer3DModel(**(config if tiny else _WAN_13B)).to(dtype).eval())
    frames, height, width = (3, 8, 8) if tiny else (21, 60, 104)  # 480 x 832 x 81 frames after the VAE
    gen = torch.Generator(device="cpu").manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16, frames, height, width, generator=gen),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 8 if tiny else 512, model.config.text_dim, generator=gen),
    )
    grid = TokenGrid((frames, height // 2, width // 2))
    return model, _to(inputs, device, dtype), grid, model.config.num_attention_heads, model.config.attention_head_dim


def _flux(tiny: bool, device, dtype):
    from diffusers import FluxTransformer2DModel

    config = dict(_FLUX_DEV, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2)
    config.update(joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8)) if tiny else None
    with torch.device(device), _default_dtype(dtype):
        model = _keep_fp32(FluxTransformer2DModel(**(config if tiny else _FLUX_DEV)).to(dtype).eval())
    side, text = (8, 8) if tiny else (128, 512)  # 2048 px: VAE /8, 2x2 packing
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    gen = torch.Generator(device="cpu").manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, side * side, model.config.in_channels, generator=gen),
        encoder_hidden_states=torch.randn(1, text, model.config.joint_attention_dim, generator=gen),
        pooled_projections=torch.randn(1, model.config.pooled_projection_dim, generator=gen),
        img_ids=torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float(),
        txt_ids=torch.zeros(text, 3),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]),
    )
    grid = TokenGrid((side, side), extra_before=text)
    return model, _to(inputs, device, dtype), grid, model.config.num_attention_heads, model.config.attention_head_dim


def _keep_fp32(model):
    """Return ``model`` with its ``_keep_in_fp32_modules`` in float32, as ``from_pretrained(torch_dtype=...)`` keeps them."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, module in model.named_modules():
        if keep & set(name.split(".")):
            module.float()
    return model


def _to(inputs: dict, device, dtype) -> dict:
    cast = lambda t: t.to(device, dtype) if t.is_floating_point() and t.ndim > 1 else t.to(device)
    return {k: cast(v) for k, v in inputs.items()}


class _Installer:
    """Switches one model between stock attention and a method, in each row's setup."""

    def __init__(self, model):
        self.model, self.handle = model, None

    def use(self, method: str | None, options: dict) -> None:
        if self.handle is not None:
            remove(self.handle)
            self.handle = None
        if method is not None:
            self.handle = apply(self.model, method, dense_layers=0, dense_steps=0, **options)


def _inference(fn, *args, **kwargs):
    """``fn`` without autograd, dense SDPA on cuDNN (flash, then math, where cuDNN cannot run it)."""
    with torch.no_grad(), sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        return fn(*args, **kwargs)


def _model_rows(name: str, build, methods, args) -> list[BenchCase]:
    tiny = args.device != "cuda"
    model, inputs, grid, heads, dim = build(tiny, args.device, args.dtype)
    installer = _Installer(model)
    n = grid.num_tokens
    step = functools.partial(_inference, model, return_dict=False, **inputs)
    rows = [
        BenchCase(
            group=f"{name} step",
            impl="dense sdpa-cudnn",
            mode="fwd",
            fn=step,
            density=1.0,
            baseline=True,
            setup=functools.partial(installer.use, None, {}),
        )
    ]
    q, k, v = random_qkv(1, heads, n, dim, device=args.device, dtype=args.dtype)
    dense = functools.partial(_inference, F.scaled_dot_product_attention, q, k, v)
    attn_flops = attention_flops(1, heads, n, n, dim, "fwd")
    rows.append(
        BenchCase(f"{name} attention", "dense sdpa-cudnn", "fwd", dense, attn_flops, density=1.0, baseline=True)
    )
    for method, options in methods:
        if method not in _METHODS:
            continue
        label = _label(method, options)
        layer = _METHODS[method](**options, **({"head_dim": dim} if method in ("linear", "sparse_linear") else {}))
        layer = layer.to(args.device)
        layer.check_model(type(model).__name__, grid.ndim, grid.ndim == 3)
        state = DiffusionState()
        with torch.no_grad():
            _, density = layer(q, k, v, grid, state)
        density = None if density is None else float(density)
        call = functools.partial(_inference, layer, q, k, v, grid, state)
        rows.append(BenchCase(f"{name} attention", label, "fwd", call, attn_flops, density=density))
        rows.append(
            BenchCase(
                group=f"{name} step",
                impl=label,
                mode="fwd",
                fn=step,
                density=density,
                setup=functools.partial(installer.use, method, options),
            )
        )
    return rows


def cases(args) -> list[BenchCase]:
    return _model_rows("Wan2.1-1.3B 480p x 81", _wan, _WAN_METHODS, args) + _model_rows(
        "FLUX.1 2048px", _flux, _FLUX_METHODS, args
    )
