"""Gated linear attention (GLA), causal or bidirectional as in ViG.

Shapes: B = batch, H = heads, N = tokens (raster order), Dk = key/query head dim, Dv = value head dim.

Causal scan with a per-token, per-key-channel forget gate ``a_t = log_gate_fwd[..., t, :] <= 0`` (Yang et al.,
"Gated Linear Attention Transformers with Hardware-Efficient Training", ICML 2024, eq. 3):

    S_t = diag(exp(a_t)) S_{t-1} + k_tᵀ v_t,        o_t = (scale · q_t) S_t        (token t included)

Bidirectional (ViG, Liao et al., AAAI 2025, arXiv 2405.18425): a second, mirrored scan with its own gates
``b_t = log_gate_bwd[..., t, :]`` indexed by the original token positions,

    S'_t = diag(exp(b_t)) S'_{t+1} + k_tᵀ v_t,      o'_t = (scale · q_t) S'_t,      output (o + o') / 2,

which equals ViG's ``flip(GLA(flip(q), flip(k), flip(v), flip(b)))`` for the second half. The caller produces the
log gates (ViG: ``logsigmoid(x) / 16``).
"""

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from ..kernels._config import is_interpreter
from ._checks import _check_attention_inputs, _check_scale, _check_tensor
from ._eager import custom_op
from ._gated_torch import gated_linear_attention_chunked, requires_torch_dtype
from ._registry import (
    _BackendRegistry,
    _fail,
    _requires_dtype,
    _requires_head_dim,
    _requires_triton_device,
)

__all__ = ["gated_linear_attention", "gated_linear_attention_reference"]

#: Tokens per chunk of the Triton kernels (one stored state per chunk and scan); 32 under the interpreter so that tiny
#: tests cross several chunks. ``torch.ops.visionattn.gated_linear_attention_fwd`` takes others (powers of two >= 16).
_TRITON_CHUNK = 32 if is_interpreter() else 64
#: Head dims (Dk and Dv) the Triton kernels are compiled for.
_TRITON_HEAD_DIMS = (16, 32, 64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_registry = _BackendRegistry("gated_linear_attention")


def _scan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor, reverse: bool) -> torch.Tensor:
    """One directional GLA recurrence over the token axis; ``q`` already carries the scale."""
    batch, heads, length, _ = q.shape
    if length == 0:
        return v.new_zeros(batch, heads, 0, v.shape[-1])
    state = q.new_zeros(batch, heads, q.shape[-1], v.shape[-1])
    outputs = [None] * length
    for t in reversed(range(length)) if reverse else range(length):
        state = log_gate[:, :, t, :, None].exp() * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outputs[t] = torch.einsum("bhd,bhde->bhe", q[:, :, t], state)
    return torch.stack(outputs, dim=2)


def gated_linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gate_fwd: torch.Tensor,
    log_gate_bwd: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """The recurrence of the module docstring, token by token in plain PyTorch (differentiable, any float dtype).

    Half-precision inputs are computed in float32 and cast back; float64 stays float64 (the test oracle).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out_dtype, compute = q.dtype, torch.promote_types(q.dtype, torch.float32)
    q, k, v = (q.to(compute) * scale), k.to(compute), v.to(compute)
    out = _scan(q, k, v, log_gate_fwd.to(compute), reverse=False)
    if log_gate_bwd is not None:
        out = (out + _scan(q, k, v, log_gate_bwd.to(compute), reverse=True)) / 2
    return out.to(out_dtype)


def _log_gates(gates: torch.Tensor | None, gate_normalizer: float | None) -> torch.Tensor | None:
    """The log gates of the PyTorch backends: as given, or ``logsigmoid(x) / gate_normalizer`` of logits ``x`` in
    (at least) fp32, as the Triton kernels compute them on load."""
    if gates is None or gate_normalizer is None:
        return gates
    return F.logsigmoid(gates.to(torch.promote_types(gates.dtype, torch.float32))) / gate_normalizer


@_registry.register("reference")
def _reference_backend(q, k, v, log_gate_fwd, log_gate_bwd, scale, gate_normalizer):
    log_gates = _log_gates(log_gate_fwd, gate_normalizer), _log_gates(log_gate_bwd, gate_normalizer)
    return gated_linear_attention_reference(q, k, v, *log_gates, scale=scale)


@custom_op("visionattn::gated_linear_attention_fwd")
def _gated_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gate_fwd: torch.Tensor,
    log_gate_bwd: torch.Tensor | None,
    scale: float,
    chunk: int,
    gate_normalizer: float,
) -> torch.Tensor:
    """``gate_normalizer``: 0 for log gates, else the gates are logits (``gated_linear_attention``)."""
    from ..kernels.gated_fwd import gated_fwd

    return gated_fwd(q, k, v, log_gate_fwd, log_gate_bwd, scale, chunk, gate_normalizer)


@_gated_fwd_op.register_fake
def _(q, k, v, log_gate_fwd, log_gate_bwd, scale, chunk, gate_normalizer):
    from ..kernels.block_sparse import empty_like_layout

    return empty_like_layout(v, v.shape[-1])


@custom_op("visionattn::gated_linear_attention_bwd")
def _gated_bwd_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gate_fwd: torch.Tensor,
    log_gate_bwd: torch.Tensor | None,
    scale: float,
    chunk: int,
    gate_normalizer: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k, v and both gates; the last is an empty tensor in causal mode (an op returns no None)."""
    from ..kernels.gated_bwd import gated_bwd

    dq, dk, dv, dg_fwd, dg_bwd = gated_bwd(do, q, k, v, log_gate_fwd, log_gate_bwd, scale, chunk, gate_normalizer)
    return dq, dk, dv, dg_fwd, q.new_empty(0) if dg_bwd is None else dg_bwd


@_gated_bwd_op.register_fake
def _(do, q, k, v, log_gate_fwd, log_gate_bwd, scale, chunk, gate_normalizer):
    from ..kernels.block_sparse import empty_like_layout

    grads = [empty_like_layout(t, t.shape[-1]) for t in (q, k, v, log_gate_fwd)]
    return (*grads, q.new_empty(0) if log_gate_bwd is None else empty_like_layout(log_gate_bwd, q.shape[-1]))


def _setup_context(ctx, inputs, output):
    q, k, v, log_gate_fwd, log_gate_bwd, scale, chunk, gate_normalizer = inputs
    ctx.save_for_backward(q, k, v, log_gate_fwd, log_gate_bwd)
    ctx.scale, ctx.chunk, ctx.gate_normalizer = scale, chunk, gate_normalizer


def _backward(ctx, do):
    q, k, v, log_gate_fwd, log_gate_bwd = ctx.saved_tensors
    dq, dk, dv, dg_fwd, dg_bwd = _gated_bwd_op(
        do, q, k, v, log_gate_fwd, log_gate_bwd, ctx.scale, ctx.chunk, ctx.gate_normalizer
    )
    # slots: q, k, v, log_gate_fwd, log_gate_bwd, scale, chunk, gate_normalizer
    return dq, dk, dv, dg_fwd, None if log_gate_bwd is None else dg_bwd, None, None, None


_gated_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _recurrence_flops(q_shape, v_shape, log_gate_bwd_shape, per_token: int) -> int:
    batch, heads, length, dk = q_shape
    directions = 1 if log_gate_bwd_shape is None else 2
    return per_token * batch * heads * length * dk * v_shape[-1] * directions


@register_flop_formula(torch.ops.visionattn.gated_linear_attention_fwd)
def _fwd_flops(q_shape, k_shape, v_shape, log_gate_fwd_shape, log_gate_bwd_shape, *_, **__):
    """The recurrence's work: state update and readout, 2 · 2·Dk·Dv per token and direction."""
    return _recurrence_flops(q_shape, v_shape, log_gate_bwd_shape, 4)


@register_flop_formula(torch.ops.visionattn.gated_linear_attention_bwd)
def _bwd_flops(do_shape, q_shape, k_shape, v_shape, log_gate_fwd_shape, log_gate_bwd_shape, *_, **__):
    """dq, dk, dv and the gradient-state update, 4 · 2·Dk·Dv per token and direction (recompute not counted)."""
    return _recurrence_flops(q_shape, v_shape, log_gate_bwd_shape, 8)


def _requires_gate_dtypes(args: dict, raise_error: bool) -> bool:
    for name in ("log_gate_fwd", "log_gate_bwd"):
        gate = args[name]
        if gate is not None and gate.dtype not in _TRITON_DTYPES:
            return _fail(
                raise_error,
                NotImplementedError,
                f"{name}.dtype must be one of {_TRITON_DTYPES} for backend='triton'; got {name}.dtype={gate.dtype}. "
                "Use backend='reference' for other dtypes.",
            )
    return True


@_registry.register(
    "triton",
    constraints=[
        _requires_triton_device("q"),
        _requires_dtype("q", _TRITON_DTYPES),
        _requires_gate_dtypes,
        _requires_head_dim("q", _TRITON_HEAD_DIMS),
        _requires_head_dim("v", _TRITON_HEAD_DIMS),
    ],
)
def _triton_backend(q, k, v, log_gate_fwd, log_gate_bwd, scale, gate_normalizer):
    return _gated_fwd_op(q, k, v, log_gate_fwd, log_gate_bwd, scale, _TRITON_CHUNK, gate_normalizer or 0.0)


@_registry.register("torch", constraints=[requires_torch_dtype])
def _torch_backend(q, k, v, log_gate_fwd, log_gate_bwd, scale, gate_normalizer):
    log_gates = _log_gates(log_gate_fwd, gate_normalizer), _log_gates(log_gate_bwd, gate_normalizer)
    return gated_linear_attention_chunked(q, k, v, *log_gates, scale)


def _check_gate(name: str, gate, k: torch.Tensor) -> None:
    _check_tensor(name, gate, ndim=4)
    if gate.shape != k.shape:
        raise ValueError(
            f"{name} must have the shape of k (B, H, N, Dk): one log gate per token and key channel; "
            f"got {name}.shape={tuple(gate.shape)}, k.shape={tuple(k.shape)}."
        )
    if gate.device != k.device:
        raise ValueError(f"{name} must be on the device of k; got {name}.device={gate.device}, {k.device=}.")


def _check_gate_normalizer(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"gate_normalizer must be a positive finite number or None; got gate_normalizer={value!r}.")
    return float(value)


def gated_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gate_fwd: torch.Tensor,
    log_gate_bwd: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    gate_normalizer: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    r"""Gated linear attention: causal with one gate set, bidirectional (ViG) with two.

    ``S_t = diag(exp(a_t)) S_{t-1} + k_tᵀ v_t``, ``o_t = scale · q_t S_t`` (GLA, Yang et al. 2024, eq. 3); with
    ``log_gate_bwd`` also the mirrored scan ``S'_t = diag(exp(b_t)) S'_{t+1} + k_tᵀ v_t`` and output
    ``(o_t + o'_t) / 2`` (ViG, Liao et al. 2025).

    Args:
        q: queries ``(B, H, N, Dk)``.
        k: keys ``(B, H, N, Dk)``.
        v: values ``(B, H, N, Dv)``.
        log_gate_fwd: log forget gates of the forward scan ``(B, H, N, Dk)``, ``a_t = log_gate_fwd[:, :, t]``.
            Must be ``<= 0``: a decay, ``exp(a_t) <= 1`` (ViG's ``logsigmoid(x) / 16`` is, by construction).
            Not checked: raising on a positive gate needs its value on the host, i.e. a device-to-host sync (plus
            a pass over the gates) on every call, which this op keeps off its hot path; a caller that cannot
            guarantee the sign can test ``(log_gate_fwd <= 0).all()`` itself. The Triton backend clamps gates to
            ``[-16, 0]``: a positive gate acts as 0 (no decay) and gets gradient 0; ``"torch"`` and
            ``"reference"`` compute the recurrence as written (the state grows like ``exp(Σ a)`` and overflows where
            the true result does). Large negative values (down to ``-inf``) are fine: ``exp(-16) ~ 1e-7`` is
            float32 rounding level, and a gate clamped there also gets gradient 0.
        log_gate_bwd: log forget gates of the backward scan ``(B, H, N, Dk)``, indexed by the original token
            positions (``b_t`` gates the step from token ``t + 1`` to ``t``), or None for the causal scan only.
            Same sign rule as ``log_gate_fwd``.
        scale: query scale; None means ``Dk ** -0.5``.
        gate_normalizer: None, or ViG's ``gate_logit_normalizer`` ``c > 0``: then ``log_gate_fwd`` and
            ``log_gate_bwd`` are gate *logits* ``x`` (any real values, e.g. the bf16 output of the gate projection)
            and the log gates are ``logsigmoid(x) / c``, computed in fp32 where the gates are read (in-kernel for
            Triton), so no fp32 log-gate tensor is materialised; the gate gradients are then with respect to ``x``.

    Other Parameters:
        backend: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``; fp16/bf16/fp32, Dk and Dv in
            ``(16, 32, 64)``, fp32 state; float32 matmuls use TF32 when
            ``torch.get_float32_matmul_precision() != "highest"``), ``"torch"`` (chunked in plain PyTorch, any device,
            fp16/bf16/fp32 computed in fp32, exact for any gates), ``"reference"`` (the token loop, any float dtype)
            or None for the first that supports the input: Triton where it applies, else ``"torch"``, and the
            reference for float64.

    Returns:
        ``(B, H, N, Dv)`` in the dtype of ``q``.

    Raises:
        TypeError: a non-tensor input or a non-float dtype; q, k, v of different dtypes.
        ValueError: mismatched shapes or devices, a bad ``scale`` or an unknown ``backend``.
        NotImplementedError: ``backend="triton"`` or ``"torch"`` on input it does not support.

    Example:
        >>> q, k = torch.randn(2, 3, 10, 16), torch.randn(2, 3, 10, 16)
        >>> v = torch.randn(2, 3, 10, 32)
        >>> a, b = torch.nn.functional.logsigmoid(torch.randn(2, 2, 3, 10, 16)) / 16
        >>> gated_linear_attention(q, k, v, a, b).shape
        torch.Size([2, 3, 10, 32])
        >>> x, y = torch.randn(2, 2, 3, 10, 16)  # gate logits: the same form, computed inside
        >>> gated_linear_attention(q, k, v, x, y, gate_normalizer=16.0).shape
        torch.Size([2, 3, 10, 32])
    """
    _check_attention_inputs(q, k, v)
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"q and k must have the same length N (one state per query token); "
            f"got q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}."
        )
    _check_gate("log_gate_fwd", log_gate_fwd, k)
    if log_gate_bwd is not None:
        _check_gate("log_gate_bwd", log_gate_bwd, k)
    scale = _check_scale(scale, q.shape[-1])
    if gate_normalizer is not None:
        gate_normalizer = _check_gate_normalizer(gate_normalizer)
    args = dict(
        q=q,
        k=k,
        v=v,
        log_gate_fwd=log_gate_fwd,
        log_gate_bwd=log_gate_bwd,
        scale=scale,
        gate_normalizer=gate_normalizer,
    )
    return _registry.select(backend, args)(**args)
