"""Where a model's inference time goes: images/s, peak memory and the top kernels of ``torch.profiler``.

The session-4 backbone work (docs/benchmarks/README.md, "backbones made faster by profiling") started from this
table on the H100: bf16 weights and inputs, ``torch.no_grad``, eager. Timing: ``--iters`` forwards after
``--warmup``, synchronised wall clock (host overhead included, as a user's loop pays it); then two forwards under
the profiler, sorted by device time (CPU time on a machine without CUDA), and on CUDA the runtime calls per
forward (launches, copies, synchronisations: a synchronising call leaves the GPU idle while the host catches up). Peak memory: CUDA's allocator high-water
mark on a GPU; on CPU the high-water mark of the profiled forwards' tensor allocations (the running sum of the
profiler's allocation and free events, so activations only: weights and inputs were allocated before).

Usage::

    python tools/profile_model.py vig_tiny --img-size 1024 --batch 64
    python tools/profile_model.py deit_tiny_patch16_224 --img-size 1024 --batch 64 --kwargs img_size=1024
    python tools/profile_model.py mavit_tiny --img-size 1024 --batch 32 --kwargs attn_layout=linear
"""

import argparse
import ast
import time

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import visionattn  # noqa: F401  (registers the models)


def _kwargs(pairs: list[str]) -> dict:
    """``["a=1", "b=linear"]`` -> ``{"a": 1, "b": "linear"}`` (Python literals where they parse)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--kwargs entries must be key=value; got {pair!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="timm model name")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--kwargs", nargs="*", default=[], help="timm.create_model keyword arguments, key=value")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--rows", type=int, default=25, help="kernels listed")
    return parser.parse_args(argv)


def _cpu_activation_peak(prof) -> int:
    """Bytes: the highest running sum of the profiler's ``[memory]`` events (+size on allocation, -size on free)."""
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def _runtime_calls(prof, forwards: int) -> str:
    """The CUDA runtime/driver calls of the profiled forwards (launches, copies, synchronisations), per forward: a
    synchronising call (``cudaStreamSynchronize``, a pageable ``cudaMemcpy``) stalls the host until the GPU drains,
    which shows as idle GPU time between a forward's kernels."""
    calls = [e for e in prof.key_averages() if e.key.startswith(("cuda", "cu")) and e.device_type.name == "CPU"]
    lines = [f"{'runtime call':<40} {'calls/forward':>14} {'host us/forward':>16}"]
    for e in sorted(calls, key=lambda e: -e.cpu_time_total):
        lines.append(f"{e.key[:40]:<40} {e.count / forwards:>14.1f} {e.cpu_time_total / forwards:>16.1f}")
    return "\n".join(lines)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> str:
    args = _parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    model = timm.create_model(args.model, **_kwargs(args.kwargs)).to(args.device, dtype).eval()
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=args.device, dtype=dtype)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        for _ in range(args.warmup):
            model(images)
        _sync(args.device)
        start = time.perf_counter()
        for _ in range(args.iters):
            model(images)
        _sync(args.device)
        seconds = (time.perf_counter() - start) / args.iters
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with profile(activities=activities, profile_memory=args.device == "cpu") as prof:
            for _ in range(2):
                model(images)
            _sync(args.device)
    if args.device == "cuda":
        peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    else:
        peak = f", activation peak {_cpu_activation_peak(prof) / 2**20:.1f} MiB"
    header = (
        f"{args.model} {args.img_size}px B{args.batch} {args.dtype}: {seconds * 1e3:.1f} ms per forward, "
        f"{args.batch / seconds:.0f} img/s{peak}"
    )
    sort_by = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=args.rows, max_name_column_width=70)
    report = f"{header}\n{table}"
    if args.device == "cuda":
        report += f"\n{_runtime_calls(prof, forwards=2)}"
    print(report)
    return report


if __name__ == "__main__":
    main()
