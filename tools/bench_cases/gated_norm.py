"""ViG's locality injection (per-head RMSNorms of the attention output and the conv features, sigmoid gate mix,
optional SiLU): our one-pass Triton kernel against the eager PyTorch glue it replaced in ``GatedLinearAttention2d``
(the op's reference, the baseline of each group) and ``torch.compile`` of that glue; and ViG's pre-norm, our
``rms_norm`` against ``F.rms_norm`` (what timm's ``RmsNorm`` runs) eager and compiled; and the LayerNorm of the
same kernel, ``layer_norm`` against ``F.layer_norm`` (``nn.LayerNorm``) eager and compiled, at MAViT-T's stage 1 and
Agent-PVT-S's stage 2 at 1024 px. "ours" names ``backend="triton"`` in both modes; with a gradient the automatic
choice (``backend=None``) is the eager PyTorch kernel, so fwd+bwd "ours" rows measure the Triton backward alone.

Both are memory-bound, so every row carries ``bytes``: the minimum HBM traffic. Gated norm: o, local and the gate
logits read and y written forward (4 tensors); forward+backward adds dy, o, local, gate logits read and their three
gradients written (11 in all). RMSNorm and LayerNorm: x read, y written (2); with backward dy, x read and dx
written (5). The norm weights and biases are negligible.

    python tools/bench.py attention --cases gated_norm --mode both --dtype bf16 --out docs/benchmarks/gated_norm_h100
"""

import torch

import visionattn.ops as ops
from tools.bench_cases._common import BenchCase, timed

__all__ = ["cases"]

#: (label, B, N, H, Dv, SiLU): ViG-T at 1024 px batch 64 (the profiled inference, 786K rows of 64), ViG-S at 224 px.
SHAPES = [
    ("vig_tiny-1024 B64 N4096 H3 Dv64 silu", 64, 4096, 3, 64, True),
    ("vig_small-224 B256 N196 H6 Dv64", 256, 196, 6, 64, False),
]
CPU_SHAPES = [("tiny B1 N10 H2 Dv16 silu", 1, 10, 2, 16, True)]
#: (label, B, N, C) of the pre-norm rows.
NORM_SHAPES = [("rms_norm vig_tiny-1024 B64 N4096 C192", 64, 4096, 192)]
CPU_NORM_SHAPES = [("rms_norm tiny B1 N10 C48", 1, 10, 48)]
#: (label, B, N, C) of LayerNorm rows: MAViT-T stage 1 (256² tokens of 64) and Agent-PVT-S stage 2 (128² of 128).
LN_SHAPES = [
    ("layer_norm mavit_tiny-1024 stage1 B32 N65536 C64", 32, 256 * 256, 64),
    ("layer_norm agent_pvt_small-1024 stage2 B32 N16384 C128", 32, 128 * 128, 128),
]
CPU_LN_SHAPES = [("layer_norm tiny B1 N10 C24", 1, 10, 24)]
#: Tensors of rows x channels that must move through HBM per call.
_GATED_TENSORS = {"fwd": 4, "fwd+bwd": 11}
_NORM_TENSORS = {"fwd": 2, "fwd+bwd": 5}


def _make(build, mode: str, args):
    """``BenchCase.make`` of one row: ``build(rand, ones)`` returns ``(fn, inputs)`` from seeded factories."""

    def make():
        gen = torch.Generator().manual_seed(0)
        grad = mode != "fwd"
        rand = lambda *shape: torch.randn(*shape, generator=gen).to(args.device, args.dtype).requires_grad_(grad)
        ones = lambda n: torch.ones(n, device=args.device, dtype=args.dtype).requires_grad_(grad)
        return timed(*build(rand, ones), mode)

    return make


def _gated_inputs(fn, batch, tokens, heads, dv, silu):
    def build(rand, ones):
        def call(o, local, gate_logits, w_o, w_l):
            per_head = lambda t: t.unflatten(-1, (heads, dv))
            return fn(o, per_head(local), per_head(gate_logits), w_o, w_l, eps=1e-6, silu=silu)

        # local and the gate logits are (B, N, C) activations viewed per head, as in the module
        inputs = (rand(batch, tokens, heads, dv), rand(batch, tokens, heads * dv), rand(batch, tokens, heads * dv))
        return call, (*inputs, ones(dv), ones(dv))

    return build


def _norm_inputs(fn, batch, tokens, channels):
    return lambda rand, ones: (lambda x, w: fn(x, w, eps=1e-6), (rand(batch, tokens, channels), ones(channels)))


def _ln_inputs(fn, batch, tokens, channels):
    def build(rand, ones):
        inputs = (rand(batch, tokens, channels), ones(channels), ones(channels))
        return lambda x, w, b: fn(x, w, b, eps=1e-6), inputs

    return build


def cases(args) -> list[BenchCase]:
    on_gpu = args.device == "cuda"
    elt = torch.finfo(args.dtype).bits // 8
    peers = {}
    for name in ("gated_norm", "rms_norm", "layer_norm"):
        op, reference = getattr(ops, name), getattr(ops, f"{name}_reference")
        peers[name] = {"ours": lambda *t, op=op, **kw: op(*t, **kw, backend="triton"), "eager-glue": reference}
        if on_gpu:
            peers[name]["compiled-glue"] = torch.compile(reference, dynamic=False)
    gated_peers, norm_peers, ln_peers = peers["gated_norm"], peers["rms_norm"], peers["layer_norm"]
    groups = []
    for label, batch, tokens, heads, dv, silu in SHAPES if on_gpu else CPU_SHAPES:
        builds = {impl: _gated_inputs(fn, batch, tokens, heads, dv, silu) for impl, fn in gated_peers.items()}
        groups.append((label, builds, batch * tokens * heads * dv * elt, _GATED_TENSORS))
    for label, batch, tokens, channels in NORM_SHAPES if on_gpu else CPU_NORM_SHAPES:
        builds = {impl: _norm_inputs(fn, batch, tokens, channels) for impl, fn in norm_peers.items()}
        groups.append((label, builds, batch * tokens * channels * elt, _NORM_TENSORS))
    for label, batch, tokens, channels in LN_SHAPES if on_gpu else CPU_LN_SHAPES:
        builds = {impl: _ln_inputs(fn, batch, tokens, channels) for impl, fn in ln_peers.items()}
        groups.append((label, builds, batch * tokens * channels * elt, _NORM_TENSORS))
    rows = []
    for label, builds, tensor_bytes, tensors in groups:
        for mode in ("fwd", "fwd+bwd"):
            for impl, build in builds.items():
                make = _make(build, mode, args)
                bytes_moved = tensors[mode] * tensor_bytes
                rows.append(BenchCase(label, impl, mode, make, bytes=bytes_moved, baseline=impl == "eager-glue"))
    return rows
