"""Same-run A/B of the linear-attention forward settings (session 8), forward without autograd, CUDA graphs.

    python docs/benchmarks/scripts_s8/linear_ab.py [--profile]

Settings: ``s7`` = the unsplit state pass and the query mean at 4 programs/SM (session 7's kernels up to the
autotune configs added since, which the autotuner may pick or not), ``new`` = the defaults, ``new+apply8`` = the
defaults with the apply kernel at 8 programs/SM. With ``--profile``, the per-kernel GPU time (torch.profiler, ten
calls) and the autotuner's pick of each kernel per setting.
"""

import sys

import torch
import triton
from torch.profiler import ProfilerActivity, profile

from visionattn.kernels import linear as L
from visionattn.kernels import linear_query_mean as QM
from visionattn.ops import linear_attention

SETTINGS = {
    "s7": {(L, "STATE_TILE_ELEMS"): 0, (QM, "QUERY_MEAN_PROGRAMS_PER_SM"): 4, (L, "APPLY_PROGRAMS_PER_SM"): 4},
    "new": {},
    "new+apply8": {(L, "APPLY_PROGRAMS_PER_SM"): 8},
}
DEFAULTS = {key: getattr(*key) for setting in SETTINGS.values() for key in setting}
SHAPES = ((1, 12, 32760, 128), (8, 8, 16384, 64), (64, 4, 3136, 32))
VARIANTS = {"plain": {}, "mala": dict(normalize="additive"), "rala": dict(key_weight="rala")}
PROFILE = "--profile" in sys.argv

for b, h, n, d in SHAPES:
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    # half of the q, k, v, o bytes read and written: the same HBM traffic as the forward's minimum
    copy_src = torch.empty(2 * q.numel(), dtype=torch.bfloat16, device="cuda")
    copy_dst = torch.empty_like(copy_src)
    copy_ms = triton.testing.do_bench_cudagraph(lambda s=copy_src, t=copy_dst: t.copy_(s), rep=300)
    print(f"B{b} H{h} N{n} d{d}: HBM copy of the forward's bytes {copy_ms * 1e3:.1f} us", flush=True)
    for name, kw in VARIANTS.items():
        for setting, values in SETTINGS.items():
            for (module, attr), value in {**DEFAULTS, **values}.items():
                setattr(module, attr, value)
            f = lambda q=q, k=k, v=v, kw=kw: linear_attention(q, k, v, backend="triton", **kw)
            with torch.no_grad():
                f()
                ms = triton.testing.do_bench_cudagraph(f, rep=300)
                line = f"B{b} H{h} N{n} d{d} {name:6s} {setting:11s}: {ms * 1e3:7.1f} us  ({copy_ms / ms:5.1%} of copy)"
                print(line, "state chunks", L.state_chunking(n, b * h, d, d, q.device)[1], flush=True)
                if PROFILE:
                    torch.cuda.synchronize()
                    with profile(activities=[ProfilerActivity.CUDA]) as p:
                        for _ in range(10):
                            f()
                        torch.cuda.synchronize()
                    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))
                    kernels = {
                        "query_mean": QM._linear_fwd_kernel_query_mean,
                        "state": L._linear_fwd_kernel_state,
                        "apply": L._linear_fwd_kernel_apply,
                    }
                    for kernel_name, kern in kernels.items():
                        for cfg in list(getattr(kern, "cache", {}).values())[-1:]:
                            print("    last tuned", kernel_name, cfg)
    for (module, attr), value in DEFAULTS.items():
        setattr(module, attr, value)
