"""Non-causal linear attention: feature maps, divisive or additive (MALA) normalisation, key weights (RALA), RoPE.

Shape legend: B batch, H heads, Nq query tokens, Nk key tokens, D head dim of q and k, Dv head dim of v.

One function covers the linear-attention family used by the vision and diffusion models of this package:

- RALA (Fan et al., CVPR 2025, arXiv 2411.07635) and LinFusion (Liu et al., arXiv 2409.02097): divisive
  normalisation ``φ(q)S / (φ(q̃)z + eps)``; RALA re-weights keys by ``α_j·Nk``, ``α = softmax_j(d^-1/2·q̄·φ(k̃_j))``.
- MALA (Fan et al., ICCV 2025, arXiv 2507.00698): additive normalisation ``β_i·φ(q_i)S − γ_i`` with
  ``β_i = 1 + 1/z_i`` and ``γ_i = z_i·mean(v)``.
- The "decoupled" form of both: numerator from RoPE-rotated features, normaliser and weights from un-rotated ones.

The computation is two passes with one global reduction between them: :func:`linear_attention_state` reduces the
keys and values to a ``D x Dv`` state, :func:`linear_attention_apply` maps every query through it. Under sequence
parallelism each rank reduces its own keys, the states are combined across ranks with the rule of
:func:`merge_linear_attention_states` (an all-reduce), and each rank applies the merged state to its own queries.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import _linear_triton
from ._checks import _check_attention_inputs, _check_choice, _check_scale, _check_tensor
from ._linear_triton import rope_operands as _rope_operands
from ._registry import _BackendRegistry, _requires_dtype, _requires_head_dim_range, _requires_triton_device

__all__ = [
    "LinearAttentionState",
    "linear_attention",
    "linear_attention_apply",
    "linear_attention_query_mean",
    "linear_attention_reference",
    "linear_attention_state",
    "merge_linear_attention_states",
]

FEATURE_MAPS = ("elu1", "relu", "identity", "softmax")
NORMALIZATIONS = ("divisive", "additive", None)
#: Head dims the Triton kernels are built for (the tile is the next power of two, masked).
_TRITON_HEAD_DIMS = (16, 128)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class LinearAttentionState(NamedTuple):
    """Mean-normalised key/value state of linear attention (all fp32).

    Attributes:
        kv: ``(B, H, D, Dv)``, ``S̄ = (1/Nk) Σ_j w_j φ(k_j) v_jᵀ`` with rotated ``φ(k_j)`` when RoPE is used.
        k_sum: ``(B, H, D)``, ``z̄ = (1/Nk) Σ_j w_j φ(k̃_j)`` (un-rotated normaliser features).
        v_mean: ``(B, H, Dv)``, ``(1/Nk) Σ_j v_j`` (unweighted: MALA's ``γ`` term).
        lse: ``(B, H)``, the log of the weight mass the state is normalised by: ``log Nk``, or for
            ``key_weight="rala"`` the log-sum-exp of the scores. Used only to merge states.
        length: ``Nk``.
    """

    kv: torch.Tensor
    k_sum: torch.Tensor
    v_mean: torch.Tensor
    lse: torch.Tensor
    length: int


# ----------------------------------------------------------------------------------------------------------------
# Argument parsing
# ----------------------------------------------------------------------------------------------------------------


def _check_same_as(name: str, t, like: torch.Tensor, like_name: str) -> None:
    _check_tensor(name, t, ndim=like.ndim)
    if t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
        raise ValueError(
            f"{name} must match {like_name} in shape, dtype and device; got {name}.shape={tuple(t.shape)}, "
            f"{name}.dtype={t.dtype}, {name}.device={t.device} vs {like_name}.shape={tuple(like.shape)}, "
            f"{like_name}.dtype={like.dtype}, {like_name}.device={like.device}."
        )


def _check_key_weight(key_weight, k: torch.Tensor):
    if key_weight is None or (isinstance(key_weight, str) and key_weight == "rala"):
        return key_weight
    if isinstance(key_weight, str):
        raise ValueError(f"key_weight must be None, 'rala' or a (B, H, Nk) tensor; got {key_weight=}.")
    _check_tensor("key_weight", key_weight, ndim=3)
    if key_weight.shape != k.shape[:3] or key_weight.device != k.device:
        raise ValueError(
            f"key_weight must have shape (B, H, Nk)={tuple(k.shape[:3])} on {k.device}; "
            f"got key_weight.shape={tuple(key_weight.shape)} on {key_weight.device}."
        )
    return key_weight


def _check_rope(rope, rows: int, head_dim: int, device: torch.device, name: str = "rope"):
    """``rope`` is None or ``(cos, sin)``, each ``(rows, head_dim)`` or ``(rows, head_dim // 2)`` (one angle per
    channel pair), with an even head dim."""
    if rope is None:
        return None
    if not isinstance(rope, (tuple, list)) or len(rope) != 2:
        raise TypeError(f"{name} must be None or a pair (cos, sin) of (N, D) tensors; got {type(rope)=}.")
    for part, t in zip(("cos", "sin"), rope):
        _check_tensor(f"{name}[{part}]", t, ndim=2)
        if t.shape not in ((rows, head_dim), (rows, head_dim // 2)) or t.shape != rope[0].shape or t.device != device:
            raise ValueError(
                f"{name} tables must both have shape (N, D)={(rows, head_dim)} or (N, D/2) on {device}; "
                f"got {name}[{part}].shape={tuple(t.shape)} on {t.device}."
            )
    if head_dim % 2:
        raise ValueError(f"{name} rotates pairs of channels, so D must be even; got D={head_dim}.")
    return tuple(rope)


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 <= eps < math.inf):
        raise ValueError(f"eps must be a finite float >= 0; got {eps=}.")
    return float(eps)


# ----------------------------------------------------------------------------------------------------------------
# Reference (plain PyTorch, any float dtype; the oracle of every test)
# ----------------------------------------------------------------------------------------------------------------


def _feature_map(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "elu1":
        return F.elu(x) + 1
    if name == "relu":
        return F.relu(x)
    if name == "softmax":
        return x.softmax(dim=-1)
    return x


def _rotate(x: torch.Tensor, rope) -> torch.Tensor:
    """MALA/RALA's ``theta_shift``: ``x·cos + rotate_every_two(x)·sin``, pairs ``(x0, x1) -> (-x1, x0)``."""
    if rope is None:
        return x
    cos, sin = (t.to(x.dtype) if t.shape[-1] == x.shape[-1] else t.to(x.dtype).repeat_interleave(2, -1) for t in rope)
    swapped = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    return x * cos + swapped * sin


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half inputs are evaluated in fp32 so the normaliser cannot overflow."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _query_mean_reference(q: torch.Tensor, feature_map: str) -> torch.Tensor:
    return _feature_map(q.to(_compute_dtype(q.dtype)), feature_map).mean(dim=-2)


def _state_reference(
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str,
    k_norm: torch.Tensor | None,
    key_weight: torch.Tensor | str | None,
    query_mean: torch.Tensor | None,
    rope,
    scale: float,
    v_mean: bool = True,
) -> LinearAttentionState:
    # ``v_mean=False`` lets a backend skip v̄ (only MALA's additive form reads it); this one always computes it
    dtype = _compute_dtype(k.dtype)
    k, v = k.to(dtype), v.to(dtype)
    nk = k.shape[-2]
    fk = _feature_map(k, feature_map)
    fk_norm = fk if k_norm is None else _feature_map(k_norm.to(dtype), feature_map)
    lse = torch.full(k.shape[:2], math.log(nk), dtype=dtype, device=k.device)
    if key_weight is None:
        w = torch.ones_like(k[..., 0])
    elif isinstance(key_weight, str):
        scores = scale * torch.einsum("bhd,bhjd->bhj", query_mean.to(dtype), fk_norm)
        lse = scores.logsumexp(dim=-1)
        w = torch.exp(scores - lse.unsqueeze(-1)) * nk
    else:
        w = key_weight.to(dtype)
    fk = _rotate(fk, rope)
    kv = torch.einsum("bhj,bhjd,bhje->bhde", w, fk, v) / nk
    k_sum = torch.einsum("bhj,bhjd->bhd", w, fk_norm) / nk
    return LinearAttentionState(kv, k_sum, v.mean(dim=-2), lse, nk)


def _apply_reference(
    q: torch.Tensor,
    state: LinearAttentionState,
    *,
    feature_map: str,
    normalize: str | None,
    q_norm: torch.Tensor | None,
    rope,
    scale: float,
    eps: float,
) -> torch.Tensor:
    dtype = state.kv.dtype
    fq = _feature_map(q.to(dtype), feature_map)
    fq_norm = fq if q_norm is None else _feature_map(q_norm.to(dtype), feature_map)
    num = _rotate(fq, rope) @ state.kv
    t = torch.einsum("bhid,bhd->bhi", fq_norm, state.k_sum).unsqueeze(-1)
    if normalize == "divisive":
        out = num / (t + eps)
    elif normalize == "additive":
        z = scale * t
        out = scale * num * (1 + 1 / (z + eps)) - z * state.v_mean.unsqueeze(-2)
    else:
        out = num * state.length
    return out.to(q.dtype)


def linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str = "elu1",
    normalize: str | None = "divisive",
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    key_weight: torch.Tensor | str | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """:func:`linear_attention` in plain PyTorch einsums, straight from its equations (no validation).

    Runs in the input dtype (fp32 for fp16/bf16 inputs); tests call it in float64.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    rala = isinstance(key_weight, str)
    query_mean = _query_mean_reference(q if q_norm is None else q_norm, feature_map) if rala else None
    state = _state_reference(
        k,
        v,
        feature_map=feature_map,
        k_norm=k_norm,
        key_weight=key_weight,
        query_mean=query_mean,
        rope=rope,
        scale=scale,
    )
    return _apply_reference(
        q, state, feature_map=feature_map, normalize=normalize, q_norm=q_norm, rope=rope, scale=scale, eps=eps
    )


def merge_linear_attention_states(states) -> LinearAttentionState:
    """Combine states of disjoint key shards into the state of all keys (exactly; the sequence-parallel all-reduce).

    With ``L = logsumexp_r lse_r``: ``S̄ = Σ_r exp(lse_r − L)·S̄_r``, ``z̄`` likewise, ``v̄ = Σ_r (N_r/N)·v̄_r``,
    ``lse = L``. Across ranks this is an all-reduce(max) of ``lse``, then an all-reduce(sum) of the rescaled
    ``S̄``, ``z̄`` and of ``N_r·v̄_r``. RALA shards must be reduced with the same global ``query_mean``.
    ``lse`` carries no gradient, so backward through a merge of ``key_weight="rala"`` states is not exact.

    Args:
        states: a sequence of :class:`LinearAttentionState` of the same ``(B, H, D, Dv)``, dtype and device.

    Returns:
        The merged :class:`LinearAttentionState`.
    """
    states = list(states)
    if not states or not all(isinstance(s, LinearAttentionState) for s in states):
        raise TypeError(f"states must be a non-empty sequence of LinearAttentionState; got {type(states)=}.")
    first = states[0].kv
    for i, s in enumerate(states[1:], start=1):
        if s.kv.shape != first.shape or s.kv.dtype != first.dtype or s.kv.device != first.device:
            raise ValueError(
                "states must share (B, H, D, Dv), dtype and device (shards of the same keys); got "
                f"states[0].kv: {tuple(first.shape)}, {first.dtype}, {first.device} and "
                f"states[{i}].kv: {tuple(s.kv.shape)}, {s.kv.dtype}, {s.kv.device}."
            )
    lse = torch.stack([s.lse for s in states]).logsumexp(dim=0)
    length = sum(s.length for s in states)
    coef = [torch.exp(s.lse - lse) for s in states]
    kv = sum(c[..., None, None] * s.kv for c, s in zip(coef, states))
    k_sum = sum(c[..., None] * s.k_sum for c, s in zip(coef, states))
    v_mean = sum(s.v_mean * (s.length / length) for s in states)
    return LinearAttentionState(kv, k_sum, v_mean, lse, length)


# ----------------------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------------------


class _LinearBackend(NamedTuple):
    """The three passes of one backend: RALA's query mean, the key/value reduction, the per-query apply.

    ``state(..., v_mean=False)`` may return a zero ``v_mean`` (callers whose normalisation does not read it).
    ``rala``, where given, is the whole ``key_weight="rala"`` op in one call (``linear_attention`` uses it);
    ``rope``, where given, maps ``(cos, sin)`` to the tables the passes read, once per ``linear_attention`` call;
    ``infer``, where given, is the whole op in one call for inputs that need no gradient."""

    query_mean: Callable
    state: Callable
    apply: Callable
    rala: Callable | None = None
    rope: Callable | None = None
    infer: Callable | None = None


_REGISTRY = _BackendRegistry("linear_attention")
_REGISTRY.register("reference")(_LinearBackend(_query_mean_reference, _state_reference, _apply_reference))


def _triton_state(
    k, v, *, feature_map, k_norm, key_weight, query_mean, rope, scale, v_mean=True
) -> "LinearAttentionState":
    cos, sin = _rope_operands(rope, k)
    weight = key_weight if isinstance(key_weight, torch.Tensor) else None
    state = _linear_triton.state_op(k, v, k_norm, weight, query_mean, cos, sin, feature_map, scale, v_mean)
    return LinearAttentionState(*state, k.shape[2])


def _triton_apply(q, state, *, feature_map, normalize, q_norm, rope, scale, eps) -> torch.Tensor:
    cos, sin = _rope_operands(rope, q)
    return _linear_triton.apply_op(
        q, q_norm, cos, sin, state.kv, state.k_sum, state.v_mean, feature_map, normalize, scale, eps, state.length
    )


def _triton_supports(args: dict, raise_error: bool) -> bool:
    """CUDA (or the interpreter), fp16/bf16/fp32, head dims 16..128."""
    names = [n for n in ("q", "k", "v", "q_norm", "k_norm") if args.get(n) is not None]
    if not _requires_triton_device(*names)(args, raise_error):
        return False
    if not _requires_dtype(names[0], _TRITON_DTYPES)(args, raise_error):
        return False
    return all(_requires_head_dim_range(name, *_TRITON_HEAD_DIMS)(args, raise_error) for name in names)


def _triton_rala(q, k, v, *, feature_map, normalize, q_norm, k_norm, rope, scale, eps) -> torch.Tensor:
    """The three passes as one autograd node (its backward adds q̄'s gradient into dq in place)."""
    cos, sin = _rope_operands(rope, q)
    return _linear_triton.rala_op(q, k, v, q_norm, k_norm, cos, sin, feature_map, normalize, scale, eps)[0]


_REGISTRY.register("triton", constraints=[_triton_supports])(
    _LinearBackend(
        _linear_triton.query_mean_op, _triton_state, _triton_apply, _triton_rala, _rope_operands, _linear_triton.infer
    )
)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def linear_attention_query_mean(
    q: torch.Tensor,
    *,
    feature_map: str = "elu1",
    backend: str | None = None,
) -> torch.Tensor:
    """RALA's global query ``q̄ = (1/Nq) Σ_i φ(q_i)``: the pre-pass that ``key_weight="rala"`` needs.

    Pass the normaliser queries (``q_norm`` when decoupled). Under sequence parallelism, all-reduce(mean) the
    result over ranks before :func:`linear_attention_state`.

    Args:
        q: ``(B, H, Nq, D)``.
        feature_map: one of ``"elu1"``, ``"relu"``, ``"identity"``, ``"softmax"``.

    Other Parameters:
        backend: ``None`` (Triton when supported, else reference), ``"triton"`` or ``"reference"``.

    Returns:
        ``(B, H, D)``, fp32 (float64 for float64 input).
    """
    _check_tensor("q", q, ndim=4)
    _check_choice("feature_map", feature_map, FEATURE_MAPS)
    impl = _REGISTRY.select(backend, {"q": q})
    return impl.query_mean(q, feature_map)


def linear_attention_state(
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str = "elu1",
    k_norm: torch.Tensor | None = None,
    key_weight: torch.Tensor | str | None = None,
    query_mean: torch.Tensor | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> LinearAttentionState:
    """First pass of :func:`linear_attention`: reduce keys and values to the mean-normalised state.

    ``S̄ = (1/Nk) Σ_j w_j·rot(φ(k_j))·v_jᵀ``, ``z̄ = (1/Nk) Σ_j w_j·φ(k̃_j)``, ``v̄ = (1/Nk) Σ_j v_j``, accumulated
    in fp32 (a deterministic two-stage reduction in the Triton backend). This is where a sequence-parallel
    all-reduce goes: reduce the local keys, combine the ranks' states with the rule of
    :func:`merge_linear_attention_states`, then :func:`linear_attention_apply` the result to the local queries.

    Args:
        k: ``(B, H, Nk, D)`` keys (numerator features, rotated when ``rope`` is given).
        v: ``(B, H, Nk, Dv)`` values.
        feature_map: one of ``"elu1"``, ``"relu"``, ``"identity"``, ``"softmax"`` (over D).
        k_norm: optional ``(B, H, Nk, D)`` keys ``k̃`` of the normaliser and of RALA's weights (default ``k``).
        key_weight: ``None``, a ``(B, H, Nk)`` tensor of weights ``w_j``, or ``"rala"``:
            ``w_j = Nk·softmax_j(scale·q̄·φ(k̃_j))``.
        query_mean: ``(B, H, D)`` ``q̄`` from :func:`linear_attention_query_mean`; required for ``"rala"``,
            an error otherwise.
        rope: optional ``(cos, sin)``, each ``(Nk, D)`` or ``(Nk, D/2)``, rotating the numerator keys.
        scale: RALA's score scale; ``None`` means ``D ** -0.5``.

    Other Parameters:
        backend: ``None``, ``"triton"`` or ``"reference"``.

    Returns:
        :class:`LinearAttentionState` (fp32; float64 for float64 input).

    Raises:
        ValueError, TypeError: a malformed argument (the message names it).
    """
    _check_tensor("k", k, ndim=4)
    _check_tensor("v", v, ndim=4)
    if v.shape[:3] != k.shape[:3] or v.dtype != k.dtype or v.device != k.device:
        raise ValueError(f"v must match k in (B, H, Nk), dtype and device; got {k.shape=}, {v.shape=}.")
    args = _parse_key_args(k, feature_map, k_norm, key_weight, rope)
    scale = _check_scale(scale, k.shape[-1])
    if not isinstance(key_weight, str):
        if query_mean is not None:
            given = "None" if key_weight is None else "a tensor"
            raise ValueError(
                f"query_mean is only used by key_weight='rala'; got a query_mean with key_weight={given}. "
                "Drop query_mean or pass key_weight='rala'."
            )
    elif query_mean is None:
        raise ValueError(
            "query_mean must be given when key_weight='rala'; compute it with linear_attention_query_mean."
        )
    else:
        _check_tensor("query_mean", query_mean, ndim=3)
        if query_mean.shape != (*k.shape[:2], k.shape[-1]) or query_mean.device != k.device:
            raise ValueError(
                f"query_mean must have shape (B, H, D)={(*k.shape[:2], k.shape[-1])} on {k.device}; "
                f"got query_mean.shape={tuple(query_mean.shape)} on {query_mean.device}."
            )
    impl = _REGISTRY.select(backend, {"k": k, "v": v, "k_norm": k_norm})
    return impl.state(k, v, query_mean=query_mean, scale=scale, **args)


def linear_attention_apply(
    q: torch.Tensor,
    state: LinearAttentionState,
    *,
    feature_map: str = "elu1",
    normalize: str | None = "divisive",
    q_norm: torch.Tensor | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float | None = None,
    eps: float = 1e-6,
    backend: str | None = None,
) -> torch.Tensor:
    """Second pass of :func:`linear_attention`: map every query through a :class:`LinearAttentionState`.

    Args:
        q: ``(B, H, Nq, D)``.
        state: from :func:`linear_attention_state` (possibly merged across ranks), on q's device; float32
            (float64 for float64 q).
        feature_map, normalize, q_norm, scale, eps: as in :func:`linear_attention`.
        rope: optional ``(cos, sin)``, each ``(Nq, D)`` or ``(Nq, D/2)``, rotating the numerator queries.

    Other Parameters:
        backend: ``None``, ``"triton"`` or ``"reference"``.

    Returns:
        ``(B, H, Nq, Dv)`` in ``q.dtype``.
    """
    _check_tensor("q", q, ndim=4)
    if not isinstance(state, LinearAttentionState):
        raise TypeError(f"state must be a LinearAttentionState; got {type(state)=}.")
    if state.kv.shape[:3] != (*q.shape[:2], q.shape[-1]):
        raise ValueError(f"state must come from keys of q's (B, H, D); got {q.shape=}, {state.kv.shape=}.")
    if state.kv.device != q.device:
        raise ValueError(f"state must be on q's device; got {state.kv.device=}, {q.device=}.")
    if state.kv.dtype != _compute_dtype(q.dtype):
        raise TypeError(
            f"state must be {_compute_dtype(q.dtype)} for q.dtype={q.dtype} (float32, float64 for float64 q: "
            f"what linear_attention_state returns for keys of q's dtype); got {state.kv.dtype=}."
        )
    args = _parse_query_args(q, feature_map, normalize, q_norm, rope, eps)
    scale = _check_scale(scale, q.shape[-1])
    impl = _REGISTRY.select(backend, {"q": q, "q_norm": q_norm})
    return impl.apply(q, state, scale=scale, **args)


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str = "elu1",
    normalize: str | None = "divisive",
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    key_weight: torch.Tensor | str | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float | None = None,
    eps: float = 1e-6,
    backend: str | None = None,
) -> torch.Tensor:
    r"""Non-causal linear attention with divisive (RALA, LinFusion) or additive (MALA) normalisation.

    With ``φ`` the feature map, ``R_i`` the RoPE rotation of token ``i`` (identity without ``rope``),
    ``q̃, k̃`` the normaliser inputs (``q_norm, k_norm``, default ``q, k``), weights ``w_j`` and
    ``S̄ = (1/Nk) Σ_j w_j R_jφ(k_j) v_jᵀ``, ``z̄ = (1/Nk) Σ_j w_j φ(k̃_j)``:

    - ``"divisive"`` (RALA Eq. 6 with its denominator; LinFusion):
      ``o_i = (R_iφ(q_i))ᵀS̄ / (φ(q̃_i)·z̄ + eps)``.
    - ``"additive"`` (MALA Eq. 9, ``β_i = 1 + 1/z_i``, ``γ_i = z_i·v̄``):
      ``z_i = scale·φ(q̃_i)·z̄``, ``o_i = scale·(R_iφ(q_i))ᵀS̄·(1 + 1/(z_i + eps)) − z_i·(1/Nk)Σ_j v_j``.
    - ``None``: ``o_i = (R_iφ(q_i))ᵀ Σ_j w_j R_jφ(k_j) v_jᵀ`` (plain sum).

    RALA (§3.2): ``key_weight="rala"`` sets ``w_j = Nk·α_j``, ``α = softmax_j(scale·q̄·φ(k̃_j))``,
    ``q̄ = (1/Nq) Σ_i φ(q̃_i)``. All reductions and the normaliser are accumulated in fp32.

    Args:
        q: ``(B, H, Nq, D)`` queries.
        k: ``(B, H, Nk, D)`` keys.
        v: ``(B, H, Nk, Dv)`` values.
        feature_map: ``"elu1"`` (``elu(x)+1``), ``"relu"``, ``"identity"`` or ``"softmax"`` (over D).
        normalize: ``"divisive"``, ``"additive"`` or ``None``.
        q_norm: optional ``(B, H, Nq, D)`` un-rotated normaliser queries ``q̃`` (the decoupled four-input form).
        k_norm: optional ``(B, H, Nk, D)`` normaliser keys ``k̃``.
        key_weight: ``None``, a ``(B, H, Nk)`` tensor of ``w_j``, or ``"rala"``.
        rope: optional ``(cos, sin)``, each ``(N, D)`` (needs ``Nq == Nk == N``), interleaved pairs:
            ``R x = x·cos + (−x1, x0, −x3, x2, …)·sin`` (MALA/RALA ``theta_shift``); or each ``(N, D/2)``, one angle
            per channel pair (the usual tables, whose pairs are equal; the Triton kernels then read half the bytes).
        scale: ``None`` means ``D ** -0.5``; used by ``"additive"`` and by ``"rala"`` weights.
        eps: added to the normaliser.

    Other Parameters:
        backend: ``None`` (Triton on CUDA when supported, else the reference), ``"triton"`` or ``"reference"``.

    Returns:
        ``(B, H, Nq, Dv)`` in ``q.dtype``.

    Raises:
        ValueError, TypeError: a malformed argument (the message names it).
        NotImplementedError: ``backend="triton"`` with a device, dtype or head dim it does not support.

    Example:
        >>> q, k, v = torch.randn(3, 2, 4, 49, 32).unbind(0)
        >>> linear_attention(q, k, v, normalize="additive").shape
        torch.Size([2, 4, 49, 32])
    """
    _check_attention_inputs(q, k, v)
    if rope is not None and q.shape[2] != k.shape[2]:
        raise ValueError(f"rope needs Nq == Nk (one table for queries and keys); got {q.shape[2]=}, {k.shape[2]=}.")
    key_args = _parse_key_args(k, feature_map, k_norm, key_weight, rope)
    query_args = _parse_query_args(q, feature_map, normalize, q_norm, rope, eps)
    scale = _check_scale(scale, q.shape[-1])
    impl = _REGISTRY.select(backend, {"q": q, "k": k, "v": v, "q_norm": q_norm, "k_norm": k_norm})
    if rope is not None and impl.rope is not None:
        # converted once here, so the state and apply passes do not each convert them (a no-op for them now)
        key_args["rope"] = query_args["rope"] = impl.rope(rope, q)
    inputs = (q, k, v, q_norm, k_norm, key_weight if isinstance(key_weight, torch.Tensor) else None)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    if impl.infer is not None and not grad:
        return impl.infer(q, k, v, k_norm=k_norm, key_weight=key_weight, scale=scale, **query_args)
    if isinstance(key_weight, str) and impl.rala is not None:
        return impl.rala(q, k, v, k_norm=k_norm, scale=scale, **query_args)
    query_mean = impl.query_mean(q if q_norm is None else q_norm, feature_map) if isinstance(key_weight, str) else None
    state = impl.state(k, v, query_mean=query_mean, scale=scale, v_mean=normalize == "additive", **key_args)
    return impl.apply(q, state, scale=scale, **query_args)


def _parse_key_args(k, feature_map, k_norm, key_weight, rope) -> dict:
    _check_choice("feature_map", feature_map, FEATURE_MAPS)
    if k_norm is not None:
        _check_same_as("k_norm", k_norm, k, "k")
    return {
        "feature_map": feature_map,
        "k_norm": k_norm,
        "key_weight": _check_key_weight(key_weight, k),
        "rope": _check_rope(rope, k.shape[2], k.shape[3], k.device),
    }


def _parse_query_args(q, feature_map, normalize, q_norm, rope, eps) -> dict:
    _check_choice("feature_map", feature_map, FEATURE_MAPS)
    _check_choice("normalize", normalize, NORMALIZATIONS)
    if q_norm is not None:
        _check_same_as("q_norm", q_norm, q, "q")
    return {
        "feature_map": feature_map,
        "normalize": normalize,
        "q_norm": q_norm,
        "rope": _check_rope(rope, q.shape[2], q.shape[3], q.device),
        "eps": _check_eps(eps),
    }
