"""SwiGLU in one pass: ``y = SiLU(a) ⊙ b`` over the two halves of the last dim of one tensor, forward and backward.

For ``x`` of shape ``(rows, 2H)``, ``a = x[:, :H]`` (the gate, activated) and ``b = x[:, H:]`` (Shazeer, "GLU Variants
Improve Transformer", arXiv 2002.05202, Eq. 5 with the two projections fused into one; timm's ``GluMlp`` with
``gate_last=False``), with ``σ`` the logistic sigmoid:

    y = a σ(a) ⊙ b

Backward, with ``SiLU'(a) = σ(a) (1 + a (1 − σ(a)))``:

    da = dy ⊙ b ⊙ SiLU'(a),        db = dy ⊙ a σ(a)

Eager PyTorch runs two strided elementwise passes over the halves (SiLU, then the product) with an intermediate; here
one program reads a ``[BLOCK_R, BLOCK_H]`` tile of each half, computes in fp32 and writes ``y`` once (backward: reads
dy, a, b, writes ``dx = [da, db]``). Grid: row blocks x column blocks of the H columns.

Layout: ``x`` and ``dy`` are ``(rows, ·)`` with any row stride and a unit last stride; every output is contiguous.
"""

import torch
import triton
import triton.language as tl

from ._config import autotune
from ._launch import launch
from .block_sparse import cdiv, next_block, unit_last_stride

__all__ = ["swiglu_bwd", "swiglu_fwd"]

#: Widest column tile: rows of up to this many outputs are one tile, wider ones split over the second grid axis.
_MAX_BLOCK_H = 1024
#: Largest tile (elements per half): the backward holds dy, a, b and two results in fp32 registers.
_MAX_TILE = 8192
#: Smallest tile worth autotuning: below it a program moves too few bytes to hide its launch and load latency.
_MIN_TILE = 1024


def _configs(rows: int, warps: int) -> list:
    """Rows per program x warps, ``(rows, warps)`` first (the config used when autotuning is off). Memory-bound: what
    matters is the bytes in flight per SM; the pruner caps the rows to the column tile."""
    pairs = [(r, w) for r in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) for w in (4, 8) if (r, w) != (rows, warps)]
    return [triton.Config({"BLOCK_R": r}, num_warps=w) for r, w in [(rows, warps), *pairs]]


# first entries: 4096 elements per half at H = 512 (ViG-T), 32 fp32 values per thread and tensor with 4 warps
_FWD_CONFIGS = _configs(8, 4)
_BWD_CONFIGS = _configs(8, 4)
_DEFAULT = triton.Config({"BLOCK_R": 4}, num_warps=4)


def _prune_configs(configs, nargs, **kwargs):
    """Rows per program capped so a tile stays within ``_MAX_TILE`` elements, tiles under ``_MIN_TILE`` dropped
    (duplicates too); when nothing is left (the interpreter's single small default) the first config is kept."""
    block_h = {**nargs, **kwargs}["BLOCK_H"]
    cap = max(1, _MAX_TILE // block_h)
    capped = [triton.Config({"BLOCK_R": min(c.kwargs["BLOCK_R"], cap)}, num_warps=c.num_warps) for c in configs]
    kept = {}
    for c in capped:
        if c.kwargs["BLOCK_R"] * block_h >= _MIN_TILE:
            kept.setdefault((c.kwargs["BLOCK_R"], c.num_warps), c)
    return list(kept.values()) or capped[:1]


# ------------------------------------------------------------------------------------------------------- helpers
@triton.jit
def _swiglu_tile(num_rows, H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rows (int64, so offsets do not overflow) and columns of this program's tile, and its mask. The column mask is
    dropped when the column tiles divide H, so the mask stays constant along a row and loads vectorise."""
    o_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    o_c = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m_r = o_r < num_rows
    if H % BLOCK_H == 0:
        mask = tl.broadcast_to(m_r[:, None], (BLOCK_R, BLOCK_H))
    else:
        mask = m_r[:, None] & (o_c < H)[None, :]
    return o_r.to(tl.int64), o_c, mask


@triton.jit
def _swiglu_halves(x_ptr, o_r, stride_x_r, o_c, mask, H: tl.constexpr):
    """``[BLOCK_R, BLOCK_H]`` fp32 tiles of ``a`` and ``b`` (columns ``o_c`` of the two halves of rows ``o_r``)."""
    p_a = x_ptr + o_r[:, None] * stride_x_r + o_c[None, :]
    return tl.load(p_a, mask=mask, other=0.0).to(tl.float32), tl.load(p_a + H, mask=mask, other=0.0).to(tl.float32)


# ------------------------------------------------------------------------------------------------------- forward
@autotune(_FWD_CONFIGS, _DEFAULT, ["H"], _prune_configs)
@triton.jit
def _swiglu_fwd_kernel(
    x_ptr,
    y_ptr,
    num_rows,
    stride_x_r,
    H: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    o_r, o_c, mask = _swiglu_tile(num_rows, H, BLOCK_R, BLOCK_H)
    # [BLOCK_R, BLOCK_H]
    b_a, b_b = _swiglu_halves(x_ptr, o_r, stride_x_r, o_c, mask, H)
    b_y = b_a * tl.sigmoid(b_a) * b_b
    tl.store(y_ptr + o_r[:, None] * H + o_c[None, :], b_y.to(y_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------------ backward
@autotune(_BWD_CONFIGS, _DEFAULT, ["H"], _prune_configs)
@triton.jit
def _swiglu_bwd_kernel(
    dy_ptr,
    x_ptr,
    dx_ptr,
    num_rows,
    stride_dy_r,
    stride_x_r,
    H: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    o_r, o_c, mask = _swiglu_tile(num_rows, H, BLOCK_R, BLOCK_H)
    # [BLOCK_R, BLOCK_H]
    b_dy = tl.load(dy_ptr + o_r[:, None] * stride_dy_r + o_c[None, :], mask=mask, other=0.0).to(tl.float32)
    b_a, b_b = _swiglu_halves(x_ptr, o_r, stride_x_r, o_c, mask, H)
    b_s = tl.sigmoid(b_a)
    b_da = b_dy * b_b * b_s * (1.0 + b_a * (1.0 - b_s))
    b_db = b_dy * b_a * b_s
    p_da = dx_ptr + o_r[:, None] * (2 * H) + o_c[None, :]
    tl.store(p_da, b_da.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(p_da + H, b_db.to(dx_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------------ launchers
def _rows(t: torch.Tensor) -> torch.Tensor:
    """``(..., C)`` as ``(rows, C)`` with a unit last stride: a view where the layout allows (strided rows stay
    strided), a copy only when the last dim itself is strided or the leading dims cannot be merged."""
    return unit_last_stride(t.reshape(-1, t.shape[-1]))


def _grid(num_rows: int, hidden: int):
    block_h = min(next_block(hidden), _MAX_BLOCK_H)
    return block_h, lambda meta: (cdiv(num_rows, meta["BLOCK_R"]), cdiv(hidden, block_h))


def swiglu_fwd(x: torch.Tensor) -> torch.Tensor:
    """``y = SiLU(a) ⊙ b`` for ``x = [a, b]`` of shape ``(..., 2H)``: contiguous ``(..., H)`` in the dtype of ``x``.

    Grid: ``(cdiv(rows, BLOCK_R), cdiv(H, BLOCK_H))``; one program computes a ``[BLOCK_R, BLOCK_H]`` tile of ``y``.
    """
    rows = _rows(x)
    num_rows, hidden = rows.shape[0], rows.shape[1] // 2
    y = torch.empty((*x.shape[:-1], hidden), device=x.device, dtype=x.dtype)
    if y.numel():
        block_h, grid = _grid(num_rows, hidden)
        launch(_swiglu_fwd_kernel, grid, rows, y, num_rows, rows.stride(0), H=hidden, BLOCK_H=block_h)
    return y


def swiglu_bwd(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Gradient of ``x`` given ``dy`` ``(..., H)``: contiguous ``(..., 2H)`` ``[da, db]`` in the dtype of ``x``.

    Grid as :func:`swiglu_fwd`; one program writes the ``da`` and ``db`` tiles of its rows and columns.
    """
    rows, dy_rows = _rows(x), _rows(dy)
    num_rows, hidden = rows.shape[0], rows.shape[1] // 2
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if dx.numel():
        block_h, grid = _grid(num_rows, hidden)
        launch(
            _swiglu_bwd_kernel,
            grid,
            dy_rows,
            rows,
            dx,
            num_rows,
            dy_rows.stride(0),
            rows.stride(0),
            H=hidden,
            BLOCK_H=block_h,
        )
    return dx
