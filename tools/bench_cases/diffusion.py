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
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tools.bench_cases._common import BenchCase, LatestOnly, attention_flops, random_qkv
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
    ("local", dict(kernel_size=(10, 24, 24), stride=(2, 8, 8))),  # GNA-aligned: odd multiples of the (2, 8, 8) tile
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


class _Model(NamedTuple):
    """A transformer described without building it: ``build(device, dtype) -> (model, inputs of one step)``."""

    build: Callable
    class_name: str
    grid: TokenGrid
    heads: int
    head_dim: int


def _wan(tiny: bool) -> _Model:
    config = dict(_WAN_13B, num_attention_heads=2, attention_head_dim=16, ffn_dim=32, num_layers=2, text_dim=16)
    config = config if tiny else _WAN_13B
    frames, height, width = (3, 8, 8) if tiny else (21, 60, 104)  # 480 x 832 x 81 frames after the VAE

    def build(device, dtype):
        from diffusers import WanTransformer3DModel

        with torch.device(device), _default_dtype(dtype):
            model = _keep_fp32(WanTransformer3DModel(**config).to(dtype).eval())
        gen = torch.Generator(device="cpu").manual_seed(0)
        inputs = dict(
            hidden_states=torch.randn(1, 16, frames, height, width, generator=gen),
            timestep=torch.tensor([500]),
            encoder_hidden_states=torch.randn(1, 8 if tiny else 512, config["text_dim"], generator=gen),
        )
        return model, _to(inputs, device, dtype)

    grid = TokenGrid((frames, height // 2, width // 2))
    return _Model(build, "WanTransformer3DModel", grid, config["num_attention_heads"], config["attention_head_dim"])


def _flux(tiny: bool) -> _Model:
    config = dict(_FLUX_DEV, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2)
    config.update(joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))
    config = config if tiny else _FLUX_DEV
    side, text = (8, 8) if tiny else (128, 512)  # 2048 px: VAE /8, 2x2 packing

    def build(device, dtype):
        from diffusers import FluxTransformer2DModel

        with torch.device(device), _default_dtype(dtype):
            model = _keep_fp32(FluxTransformer2DModel(**config).to(dtype).eval())
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        gen = torch.Generator(device="cpu").manual_seed(0)
        inputs = dict(
            hidden_states=torch.randn(1, side * side, config["in_channels"], generator=gen),
            encoder_hidden_states=torch.randn(1, text, config["joint_attention_dim"], generator=gen),
            pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=gen),
            img_ids=torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float(),
            txt_ids=torch.zeros(text, 3),
            timestep=torch.tensor([0.5]),
            guidance=torch.tensor([3.5]),
        )
        return model, _to(inputs, device, dtype)

    grid = TokenGrid((side, side), extra_before=text)
    return _Model(build, "FluxTransformer2DModel", grid, config["num_attention_heads"], config["attention_head_dim"])


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
    """Switches one model between stock attention and a method, in each step row's ``make``."""

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


def _method_layer(method: str, options: dict, spec: _Model, args):
    """The method's attention module for ``spec``'s heads, in the activation dtype as ``apply`` builds it."""
    shaped = {"head_dim": spec.head_dim, "device": args.device, "dtype": args.dtype}
    layer = _METHODS[method](**options, **(shaped if method in ("linear", "sparse_linear") else {})).to(args.device)
    layer.check_model(spec.class_name, spec.grid.ndim, spec.grid.ndim == 3)
    return layer


def _model_rows(name: str, spec: _Model, methods, models: LatestOnly, args) -> list[BenchCase]:
    """Step rows (the transformer, from ``models(name)``, shared by the group) and attention rows of one model."""
    n = spec.grid.num_tokens
    densities = {}

    def step(method, options):
        def make():
            model, inputs, installer = models(name)
            installer.use(method, options)
            return functools.partial(_inference, model, return_dict=False, **inputs)

        return make

    def attention(method, options):
        def make():
            q, k, v = random_qkv(1, spec.heads, n, spec.head_dim, device=args.device, dtype=args.dtype)
            if method is None:
                return functools.partial(_inference, F.scaled_dot_product_attention, q, k, v)
            layer, state = _method_layer(method, options, spec, args), DiffusionState()
            with torch.no_grad():
                _, density = layer(q, k, v, spec.grid, state)  # the density is a result of running the method
            densities[_label(method, options)] = None if density is None else float(density)
            return functools.partial(_inference, layer, q, k, v, spec.grid, state)

        return make

    def density(method, options):
        if _label(method, options) not in densities:
            attention(method, options)()
        return densities[_label(method, options)]

    attn_flops = attention_flops(1, spec.heads, n, n, spec.head_dim, "fwd")
    dense = dict(mode="fwd", density=1.0, baseline=True)
    rows = [
        BenchCase(f"{name} step", "dense sdpa-cudnn", make=step(None, {}), **dense),
        BenchCase(f"{name} attention", "dense sdpa-cudnn", make=attention(None, {}), flops=attn_flops, **dense),
    ]
    for method, options in methods:
        if method not in _METHODS:
            continue
        label, measured = _label(method, options), functools.partial(density, method, options)
        make = attention(method, options)
        rows.append(BenchCase(f"{name} attention", label, "fwd", make, attn_flops, density=measured))
        rows.append(BenchCase(f"{name} step", label, "fwd", step(method, options), density=measured))
    return rows


def _built(spec: _Model, args):
    """``(model, inputs, installer)`` of ``spec`` on the benchmark's device and dtype."""
    model, inputs = spec.build(args.device, args.dtype)
    return model, inputs, _Installer(model)


def cases(args) -> list[BenchCase]:
    tiny = args.device != "cuda"
    specs = {"Wan2.1-1.3B 480p x 81": (_wan(tiny), _WAN_METHODS), "FLUX.1 2048px": (_flux(tiny), _FLUX_METHODS)}
    # one transformer alive at a time: the FLUX.1 step rows build theirs after Wan's is dropped
    models = LatestOnly(lambda name: _built(specs[name][0], args))
    return [row for name, (spec, methods) in specs.items() for row in _model_rows(name, spec, methods, models, args)]
