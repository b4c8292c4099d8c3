"""Agent attention module for 2D token grids, with agent biases resized to any resolution and agent count.

Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention", ECCV 2024 (arXiv 2312.08874);
reference code LeapLabTHU/Agent-Attention (MIT), ``agent_transformer/models/agent_{swin,pvt,deit}.py`` and the
dense-prediction backbones ``downstream/*/backbones/agent_{swin,pvt}.py``.
"""

import functools
import math

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from ..layout import TokenGrid
from ..ops.agent import agent_attention

__all__ = ["AgentAttention", "adaptive_avg_pool_nhwc", "resize_agent_axis", "resize_axis"]

#: Side of the low-resolution ``an``/``na`` bias maps in every released model.
_BIAS_MAP_SIZE = 7


def resize_axis(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Linearly resample axis ``dim`` of ``t`` to ``size`` (``align_corners=False``, torch's bilinear rule)."""
    if t.shape[dim] == size:
        return t
    moved = t.movedim(dim, -1)
    out = F.interpolate(moved.reshape(1, -1, moved.shape[-1]), size=size, mode="linear", align_corners=False)
    return out.reshape(*moved.shape[:-1], size).movedim(-1, dim)


def resize_agent_axis(t: torch.Tensor, dim: int, agent_shape: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resample the agent axis ``dim`` (``p x p`` agents, row-major) of ``t`` to ``agent_shape`` agents."""
    side = math.isqrt(t.shape[dim])
    if (side, side) == tuple(agent_shape):
        return t
    moved = t.movedim(dim, -1)
    grid = moved.reshape(1, -1, side, side)
    out = F.interpolate(grid, size=tuple(agent_shape), mode="bilinear", align_corners=False)
    return out.reshape(*moved.shape[:-1], agent_shape[0] * agent_shape[1]).movedim(-1, dim)


def _window_indicator(length: int, size: int, device, dtype) -> torch.Tensor:
    """``(size, length)`` 0/1 matrix of adaptive pooling's windows ``[⌊i·L/n⌋, ⌈(i+1)·L/n⌉)`` along one axis."""
    out = torch.arange(size, device=device)[:, None]
    pos = torch.arange(length, device=device)[None, :]
    inside = (pos >= out * length // size) & (pos < ((out + 1) * length + size - 1) // size)
    return inside.to(dtype)


def _pooling_windows(grid_shape: tuple[int, int], output_size: tuple[int, int], device, dtype):
    """Window indicators along Y ``(a, Y)`` and X ``(b, X)``, and the window areas ``(a, b, 1)`` in float32."""
    (height, width), (rows, cols) = grid_shape, output_size
    along_y, along_x = _window_indicator(height, rows, device, dtype), _window_indicator(width, cols, device, dtype)
    areas = along_y.sum(1, dtype=torch.float32)[:, None] * along_x.sum(1, dtype=torch.float32)[None, :]
    return along_y, along_x, areas[..., None]


#: The same few (grid, agents) pairs recur every forward: ~20 small kernels per call saved (constants, no grad).
_cached_pooling_windows = functools.lru_cache(maxsize=64)(_pooling_windows)


def adaptive_avg_pool_nhwc(x: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
    """``F.adaptive_avg_pool2d`` of a ``(B, Y, X, C)`` map (any strides with unit channel stride) -> ``(B, a, b, C)``.

    Adaptive average pooling is separable: window sums along X, then along Y, as two matrix products with 0/1
    window indicators, divided by the window areas. PyTorch's kernel on a channels-last map of a large grid runs
    one thread per output with a serial window loop (2.46 ms for a 256x256x64 map, batch 32, on an H100, 22x slower
    than this; measured for agent_pvt_small at 1024 px).
    """
    batch, height, width, channels = x.shape
    rows, cols = output_size
    if height % rows == 0 and width % cols == 0:  # equal windows (e.g. DeiT's 14x14 grid, 7x7 agents): one reduction
        return x.view(batch, rows, height // rows, cols, width // cols, channels).mean((2, 4))
    windows = _pooling_windows if torch.compiler.is_compiling() else _cached_pooling_windows
    along_y, along_x, areas = windows((height, width), (rows, cols), x.device, x.dtype)
    sums = torch.matmul(along_x, x)  # (B, Y, b, C)
    sums = torch.matmul(along_y, sums.flatten(2)).view(batch, rows, cols, channels)
    return (sums / areas).to(x.dtype)


class AgentAttention(nn.Module):
    """Agent attention (Han et al. 2024) over a 2D token grid, optionally preceded by prefix tokens (DeiT's cls).

    Agents are the adaptive-average-pooled queries of the grid; the agent biases are the reference's
    ``an``/``na`` maps (bilinear from 7x7), ``ah``/``aw``/``ha``/``wa`` row and column biases (stored at the
    training feature size ``bias_size``) and, with a prefix token, ``ac``/``ca``. At other grid sizes or agent
    counts every bias is resampled bilinearly, exactly as the reference's dense-prediction backbones do (their
    two-step interpolation factorises into the per-axis resampling used here). A depthwise 3x3 convolution of V
    is added to the grid outputs. ``forward`` takes ``(B, N, C)`` tokens plus their ``TokenGrid``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        agent_num: int = 49,
        bias_size: tuple[int, int] = (14, 14),
        agent_shape: tuple[int, int] | None = None,
        num_prefix_tokens: int = 0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        backend: str | None = None,
        device=None,
        dtype=None,
    ):
        """
        Args:
            dim: channels ``C``.
            num_heads: heads; ``C`` must divide evenly.
            agent_num: agents the biases are stored for (a perfect square ``p * p``).
            bias_size: feature size ``(Y, X)`` the row/column biases are stored for (the training resolution).
            agent_shape: agents pooled per axis at run time; None means ``(p, p)``. Other shapes resample the biases.
            num_prefix_tokens: global tokens before the grid (0, or 1 for DeiT's cls token).
            qkv_bias: bias in the qkv projection.
            proj_drop: dropout after the output projection.
            backend: ``agent_attention`` backend (None: SDPA).
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        side = math.isqrt(agent_num)
        if side * side != agent_num:
            raise ValueError(f"agent_num must be a perfect square; got {agent_num=}.")
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads; got {dim=}, {num_heads=}.")
        if num_prefix_tokens not in (0, 1):
            raise ValueError(f"num_prefix_tokens must be 0 or 1; got {num_prefix_tokens=}.")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.agent_shape = tuple(agent_shape) if agent_shape is not None else (side, side)
        self.num_prefix_tokens = num_prefix_tokens
        self.backend = backend
        bias_h, bias_w = bias_size

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, **dd)
        empty = lambda *shape: nn.Parameter(torch.empty(*shape, **dd))
        self.an_bias = empty(num_heads, agent_num, _BIAS_MAP_SIZE, _BIAS_MAP_SIZE)
        self.na_bias = empty(num_heads, agent_num, _BIAS_MAP_SIZE, _BIAS_MAP_SIZE)
        # the reference stores these as 5-D/4-D with singleton axes; at most 4-D here so that
        # ``model.to(memory_format=torch.channels_last)`` works (it rejects 5-D parameters)
        self.ah_bias = empty(num_heads, agent_num, bias_h)
        self.aw_bias = empty(num_heads, agent_num, bias_w)
        self.ha_bias = empty(num_heads, bias_h, agent_num)
        self.wa_bias = empty(num_heads, bias_w, agent_num)
        if num_prefix_tokens:
            self.ac_bias = empty(num_heads, agent_num, 1)
            self.ca_bias = empty(num_heads, 1, agent_num)
        self._bias_cache = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, param in self.named_parameters(recurse=False):
            if name.endswith("_bias"):
                trunc_normal_(param, std=0.02)

    def agent_biases(self, grid_shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The biases ``B₁`` ``(1, heads, n, P + Y*X)`` and ``B₂`` ``(1, heads, P + Y*X, n)`` at this grid size.

        Without autograd (inference), the last grid size's biases are cached until a bias parameter changes: the
        resampling is ~50 small kernels per block, which bounds small models by kernel launches (agent_deit_tiny
        at 224 px on an H100 ran at 2.3x its GPU time). The key is each parameter's storage address and version
        counter; the cache keeps aliases of the parameters it was computed from, so a live address cannot be
        reused by another storage, and in-place updates (optimizer steps, ``load_state_dict``) bump the version.
        """
        params = [p for name, p in self.named_parameters(recurse=False) if name.endswith("_bias")]
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or any(p.is_inference() for p in params):
            return self._resample_biases(grid_shape)
        key = (tuple(grid_shape), tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params))
        if self._bias_cache is None or self._bias_cache[0] != key:
            self._bias_cache = (key, self._resample_biases(grid_shape), [p.detach() for p in params])
        return self._bias_cache[1]

    def _resample_biases(self, grid_shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = grid_shape
        shape = self.agent_shape
        n = shape[0] * shape[1]
        an = resize_agent_axis(self.an_bias, 1, shape)
        na = resize_agent_axis(self.na_bias, 1, shape)
        an = F.interpolate(an, size=(height, width), mode="bilinear", align_corners=False)
        na = F.interpolate(na, size=(height, width), mode="bilinear", align_corners=False)
        ah = resize_axis(resize_agent_axis(self.ah_bias, 1, shape), 2, height)
        aw = resize_axis(resize_agent_axis(self.aw_bias, 1, shape), 2, width)
        ha = resize_axis(resize_agent_axis(self.ha_bias, 2, shape), 1, height)
        wa = resize_axis(resize_agent_axis(self.wa_bias, 2, shape), 1, width)
        bias_agent = (an + ah[:, :, :, None] + aw[:, :, None, :]).flatten(2)
        bias_query = (na.permute(0, 2, 3, 1) + ha[:, :, None, :] + wa[:, None, :, :]).reshape(-1, height * width, n)
        if self.num_prefix_tokens:
            bias_agent = torch.cat([resize_agent_axis(self.ac_bias, 1, shape), bias_agent], dim=-1)
            bias_query = torch.cat([resize_agent_axis(self.ca_bias, 2, shape), bias_query], dim=-2)
        return bias_agent[None], bias_query[None]

    def forward(self, x: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
        """``x`` ``(B, N, C)`` with ``N = grid.num_tokens`` (prefix tokens first) -> ``(B, N, C)``."""
        batch, num_tokens, channels = x.shape
        height, width = grid.shape
        prefix = self.num_prefix_tokens
        if grid.num_tokens != num_tokens or grid.extra_before != prefix or grid.extra_after:
            raise ValueError(
                f"grid must describe x's {num_tokens} tokens with {prefix} prefix token(s) before the grid; "
                f"got {grid=} for x.shape={tuple(x.shape)}."
            )
        qkv_tokens = self.qkv(x)
        qkv = qkv_tokens.view(batch, num_tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q_grid = qkv_tokens[:, prefix:, :channels].view(batch, height, width, channels)
        agents = adaptive_avg_pool_nhwc(q_grid, self.agent_shape).view(batch, -1, self.num_heads, self.head_dim)
        agents = agents.transpose(1, 2)
        bias_agent, bias_query = self.agent_biases((height, width))
        out = agent_attention(q, k, v, agents, bias_agent, bias_query, scale=self.scale, backend=self.backend)
        out = out.transpose(1, 2).reshape(batch, num_tokens, channels)
        v_map = v[:, :, prefix:].transpose(-1, -2).reshape(batch, channels, height, width)
        local = self.dwc(v_map).flatten(2).transpose(1, 2)
        out = torch.cat([out[:, :prefix], out[:, prefix:] + local], dim=1) if prefix else out + local
        return self.proj_drop(self.proj(out))
