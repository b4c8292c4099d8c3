import pytest
import torch

from tests._numerics import assert_close
from visionattn.ops.agent import agent_attention, agent_attention_reference


def _brute_force(q, k, v, agents, bias_agent, bias_query, scale):
    """Eq. 3 of the Agent Attention paper with explicit exponentials and sums, one (b, h) at a time."""
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=torch.float64)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            a, kk, vv, qq = agents[b, h], k[b, h], v[b, h], q[b, h]
            b1 = bias_agent[min(b, bias_agent.shape[0] - 1), min(h, bias_agent.shape[1] - 1)]
            b2 = bias_query[min(b, bias_query.shape[0] - 1), min(h, bias_query.shape[1] - 1)]
            w1 = torch.exp(torch.einsum("id,jd->ij", a, kk) * scale + b1)
            agent_v = torch.einsum("ij,jc->ic", w1 / w1.sum(1, keepdim=True), vv)
            w2 = torch.exp(torch.einsum("id,jd->ij", qq, a) * scale + b2)
            out[b, h] = torch.einsum("ij,jc->ic", w2 / w2.sum(1, keepdim=True), agent_v)
    return out


def _inputs(gen, batch=2, heads=3, n_q=20, n_kv=22, n_agents=6, dim=8, dim_v=5, bias_batch=1, bias_heads=3):
    make = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    return dict(
        q=make(batch, heads, n_q, dim),
        k=make(batch, heads, n_kv, dim),
        v=make(batch, heads, n_kv, dim_v),
        agents=make(batch, heads, n_agents, dim),
        bias_agent=make(bias_batch, bias_heads, n_agents, n_kv),
        bias_query=make(bias_batch, bias_heads, n_q, n_agents),
    )


@pytest.mark.parametrize("bias_batch,bias_heads", [(1, 3), (2, 1), (2, 3)], ids=["b1-h3", "b2-h1", "b2-h3"])
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_agent_attention_matches_brute_force(rng, backend, bias_batch, bias_heads):
    inputs = _inputs(rng, bias_batch=bias_batch, bias_heads=bias_heads)
    for t in inputs.values():
        t.requires_grad_(True)
    scale = 0.3
    ref = _brute_force(**inputs, scale=scale)
    out = agent_attention(**inputs, scale=scale, backend=backend)
    assert_close("out", ref, out)
    grad = torch.randn(ref.shape, generator=rng, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, list(inputs.values()), grad)
    out_grads = torch.autograd.grad(out, list(inputs.values()), grad)
    for name, r, o in zip(inputs, ref_grads, out_grads):
        assert_close(f"d{name}", r, o)


@pytest.mark.parametrize("n_agents", [6, 130], ids=["explicit-aggregation", "sdpa-aggregation"])
def test_agent_attention_sdpa_fp32_matches_reference(rng, n_agents):
    inputs = _inputs(rng, n_q=140, n_kv=150, n_agents=n_agents)
    ref = agent_attention_reference(**inputs)
    out = agent_attention(**{k: t.float() for k, t in inputs.items()})
    assert out.dtype == torch.float32
    assert_close("out", ref, out)


def test_agent_attention_without_biases_uses_default_scale(rng):
    inputs = _inputs(rng)
    inputs["bias_agent"] = torch.zeros_like(inputs["bias_agent"])
    inputs["bias_query"] = torch.zeros_like(inputs["bias_query"])
    ref = _brute_force(**inputs, scale=inputs["q"].shape[-1] ** -0.5)
    out = agent_attention(inputs["q"], inputs["k"], inputs["v"], inputs["agents"])
    assert_close("out", ref, out)


@pytest.mark.parametrize("n_agents", [6, 8, 9])
def test_agent_attention_sdpa_without_bias_pads_agents(rng, n_agents):
    # the query-side SDPA pads the agent axis to a multiple of 8 with masked agents, also when no bias is given
    inputs = _inputs(rng, n_agents=n_agents)
    for t in inputs.values():
        t.requires_grad_(True)
    zeros = dict(bias_agent=torch.zeros_like(inputs["bias_agent"]), bias_query=torch.zeros_like(inputs["bias_query"]))
    ref = _brute_force(**{**inputs, **zeros}, scale=0.5)
    out = agent_attention(inputs["q"], inputs["k"], inputs["v"], inputs["agents"], scale=0.5, backend="sdpa")
    assert_close("out", ref, out)
    names = ["q", "k", "v", "agents"]
    grad = torch.randn(ref.shape, generator=rng, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, [inputs[n] for n in names], grad)
    out_grads = torch.autograd.grad(out, [inputs[n] for n in names], grad)
    for name, r, o in zip(names, ref_grads, out_grads):
        assert_close(f"d{name}", r, o)


def test_agent_attention_sdpa_strided_bias_matches_brute_force(rng):
    # a bias whose agent axis is strided (a permuted view, as AgentAttention builds it) with 8 agents (no padding)
    inputs = _inputs(rng, n_agents=8)
    inputs["bias_query"] = inputs["bias_query"].transpose(-1, -2).contiguous().transpose(-1, -2)
    assert inputs["bias_query"].stride(-1) != 1
    ref = _brute_force(**inputs, scale=0.5)
    assert_close("out", ref, agent_attention(**inputs, scale=0.5, backend="sdpa"))


def test_agent_attention_rejects_bad_arguments(rng):
    x = _inputs(rng)
    q, k, v, a = x["q"], x["k"], x["v"], x["agents"]
    with pytest.raises(ValueError, match="agents"):
        agent_attention(q, k, v, a[:, :, :, :4])
    with pytest.raises(TypeError, match="agents"):
        agent_attention(q, k, v, a.float())
    with pytest.raises(ValueError, match="agents"):
        agent_attention(q, k, v, a[0])
    with pytest.raises(ValueError, match="bias_agent"):
        agent_attention(q, k, v, a, x["bias_agent"][..., :-1])
    with pytest.raises(ValueError, match="bias_query"):
        agent_attention(q, k, v, a, x["bias_agent"], x["bias_query"].expand(3, 3, -1, -1))
    with pytest.raises(TypeError, match="bias_query"):
        agent_attention(q, k, v, a, None, x["bias_query"].long())
    with pytest.raises(ValueError, match="same length"):
        agent_attention(q, k, v[:, :, :-1], a)
    with pytest.raises(ValueError, match="scale"):
        agent_attention(q, k, v, a, scale=-1.0)
    with pytest.raises(ValueError, match="backend"):
        agent_attention(q, k, v, a, backend="flash")


@pytest.mark.gpu
@pytest.mark.parametrize("n_agents", [9, 49, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_agent_attention_gpu_sdpa_matches_reference(dtype, n_agents):
    gen = torch.Generator().manual_seed(0)
    inputs = _inputs(gen, batch=4, heads=6, n_q=3136, n_kv=3136, n_agents=n_agents, dim=64, dim_v=64, bias_heads=6)
    cuda = {k: t.to("cuda", dtype).requires_grad_(True) for k, t in inputs.items()}
    # the float64 oracle sees the same rounded inputs
    ref_in = {k: t.detach().double().requires_grad_(True) for k, t in cuda.items()}
    ref = agent_attention_reference(**ref_in)
    out = agent_attention(**cuda)
    assert out.dtype == dtype
    assert_close("out", ref, out, dtype=dtype)
    grad = torch.randn(out.shape, generator=gen).to("cuda", dtype)
    got = torch.autograd.grad(out, list(cuda.values()), grad)
    expected = torch.autograd.grad(ref, list(ref_in.values()), grad.double())
    for name, r, g in zip(cuda, expected, got):
        assert_close(f"d{name}", r, g, dtype=dtype)
