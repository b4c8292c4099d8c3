"""``nn.LayerNorm`` and timm's ``LayerNorm2d`` computed by ``visionattn.ops.layer_norm``: same parameters, init and
state dict; at inference on CUDA a Triton kernel normalises many short rows per program (PyTorch's
``vectorized_layer_norm_kernel`` took 20-26 % of the MAViT-T / Agent-PVT-S forward at 1024 px, C = 64-512).

With a gradient, off CUDA, for inputs the kernel does not take, without an affine weight, over several dims, or with
timm's fast-norm flag, both modules compute exactly what their parent class does.
"""

import torch
from timm.layers import LayerNorm2d as _TimmLayerNorm2d
from timm.layers import register_notrace_module
from torch import nn

from ..ops import layer_norm

__all__ = ["LayerNorm", "LayerNorm2d"]


# Leaf under torch.fx: the op validates its inputs in Python.
@register_notrace_module
class LayerNorm(nn.LayerNorm):
    """``y = (x − μ) · rsqrt(var(x) + eps) ⊙ w + b`` over the last dim of ``(..., C)`` tokens (Ba et al., 2016).

    A drop-in for ``torch.nn.LayerNorm``: the parameters are ``weight`` (ones) and ``bias`` (zeros), so checkpoints
    load unchanged; ``backend="reference"`` computes exactly what the parent does (``F.layer_norm``).
    """

    def __init__(
        self,
        normalized_shape: int | tuple[int, ...],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        backend: str | None = None,
        device=None,
        dtype=None,
    ):
        """
        Args:
            normalized_shape: ``C`` (the op's path), or several trailing dims (the parent's path).
            eps: added to the variance.
            elementwise_affine: learn ``weight`` (and ``bias``); without it the parent's path.
            bias: learn ``bias``.
            backend: backend of ``visionattn.ops.layer_norm`` (None: Triton at inference on CUDA, else
                ``F.layer_norm``).
        """
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or len(self.normalized_shape) != 1:
            return super().forward(x)
        return layer_norm(x, self.weight, self.bias, eps=self.eps, backend=self.backend)


@register_notrace_module
class LayerNorm2d(_TimmLayerNorm2d):
    """timm's ``LayerNorm2d``: LayerNorm over the channels of ``(B, C, H, W)`` maps, same parameters and state dict.

    On a channels_last map the ``(B, H, W, C)`` permute view is contiguous rows, so ``visionattn.ops.layer_norm`` runs
    on it without a copy (the output is channels_last too); any other layout takes timm's path.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True, backend: str | None = None, **kwargs):
        """
        Args:
            num_channels: ``C``.
            eps: added to the variance.
            affine: learn ``weight`` and ``bias``; without it timm's path.
            backend: backend of ``visionattn.ops.layer_norm`` (None: Triton at inference on CUDA, else
                ``F.layer_norm``).
            **kwargs: ``nn.LayerNorm``'s ``bias``, ``device``, ``dtype``.
        """
        super().__init__(num_channels, eps=eps, affine=affine, **kwargs)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fast_norm or self.weight is None or not x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x)
        out = layer_norm(x.permute(0, 2, 3, 1), self.weight, self.bias, eps=self.eps, backend=self.backend)
        return out.permute(0, 3, 1, 2)
