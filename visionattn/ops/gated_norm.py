"""ViG's 2D gating locality injection: per-head RMSNorms of the attention output and of the conv features, mixed by
a sigmoid gate, optionally followed by SiLU.

Shapes: B = batch, N = tokens, H = heads, Dv = value head dim (the RMSNorms normalise over the Dv channels of a head).

ViG (Liao et al., AAAI 2025, arXiv 2405.18425, Sec. 3.3, Eq. 8), with ``s = σ(g)``:

    y = act(s ⊙ RMSNorm(o; w_o) + (1 − s) ⊙ RMSNorm(l; w_l)),   RMSNorm(x; w) = x · rsqrt(mean(x²) + eps) ⊙ w

where ``o`` is the attention output, ``l`` the depthwise-conv features, ``g`` the out-gate logits and ``act`` SiLU
(ViG-T's ``use_out_act``) or the identity. Eager PyTorch spends about ten memory-bound passes on this; the Triton
backend reads o, l, g once and writes y once (backward: reads dy, o, l, g, writes the three gradients).

:func:`rms_norm` is the plain ``RMSNorm(x; w)`` over the last dim from the same kernel file (many rows per program;
PyTorch's fused kernel runs one block per row, slow on ViG's short rows of C = 192-768 channels), and
:func:`layer_norm` its mean-centred variant with a bias (MAViT/RAVLT and the Agent backbones, C = 64-512).

Only the forward pays: H100, bf16, 262K rows of C = 192 (``python tools/bench.py attention --cases gated_norm``),
``rms_norm`` forward 0.142 ms against ``F.rms_norm``'s 0.202 ms (1.42x faster), but forward+backward 0.684 ms against
eager's 0.524 ms (0.77x). So with ``backend=None`` the row norms run Triton only when autograd will not record the
call (``torch.is_grad_enabled()`` off or no input requiring grad: inference) and PyTorch's fused kernels
(``F.rms_norm``, ``F.layer_norm``) otherwise. While ``torch.compile`` traces, every op here picks its PyTorch form
(inductor fuses it; ``_eager_only``); ``backend="triton"`` runs the Triton forward and backward regardless.
"""

import torch
import torch.nn.functional as F

from ._checks import _check_float, _check_tensor
from ._eager import custom_op
from ._registry import (
    _BackendRegistry,
    _eager_only,
    _fail,
    _requires_dtype,
    _requires_head_dim_range,
    _requires_triton_device,
)

__all__ = [
    "gated_norm",
    "gated_norm_reference",
    "layer_norm",
    "layer_norm_reference",
    "rms_norm",
    "rms_norm_reference",
]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Head dims the Triton kernels take (one row is one power-of-two tile, masked beyond Dv).
_TRITON_MAX_HEAD_DIM = 256
#: Channels of the plain RMSNorm kernel (a row is one tile; ViG-B has 768).
_TRITON_MAX_CHANNELS = 1024

_registry = _BackendRegistry("gated_norm")
_rms_registry = _BackendRegistry("rms_norm")
_ln_registry = _BackendRegistry("layer_norm")


def gated_norm_reference(
    o: torch.Tensor,
    local: torch.Tensor,
    gate_logits: torch.Tensor,
    weight_o: torch.Tensor,
    weight_local: torch.Tensor,
    *,
    eps: float = 1e-6,
    silu: bool = False,
) -> torch.Tensor:
    """The equation of the module docstring in plain PyTorch (differentiable, any float dtype, any device).

    It is the eager code of ``GatedLinearAttention2d`` before the fusion, operation for operation (``F.rms_norm``
    as timm's ``RmsNorm`` calls it, then the mix in the input dtype), so it reproduces that path bit for bit.
    """
    gate = torch.sigmoid(gate_logits)
    channels = (o.shape[-1],)
    mixed = F.rms_norm(o, channels, weight_o, eps) * gate + F.rms_norm(local, channels, weight_local, eps) * (1 - gate)
    return F.silu(mixed) if silu else mixed


@_registry.register(
    "triton",
    constraints=[
        _requires_triton_device("o", "local", "gate_logits", "weight_o", "weight_local"),
        _requires_dtype("o", _TRITON_DTYPES),
        _requires_dtype("weight_o", _TRITON_DTYPES),
        _requires_dtype("weight_local", _TRITON_DTYPES),
        _requires_head_dim_range("o", 1, _TRITON_MAX_HEAD_DIM),
        _eager_only,
    ],
)
def _triton_backend(o, local, gate_logits, weight_o, weight_local, eps, silu):
    return _gated_norm_fwd_op(o, local, gate_logits, weight_o, weight_local, eps, silu)


@_registry.register("torch")
@_registry.register("reference")
def _reference_backend(o, local, gate_logits, weight_o, weight_local, eps, silu):
    return gated_norm_reference(o, local, gate_logits, weight_o, weight_local, eps=eps, silu=silu)


@custom_op("visionattn::gated_norm_fwd")
def _gated_norm_fwd_op(
    o: torch.Tensor,
    local: torch.Tensor,
    gate_logits: torch.Tensor,
    weight_o: torch.Tensor,
    weight_local: torch.Tensor,
    eps: float,
    silu: bool,
) -> torch.Tensor:
    from ..kernels.gated_norm import gated_norm_fwd

    return gated_norm_fwd(o, local, gate_logits, weight_o, weight_local, eps, silu)


@_gated_norm_fwd_op.register_fake
def _(o, local, gate_logits, weight_o, weight_local, eps, silu):
    return o.new_empty(o.shape)


@custom_op("visionattn::gated_norm_bwd")
def _gated_norm_bwd_op(
    dy: torch.Tensor,
    o: torch.Tensor,
    local: torch.Tensor,
    gate_logits: torch.Tensor,
    weight_o: torch.Tensor,
    weight_local: torch.Tensor,
    eps: float,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of o, local, gate_logits, weight_o and weight_local."""
    from ..kernels.gated_norm import gated_norm_bwd

    return gated_norm_bwd(dy, o, local, gate_logits, weight_o, weight_local, eps, silu)


@_gated_norm_bwd_op.register_fake
def _(dy, o, local, gate_logits, weight_o, weight_local, eps, silu):
    return tuple(t.new_empty(t.shape) for t in (o, local, gate_logits, weight_o, weight_local))


def _setup_context(ctx, inputs, output):
    o, local, gate_logits, weight_o, weight_local, eps, silu = inputs
    ctx.save_for_backward(o, local, gate_logits, weight_o, weight_local)
    ctx.eps, ctx.silu = eps, silu


def _backward(ctx, dy):
    grads = _gated_norm_bwd_op(dy, *ctx.saved_tensors, ctx.eps, ctx.silu)
    # slots: o, local, gate_logits, weight_o, weight_local, eps, silu
    return *grads, None, None


_gated_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _check_like(name: str, t, o: torch.Tensor) -> None:
    """``t`` has the shape, dtype and device of ``o``."""
    _check_tensor(name, t, ndim=4)
    if t.shape != o.shape:
        raise ValueError(
            f"{name} must have the shape of o (B, N, H, Dv); got {name}.shape={tuple(t.shape)}, {o.shape=}."
        )
    if t.dtype != o.dtype:
        raise TypeError(f"{name} must have the dtype of o; got {name}.dtype={t.dtype}, {o.dtype=}.")
    if t.device != o.device:
        raise ValueError(f"{name} must be on the device of o; got {name}.device={t.device}, {o.device=}.")


def _check_weight(name: str, w, x: torch.Tensor, x_name: str = "o") -> None:
    """``w`` is ``(C,)`` for the last dim ``C`` of ``x``, on its device."""
    _check_tensor(name, w, ndim=1)
    if w.shape[0] != x.shape[-1]:
        raise ValueError(
            f"{name} must have one entry per channel of {x_name}, shape ({x.shape[-1]},); "
            f"got {name}.shape={tuple(w.shape)}."
        )
    if w.device != x.device:
        raise ValueError(
            f"{name} must be on the device of {x_name}; got {name}.device={w.device}, {x_name}.device={x.device}."
        )


def _check_rows(x, weight, bias=None) -> None:
    """``x`` is a ``(..., C)`` tensor and ``weight`` (and ``bias`` unless None) ``(C,)`` on its device."""
    _check_tensor("x", x)
    if x.ndim == 0:
        raise ValueError(f"x must have at least 1 dim (the normalised channels); got x.shape={tuple(x.shape)}.")
    _check_weight("weight", weight, x, "x")
    if bias is not None:
        _check_weight("bias", bias, x, "x")


def gated_norm(
    o: torch.Tensor,
    local: torch.Tensor,
    gate_logits: torch.Tensor,
    weight_o: torch.Tensor,
    weight_local: torch.Tensor,
    *,
    eps: float = 1e-6,
    silu: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    r"""ViG's locality injection ``act(σ(g) ⊙ RMSNorm(o; w_o) + (1 − σ(g)) ⊙ RMSNorm(l; w_l))`` per head.

    Args:
        o: attention output ``(B, N, H, Dv)``.
        local: conv features ``(B, N, H, Dv)`` (``(B, N, H·Dv)`` unflattened per head), dtype and device of ``o``.
        gate_logits: out-gate logits ``g`` before the sigmoid, ``(B, N, H, Dv)``, dtype and device of ``o``.
        weight_o: RMSNorm weight of ``o``, ``(Dv,)``, shared by the heads.
        weight_local: RMSNorm weight of ``local``, ``(Dv,)``.
        eps: added to ``mean(x²)`` of each row, > 0.
        silu: apply SiLU to the mix (ViG-T's ``use_out_act``).

    Other Parameters:
        backend: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``; fp16/bf16/fp32, Dv <= 256, fp32
            statistics, one rounding to the dtype of ``o`` at the end), ``"reference"`` (plain PyTorch, any float
            dtype, rounds after each operation like eager code), ``"torch"`` (the same PyTorch function, so that one
            backend name selects the PyTorch path of every ViG op) or None for Triton where it applies, else the
            reference.

    Returns:
        ``(B, N, H, Dv)`` in the dtype of ``o``, contiguous on the Triton backend.

    Raises:
        TypeError: a non-tensor input, a non-float dtype, local or gate_logits not in the dtype of ``o``, a
            non-float ``eps`` or a non-bool ``silu``.
        ValueError: mismatched shapes or devices, ``eps <= 0`` or an unknown ``backend``.
        NotImplementedError: ``backend="triton"`` on input it does not support.

    Example:
        >>> o, local, g = torch.randn(3, 2, 10, 3, 16).unbind(0)
        >>> gated_norm(o, local, g, torch.ones(16), torch.ones(16), silu=True).shape
        torch.Size([2, 10, 3, 16])
    """
    _check_tensor("o", o, ndim=4)
    _check_like("local", local, o)
    _check_like("gate_logits", gate_logits, o)
    _check_weight("weight_o", weight_o, o)
    _check_weight("weight_local", weight_local, o)
    eps = _check_float("eps", eps, positive=True)
    if not isinstance(silu, bool):
        raise TypeError(f"silu must be a bool; got {silu=} ({type(silu).__name__}).")
    args = dict(o=o, local=local, gate_logits=gate_logits, weight_o=weight_o, weight_local=weight_local)
    return _registry.select(backend, args)(**args, eps=eps, silu=silu)


# ------------------------------------------------------------------------------------------------- plain RMSNorm
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """``F.rms_norm`` over the last dim (what timm's ``RmsNorm`` calls), any float dtype and device."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _requires_channels(args: dict, raise_error: bool) -> bool:
    channels = args["x"].shape[-1]
    if not 1 <= channels <= _TRITON_MAX_CHANNELS:
        return _fail(
            raise_error,
            NotImplementedError,
            f"x.shape[-1] (channels) must be in [1, {_TRITON_MAX_CHANNELS}] for backend='triton'; got {channels}. "
            "Use backend='reference'.",
        )
    return True


def _requires_no_autograd(*names: str):
    """Automatic selection only: autograd will not record the call (grad mode off, or no input ``names`` requires
    grad), i.e. inference. With a gradient the PyTorch kernels win end to end (module docstring); an explicitly named
    ``backend="triton"`` still runs its own backward."""

    def check(args: dict, raise_error: bool) -> bool:
        if raise_error or not torch.is_grad_enabled():
            return True
        return not any(args[name] is not None and args[name].requires_grad for name in names)

    return check


#: Constraints of the Triton row norms (RMSNorm, LayerNorm) on ``x``, ``weight`` and the optional ``bias``.
_ROW_NORM_CONSTRAINTS = [
    _requires_triton_device("x", "weight", "bias"),
    _requires_dtype("x", _TRITON_DTYPES),
    _requires_dtype("weight", _TRITON_DTYPES),
    _requires_channels,
    _requires_no_autograd("x", "weight", "bias"),
    _eager_only,
]


@_rms_registry.register("triton", constraints=_ROW_NORM_CONSTRAINTS)
def _rms_triton_backend(x, weight, eps):
    return _rms_norm_fwd_op(x, weight, eps)


@_rms_registry.register("torch")
@_rms_registry.register("reference")
def _rms_reference_backend(x, weight, eps):
    return rms_norm_reference(x, weight, eps=eps)


@custom_op("visionattn::rms_norm_fwd")
def _rms_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from ..kernels.gated_norm import rms_norm_fwd

    return rms_norm_fwd(x, weight, eps)


@_rms_norm_fwd_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)


@custom_op("visionattn::rms_norm_bwd")
def _rms_norm_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of x and weight."""
    from ..kernels.gated_norm import rms_norm_bwd

    return rms_norm_bwd(dy, x, weight, eps)


@_rms_norm_bwd_op.register_fake
def _(dy, x, weight, eps):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _rms_setup_context(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _rms_backward(ctx, dy):
    dx, dw = _rms_norm_bwd_op(dy, *ctx.saved_tensors, ctx.eps)
    return dx, dw, None  # slots: x, weight, eps


_rms_norm_fwd_op.register_autograd(_rms_backward, setup_context=_rms_setup_context)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-6, backend: str | None = None) -> torch.Tensor:
    """``RMSNorm(x; w) = x · rsqrt(mean(x²) + eps) ⊙ w`` over the last dim (Zhang & Sennrich, NeurIPS 2019, Eq. 4).

    Args:
        x: ``(..., C)``.
        weight: ``(C,)``, on the device of ``x``.
        eps: added to ``mean(x²)`` of each row, > 0.

    Other Parameters:
        backend: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``; fp16/bf16/fp32, C <= 1024, fp32
            statistics; forward and backward), ``"reference"`` / ``"torch"`` (``F.rms_norm``, any float dtype) or
            None: Triton where it applies and autograd will not record the call (inference), else the reference.

    Returns:
        ``(..., C)`` in the dtype of ``x``, contiguous on the Triton backend.

    Raises:
        TypeError: a non-tensor input, a non-float dtype or a non-float ``eps``.
        ValueError: a weight that is not ``(C,)`` or on another device, ``eps <= 0`` or an unknown ``backend``.
        NotImplementedError: ``backend="triton"`` on input it does not support.

    Example:
        >>> rms_norm(torch.randn(2, 5, 192), torch.ones(192)).shape
        torch.Size([2, 5, 192])
    """
    _check_rows(x, weight)
    eps = _check_float("eps", eps, positive=True)
    args = dict(x=x, weight=weight)
    return _rms_registry.select(backend, args | {"bias": None})(**args, eps=eps)


# ------------------------------------------------------------------------------------------------------ LayerNorm
def layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, eps: float = 1e-5
) -> torch.Tensor:
    """``F.layer_norm`` over the last dim (what ``nn.LayerNorm`` and timm's ``LayerNorm`` call)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


@_ln_registry.register("triton", constraints=_ROW_NORM_CONSTRAINTS)
def _ln_triton_backend(x, weight, bias, eps):
    return _layer_norm_fwd_op(x, weight, bias, eps)


@_ln_registry.register("torch")
@_ln_registry.register("reference")
def _ln_reference_backend(x, weight, bias, eps):
    return layer_norm_reference(x, weight, bias, eps=eps)


@custom_op("visionattn::layer_norm_fwd")
def _layer_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    from ..kernels.gated_norm import layer_norm_fwd

    return layer_norm_fwd(x, weight, bias, eps)


@_layer_norm_fwd_op.register_fake
def _(x, weight, bias, eps):
    return x.new_empty(x.shape)


@custom_op("visionattn::layer_norm_bwd")
def _layer_norm_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of x, weight and the bias."""
    from ..kernels.gated_norm import layer_norm_bwd

    return layer_norm_bwd(dy, x, weight, eps)


@_layer_norm_bwd_op.register_fake
def _(dy, x, weight, eps):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


def _ln_setup_context(ctx, inputs, output):
    x, weight, bias, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps, ctx.has_bias = eps, bias is not None


def _ln_backward(ctx, dy):
    dx, dw, db = _layer_norm_bwd_op(dy, *ctx.saved_tensors, ctx.eps)
    return dx, dw, db if ctx.has_bias else None, None  # slots: x, weight, bias, eps


_layer_norm_fwd_op.register_autograd(_ln_backward, setup_context=_ln_setup_context)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    eps: float = 1e-5,
    backend: str | None = None,
) -> torch.Tensor:
    """``LayerNorm(x; w, b) = (x − μ) · rsqrt(mean((x − μ)²) + eps) ⊙ w + b``, ``μ = mean(x)``, over the last dim
    (Ba et al., 2016, Eq. 4).

    Args:
        x: ``(..., C)``.
        weight: ``(C,)``, on the device of ``x``.
        bias: ``(C,)`` on the device of ``x``, or None.
        eps: added to the variance of each row, > 0.

    Other Parameters:
        backend: as for :func:`rms_norm`, with ``F.layer_norm`` as the reference.

    Returns:
        ``(..., C)`` in the dtype of ``x``, contiguous on the Triton backend.

    Raises:
        TypeError: a non-tensor input, a non-float dtype or a non-float ``eps``.
        ValueError: a weight or bias that is not ``(C,)`` or on another device, ``eps <= 0`` or an unknown
            ``backend``.
        NotImplementedError: ``backend="triton"`` on input it does not support.

    Example:
        >>> layer_norm(torch.randn(2, 5, 64), torch.ones(64), torch.zeros(64)).shape
        torch.Size([2, 5, 64])
    """
    _check_rows(x, weight, bias)
    eps = _check_float("eps", eps, positive=True)
    args = dict(x=x, weight=weight, bias=bias)
    return _ln_registry.select(backend, args)(**args, eps=eps)
