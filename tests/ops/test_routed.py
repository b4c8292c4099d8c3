"""routed_attention: the reference against a per-region gather formula, the Triton kernels (forward, dQ, dK/dV)
against the float64 reference, the device-side transposed routing, and argument errors."""

import pytest
import torch

from tests._numerics import assert_close
from visionattn.kernels.routed import routed_key_major
from visionattn.ops import routed_attention, routed_attention_reference


def _inputs(rng, batch, heads, n_win, region, dim, dtype, dim_v=None, device="cpu"):
    """q, k, v as (B, H, Y, X, D) strided views of one raster (B, Y, X, 3, H, D) projection, plus random top-k
    regions per query region."""
    rh, rw, topk = region
    y, x = n_win * rh, n_win * rw
    dim_v = dim_v or dim
    base = torch.randn(batch, y, x, heads, 2 * dim + dim_v, generator=rng, dtype=torch.float64)
    base = base.to(device, dtype).permute(0, 3, 1, 2, 4)
    q, k, v = base.split([dim, dim, dim_v], dim=-1)
    scores = torch.randn(batch, n_win**2, n_win**2, generator=rng)
    return q, k, v, scores.topk(topk, dim=-1).indices.to(device)


def _gather_formula(q, k, v, regions, n_win, scale):
    """Per query region: gather the routed regions' tokens, dense softmax (the reference code's formulation)."""
    batch, heads, y, x, _ = q.shape
    rh, rw = y // n_win, x // n_win
    cut = lambda t: t.unflatten(2, (n_win, rh)).unflatten(4, (n_win, rw)).permute(0, 1, 2, 4, 3, 5, 6)
    qr, kr, vr = (cut(t).flatten(2, 3).flatten(3, 4) for t in (q, k, v))  # (B, H, R, tokens, D)
    out = torch.empty_like(qr[..., : v.shape[-1]])
    for b in range(batch):
        for r in range(n_win**2):
            keys = kr[b, :, regions[b, r]].flatten(1, 2)
            values = vr[b, :, regions[b, r]].flatten(1, 2)
            out[b, :, r] = torch.softmax(qr[b, :, r] @ keys.transpose(-1, -2) * scale, -1) @ values
    out = out.unflatten(2, (n_win, n_win)).unflatten(4, (rh, rw)).permute(0, 1, 2, 4, 3, 5, 6)
    return out.reshape(batch, heads, y, x, -1)


def test_routed_attention_reference_matches_gather_formula(rng):
    q, k, v, regions = _inputs(rng, 2, 2, 3, (2, 3, 4), 8, torch.float64, dim_v=6)
    out = routed_attention_reference(q, k, v, regions, n_win=3, scale=0.4)
    assert_close("out", _gather_formula(q, k, v, regions, 3, 0.4), out)


# (batch, heads, n_win, (region h, region w, topk), head dim): region sizes 1 (stacked 16 per tile) to 64
# (one 64-row tile), non-square and non-power-of-two regions, key steps of several routed regions, n_win 7 and 16
CASES = [
    (1, 2, 2, (8, 8, 1), 16),
    (1, 1, 2, (4, 4, 2), 32),
    (2, 1, 3, (2, 3, 5), 16),
    (1, 2, 3, (2, 2, 9), 8),
    (1, 1, 7, (1, 1, 16), 16),
    (1, 1, 4, (3, 5, 4), 24),
    (1, 1, 16, (1, 1, 4), 16),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("batch,heads,n_win,region,dim", CASES, ids=lambda c: str(c).replace(" ", ""))
def test_routed_attention_triton_matches_reference(rng, kernel_device, poison_empty, batch, heads, n_win, region, dim,
                                                   dtype):  # fmt: skip
    q, k, v, regions = _inputs(rng, batch, heads, n_win, region, dim, dtype, device=kernel_device)
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = routed_attention(q, k, v, regions, n_win=n_win, scale=0.3, backend="triton")
    assert out.permute(0, 2, 3, 1, 4).is_contiguous()  # (B, Y, X, H, D) storage: the raster map is a view
    grad = torch.randn(out.shape, generator=rng, dtype=torch.float64).to(kernel_device, dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    ref_in = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = routed_attention_reference(*ref_in, regions, n_win=n_win, scale=0.3)
    ref_grads = torch.autograd.grad(ref, ref_in, grad.double())
    assert_close("out", ref, out)
    for name, expected, got in zip(("dq", "dk", "dv"), ref_grads, grads):
        assert_close(name, expected, got)


def test_routed_key_major_lists_the_routing_transposed(rng):
    regions = torch.randn(3, 9, 9, generator=rng).topk(4, dim=-1).indices
    order, counts = routed_key_major(regions)
    for b in range(3):
        for key in range(9):
            expected = [r for r in range(9) if key in regions[b, r].tolist()]
            assert counts[b, key] == len(expected)
            assert order[b, key, : len(expected)].tolist() == expected


def test_routed_attention_defaults_scale_and_rejects_bad_arguments(rng):
    q, k, v, regions = _inputs(rng, 1, 1, 2, (2, 2, 2), 4, torch.float64)
    assert_close(
        "scale", routed_attention(q, k, v, regions, n_win=2, scale=0.5), routed_attention(q, k, v, regions, n_win=2)
    )
    with pytest.raises(ValueError, match="n_win"):
        routed_attention(q, k, v, regions, n_win=3)
    with pytest.raises(TypeError, match="n_win"):
        routed_attention(q, k, v, regions, n_win=2.0)
    with pytest.raises(ValueError, match="regions"):
        routed_attention(q, k, v, regions[:, :3], n_win=2)
    with pytest.raises(ValueError, match="regions"):
        routed_attention(q, k, v, torch.zeros(1, 4, 5, dtype=torch.int64), n_win=2)
    with pytest.raises(TypeError, match="regions"):
        routed_attention(q, k, v, regions.double(), n_win=2)
    for bad_id in (-1, 4):  # outside [0, n_win²): the kernels would read outside the map
        bad = regions.clone()
        bad[0, 1, 0] = bad_id
        with pytest.raises(ValueError, match=r"regions\[0, 1\]"):
            routed_attention(q, k, v, bad, n_win=2)
    repeated = regions.clone()  # top-2 rows
    repeated[0, 2, 1] = repeated[0, 2, 0]
    with pytest.raises(ValueError, match=r"distinct region ids .* regions\[0, 2\]"):
        routed_attention(q, k, v, repeated, n_win=2)
    with pytest.raises(ValueError, match="q, k and v"):
        routed_attention(q, k[..., :3], v, regions, n_win=2)
    with pytest.raises(TypeError, match="dtype"):
        routed_attention(q, k.float(), v, regions, n_win=2)
    with pytest.raises(ValueError, match="dims"):
        routed_attention(q[0], k, v, regions, n_win=2)
    with pytest.raises(ValueError, match="backend"):
        routed_attention(q, k, v, regions, n_win=2, backend="cuda")


def test_routed_attention_triton_rejects_large_regions(rng):
    q, k, v, regions = _inputs(rng, 1, 1, 1, (12, 11, 1), 4, torch.float32)
    with pytest.raises(NotImplementedError, match="regions"):
        routed_attention(q, k, v, regions, n_win=1, backend="triton")


GPU_CASES = [  # biformer_tiny at 224 px (stages 1-3), a 7 x 7-token region stage at 896 px, n_win 8 and 16 maps
    (8, 2, 7, (8, 8, 1), 32),
    (8, 4, 7, (4, 4, 4), 32),
    (8, 8, 7, (2, 2, 16), 32),
    (2, 8, 7, (7, 7, 16), 32),
    (4, 2, 8, (5, 6, 4), 32),
    (2, 4, 16, (2, 2, 16), 32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("batch,heads,n_win,region,dim", GPU_CASES, ids=lambda c: str(c).replace(" ", ""))
def test_routed_attention_gpu_real_sizes(batch, heads, n_win, region, dim, dtype):
    rng = torch.Generator().manual_seed(0)
    q, k, v, regions = _inputs(rng, batch, heads, n_win, region, dim, dtype, device="cuda")
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = routed_attention(q, k, v, regions, n_win=n_win, scale=dim**-0.5)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    ref_in = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = routed_attention_reference(*ref_in, regions, n_win=n_win, scale=dim**-0.5)
    ref_grads = torch.autograd.grad(ref, ref_in, grad.double())
    tol = 1e-4 if dtype == torch.float32 else None  # fp32 on the GPU: ieee dots, approximate exp2
    assert_close("out", ref, out, tol=tol)
    for name, expected, got in zip(("dq", "dk", "dv"), ref_grads, grads):
        assert_close(name, expected, got, tol=tol)
