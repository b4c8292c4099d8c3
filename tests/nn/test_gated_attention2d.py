"""GatedLinearAttention2d against a plain re-implementation of ViG's ``GatedLinearAttention.forward`` (float64).

The reference below is written from the ViG paper / reference code (shared/reference/backbones.md §4.2): depthwise
conv, fused q/k/v projection, low-rank direction-wise forget gates, two causal GLA scans as a python-loop recurrence
(the backward scan is ``flip(GLA(flip(q), flip(k), flip(v), flip(log_a_b)))``), per-head RMSNorms and the 2D gating
locality injection. It reads the module's parameters, so both see identical weights.
"""

import pytest
import torch
import torch.nn.functional as F

from tests._numerics import assert_close
from visionattn.layout import TokenGrid
from visionattn.nn import GatedLinearAttention2d


def _gla_scan(q, k, v, log_gate, scale):
    """Causal GLA by its recurrence S_t = diag(exp(log a_t)) S_{t-1} + k_tᵀ v_t, o_t = (scale·q_t) S_t."""
    batch, heads, length, dk = q.shape
    state = q.new_zeros(batch, heads, dk, v.shape[-1])
    outs = []
    for t in range(length):
        state = state * log_gate[:, :, t].exp()[..., None] + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t] * scale, state))
    return torch.stack(outs, dim=2)


def _vig_gla_reference(m: GatedLinearAttention2d, x: torch.Tensor, shape: tuple[int, int], conv_act, out_act):
    batch, length, dim = x.shape
    heads, dk = m.num_heads, m.key_dim
    rms = lambda t, w: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + m.norm_attn.eps) * w
    local = F.conv2d(x.transpose(1, 2).reshape(batch, dim, *shape), m.dwconv.weight, padding=1, groups=dim)
    local = local.flatten(2).transpose(1, 2)
    local = F.silu(local) if conv_act else local
    q, k, v = (local @ m.qkv.weight.T).split([dk, dk, dim], dim=-1)
    gk = (local @ m.forget_gate[0].weight.T) @ m.forget_gate[1].weight.T + m.forget_gate[1].bias
    log_f, log_b = (F.logsigmoid(gk) / 16).chunk(2, dim=-1)
    heads_first = lambda t: t.reshape(batch, length, heads, -1).transpose(1, 2)
    q, k, v, log_f, log_b = map(heads_first, (q, k, v, log_f, log_b))
    scale = (dk // heads) ** -0.5
    flip = lambda t: t.flip(2)
    o_fwd = _gla_scan(q, k, v, log_f, scale)
    o_bwd = flip(_gla_scan(flip(q), flip(k), flip(v), flip(log_b), scale))
    o = ((o_fwd + o_bwd) / 2).transpose(1, 2)  # (B, N, H, Dv)
    g = torch.sigmoid(local @ m.out_gate.weight.T + m.out_gate.bias).reshape(batch, length, heads, -1)
    mixed = rms(o, m.norm_attn.weight) * g + rms(local.reshape(batch, length, heads, -1), m.norm_local.weight) * (1 - g)
    mixed = mixed.reshape(batch, length, dim)
    mixed = F.silu(mixed) if out_act else mixed
    return mixed @ m.proj.weight.T


def _randomize(m: GatedLinearAttention2d, gen: torch.Generator) -> None:
    """Non-trivial values everywhere (biases and norm weights included), so every parameter is exercised."""
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5 + (1.0 if p.ndim == 1 else 0.0))


@pytest.mark.parametrize(
    "batch,dim,heads,shape,conv_act,out_act",
    [(2, 16, 2, (3, 5), False, False), (1, 24, 3, (4, 4), True, True), (2, 12, 1, (1, 7), True, False)],
    ids=lambda v: str(v),
)
def test_gated_linear_attention2d_matches_vig_reference(rng, batch, dim, heads, shape, conv_act, out_act):
    m = GatedLinearAttention2d(dim, heads, conv_act=conv_act, out_act=out_act, backend="reference", dtype=torch.float64)
    _randomize(m, rng)
    x = torch.randn(batch, shape[0] * shape[1], dim, generator=rng, dtype=torch.float64, requires_grad=True)
    params = [
        m.dwconv.weight,
        m.qkv.weight,
        m.forget_gate[1].bias,
        m.out_gate.weight,
        m.norm_attn.weight,
        m.proj.weight,
    ]
    names = ["x", "dwconv", "qkv", "forget_gate.bias", "out_gate", "norm_attn", "proj"]
    grad_out = torch.randn(batch, shape[0] * shape[1], dim, generator=rng, dtype=torch.float64)

    out = m(x, TokenGrid(shape))
    ref = _vig_gla_reference(m, x, shape, conv_act, out_act)
    assert_close("out", ref, out)
    grads = torch.autograd.grad(out, [x, *params], grad_out)
    ref_grads = torch.autograd.grad(ref, [x, *params], grad_out)
    for name, r, g in zip(names, ref_grads, grads):
        assert_close(f"d{name}", r, g)


def test_gated_linear_attention2d_triton_backend_matches_reference(rng, kernel_device):
    """The default path on CUDA (here: the Triton interpreter), head dims Dk=16, Dv=32, forward and dx."""
    m = GatedLinearAttention2d(64, 2, conv_act=True, backend="reference")
    _randomize(m, rng)
    fast = GatedLinearAttention2d(64, 2, conv_act=True, backend="triton", device=kernel_device)
    fast.load_state_dict(m.state_dict())
    x = torch.randn(2, 15, 64, generator=rng)
    grad_out = torch.randn(2, 15, 64, generator=rng)
    x64 = x.double().requires_grad_()
    ref = m.double()(x64, TokenGrid((3, 5)))
    (ref_dx,) = torch.autograd.grad(ref, x64, grad_out.double())
    xk = x.to(kernel_device).requires_grad_()
    out = fast(xk, TokenGrid((3, 5)))
    (dx,) = torch.autograd.grad(out, xk, grad_out.to(kernel_device))
    assert_close("out", ref, out.cpu(), tol=1e-4)
    assert_close("dx", ref_dx, dx.cpu(), tol=1e-4)


def test_gated_linear_attention2d_same_in_train_and_eval(rng):
    m = GatedLinearAttention2d(16, 2, backend="reference")
    x = torch.randn(2, 12, 16, generator=rng)
    grid = TokenGrid((3, 4))
    train_out = m.train()(x, grid)
    assert_close("eval", train_out, m.eval()(x, grid))


def test_gated_linear_attention2d_meta_init_and_reset():
    m = GatedLinearAttention2d(32, 4, device="meta")
    assert all(p.is_meta for p in m.parameters())
    m = m.to_empty(device="cpu")
    m.reset_parameters()
    assert torch.all(m.norm_attn.weight == 1) and torch.all(m.out_gate.bias == 0)


def test_gated_linear_attention2d_rejects_bad_heads():
    with pytest.raises(ValueError, match="num_heads"):
        GatedLinearAttention2d(16, 3)
    with pytest.raises(ValueError, match="num_heads"):
        GatedLinearAttention2d(16, 4, key_dim=6)


def test_gated_linear_attention2d_rejects_bad_grid(rng):
    m = GatedLinearAttention2d(8, 2, backend="reference")
    with pytest.raises(ValueError, match="grid"):
        m(torch.randn(1, 6, 8, generator=rng), TokenGrid((6,)))
    with pytest.raises(ValueError, match="grid"):
        m(torch.randn(1, 7, 8, generator=rng), TokenGrid((2, 3), extra_before=1))


def test_gated_linear_attention2d_rejects_bad_x(rng):
    m = GatedLinearAttention2d(8, 2, backend="reference")
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(1, 5, 8, generator=rng), TokenGrid((2, 3)))
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(1, 6, 4, generator=rng), TokenGrid((2, 3)))
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(6, 8, generator=rng), TokenGrid((2, 3)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gated_linear_attention2d_gpu_matches_float64(dtype):
    """Real ViG-T sizes (C=192, 3 heads, 14x14 and 32x32 grids) through the default backend vs float64 reference op."""
    gen = torch.Generator().manual_seed(0)
    m = GatedLinearAttention2d(192, 3, conv_act=True, out_act=True)
    for shape in ((14, 14), (32, 32)):
        x = torch.randn(4, shape[0] * shape[1], 192, generator=gen)
        ref = GatedLinearAttention2d(192, 3, conv_act=True, out_act=True, backend="reference").double()
        ref.load_state_dict(m.state_dict())
        expected = ref(x.double(), TokenGrid(shape))
        fast = m.cuda().to(dtype)
        out = fast(x.cuda().to(dtype), TokenGrid(shape))
        assert_close(f"out {shape}", expected, out.cpu())
        m = m.float().cpu()
