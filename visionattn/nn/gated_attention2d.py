"""Bidirectional gated linear attention on a 2D token grid, with ViG's 2D gating locality injection.

Liao et al., "ViG: Linear-complexity Visual Sequence Learning with Gated Linear Attention", AAAI 2025,
arXiv 2405.18425. Reference: github.com/hustvl/ViG, ``classification/models/vig.py`` ``GatedLinearAttention`` and
``vig_h.py`` ``GLA2D`` (MIT licence); re-implemented here, the attention itself runs through
``visionattn.ops.gated_linear_attention`` and the locality injection (both RMSNorms, the gate mix and ``out_act``)
through ``visionattn.ops.gated_norm``.

Shape legend: B batch, N = Y·X tokens of a (Y, X) grid in raster order, C channels, H heads,
Dk = key_dim / H, Dv = C / H.
"""

import torch
from timm.layers import RmsNorm, register_notrace_module
from torch import nn

from ..layout import TokenGrid
from ..ops import gated_linear_attention, gated_norm

__all__ = ["GatedLinearAttention2d"]

#: ViG's ``gate_logit_normalizer``: log forget gates are logsigmoid(.) / 16, so every gate starts close to 1.
_GATE_LOGIT_NORMALIZER = 16.0
#: Rank of ViG's low-rank forget-gate projection ``C -> 16 -> 2·key_dim``.
_GATE_LOW_RANK_DIM = 16
#: Gain of ViG's xavier-uniform init of the attention projections and the depthwise conv.
_XAVIER_GAIN = 2**-2.5


# Leaf under torch.fx: the grid arrives as a runtime value and forward validates shapes in Python.
@register_notrace_module
class GatedLinearAttention2d(nn.Module):
    """ViG's bidirectional gated linear attention (BiGLA) with direction-wise gates and 2D locality injection.

    With ``x_c = DWConv3x3(x)`` (optionally followed by SiLU), per head:

        o = (GLA→(q, k, v, α→) + GLA←(q, k, v, α←)) / 2,   y = W_o [σ(W_g x_c) ⊙ RMSNorm(o) + (1 − σ(W_g x_c)) ⊙ RMSNorm(x_c)]

    where q, k, v are linear in ``x_c`` (no feature map), ``log α = logsigmoid(W_α↑ W_α↓ x_c) / 16`` are two sets
    of per-token, per-key-channel forget gates (one per scan direction, from one low-rank projection), GLA→ scans the
    raster order and GLA← its reverse (ViG, Sec. 3.2-3.3, Eq. 5-8).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        key_dim: int | None = None,
        conv_act: bool = False,
        out_act: bool = False,
        norm_eps: float = 1e-6,
        backend: str | None = None,
        device=None,
        dtype=None,
    ):
        """
        Args:
            dim: channels ``C`` of the input and output; the value width is ``C`` too (ViG's ``expand_v = 1``),
                because the locality injection mixes the attention output with the conv features channel by channel.
            num_heads: heads ``H``; must divide ``dim`` and ``key_dim``.
            key_dim: total query/key width, default ``dim // 2`` (ViG's ``expand_k = 0.5``).
            conv_act: SiLU after the depthwise conv (ViG-T's ``use_act_in_conv``).
            out_act: SiLU before the output projection (ViG-T's ``use_out_act``).
            norm_eps: eps of the two per-head RMSNorms.
            backend: backend of ``gated_linear_attention`` and of ``gated_norm`` (the fused RMSNorms, gate mix and
                ``out_act``; ``"torch"`` is plain PyTorch there); None picks the Triton kernels where they apply.
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        key_dim = dim // 2 if key_dim is None else key_dim
        if num_heads < 1 or dim % num_heads or key_dim % num_heads:
            raise ValueError(
                f"num_heads must divide dim and key_dim; got num_heads={num_heads}, dim={dim}, key_dim={key_dim}."
            )
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.backend = backend
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False, **dd)
        self.conv_act = nn.SiLU() if conv_act else nn.Identity()
        self.qkv = nn.Linear(dim, 2 * key_dim + dim, bias=False, **dd)
        self.forget_gate = nn.Sequential(
            nn.Linear(dim, _GATE_LOW_RANK_DIM, bias=False, **dd),
            nn.Linear(_GATE_LOW_RANK_DIM, 2 * key_dim, bias=True, **dd),
        )
        self.out_gate = nn.Linear(dim, dim, bias=True, **dd)
        # hold the weights (and eps) of the two per-head RMSNorms, which ops.gated_norm applies fused with the mix
        self.norm_attn = RmsNorm(dim // num_heads, eps=norm_eps, **dd)
        self.norm_local = RmsNorm(dim // num_heads, eps=norm_eps, **dd)
        self.out_act = out_act
        self.proj = nn.Linear(dim, dim, bias=False, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """ViG's init: xavier-uniform (gain 2^-2.5) projections and conv, zero biases, unit norm weights."""
        for layer in (self.dwconv, self.qkv, self.forget_gate[0], self.forget_gate[1], self.out_gate, self.proj):
            nn.init.xavier_uniform_(layer.weight, gain=_XAVIER_GAIN)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        self.norm_attn.reset_parameters()
        self.norm_local.reset_parameters()

    def forward(self, x: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
        """
        Args:
            x: ``(B, N, C)`` tokens of ``grid`` in raster order.
            grid: the 2D ``TokenGrid((Y, X))`` of the tokens, without extra tokens.

        Returns:
            ``(B, N, C)``.

        Raises:
            ValueError: ``grid`` is not a plain 2D grid, or ``x`` does not have ``grid.num_tokens`` tokens of
                ``dim`` channels.
        """
        if grid.ndim != 2 or grid.extra_before or grid.extra_after:
            raise ValueError(f"grid must be a 2D TokenGrid without extra tokens; got grid={grid}.")
        batch, length, dim = x.shape if x.ndim == 3 else (None, None, None)
        if length != grid.num_tokens or dim != self.proj.out_features:
            raise ValueError(
                f"x must be (B, {grid.num_tokens}, {self.proj.out_features}) for {grid}; got x.shape={tuple(x.shape)}."
            )
        heads, height, width = self.num_heads, *grid.shape
        # (B, N, C) viewed as a channels_last (B, C, Y, X) image: the depthwise conv needs no copy in either direction.
        local = self.dwconv(x.reshape(batch, height, width, dim).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        local = self.conv_act(local.reshape(batch, length, dim))

        q, k, v = self.qkv(local).split([self.key_dim, self.key_dim, dim], dim=-1)
        # The op turns the logits into log gates logsigmoid(x) / 16 in fp32 where it reads them (about -0.04 each; their
        # sums over thousands of tokens set the decay), so no fp32 gate tensor is materialised here.
        logits_fwd, logits_bwd = self.forget_gate(local).chunk(2, dim=-1)
        to_heads = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)
        # ViG's reference divides this average by 2 once more at inference only (vig.py eval branch, `o /= 2`), not
        # in training; RMSNorm follows, so the extra factor only turns the norm's eps into 4·eps. We keep the
        # training semantics (the function the released weights were optimised for) in both modes, as vig_h.py does.
        out = gated_linear_attention(
            to_heads(q),
            to_heads(k),
            to_heads(v),
            to_heads(logits_fwd),
            to_heads(logits_bwd),
            gate_normalizer=_GATE_LOGIT_NORMALIZER,
            backend=self.backend,
        )
        out = out.transpose(1, 2).to(local.dtype)  # (B, N, H, Dv)

        mixed = gated_norm(
            out,
            local.unflatten(-1, (heads, -1)),
            self.out_gate(local).unflatten(-1, (heads, -1)),
            self.norm_attn.weight,
            self.norm_local.weight,
            eps=self.norm_attn.eps,
            silu=self.out_act,
            backend=self.backend,
        )
        return self.proj(mixed.flatten(2))
