"""visionattn's LayerNorm / LayerNorm2d: drop-ins for nn.LayerNorm and timm's LayerNorm2d (parameters, init, state
dict, output bit for bit off the Triton path), whose Triton backend matches a float64 formula, on a channels_last map
without copying it."""

import importlib

import pytest
import timm.layers
import torch

from tests._numerics import assert_close
from tests.kernels.test_layer_norm import _ln_brute
from visionattn.nn import LayerNorm, LayerNorm2d

norm_kernels = importlib.import_module("visionattn.kernels.gated_norm")


def _perturb(*modules, rng):
    """Same random weight and bias in every module."""
    weight, bias = (
        1 + 0.5 * torch.randn(modules[0].weight.shape, generator=rng),
        torch.randn(modules[0].weight.shape, generator=rng),
    )
    with torch.no_grad():
        for m in modules:
            m.weight.copy_(weight)
            if m.bias is not None:
                m.bias.copy_(bias)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"eps": 1e-6}, {"bias": False}, {"elementwise_affine": False}],
    ids=["default", "eps", "no-bias", "no-affine"],
)
def test_layer_norm_is_an_nn_layer_norm_drop_in(rng, kwargs):
    ours, theirs = LayerNorm(24, **kwargs), torch.nn.LayerNorm(24, **kwargs)
    assert isinstance(ours, torch.nn.LayerNorm) and ours.eps == theirs.eps
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    if theirs.weight is not None:
        _perturb(theirs, rng=rng)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 7, 24, generator=rng)
    assert torch.equal(ours(x), theirs(x))
    x.requires_grad_()
    assert torch.equal(torch.autograd.grad(ours(x).sum(), x)[0], torch.autograd.grad(theirs(x).sum(), x)[0])


def test_layer_norm_over_several_dims_is_the_parent(rng):
    ours, theirs = LayerNorm((5, 8)), torch.nn.LayerNorm((5, 8))
    _perturb(ours, theirs, rng=rng)
    x = torch.randn(3, 5, 8, generator=rng)
    assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "contiguous"])
def test_layer_norm2d_is_a_timm_layer_norm2d_drop_in(rng, channels_last):
    ours, theirs = LayerNorm2d(16), timm.layers.LayerNorm2d(16)
    assert isinstance(ours, timm.layers.LayerNorm2d) and ours.eps == theirs.eps == 1e-6
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    _perturb(theirs, rng=rng)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 16, 5, 7, generator=rng)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out, ref = ours(x), theirs(x)
    assert torch.equal(out, ref) and out.stride() == ref.stride()


def test_layer_norm_triton_backend_matches_float64(rng, kernel_device):
    norm = LayerNorm(48, eps=1e-6, backend="triton", device=kernel_device)
    _perturb(norm, rng=rng)
    x = torch.randn(3, 5, 48, generator=rng, dtype=torch.float64)
    xk = x.to(kernel_device, torch.float32).requires_grad_()
    out = norm(xk)
    x64 = x.clone().requires_grad_()
    ref = _ln_brute(x64, norm.weight.detach().double().cpu(), norm.bias.detach().double().cpu(), 1e-6)
    assert_close("out", ref, out.cpu())
    assert_close("dx", torch.autograd.grad(ref.sum(), x64)[0], torch.autograd.grad(out.sum(), xk)[0].cpu())


def test_layer_norm2d_triton_runs_on_the_channels_last_map_without_copy(rng, kernel_device, monkeypatch):
    """The kernel gets the (B, H, W, C) view of the map's own storage; the output is a channels_last map."""
    seen = []
    real = norm_kernels.layer_norm_fwd
    monkeypatch.setattr(norm_kernels, "layer_norm_fwd", lambda x, *a: seen.append(x) or real(x, *a))
    norm = LayerNorm2d(24, backend="triton", device=kernel_device)
    _perturb(norm, rng=rng)
    x = torch.randn(2, 24, 3, 5, generator=rng, dtype=torch.float64)
    xk = x.to(kernel_device, torch.float32).contiguous(memory_format=torch.channels_last)
    out = norm(xk)
    assert seen[0].data_ptr() == xk.data_ptr() and seen[0].is_contiguous()
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    w, b = (t.detach().double().cpu() for t in (norm.weight, norm.bias))
    ref = _ln_brute(x.permute(0, 2, 3, 1), w, b, 1e-6).permute(0, 3, 1, 2)
    assert_close("out", ref, out.cpu())


@pytest.mark.parametrize("module", [LayerNorm, LayerNorm2d])
def test_layer_norm_meta_init(module):
    norm = module(16, device="meta")
    x = torch.empty(2, 16, 3, 3, device="meta") if module is LayerNorm2d else torch.empty(2, 16, device="meta")
    assert norm.weight.is_meta and norm(x).shape == x.shape
