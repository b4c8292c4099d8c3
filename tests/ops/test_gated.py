"""ops.gated_linear_attention: validation, and the reference against the closed form of the recurrence."""

import pytest
import torch
import torch.nn.functional as F

from tests._numerics import assert_close
from visionattn.ops import gated_linear_attention, gated_linear_attention_reference


def _inputs(batch, heads, length, dk, dv, *, dtype=torch.float64, bidirectional=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    q, k = make(batch, heads, length, dk), make(batch, heads, length, dk)
    v = make(batch, heads, length, dv)
    # ViG's gates: logsigmoid(x) / 16, here spread wider so decay varies strongly along the sequence
    a = F.logsigmoid(2 * make(batch, heads, length, dk)) / 4
    b = F.logsigmoid(2 * make(batch, heads, length, dk)) / 4 if bidirectional else None
    return [t if t is None else t.to(dtype).requires_grad_() for t in (q, k, v, a, b)]


def _closed_form(q, k, v, a, b, scale):
    """o_t = sum_{s<=t} (q_t ⊙ exp(A_t - A_s)) k_sᵀ v_s with A the cumulative log gate; the mirror uses s >= t."""
    q = q * scale
    length = q.shape[2]
    cum = a.cumsum(2)  # A_t = sum_{r<=t} a_r
    decay = (cum[:, :, :, None, :] - cum[:, :, None, :, :]).exp()  # [B, H, t, s, Dk]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    scores = torch.einsum("bhtd,bhtsd,bhsd->bhts", q, decay, k) * causal
    out = scores @ v
    if b is None:
        return out
    rcum = b.flip(2).cumsum(2).flip(2)  # B_t = sum_{r>=t} b_r
    decay = (rcum[:, :, :, None, :] - rcum[:, :, None, :, :]).exp()
    scores = torch.einsum("bhtd,bhtsd,bhsd->bhts", q, decay, k) * causal.T
    return (out + scores @ v) / 2


def _vig_flip_form(q, k, v, a, b, scale):
    """ViG's own formulation: forward GLA plus flip(GLA(flip(q), flip(k), flip(v), flip(b)))."""
    fwd = gated_linear_attention_reference(q, k, v, a, scale=scale)
    flip = lambda t: t.flip(2)
    bwd = flip(gated_linear_attention_reference(flip(q), flip(k), flip(v), flip(b), scale=scale))
    return (fwd + bwd) / 2


def _grads(out, inputs, seed=1):
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    leaves = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, leaves, grad_out)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
@pytest.mark.parametrize(
    ("batch", "heads", "length", "dk", "dv"),
    [(1, 1, 1, 4, 4), (2, 3, 13, 8, 4), (1, 2, 29, 4, 8)],
    ids=lambda x: str(x),
)
def test_gated_linear_attention_reference_matches_closed_form(batch, heads, length, dk, dv, bidirectional):
    inputs = _inputs(batch, heads, length, dk, dv, bidirectional=bidirectional)
    scale = 0.7
    ref = gated_linear_attention_reference(*inputs, scale=scale)
    brute = _closed_form(*inputs, scale)
    assert_close("o", brute, ref)
    names = ("dq", "dk", "dv", "da", "db")
    for name, g_brute, g_ref in zip(names, _grads(brute, inputs), _grads(ref, inputs)):
        assert_close(name, g_brute, g_ref)


def test_gated_linear_attention_reference_matches_vig_flip_form():
    inputs = _inputs(2, 2, 11, 4, 6)
    ref = gated_linear_attention_reference(*inputs)
    vig = _vig_flip_form(*inputs, scale=4**-0.5)
    assert_close("o", vig, ref)
    for name, g_vig, g_ref in zip(("dq", "dk", "dv", "da", "db"), _grads(vig, inputs), _grads(ref, inputs)):
        assert_close(name, g_vig, g_ref)


def test_gated_linear_attention_reference_strong_gates_finite():
    q, k, v, a, b = (t.detach() for t in _inputs(1, 2, 9, 4, 4))
    a[..., ::2, :] = -1e4
    b[..., 1::3, :] = float("-inf")
    out = gated_linear_attention_reference(q, k, v, a, b)
    assert torch.isfinite(out).all()


def test_gated_linear_attention_positive_gates_follow_the_recurrence():
    """Positive log gates break the op's contract (unchecked: see its docstring) but "reference" and "torch" still
    compute the recurrence as written, the state growing like exp(Σ a): output and every gradient."""
    q, k, v, _, _ = _inputs(1, 2, 150, 4, 8)
    gen = torch.Generator().manual_seed(2)
    a, b = ((0.1 * torch.rand(1, 2, 150, 4, generator=gen, dtype=torch.float64)).requires_grad_() for _ in "ab")
    ref = gated_linear_attention_reference(q, k, v, a, b, scale=0.5)
    assert_close("o", _closed_form(q, k, v, a, b, 0.5), ref)
    low = [t.detach().float().requires_grad_() for t in (q, k, v, a, b)]
    out = gated_linear_attention(*low, scale=0.5, backend="torch")
    assert_close("o", ref, out)
    grad_out = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, (q, k, v, a, b), grad_out)
    grads = torch.autograd.grad(out, low, grad_out.float())
    for name, g_ref, g_out in zip(("dq", "dk", "dv", "da", "db"), ref_grads, grads):
        assert_close(name, g_ref, g_out)


def test_gated_linear_attention_default_scale_and_dispatch():
    inputs = [t.detach() for t in _inputs(1, 2, 7, 16, 8) if t is not None]
    out = gated_linear_attention(*inputs, backend="reference")
    assert_close("o", gated_linear_attention_reference(*inputs, scale=16**-0.5), out)
    half = [t.float() for t in inputs]
    out32 = gated_linear_attention_reference(*[t.half() for t in half])
    assert out32.dtype == torch.float16
    assert_close("o", gated_linear_attention_reference(*half), out32, dtype=torch.float16)


def test_gated_linear_attention_rejects_bad_arguments():
    q, k, v, a, b = (t.detach().float() for t in _inputs(1, 2, 5, 4, 4))
    with pytest.raises(TypeError, match="q"):
        gated_linear_attention(q.numpy(), k, v, a)
    with pytest.raises(TypeError, match="dtype"):
        gated_linear_attention(q, k.double(), v, a)
    with pytest.raises(ValueError, match="same length N"):
        gated_linear_attention(q[:, :, :3], k, v, a)
    with pytest.raises(ValueError, match="log_gate_fwd"):
        gated_linear_attention(q, k, v, a[..., :2])
    with pytest.raises(ValueError, match="log_gate_bwd"):
        gated_linear_attention(q, k, v, a, b[:, :1])
    with pytest.raises(TypeError, match="log_gate_fwd"):
        gated_linear_attention(q, k, v, a.long())
    with pytest.raises(ValueError, match="log_gate_fwd"):
        gated_linear_attention(q, k, v, a[0])
    with pytest.raises(ValueError, match="scale"):
        gated_linear_attention(q, k, v, a, scale=-1.0)
    with pytest.raises(ValueError, match="backend"):
        gated_linear_attention(q, k, v, a, backend="cuda-magic")


def test_gated_linear_attention_empty_sequence():
    q, k, v, a, b = (t.detach()[:, :, :0] for t in _inputs(2, 3, 4, 4, 8))
    assert gated_linear_attention(q, k, v, a, b).shape == (2, 3, 0, 8)
