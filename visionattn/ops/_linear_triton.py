"""The Triton backend of ``linear_attention``: three ``torch.library`` custom ops with fake impls and autograd.

``visionattn::linear_query_mean`` (RALA's ``q̄``), ``visionattn::linear_state`` (keys and values to ``S̄, z̄, v̄, lse``)
and ``visionattn::linear_apply`` (queries through the state) compose to the full op, so autograd, ``torch.compile``
(``fullgraph=True``) and ``FlopCounterMode`` see each pass, and a sequence-parallel all-reduce can sit between the
state and the apply. ``linear_attention(key_weight="rala")`` runs the same three passes as one node,
``visionattn::linear_attention_rala``, whose backward adds the query mean's gradient into ``dq`` in place. Without
a gradient, ``linear_attention`` is one node, ``visionattn::linear_attention_infer``: nothing to save, so the state
stays unmerged chunk partials that the apply kernel merges itself when they are few (one launch fewer). ``lse`` only serves merging and carries no gradient; RoPE tables are constants (no gradient).
Kernels are imported lazily so that importing ``visionattn`` never needs Triton.
"""

import torch
from torch.utils.flop_counter import register_flop_formula

from ._eager import custom_op

__all__ = []

_Opt = torch.Tensor | None


def _or_none(t: torch.Tensor) -> _Opt:
    """Custom ops return tensors, never None: an absent optional gradient travels as an empty 1-D tensor."""
    return None if t.numel() == 0 and t.ndim == 1 else t


def rope_operands(rope, like: torch.Tensor):
    """RoPE tables in the 16-bit input dtype (every (batch, head) re-reads them); ``(N, D/2)`` tables interleaved
    into one ``(N, D)`` table ``(cos θ_0, sin θ_0, cos θ_1, …)``, returned as ``(table, None)``: half the bytes of
    two full tables. Prepared tables (``sin`` None, or already in the dtype) are returned as they are."""
    if rope is None or rope[1] is None:
        return (None, None) if rope is None else tuple(rope)
    dtype = like.dtype if like.dtype in (torch.float16, torch.bfloat16) else torch.float32
    if rope[0].shape[-1] != like.shape[-1]:
        return torch.stack(tuple(rope), dim=-1).flatten(-2).to(dtype), None
    return tuple(t.to(dtype) for t in rope)


# ------------------------------------------------------------------------------------------------ query mean
@custom_op("visionattn::linear_query_mean")
def query_mean_op(q: torch.Tensor, feature_map: str) -> torch.Tensor:
    from ..kernels.linear_query_mean import linear_query_mean_fwd

    return linear_query_mean_fwd(q, feature_map)


@query_mean_op.register_fake
def _(q, feature_map):
    return q.new_empty(q.shape[0], q.shape[1], q.shape[3], dtype=torch.float32)


@custom_op("visionattn::linear_query_mean_bwd")
def _query_mean_bwd_op(q: torch.Tensor, d_mean: torch.Tensor, feature_map: str) -> torch.Tensor:
    from ..kernels.linear_bwd import linear_query_mean_bwd

    return linear_query_mean_bwd(q, d_mean, feature_map)


@_query_mean_bwd_op.register_fake
def _(q, d_mean, feature_map):
    return torch.empty_like(q)


def _query_mean_setup(ctx, inputs, output):
    q, ctx.feature_map = inputs
    ctx.save_for_backward(q)


def _query_mean_backward(ctx, d_mean):
    (q,) = ctx.saved_tensors
    # slots: q, feature_map
    return _query_mean_bwd_op(q, d_mean, ctx.feature_map), None


query_mean_op.register_autograd(_query_mean_backward, setup_context=_query_mean_setup)


# ------------------------------------------------------------------------------------------------ state
@custom_op("visionattn::linear_state")
def state_op(
    k: torch.Tensor,
    v: torch.Tensor,
    k_norm: _Opt,
    key_weight: _Opt,
    query_mean: _Opt,
    cos: _Opt,
    sin: _Opt,
    feature_map: str,
    scale: float,
    with_v_mean: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.linear import linear_state_fwd

    return linear_state_fwd(k, v, k_norm, key_weight, query_mean, cos, sin, feature_map, scale, with_v_mean)


@state_op.register_fake
def _(k, v, k_norm, key_weight, query_mean, cos, sin, feature_map, scale, with_v_mean):
    return _empty_state(k, v.shape[-1])


def _empty_state(like: torch.Tensor, dv: int) -> tuple[torch.Tensor, ...]:
    """Fake fp32 ``(S̄ (B,H,D,Dv), z̄ (B,H,D), v̄ (B,H,Dv), lse (B,H))`` for ``like`` ``(B, H, N, D)``."""
    b, h, _, d = like.shape
    f32 = dict(dtype=torch.float32)
    return (
        like.new_empty(b, h, d, dv, **f32),
        like.new_empty(b, h, d, **f32),
        like.new_empty(b, h, dv, **f32),
        like.new_empty(b, h, **f32),
    )


@custom_op("visionattn::linear_state_bwd")
def _state_bwd_op(
    k: torch.Tensor,
    v: torch.Tensor,
    k_norm: _Opt,
    key_weight: _Opt,
    query_mean: _Opt,
    cos: _Opt,
    sin: _Opt,
    kv: torch.Tensor,
    k_sum: torch.Tensor,
    lse: torch.Tensor,
    d_kv: torch.Tensor,
    d_k_sum: torch.Tensor,
    d_v_mean: torch.Tensor,
    feature_map: str,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.linear_bwd import linear_state_bwd

    grads = linear_state_bwd(
        k, v, k_norm, key_weight, query_mean, cos, sin, kv, k_sum, lse, d_kv, d_k_sum, d_v_mean, feature_map, scale
    )
    return tuple(k.new_empty(0) if g is None else g for g in grads)


@_state_bwd_op.register_fake
def _(k, v, k_norm, key_weight, query_mean, cos, sin, kv, k_sum, lse, d_kv, d_k_sum, d_v_mean, feature_map, scale):
    maybe = lambda t, like: torch.empty_like(like) if t is not None else k.new_empty(0)
    dqm = query_mean.new_empty(query_mean.shape, dtype=torch.float32) if query_mean is not None else k.new_empty(0)
    return torch.empty_like(k), torch.empty_like(v), maybe(k_norm, k_norm), maybe(key_weight, key_weight), dqm


def _state_setup(ctx, inputs, output):
    k, v, k_norm, key_weight, query_mean, cos, sin, ctx.feature_map, ctx.scale, _ = inputs
    kv, k_sum, _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(k, v, k_norm, key_weight, query_mean, cos, sin, kv, k_sum, lse)


def _state_backward(ctx, d_kv, d_k_sum, d_v_mean, _d_lse):
    k, v, k_norm, key_weight, query_mean, cos, sin, kv, k_sum, lse = ctx.saved_tensors
    b, h, _, dv = v.shape
    dk, dv, dkn, dw, dqm = _state_bwd_op(
        k,
        v,
        k_norm,
        key_weight,
        query_mean,
        cos,
        sin,
        kv,
        k_sum,
        lse,
        torch.zeros_like(kv) if d_kv is None else d_kv,
        torch.zeros_like(k_sum) if d_k_sum is None else d_k_sum,
        kv.new_zeros(b, h, dv) if d_v_mean is None else d_v_mean,
        ctx.feature_map,
        ctx.scale,
    )
    # slots: k, v, k_norm, key_weight, query_mean, cos, sin, feature_map, scale, with_v_mean
    return dk, dv, _or_none(dkn), _or_none(dw), _or_none(dqm), None, None, None, None, None


state_op.register_autograd(_state_backward, setup_context=_state_setup)


# ------------------------------------------------------------------------------------------------ apply
@custom_op("visionattn::linear_apply")
def apply_op(
    q: torch.Tensor,
    q_norm: _Opt,
    cos: _Opt,
    sin: _Opt,
    kv: torch.Tensor,
    k_sum: torch.Tensor,
    v_mean: torch.Tensor,
    feature_map: str,
    normalize: str | None,
    scale: float,
    eps: float,
    length: int,
) -> torch.Tensor:
    from ..kernels.linear import linear_apply_fwd

    return linear_apply_fwd(
        q, q_norm, cos, sin, *(t.float().contiguous() for t in (kv, k_sum, v_mean)), feature_map, normalize, scale,
        eps, length,
    )  # fmt: skip


@apply_op.register_fake
def _(q, q_norm, cos, sin, kv, k_sum, v_mean, feature_map, normalize, scale, eps, length):
    from ..kernels.block_sparse import empty_like_layout

    return empty_like_layout(q, kv.shape[-1])


@custom_op("visionattn::linear_apply_bwd")
def _apply_bwd_op(
    q: torch.Tensor,
    q_norm: _Opt,
    cos: _Opt,
    sin: _Opt,
    kv: torch.Tensor,
    k_sum: torch.Tensor,
    v_mean: torch.Tensor,
    do: torch.Tensor,
    feature_map: str,
    normalize: str | None,
    scale: float,
    eps: float,
    length: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.linear_bwd import linear_apply_bwd

    dq, dqn, dkv, dks, dvm = linear_apply_bwd(
        q, q_norm, cos, sin, kv, k_sum, v_mean, do, feature_map, normalize, scale, eps, length
    )
    return dq, q.new_empty(0) if dqn is None else dqn, dkv, dks, dvm


@_apply_bwd_op.register_fake
def _(q, q_norm, cos, sin, kv, k_sum, v_mean, do, feature_map, normalize, scale, eps, length):
    dqn = torch.empty_like(q_norm) if q_norm is not None else q.new_empty(0)
    return torch.empty_like(q), dqn, torch.empty_like(kv), torch.empty_like(k_sum), torch.empty_like(v_mean)


def _apply_setup(ctx, inputs, output):
    q, q_norm, cos, sin, kv, k_sum, v_mean, *consts = inputs
    ctx.consts = consts
    ctx.save_for_backward(q, q_norm, cos, sin, kv, k_sum, v_mean)


def _apply_backward(ctx, do):
    dq, dqn, dkv, dks, dvm = _apply_bwd_op(*ctx.saved_tensors, do, *ctx.consts)
    # slots: q, q_norm, cos, sin, kv, k_sum, v_mean, feature_map, normalize, scale, eps, length
    return dq, _or_none(dqn), None, None, dkv, dks, dvm, None, None, None, None, None


apply_op.register_autograd(_apply_backward, setup_context=_apply_setup)


# ------------------------------------------------------------------------------------------------ RALA, one node
@custom_op("visionattn::linear_attention_rala")
def rala_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_norm: _Opt,
    k_norm: _Opt,
    cos: _Opt,
    sin: _Opt,
    feature_map: str,
    normalize: str | None,
    scale: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``linear_attention(key_weight="rala")`` as one autograd node: ``(o, q̄, S̄, z̄, v̄, lse)``, all but ``o``
    saved for the backward only.

    The three passes are the kernels of the ops above. Being one node lets the backward add the query mean's
    gradient into the apply's ``dq`` in place (one read and write of dq) rather than writing a second gradient of
    q's size that autograd then sums with the first (two more reads and a write)."""
    from ..kernels.linear import linear_apply_fwd, linear_state_fwd
    from ..kernels.linear_query_mean import linear_query_mean_fwd

    q_mean = linear_query_mean_fwd(q if q_norm is None else q_norm, feature_map)
    kv, k_sum, v_mean, lse = linear_state_fwd(
        k, v, k_norm, None, q_mean, cos, sin, feature_map, scale, normalize == "additive"
    )
    o = linear_apply_fwd(q, q_norm, cos, sin, kv, k_sum, v_mean, feature_map, normalize, scale, eps, k.shape[2])
    return o, q_mean, kv, k_sum, v_mean, lse


@rala_op.register_fake
def _(q, k, v, q_norm, k_norm, cos, sin, feature_map, normalize, scale, eps):
    from ..kernels.block_sparse import empty_like_layout

    (b, h, _, d), dv = q.shape, v.shape[-1]
    return empty_like_layout(q, dv), q.new_empty(b, h, d, dtype=torch.float32), *_empty_state(q, dv)


@custom_op("visionattn::linear_attention_rala_bwd")
def _rala_bwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_norm: _Opt,
    k_norm: _Opt,
    cos: _Opt,
    sin: _Opt,
    q_mean: torch.Tensor,
    kv: torch.Tensor,
    k_sum: torch.Tensor,
    v_mean: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    feature_map: str,
    normalize: str | None,
    scale: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.linear_bwd import linear_apply_bwd, linear_query_mean_bwd, linear_state_bwd

    n = k.shape[2]
    dq, dqn, d_kv, d_k_sum, d_v_mean = linear_apply_bwd(
        q, q_norm, cos, sin, kv, k_sum, v_mean, do, feature_map, normalize, scale, eps, n
    )
    dk, dv, dkn, _, d_q_mean = linear_state_bwd(
        k, v, k_norm, None, q_mean, cos, sin, kv, k_sum, lse, d_kv, d_k_sum, d_v_mean, feature_map, scale
    )
    # q̄ is the mean of φ(q̃): its gradient joins the normaliser queries' gradient, in place
    linear_query_mean_bwd(q if q_norm is None else q_norm, d_q_mean, feature_map, dq if dqn is None else dqn)
    return dq, dk, dv, q.new_empty(0) if dqn is None else dqn, q.new_empty(0) if dkn is None else dkn


@_rala_bwd_op.register_fake
def _(q, k, v, q_norm, k_norm, cos, sin, q_mean, kv, k_sum, v_mean, lse, do, feature_map, normalize, scale, eps):
    maybe = lambda t: torch.empty_like(t) if t is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), maybe(q_norm), maybe(k_norm)


def _rala_setup(ctx, inputs, output):
    q, k, v, q_norm, k_norm, cos, sin, *ctx.consts = inputs
    _, *saved = output
    ctx.mark_non_differentiable(*saved)
    ctx.save_for_backward(q, k, v, q_norm, k_norm, cos, sin, *saved)


def _rala_backward(ctx, do, *_):
    dq, dk, dv, dqn, dkn = _rala_bwd_op(*ctx.saved_tensors, do, *ctx.consts)
    # slots: q, k, v, q_norm, k_norm, cos, sin, feature_map, normalize, scale, eps
    return dq, dk, dv, _or_none(dqn), _or_none(dkn), None, None, None, None, None, None


rala_op.register_autograd(_rala_backward, setup_context=_rala_setup)


# ------------------------------------------------------------------------------------------------ inference
@custom_op("visionattn::linear_attention_infer")
def infer_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_norm: _Opt,
    k_norm: _Opt,
    key_weight: _Opt,
    cos: _Opt,
    sin: _Opt,
    feature_map: str,
    normalize: str | None,
    rala: bool,
    scale: float,
    eps: float,
) -> torch.Tensor:
    """``linear_attention`` without autograd (``rala``: ``key_weight="rala"``, else the ``key_weight`` tensor or
    None): the state pass's chunk partials go to the apply kernel unmerged (``linear_apply_fwd(partials=...)``)."""
    from ..kernels.linear import linear_apply_fwd, linear_state_fwd
    from ..kernels.linear_query_mean import linear_query_mean_fwd

    # RALA: q̄'s chunk partials, summed by the state pass (q̄ itself is not needed here)
    q_mean = linear_query_mean_fwd(q if q_norm is None else q_norm, feature_map, reduce=False) if rala else None
    kv, ks, vs, ml = linear_state_fwd(
        k, v, k_norm, key_weight, q_mean, cos, sin, feature_map, scale, normalize == "additive", merge=False
    )
    n = k.shape[2]
    return linear_apply_fwd(q, q_norm, cos, sin, kv, ks, vs, feature_map, normalize, scale, eps, n, (ml, rala))


@infer_op.register_fake
def _(q, k, v, *args):
    from ..kernels.block_sparse import empty_like_layout

    return empty_like_layout(q, v.shape[-1])


def infer(q, k, v, *, feature_map, normalize, q_norm, k_norm, key_weight, rope, scale, eps) -> torch.Tensor:
    """``linear_attention``'s Triton entry for inputs that need no gradient (its keyword arguments): ``infer_op``."""
    weight = key_weight if isinstance(key_weight, torch.Tensor) else None
    consts = feature_map, normalize, isinstance(key_weight, str), scale, eps
    return infer_op(q, k, v, q_norm, k_norm, weight, *rope_operands(rope, q), *consts)


# ------------------------------------------------------------------------------------------------ FLOP counts
def _state_flops(k_shape, v_shape):
    b, h, n, d = k_shape
    return 2 * b * h * n * d * v_shape[-1]


@register_flop_formula(torch.ops.visionattn.linear_state)
def _(k_shape, v_shape, *args, **kwargs) -> int:
    return _state_flops(k_shape, v_shape)


@register_flop_formula(torch.ops.visionattn.linear_state_bwd)
def _(k_shape, v_shape, *args, **kwargs) -> int:
    return 2 * _state_flops(k_shape, v_shape)


@register_flop_formula(torch.ops.visionattn.linear_apply)
def _(q_shape, q_norm_shape, cos_shape, sin_shape, kv_shape, *args, **kwargs) -> int:
    return 2 * q_shape[0] * q_shape[1] * q_shape[2] * kv_shape[-2] * kv_shape[-1]


@register_flop_formula(torch.ops.visionattn.linear_apply_bwd)
def _(q_shape, q_norm_shape, cos_shape, sin_shape, kv_shape, *args, **kwargs) -> int:
    return 4 * q_shape[0] * q_shape[1] * q_shape[2] * kv_shape[-2] * kv_shape[-1]


def _rala_flops(q_shape, k_shape, v_shape):
    """State plus apply: ``2·B·H·(Nk + Nq)·D·Dv``."""
    return _state_flops(k_shape, v_shape) + _state_flops(q_shape, v_shape)


@register_flop_formula(torch.ops.visionattn.linear_attention_rala)
def _(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    return _rala_flops(q_shape, k_shape, v_shape)


@register_flop_formula(torch.ops.visionattn.linear_attention_infer)
def _(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    return _rala_flops(q_shape, k_shape, v_shape)


@register_flop_formula(torch.ops.visionattn.linear_attention_rala_bwd)
def _(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    return 2 * _rala_flops(q_shape, k_shape, v_shape)
