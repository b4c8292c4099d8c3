"""Bidirectional gated linear attention (issue 5): our one-launch chunked kernels against ViG's training path (fla's
causal ``chunk_gla`` on the batch-concatenated ``[x; flip(x)]``, when fla is installed) and the float32 recurrence
in PyTorch.

GLA at these head dims is memory-bound, so every row carries ``bytes``: the minimum HBM traffic (q, k, v and both
gates read, o written forward; those plus dO read and all five gradients written backward). The fla row is the
baseline of each group (the issue's target: ours >= 1.5x faster, forward and forward+backward).

    python tools/bench.py attention --cases gated --mode both --dtype bf16 --out docs/benchmarks/gated_h100
"""

import contextlib
import inspect

import torch
import torch.nn.functional as F

from tools.bench_cases._common import BenchCase, random_qkv, timed
from visionattn.kernels import gated as gated_kernels
from visionattn.ops import gated_linear_attention, gated_linear_attention_reference

__all__ = ["cases"]

#: (label, B, H, N, Dk, Dv): ViG-S at 224 px, ViG-T at 1024 px, ViG-H stage 1 at 224 px.
SHAPES = [
    ("ViG-S-224 B256 H6 N196 dk32 dv64", 256, 6, 196, 32, 64),
    ("ViG-T-1024 B8 H3 N4096 dk32 dv64", 8, 3, 4096, 32, 64),
    ("ViG-H-s1-224 B128 H3 N3136 dk16 dv32", 128, 3, 3136, 16, 32),
]
CPU_SHAPES = [("tiny B1 H2 N40 dk16 dv16", 1, 2, 40, 16, 16)]
#: The PyTorch recurrence launches ~10 kernels per token; longer sequences are cut to this many tokens.
RECURRENCE_MAX_TOKENS = 256


def _gates(batch, heads, length, dk, *, device, dtype, requires_grad):
    """ViG's gates: logsigmoid of a low-rank projection, divided by the normaliser 16."""
    gen = torch.Generator().manual_seed(1)
    make = lambda: (F.logsigmoid(torch.randn(batch, heads, length, dk, generator=gen)) / 16).to(device, dtype)
    return make().requires_grad_(requires_grad), make().requires_grad_(requires_grad)


def _fla_bidirectional():
    """ViG's training path: fla's causal chunk_gla over [x; flip(x)] on the batch axis, halves flipped back."""
    try:
        from fla.ops.gla import chunk_gla
    except ImportError:
        return None
    # fla >= 0.2 is sequence-first (B, T, H, K); older releases default to head-first
    layout = {"head_first": False} if "head_first" in inspect.signature(chunk_gla).parameters else {}

    def run(q, k, v, a, b):
        def cat(x, y):
            return torch.cat([x, y.flip(2)]).transpose(1, 2)

        o = chunk_gla(cat(q, q), cat(k, k), cat(v, v), cat(a, b), scale=q.shape[-1] ** -0.5, **layout)[0]
        o_fwd, o_bwd = o.transpose(1, 2).chunk(2)
        return (o_fwd + o_bwd.flip(2)) / 2

    return run


@contextlib.contextmanager
def _unsegmented_scans():
    """State scans as one chain of chunks per scan (no segments, no carry pass), as before session 7."""
    saved = gated_kernels._SCAN_PROGRAMS_PER_SM
    gated_kernels._SCAN_PROGRAMS_PER_SM = 0
    try:
        yield
    finally:
        gated_kernels._SCAN_PROGRAMS_PER_SM = saved


def _within(context, make):
    """``make`` of a row whose every call (forward and backward) runs inside ``context()``."""

    def build():
        step = make()

        def run():
            with context():
                return step()

        return run

    return build


def _row(fn, shape_args: tuple, mode: str, args, cut: int | None = None):
    """``BenchCase.make`` of one row: fresh q, k, v and both gates; ``cut``: only the first ``cut`` tokens, in float32
    (the PyTorch recurrence)."""
    batch, heads, length, dk, dv = shape_args

    def make():
        grad = mode != "fwd" and cut is None
        dd = dict(device=args.device, dtype=args.dtype, requires_grad=grad)
        inputs = (*random_qkv(batch, heads, length, dk, value_dim=dv, **dd), *_gates(batch, heads, length, dk, **dd))
        if cut is not None:
            inputs = [t[:, :, :cut].float().requires_grad_(mode != "fwd") for t in inputs]
        return timed(fn, inputs, mode)

    return make


def cases(args) -> list[BenchCase]:
    on_gpu = args.device == "cuda"
    if args.dtype == torch.float32:
        # fla's kernels run float32 matmuls in TF32; ours follow torch's switch, so compare like with like
        torch.set_float32_matmul_precision("high")
    fla = _fla_bidirectional() if on_gpu else None
    # "ours-logits" reads the gate tensors as logits (logsigmoid(x) / 16 in-kernel, as GatedLinearAttention2d calls
    # it); "ours-fp32-gate-glue" is the call it replaced: fp32 cast, logsigmoid and divide in PyTorch, then the op
    peers = {
        "ours": lambda q, k, v, a, b: gated_linear_attention(q, k, v, a, b),
        "ours-causal": lambda q, k, v, a, b: gated_linear_attention(q, k, v, a),
        "ours-logits": lambda q, k, v, a, b: gated_linear_attention(q, k, v, a, b, gate_normalizer=16.0),
        "ours-fp32-gate-glue": lambda q, k, v, a, b: gated_linear_attention(
            q, k, v, F.logsigmoid(a.float()) / 16, F.logsigmoid(b.float()) / 16
        ),
    }
    if on_gpu:
        # the op's chunk size (64) against 128: half the stored states and sequential state steps, half the programs
        op = torch.ops.visionattn.gated_linear_attention_fwd
        peers["ours-chunk128"] = lambda q, k, v, a, b: op(q, k, v, a, b, q.shape[-1] ** -0.5, 128, 0.0)
    if fla is not None:
        peers["fla-chunk_gla-concat"] = fla
    rows = []
    for label, batch, heads, length, dk, dv in SHAPES if on_gpu else CPU_SHAPES:
        elt = torch.finfo(args.dtype).bits // 8
        tokens = batch * heads * length
        mode_bytes = {"fwd": elt * tokens * (4 * dk + 2 * dv), "fwd+bwd": elt * tokens * (12 * dk + 5 * dv)}
        # the recurrence's own work: state update and readout, 4·Dk·Dv per token and direction; backward 2x
        mode_flops = {"fwd": 8.0 * tokens * dk * dv, "fwd+bwd": 24.0 * tokens * dk * dv}
        shape_args = (batch, heads, length, dk, dv)
        for mode in ("fwd", "fwd+bwd"):
            common = dict(group=label, mode=mode, bytes=mode_bytes[mode], flops=mode_flops[mode])
            for impl, fn in peers.items():
                make = _row(fn, shape_args, mode, args)
                rows.append(BenchCase(impl=impl, make=make, baseline=impl.startswith("fla"), **common))
            # same-process A/B of the segmented state scan (a no-op where scans are one segment anyway)
            make = _within(_unsegmented_scans, _row(peers["ours"], shape_args, mode, args))
            rows.append(BenchCase(impl="ours-unsegmented-scan", make=make, **common))
            cut = min(length, RECURRENCE_MAX_TOKENS)
            impl = "torch-recurrence-fp32" + ("" if cut == length else f" (first {cut} of {length} tokens)")
            scaled = {key: value * cut / length for key, value in common.items() if key in ("bytes", "flops")}
            make = _row(gated_linear_attention_reference, shape_args, mode, args, cut=cut)
            rows.append(BenchCase(impl=impl, make=make, **{**common, **scaled}))
    return rows
