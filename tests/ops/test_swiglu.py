"""swiglu op: the reference against a float64 formula and against timm's eager GluMlp gating (bit for bit), backend
selection, and every validation error."""

import pytest
import torch
from torch import nn

from tests._numerics import assert_close
from tests.kernels.test_swiglu import _brute, _inputs
from visionattn.ops import swiglu, swiglu_reference


def test_swiglu_reference_matches_float64():
    x = _inputs(2, 5, 48).requires_grad_()
    out, ref = swiglu_reference(x), _brute(x)
    assert_close("out", ref, out)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert_close("dx", torch.autograd.grad(ref, x, grad_out)[0], torch.autograd.grad(out, x, grad_out)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_swiglu_reference_is_timm_glu_gating(dtype):
    """timm's GluMlp.forward with gate_last=False: chunk fc1's output, act(first half) times the second half."""
    x = _inputs(3, 4, 64).to(dtype)
    x1, x2 = x.chunk(2, dim=-1)
    assert torch.equal(swiglu(x, backend="reference"), nn.SiLU()(x1) * x2)


@pytest.mark.parametrize("backend", [None, "torch"])
def test_swiglu_cpu_default_and_torch_are_the_reference(backend):
    """Automatic selection never picks the interpreter on CPU; "torch" names the same PyTorch function."""
    x = _inputs(2, 3, 32).float()
    assert torch.equal(swiglu(x, backend=backend), swiglu_reference(x))


def test_swiglu_reference_backend_takes_float64():
    x = _inputs(4, 10)
    assert_close("out", _brute(x), swiglu(x, backend="reference"))


def test_swiglu_triton_rejects_unsupported_dtype(kernel_device):
    with pytest.raises(NotImplementedError, match="x.dtype"):
        swiglu(_inputs(2, 16).to(kernel_device), backend="triton")


def test_swiglu_rejects_bad_arguments():
    x = _inputs(2, 16)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        swiglu(x.tolist())
    with pytest.raises(TypeError, match="x.dtype"):
        swiglu(x.long())
    with pytest.raises(ValueError, match="x must have at least 1 dim"):
        swiglu(torch.tensor(1.0))
    with pytest.raises(ValueError, match="even last dim"):
        swiglu(x[:, :15])
    with pytest.raises(ValueError, match="backend"):
        swiglu(x, backend="cuda")
