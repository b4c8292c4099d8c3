"""Row gather along the token axis: ``out[a, c, r, :] = x[a, c, index[r], :]``, zero where ``index[r] < 0``.

The tile-order permutations of the block-sparse ops (``neighborhood_attention``: q, k and v into tile order, the
output back to raster order) move whole rows of ``D`` elements (256 bytes at ``D = 128`` in bf16). ``index_select``
along a middle dim of a ``(B, H, N, D)`` tensor runs far below HBM bandwidth on an H100 (HunyuanVideo layout, 276 MB
per tensor: about 1.2 ms per copy); this kernel streams tiles of ``BLOCK_ROWS`` whole rows per program, every load
and store a run of ``D`` contiguous elements, so it is a plain copy at the memory's speed (two bytes moved per byte
of the tensor).

Layout: ``x`` and ``out`` are 4-D ``(A, C, N, D)`` views with any strides on the first three axes and unit stride
on the last (``(B, H, N, D)``, or ``(B, N, H, D)`` storage transposed, are read and written in place). Grid: one
flat axis of ``ceil(M / BLOCK_ROWS) * A * C`` programs (no 65,535 cap on ``A * C``), row tiles of one ``(a, c)``
consecutive. Offsets are 64-bit. ``D`` is padded to the power-of-two ``BLOCK_D`` and masked.
"""

import math

import torch
import triton
import triton.language as tl

from ._config import autotune
from ._launch import launch
from .block_sparse import cdiv, next_block

__all__ = ["gather_rows"]

#: ``(BLOCK_ROWS, num_warps)``, first the Hopper default: 64 rows x 128 bf16 = 16 KB per program, several programs
#: per SM in flight (the copy is bound by bytes in flight, not by instructions).
_CONFIGS = [
    triton.Config({"BLOCK_ROWS": rows}, num_warps=warps)
    for rows, warps in ((64, 4), (32, 4), (128, 8), (64, 8), (128, 4))
]
#: Under the interpreter: 4 rows, so tiny tests walk several row tiles and a partial last one.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_ROWS": 4}, num_warps=1)
#: Most tile elements a config may hold (64 KB of bf16 in registers over its warps); wider rows get fewer rows.
_MAX_TILE = 128 * 128


def _prune(configs, named_args, **kwargs):
    """Configs whose ``BLOCK_ROWS x BLOCK_D`` tile fits ``_MAX_TILE``; the smallest tile if none does."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    kept = [c for c in configs if c.kwargs["BLOCK_ROWS"] * block_d <= _MAX_TILE]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_ROWS"])]


@autotune(_CONFIGS, _INTERPRETER_CONFIG, key=["HEAD_DIM", "BLOCK_D"], prune=_prune)
@triton.jit
def _row_gather_kernel(
    x_ptr,
    index_ptr,
    out_ptr,
    stride_x_a,
    stride_x_c,
    stride_x_n,
    stride_o_a,
    stride_o_c,
    stride_o_n,
    num_c,
    num_rows,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    i_p = tl.program_id(0).to(tl.int64)
    num_tiles = tl.cdiv(num_rows, BLOCK_ROWS)
    i_ac = i_p // num_tiles
    i_t = i_p % num_tiles
    i_a = i_ac // num_c
    i_c = i_ac % num_c
    o_r = i_t * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    o_d = tl.arange(0, BLOCK_D)
    m_r = o_r < num_rows
    # [BLOCK_ROWS] source rows, -1 (or any negative) for a zero row
    b_src = tl.load(index_ptr + o_r, mask=m_r, other=-1).to(tl.int64)
    p_x = x_ptr + i_a * stride_x_a + i_c * stride_x_c + b_src[:, None] * stride_x_n + o_d[None, :]
    p_o = out_ptr + i_a * stride_o_a + i_c * stride_o_c + o_r[:, None] * stride_o_n + o_d[None, :]
    if BLOCK_D == HEAD_DIM:  # row masks only: whole rows move as vectors
        # [BLOCK_ROWS, BLOCK_D]
        b_x = tl.load(p_x, mask=(b_src >= 0)[:, None], other=0.0)
        tl.store(p_o, b_x, mask=m_r[:, None])
    else:
        m_d = o_d < HEAD_DIM
        b_x = tl.load(p_x, mask=(b_src >= 0)[:, None] & m_d[None, :], other=0.0)
        tl.store(p_o, b_x, mask=m_r[:, None] & m_d[None, :])


def empty_gathered(x: torch.Tensor, rows: int, dim: int) -> torch.Tensor:
    """Uninitialised ``x.shape`` with ``rows`` at ``dim``, its axes stored in ``x``'s memory order (contiguous where
    ``x`` has more than 4 axes or a strided last axis)."""
    shape = list(x.shape)
    shape[dim] = rows
    if x.ndim > 4 or x.stride(-1) != 1 or x.is_contiguous():
        return torch.empty(shape, device=x.device, dtype=x.dtype)
    order = sorted(range(x.ndim), key=lambda i: (-x.stride(i), i))  # outermost first
    out = torch.empty([shape[i] for i in order], device=x.device, dtype=x.dtype)
    return out.permute([order.index(i) for i in range(x.ndim)])


def _as_4d(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` as an ``(A, C, N, D)`` view with axis ``dim`` as ``N`` (rank 2 to 4: any strides; higher: contiguous)."""
    if t.ndim == 4 and dim == 2:
        return t
    if t.ndim > 4:
        shape = (math.prod(t.shape[:dim]), t.shape[dim], math.prod(t.shape[dim + 1 : -1]), t.shape[-1])
        return t.view(shape).transpose(1, 2)
    t = t.movedim(dim, -2)
    return t.view((1,) * (4 - t.ndim) + t.shape)


def gather_rows(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` gathered along ``dim``: row ``r`` of the result is ``x``'s row ``index[r]``, zeros where ``index[r] < 0``.

    ``x`` a tensor of rank >= 2 with unit last stride, ``dim`` a non-negative axis other than the last; ``index``
    ``(M,)`` int32 or int64, entries below ``x.shape[dim]`` (not checked: kernels never validate). Returns
    ``empty_gathered(x, M, dim)`` filled: stored in ``x``'s axis order (a ``(B, N, H, D)`` tensor viewed as
    ``(B, H, N, D)`` gives a result stored as ``(B, M, H, D)``).
    """
    if x.ndim > 4:
        x = x.contiguous()
    rows = index.shape[0]
    out = empty_gathered(x, rows, dim)
    if out.numel() == 0:
        return out
    x4, out4 = _as_4d(x, dim), _as_4d(out, dim)
    num_a, num_c, _, d = x4.shape
    launch(
        _row_gather_kernel,
        lambda meta: (cdiv(rows, meta["BLOCK_ROWS"]) * num_a * num_c,),
        x4,
        index,
        out4,
        *x4.stride()[:3],
        *out4.stride()[:3],
        num_c,
        rows,
        HEAD_DIM=d,
        BLOCK_D=next_block(d),
    )
    return out
