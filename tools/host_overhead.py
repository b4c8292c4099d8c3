"""Per-call host (Python) overhead of the public ops, measured on CPU with every Triton launch replaced by a no-op.

On a GPU an op whose kernels are short is bound by the host: validation, backend selection, the
``torch.library`` custom-op dispatch, autograd bookkeeping, output allocation and the launchers' own Python. This
script times exactly that part on any machine: it forces ``TRITON_INTERPRET=1`` (so ``backend="triton"`` accepts
CPU tensors), replaces every Triton kernel object of ``visionattn.kernels`` by one whose ``kernel[grid](...)`` does
nothing, and times ``--calls`` calls of each op (forward, and forward + ``torch.autograd.grad``) with
``time.process_time`` (CPU time: other processes on a shared machine do not count) after a warm-up, reporting the fastest of ``--repeats`` runs (the machine may be shared), in
microseconds per call.

What it cannot see: Triton's own launcher on a real GPU (argument binding and specialisation, the driver launch),
roughly 10-40 µs per kernel launch there, and the CUDA caching allocator instead of the CPU one. With
``--autotuner-layers`` the ``triton.autotune`` / ``triton.heuristics`` wrappers stay and only the innermost JIT
function's ``run`` is a no-op; each autotuner gets two (identical) configs, so its per-call key computation runs as
on a GPU (with one config Triton skips it), and pruning keeps one, so nothing is benchmarked.
Shapes are tiny so that the few real CPU tensor ops (index gathers, partial sums) cost next to nothing; the host
path does not depend on the shape.

Usage::

    python tools/host_overhead.py                      # every op, the table in docs/kernels.md
    python tools/host_overhead.py --ops linear --profile linear   # cProfile of one op's forward + backward
    python tools/host_overhead.py --ops sparse_linear --autotuner-layers   # with the Triton wrappers' Python
"""

import argparse
import cProfile
import gc
import os
import pstats
import time
from collections.abc import Callable

os.environ["TRITON_INTERPRET"] = "1"  # read by triton and visionattn at import: set before either is imported

import torch  # noqa: E402


class _NoLaunch:
    """Stands in for a ``@triton.jit`` / autotuned kernel: ``kernel[grid](*args, **kwargs)`` does nothing."""

    def __getitem__(self, grid) -> Callable:
        return lambda *args, **kwargs: None


def _stub_innermost(kernel) -> None:
    """``kernel``'s autotune / heuristics layers kept (two configs per autotuner, pruned to one), its JIT function's
    ``run`` a no-op."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    layer = kernel
    while isinstance(layer, (Autotuner, Heuristics)):
        if isinstance(layer, Autotuner):
            layer.configs = layer.configs[:1] * 2
            layer.prune_configs = lambda kwargs, _layer=layer: _layer.configs[:1]
        layer = layer.fn
    layer.run = lambda *args, **kwargs: None


def _disable_launches(autotuner_layers: bool = False) -> None:
    import importlib
    import pkgutil

    from triton.runtime.jit import KernelInterface

    import visionattn.kernels as package

    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"visionattn.kernels.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, KernelInterface):
                if autotuner_layers:
                    _stub_innermost(value)
                else:
                    setattr(module, name, _NoLaunch())


def _cases() -> dict[str, Callable[[bool], Callable[[], tuple]]]:
    """``name -> make(requires_grad)``; ``make`` returns a zero-argument call of the op and its differentiable
    inputs. bf16 as on the GPU; tiny shapes."""
    from visionattn.layout import BlockMask, TokenGrid, topk_ratio_block_mask
    from visionattn.ops import (
        block_sparse_attention,
        gated_linear_attention,
        linear_attention,
        neighborhood_attention,
        sparse_linear_attention,
    )

    def qkv(b, h, n, d, dv, grad):
        make = lambda last: torch.randn(b, h, n, last, dtype=torch.bfloat16, requires_grad=grad)
        return make(d), make(d), make(dv)

    def linear(grad):
        q, k, v = qkv(2, 2, 256, 64, 64, grad)
        return lambda: linear_attention(q, k, v, normalize="divisive", backend="triton"), (q, k, v)

    def linear_rala_rope(grad):
        q, k, v = qkv(2, 2, 256, 64, 64, grad)
        rope = (torch.randn(256, 64), torch.randn(256, 64))
        call = lambda: linear_attention(
            q, k, v, normalize="additive", key_weight="rala", rope=rope, q_norm=q, k_norm=k, backend="triton"
        )
        return call, (q, k, v)

    def block_sparse(grad):
        q, k, v = qkv(2, 3, 1024, 64, 64, grad)
        keep = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0)) < 0.08
        keep[..., torch.arange(16), torch.arange(16)] = True
        mask = BlockMask.from_block_matrix(keep, q_len=1024, kv_len=1024, block_q=64, block_k=64)
        return lambda: block_sparse_attention(q, k, v, mask, backend="triton"), (q, k, v)

    def neighborhood(grad):
        grid = TokenGrid((16, 32))
        q, k, v = qkv(1, 2, grid.num_tokens, 32, 32, grad)
        return lambda: neighborhood_attention(q, k, v, grid, kernel_size=7, backend="triton"), (q, k, v)

    def gated(grad):
        q, k, v = qkv(2, 3, 256, 32, 64, grad)
        a, b = (torch.randn(2, 3, 256, 32, dtype=torch.bfloat16, requires_grad=grad) for _ in range(2))
        return lambda: gated_linear_attention(q, k, v, a, b, backend="triton"), (q, k, v, a, b)

    def sparse_linear(grad):
        q, k, v = qkv(1, 2, 512, 64, 64, grad)
        return lambda: sparse_linear_attention(q, k, v, topk_ratio=0.25, backend="triton"), (q, k, v)

    def sparse_linear_mask(grad):
        # the issue-6 benchmark row: a precomputed (reused) critical mask and a Proj weight; head dim 16 keeps the
        # masked-sum matmuls (real CPU work here, on the GPU asynchronous) out of the host time
        q, k, v = qkv(1, 2, 512, 16, 16, grad)
        mask = topk_ratio_block_mask(q.detach(), k.detach(), 64, 32, 0.25)
        weight = torch.randn(16, 16, dtype=torch.bfloat16)
        return lambda: sparse_linear_attention(q, k, v, weight, block_mask=mask, backend="triton"), (q, k, v)

    return {
        "linear_attention divisive": linear,
        "linear_attention additive+rala+rope+norm": linear_rala_rope,
        "block_sparse_attention": block_sparse,
        "neighborhood_attention 2D k7": neighborhood,
        "gated_linear_attention bidir": gated,
        "sparse_linear_attention topk": sparse_linear,
        "sparse_linear_attention block_mask + proj": sparse_linear_mask,
    }


def _step(call: Callable, inputs: tuple, backward: bool) -> Callable[[], None]:
    if not backward:
        return call

    def step():
        out = call()
        torch.autograd.grad(out, inputs, torch.ones_like(out))

    return step


def _time_us(step: Callable[[], None], calls: int, repeats: int) -> float:
    for _ in range(max(10, calls // 10)):
        step()
    runs = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.process_time()
            for _ in range(calls):
                step()
            runs.append((time.process_time() - start) / calls * 1e6)
    finally:
        gc.enable()
    return min(runs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=100, help="calls per timed run")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs; the fastest is reported")
    parser.add_argument("--ops", default="", help="comma-separated substrings selecting rows (default: all)")
    parser.add_argument("--profile", default="", help="cProfile the forward + backward of the first matching row")
    parser.add_argument(
        "--autotuner-layers",
        action="store_true",
        help="keep the Triton autotune/heuristics wrappers (stub the JIT run)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    _disable_launches(args.autotuner_layers)
    cases = {
        name: make
        for name, make in _cases().items()
        if not args.ops or any(s and s in name for s in args.ops.split(","))
    }
    if args.profile:
        name = next(n for n in cases if args.profile in n)
        step = _step(*cases[name](True), backward=True)
        _time_us(step, 50, 1)
        profiler = cProfile.Profile()
        profiler.runcall(lambda: [step() for _ in range(200)])
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(45)
        return
    print("| op | fwd µs/call | fwd+bwd µs/call |\n|---|---:|---:|")
    for name, make in cases.items():
        fwd = _time_us(_step(*make(False), backward=False), args.calls, args.repeats)
        both = _time_us(_step(*make(True), backward=True), args.calls, args.repeats)
        print(f"| {name} | {fwd:.0f} | {both:.0f} |", flush=True)


if __name__ == "__main__":
    main()
