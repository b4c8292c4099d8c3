"""timm's ``RmsNorm`` computed by ``visionattn.ops.rms_norm``: same parameters, init and state dict, a Triton kernel
that normalises many short rows per program on CUDA (ViG's pre-norms over C = 192-768 channels)."""

import torch
from timm.layers import RmsNorm as _TimmRmsNorm
from timm.layers import register_notrace_module

from ..ops import rms_norm

__all__ = ["RmsNorm"]


# Leaf under torch.fx: the op validates its inputs in Python.
@register_notrace_module
class RmsNorm(_TimmRmsNorm):
    """``y = x · rsqrt(mean(x²) + eps) ⊙ w`` over the last dim (Zhang & Sennrich, NeurIPS 2019), always affine.

    A drop-in for ``timm.layers.RmsNorm(channels, eps)``: the one parameter is ``weight`` (ones at init), so
    checkpoints load unchanged; ``backend="reference"`` computes exactly what timm's module does (``F.rms_norm``).
    """

    def __init__(self, channels: int, eps: float = 1e-6, backend: str | None = None, device=None, dtype=None):
        """
        Args:
            channels: ``C``, the normalised (last) dim.
            eps: added to ``mean(x²)``.
            backend: backend of ``visionattn.ops.rms_norm`` (None: Triton where it applies, else ``F.rms_norm``).
        """
        super().__init__(channels, eps=eps, affine=True, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, eps=self.eps, backend=self.backend)
