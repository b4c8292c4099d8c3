"""kernels/_launch.launch: the launch ``kernel[grid]`` makes, with the autotuner's config and the heuristics' values
recorded per call signature instead of recomputed."""

import pytest
import torch
import triton
import triton.language as tl

from visionattn.kernels import _launch
from visionattn.kernels._launch import launch


@triton.jit
def _axpb_kernel(x_ptr, out_ptr, n, shift, BLOCK: tl.constexpr, SCALE: tl.constexpr, OFFSET: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + o, mask=o < n, other=0.0)
    tl.store(out_ptr + o, x * SCALE + OFFSET + shift, mask=o < n)


def _kernel(pre_hook=None):
    """``out = x·SCALE + OFFSET + shift``: SCALE from the (single) config, OFFSET from a heuristic on ``n``."""
    heuristic = triton.heuristics({"OFFSET": lambda args: args["n"] % 7 + args["SCALE"]})(_axpb_kernel)
    config = triton.Config({"SCALE": 3}, num_warps=4, pre_hook=pre_hook)
    return triton.autotune(configs=[config], key=["n"])(heuristic)


def _run(kernel, n: int, device, shift: float = 0.5) -> torch.Tensor:
    x = torch.arange(n, dtype=torch.float32, device=device)
    out = torch.empty_like(x)
    launch(kernel, (triton.cdiv(n, 16),), x, out, n, shift, BLOCK=16)
    torch.testing.assert_close(out, x * 3 + (n % 7 + 3) + shift, rtol=0, atol=0)
    return out


def test_launch_replays_the_config_and_heuristics_of_each_signature(kernel_device, monkeypatch):
    """The first call of a signature goes through the autotuner; later ones call the JIT function directly with the
    same arguments (checked against the recorded call of ``kernel[grid]``), and a new ``n`` gets its own entry."""
    monkeypatch.setattr(_launch, "_RESOLVED", {})
    kernel = _kernel()
    _run(kernel, 40, kernel_device)
    assert len(_launch._RESOLVED) == 1
    jit_fn, extra = next(iter(_launch._RESOLVED.values()))
    assert extra == {**kernel.configs[0].all_kwargs(), "OFFSET": 40 % 7 + 3}
    calls = []
    run = jit_fn.run
    monkeypatch.setattr(jit_fn, "run", lambda *a, **k: calls.append((a, k)) or run(*a, **k))
    x, out = torch.zeros(40, device=kernel_device), torch.empty(40, device=kernel_device)
    kernel[(3,)](x, out, 40, 0.5, BLOCK=16)
    launch(kernel, (3,), x, out, 40, 0.5, BLOCK=16)
    assert len(calls) == 2 and calls[0][0] == calls[1][0] and calls[0][1] == calls[1][1]
    _run(kernel, 40, kernel_device)
    _run(kernel, 41, kernel_device)
    assert len(_launch._RESOLVED) == 2


def test_launch_keeps_the_autotuner_for_pre_hook_configs_and_plain_callables(kernel_device, monkeypatch):
    """A config with a pre-hook (it must run every launch) and an object that is no autotuner chain are launched as
    ``kernel[grid]`` every call, never recorded."""
    monkeypatch.setattr(_launch, "_RESOLVED", {})
    hooks = []
    kernel = _kernel(pre_hook=lambda args: hooks.append(args["n"]))
    for _ in range(2):
        _run(kernel, 24, kernel_device)
    assert hooks == [24, 24] and not _launch._RESOLVED
    seen = []

    class Stub:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append((grid, args, kwargs))

    for _ in range(2):
        launch(Stub(), (1,), 5, FLAG=True)
    assert seen == [((1,), (5,), {"FLAG": True})] * 2 and not _launch._RESOLVED


@pytest.mark.gpu
def test_launch_replays_on_cuda():
    kernel = _kernel()
    for n in (40, 40, 1000):
        _run(kernel, n, "cuda")
