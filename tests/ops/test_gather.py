"""``gather_tokens``: forward and gradients of both backends against a float64 matrix product ``y = P x`` (``P`` the
0/1 slot-by-token matrix of the index), its inverse-map backward, ``torch.compile``, and every error branch."""

import pytest
import torch

from tests._numerics import assert_close
from visionattn.ops.gather import gather_tokens, gather_tokens_reference, inverse_token_index


def _brute_force(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``P x`` along ``dim`` in float64, ``P[r, t] = 1`` where ``index[r] == t``."""
    tokens = torch.arange(x.shape[dim], device=index.device)
    p = (index.long()[:, None] == tokens[None, :]).double()
    return torch.movedim(torch.tensordot(p, x.double().movedim(dim, 0), dims=1), 0, dim)


def _partial_permutation(gen, num_tokens: int, num_slots: int, dtype=torch.int32) -> torch.Tensor:
    """``num_slots`` slots holding distinct tokens, the rest empty (-1); at least one of each."""
    filled = min(num_tokens, num_slots - 1)
    index = torch.full((num_slots,), -1, dtype=dtype)
    index[torch.randperm(num_slots, generator=gen)[:filled]] = torch.randperm(num_tokens, generator=gen)[:filled].to(
        dtype
    )
    return index


def test_inverse_token_index(rng):
    index = _partial_permutation(rng, 9, 12, torch.int64)
    inverse = inverse_token_index(index, 11)
    assert inverse.dtype == torch.int64 and inverse.shape == (11,)
    for t in range(11):
        slots = torch.nonzero(index == t).flatten().tolist()
        assert inverse[t].item() == (slots[0] if slots else -1)
    with pytest.raises(ValueError, match="index"):
        inverse_token_index(torch.tensor([0, 2, 2]), 3)
    with pytest.raises(ValueError, match="index"):
        inverse_token_index(torch.tensor([0, 3]), 3)
    with pytest.raises(TypeError, match="index"):
        inverse_token_index(torch.tensor([0.0]), 3)


# (x shape, dim, view of x: None, "bnhd" (a (B, N, H, D) tensor seen as (B, H, N, D)) or "slice")
CASES = [((2, 3, 9, 16), 2, None), ((2, 9, 3, 24), 2, "bnhd"), ((2, 9, 6, 20), 1, "slice"), ((9, 16), -2, None)]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("shape,dim,view", CASES, ids=[f"{c[0]}-dim{c[1]}-{c[2]}" for c in CASES])
def test_gather_tokens_matches_float64(kernel_device, rng, backend, shape, dim, view):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    x = torch.randn(*shape, generator=rng)
    if view == "bnhd":
        x = x.transpose(1, 2)
    elif view == "slice":
        x = x[:, :, ::2, 2:18]
    x = x.to(device).requires_grad_()
    n = x.shape[dim]
    index = _partial_permutation(rng, n, n + 4).to(device)
    inverse = inverse_token_index(index, n)
    out = gather_tokens(x, index, inverse, dim, backend=backend)
    x64 = x.detach().double().requires_grad_()
    ref = _brute_force(x64, index, dim % x.ndim)
    assert_close("out", ref, out)
    grad = torch.randn(ref.shape, generator=rng).to(device)
    (dx,) = torch.autograd.grad(out, x, grad)
    (ref_dx,) = torch.autograd.grad(ref, x64, grad.double())
    assert_close("dx", ref_dx, dx)
    if backend == "triton" and view == "bnhd":  # stored in x's axis order
        assert out.transpose(1, 2).is_contiguous()


def test_gather_tokens_double_backward_and_gradcheck(kernel_device, rng):
    """The backward is the same op with the maps swapped, so it is itself differentiable (reference in float64:
    ``gradcheck``; the Triton backend's double backward against it in float32)."""
    index = _partial_permutation(rng, 7, 9)
    inverse = inverse_token_index(index, 7)
    x = torch.randn(2, 7, 16, generator=rng, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: gather_tokens(t, index, inverse, 1, backend="reference"), (x,))
    xt = x.detach().float().to(kernel_device).requires_grad_()
    it, vt = index.to(kernel_device), inverse.to(kernel_device)
    g = torch.randn(2, 9, 16, generator=rng).to(kernel_device).requires_grad_()
    (dx,) = torch.autograd.grad(gather_tokens(xt, it, vt, 1, backend="triton"), xt, g, create_graph=True)
    (dg,) = torch.autograd.grad(dx, g, torch.ones_like(dx))
    assert_close("d(dx)/dg", _brute_force(torch.ones(2, 7, 16, dtype=torch.float64), index, 1), dg)


def test_gather_tokens_compiles_fullgraph(kernel_device, rng):
    index = _partial_permutation(rng, 10, 12).to(kernel_device)
    inverse = inverse_token_index(index, 10)
    x = torch.randn(1, 2, 10, 16, generator=rng).to(kernel_device).requires_grad_()
    run = lambda x: gather_tokens(x, index, inverse, 2, backend="triton") * 2
    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, backend="inductor" if kernel_device.type == "cuda" else "aot_eager")
    out = compiled(x)
    assert_close("out", _brute_force(x, index, 2) * 2, out)
    (dx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert_close("dx", _brute_force(torch.ones(1, 2, 12, 16, dtype=torch.float64), inverse, 2) * 2, dx)


def test_gather_tokens_opcheck(kernel_device, rng):
    index = _partial_permutation(rng, 10, 12).to(kernel_device)
    x = torch.randn(2, 10, 3, 16, generator=rng).to(kernel_device).transpose(1, 2).requires_grad_()
    args = (x, index, inverse_token_index(index, 10), 2)
    torch.library.opcheck(torch.ops.visionattn.gather_tokens, args)


def test_gather_tokens_selects_reference_off_triton_devices(rng):
    x = torch.randn(1, 5, 16, generator=rng, dtype=torch.float64)
    index = torch.tensor([4, -1, 0, 1, 2, 3])
    out = gather_tokens(x, index, inverse_token_index(index, 5), 1)
    assert torch.equal(out, gather_tokens_reference(x, index, 1))
    assert not out[:, 1].any()


def test_gather_tokens_rejects_bad_inputs(kernel_device):
    x = torch.randn(1, 5, 16)
    index = torch.tensor([4, -1, 0, 1, 2, 3])
    inverse = inverse_token_index(index, 5)
    with pytest.raises(TypeError, match="x"):
        gather_tokens(x.numpy(), index, inverse, 1)
    with pytest.raises(TypeError, match="x.dtype"):
        gather_tokens(x.long(), index, inverse, 1)
    with pytest.raises(ValueError, match="x"):
        gather_tokens(x[0, 0], index, inverse, 0)
    for dim in (2, -1, 3, -4, 1.0, True):
        with pytest.raises(ValueError, match="dim"):
            gather_tokens(x, index, inverse, dim)
    with pytest.raises(TypeError, match="index.dtype"):
        gather_tokens(x, index.float(), inverse, 1)
    with pytest.raises(ValueError, match="index"):
        gather_tokens(x, index[None], inverse, 1)
    with pytest.raises(TypeError, match="inverse_index"):
        gather_tokens(x, index, [0, 1], 1)
    with pytest.raises(ValueError, match="inverse_index"):
        gather_tokens(x, index, inverse[:4], 1)
    with pytest.raises(ValueError, match="index"):
        gather_tokens(x, index.to("meta"), inverse, 1)
    with pytest.raises(ValueError, match="backend"):
        gather_tokens(x, index, inverse, 1, backend="cuda")
    with pytest.raises(ValueError, match="index entries must be < 5"):
        gather_tokens(x, torch.tensor([5, 0, 1, 2, 3, 4]), inverse, 1)
    with pytest.raises(ValueError, match="inverse_index entries must be < 6"):
        gather_tokens(x, index, torch.tensor([2, 3, 4, 5, 6]), 1)
    x, index, inverse = x.to(kernel_device), index.to(kernel_device), inverse.to(kernel_device)
    with pytest.raises(NotImplementedError, match="x.dtype"):
        gather_tokens(x.double(), index, inverse, 1, backend="triton")
    with pytest.raises(NotImplementedError, match="head dim"):
        gather_tokens(x[..., :8], index, inverse, 1, backend="triton")
