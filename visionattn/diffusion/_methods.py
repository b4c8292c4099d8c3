"""The attention call of each method, as a strategy object the per-model processors hold (one instance per layer).

Shape legend: ``B`` batch, ``H`` heads, ``N`` tokens (text and grid, in the model's order), ``D`` head dim;
grid axes ``(Y, X)`` for images, ``(T, Y, X)`` for videos.

A method is an ``nn.Module`` so that learnable parts (SLA's ``proj``, LinFusion's feature projections) live in the
model's ``state_dict`` under ``<attention module>.processor.method.*``. ``forward(q, k, v, grid, state)`` takes raster
order ``(B, H, N, D)`` tensors (views are fine) and a ``TokenGrid`` whose ``extra_before``/``extra_after`` are the text
tokens, and returns ``(out, density)``: ``out`` ``(B, H, N, D)`` and the exact fraction of the ``N²`` (query, key)
pairs scored with softmax (a float or 0-d tensor, see ``_density.py``; ``None`` for linear attention, which scores
none). Options are validated when the method is built (at ``apply`` time), each error naming its argument.
"""

import warnings
from typing import ClassVar

import torch
from torch import nn

from ..layout import TokenGrid, TokenLayout, circular_window_block_mask
from ..layout.radial import radial_block_mask
from ..nn import SparseLinearAttention
from ..ops import (
    agent_attention,
    block_sparse_attention,
    gather_tokens,
    inverse_token_index,
    linear_attention,
    neighborhood_attention,
    sparse_linear_attention,
)
from ..ops._checks import _check_choice, _check_float, _check_int, _check_per_axis
from ..ops.agent import _REGISTRY as _AGENT_BACKENDS
from ..ops.block_sparse import _REGISTRY as _BLOCK_SPARSE_BACKENDS
from ..ops.linear import _REGISTRY as _LINEAR_BACKENDS
from ..ops.linear import _check_eps
from ..ops.neighborhood import default_neighborhood_tile
from ..ops.sparse_linear import _REGISTRY as _SPARSE_LINEAR_BACKENDS
from ..ops.sparse_linear import _select_blocks
from ._agent import agent_tokens
from ._density import block_mask_density, circle_pairs, neighborhood_pairs, with_text

__all__ = ["AgentMethod", "LinearMethod", "LocalMethod", "RadialMethod", "SparseLinearMethod"]


def _rotate_text_last(grid: TokenGrid, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Move text tokens that precede the grid to after it (attention is equivariant to this permutation)."""
    n = grid.extra_before
    return tuple(torch.cat([t[:, :, n:], t[:, :, :n]], dim=2) for t in tensors)


def _rotate_text_first(grid: TokenGrid, out: torch.Tensor) -> torch.Tensor:
    n = out.shape[2] - grid.extra_before
    return torch.cat([out[:, :, n:], out[:, :, :n]], dim=2)


def _check_backend(backend, registry):
    """``None`` or a backend of the op the method calls (checked at ``apply``, not at the first forward)."""
    return _check_choice("backend", backend, (None, *registry.names))


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
    ``‖q − k‖² < radius²``).

    Small grids (UNet's deep levels, low resolutions, short videos) get the window fitted to each call's grid, per
    axis: ``kernel_size`` is capped at the axis length (the window covers the whole axis, which is what a window
    larger than the axis means), ``stride`` at the capped kernel, and where ``kernel_size · dilation`` still exceeds
    the axis, ``dilation`` is lowered to the largest value whose window fits (NATTEN's constraint), with a
    ``UserWarning`` naming the grid, since that changes which tokens are attended. The reported density counts the
    fitted window.

    Args:
        kernel_size: neighborhood size, an int or one int per grid axis (neighborhood window; required there).
        stride: neighborhood stride per axis, ``1 <= stride <= kernel_size`` (GNA's strided NA;
            ``stride == kernel_size`` is blocked attention).
        dilation: neighborhood dilation per axis.
        window: ``"neighborhood"`` or ``"circle"``.
        radius: circle radius in latent tokens (circle window only; required there).
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
        if window == "neighborhood":
            if kernel_size is None:
                raise ValueError("kernel_size must be given for window='neighborhood'; got kernel_size=None.")
            if radius is not None:
                raise ValueError(
                    f"radius must be None for window='neighborhood' (it sizes the circle); got {radius=}. "
                    "Pass window='circle' for a circular window."
                )
        else:
            for name, value, default in (
                ("kernel_size", kernel_size, None),
                ("stride", stride, 1),
                ("dilation", dilation, 1),
            ):
                if value != default:
                    raise ValueError(
                        f"{name} must be left at {default} for window='circle' (the circle is sized by radius); "
                        f"got {name}={value!r}."
                    )
            if radius is None:
                raise ValueError("radius must be a positive number for window='circle'; got radius=None.")
            radius = _check_float("radius", radius, positive=True)
        # tuples (YAML configs give lists): the options key the per-shape window cache
        as_tuple = lambda value: tuple(value) if isinstance(value, list) else value
        self.kernel_size, self.stride, self.dilation = (as_tuple(v) for v in (kernel_size, stride, dilation))
        self.radius, self.tile = radius, as_tuple(tile)
        self.backend = _check_backend(backend, _BLOCK_SPARSE_BACKENDS)

    def check_model(self, model_name: str, grid_ndim: int, is_video: bool) -> None:
        if self.tile is not None:
            _check_per_axis("tile", grid_ndim, self.tile)
        if self.window == "neighborhood":
            ks, st, _ = (_check_per_axis(n, grid_ndim, getattr(self, n)) for n in ("kernel_size", "stride", "dilation"))
            if any(s > k for s, k in zip(st, ks)):
                raise ValueError(
                    f"stride must be <= kernel_size on every axis; got stride={self.stride!r}, "
                    f"kernel_size={self.kernel_size!r}."
                )

    def _window(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Per-axis ``(kernel_size, stride, dilation)`` fitted to the grid ``shape`` (see the class docstring)."""
        ndim = len(shape)
        ks = _check_per_axis("kernel_size", ndim, self.kernel_size)
        st = _check_per_axis("stride", ndim, self.stride)
        dil = _check_per_axis("dilation", ndim, self.dilation)
        ks = tuple(min(k, s) for k, s in zip(ks, shape))
        fitted = tuple(max(1, min(d, s // k)) for d, s, k in zip(dil, shape, ks))
        if fitted != dil:
            warnings.warn(
                f"dilation={dil} does not fit the grid {shape} with kernel_size={ks}; using dilation={fitted} there "
                "(kernel_size * dilation must be <= the grid on every axis).",
                stacklevel=2,
            )
        return ks, tuple(min(t, k) for t, k in zip(st, ks)), fitted

    def _fitted(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]:
        """``_window(shape)`` and the grid-pair count of that window."""
        ks, st, dil = self._window(shape)
        return ks, st, dil, neighborhood_pairs(shape, ks, st, dil)

    def forward(self, q, k, v, grid: TokenGrid, state):
        if self.window == "circle":
            return self._circle(q, k, v, grid, state)
        key = ("local", grid.shape, self.kernel_size, self.stride, self.dilation)
        ks, st, dil, pairs = state.cached(key, lambda: self._fitted(grid.shape))
        out = neighborhood_attention(q, k, v, grid, ks, st, dil, tile=self.tile, backend=self.backend)
        return out, with_text(grid, pairs)

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
        pairs = state.cached(("circle_pairs", self.radius, grid.shape), lambda: circle_pairs(grid.shape, self.radius))
        source, out_slot = state.cached(("tile_order", layout, q.device), lambda: _tile_order(layout, q.device))
        # padding slots hold zeros; the mask never attends to them and their outputs are dropped
        trusted = dict(backend=self.backend, check_index=False)  # maps from _tile_order
        q, k, v = (gather_tokens(t, source, out_slot, 2, **trusted) for t in (q, k, v))
        out = block_sparse_attention(q, k, v, mask, backend=self.backend)
        return gather_tokens(out, out_slot, source, 2, **trusted), with_text(grid, pairs)


def _tile_order(layout: TokenLayout, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather maps into ``layout``'s tile order (``source``: each slot's raster token, -1 for padding) and back
    (``out_slot``: each token's slot), int32, for ``gather_tokens``."""
    source = layout.source_index().to(torch.int32)
    return source.to(device), inverse_token_index(source, layout.grid.num_tokens).to(device)


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
        self.block_size = _check_int("block_size", block_size)
        self.decay_factor = _check_float("decay_factor", decay_factor, positive=True)
        if sink is not None and not isinstance(sink, bool):
            raise TypeError(f"sink must be a bool or None; got {type(sink)=}, {sink=}.")
        self.sink = sink
        self.backend = _check_backend(backend, _BLOCK_SPARSE_BACKENDS)

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
        mask, density = state.cached(key, lambda: self._mask(frames, grid.num_grid_tokens // frames, text, q.device))
        if grid.extra_before:
            q, k, v = _rotate_text_last(grid, q, k, v)
        out = block_sparse_attention(q, k, v, mask, backend=self.backend)
        if grid.extra_before:
            out = _rotate_text_first(grid, out)
        return out, density

    def _mask(self, frames: int, tokens_per_frame: int, text: int, device) -> tuple[object, float]:
        """The radial ``BlockMask`` on ``device`` and its exact token-pair density."""
        mask = radial_block_mask(
            frames,
            tokens_per_frame,
            block_size=self.block_size,
            decay_factor=self.decay_factor,
            sink=self.sink,
            extra_tokens=text,
        )
        return mask.to(device), float(block_mask_density(mask))


class SparseLinearMethod(_AttentionMethod):
    """SLA (Zhang et al., arXiv 2509.24006): softmax on each query block's top-k key blocks, linear attention on the
    rest, ``o = o_sparse + proj(o_linear)``, held as one ``visionattn.nn.SparseLinearAttention`` per layer.

    ``proj`` starts at zero (a fresh layer is block-sparse attention) and lives in the model's ``state_dict`` as
    ``<attention module>.processor.method.attention.proj.*``. The block map is computed from q and k on every call,
    over the whole joint sequence (text tokens included), as TurboDiffusion applies SLA to Wan's self-attention.

    The density is the exact fraction of token pairs in the softmax blocks. Every query block keeps the same number
    of key blocks, so with full key blocks (``N % block_k == 0``) it follows from the counts; with a short last key
    block it depends on which query blocks chose that block, so the block map is selected here and handed to the op
    (with ``skip_ratio > 0`` the op selects it once more), and its area summed on the device, without host sync.

    As in SLA, each query block keeps ``int(topk · Mk)`` key blocks (``Mk`` key blocks in the sequence), rounded down:
    a sequence of fewer than ``1 / topk`` key blocks (e.g. 64-token blocks with ``topk=0.1`` below 640 tokens, such as
    SD's deepest UNet levels) keeps none, and the layer is the linear branch alone (zero until ``proj`` is trained);
    its density reports 0.

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
            block_q=_check_int("block_q", block_q),
            block_k=_check_int("block_k", block_k),
            skip_ratio=skip_ratio,
            backend=_check_backend(backend, _SPARSE_LINEAR_BACKENDS),
            device=device,
            dtype=dtype,
        )

    def forward(self, q, k, v, grid: TokenGrid, state):
        sla = self.attention
        length, block = k.shape[2], sla.block_k
        if length % block == 0:
            blocks = length // block
            return sla(q, k, v), min(blocks, int(sla.topk * blocks)) / blocks
        # the block map the op would select (same pooling kernel), selected here once so that its exact area is known
        critical = _select_blocks(q, k, sla.topk, 0.0, sla.block_q, block)[0]
        if sla.skip_ratio:  # negligible blocks need the pooled scores: the op selects again
            return sla(q, k, v), block_mask_density(critical)
        out = sparse_linear_attention(
            q,
            k,
            v,
            sla.proj.weight,
            sla.proj.bias,
            block_mask=critical,
            feature_map=sla.feature_map,
            scale=sla.scale,
            backend=sla.backend,
        )
        return out, block_mask_density(critical)


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
        mid_dim = head_dim if mid_dim is None else _check_int("mid_dim", mid_dim)
        self.q_proj = _FeatureProjection(head_dim, mid_dim, **dd)
        self.k_proj = _FeatureProjection(head_dim, mid_dim, **dd)
        self.eps = _check_eps(eps)
        self.backend = _check_backend(backend, _LINEAR_BACKENDS)

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
    for the query-to-agent step). As in AgentSD, layers with too few tokens (``2 n ≥ N``, e.g. a grid smaller than
    one ``sy × sx`` window) keep dense attention. The density is ``2 n / N``: the ``N·n`` query-agent and ``n·N``
    agent-key pairs scored with softmax, over ``N²``.
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
            _check_int(name, size)
        self.early_steps = _check_int("early_steps", early_steps, minimum=0)
        self.settings = (float(agent_ratio), sx, sy)
        self.early_settings = (float(early_agent_ratio), early_sx, early_sy)
        self.k_scale2 = _check_float("k_scale2", k_scale2)
        self.k_shortcut = _check_float("k_shortcut", k_shortcut)
        self.backend = _check_backend(backend, _AGENT_BACKENDS)

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
