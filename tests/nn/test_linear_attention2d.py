"""LinearAttention2d / SoftmaxAttention2d / 2D RoPE against the official modules re-implemented in float64.

The oracle (tests/backbones/_linear_vit_reference.py) follows backbones.md §2.2 / §3.2: NCHW 1x1 convolutions,
ELU+1 features, normaliser from un-rotated features, materialised softmax. Weights are shared with the module under
test (the 1x1 conv weights are the module's Linear weights with two trailing unit dims).
"""

import pytest
import torch

from tests._numerics import assert_close
from tests.backbones import _linear_vit_reference as ref
from visionattn.layout import TokenGrid
from visionattn.nn import LinearAttention2d, RoPE2d, SoftmaxAttention2d, apply_rope2d, rope2d_tables

CASES = [(2, 32, 2, (5, 7)), (1, 16, 1, (4, 4)), (2, 48, 3, (3, 9))]
CASE_IDS = [f"B{b}-C{c}-H{h}-{g[0]}x{g[1]}" for b, c, h, g in CASES]


@pytest.mark.parametrize("head_dim", [4, 16, 96])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 2)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_rope2d_tables_match_brute_force(shape, head_dim):
    cos, sin = rope2d_tables(TokenGrid(shape), head_dim, dtype=torch.float64)
    sin_ref, cos_ref = ref.rope_tables(*shape, head_dim)
    assert_close("cos", cos_ref, cos)
    assert_close("sin", sin_ref, sin)
    module_cos, module_sin = RoPE2d(head_dim)(TokenGrid(shape), torch.empty(0, dtype=torch.float64))
    assert torch.equal(module_cos, cos) and torch.equal(module_sin, sin)
    # pair tables: the one angle both channels of a pair share
    pair_cos, pair_sin = RoPE2d(head_dim, pairs=True)(TokenGrid(shape), torch.empty(0, dtype=torch.float64))
    for table, full in ((pair_cos, cos), (pair_sin, sin)):
        assert table.shape == (shape[0] * shape[1], head_dim // 2)
        assert torch.equal(table, full[:, ::2]) and torch.equal(table, full[:, 1::2])


def test_rope2d_module_reuses_tables_in_eager_calls_only():
    """Eager calls share one pair of read-only tables per (grid, head dim, base, dtype, pairs); other settings and
    fake-tensor tracing build their own."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    rope, grid = RoPE2d(16, pairs=True), TokenGrid((3, 5))
    first, again = rope(grid, torch.empty(0)), rope(grid, torch.empty(0, dtype=torch.bfloat16))
    assert all(a is b for a, b in zip(first, again))  # bf16 activations use the same fp32 tables
    assert all(torch.equal(t, r) for t, r in zip(first, rope2d_tables(grid, 16, pairs=True)))
    other = rope(grid, torch.empty(0, dtype=torch.float64))
    assert other[0].dtype == torch.float64 and other[0] is not first[0]
    assert RoPE2d(16)(grid, torch.empty(0))[0].shape == (15, 16)
    assert rope(TokenGrid((5, 3)), torch.empty(0))[0] is not first[0]
    with FakeTensorMode():
        fake = rope(grid, torch.empty(0))
    assert fake[0] is not first[0] and rope(grid, torch.empty(0))[0] is first[0]


def test_apply_rope2d_rotates_interleaved_pairs(rng):
    x = torch.randn(2, 3, 15, 8, generator=rng, dtype=torch.float64)
    sin, cos = ref.rope_tables(3, 5, 8)
    assert_close("rotated", ref.theta_shift(x, sin, cos), apply_rope2d(x, cos, sin))
    # A rotation keeps the norm of every pair.
    pairs = apply_rope2d(x, cos, sin).unflatten(-1, (4, 2)).norm(dim=-1)
    assert_close("pair norms", x.unflatten(-1, (4, 2)).norm(dim=-1), pairs)


def _module(kind: str, dim: int, heads: int):
    if kind == "softmax":
        return SoftmaxAttention2d(dim, heads, dtype=torch.float64)
    return LinearAttention2d(dim, heads, kind=kind, dtype=torch.float64)


def _with_random_params(module, rng):
    """Biases and weights of a non-trivial size (the default init is std 0.02 with zero biases)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=rng, dtype=p.dtype) * (0.3 if p.ndim > 1 else 0.5))
    return module


@pytest.mark.parametrize("kind", ["mala", "rala", "softmax"])
@pytest.mark.parametrize("batch,dim,heads,grid", CASES, ids=CASE_IDS)
def test_attention2d_matches_official_module(rng, kind, batch, dim, heads, grid):
    module = _with_random_params(_module(kind, dim, heads), rng)
    rows, cols = grid
    x = torch.randn(batch, rows * cols, dim, generator=rng, dtype=torch.float64, requires_grad=True)
    out = module(x, TokenGrid(grid))

    params = {
        name: p.detach().clone().reshape(*p.shape, 1, 1)
        if name in ("qkvo.weight", "proj.weight")
        else p.detach().clone()
        for name, p in module.named_parameters()
    }
    for p in params.values():
        p.requires_grad_(True)
    x_ref = x.detach().transpose(1, 2).reshape(batch, dim, rows, cols).requires_grad_(True)
    sin, cos = ref.rope_tables(rows, cols, dim // heads)
    expected = ref.attention(kind, x_ref, params, heads, sin, cos).flatten(2).transpose(1, 2)
    assert_close("out", expected, out)

    grad_out = torch.randn(out.shape, generator=rng, dtype=torch.float64)
    out.backward(grad_out)
    expected.backward(grad_out)
    assert_close("dx", x_ref.grad.flatten(2).transpose(1, 2), x.grad)
    for name, p in module.named_parameters():
        assert_close(f"d{name}", params[name].grad.reshape(p.shape), p.grad)


@pytest.mark.parametrize("kind", ["mala", "rala", "softmax"])
def test_attention2d_precomputed_rope_equals_computed(rng, kind):
    module = _with_random_params(_module(kind, 32, 2), rng)
    x = torch.randn(2, 20, 32, generator=rng, dtype=torch.float64)
    grid = TokenGrid((4, 5))
    rope = rope2d_tables(grid, 16, dtype=torch.float64)
    # the module computes pair tables for linear attention: the same output as the full tables
    assert module.rope.pairs == (kind != "softmax")
    assert_close("out", module(x, grid), module(x, grid, rope))


def test_linear_attention2d_reference_backend_and_repr(rng):
    module = LinearAttention2d(32, 2, kind="rala", backend="reference")
    x = torch.randn(1, 12, 32, generator=rng)
    assert module(x, TokenGrid((3, 4))).shape == (1, 12, 32)
    assert "kind='rala'" in repr(module) and "backend='reference'" in repr(module)


def test_attention2d_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        LinearAttention2d(32, 2, kind="linear")
    with pytest.raises(ValueError, match="num_heads"):
        LinearAttention2d(32, 3)
    with pytest.raises(ValueError, match="head_dim"):
        SoftmaxAttention2d(12, 2)
    module = LinearAttention2d(32, 2)
    with pytest.raises(ValueError, match="x must"):
        module(torch.randn(1, 10, 32), TokenGrid((3, 4)))
    with pytest.raises(ValueError, match="x must"):
        module(torch.randn(1, 12, 16), TokenGrid((3, 4)))
    with pytest.raises(ValueError, match="grid"):
        module(torch.randn(1, 12, 32), TokenGrid((12,)))
    with pytest.raises(ValueError, match="grid"):
        module(torch.randn(1, 13, 32), TokenGrid((3, 4), extra_before=1))
    with pytest.raises(TypeError, match="grid"):
        module(torch.randn(1, 12, 32), (3, 4))
    with pytest.raises(ValueError, match="head_dim"):
        rope2d_tables(TokenGrid((2, 2)), 6)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["mala", "rala"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_attention2d_gpu_matches_float64(kind, dtype):
    # MAViT/RAVLT stage-1 size at 224 px: 56x56 tokens, 64 channels, one head (96 channels for base/large).
    gen = torch.Generator(device="cuda").manual_seed(0)
    for dim in (64, 96):
        module = LinearAttention2d(dim, 1, kind=kind, device="cuda")
        x = torch.randn(8, 56 * 56, dim, device="cuda", generator=gen)
        grid = TokenGrid((56, 56))
        expected = module.double()(x.double(), grid)
        out = module.to(dtype)(x.to(dtype), grid)
        assert_close("out", expected, out, dtype=dtype)
