"""The eager fast path of the Triton custom ops (``visionattn.ops._eager``) against the registered ops."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests._numerics import assert_close
from visionattn.layout import BlockMask
from visionattn.ops import block_sparse_attention, gated_linear_attention, linear_attention
from visionattn.ops._eager import _dispatcher_needed


class _PassThrough(TorchDispatchMode):
    """A dispatch mode that changes nothing: while it is active every op call must go through the dispatcher."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Subclass(torch.Tensor):
    pass


def test_dispatcher_needed_only_outside_plain_eager():
    x = torch.randn(2)
    assert not _dispatcher_needed((x, None, 1.0, "elu1", [1, 2]))
    assert _dispatcher_needed((x.as_subclass(_Subclass),))
    with _PassThrough():
        assert _dispatcher_needed((x,))
    with torch.device("meta"):  # a TorchFunctionMode only: still plain eager dispatch
        assert not _dispatcher_needed((x,))


def test_dispatcher_used_when_torch_lacks_the_private_hooks(monkeypatch):
    from visionattn.ops import _eager

    monkeypatch.setattr(_eager, "_FUNCTORCH_ACTIVE", None)
    assert _dispatcher_needed((torch.randn(2),))


def _mask(rng) -> BlockMask:
    keep = torch.rand(1, 2, 2, 2, generator=rng) < 0.7
    keep[..., 0, 0] = True
    return BlockMask.from_block_matrix(keep, q_len=32, kv_len=32, block_q=16, block_k=16)


_CASES = {
    "linear": (lambda q, k, v, g, _: linear_attention(q, k, v, key_weight="rala", backend="triton"), 16),
    "block_sparse": (lambda q, k, v, g, mask: block_sparse_attention(q, k, v, mask, backend="triton"), 16),
    "gated": (lambda q, k, v, g, _: gated_linear_attention(q, k, v, g, g * 0.5, backend="triton"), 16),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_eager_path_matches_registered_op(kernel_device, rng, case):
    """Output and gradients of a plain eager call equal those of the same call forced through the dispatcher."""
    fn, d = _CASES[case]
    mask = _mask(rng).to(kernel_device)
    inputs = [torch.randn(1, 2, 32, d, generator=rng).to(kernel_device) for _ in range(3)]
    inputs.append(torch.nn.functional.logsigmoid(torch.randn(1, 2, 32, d, generator=rng)).to(kernel_device))
    grad_out = torch.randn(1, 2, 32, d, generator=rng).to(kernel_device)
    results = []
    for mode in (None, _PassThrough()):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        if mode is None:
            out = fn(*leaves, mask)
            grads = torch.autograd.grad(out, leaves[:3], grad_out)
        else:
            with mode:
                out = fn(*leaves, mask)
                grads = torch.autograd.grad(out, leaves[:3], grad_out)
        results.append((out, *grads))
    for name, eager, dispatched in zip(("out", "dq", "dk", "dv"), *results):
        assert torch.equal(eager, dispatched), name
    with torch.no_grad():
        assert_close("no_grad out", results[0][0], fn(*inputs, mask))
