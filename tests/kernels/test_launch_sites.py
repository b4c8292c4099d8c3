"""The block-sparse attention op (forward, dQ, dK/dV), the gated-linear-attention op, the token gather and the row ops (gated norm,
RMSNorm, LayerNorm, SwiGLU) launch their autotuned kernels through ``kernels/_launch.launch``: the first call of a signature goes through the autotuner, later ones call
the JIT function directly with the same config. The JIT functions are stubbed (nothing runs): this checks the
routing only; the results are tested in each op's own tests."""

import pytest
import torch
from triton.runtime.autotuner import Autotuner, Heuristics

from visionattn.kernels import (
    _launch,
    block_sparse,
    block_sparse_bwd,
    gated,
    gated_bwd,
    gated_fwd,
    gated_norm,
    row_gather,
    swiglu,
)
from visionattn.layout import BlockMask
from visionattn.ops import (
    block_sparse_attention,
    gated_linear_attention,
    gather_tokens,
    inverse_token_index,
    layer_norm,
    rms_norm,
)
from visionattn.ops import gated_norm as gated_norm_op
from visionattn.ops import swiglu as swiglu_op


def _record(monkeypatch, kernels: dict) -> tuple[dict, dict]:
    """Stub the JIT function under each autotuned kernel (and its heuristics); returns ``(autotuner runs, JIT runs)`` per kernel name,
    a JIT run recorded as its non-tensor arguments and keyword arguments (without the grid). One config each (as
    under the interpreter): on a GPU the autotuner must not benchmark, or cache on disk, stubbed launches."""
    tuned, launched = {name: 0 for name in kernels}, {name: [] for name in kernels}
    for name, kernel in kernels.items():
        assert isinstance(kernel, Autotuner)

        def tune(*args, _name=name, _run=kernel.run, **kwargs):
            tuned[_name] += 1
            return _run(*args, **kwargs)

        def run(*args, _name=name, grid, **kwargs):
            plain = tuple(a for a in args if not isinstance(a, torch.Tensor))
            launched[_name].append((plain, kwargs))

        jit = kernel.fn
        while isinstance(jit, Heuristics):  # the JIT function under the heuristics layers
            jit = jit.fn
        monkeypatch.setattr(kernel, "configs", kernel.configs[:1])
        monkeypatch.setattr(kernel, "run", tune)
        monkeypatch.setattr(jit, "run", run)
    monkeypatch.setattr(_launch, "_RESOLVED", {})
    return tuned, launched


def _gated_step(device):
    q, k, a, b = (torch.randn(1, 2, 40, 16, device=device, requires_grad=True) for _ in range(4))
    v = torch.randn(1, 2, 40, 32, device=device, requires_grad=True)
    out = gated_linear_attention(q, k, v, a, b, backend="triton")
    torch.autograd.grad(out, (q, k, v, a, b), torch.ones_like(out))


def _block_sparse_step(device):
    keep = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0]], dtype=torch.bool)[None, None]
    mask = BlockMask.from_block_matrix(keep, q_len=48, kv_len=48, block_q=16, block_k=16).to(device)
    q, k, v = (torch.randn(1, 2, 48, 16, device=device, requires_grad=True) for _ in range(3))
    out = block_sparse_attention(q, k, v, mask, backend="triton")
    torch.autograd.grad(out, (q, k, v), torch.ones_like(out))


def _gather_step(device):
    index = torch.tensor([3, -1, 0, 4, 1, 2], dtype=torch.int32, device=device)  # 6 slots: fwd and bwd differ
    x = torch.randn(1, 2, 5, 16, device=device, requires_grad=True)
    out = gather_tokens(x, index, inverse_token_index(index, 5), 2, backend="triton")
    torch.autograd.grad(out, x, torch.ones_like(out))


def _row_step(op):
    def step(device):
        x = torch.randn(2, 5, 3, 16, device=device, requires_grad=True)
        w = torch.ones(16, device=device, requires_grad=True)
        if op == "gated_norm":
            local, gate = torch.randn(2, 2, 5, 3, 16, device=device).unbind(0)
            out, inputs = gated_norm_op(x, local, gate, w, w, silu=True, backend="triton"), (x, w)
        elif op == "swiglu":
            out, inputs = swiglu_op(x, backend="triton"), (x,)
        else:
            norm = rms_norm if op == "rms_norm" else layer_norm
            out, inputs = norm(x, w, backend="triton"), (x, w)
        torch.autograd.grad(out, inputs, torch.ones_like(out))

    return step


_ROW_KERNELS = {
    "gated_norm": {"fwd": gated_norm._gated_norm_fwd_kernel, "bwd": gated_norm._gated_norm_bwd_kernel},
    "rms_norm": {"fwd": gated_norm._row_norm_fwd_kernel, "bwd": gated_norm._row_norm_bwd_kernel},
    "layer_norm": {"fwd": gated_norm._row_norm_fwd_kernel, "bwd": gated_norm._row_norm_bwd_kernel},
    "swiglu": {"fwd": swiglu._swiglu_fwd_kernel, "bwd": swiglu._swiglu_bwd_kernel},
}
_CASES = {
    "block_sparse_attention": (
        {
            "fwd": block_sparse._block_sparse_fwd_kernel,
            "dq": block_sparse_bwd._block_sparse_bwd_kernel_dq,
            "dkdv": block_sparse_bwd._block_sparse_bwd_kernel_dkdv,
        },
        _block_sparse_step,
    ),
    "gated_linear_attention": (
        {
            "state": gated._gated_kernel_state,
            "output": gated_fwd._gated_fwd_kernel_output,
            "bwd": gated_bwd._gated_bwd_kernel,
        },
        _gated_step,
    ),
    "gather_tokens": ({"gather": row_gather._row_gather_kernel}, _gather_step),
    **{op: (kernels, _row_step(op)) for op, kernels in _ROW_KERNELS.items()},
}


@pytest.mark.parametrize("op", list(_CASES))
def test_op_kernels_go_through_launch(op, kernel_device, monkeypatch):
    """Two forward + backward calls: each kernel is autotuned (its autotuner runs) on the first only, and its JIT
    function gets the same config and scalar arguments both times."""
    kernels, step = _CASES[op]
    tuned, launched = _record(monkeypatch, kernels)
    step(kernel_device)
    first = {name: list(calls) for name, calls in launched.items()}
    step(kernel_device)
    for name in kernels:
        calls = launched[name]
        # the state kernel runs for the forward and again (with the gradient scans) for the backward
        per_step = len(first[name])
        assert per_step >= 1 and tuned[name] == per_step, name
        assert calls[per_step:] == calls[:per_step], name
