import sys
import torch
from torch.profiler import profile, ProfilerActivity
from visionattn.kernels import linear as L
from visionattn.ops import linear_attention

torch.manual_seed(0)
for b, h, n, d in [(1, 12, 32760, 128), (8, 2, 65536, 64)]:
    print("chunking", L.chunking(n, b * h, torch.device("cuda")))
    for name, kw in {"plain": dict(normalize="divisive"), "mala": dict(normalize="additive")}.items():
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        fn = lambda: linear_attention(q, k, v, backend="triton", **kw)
        with torch.no_grad():
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as p:
                for _ in range(10):
                    fn()
                torch.cuda.synchronize()
        print(f"### B{b} H{h} N{n} d{d} {name} fwd (10 calls)")
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))
        for kern in (L._linear_fwd_kernel_state, L._linear_fwd_kernel_apply):
            cache = getattr(kern, "cache", None) or {}
            for key, cfg in list(cache.items())[-3:]:
                print("  best", key, cfg)
        sys.stdout.flush()
