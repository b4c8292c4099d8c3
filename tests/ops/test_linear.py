"""linear_attention: the float64 reference against explicit sums over keys, forward and gradients; argument errors."""

import pytest
import torch

from tests._numerics import assert_close
from visionattn.ops import (
    LinearAttentionState,
    linear_attention,
    linear_attention_apply,
    linear_attention_query_mean,
    linear_attention_reference,
    linear_attention_state,
    merge_linear_attention_states,
)


def _phi(x, name):
    if name == "elu1":
        return torch.where(x > 0, x + 1, torch.exp(x))
    if name == "relu":
        return torch.where(x > 0, x, torch.zeros_like(x))
    if name == "softmax":
        e = torch.exp(x - x.amax(dim=-1, keepdim=True))
        return e / e.sum(dim=-1, keepdim=True)
    return x


def _rot(x, cos, sin):
    out = torch.empty_like(x)
    for p in range(x.shape[-1] // 2):
        a, b = x[..., 2 * p], x[..., 2 * p + 1]
        out[..., 2 * p] = a * cos[:, 2 * p] - b * sin[:, 2 * p]
        out[..., 2 * p + 1] = b * cos[:, 2 * p + 1] + a * sin[:, 2 * p + 1]
    return out


def brute_force(
    q, k, v, *, feature_map, normalize, q_norm=None, k_norm=None, key_weight=None, rope=None, scale=None, eps=1e-6
):
    """Attention-matrix form with an explicit loop over keys j (MALA's Σ_j Attn(Q_i, K_j) = 1 rows, RALA's α_j)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    nq, nk = q.shape[2], k.shape[2]
    qn = _phi(q if q_norm is None else q_norm, feature_map)
    kn = _phi(k if k_norm is None else k_norm, feature_map)
    qr, kr = _phi(q, feature_map), _phi(k, feature_map)
    if rope is not None:
        qr, kr = _rot(qr, *rope), _rot(kr, *rope)
    if key_weight is None:
        w = torch.ones(*k.shape[:3], dtype=k.dtype)
    elif isinstance(key_weight, str):
        qbar = sum(qn[:, :, i] for i in range(nq)) / nq
        s = torch.stack([scale * (qbar * kn[:, :, j]).sum(-1) for j in range(nk)], dim=-1)
        e = torch.exp(s - s.amax(dim=-1, keepdim=True))
        w = nk * e / e.sum(dim=-1, keepdim=True)
    else:
        w = key_weight
    # a[j], t[j]: (B, H, Nq, 1) numerator and normaliser kernels of key j, weight included
    a = [(qr * kr[:, :, j : j + 1]).sum(-1, keepdim=True) * w[:, :, j, None, None] for j in range(nk)]
    t = [(qn * kn[:, :, j : j + 1]).sum(-1, keepdim=True) * w[:, :, j, None, None] for j in range(nk)]
    vj = [v[:, :, j : j + 1] for j in range(nk)]
    if normalize is None:
        return sum(a[j] * vj[j] for j in range(nk))
    den = sum(t) / nk
    if normalize == "divisive":
        return sum(a[j] / nk * vj[j] for j in range(nk)) / (den + eps)
    z = scale * den
    return sum(((1 + 1 / (z + eps)) * scale * a[j] / nk - z / nk) * vj[j] for j in range(nk))


def rope_tables(n, d, dtype=torch.float64):
    angle = 1.0 / 10000 ** torch.linspace(0, 1, d // 2, dtype=dtype)
    angle = angle.repeat_interleave(2)
    pos = torch.arange(n, dtype=dtype)[:, None] * angle
    return torch.cos(pos), torch.sin(pos)


def make_inputs(gen, b=2, h=2, nq=13, nk=11, d=8, dv=6, *, decoupled=False, weight=False, dtype=torch.float64):
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()
    inputs = {"q": make(b, h, nq, d), "k": make(b, h, nk, d), "v": make(b, h, nk, dv)}
    if decoupled:
        inputs["q_norm"], inputs["k_norm"] = make(b, h, nq, d), make(b, h, nk, d)
    if weight:
        inputs["key_weight"] = (torch.rand(b, h, nk, generator=gen, dtype=dtype) + 0.5).requires_grad_()
    return inputs


VARIANTS = [
    *[
        dict(feature_map=f, normalize=n)
        for f in ("elu1", "relu", "identity", "softmax")
        for n in ("divisive", "additive", None)
    ],
    dict(feature_map="elu1", normalize="divisive", weight=True),
    dict(feature_map="elu1", normalize="additive", weight=True),
    dict(feature_map="relu", normalize=None, weight=True),
    dict(feature_map="elu1", normalize="divisive", key_weight="rala"),
    dict(feature_map="softmax", normalize="additive", key_weight="rala"),
    dict(feature_map="elu1", normalize=None, key_weight="rala"),
    dict(feature_map="elu1", normalize="divisive", rope=True),
    dict(feature_map="elu1", normalize="additive", rope=True),
    dict(feature_map="elu1", normalize="additive", rope=True, decoupled=True),
    dict(feature_map="elu1", normalize="divisive", rope=True, decoupled=True, key_weight="rala"),
    dict(feature_map="relu", normalize="divisive", decoupled=True, weight=True),
]


def _variant_id(p):
    return "-".join(f"{k}={v}" for k, v in p.items())


def _build(gen, variant, **shape):
    variant = dict(variant)
    rope = variant.pop("rope", False)
    decoupled = variant.pop("decoupled", False)
    weight = variant.pop("weight", False)
    if rope:
        shape["nk"] = shape.get("nq", 13)
    inputs = make_inputs(gen, decoupled=decoupled, weight=weight, **shape)
    if rope:
        variant["rope"] = rope_tables(inputs["q"].shape[2], inputs["q"].shape[3])
    return inputs, variant


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_linear_attention_reference_matches_brute_force(rng, variant):
    inputs, kwargs = _build(rng, variant)
    ref = brute_force(**inputs, **kwargs)
    out = linear_attention_reference(**inputs, **kwargs)
    assert_close("out", ref, out)
    grad = torch.randn(ref.shape, generator=rng, dtype=ref.dtype)
    names = list(inputs)
    g_ref = torch.autograd.grad(ref, [inputs[n] for n in names], grad)
    g_out = torch.autograd.grad(out, [inputs[n] for n in names], grad)
    for name, a, b in zip(names, g_ref, g_out):
        assert_close(f"d{name}", a, b)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.get("rope")][-2:], ids=_variant_id)
def test_linear_attention_reference_takes_pair_rope_tables(rng, variant):
    """(N, D/2) tables, one angle per channel pair, rotate like the equal-pair (N, D) tables."""
    inputs, kwargs = _build(rng, variant)
    ref = brute_force(**inputs, **kwargs)
    kwargs["rope"] = tuple(t[:, ::2] for t in kwargs["rope"])
    assert_close("out", ref, linear_attention_reference(**inputs, **kwargs))


@pytest.mark.parametrize("variant", VARIANTS[12:], ids=_variant_id)
def test_linear_attention_dispatches_to_reference(rng, variant):
    inputs, kwargs = _build(rng, variant)
    out = linear_attention(**inputs, **kwargs, backend="reference")
    assert_close("out", linear_attention_reference(**inputs, **kwargs), out)


def test_linear_attention_scale_none_is_inverse_sqrt_head_dim(rng):
    inputs, _ = _build(rng, {})
    a = linear_attention(**inputs, normalize="additive", key_weight="rala")
    b = linear_attention(**inputs, normalize="additive", key_weight="rala", scale=inputs["q"].shape[-1] ** -0.5)
    assert torch.equal(a, b)


def test_linear_attention_half_reference_stays_finite_at_large_magnitude(rng):
    # MALA's output itself grows like magnitude**3 (z·v̄ with z ∝ |q||k|), so it gets a smaller magnitude.
    for normalize, magnitude in (("divisive", 300), ("additive", 20)):
        q, k, v = (magnitude * torch.randn(3, 1, 2, 64, 16, generator=rng)).half().unbind(0)
        out = linear_attention(q, k, v, normalize=normalize, backend="reference")
        ref = linear_attention_reference(q.double(), k.double(), v.double(), normalize=normalize)
        assert_close(f"out-{normalize}", ref, out)


@pytest.mark.parametrize("key_weight", [None, "rala"])
def test_merged_shard_states_equal_the_full_state(rng, key_weight):
    inputs, kwargs = _build(rng, dict(feature_map="elu1", normalize="additive", decoupled=True, key_weight=key_weight))
    q, k, v, qn, kn = (inputs[n] for n in ("q", "k", "v", "q_norm", "k_norm"))
    qm = linear_attention_query_mean(qn) if key_weight else None
    shards = [
        linear_attention_state(k[:, :, s], v[:, :, s], k_norm=kn[:, :, s], key_weight=key_weight, query_mean=qm)
        for s in (slice(0, 4), slice(4, 11))
    ]
    state = merge_linear_attention_states(shards)
    assert state.length == 11
    out = linear_attention_apply(q, state, normalize="additive", q_norm=qn)
    assert_close("out", linear_attention_reference(**inputs, **kwargs), out)


def test_linear_attention_rejects_bad_arguments(rng):
    q, k, v = (t.detach() for t in make_inputs(rng).values())
    cases = [
        (ValueError, "feature_map", dict(feature_map="exp")),
        (ValueError, "normalize", dict(normalize="softmax")),
        (ValueError, "key_weight", dict(key_weight="alpha")),
        (ValueError, "key_weight", dict(key_weight=torch.ones(2, 2, 5, dtype=q.dtype))),
        (ValueError, "q_norm", dict(q_norm=torch.randn(2, 2, 3, 8, dtype=q.dtype))),
        (ValueError, "k_norm", dict(k_norm=k.float())),
        (ValueError, "rope", dict(rope=rope_tables(13, 8))),
        (ValueError, "scale", dict(scale=-1.0)),
        (ValueError, "eps", dict(eps=-1.0)),
        (ValueError, "backend", dict(backend="cuda")),
        (TypeError, "q", dict(q=q.numpy())),
    ]
    for exc, match, kwargs in cases:
        args = {"q": q, "k": k, "v": v} | kwargs
        with pytest.raises(exc, match=match):
            linear_attention(**args)
    q2, k2, v2 = (t.detach() for t in make_inputs(rng, nk=13).values())
    with pytest.raises(TypeError, match="rope"):
        linear_attention(q2, k2, v2, rope=torch.ones(13, 8))
    with pytest.raises(ValueError, match="rope"):
        linear_attention(q2, k2, v2, rope=rope_tables(13, 6))
    with pytest.raises(ValueError, match="rope"):  # (N, D) cos with (N, D/2) sin
        linear_attention(q2, k2, v2, rope=(rope_tables(13, 8)[0], rope_tables(13, 8)[1][:, ::2]))
    with pytest.raises(ValueError, match="query_mean"):
        linear_attention_state(k, v, key_weight="rala")
    with pytest.raises(ValueError, match="query_mean"):
        linear_attention_state(k, v, key_weight="rala", query_mean=torch.zeros(2, 2, 3, dtype=k.dtype))
    with pytest.raises(ValueError, match="v must"):
        linear_attention_state(k, v[:, :, :3])
    with pytest.raises(TypeError, match="state"):
        linear_attention_apply(q, (1, 2))
    with pytest.raises(ValueError, match="state"):
        linear_attention_apply(q[..., :4], linear_attention_state(k, v))
    with pytest.raises(TypeError, match="states"):
        merge_linear_attention_states([])


def test_linear_attention_state_passes_reject_bad_arguments(rng):
    q, k, v = (t.detach() for t in make_inputs(rng).values())
    qm = linear_attention_query_mean(q)
    for key_weight in (None, torch.ones(k.shape[:3], dtype=k.dtype)):  # query_mean is only read by "rala"
        with pytest.raises(ValueError, match="query_mean"):
            linear_attention_state(k, v, key_weight=key_weight, query_mean=qm)
    with pytest.raises(ValueError, match="query_mean"):
        linear_attention_state(k, v, key_weight="rala", query_mean=qm.to("meta"))
    state = linear_attention_state(k, v)
    with pytest.raises(ValueError, match="state"):
        linear_attention_apply(q, LinearAttentionState(*(t.to("meta") for t in state[:4]), state.length))
    with pytest.raises(TypeError, match="state"):
        linear_attention_apply(q, linear_attention_state(k.float(), v.float()))
    for other in (linear_attention_state(k[:1], v[:1]), linear_attention_state(k.float(), v.float())):
        with pytest.raises(ValueError, match="states"):
            merge_linear_attention_states([state, other])
