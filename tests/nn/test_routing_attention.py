"""BiLevelRoutingAttention vs the reference's gather-based BRA (backbones.md §5.2), and LePEAttention.

``GatherBiLevelRoutingAttention`` re-implements ``ops/bra_legacy.py``'s forward the reference's way (regions as a
batch axis, a ``torch.gather`` of top-k K/V copies, explicit softmax) with the same parameters as
``BiLevelRoutingAttention``; ``tools/bench_cases/models_biformer.py`` swaps it into ``biformer_tiny`` as the
reference-style baseline.
"""

import pytest
import torch
import torch.nn.functional as F

from tests._numerics import assert_close
from visionattn.layout import TokenGrid, TokenLayout
from visionattn.nn import BiLevelRoutingAttention, LePEAttention
from visionattn.nn.routing_attention import _from_regions, _to_regions


class GatherBiLevelRoutingAttention(BiLevelRoutingAttention):
    """The reference's BRA: pad, regions as a batch axis, routing, top-k-fold K/V gather, dense per-region softmax."""

    def forward(self, x, grid):
        n, num_tokens, c = x.shape
        h_in, w_in = grid.shape
        s, heads = self.n_win, self.num_heads
        x = F.pad(x.view(n, h_in, w_in, c), (0, 0, 0, (-w_in) % s, 0, (-h_in) % s))
        _, h, w, _ = x.shape
        rh, rw = h // s, w // s
        x = x.view(n, s, rh, s, rw, c).permute(0, 1, 3, 2, 4, 5).reshape(n, s * s, rh * rw, c)
        q, kv = self.qkv(x).split([c, 2 * c], dim=-1)  # (n, p2, w2, c), (n, p2, w2, 2c)
        q_win, k_win = q.mean(2), kv[..., :c].mean(2)
        r_idx = torch.topk((q_win.detach() * self.scale) @ k_win.detach().transpose(-2, -1), k=self.topk, dim=-1)[1]
        p2, w2 = s * s, rh * rw
        kv_sel = torch.gather(
            kv.view(n, 1, p2, w2, 2 * c).expand(-1, p2, -1, -1, -1),
            dim=2,
            index=r_idx.view(n, p2, self.topk, 1, 1).expand(-1, -1, -1, w2, 2 * c),
        )  # (n, p2, topk, w2, 2c): the top-k-fold copy
        k_sel, v_sel = kv_sel.split([c, c], dim=-1)
        k_sel = k_sel.reshape(n * p2, self.topk * w2, heads, c // heads).permute(0, 2, 3, 1)
        v_sel = v_sel.reshape(n * p2, self.topk * w2, heads, c // heads).transpose(1, 2)
        q_pix = q.reshape(n * p2, w2, heads, c // heads).transpose(1, 2)
        out = torch.softmax((q_pix * self.scale) @ k_sel, dim=-1) @ v_sel  # (n p2, m, w2, c/m)
        out = out.transpose(1, 2).reshape(n, s, s, rh, rw, c).permute(0, 1, 3, 2, 4, 5).reshape(n, h, w, c)
        v_map = kv[..., c:].reshape(n, s, s, rh, rw, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, h, w)
        out = out + self.lepe(v_map).permute(0, 2, 3, 1)
        return self.proj(out)[:, :h_in, :w_in].reshape(n, num_tokens, c)


def _random_module(cls, rng, **kwargs):
    m = cls(**kwargs).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=rng, dtype=torch.float64) * 0.3)
    return m


CASES = [
    # (grid, n_win, topk, heads): divisible, padded (non-divisible, non-square), 1-token regions, all regions
    ((14, 14), 7, 4, 2),
    ((10, 13), 4, 3, 4),
    ((6, 6), 7, 16, 1),
    ((8, 8), 2, 4, 2),
]


@pytest.mark.parametrize("grid_shape,n_win,topk,heads", CASES)
def test_bi_level_routing_attention_matches_gather_reference(rng, grid_shape, n_win, topk, heads):
    kwargs = dict(dim=16, num_heads=heads, n_win=n_win, topk=topk, backend="reference")
    ours = _random_module(BiLevelRoutingAttention, rng, **kwargs)
    ref = GatherBiLevelRoutingAttention(**kwargs).double()
    ref.load_state_dict(ours.state_dict())
    grid = TokenGrid(grid_shape)
    x = torch.randn(2, grid.num_tokens, 16, generator=rng, dtype=torch.float64, requires_grad=True)
    out, expected = ours(x, grid), ref(x, grid)
    assert_close("out", expected, out)
    grad = torch.randn(out.shape, generator=rng, dtype=torch.float64)
    for (name, p), p_ref in zip([("x", x), *ours.named_parameters()], [x, *ref.parameters()]):
        g_out = torch.autograd.grad(out, p, grad, retain_graph=True)[0]
        g_ref = torch.autograd.grad(expected, p_ref, grad, retain_graph=True)[0]
        assert_close(f"d{name}", g_ref, g_out)


TRITON_CASES = [((10, 13), 4, 3, 2), ((9, 9), 8, 6, 1), ((16, 17), 16, 2, 1)]  # padded maps, n_win 4/8/16


@pytest.mark.parametrize("grid_shape,n_win,topk,heads", TRITON_CASES)
def test_bi_level_routing_attention_routed_kernel_matches_gather_reference(rng, kernel_device, grid_shape, n_win,
                                                                           topk, heads):  # fmt: skip
    """The routed-kernel path (Triton, fp32) on padded maps, forward and input gradient, against the gather BRA."""
    kwargs = dict(dim=32, num_heads=heads, n_win=n_win, topk=topk, device=kernel_device)
    ours = BiLevelRoutingAttention(**kwargs, backend="triton")
    ref = GatherBiLevelRoutingAttention(**kwargs)
    ref.load_state_dict(ours.state_dict())
    grid = TokenGrid(grid_shape)
    x = torch.randn(1, grid.num_tokens, 32, generator=rng).to(kernel_device).requires_grad_(True)
    out, expected = ours(x, grid), ref(x, grid)
    assert_close("out", expected, out, tol=1e-5)
    grad = torch.randn(out.shape, generator=rng).to(kernel_device)
    d_out, d_ref = (torch.autograd.grad(o, x, grad)[0] for o in (out, expected))
    assert_close("dx", d_ref, d_out, tol=1e-5)


def test_bi_level_routing_attention_previous_path_switch(rng, monkeypatch):
    """``routed_max_region = 0`` sends small regions through block_sparse_attention: same result."""
    m = _random_module(BiLevelRoutingAttention, rng, dim=16, num_heads=2, n_win=3, topk=2, backend="reference")
    x = torch.randn(2, 49, 16, generator=rng, dtype=torch.float64)
    routed = m(x, TokenGrid((7, 7)))
    monkeypatch.setattr(BiLevelRoutingAttention, "routed_max_region", 0)
    assert_close("previous path", routed, m(x, TokenGrid((7, 7))))


def test_region_order_is_the_tile_order_layout(rng):
    x = torch.randn(2, 12, 15, 3, generator=rng)
    layout = TokenLayout(TokenGrid((12, 15)), tile=(4, 5))
    tiles = _to_regions(x, 3)
    assert torch.equal(tiles, layout.to_layout(x.reshape(2, -1, 3), dim=1))
    assert torch.equal(_from_regions(tiles, 3, 12, 15), x)


def test_bi_level_routing_attention_fp32_and_meta(rng):
    m = BiLevelRoutingAttention(32, num_heads=2, n_win=4, topk=2)
    x = torch.randn(2, 64, 32, generator=rng)
    expected = GatherBiLevelRoutingAttention(32, num_heads=2, n_win=4, topk=2)
    expected.load_state_dict(m.state_dict())
    assert_close("fp32", expected(x, TokenGrid((8, 8))), m(x, TokenGrid((8, 8))), tol=1e-5)
    meta = BiLevelRoutingAttention(32, num_heads=2, n_win=4, topk=2, device="meta")
    assert meta(x.to("meta"), TokenGrid((8, 8))).shape == (2, 64, 32)


def test_lepe_attention_matches_reference_formula(rng):
    m = _random_module(LePEAttention, rng, dim=16, num_heads=8)
    x = torch.randn(2, 20, 16, generator=rng, dtype=torch.float64)
    q, k, v = (x @ m.qkv.weight.T).reshape(2, 20, 3, 8, 2).permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-2, -1) * 2**-0.5, dim=-1)
    lepe = F.conv2d(x.transpose(1, 2).reshape(2, 16, 4, 5), m.lepe.weight, m.lepe.bias, padding=2, groups=16)
    expected = ((attn @ v).transpose(1, 2).reshape(2, 20, 16) + lepe.flatten(2).transpose(1, 2)) @ m.proj.weight.T
    assert_close("out", expected + m.proj.bias, m(x, TokenGrid((4, 5))))


def test_routing_attention_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_heads"):
        BiLevelRoutingAttention(30, num_heads=4)
    with pytest.raises(ValueError, match="topk"):
        BiLevelRoutingAttention(32, topk=0)
    with pytest.raises(ValueError, match="num_heads"):
        LePEAttention(30, num_heads=8)
    m = BiLevelRoutingAttention(16, num_heads=2, n_win=2, topk=1)
    with pytest.raises(ValueError, match="grid"):
        m(torch.randn(1, 16, 16), TokenGrid((4, 5)))


GPU_CASES = [((56, 56), 7, 1, 2), ((28, 28), 7, 4, 4), ((14, 14), 7, 16, 8), ((64, 48), 8, 4, 2), ((256, 256), 7, 1, 2)]


@pytest.mark.gpu
@pytest.mark.parametrize("grid_shape,n_win,topk,heads", GPU_CASES)
def test_bi_level_routing_attention_gpu_triton_matches_references(grid_shape, n_win, topk, heads):
    torch.manual_seed(0)
    dim = 32 * heads
    ours = BiLevelRoutingAttention(dim, num_heads=heads, n_win=n_win, topk=topk, device="cuda")
    gather = GatherBiLevelRoutingAttention(dim, num_heads=heads, n_win=n_win, topk=topk, device="cuda")
    gather.load_state_dict(ours.state_dict())
    grid = TokenGrid(grid_shape)
    x = torch.randn(4, grid.num_tokens, dim, device="cuda", requires_grad=True)
    # fp32: same routing as the gather reference (fp32 region means on both sides)
    out32, ref32 = ours(x, grid), gather(x, grid)
    assert_close("fp32", ref32, out32, tol=2e-3)
    grad = torch.randn_like(out32)
    assert_close("dx fp32", *(torch.autograd.grad(o, x, grad)[0] for o in (ref32, out32)), tol=2e-3)
    if grid.num_tokens > 16384:
        return  # the reference backend is dense (N x N scores): the bf16 comparison needs a smaller grid
    # bf16: the Triton kernel against the reference backend on the same bf16 q/k (hence the same routing)
    ours_bf16 = ours.to(torch.bfloat16)
    xb = x.detach().to(torch.bfloat16).requires_grad_(True)
    out = ours_bf16(xb, grid)
    ours_bf16.backend = "reference"
    ref = ours_bf16(xb, grid)
    assert_close("bf16", ref.float(), out.float(), dtype=torch.bfloat16)
    grad = torch.randn_like(out)
    (d_out,) = torch.autograd.grad(out, xb, grad)
    (d_ref,) = torch.autograd.grad(ref, xb, grad)
    assert_close("dx bf16", d_ref.float(), d_out.float(), dtype=torch.bfloat16)
