"""Run every visionattn op on small 1D/2D/3D grids, check it against the float64 reference, print a table.

    python tools/showcase.py

On a machine without a GPU the Triton kernels run under the Triton interpreter (``TRITON_INTERPRET=1``) in fp32;
on CUDA they run natively in bf16. Each row reports the pattern, its density, the backend and the relative error
of the output and of the input gradients against the same op's float64 reference on fresh random inputs.
"""

import os
import pathlib
import sys
import time

import torch  # noqa: E402  (importing torch does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from visionattn import ops  # noqa: E402
from visionattn.layout import (  # noqa: E402
    TokenGrid,
    TokenLayout,
    circular_window_block_mask,
    radial_block_mask,
    topk_routing_block_mask,
)

_ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if _ON_GPU else "cpu")
DTYPE = torch.bfloat16 if _ON_GPU else torch.float32
TOLERANCE = 2e-2 if _ON_GPU else 1e-4


def _inputs(*shapes, positive=False, gen):
    out = []
    for shape in shapes:
        t = torch.randn(*shape, generator=gen, dtype=torch.float64)
        out.append(-torch.rand(*shape, generator=gen, dtype=torch.float64) if positive == "gate" else t)
    return out


def _errors(fn, tensors, gen) -> tuple[float, float, float]:
    """(output error, worst gradient error, seconds) of ``fn`` at DTYPE vs ``fn`` at float64 reference."""
    ref_in = [t.clone().requires_grad_(True) for t in tensors]
    ref = fn(*ref_in, reference=True)
    grad_out = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    ref.backward(grad_out)
    low_in = [t.to(DEVICE, DTYPE).requires_grad_(True) for t in tensors]
    start = time.perf_counter()
    out = fn(*low_in, reference=False)
    out.backward(grad_out.to(DEVICE, DTYPE))
    seconds = time.perf_counter() - start
    rel = lambda a, b: float((a.detach().double().cpu() - b.detach()).norm() / b.detach().norm().clamp_min(1e-30))
    grad_err = max(rel(a.grad, b.grad) for a, b in zip(low_in, ref_in))
    return rel(out, ref), grad_err, seconds


def _block_sparse_case(mask, layout=None):
    def run(q, k, v, reference):
        if layout is not None:
            q, k, v = (layout.to_layout(t) for t in (q, k, v))
        m = mask.to(q.device)
        out = ops.block_sparse_attention(q, k, v, m, backend="reference" if reference else "triton")
        return layout.from_layout(out) if layout is not None else out

    return run


def cases(gen):
    """(op, pattern, density, fn, inputs) rows."""
    b, h, d = 1, 1, 16
    qkv = lambda n, dv=d: _inputs((b, h, n, d), (b, h, n, d), (b, h, n, dv), gen=gen)

    grid2 = TokenGrid((5, 7), extra_before=2)
    yield (
        "neighborhood_attention",
        "2D 5x7 k=3 +2 global",
        None,
        (
            lambda q, k, v, reference: ops.neighborhood_attention(
                q, k, v, grid2, 3, backend="reference" if reference else "triton", tile=(4, 4)
            )
        ),
        qkv(grid2.num_tokens),
    )
    grid3 = TokenGrid((2, 4, 8))
    yield (
        "neighborhood_attention",
        "3D 2x4x8 k=(2,3,3) stride=(1,3,3)",
        None,
        (
            lambda q, k, v, reference: ops.neighborhood_attention(
                q,
                k,
                v,
                grid3,
                (2, 3, 3),
                stride=(1, 3, 3),
                backend="reference" if reference else "triton",
                tile=(1, 4, 4),
            )
        ),
        qkv(grid3.num_tokens),
    )

    layout = TokenLayout(TokenGrid((12, 12), extra_before=4), tile=(4, 4))
    mask = circular_window_block_mask(layout, radius=3)
    yield (
        "block_sparse_attention",
        "CLEAR circle r=3 on 12x12 +4 text",
        mask.density(),
        _block_sparse_case(mask, layout),
        qkv(layout.grid.num_tokens),
    )

    mask = radial_block_mask(num_frames=4, tokens_per_frame=16, block_size=16, decay_factor=1.0)
    yield "block_sparse_attention", "radial 4 frames x 16 tokens", mask.density(), _block_sparse_case(mask), qkv(64)

    layout = TokenLayout(TokenGrid((8, 8)), tile=(2, 2))
    q_route, k_route = _inputs((b, 64, 8), (b, 64, 8), gen=gen)
    mask = topk_routing_block_mask(layout.to_layout(q_route, dim=1), layout.to_layout(k_route, dim=1), layout, 3)
    yield (
        "block_sparse_attention",
        "BiFormer routing 4x4 regions top-3",
        mask.density(),
        _block_sparse_case(mask, layout),
        qkv(64),
    )

    n = 48
    cos, sin = (t.to(DEVICE) for t in _rope_tables(n, d))
    for label, kwargs in (
        ("MALA additive + RoPE", dict(normalize="additive", rope=(cos, sin))),
        ("RALA weighted + RoPE", dict(normalize="divisive", key_weight="rala", rope=(cos, sin))),
        ("LinFusion elu+1 divisive", dict(normalize="divisive")),
    ):

        def run(q, k, v, reference, kwargs=kwargs):
            kw = dict(kwargs)
            if "rope" in kw:
                kw["rope"] = tuple(t.to(q.device, q.dtype) for t in kw["rope"])
            return ops.linear_attention(q, k, v, backend="reference" if reference else "triton", **kw)

        yield "linear_attention", label, 1.0, run, qkv(n)

    q, k, v = qkv(40, dv=32)
    gates = _inputs((b, h, 40, d), (b, h, 40, d), positive="gate", gen=gen)

    def gla(q, k, v, gf, gb, reference):
        return ops.gated_linear_attention(q, k, v, gf, gb, backend="reference" if reference else "triton")

    yield "gated_linear_attention", "ViG bidirectional, N=40", 1.0, gla, [q, k, v, *gates]

    q, k, v = qkv(49)
    agents, bias_a, bias_q = _inputs((b, h, 9, d), (b, h, 9, 49), (b, h, 49, 9), gen=gen)

    def agent(q, k, v, a, ba, bq, reference):
        return ops.agent_attention(q, k, v, a, ba, bq, backend="reference" if reference else "sdpa")

    yield "agent_attention", "9 agents over 7x7", 1.0, agent, [q, k, v, agents, bias_a, bias_q]


def _rope_tables(n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    angle = torch.arange(n, dtype=torch.float64)[:, None] / 10.0 ** torch.linspace(0, 3, d // 2, dtype=torch.float64)
    angle = angle.repeat_interleave(2, dim=-1)
    return angle.cos(), angle.sin()


def main() -> int:
    gen = torch.Generator().manual_seed(0)
    rows, failed = [], 0
    print(f"visionattn showcase on {DEVICE.type} ({'bf16 kernels' if _ON_GPU else 'fp32, Triton interpreter'})")
    for op, pattern, density, fn, tensors in cases(gen):
        out_err, grad_err, seconds = _errors(fn, tensors, gen)
        ok = out_err <= TOLERANCE and grad_err <= TOLERANCE
        failed += not ok
        density = f"{density:.3f}" if density is not None else "-"
        rows.append(
            (op, pattern, density, f"{out_err:.1e}", f"{grad_err:.1e}", f"{seconds:.2f}", "ok" if ok else "FAIL")
        )
    header = ("op", "pattern", "density", "rel err out", "rel err grads", "s", "check")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    print(f"{len(rows) - failed} of {len(rows)} ops match their float64 reference (tolerance {TOLERANCE:.0e}).")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
