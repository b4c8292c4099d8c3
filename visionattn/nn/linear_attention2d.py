"""Gated 2D linear attention of MAViT (MALA, arXiv 2507.00698) and RAVLT (RALA, arXiv 2411.07635).

Both papers share one module skeleton (qhfan/MALA ``AddLinearAttention``, qhfan/RALA ``GateLinearAttentionNoSilu``):
one ``qkvo`` projection gives queries, keys, values and an un-activated output gate ``o``; LePE is a depthwise 5x5
convolution of ``v`` on the grid; 2D RoPE rotates the numerator features only; the output is
``proj((attn(q, k, v) + LePE(v)) ⊙ o)``. The attention math itself is :func:`visionattn.ops.linear_attention`:

- ``kind="mala"``: ``out_i = β_i·φ(q̃_i)·S − z_i·v̄``, ``S = (s/N) Σ_j φ(k̃_j)ᵀ v_j``, ``z_i = s·φ(q_i)·mean_j φ(k_j)``,
  ``β_i = 1 + 1/(z_i + ε)`` (additive normalisation), ``s = d^-1/2``;
- ``kind="rala"``: keys re-weighted by ``α_j·N``, ``α = softmax_j(s·q̄·φ(k_j))`` with ``q̄ = mean_i φ(q_i)``, then
  ``out_i = φ(q̃_i)·S / (φ(q_i)·mean_j α_j N φ(k_j) + ε)`` (divisive normalisation),

where ``φ = ELU + 1`` and ``x̃`` is RoPE-rotated ``x``; normalisers and weights use un-rotated features.
"""

import torch
from torch import nn
from torch.nn.init import trunc_normal_, zeros_

from ..layout import TokenGrid
from ..ops import linear_attention
from .rope2d import RoPE2d, _check_grid_2d

__all__ = ["LinearAttention2d"]

#: ``kind`` -> keyword arguments of ``visionattn.ops.linear_attention`` (besides q, k, v, rope, scale).
_KINDS = {
    "mala": dict(feature_map="elu1", normalize="additive", key_weight=None),
    "rala": dict(feature_map="elu1", normalize="divisive", key_weight="rala"),
}


class _GatedAttention2d(nn.Module):
    """Parameters and reshapes shared by the linear and softmax token mixers of the MAViT/RAVLT skeleton.

    Subclasses define ``_attend(q, k, v, rope) -> (B, H, N, d)`` on ``(B, H, N, d)`` views, and ``_rope_pairs``: whether
    ``_attend`` takes RoPE tables with one angle per channel pair (``RoPE2d(pairs=True)``).
    """

    _rope_pairs = False

    def __init__(
        self,
        dim: int,
        num_heads: int,
        device=None,
        dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads must be a positive int dividing dim={dim}; got {num_heads=}.")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkvo = nn.Linear(dim, 4 * dim, **dd)
        self.lepe = nn.Conv2d(dim, dim, 5, padding=2, groups=dim, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.rope = RoPE2d(self.head_dim, pairs=self._rope_pairs)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference init: truncated normal (std 0.02) weights, zero biases."""
        for layer in (self.qkvo, self.lepe, self.proj):
            trunc_normal_(layer.weight, std=0.02)
            zeros_(layer.bias)

    def forward(
        self,
        x: torch.Tensor,
        grid: TokenGrid,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Mix ``x`` ``(B, N, C)`` laid out row-major on the 2D ``grid`` (``N = Y·X``).

        Args:
            x: tokens ``(B, N, C)``.
            grid: ``TokenGrid((Y, X))`` of the tokens.
            rope: precomputed ``(cos, sin)`` tables ``(N, head_dim)`` (a stage computes them once for all its
                blocks); linear attention also takes ``(N, head_dim / 2)`` pair tables (``RoPE2d(pairs=True)``,
                half the bytes for its kernels, what it computes from ``grid`` when None).

        Returns:
            ``(B, N, C)``.
        """
        rows, cols = _check_grid_2d(grid)
        batch, length, channels = x.shape
        if length != rows * cols or channels != self.dim:
            raise ValueError(
                f"x must be (B, N, C) with N = Y·X = {rows * cols} and C = {self.dim}; got x.shape={tuple(x.shape)}."
            )
        if rope is None:
            rope = self.rope(grid, x)
        qkvo = self.qkvo(x)
        q, k, v = (
            qkvo[..., i * channels : (i + 1) * channels].unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
            for i in range(3)
        )
        gate = qkvo[..., 3 * channels :]
        # LePE on a (B, C, Y, X) channels-last view of v (the conv may copy the strided slice).
        v_map = qkvo[..., 2 * channels : 3 * channels].unflatten(1, (rows, cols)).permute(0, 3, 1, 2)
        lepe = self.lepe(v_map).permute(0, 2, 3, 1).reshape(batch, length, channels)
        out = self._attend(q, k, v, rope).transpose(1, 2).reshape(batch, length, channels)
        return self.proj((out + lepe) * gate)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"


class LinearAttention2d(_GatedAttention2d):
    """Gated 2D linear attention with LePE and decoupled 2D RoPE: MALA (``kind="mala"``) or RALA (``kind="rala"``).

    Parameter names and shapes follow the official modules except that the 1x1 convolutions ``qkvo`` and ``proj``
    are ``nn.Linear`` on ``(B, N, C)`` tokens (the backbones' ``checkpoint_filter_fn`` squeezes their weights).
    """

    _rope_pairs = True  # the kernels then read half the table bytes

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kind: str = "mala",
        backend: str | None = None,
        device=None,
        dtype=None,
    ):
        """
        Args:
            dim: channels ``C``.
            num_heads: heads ``H`` (``C / H`` must be a multiple of 4 for 2D RoPE).
            kind: ``"mala"`` (magnitude-aware, additive normaliser) or ``"rala"`` (rank-augmented, key re-weighting).
            backend: ``visionattn.ops.linear_attention`` backend (None picks Triton on CUDA, else the reference).
            device: parameter device.
            dtype: parameter dtype.
        """
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {tuple(_KINDS)}; got {kind=}.")
        super().__init__(dim, num_heads, device=device, dtype=dtype)
        self.kind = kind
        self.backend = backend

    def _attend(self, q, k, v, rope):
        return linear_attention(q, k, v, rope=rope, scale=self.scale, backend=self.backend, **_KINDS[self.kind])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kind={self.kind!r}, backend={self.backend!r}"
