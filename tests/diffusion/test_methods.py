"""Each method's attention call against an independent float64 brute-force formula, forward and gradients."""

import math
import warnings

import pytest
import torch

from tests._numerics import assert_close
from tests.diffusion._brute import circle_allowed, masked_softmax, natten_allowed, radial_allowed
from visionattn.diffusion import (
    AgentMethod,
    DiffusionState,
    LinearMethod,
    LocalMethod,
    RadialMethod,
    SparseLinearMethod,
)
from visionattn.layout import TokenGrid, topk_ratio_block_mask


def _qkv(grid: TokenGrid, gen, batch=2, heads=2, dim=8):
    shape = (batch, heads, grid.num_tokens, dim)
    return [torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3)]


def _check_forward_backward(name, out, ref, tensors):
    assert_close(name, ref, out)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, tensors, grad, retain_graph=True)
    want = torch.autograd.grad(ref, tensors, grad, retain_graph=True)
    for label, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_close(f"{name} {label}", w, g)


@pytest.mark.parametrize(
    "shape, before, after, kernel, stride, dilation",
    [
        ((5, 7), 3, 0, (3, 5), 1, 1),
        ((6, 8), 0, 2, 4, 2, (1, 2)),
        ((3, 4, 5), 2, 0, (2, 3, 3), (1, 2, 1), 1),
        ((4, 6), 0, 0, (9, 2), 1, 1),  # a window taller than the grid covers the whole axis
    ],
    ids=lambda v: str(v),
)
def test_local_neighborhood_matches_masked_dense(shape, before, after, kernel, stride, dilation):
    gen = torch.Generator().manual_seed(0)
    grid = TokenGrid(shape, extra_before=before, extra_after=after)
    method = LocalMethod(kernel_size=kernel, stride=stride, dilation=dilation, backend="reference")
    ks, st, dil = method._window(shape)
    allowed = natten_allowed(grid, ks, st, dil)
    q, k, v = _qkv(grid, gen)
    out, density = method(q, k, v, grid, DiffusionState())
    _check_forward_backward("local", out, masked_softmax(q, k, v, allowed), (q, k, v))
    assert density == pytest.approx(float(allowed.double().mean()), rel=1e-12)


def test_local_window_fits_small_grids_and_warns_when_dilation_drops():
    """kernel_size is capped at the axis (no warning: the window covers the axis); a dilation that no longer fits
    is lowered with a warning, and the output and density are those of the fitted window."""
    grid = TokenGrid((4, 9), extra_after=2)
    q, k, v = _qkv(grid, torch.Generator().manual_seed(9))
    capped = LocalMethod(kernel_size=(7, 3), stride=(7, 1), backend="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert capped._window(grid.shape) == ((4, 3), (4, 1), (1, 1))
    dilated = LocalMethod(kernel_size=3, dilation=(2, 3), backend="reference")
    with pytest.warns(UserWarning, match="dilation"):
        assert dilated._window(grid.shape) == ((3, 3), (1, 1), (1, 3))
    with pytest.warns(UserWarning, match="dilation"):
        out, density = dilated(q, k, v, grid, DiffusionState())
    allowed = natten_allowed(grid, (3, 3), (1, 1), (1, 3))
    _check_forward_backward("fitted dilation", out, masked_softmax(q, k, v, allowed), (q, k, v))
    assert density == pytest.approx(float(allowed.double().mean()), rel=1e-12)


@pytest.mark.parametrize("shape, before, radius", [((7, 9), 4, 2.5), ((3, 5, 6), 0, 2.0)], ids=str)
def test_local_circle_matches_masked_dense(shape, before, radius):
    gen = torch.Generator().manual_seed(1)
    grid = TokenGrid(shape, extra_before=before)
    allowed = circle_allowed(grid, radius)
    q, k, v = _qkv(grid, gen)
    method = LocalMethod(window="circle", radius=radius, tile=(2,) * len(shape), backend="reference")
    out, density = method(q, k, v, grid, DiffusionState())
    _check_forward_backward("circle", out, masked_softmax(q, k, v, allowed), (q, k, v))
    assert density == pytest.approx(float(allowed.double().mean()), rel=1e-12)


@pytest.mark.parametrize("before, after, sink", [(0, 0, True), (0, 5, False), (5, 0, False)], ids=str)
def test_radial_matches_masked_dense(before, after, sink):
    gen = torch.Generator().manual_seed(2)
    grid = TokenGrid((6, 4, 5), extra_before=before, extra_after=after)
    allowed = radial_allowed(grid, block_size=8, decay_factor=0.5, sink=sink)
    q, k, v = _qkv(grid, gen)
    method = RadialMethod(decay_factor=0.5, block_size=8, sink=sink, backend="reference")
    out, density = method(q, k, v, grid, DiffusionState())
    assert 0 < density < 1
    assert density == pytest.approx(float(allowed.double().mean()), rel=1e-12)
    _check_forward_backward("radial", out, masked_softmax(q, k, v, allowed), (q, k, v))


def _linfusion(q, k, v, method: LinearMethod):
    """LinFusion's formula (shared/reference/diffusion.md §4.2) with the projections on q and k."""
    q = q + method.q_proj(q)
    k = k + method.k_proj(k)
    fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    n = k.shape[-2]
    kv = (fk.transpose(-1, -2) * n**-0.5) @ (v * n**-0.5)
    z = fq @ fk.mean(dim=-2, keepdim=True).transpose(-1, -2) + method.eps
    return fq @ kv / z


def test_linear_matches_linfusion_formula():
    gen = torch.Generator().manual_seed(3)
    grid = TokenGrid((4, 5), extra_before=3)
    method = LinearMethod(8, dtype=torch.float64)
    with torch.no_grad():
        for proj in (method.q_proj, method.k_proj):
            proj.fc2.weight.normal_(generator=gen)
    q, k, v = _qkv(grid, gen)
    out, density = method(q, k, v, grid, DiffusionState())
    assert density is None
    _check_forward_backward("linear", out, _linfusion(q, k, v, method), (q, k, v))
    params = [method.q_proj.fc1.weight, method.k_proj.fc2.weight]
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, params, grad)
    want = torch.autograd.grad(_linfusion(q, k, v, method), params, grad)
    for label, g, w in zip(("q_proj.fc1", "k_proj.fc2"), got, want):
        assert_close(label, w, g)


@pytest.mark.parametrize("feature_map", ["softmax", "elu1"])
def test_sparse_linear_matches_masked_dense_plus_linear(feature_map):
    gen = torch.Generator().manual_seed(6)
    grid = TokenGrid((5, 6), extra_before=6)  # 36 tokens: blocks of 8 with a short last block
    method = SparseLinearMethod(8, topk=0.4, feature_map=feature_map, block_q=8, block_k=8, dtype=torch.float64)
    with torch.no_grad():
        method.attention.proj.weight.normal_(generator=gen)
        method.attention.proj.bias.normal_(generator=gen)
    q, k, v = _qkv(grid, gen)
    out, density = method(q, k, v, grid, DiffusionState())
    critical = topk_ratio_block_mask(q.detach(), k.detach(), 8, 8, 0.4).to_dense()
    phi = (lambda x: x.softmax(-1)) if feature_map == "softmax" else (lambda x: torch.nn.functional.elu(x) + 1)
    sparse = masked_softmax(q, k, v, critical)
    weights = (phi(q) @ phi(k).transpose(-1, -2)) * ~critical
    linear = (weights @ v) / (weights.sum(-1, keepdim=True) + 1e-6)  # the op's default eps
    proj = method.attention.proj
    ref = sparse + linear @ proj.weight.T + proj.bias
    # 36 tokens in blocks of 8: the short last key block counts its 4 keys where it is chosen
    assert float(density) == pytest.approx(float(critical.double().mean()), rel=1e-12)
    _check_forward_backward("sparse_linear", out, ref, (q, k, v))


@pytest.mark.parametrize("skip_ratio", [0.0, 0.25])
def test_sparse_linear_with_short_blocks_equals_the_module(skip_ratio):
    """With a short last key block the method selects the blocks itself (to count them); the output is still the
    SLA module's, with and without negligible blocks."""
    grid = TokenGrid((5, 6), extra_after=6)
    q, k, v = _qkv(grid, torch.Generator().manual_seed(10))
    method = SparseLinearMethod(8, topk=0.4, skip_ratio=skip_ratio, block_q=8, block_k=8, dtype=torch.float64)
    with torch.no_grad():
        method.attention.proj.weight.normal_()
    out, density = method(q, k, v, grid, DiffusionState())
    _check_forward_backward("sla method vs module", out, method.attention(q, k, v), (q, k, v))
    critical = topk_ratio_block_mask(q.detach(), k.detach(), 8, 8, 0.4).to_dense()
    assert float(density) == pytest.approx(float(critical.double().mean()), rel=1e-12)


def test_sparse_linear_density_with_full_blocks_needs_no_mask():
    grid = TokenGrid((4, 8))
    q, k, v = _qkv(grid, torch.Generator().manual_seed(8))
    method = SparseLinearMethod(8, topk=0.5, block_q=8, block_k=8, dtype=torch.float64)
    _, density = method(q, k, v, grid, DiffusionState())
    critical = topk_ratio_block_mask(q.detach(), k.detach(), 8, 8, 0.5).to_dense()
    assert isinstance(density, float) and density == float(critical.double().mean()) == 0.5


def _tome_agents(tokens: torch.Tensor, shape, sx: int, sy: int, ratio: float) -> torch.Tensor:
    """ToMe-SD's bipartite_soft_matching_random2d (use_rand=False) + mean merge, one sample, by loops."""
    rows, cols = shape[-2] // sy * sy, shape[-1] // sx * sx
    coords = TokenGrid(shape).coords().tolist()
    dst = [i for i, c in enumerate(coords) if c[-2] % sy == 0 and c[-1] % sx == 0 and c[-2] < rows and c[-1] < cols]
    src = [i for i in range(len(coords)) if i not in dst]
    r = min(int(len(coords) * ratio), len(src))
    unit = tokens / tokens.norm(dim=-1, keepdim=True)
    unit = unit.detach()
    best = [max(range(len(dst)), key=lambda j: float(unit[s] @ unit[dst[j]])) for s in src]
    score = [float(unit[s] @ unit[dst[best[i]]]) for i, s in enumerate(src)]
    ranked = sorted(range(len(src)), key=lambda i: -score[i])
    merged, kept = ranked[:r], ranked[r:]
    agents = [tokens[src[i]] for i in kept]
    for j, d in enumerate(dst):
        group = [tokens[d]] + [tokens[src[i]] for i in merged if best[i] == j]
        agents.append(torch.stack(group).mean(0))
    return torch.stack(agents)


def test_agent_matches_agentsd_formula():
    gen = torch.Generator().manual_seed(4)
    grid = TokenGrid((6, 8), extra_after=4)
    method = AgentMethod(agent_ratio=0.7, sx=2, sy=2, k_scale2=0.3, k_shortcut=0.075, backend="reference")
    q, k, v = _qkv(grid, gen)
    out, density = method(q, k, v, grid, DiffusionState())
    b, h, _, d = q.shape
    refs = []
    for i in range(b):
        tokens = q[i, :, : grid.num_grid_tokens].transpose(0, 1).reshape(grid.num_grid_tokens, h * d)
        agents = _tome_agents(tokens, grid.shape, 2, 2, 0.7).view(-1, h, d).transpose(0, 1)
        s = d**-0.5
        agent_v = ((agents @ k[i].transpose(-1, -2)) * s).softmax(-1) @ v[i]
        refs.append(((q[i] @ agents.transpose(-1, -2)) * s**0.3).softmax(-1) @ agent_v + 0.075 * v[i])
    ref = torch.stack(refs)
    assert density == pytest.approx(2 * (48 - int(48 * 0.7)) / grid.num_tokens)
    _check_forward_backward("agent", out, ref, (q, k, v))


def test_agent_uses_early_settings_in_early_steps():
    grid = TokenGrid((8, 8))
    q, k, v = _qkv(grid, torch.Generator().manual_seed(7))
    method = AgentMethod(early_steps=2, early_sx=4, early_sy=4, early_agent_ratio=0.95, backend="reference")
    densities = []
    for step in (0, 1, 2):
        _, density = method(q, k, v, grid, DiffusionState(step=step))
        densities.append(density)
    # early: 4 destinations per 4 x 4 window grid, all 60 sources merged -> 4 agents; later 64 - 32 = 32 agents
    assert densities == [2 * 4 / 64, 2 * 4 / 64, 1.0]


def test_agent_keeps_dense_attention_with_few_merges():
    grid = TokenGrid((4, 4))
    q, k, v = _qkv(grid, torch.Generator().manual_seed(5))
    out, density = AgentMethod(agent_ratio=0.25)(q, k, v, grid, DiffusionState())
    assert out is None and density == 1.0
    assert math.isfinite(density)
