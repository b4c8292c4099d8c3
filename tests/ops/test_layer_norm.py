"""layer_norm op: the reference is ``F.layer_norm`` / ``nn.LayerNorm`` bit for bit, validation errors, and the
dispatch rule shared with rms_norm: ``backend=None`` runs Triton only when autograd will not record the call."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from tests._numerics import assert_close
from tests.kernels.test_layer_norm import _leaves, _ln_brute
from visionattn.ops import layer_norm, layer_norm_reference, rms_norm

# the modules, not the functions of the same name that the packages re-export
norm_kernels = importlib.import_module("visionattn.kernels.gated_norm")
norm_ops = importlib.import_module("visionattn.ops.gated_norm")


def test_layer_norm_reference_matches_brute_force():
    leaves = [t.requires_grad_() for t in _leaves((3, 5, 24))]
    out, ref = layer_norm_reference(*leaves, eps=1e-6), _ln_brute(*leaves, 1e-6)
    assert_close("out", ref, out)
    for name, r, g in zip(
        ("dx", "dw", "db"), torch.autograd.grad(ref.sum(), leaves), torch.autograd.grad(out.sum(), leaves)
    ):
        assert_close(name, r, g)


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_reference_is_nn_layer_norm(bias):
    x = torch.randn(2, 3, 4, 48, generator=torch.Generator().manual_seed(0)).bfloat16()
    module = torch.nn.LayerNorm(48, eps=1e-6, bias=bias, dtype=torch.bfloat16)
    with torch.no_grad():
        module.weight.normal_(1, 0.5, generator=torch.Generator().manual_seed(1))
    for backend in (None, "reference", "torch"):
        assert torch.equal(layer_norm(x, module.weight, module.bias, eps=1e-6, backend=backend), module(x))


def test_layer_norm_rejects_bad_arguments(kernel_device):
    x, w = torch.randn(2, 3, 8), torch.ones(8)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer_norm(x.tolist(), w)
    with pytest.raises(ValueError, match="x must have at least 1 dim"):
        layer_norm(torch.tensor(1.0), w)
    with pytest.raises(TypeError, match="x.dtype"):
        layer_norm(x.long(), w)
    with pytest.raises(ValueError, match="weight must have one entry per channel of x"):
        layer_norm(x, w[:4])
    with pytest.raises(ValueError, match="bias must have one entry per channel of x"):
        layer_norm(x, w, w[:4])
    with pytest.raises(ValueError, match="bias must be on the device of x"):
        layer_norm(x, w, w.to("meta"))
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        layer_norm(x, w, 0.0)
    with pytest.raises(ValueError, match="eps"):
        layer_norm(x, w, eps=0.0)
    with pytest.raises(ValueError, match="backend"):
        layer_norm(x, w, backend="apex")
    wide = torch.randn(2, 1025, device=kernel_device)
    with pytest.raises(NotImplementedError, match="channels"):
        layer_norm(wide, torch.ones(1025, device=kernel_device), backend="triton")
    with pytest.raises(NotImplementedError, match="x.dtype"):
        layer_norm(x.double().to(kernel_device), w.double().to(kernel_device), backend="triton")


def test_no_autograd_constraint():
    """Automatic selection only: false exactly when grad mode is on and x, weight or bias requires grad."""
    check = norm_ops._requires_no_autograd("x", "weight", "bias")
    x, w = torch.ones(2, 4), torch.ones(4)
    args = lambda **grads: {"x": x, "weight": w, "bias": None} | grads
    assert check(args(), False)
    assert not check(args(x=x.requires_grad_(False).clone().requires_grad_()), False)
    assert not check(args(bias=w.clone().requires_grad_()), False)
    assert check(args(weight=w.clone().requires_grad_()), True)  # an explicit backend is never refused
    with torch.no_grad():
        assert check(args(weight=w.clone().requires_grad_()), False)


@pytest.fixture
def triton_on_cpu(kernel_device, monkeypatch):
    """Let automatic selection take the interpreter on CPU (it is CUDA-only otherwise), and count kernel launches."""
    for registry in (norm_ops._ln_registry, norm_ops._rms_registry):
        triton = registry._backends["triton"]
        on_device = lambda args, raise_error: True
        monkeypatch.setattr(triton, "constraints", [on_device, *triton.constraints[1:]])
    calls = []
    for name in ("layer_norm_fwd", "rms_norm_fwd"):
        real = getattr(norm_kernels, name)
        monkeypatch.setattr(norm_kernels, name, lambda *a, _real=real: calls.append(a) or _real(*a))
    return kernel_device, calls


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_automatic_backend_is_pytorch_under_autograd(triton_on_cpu, op):
    """With a gradient to record, ``backend=None`` is PyTorch's fused kernel bit for bit (and its autograd node);
    under no_grad or on inputs not requiring grad it is the Triton kernel; ``backend="triton"`` always is."""
    device, calls = triton_on_cpu
    x, w, b = (t.float().to(device) for t in _leaves((3, 5, 24)))
    if op == "layer_norm":
        fn, torch_fn = (lambda x, w, **kw: layer_norm(x, w, b, **kw)), (lambda x, w: F.layer_norm(x, (24,), w, b))
    else:
        fn, torch_fn = rms_norm, (lambda x, w: F.rms_norm(x, (24,), w, 1e-6))
    x.requires_grad_()
    out = fn(x, w)
    assert not calls and torch.equal(out, torch_fn(x, w)) and type(out.grad_fn) is type(torch_fn(x, w).grad_fn)
    fn(x, w, backend="triton")
    assert len(calls) == 1
    with torch.no_grad():
        fn(x, w)
    fn(x.detach(), w)
    assert len(calls) == 3


def test_automatic_backend_under_compile_is_pytorch(triton_on_cpu):
    """Traced by torch.compile(fullgraph=True), automatic selection takes the PyTorch form in both grad modes (so
    inductor can fuse it); an explicitly named ``backend="triton"`` still runs the kernel there."""
    device, calls = triton_on_cpu
    x, w, b = (t.float().to(device) for t in _leaves((3, 5, 24)))
    fn = torch.compile(lambda x: layer_norm(x, w, b), fullgraph=True, backend="aot_eager")
    ref = F.layer_norm(x, (24,), w, b)
    assert torch.equal(fn(x.clone().requires_grad_()), ref)
    with torch.no_grad():
        assert torch.equal(fn(x), ref)
    assert not calls
    with torch.no_grad():
        explicit = torch.compile(lambda x: layer_norm(x, w, b, backend="triton"), fullgraph=True, backend="aot_eager")
        assert_close("out", ref.double(), explicit(x))
    assert len(calls) == 1


def test_glue_ops_pick_pytorch_while_compiling(monkeypatch):
    """The constraint behind it, on every glue op's Triton backend: refused for automatic selection while
    torch.compile traces, never for an explicitly named backend."""
    _registry = importlib.import_module("visionattn.ops._registry")
    swiglu_ops = importlib.import_module("visionattn.ops.swiglu")
    registries = (norm_ops._registry, norm_ops._rms_registry, norm_ops._ln_registry, swiglu_ops._registry)
    for registry in registries:
        assert _registry._eager_only in registry._backends["triton"].constraints
    assert _registry._eager_only({}, False) and _registry._eager_only({}, True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not _registry._eager_only({}, False) and _registry._eager_only({}, True)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_automatic_backend_on_cuda(op):
    """On CUDA: PyTorch's kernel when autograd records, the Triton kernel at inference."""
    registry = norm_ops._ln_registry if op == "layer_norm" else norm_ops._rms_registry
    triton_fn = norm_ops._ln_triton_backend if op == "layer_norm" else norm_ops._rms_triton_backend
    x = torch.randn(4096, 64, device="cuda", dtype=torch.bfloat16)
    weight = torch.ones(64, device="cuda", requires_grad=True)
    args = {"x": x, "weight": weight, "bias": torch.zeros(64, device="cuda")}
    assert registry.select(None, args) is not triton_fn
    with torch.no_grad():
        assert registry.select(None, args) is triton_fn
    assert registry.select(None, args | {"weight": weight.detach()}) is triton_fn
