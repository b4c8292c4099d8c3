"""BiFormer's bi-level routing attention as block-sparse attention over region blocks, and its full-attention stage.

Zhu, Wang, Ke, Zhang, Lau, "BiFormer: Vision Transformer with Bi-Level Routing Attention", CVPR 2023
(arXiv 2303.08810); reference code rayleizhu/BiFormer (MIT), ``ops/bra_legacy.py`` (``BiLevelRoutingAttention``,
the version of the released checkpoints) and ``models/_common.py`` (``AttentionLePE``).
"""

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..layout import BlockMask, TokenGrid, TokenLayout, topk_routing_block_mask
from ..ops import block_sparse_attention, routed_attention
from ..ops.routed import MAX_TRITON_REGION

__all__ = ["BiLevelRoutingAttention", "LePEAttention"]


def _to_regions(x: torch.Tensor, regions: int) -> torch.Tensor:
    """``(B, Y, X, C)`` raster map -> ``(B, Y*X, C)`` in region (tile) order: regions row-major, tokens row-major
    inside a region. This is ``TokenLayout(grid, tile=region).to_layout`` for a grid the regions divide, done as
    one reshape-permute instead of an index gather."""
    batch, height, width, channels = x.shape
    x = x.view(batch, regions, height // regions, regions, width // regions, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, height * width, channels)


def _from_regions(x: torch.Tensor, regions: int, height: int, width: int) -> torch.Tensor:
    """Inverse of ``_to_regions``: ``(B, Y*X, C)`` region order -> ``(B, Y, X, C)`` raster map."""
    batch, _, channels = x.shape
    x = x.view(batch, regions, regions, height // regions, width // regions, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, height, width, channels)


def _heads_from_regions(x: torch.Tensor, regions: int, height: int, width: int) -> torch.Tensor:
    """``(B, heads, Y*X, D)`` in region order -> ``(B, Y, X, heads*D)`` raster map, in one copy."""
    batch, heads, _, dim = x.shape
    x = x.view(batch, heads, regions, regions, height // regions, width // regions, dim)
    return x.permute(0, 2, 4, 3, 5, 1, 6).reshape(batch, height, width, heads * dim)


class _RasterHeads(torch.autograd.Function):
    """The ``(B, Y, X, 3C)`` qkv projection -> q, k, v as ``(B, heads, Y, X, D)`` strided views. The backward
    writes the three gradients into one ``(B, Y, X, 3C)`` tensor in one copy (autograd's unbind -> permute -> view
    chain stacks them and then copies the permuted stack again)."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: int):
        batch, height, width, _ = qkv.shape
        return qkv.view(batch, height, width, 3, heads, -1).permute(3, 0, 4, 1, 2, 5).unbind(0)

    @staticmethod
    def backward(ctx, *grads):
        like = next(g for g in grads if g is not None)
        grads = [torch.zeros_like(like) if g is None else g for g in grads]
        stacked = torch.stack([g.permute(0, 2, 3, 1, 4) for g in grads], dim=3)  # (B, Y, X, 3, heads, D)
        return stacked.flatten(3), None


@functools.lru_cache(maxsize=8)
def _region_grid(n_win: int) -> TokenLayout:
    """The ``n_win x n_win`` grid of regions, one token (one block) per region."""
    return TokenLayout(TokenGrid((n_win, n_win)), tile=(1, 1))


class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention (BiFormer): top-k region routing, then token attention inside the routed regions.

    The ``Y x X`` map (zero-padded at the bottom/right to a multiple of ``n_win``, before the projection, as the
    reference's ``auto_pad`` does) is cut into ``n_win x n_win`` regions. With region means ``Q^r``, ``K^r`` of the
    projected queries and keys, each query region routes to ``I^r = topkIndex(Q^r K^rᵀ)`` (not differentiable) and
    its tokens attend to the tokens of those regions:

        O = softmax(s · Q K_gᵀ) V_g + LePE(V),   then the output projection,

    ``K_g, V_g`` the keys/values of the routed regions (paper Eqs. 2-6). Regions of at most
    ``routed_max_region`` tokens (every stage of the ImageNet models up to ~900 px) run ``routed_attention``
    on strided views of the raster qkv projection; larger ones run ``block_sparse_attention`` over one block per
    region in region (tile) order. Both read K/V in place (the reference gathers a top-k-fold copy of them).
    Checkpoint quirks kept: one routing shared by all heads, ``s = dim ** -0.5`` (the full channel
    dimension, not the head dimension), LePE is a depthwise conv of V. ``forward`` takes ``(B, N, C)`` tokens in
    raster order plus their ``TokenGrid``.
    """

    #: Largest region (tokens) of the ``routed_attention`` path (at most its Triton limit); 0 sends every region
    #: size through ``block_sparse_attention`` (the previous path, kept for large regions and for A/B benchmarks).
    routed_max_region: int = MAX_TRITON_REGION

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        n_win: int = 7,
        topk: int = 4,
        side_dwconv: int = 5,
        qkv_bias: bool = True,
        backend: str | None = None,
        device=None,
        dtype=None,
    ):
        """
        Args:
            dim: channels ``C`` (queries/keys use all of them, ``qk_dim = dim`` as in every released model).
            num_heads: heads; ``dim`` must divide evenly.
            n_win: regions per side (7 for ImageNet; the reference's detection/segmentation configs use 16/8).
            topk: routed key regions per query region.
            side_dwconv: kernel of the LePE depthwise convolution on V.
            qkv_bias: bias in the qkv projection.
            backend: ``block_sparse_attention`` backend (None: Triton on CUDA, else the reference).
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads; got {dim=}, {num_heads=}.")
        if n_win < 1 or topk < 1:
            raise ValueError(f"n_win and topk must be >= 1; got {n_win=}, {topk=}.")
        self.num_heads = num_heads
        self.n_win = n_win
        self.topk = topk
        self.scale = dim**-0.5  # the reference's scale: full channel dim (kept for its checkpoints)
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim, **dd)
        self.proj = nn.Linear(dim, dim, **dd)

    def forward(self, x: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
        """``x`` ``(B, Y*X, C)`` raster tokens of ``grid`` ``(Y, X)`` -> ``(B, Y*X, C)``."""
        batch, num_tokens, channels = x.shape
        height, width = grid.shape
        if grid.num_tokens != num_tokens or grid.extra_before or grid.extra_after:
            raise ValueError(f"grid must be the (Y, X) grid of x's {num_tokens} tokens; got {grid=}.")
        s = self.n_win
        pad_y, pad_x = (-height) % s, (-width) % s
        x = x.view(batch, height, width, channels)
        if pad_y or pad_x:
            x = F.pad(x, (0, 0, 0, pad_x, 0, pad_y))
        padded_h, padded_w = height + pad_y, width + pad_x

        if (padded_h // s) * (padded_w // s) <= self.routed_max_region:
            return self._forward_routed(x, height, width)
        q, k, v = self.qkv(_to_regions(x, s)).chunk(3, dim=-1)  # (B, N, C) each, region order
        heads = lambda t: t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, heads, N, D) view
        if q.device.type == "meta":
            # shapes only: the routing is a data-dependent top-k that meta tensors cannot evaluate
            out = torch.empty_like(heads(q))
        else:
            mask = self._routing_mask(q, k, padded_h * padded_w)
            out = block_sparse_attention(heads(q), heads(k), heads(v), mask, scale=self.scale, backend=self.backend)
        v_map = _from_regions(v, s, padded_h, padded_w).permute(0, 3, 1, 2)
        out = _heads_from_regions(out, s, padded_h, padded_w) + self.lepe(v_map).permute(0, 2, 3, 1)
        out = self.proj(out)[:, :height, :width]
        return out.reshape(batch, num_tokens, channels)

    def _forward_routed(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The small-region path: qkv in raster order, fused region pooling, top-k on the device and
        ``routed_attention`` reading q/k/v as strided views of the projection (no tile-order copies, no mask)."""
        batch, padded_h, padded_w, channels = x.shape
        qkv = self.qkv(x)  # (B, Y, X, 3C) raster
        heads = _RasterHeads.apply(qkv, self.num_heads)
        if qkv.device.type == "meta":
            # shapes only: the routing is a top-k of values that meta tensors do not have
            out = torch.empty_like(qkv[..., :channels])
        else:
            # q, k, v: (B, heads, Y, X, D) strided views
            regions = self._route(qkv)  # distinct in-range ids by construction (top-k): no check, no host sync
            out = routed_attention(
                *heads, regions, n_win=self.n_win, scale=self.scale, backend=self.backend, check_regions=False
            )
            out = out.permute(0, 2, 3, 1, 4).reshape(batch, padded_h, padded_w, channels)  # a view for the kernel
        # V as a (B, C, Y, X) view: its gradient joins dV before the qkv gradient is assembled
        v_map = heads[2].permute(0, 1, 4, 2, 3).reshape(batch, channels, padded_h, padded_w)
        out = self.proj(out + self.lepe(v_map).permute(0, 2, 3, 1))[:, :height, :width]
        return out.reshape(batch, height * width, channels)

    def _route(self, qkv: torch.Tensor) -> torch.Tensor:
        """``(B, n_win², topk)`` routed key regions of each query region: top-k of ``Q^r K^rᵀ`` (region sums instead
        of means: a positive factor, same order), both region reductions in one fp32 pass over the raster map."""
        batch, height, width, channels3 = qkv.shape
        s, channels = self.n_win, channels3 // 3
        pooled = qkv.detach()[..., : 2 * channels].view(batch, s, height // s, s, width // s, 2 * channels)
        pooled = pooled.sum((2, 4), dtype=torch.float32).flatten(1, 2)  # (B, n_win², 2C)
        q_r, k_r = pooled.split(channels, dim=-1)
        with torch.autocast(qkv.device.type, enabled=False):  # fp32 scores under AMP too: fewer near-ties
            return torch.bmm(q_r, k_r.transpose(1, 2)).topk(self.topk, dim=-1).indices

    def _routing_mask(self, q: torch.Tensor, k: torch.Tensor, num_tokens: int) -> BlockMask:
        """Region-level top-k routing as a token-level ``BlockMask`` with one block per region.

        The region means are taken here with one fp32 reduction each and routed by ``topk_routing_block_mask`` on a
        grid of one-token regions; the resulting CSR (block ``r`` = region ``r``) is then re-declared with
        region-sized blocks. Same mask as routing ``q``/``k`` on the region layout directly, without the builder's
        full-size fp32 copies of ``q`` and ``k``.
        """
        regions = self.n_win**2
        means = [t.detach().unflatten(1, (regions, -1)).mean(2, dtype=torch.float32) for t in (q, k)]
        routed = topk_routing_block_mask(*means, _region_grid(self.n_win), self.topk)
        block = num_tokens // regions
        csr = routed.indptr, routed.indices, routed.partial
        # the region grid has no padding, so no block is partial (skips the per-call `partial.any()` host sync), and
        # every row keeps top-k blocks
        return BlockMask(*csr, num_tokens, num_tokens, block, block, _no_partial=True, _uniform_rows=True)


class LePEAttention(nn.Module):
    """Full softmax attention plus a depthwise-conv LePE of the input: BiFormer's last stage (``topk=-2``).

    ``O = softmax(QKᵀ / sqrt(d)) V + DWConv(x)``, then the output projection. As in the reference's
    ``AttentionLePE`` the LePE convolves the block's (normed) input ``x``, not V, and the qkv projection has no
    bias. Runs through ``F.scaled_dot_product_attention``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        side_dwconv: int = 5,
        qkv_bias: bool = False,
        device=None,
        dtype=None,
    ):
        """
        Args:
            dim: channels.
            num_heads: heads (the released models build this module without passing theirs: always 8).
            side_dwconv: kernel of the LePE depthwise convolution.
            qkv_bias: bias in the qkv projection.
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads; got {dim=}, {num_heads=}.")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim, **dd)
        self.proj = nn.Linear(dim, dim, **dd)

    def forward(self, x: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
        """``x`` ``(B, Y*X, C)`` raster tokens of ``grid`` -> ``(B, Y*X, C)``."""
        batch, num_tokens, channels = x.shape
        height, width = grid.shape
        q, k, v = self.qkv(x).view(batch, num_tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, num_tokens, channels)
        x_map = x.transpose(1, 2).reshape(batch, channels, height, width)
        return self.proj(out + self.lepe(x_map).flatten(2).transpose(1, 2))
