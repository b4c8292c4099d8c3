import pytest
import torch
import torch.nn.functional as F

from tests._numerics import assert_close
from visionattn.layout import TokenGrid
from visionattn.nn import AgentAttention
from visionattn.nn.agent_attention import adaptive_avg_pool_nhwc


def _interp(t, size):
    return F.interpolate(t, size=size, mode="bilinear")


def _reference_forward(m: AgentAttention, x, grid_shape, agent_shape):
    """The reference's forward written the reference's way (backbones.md §6.2): pooled-query agents, the two
    softmaxes, biases interpolated over the grid (bilinear) then over the agent grid (bilinear) as in the
    dense-prediction backbones, cls columns/rows for DeiT, DWC on V of the grid tokens."""
    b, n, c = x.shape
    h, w = grid_shape
    heads, hd, prefix = m.num_heads, c // m.num_heads, m.num_prefix_tokens
    n_old = m.an_bias.shape[1]
    p = int(n_old**0.5)
    n_agents = agent_shape[0] * agent_shape[1]
    q, k, v = (x @ m.qkv.weight.T + m.qkv.bias).reshape(b, n, 3, c).permute(2, 0, 1, 3)
    agents = F.adaptive_avg_pool2d(q[:, prefix:].reshape(b, h, w, c).permute(0, 3, 1, 2), agent_shape)
    agents = agents.reshape(b, c, -1).permute(0, 2, 1).reshape(b, n_agents, heads, hd).permute(0, 2, 1, 3)
    q, k, v = (t.reshape(b, n, heads, hd).permute(0, 2, 1, 3) for t in (q, k, v))

    def to_agents(t):  # (heads, hw, p, p) -> (heads, hw, n_agents), the dense code's agent-count interpolation
        return _interp(t, agent_shape).reshape(heads, h * w, n_agents)

    # the reference's parameter shapes
    ah, aw = m.ah_bias[None, :, :, :, None], m.aw_bias[None, :, :, None, :]
    ha, wa = m.ha_bias[None, :, :, None, :], m.wa_bias[None, :, None, :, :]
    bias1 = _interp(m.an_bias, (h, w)).reshape(heads, p, p, h * w).permute(0, 3, 1, 2)
    bias2 = _interp((ah + aw).squeeze(0), (h, w)).reshape(heads, p, p, h * w).permute(0, 3, 1, 2)
    position_bias = (to_agents(bias1) + to_agents(bias2)).permute(0, 2, 1)[None]
    abias1 = _interp(m.na_bias, (h, w)).reshape(heads, p, p, h * w).permute(0, 3, 1, 2)
    abias2 = _interp((ha + wa).squeeze(0).permute(0, 3, 1, 2), (h, w))
    abias2 = abias2.reshape(heads, p, p, h * w).permute(0, 3, 1, 2)
    agent_bias = (to_agents(abias1) + to_agents(abias2))[None]
    if prefix:
        ac = _interp(m.ac_bias.reshape(1, heads, p, p), agent_shape).reshape(1, heads, n_agents, 1)
        ca = _interp(m.ca_bias.reshape(1, heads, p, p), agent_shape).reshape(1, heads, 1, n_agents)
        position_bias = torch.cat([ac, position_bias], dim=-1)
        agent_bias = torch.cat([ca, agent_bias], dim=-2)
    agent_v = ((agents * m.scale) @ k.transpose(-2, -1) + position_bias).softmax(-1) @ v
    out = ((q * m.scale) @ agents.transpose(-2, -1) + agent_bias).softmax(-1) @ agent_v
    out = out.transpose(1, 2).reshape(b, n, c)
    v_map = v[:, :, prefix:].transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)
    local = F.conv2d(v_map, m.dwc.weight, m.dwc.bias, padding=1, groups=c).permute(0, 2, 3, 1).reshape(b, -1, c)
    out = torch.cat([out[:, :prefix], out[:, prefix:] + local], dim=1)
    return out @ m.proj.weight.T + m.proj.bias


CASES = [
    # (grid, bias_size, agent_num, agent_shape, prefix): training size, other sizes, other agent counts, non-square
    ((6, 6), (6, 6), 9, None, 0),
    ((6, 6), (6, 6), 16, None, 1),
    ((5, 7), (6, 6), 9, None, 0),
    ((9, 8), (6, 6), 9, (4, 3), 1),
    ((4, 4), (6, 6), 16, (2, 2), 0),
]


@pytest.mark.parametrize("grid_shape,bias_size,agent_num,agent_shape,prefix", CASES)
def test_agent_attention_matches_reference(rng, grid_shape, bias_size, agent_num, agent_shape, prefix):
    torch.manual_seed(0)
    m = AgentAttention(
        24, num_heads=3, agent_num=agent_num, bias_size=bias_size, agent_shape=agent_shape, num_prefix_tokens=prefix
    ).double()
    with torch.no_grad():
        for p in m.parameters():  # the reference init leaves some at zero; randomise everything
            p.copy_(torch.randn(p.shape, generator=rng, dtype=torch.float64) * 0.5)
    grid = TokenGrid(grid_shape, extra_before=prefix)
    x = torch.randn(2, grid.num_tokens, 24, generator=rng, dtype=torch.float64, requires_grad=True)
    out = m(x, grid)
    ref = _reference_forward(m, x, grid_shape, m.agent_shape)
    assert_close("out", ref, out)
    grad = torch.randn(out.shape, generator=rng, dtype=torch.float64)
    params = [x, *m.parameters()]
    names = ["x", *(n for n, _ in m.named_parameters())]
    for name, r, o in zip(names, torch.autograd.grad(ref, params, grad), torch.autograd.grad(out, params, grad)):
        assert_close(f"d{name}", r, o)


def test_agent_attention_fp32_and_bf16_are_finite(rng):
    m = AgentAttention(32, num_heads=2, agent_num=4, bias_size=(8, 8))
    x = torch.randn(2, 64, 32, generator=rng)
    ref = m.double()(x.double(), TokenGrid((8, 8)))
    out = m.float()(x, TokenGrid((8, 8)))
    assert_close("fp32", ref, out)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m(x, TokenGrid((8, 8)))
    assert_close("bf16", ref, low.float(), tol=5e-2)


def test_agent_attention_rejects_bad_arguments():
    with pytest.raises(ValueError, match="agent_num"):
        AgentAttention(16, num_heads=2, agent_num=10)
    with pytest.raises(ValueError, match="num_heads"):
        AgentAttention(16, num_heads=3)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        AgentAttention(16, num_heads=2, num_prefix_tokens=2)
    m = AgentAttention(16, num_heads=2, agent_num=4, bias_size=(4, 4))
    with pytest.raises(ValueError, match="grid"):
        m(torch.randn(1, 16, 16), TokenGrid((4, 5)))
    with pytest.raises(ValueError, match="grid"):
        m(torch.randn(1, 17, 16), TokenGrid((4, 4), extra_before=1))


@pytest.mark.parametrize(
    "grid_shape,output_size", [((12, 12), (3, 3)), ((13, 17), (3, 4)), ((5, 9), (7, 2)), ((7, 7), (7, 7))]
)
def test_adaptive_avg_pool_nhwc_matches_torch(rng, grid_shape, output_size):
    # strided channels (a slice of a wider projection, as AgentAttention pools the q part of qkv)
    wide = torch.randn(2, *grid_shape, 15, generator=rng, dtype=torch.float64)
    x = wide[..., :5]
    expected = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), output_size).permute(0, 2, 3, 1)
    assert_close("pooled", expected, adaptive_avg_pool_nhwc(x, output_size))
    x32 = x.float().requires_grad_(True)
    adaptive_avg_pool_nhwc(x32, output_size).sum().backward()
    # each input's gradient is 1 / (area of its window), summed over the windows that contain it
    ref = x.detach().requires_grad_(True)
    F.adaptive_avg_pool2d(ref.permute(0, 3, 1, 2), output_size).sum().backward()
    assert_close("grad", ref.grad, x32.grad, dtype=torch.float32)


def test_agent_biases_cache_follows_parameters_and_grid(rng):
    torch.manual_seed(0)
    m = AgentAttention(32, num_heads=2, agent_num=9, bias_size=(6, 6))
    fresh = lambda shape: [t.detach().clone() for t in m._resample_biases(shape)]
    with torch.no_grad():
        first = m.agent_biases((6, 6))
        assert m.agent_biases((6, 6))[0] is first[0]  # cached
        for got, expected in zip(first, fresh((6, 6))):
            assert_close("cached", expected, got)
        m.an_bias.add_(1.0)  # an optimizer step: in place, bumps the version counter
        for got, expected in zip(m.agent_biases((6, 6)), fresh((6, 6))):
            assert_close("after in-place update", expected, got)
        other = AgentAttention(32, num_heads=2, agent_num=9, bias_size=(6, 6))
        m.load_state_dict(other.state_dict())
        for got, expected in zip(m.agent_biases((6, 6)), fresh((6, 6))):
            assert_close("after load_state_dict", expected, got)
        for got, expected in zip(m.agent_biases((5, 8)), fresh((5, 8))):
            assert_close("other grid", expected, got)
        m.double()  # new storages
        assert m.agent_biases((5, 8))[0].dtype == torch.float64
    # with autograd the biases are recomputed and carry gradients to the parameters
    bias_agent, _ = m.agent_biases((5, 8))
    assert bias_agent.requires_grad
    bias_agent.sum().backward()
    assert m.an_bias.grad is not None


def test_adaptive_avg_pool_nhwc_compiles_fullgraph(rng):
    # eager calls take the window indicators from a cache; traced ones build them in the graph
    x = torch.randn(2, 13, 17, 5, generator=rng)
    expected = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), (3, 4)).permute(0, 2, 3, 1)
    assert_close("compiled", expected, torch.compile(adaptive_avg_pool_nhwc, fullgraph=True)(x, (3, 4)))
    assert_close("eager cached", expected, adaptive_avg_pool_nhwc(x, (3, 4)))
