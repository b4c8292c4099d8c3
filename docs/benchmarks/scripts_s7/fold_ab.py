"""Same-run A/B of the linear-attention inference fold bound (FOLD_MAX_CHUNKS 0 = state + merge + apply)."""
import torch
import triton

from visionattn.kernels import linear as L
from visionattn.ops import linear_attention

for b, h, n, d in ((64, 4, 3136, 32), (8, 8, 16384, 64)):
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    pos = torch.arange(n, device="cuda")[:, None] * torch.rand(d // 2, device="cuda")
    rope = (pos.cos(), pos.sin())
    for name, kw in (("plain", {}), ("mala-rope-pairs", dict(normalize="additive", rope=rope)), ("rala", dict(key_weight="rala"))):
        for bound in (0, 4, 8):
            L.FOLD_MAX_CHUNKS = bound
            f = lambda: linear_attention(q, k, v, backend="triton", **kw)
            with torch.no_grad():
                f()
                ms = triton.testing.do_bench_cudagraph(f, rep=300)
            print(f"B{b} H{h} N{n} d{d} chunks={L.chunking(n, b * h, q.device)[1]} {name:16s} FOLD_MAX_CHUNKS={bound}: {ms * 1e3:.1f} us", flush=True)
