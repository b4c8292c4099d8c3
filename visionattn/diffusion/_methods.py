"""The attention call of each method, as a strategy object the per-model processors hold (one instance per layer).

Shape legend: ``B`` batch, ``H`` heads, ``N`` tokens (text and grid, in the model's order), ``D`` head dim;
grid axes ``(Y, X)`` for images, ``(T, Y, X)`` for videos.

A method is an ``nn.Module`` so that learnable parts (SLA's ``proj``, LinFusion's feature projections) live in the
model's ``state_dict`` under ``<attention module>.processor.method.*``. ``forward(q, k, v, grid, state)`` takes raster
order ``(B, H, N, D)`` tensors (views are fine) and a ``TokenGrid`` whose ``extra_before``/``extra_after`` are the text
tokens, and returns ``(out, density)``: ``out`` ``(B, H, N, D)`` and the fraction of query-key pairs computed with
exact softmax (a float or 0-d tensor; ``None`` when it means nothing, e.g. linear attention).
"""

import math
from typing import ClassVar

import torch
from torch import nn

from ..layout import TokenGrid, TokenLayout, circular_window_block_mask
from ..layout.radial import radial_block_mask
from ..nn import SparseLinearAttention
from ..ops import agent_attention, block_sparse_attention, linear_attention, neighborhood_attention
from ..ops._checks import _check_choice, _check_per_axis
from ..ops.neighborhood import default_neighborhood_tile
from ._agent import agent_tokens

__all__ = ["AgentMethod", "LinearMethod", "LocalMethod", "RadialMethod", "SparseLinearMethod"]


def _rotate_text_last(grid: TokenGrid, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Move text tokens that precede the grid to after it (attention is equivariant to this permutation)."""
    n = grid.extra_before
    return tuple(torch.cat([t[:, :, n:], t[:, :, :n]], dim=2) for t in tensors)


def _rotate_text_first(grid: TokenGrid, out: torch.Tensor) -> torch.Tensor:
    n = out.shape[2] - grid.extra_before
    return torch.cat([out[:, :, n:], out[:, :, :n]], dim=2)


def _pair_density(grid: TokenGrid, grid_pairs: float) -> float:
    """Density of a pattern where text tokens attend/are attended by all and grid pairs number ``grid_pairs``."""
    n, g = grid.num_tokens, grid.num_grid_tokens
    text = grid.extra_before + grid.extra_after
    return (grid_pairs + 2 * g * text + text * text) / (n * n)


class _AttentionMethod(nn.Module):
    """Base of the method strategies; ``name`` is the string ``apply`` takes."""

    name: ClassVar[str]

    def check_model(self, model_name: str, grid_ndim: int, is_video: bool) -> None:
        """Raise ``ValueError`` saying why this method does not fit the model; default: fits every model."""


class LocalMethod(_AttentionMethod):
    """Local attention on the latent grid; text tokens stay global (they attend to all and all attend to them).

    Two windows: NATTEN/GNA neighborhood attention (``window="neighborhood"``, Hassani et al., arXiv 2504.16922:
    per-axis ``kernel_size``, ``stride``, ``dilation``, windows shifted inward at borders) or CLEAR's circular window
    (``window="circle"``, Liu et al., arXiv 2412.16112: image query ``q`` attends image key ``k`` iff
    ``‖q − k‖² < radius²``). A window larger than a grid axis covers the whole axis (UNet levels and small latents).

    Args:
        kernel_size: neighborhood size, an int or one int per grid axis (neighborhood window).
        stride: neighborhood stride per axis (GNA's strided NA; ``stride == kernel_size`` is blocked attention).
        dilation: neighborhood dilation per axis.
        window: ``"neighborhood"`` or ``"circle"``.
        radius: circle radius in latent tokens (circle window).
        tile: tile shape of the kernels' token order, one int per grid axis; ``None`` is 128-token boxes
            (``(8, 16)`` in 2D, ``(2, 8, 8)`` in 3D). Any tile gives the same result; it only changes speed.
        backend: op backend (``None`` picks Triton on CUDA, the reference on CPU).
    """

    name = "local"

    def __init__(
        self,
        *,
        kernel_size: int | tuple[int, ...] | None = None,
        stride: int | tuple[int, ...] = 1,
        dilation: int | tuple[int, ...] = 1,
        window: str = "neighborhood",
        radius: float | None = None,
        tile: int | tuple[int, ...] | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        self.window = _check_choice("window", window, ("neighborhood", "circle"))
        if window == "neighborhood" and kernel_size is None:
            raise ValueError("kernel_size must be given for window='neighborhood'; got kernel_size=None.")
        if window == "circle" and (radius is None or isinstance(radius, bool) or not radius > 0):
            raise ValueError(f"radius must be a positive number for window='circle'; got {radius=}.")
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        self.radius, self.tile, self.backend = radius, tile, backend

    def check_model(self, model_name: str, grid_ndim: int, is_video: bool) -> None:
        names = ("kernel_size", "stride", "dilation") if self.window == "neighborhood" else ()
        for name in names + (("tile",) if self.tile is not None else ()):
            _check_per_axis(name, grid_ndim, getattr(self, name))

    def _window(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Per-axis ``(kernel_size, stride, dilation)`` clamped to the grid so the window fits every axis."""
        ndim = len(shape)
        ks = _check_per_axis("kernel_size", ndim, self.kernel_size)
        st = _check_per_axis("stride", ndim, self.stride)
        dil = _check_per_axis("dilation", ndim, self.dilation)
        ks = tuple(min(k, s) for k, s in zip(ks, shape))
        dil = tuple(max(1, min(d, s // k)) for d, s, k in zip(dil, shape, ks))
        st = tuple(min(t, k) for t, k in zip(st, ks))
        return ks, st, dil

    def forward(self, q, k, v, grid: TokenGrid, state):
        if self.window == "circle":
            return self._circle(q, k, v, grid, state)
        ks, st, dil = self._window(grid.shape)
        out = neighborhood_attention(q, k, v, grid, ks, st, dil, tile=self.tile, backend=self.backend)
        g = grid.num_grid_tokens
        return out, _pair_density(grid, g * g * math.prod(k / s for k, s in zip(ks, grid.shape)))

    def _circle(self, q, k, v, grid: TokenGrid, state):
        tile = (
            default_neighborhood_tile(grid.shape)
            if self.tile is None
            else _check_per_axis("tile", grid.ndim, self.tile)
        )
        layout = TokenLayout(grid, tile=tile)
        mask = state.cached(
            ("circle", self.radius, layout, q.device),
            lambda: circular_window_block_mask(layout, self.radius).to(q.device),
        )
        source, valid, out_slot = state.cached(("tile_order", layout, q.device), lambda: _tile_order(layout, q.device))
        # padding slots hold zeros; the mask never attends to them and their outputs are dropped
        q, k, v = (t.index_select(2, source) * valid.to(t.dtype) for t in (q, k, v))
        out = block_sparse_attention(q, k, v, mask, backend=self.backend)
        return out.index_select(2, out_slot), mask.density()


def _tile_order(layout: TokenLayout, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather indices into ``layout``'s tile order (``source``, ``valid`` ``(N_layout, 1)``) and back (``out_slot``)."""
    index = layout.source_index()
    slots = torch.nonzero(index >= 0).squeeze(-1)
    out_slot = slots[torch.argsort(index[slots])]
    return index.clamp_min(0).to(device), (index >= 0)[:, None].to(device), out_slot.to(device)


class RadialMethod(_AttentionMethod):
    """Radial Attention's static O(n log n) spatiotemporal mask (Li et al., arXiv 2506.19852), for video DiTs.

    The mask is ``visionattn.layout.radial_block_mask`` (the reference's ``gen_log_mask_shrinked``): frame pairs at
    temporal distance ``d`` keep a band of width ``max(2^⌈log2 tpf⌉ / 2^g · δ, block)`` with ``g = bit_length(d)``,
    near frames and (Wan) the first frame are dense, text rows and columns are dense. Pair it with the schedule of
    the reference (``dense_layers``, ``dense_steps`` of ``apply``).

    Args:
        decay_factor: ``δ``; the reference uses 0.2 (Wan 1x), 0.95 (HunyuanVideo).
        block_size: mask block size (the reference uses 128, or 64; smaller blocks make finer masks of tiny
            test grids).
        sink: keep the attention sink (every frame attends the first frame); ``None`` uses the reference's choice
            per model (on for Wan, off otherwise).
        backend: op backend.
    """

    name = "radial"

    def __init__(
        self,
        *,
        decay_factor: float = 1.0,
        block_size: int = 128,
        sink: bool | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        self.block_size = _check_per_axis("block_size", 1, block_size)[0]
        if isinstance(decay_factor, bool) or not isinstance(decay_factor, (int, float)) or not decay_factor > 0:
            raise ValueError(f"decay_factor must be a positive float; got {decay_factor=}.")
        self.decay_factor, self.sink, self.backend = float(decay_factor), sink, backend

    def check_model(self, model_name: str, grid_ndim: int, is_video: bool) -> None:
        if not is_video:
            raise ValueError(
                f"method='radial' needs a video model (its mask decays with temporal distance between frames); "
                f"{model_name} generates images. Use method='local' for a spatial window on images."
            )
        if self.sink is None:
            self.sink = model_name == "WanTransformer3DModel"

    def forward(self, q, k, v, grid: TokenGrid, state):
        frames = grid.shape[0]
        text = grid.extra_before + grid.extra_after
        key = ("radial", frames, grid.num_grid_tokens, text, self.block_size, self.decay_factor, self.sink, q.device)
        mask = state.cached(
            key,
            lambda: radial_block_mask(
                frames,
                grid.num_grid_tokens // frames,
                block_size=self.block_size,
                decay_factor=self.decay_factor,
                sink=self.sink,
                extra_tokens=text,
            ).to(q.device),
        )
        if grid.extra_before:
            q, k, v = _rotate_text_last(grid, q, k, v)
        out = block_sparse_attention(q, k, v, mask, backend=self.backend)
        if grid.extra_before:
            out = _rotate_text_first(grid, out)
        return out, mask.density()


class SparseLinearMethod(_AttentionMethod):
    """SLA (Zhang et al., arXiv 2509.24006): softmax on each query block's top-k key blocks, linear attention on the
    rest, ``o = o_sparse + proj(o_linear)``, held as one ``visionattn.nn.SparseLinearAttention`` per layer.

    ``proj`` starts at zero (a fresh layer is block-sparse attention) and lives in the model's ``state_dict`` as
    ``<attention module>.processor.method.attention.proj.*``. The block map is computed from q and k on every call,
    over the whole joint sequence (text tokens included), as TurboDiffusion applies SLA to Wan's self-attention.

    Args:
        head_dim: ``D``.
        topk: fraction of key blocks attended with softmax (TurboDiffusion: 0.1, 0.15 for quality).
        feature_map: ``φ`` of the linear branch: ``"softmax"`` (SLA's default), ``"elu1"`` or ``"relu"``.
        block_q: tokens per query block (SLA: 64, or 128 in TurboDiffusion).
        block_k: tokens per key block (SLA: 64).
        skip_ratio: fraction of key blocks skipped by both branches (the paper's negligible blocks; SLA's code: 0).
        backend: op backend.
    """

    name = "sparse_linear"

    def __init__(
        self,
        head_dim: int,
        *,
        topk: float = 0.1,
        feature_map: str = "softmax",
        block_q: int = 64,
        block_k: int = 64,
        skip_ratio: float = 0.0,
        backend: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.attention = SparseLinearAttention(
            head_dim,
            topk,
            feature_map=feature_map,
            block_q=block_q,
            block_k=block_k,
            skip_ratio=skip_ratio,
            backend=backend,
            device=device,
            dtype=dtype,
        )

    def forward(self, q, k, v, grid: TokenGrid, state):
        # SLA keeps the same number of key blocks in every query block, so the density needs no device sync
        blocks = -(-k.shape[2] // self.attention.block_k)
        return self.attention(q, k, v), min(blocks, int(self.attention.topk * blocks)) / blocks


class _FeatureProjection(nn.Module):
    """LinFusion's ``f(x) = Linear → LayerNorm → LeakyReLU → Linear``, last layer zero-initialised (``f = 0`` at start)."""

    def __init__(self, dim: int, mid_dim: int, *, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(dim, mid_dim, **dd)
        self.norm = nn.LayerNorm(mid_dim, **dd)
        self.act = nn.LeakyReLU()
        self.fc2 = nn.Linear(mid_dim, dim, **dd)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.norm(self.fc1(x))))


class LinearMethod(_AttentionMethod):
    """LinFusion's generalized linear attention (Liu et al., arXiv 2409.02097), mean-normalised and non-causal.

    ``q̂ = q + f_q(q)``, ``k̂ = k + f_k(k)``, ``O = φ(q̂)·((1/N) Σ_j φ(k̂_j) v_jᵀ) / (φ(q̂)·(1/N) Σ_j φ(k̂_j) + ε)`` with
    ``φ = elu + 1``. LinFusion applies its projections ``f`` to the hidden states before ``W_q``/``W_k``; here they
    act per head on ``q``/``k`` after the model's QK-norm and RoPE, so one strategy serves every processor (UNet and
    DiTs). ``f``'s last layer starts at zero, so training starts from plain ``elu + 1`` linear attention.

    Args:
        head_dim: ``D``.
        mid_dim: hidden width of ``f`` (LinFusion: the input width, here ``D``).
        eps: ``ε`` (LinFusion: 1e-4).
        backend: op backend.
    """

    name = "linear"

    def __init__(
        self,
        head_dim: int,
        *,
        mid_dim: int | None = None,
        eps: float = 1e-4,
        backend: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.q_proj = _FeatureProjection(head_dim, mid_dim or head_dim, **dd)
        self.k_proj = _FeatureProjection(head_dim, mid_dim or head_dim, **dd)
        self.eps, self.backend = eps, backend

    def forward(self, q, k, v, grid: TokenGrid, state):
        q = q + self.q_proj(q)
        k = k + self.k_proj(k)
        out = linear_attention(q, k, v, feature_map="elu1", normalize="divisive", eps=self.eps, backend=self.backend)
        return out, None


class AgentMethod(_AttentionMethod):
    """AgentSD's agent attention (Han et al., ECCV 2024, arXiv 2312.08874, §5), diffusers-compatible.

    Agents ``A`` are the queries after ToMe's bipartite soft matching merges ``agent_ratio·N`` grid tokens into one
    destination token per ``sy × sx`` window (``_agent.agent_tokens``; AgentSD merges the hidden states and projects
    them with ``W_q``, which is the same for a bias-free ``W_q`` and equal up to QK-norm/RoPE otherwise). Then
    ``O = σ(q Aᵀ s^κ) · σ(A kᵀ s) v + k_shortcut · v`` with ``s = D^-1/2`` and ``κ = k_scale2`` (a softer temperature
    for the query-to-agent step). As in AgentSD, layers with too few tokens (``2 n ≥ N``) keep dense attention.
    AgentSD's recommended schedule uses fewer agents early: ``early_steps=20`` with ``early_sx = early_sy = 4``,
    ``early_agent_ratio=0.95``, then ``sx = sy = 2``, ``agent_ratio=0.5``.

    Args:
        agent_ratio: fraction of grid tokens merged away (capped at the non-destination tokens).
        sx: window width of the destination grid.
        sy: window height of the destination grid.
        k_scale2: ``κ``.
        k_shortcut: weight of the value shortcut.
        early_steps: denoising steps that use the ``early_*`` settings instead (0: none).
        early_agent_ratio: ``agent_ratio`` of the early steps.
        early_sx: ``sx`` of the early steps.
        early_sy: ``sy`` of the early steps.
        backend: op backend.
    """

    name = "agent"

    def __init__(
        self,
        *,
        agent_ratio: float = 0.5,
        sx: int = 2,
        sy: int = 2,
        k_scale2: float = 0.3,
        k_shortcut: float = 0.075,
        early_steps: int = 0,
        early_agent_ratio: float = 0.95,
        early_sx: int = 4,
        early_sy: int = 4,
        backend: str | None = None,
    ):
        super().__init__()
        for name, ratio in (("agent_ratio", agent_ratio), ("early_agent_ratio", early_agent_ratio)):
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
                raise ValueError(f"{name} must be in [0, 1); got {name}={ratio!r}.")
        for name, size in (("sx", sx), ("sy", sy), ("early_sx", early_sx), ("early_sy", early_sy)):
            _check_per_axis(name, 1, size)
        self.early_steps = _check_per_axis("early_steps", 1, early_steps, minimum=0)[0]
        self.settings = (float(agent_ratio), sx, sy)
        self.early_settings = (float(early_agent_ratio), early_sx, early_sy)
        self.k_scale2, self.k_shortcut, self.backend = float(k_scale2), float(k_shortcut), backend

    def forward(self, q, k, v, grid: TokenGrid, state):
        ratio, sx, sy = self.early_settings if state.step < self.early_steps else self.settings
        agents = agent_tokens(q, grid, ratio, sx, sy, state)
        if 2 * agents.shape[2] >= q.shape[2]:
            return None, 1.0
        scale = q.shape[-1] ** -0.5
        q_scaled = q * scale ** (self.k_scale2 - 1.0)
        out = agent_attention(q_scaled, k, v, agents, scale=scale, backend=self.backend)
        n = q.shape[2]
        return out + self.k_shortcut * v, 2 * agents.shape[2] / n


_METHODS = {cls.name: cls for cls in (AgentMethod, LinearMethod, LocalMethod, RadialMethod, SparseLinearMethod)}
