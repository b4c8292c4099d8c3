"""timm's ``GluMlp`` whose SwiGLU gating runs on ``visionattn.ops.swiglu``: same constructor, parameters, init and
state dict, and one fused Triton pass instead of two strided elementwise passes on CUDA (ViG's MLP)."""

import torch
from timm.layers import GluMlp as _TimmGluMlp
from timm.layers import register_notrace_module
from torch import nn

from ..ops import swiglu

__all__ = ["GluMlp"]


# Leaf under torch.fx: the op validates its inputs in Python.
@register_notrace_module
class GluMlp(_TimmGluMlp):
    """GLU MLP ``fc2(norm(drop(act(x1) ⊙ x2)))`` with ``[x1, x2] = fc1(x)`` (Dauphin et al. 2017; Shazeer,
    arXiv 2002.05202), a drop-in for ``timm.layers.GluMlp``.

    With ``act_layer=nn.SiLU``, ``gate_last=False`` and linear (not 1x1 conv) layers, i.e. SwiGLU with the gate in
    the first half, the gating is :func:`visionattn.ops.swiglu` (dropout and norm still follow it); any other
    configuration runs timm's forward unchanged.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.Sigmoid,
        norm_layer: type[nn.Module] | None = None,
        bias: bool | tuple[bool, bool] = True,
        drop: float | tuple[float, float] = 0.0,
        use_conv: bool = False,
        gate_last: bool = True,
        backend: str | None = None,
        device=None,
        dtype=None,
    ):
        """
        Args:
            in_features: input channels.
            hidden_features: outputs of ``fc1`` (both halves; even), default ``in_features``.
            out_features: output channels, default ``in_features``.
            act_layer: activation of the gate half.
            norm_layer: optional norm over the ``hidden_features // 2`` gated channels.
            bias: biases of ``fc1`` and ``fc2`` (one bool for both, or a pair).
            drop: dropout after the gating and after ``fc2`` (one rate or a pair).
            use_conv: 1x1 convs over NCHW instead of linears over ``(..., C)``.
            gate_last: the gate is the second half of ``fc1``'s outputs (timm's default) instead of the first.
            backend: backend of ``visionattn.ops.swiglu`` (None: Triton where it applies, else the timm formula).
        """
        super().__init__(
            in_features,
            hidden_features,
            out_features,
            act_layer=act_layer,
            norm_layer=norm_layer,
            bias=bias,
            drop=drop,
            use_conv=use_conv,
            gate_last=gate_last,
            device=device,
            dtype=dtype,
        )
        self.backend = backend

    @property
    def fused(self) -> bool:
        """True when the gating is SwiGLU with the gate first over the last dim, the case the op computes."""
        return type(self.act) is nn.SiLU and not self.gate_last and self.chunk_dim == -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return super().forward(x)
        x = swiglu(self.fc1(x), backend=self.backend)
        return self.drop2(self.fc2(self.norm(self.drop1(x))))
