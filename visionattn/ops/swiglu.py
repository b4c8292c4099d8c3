"""SwiGLU's gating, the activation of ViG's MLP: ``SiLU`` of the first half of the last dim times the second half.

Shapes: ``(..., 2H)`` in, ``(..., H)`` out; H = hidden width of the MLP (not heads here), rows = the product of the
leading dims.

Shazeer, "GLU Variants Improve Transformer", arXiv 2002.05202, Eq. 5, with ``xW`` and ``xV`` computed by one fused
projection whose output is ``x = [a, b]``, gate first (timm's ``GluMlp(act_layer=nn.SiLU, gate_last=False)``):

    SwiGLU(x) = SiLU(a) ⊙ b = a σ(a) ⊙ b

Eager PyTorch runs SiLU and the product as two strided elementwise passes over the halves with an intermediate; the
Triton backend reads x once and writes y once (backward: reads dy and x, writes dx).
"""

import torch
import torch.nn.functional as F

from ._checks import _check_tensor
from ._eager import custom_op
from ._registry import _BackendRegistry, _eager_only, _requires_dtype, _requires_triton_device

__all__ = ["swiglu", "swiglu_reference"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_registry = _BackendRegistry("swiglu")


def swiglu_reference(x: torch.Tensor) -> torch.Tensor:
    """``SiLU(a) ⊙ b`` for ``a, b = x.chunk(2, -1)``, exactly timm's eager ``GluMlp`` code (any float dtype)."""
    a, b = x.chunk(2, dim=-1)
    return F.silu(a) * b


@_registry.register(
    "triton",
    constraints=[_requires_triton_device("x"), _requires_dtype("x", _TRITON_DTYPES), _eager_only],
)
def _triton_backend(x):
    return _swiglu_fwd_op(x)


@_registry.register("torch")
@_registry.register("reference")
def _reference_backend(x):
    return swiglu_reference(x)


@custom_op("visionattn::swiglu_fwd")
def _swiglu_fwd_op(x: torch.Tensor) -> torch.Tensor:
    from ..kernels.swiglu import swiglu_fwd

    return swiglu_fwd(x)


@_swiglu_fwd_op.register_fake
def _(x):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@custom_op("visionattn::swiglu_bwd")
def _swiglu_bwd_op(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Gradient of x: ``[dy ⊙ b ⊙ SiLU'(a), dy ⊙ SiLU(a)]``."""
    from ..kernels.swiglu import swiglu_bwd

    return swiglu_bwd(dy, x)


@_swiglu_bwd_op.register_fake
def _(dy, x):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    (x,) = inputs
    ctx.save_for_backward(x)


def _backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return _swiglu_bwd_op(dy, x)  # slot: x


_swiglu_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def swiglu(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    r"""SwiGLU gating ``SiLU(a) ⊙ b`` of ``x = [a, b]`` split in halves along the last dim (gate first).

    Args:
        x: ``(..., 2H)``, e.g. the output of the MLP's fused first projection; rows may be strided (a unit last
            stride keeps them uncopied on the Triton backend).

    Other Parameters:
        backend: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``; fp16/bf16/fp32, fp32 math, one rounding to
            the dtype of ``x``), ``"reference"`` (plain PyTorch, any float dtype, rounds after SiLU like timm's eager
            ``GluMlp``), ``"torch"`` (the same PyTorch function, so that one backend name selects the PyTorch path of
            every ViG op) or None for Triton where it applies, else the reference.

    Returns:
        ``(..., H)`` in the dtype of ``x``, contiguous on the Triton backend.

    Raises:
        TypeError: a non-tensor or non-float ``x``.
        ValueError: ``x`` with no dims or an odd last dim, or an unknown ``backend``.
        NotImplementedError: ``backend="triton"`` on input it does not support.

    Example:
        >>> swiglu(torch.randn(2, 5, 64)).shape
        torch.Size([2, 5, 32])
    """
    _check_tensor("x", x)
    if x.ndim == 0 or x.shape[-1] % 2:
        raise ValueError(
            f"x must have at least 1 dim and an even last dim (the gate and value halves); got x.shape={tuple(x.shape)}."
        )
    return _registry.select(backend, {"x": x})(x)
