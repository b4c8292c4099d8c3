"""The chunked PyTorch backend of ops.gated_linear_attention against the float64 token-loop reference: output and
every gradient (q, k, v, both gates), causal and bidirectional, odd lengths, strong and positive gates, dispatch."""

import pytest
import torch
import torch.nn.functional as F

from tests._numerics import assert_close
from visionattn.ops import gated, gated_linear_attention, gated_linear_attention_reference

_NAMES = ("o", "dq", "dk", "dv", "dlog_gate_fwd", "dlog_gate_bwd")


def _inputs(batch, heads, length, dk, dv, *, bidirectional=True, gate_scale=0.25, seed=0):
    """float64 (q, k, v, log_gate_fwd, log_gate_bwd or None); gates are ViG's logsigmoid(x) / 16, spread wider."""
    gen = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = make(batch, heads, length, dk), make(batch, heads, length, dk), make(batch, heads, length, dv)
    a = F.logsigmoid(2 * make(batch, heads, length, dk)) * gate_scale
    b = F.logsigmoid(2 * make(batch, heads, length, dk)) * gate_scale if bidirectional else None
    return [q, k, v, a, b]


def _check_against_reference(inputs, dtype=torch.float32, scale=None, seed=1):
    """Output and gradients of backend="torch" on ``inputs`` cast to ``dtype`` vs the float64 reference."""
    master = [None if t is None else t.detach().requires_grad_() for t in inputs]
    low = [None if t is None else t.detach().to(dtype).requires_grad_() for t in inputs]
    ref = gated_linear_attention_reference(*master, scale=scale)
    out = gated_linear_attention(*low, scale=scale, backend="torch")
    assert out.dtype == dtype
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    leaves = [i for i, t in enumerate(master) if t is not None]
    ref_grads = torch.autograd.grad(ref, [master[i] for i in leaves], grad_out)
    grads = torch.autograd.grad(out, [low[i] for i in leaves], grad_out.to(dtype))
    assert_close("o", ref, out, dtype=dtype)
    for i, g_ref, g in zip(leaves, ref_grads, grads):
        assert_close(_NAMES[i + 1], g_ref, g, dtype=dtype)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
@pytest.mark.parametrize(
    ("batch", "heads", "length", "dk", "dv"),
    [(1, 1, 1, 4, 4), (2, 3, 17, 8, 12), (1, 2, 63, 16, 8), (2, 1, 65, 8, 4), (1, 2, 130, 4, 16)],
    ids=lambda x: str(x),
)
def test_gated_linear_attention_torch_matches_reference(batch, heads, length, dk, dv, bidirectional):
    _check_against_reference(_inputs(batch, heads, length, dk, dv, bidirectional=bidirectional), scale=0.7)


@pytest.mark.parametrize("gate_scale", [1 / 16, 1.0], ids=["vig-gates", "steep-gates"])
def test_gated_linear_attention_torch_gate_strengths(gate_scale):
    """ViG's own gates stay on the factored path; steep ones send most (chunk, channel) pairs to the exact one."""
    _check_against_reference(_inputs(2, 2, 150, 8, 8, gate_scale=gate_scale))


def test_gated_linear_attention_torch_positive_gates():
    """Gates > 0 (growth) are computed as written, here inside the factored path's bound."""
    q, k, v, a, b = _inputs(1, 2, 70, 4, 8)
    _check_against_reference([q, k, v, a.abs() / 8, b.abs() / 8])


def test_gated_linear_attention_torch_strong_gates():
    """-1e4 and -inf gates on some channels only: both intra-chunk paths in one call, finite and exact."""
    q, k, v, a, b = _inputs(2, 2, 100, 8, 4)
    a[..., ::7, :3] = -1e4
    b[..., 1::5, 5] = float("-inf")
    b[..., 40, :] = float("-inf")
    _check_against_reference([q, k, v, a, b])


def test_gated_linear_attention_torch_half_precision():
    inputs = _inputs(1, 2, 40, 8, 8)
    for dtype in (torch.float16, torch.bfloat16):
        _check_against_reference(inputs, dtype=dtype)


def test_gated_linear_attention_torch_token_major_views():
    """(B, N, H, D) storage viewed as (B, H, N, D), as the nn layers pass it."""
    inputs = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in _inputs(2, 3, 33, 8, 8)]
    _check_against_reference(inputs)


def test_gated_linear_attention_torch_empty_sequence():
    q, k, v, a, b = (t.float()[:, :, :0] for t in _inputs(2, 3, 4, 4, 8))
    assert gated_linear_attention(q, k, v, a, b, backend="torch").shape == (2, 3, 0, 8)


def test_gated_linear_attention_torch_meta_tensors():
    """Shape inference on the meta device (timm's tests run models there)."""
    q, k, v, a, b = (t.float().to("meta") for t in _inputs(2, 3, 70, 4, 8))
    out = gated_linear_attention(q, k, v, a, b, backend="torch")
    assert out.device.type == "meta" and out.shape == (2, 3, 70, 8)


def test_gated_linear_attention_default_backend_choice():
    """Without Triton (head dim 8 here), float32 runs on "torch"; float64 stays on the reference (the oracle)."""
    q, k, v, a, b = _inputs(1, 2, 5, 8, 8)
    args = dict(q=q.float(), k=k.float(), v=v.float(), log_gate_fwd=a.float(), log_gate_bwd=b.float(), scale=1.0)
    assert gated._registry.select(None, args) is gated._torch_backend
    args64 = dict(q=q, k=k, v=v, log_gate_fwd=a, log_gate_bwd=b, scale=1.0)
    assert gated._registry.select(None, args64) is gated._reference_backend


def test_gated_linear_attention_torch_rejects_float64():
    q, k, v, a, b = _inputs(1, 2, 5, 8, 8)
    with pytest.raises(NotImplementedError, match="q.dtype"):
        gated_linear_attention(q, k, v, a, b, backend="torch")


@pytest.mark.gpu
def test_gated_linear_attention_torch_gpu_matches_reference():
    """On CUDA (the backend for head dims Triton lacks), ViG-T head dims, exact float32 matmuls, strong gates too."""
    q, k, v, a, b = _inputs(2, 3, 1000, 32, 64, gate_scale=1 / 16)
    a[..., 500:510, :4] = -1e4
    inputs = [t.detach().requires_grad_() for t in (q, k, v, a, b)]
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        ref = gated_linear_attention_reference(*inputs)
        cuda = [t.detach().float().cuda().requires_grad_() for t in inputs]
        out = gated_linear_attention(*cuda, backend="torch")
        grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        ref_grads = torch.autograd.grad(ref, inputs, grad_out)
        grads = torch.autograd.grad(out, cuda, grad_out.float().cuda())
    finally:
        torch.set_float32_matmul_precision(previous)
    assert_close("o", ref, out.cpu())
    for name, g_ref, g in zip(_NAMES[1:], ref_grads, grads):
        assert_close(name, g_ref, g.cpu())
