"""Block-sparse flash attention, forward: each program walks one query block's CSR row of kept key blocks.

Layout: q ``(B, H, Nq, D)``, k ``(B, H, Nk, D)``, v ``(B, H, Nk, Dv)`` with arbitrary strides (so ``(B, N, H, D)``
storage is read in place); the CSR ``indptr (Bm, Hm, Mq + 1)`` / ``indices (nnz,)`` of a ``BlockMask`` whose
batch/heads ``Bm``/``Hm`` are 1 (broadcast) or ``B``/``H``, each row reordered full blocks first with ``split``
(shaped like ``indptr``) marking where its partial blocks start (``block_sparse_bwd.full_blocks_first``). Logical
blocks of ``block_q`` x ``block_k`` tokens sit in power-of-two tiles ``BLOCK_M`` x ``BLOCK_N`` (>= 16); rows and
columns past the logical block or the sequence are masked. Each CSR row is walked full blocks first (no
predicate), then partial blocks, which evaluate the exact token predicate of ``visionattn.layout.predicates``
in-kernel from its per-position ``KernelTables`` (``MASK_KIND``), never from an N x N tensor.

The backward kernels live in ``block_sparse_bwd.py``, the in-kernel token predicates in ``mask_predicates.py``.
"""

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._config import autotune
from ._constants import LN2, LOG2E, NEG_INF
from ._launch import launch
from ._tma import bhnd_descriptor, has_tma
from .mask_predicates import (
    _MASKED,
    _PACKED,
    MASK_NONE,
    _bsa_allowed,
    _bsa_packed_window_scores,
    _Predicate,
    predicate_args,
)

__all__ = [
    "TILE_HEURISTICS",
    "TMA_ENV",
    "block_sparse_fwd",
    "cdiv",
    "csr_strides",
    "empty_like_layout",
    "launch_constexprs",
    "leading_strides",
    "next_block",
    "prune_configs",
    "tma_descriptors",
    "unit_last_stride",
    "use_tma",
]

_NONE = tl.constexpr(MASK_NONE)
_NEG_INF = tl.constexpr(NEG_INF)
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(LN2)
#: Slack of the lazy rescale (log2 units): a stale running max keeps unnormalised probabilities <= 2^8.
_RESCALE_SLACK = tl.constexpr(8.0)

# Tiles are caps (TILE_M query rows, TILE_N key rows): a logical block larger than its tile is walked in
# sub-tiles, a smaller one is padded to a power of two >= 16. Hopper: 128 x 64-128, 4-8 warps, 2-3 stages.
_FWD_CONFIGS = [
    triton.Config({"TILE_M": m, "TILE_N": n}, num_warps=w, num_stages=s)
    for m, n, w, s in [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (128, 128, 4, 3), (64, 64, 4, 3)]
]
# Under the interpreter: 16-row tiles, so tests with 32-token blocks also exercise the sub-tile walk.
_DEFAULT_CONFIG = triton.Config({"TILE_M": 16, "TILE_N": 16}, num_warps=4, num_stages=2)
_AUTOTUNE_KEY = ["block_q", "block_k", "HEAD_DIM", "HEAD_DIM_V", "MASK_KIND", "GATHER"]
#: Switch of the forward's TMA path, read per launch: ``1`` wherever ``tma_descriptors`` allows, ``0`` never; unset,
#: head dims in 128-wide tiles (``_TMA_MIN_BLOCK_D``), where the H100 measured it faster (session 8: Wan dense 1.43x,
#: FLUX dense 1.03-1.08x, FLUX window 1.17x CUDA-graph time) while at D = 64 it was slower (DeiT-1024 0.91x).
TMA_ENV = "VISIONATTN_BSA_TMA"
_TMA_MIN_BLOCK_D = 128


def use_tma(q: torch.Tensor) -> bool:
    """Whether the forward takes its TMA path for ``q`` (``TMA_ENV`` forces it either way) when q, k, v and the
    output are fp16/bf16 tensors TMA can address on a device that has it (``tma_descriptors``)."""
    switch = os.environ.get(TMA_ENV)
    if switch is not None:
        wanted = switch == "1"
    else:
        wanted = next_block(q.shape[-1]) >= _TMA_MIN_BLOCK_D
    return wanted and q.dtype in (torch.float16, torch.bfloat16) and has_tma(q.device)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` on the host. ``triton.cdiv`` is a constexpr function in Triton 3.9: a host call through it
    costs microseconds, and the launchers and tile heuristics make dozens per op call."""
    return -(-a // b)


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a contiguous copy when its last dim is strided (the kernels index it as ``base + offset``)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def leading_strides(*tensors: torch.Tensor) -> list[int]:
    """The strides of the three leading dims of each tensor in turn: the kernels' per-tensor stride arguments."""
    return [s for t in tensors for s in t.stride()[:3]]


def next_block(size: int) -> int:
    """Power-of-two tile (>= 16, the smallest ``tl.dot`` dimension) holding ``size`` rows (plain integer math, not
    ``triton.next_power_of_2``, for the reason of ``cdiv``)."""
    return max(16, 1 << (size - 1).bit_length()) if size > 1 else 16


#: Tile shapes from the logical blocks and the config's caps (applied in order, each sees the previous).
TILE_HEURISTICS = {
    "BLOCK_M": lambda a: min(next_block(a["block_q"]), a["TILE_M"]),
    "BLOCK_N": lambda a: min(next_block(a["block_k"]), a["TILE_N"]),
    "Q_SUB": lambda a: cdiv(a["block_q"], a["BLOCK_M"]),
    "K_SUB": lambda a: cdiv(a["block_k"], a["BLOCK_N"]),
    "EVEN_M": lambda a: a["block_q"] % a["BLOCK_M"] == 0 and a["q_len"] % a["block_q"] == 0,
    "EVEN_N": lambda a: a["block_k"] % a["BLOCK_N"] == 0 and a["kv_len"] % a["block_k"] == 0,
}


def prune_configs(configs, nargs, **kwargs):
    """Drop configs whose capped tiles coincide with an earlier one (small blocks) and 8 warps on tiles too small
    to give each warp work (below 4096 scores)."""
    args = {**nargs, **kwargs}
    kept, seen = [], set()
    for config in configs:
        tiles = {**args, **config.kwargs}
        shape = (TILE_HEURISTICS["BLOCK_M"](tiles), TILE_HEURISTICS["BLOCK_N"](tiles))
        if config.num_warps > 4 and shape[0] * shape[1] < 32 * 128:
            continue
        variant = (shape, config.num_warps, config.num_stages, config.kwargs.get("LAZY_RESCALE"))
        if variant not in seen:
            seen.add(variant)
            kept.append(config)
    return kept or configs[:1]


def _tma_block_shapes(nargs):
    """Autotune pre-hook of the TMA configs: descriptor blocks ``[1, 1, row tile, head-dim tile]`` of the config."""
    m, n = TILE_HEURISTICS["BLOCK_M"](nargs), TILE_HEURISTICS["BLOCK_N"](nargs)
    for name, rows, cols in (("q", m, "BLOCK_D"), ("k", n, "BLOCK_D"), ("v", n, "BLOCK_DV"), ("o", m, "BLOCK_DV")):
        nargs[f"{name}_desc"].block_shape = [1, 1, rows, nargs[cols]]


# TMA configs (a pre-hook sizes the descriptors; the pointer configs have none and keep their disk cache). The CSR index
# load is a stage: 3 stages double-buffer K/V, 5 triple-buffer them (sm_90, Triton 3.6); the first fits every shape.
# Lazy rescaling at 128 x 64 with 4 warps only (with 8 warps, or with packed windows, ptxas serialises every wgmma:
# C7515; the autotuner then drops it) and under the interpreter (CPU tests cover both forms).
_FWD_TMA_CONFIGS = [
    triton.Config({"TILE_M": m, "TILE_N": n, "LAZY_RESCALE": z}, num_warps=w, num_stages=s, pre_hook=_tma_block_shapes)
    for m, n, w, s, z in [(128, 64, 4, 3, False), (128, 64, 4, 3, True), (128, 128, 8, 5, False)]
    + [(128, 128, 8, 2, False), (128, 64, 4, 5, True), (128, 64, 8, 3, False)]
]
_DEFAULT_TMA_CONFIG = triton.Config({**_DEFAULT_CONFIG.kwargs, "LAZY_RESCALE": True}, 4, 2, pre_hook=_tma_block_shapes)


# ---------------------------------------------------------------------------------------------- argument bundles
# Named tuples that the kernels build at a call site and the helpers read by field (free: they only group SSA values).
# Their UPPER fields are constexprs, which survive only while the tuple is passed straight into a call: assigning a
# tuple to a variable turns its constexprs into tensors (Triton 3.6 and 3.9), so kernels never do.
class _Operand(NamedTuple):
    """A token-major ``(N, D)`` tensor of one (batch, head), read in row tiles: base pointer and strides; with
    ``GATHER``, sequence position ``p`` is stored at row ``rows[p]`` (``rows``: int32 pointer; unread otherwise), so
    a tile-order walk reads raster-order storage without a permuted copy."""

    base: tl.tensor
    stride_n: tl.tensor
    stride_d: tl.tensor
    rows: tl.tensor
    GATHER: tl.constexpr


class _Tiles(NamedTuple):
    """A ``(B, H, N, D)`` tensor read through a rank-4 TMA ``TensorDescriptor`` at batch ``b``, head ``h``: row tiles
    land in shared memory, zero past the sequence and the head dim (the descriptor's shape)."""

    desc: tl.tensor
    b: tl.tensor
    h: tl.tensor


class _Walk(NamedTuple):
    """A CSR row walked in sub-tiles: entries ``[start, split)`` are full blocks, ``[split, end)`` partial ones
    (``indices_ptr``: the block ids); the walked axis has logical blocks of ``block`` tokens in a sequence of
    ``length``, visited as ``SUB`` tiles of ``TILE`` rows each (``EVEN``: no tile is ragged)."""

    indices_ptr: tl.tensor
    start: tl.tensor
    split: tl.tensor
    end: tl.tensor
    block: tl.tensor
    length: tl.tensor
    TILE: tl.constexpr
    SUB: tl.constexpr
    EVEN: tl.constexpr


class _Dims(NamedTuple):
    """Head dims, their power-of-two tiles and the ``tl.dot`` input precision."""

    HEAD_DIM: tl.constexpr
    HEAD_DIM_V: tl.constexpr
    BLOCK_D: tl.constexpr
    BLOCK_DV: tl.constexpr
    DOT_PRECISION: tl.constexpr


@triton.jit
def _bsa_mask_scores(b_s, fixed_pos, loop_pos, n_valid, pred, walk, PREDICATE: tl.constexpr, ROWS_ARE_Q: tl.constexpr):
    """Set disallowed scores to -inf: columns past the block or sequence, and with ``PREDICATE`` (the partial
    blocks' walk) the exact token predicate ``pred``.

    Rows are the program's own tokens at ``fixed_pos``; columns are the ``walk.TILE`` tokens of the visited tile
    at ``loop_pos``, ``n_valid`` of them inside its block. Full blocks skip the column test at run time unless
    their tile is ragged.
    """
    if PREDICATE:
        # positions past the sequence read the last table entry; their scores are masked below or by the caller
        # (an even walk has none in its columns)
        rows = tl.minimum(fixed_pos, pred.tab_len - 1)[:, None]
        cols = loop_pos[None, :] if walk.EVEN else tl.minimum(loop_pos, pred.tab_len - 1)[None, :]
        q_pos, k_pos = (rows, cols) if ROWS_ARE_Q else (cols, rows)
        if pred.MASK_KIND % 4 == _PACKED:
            b_s = _bsa_packed_window_scores(b_s, q_pos, k_pos, pred)
        else:
            b_s = tl.where(_bsa_allowed(q_pos, k_pos, pred), b_s, _MASKED)
    if not walk.EVEN:
        if n_valid < walk.TILE:
            b_s = tl.where((tl.arange(0, walk.TILE) < n_valid)[None, :], b_s, _MASKED)
    return b_s


@triton.jit
def _bsa_row_bounds(indptr_ptr, split_ptr, row, MASK_KIND: tl.constexpr):
    """CSR row ``row``'s ``(start, split, end)``: its full blocks are entries ``[start, split)``, its partial ones
    ``[split, end)`` (``split_ptr``: the row ends of the full blocks, shaped like ``indptr``; unread without a
    predicate, where every block is full)."""
    start = tl.load(indptr_ptr + row)
    end = tl.load(indptr_ptr + row + 1)
    if MASK_KIND == _NONE:
        split = end
    else:
        split = tl.load(split_ptr + row)
    return start, split, end


@triton.jit
def _bsa_program_tile(pid, block, length, SUB: tl.constexpr, BLOCK: tl.constexpr):
    """Program ``pid`` owns sub-tile ``pid % SUB`` of logical block ``pid // SUB``: (block id, start, valid rows)."""
    sub = pid % SUB
    start = (pid // SUB) * block + sub * BLOCK
    return pid // SUB, start, tl.minimum(tl.minimum(BLOCK, block - sub * BLOCK), length - start)


@triton.jit
def _bsa_loop_tile(walk, t):
    """Step ``t`` of ``walk`` visits sub-tile ``t % SUB`` of entry ``t // SUB``: (start, valid rows)."""
    sub = t % walk.SUB
    start = tl.load(walk.indices_ptr + t // walk.SUB) * walk.block + sub * walk.TILE
    return start, tl.minimum(tl.minimum(walk.TILE, walk.block - sub * walk.TILE), walk.length - start)


@triton.jit
def _bsa_load(ptrs, row_ok, col_ok, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    """Load a 2D tile, zero-filling rows/columns outside the logical block (never NaN into a dot)."""
    if EVEN_ROWS and EVEN_COLS:
        x = tl.load(ptrs)
    elif EVEN_ROWS:
        x = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    elif EVEN_COLS:
        x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    return x


# ---------------------------------------------------------------------------------------------- forward
@triton.jit
def _bsa_phase_range(phase: tl.constexpr, walk):
    """Loop steps of ``walk``'s phase ``phase``: 0 visits the full blocks ``[start, split)``, 1 the partial ones
    ``[split, end)`` (with the token predicate), ``SUB`` sub-tiles per block."""
    if phase == 0:
        lo, hi = walk.start, walk.split
    else:
        lo, hi = walk.split, walk.end
    return lo * walk.SUB, hi * walk.SUB


@triton.jit
def _bsa_rows(x, pos, ok):
    """Storage rows of sequence positions ``pos`` in operand ``x`` (``ok``: positions inside the block; the others
    read row 0 and are masked by the caller)."""
    if x.GATHER:
        rows = tl.load(x.rows + pos, mask=ok, other=0)
    else:
        rows = pos
    return rows


@triton.jit
def _bsa_load_step(x, y, walk, t, dims):
    """Step ``t`` of ``walk``: the visited rows' tiles ``[TILE, BLOCK_D]`` of operand ``x`` and ``[TILE, BLOCK_DV]`` of
    ``y`` (K and V, or Q and dO; zero outside the block and the head dims), the first row's token position, which
    rows are inside the block, and how many."""
    o_n = tl.arange(0, walk.TILE)
    o_d = tl.arange(0, dims.BLOCK_D)
    o_dv = tl.arange(0, dims.BLOCK_DV)
    start, n_valid = _bsa_loop_tile(walk, t)
    m_n = o_n < n_valid
    p_x = x.base + _bsa_rows(x, start + o_n, m_n)[:, None] * x.stride_n + o_d[None, :] * x.stride_d
    p_y = y.base + _bsa_rows(y, start + o_n, m_n)[:, None] * y.stride_n + o_dv[None, :] * y.stride_d
    b_x = _bsa_load(p_x, m_n, o_d < dims.HEAD_DIM, walk.EVEN, dims.HEAD_DIM == dims.BLOCK_D)
    b_y = _bsa_load(p_y, m_n, o_dv < dims.HEAD_DIM_V, walk.EVEN, dims.HEAD_DIM_V == dims.BLOCK_DV)
    return b_x, b_y, start, m_n, n_valid


@triton.jit
def _bsa_tma_tile(x, start, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Rows ``[start, start + ROWS)`` of the ``_Tiles`` operand ``x``, ``[ROWS, COLS]``."""
    return x.desc.load([x.b, x.h, start, 0]).reshape(ROWS, COLS)


@triton.jit
def _bsa_scores(b_q, b_k, q_pos, start_n, n_valid, keys, pred, dims, PREDICATE: tl.constexpr):
    """The masked, unscaled scores ``q·k`` ``[BLOCK_M, BLOCK_N]`` of the key tile ``b_k`` at ``start_n`` of ``keys``.
    The callers scale inside ``exp2(s * qk_scale - m)``, one FMA per score (``qk_scale > 0``, so the row maximum of
    the scaled scores is the scaled maximum)."""
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=dims.DOT_PRECISION)
    return _bsa_mask_scores(b_s, q_pos, start_n + tl.arange(0, keys.TILE), n_valid, pred, keys, PREDICATE, True)


@triton.jit
def _bsa_key_tile_scores(b_q, q_pos, t, k, v, keys, pred, dims, PREDICATE: tl.constexpr):
    """Step ``t`` of a query tile's walk ``keys`` over the key blocks: the key tile ``[BLOCK_N, BLOCK_D]`` of ``k``,
    value tile ``[BLOCK_N, BLOCK_DV]`` of ``v`` (``_Operand``s) and the scores (``_bsa_scores``), shared by the
    forward's pointer path and the dQ pass."""
    b_k, b_v, start_n, _, n_valid = _bsa_load_step(k, v, keys, t, dims)
    return b_k, b_v, _bsa_scores(b_q, b_k, q_pos, start_n, n_valid, keys, pred, dims, PREDICATE)


@triton.jit
def _bsa_lazy_rescale(acc, l_i, m_i, m_new):
    """FlashAttention-4's conditional rescaling: move the reference max ``m_i`` to ``m_new`` (rescale ``acc``, ``l_i``)
    only when a row's max grew by more than ``_RESCALE_SLACK`` (``out = acc / l``, ``lse = m + log2 l`` for any m)."""
    if tl.max(m_new - m_i, 0) > _RESCALE_SLACK:
        alpha = tl.math.exp2(m_i - m_new)
        acc, l_i, m_i = acc * alpha[:, None], l_i * alpha, m_new
    return acc, l_i, m_i


@triton.jit
def _block_sparse_fwd_inner(
    acc, m_i, l_i, b_q, q_pos, k, v, qk_scale, keys, pred, dims, TMA: tl.constexpr, LAZY_RESCALE: tl.constexpr
):
    """Online softmax (exp2, fp32) over the sub-tiles of the key blocks of the walk ``keys``; ``k``, ``v`` are
    ``_Operand``s, with ``TMA`` ``_Tiles``; ``LAZY_RESCALE``: ``_bsa_lazy_rescale``."""
    for phase in tl.static_range(1 if pred.MASK_KIND == _NONE else 2):
        lo, hi = _bsa_phase_range(phase, keys)
        for t in range(lo, hi):
            if TMA:
                start_n, n_valid = _bsa_loop_tile(keys, t)
                b_k = _bsa_tma_tile(k, start_n, keys.TILE, dims.BLOCK_D)
                b_v = _bsa_tma_tile(v, start_n, keys.TILE, dims.BLOCK_DV)
                b_s = _bsa_scores(b_q, b_k, q_pos, start_n, n_valid, keys, pred, dims, phase == 1)
            else:
                b_k, b_v, b_s = _bsa_key_tile_scores(b_q, q_pos, t, k, v, keys, pred, dims, phase == 1)
            m_new = tl.maximum(m_i, tl.max(b_s, 1) * qk_scale)
            if LAZY_RESCALE:
                acc, l_i, m_i = _bsa_lazy_rescale(acc, l_i, m_i, m_new)
                b_p = tl.math.exp2(b_s * qk_scale - m_i[:, None])
                l_i += tl.sum(b_p, 1)
                acc = tl.dot(b_p.to(b_v.dtype), b_v, acc, input_precision=dims.DOT_PRECISION)
            else:
                b_p = tl.math.exp2(b_s * qk_scale - m_new[:, None])
                alpha = tl.math.exp2(m_i - m_new)
                l_i = l_i * alpha + tl.sum(b_p, 1)
                acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=dims.DOT_PRECISION)
                m_i = m_new
    return acc, m_i, l_i


@triton.heuristics(TILE_HEURISTICS)
@triton.jit
def _block_sparse_fwd(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    q_desc,
    k_desc,
    v_desc,
    o_desc,
    lse_ptr,
    indptr_ptr,
    indices_ptr,
    split_ptr,
    q_rows_ptr,
    kv_rows_ptr,
    stride_q_b,
    stride_q_h,
    stride_q_n,
    stride_q_d,
    stride_k_b,
    stride_k_h,
    stride_k_n,
    stride_k_d,
    stride_v_b,
    stride_v_h,
    stride_v_n,
    stride_v_d,
    stride_o_b,
    stride_o_h,
    stride_o_n,
    stride_o_d,
    stride_indptr_b,
    stride_indptr_h,
    num_heads,
    q_len,
    kv_len,
    block_q,
    block_k,
    qk_scale,
    qtab_ptr,
    ktab_ptr,
    tab_len,
    radius2,
    TILE_M: tl.constexpr,
    TILE_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    Q_SUB: tl.constexpr,
    K_SUB: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    MASK_KIND: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    GATHER: tl.constexpr,
    TMA: tl.constexpr,
    LAZY_RESCALE: tl.constexpr = False,
):
    i_bh = tl.program_id(1)
    i_b32, i_h32 = i_bh // num_heads, i_bh % num_heads
    i_b, i_h = i_b32.to(tl.int64), i_h32.to(tl.int64)
    i_m, start_m, m_valid = _bsa_program_tile(tl.program_id(0), block_q, q_len, Q_SUB, BLOCK_M)
    o_m = tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_m = o_m < m_valid
    if GATHER:  # raster storage: the rows of this tile's tokens; padding slots (-1) read row 0 and store nothing
        q_rows = tl.load(q_rows_ptr + start_m + o_m, mask=m_m, other=-1)
        m_store = m_m & (q_rows >= 0)
        q_rows = tl.maximum(q_rows, 0)
    else:
        q_rows = start_m + o_m
        m_store = m_m
    # [BLOCK_M, BLOCK_D]
    if TMA:
        b_q = _bsa_tma_tile(_Tiles(q_desc, i_b32, i_h32), start_m, BLOCK_M, BLOCK_D)
    else:
        p_q = q_ptr + i_b * stride_q_b + i_h * stride_q_h
        p_q += q_rows[:, None] * stride_q_n + o_d[None, :] * stride_q_d
        b_q = _bsa_load(p_q, m_m, o_d < HEAD_DIM, EVEN_M, HEAD_DIM == BLOCK_D)
    row_start, row_split, row_end = _bsa_row_bounds(
        indptr_ptr, split_ptr, i_b * stride_indptr_b + i_h * stride_indptr_h + i_m, MASK_KIND
    )
    p_k = k_ptr + i_b * stride_k_b + i_h * stride_k_h
    p_v = v_ptr + i_b * stride_v_b + i_h * stride_v_h
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], _NEG_INF, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _block_sparse_fwd_inner(
        acc,
        m_i,
        l_i,
        b_q,
        start_m + o_m,
        _Tiles(k_desc, i_b32, i_h32) if TMA else _Operand(p_k, stride_k_n, stride_k_d, kv_rows_ptr, GATHER),
        _Tiles(v_desc, i_b32, i_h32) if TMA else _Operand(p_v, stride_v_n, stride_v_d, kv_rows_ptr, GATHER),
        qk_scale,
        _Walk(indices_ptr, row_start, row_split, row_end, block_k, kv_len, BLOCK_N, K_SUB, EVEN_N),
        _Predicate(qtab_ptr, ktab_ptr, tab_len, radius2, MASK_KIND),
        _Dims(HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, DOT_PRECISION),
        TMA,
        LAZY_RESCALE,
    )
    empty = l_i == 0.0
    b_o = acc / tl.where(empty, 1.0, l_i)[:, None]
    if TMA:  # rows past the sequence and columns past the head dim are clipped
        o_desc.store([i_b32, i_h32, start_m, 0], b_o.to(o_desc.dtype).reshape(1, 1, BLOCK_M, BLOCK_DV))
    else:
        p_o = o_ptr + i_b * stride_o_b + i_h * stride_o_h
        p_o += q_rows[:, None] * stride_o_n + o_dv[None, :] * stride_o_d
        tl.store(p_o, b_o.to(o_ptr.dtype.element_ty), mask=m_store[:, None] & (o_dv < HEAD_DIM_V)[None, :])
    b_lse = tl.where(empty, _MASKED, (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * _LN2)
    tl.store(lse_ptr + i_bh.to(tl.int64) * q_len + start_m + o_m, b_lse, mask=m_m)


#: The forward over pointers and over TMA descriptors: one kernel, two tuning tables.
_block_sparse_fwd_kernel = autotune(_FWD_CONFIGS, _DEFAULT_CONFIG, _AUTOTUNE_KEY, prune_configs)(_block_sparse_fwd)
_block_sparse_fwd_tma_kernel = autotune(_FWD_TMA_CONFIGS, _DEFAULT_TMA_CONFIG, _AUTOTUNE_KEY, prune_configs)(
    _block_sparse_fwd
)


# ---------------------------------------------------------------------------------------------- launchers
def empty_like_layout(x: torch.Tensor, last: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(B, H, N, last)`` output stored like ``x``: ``(B, N, H, last)`` memory when x's heads are inner to tokens."""
    b, h, n, _ = x.shape
    dtype = dtype or x.dtype
    if x.stride(1) < x.stride(2):
        return torch.empty(b, n, h, last, device=x.device, dtype=dtype).transpose(1, 2)
    return torch.empty(b, h, n, last, device=x.device, dtype=dtype)


def tma_descriptors(q, k, v, out, block_q: int, block_k: int) -> tuple | None:
    """The forward's TMA descriptors of ``q, k, v, out`` (``bhnd_descriptor``; for ``use_tma`` inputs), or None (the
    pointer path): not fp16/bf16, no TMA, a tensor TMA cannot address, or blocks some TMA tile does not divide (TMA
    zero-fills only past the sequence; a tile crossing a block would read the next block's rows, which the pointer
    path zeroes)."""
    if q.dtype not in (torch.float16, torch.bfloat16) or not has_tma(q.device):
        return None
    for block, cap in ((block_q, "TILE_M"), (block_k, "TILE_N")):
        if any(block % min(next_block(block), c.kwargs[cap]) for c in _block_sparse_fwd_tma_kernel.configs):
            return None
    descs = tuple(bhnd_descriptor(x) for x in (q, k, v, out))
    return None if None in descs else descs


def csr_strides(indptr: torch.Tensor) -> tuple[int, int]:
    """Strides of ``indptr``'s batch and head axes, 0 where the mask broadcasts (size 1)."""
    return tuple(indptr.stride(i) if indptr.shape[i] > 1 else 0 for i in range(2))


def launch_constexprs(q: torch.Tensor, v: torch.Tensor, mask_kind: int) -> dict:
    """Compile-time switches shared by the attention kernels (tiles come from ``TILE_HEURISTICS``); ``mask_kind``
    is the packed ``MASK_KIND`` (``pack_mask_kind``)."""
    return {
        "BLOCK_D": next_block(q.shape[-1]),
        "BLOCK_DV": next_block(v.shape[-1]),
        "HEAD_DIM": q.shape[-1],
        "HEAD_DIM_V": v.shape[-1],
        "MASK_KIND": mask_kind,
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }


def block_sparse_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    split: torch.Tensor,
    *,
    scale: float,
    block_q: int,
    block_k: int,
    mask_kind: int,
    query_table: torch.Tensor | None,
    key_table: torch.Tensor | None,
    radius2: float,
    rows: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid ``(Mq * Q_SUB, B * H)``: one program per query sub-tile x (batch, head) writes ``out`` and ``lse``.

    ``indices``/``split``: the CSR rows with full blocks first (``full_blocks_first``); ``mask_kind`` is the packed
    ``MASK_KIND``; ``query_table``/``key_table`` the ``KernelTables`` of the mask's predicate (None without one) and
    ``radius2`` a circular window's squared radius. ``rows=(q_rows, kv_rows)``, int32 ``(Nq,)`` / ``(Nk,)``: the mask
    walks a permuted sequence (a tile order) that q, k, v and out store in their own order: position ``p`` is
    row ``q_rows[p]`` of q and out (-1: a padding slot, read as row 0, never written) and row ``kv_rows[p]`` of
    k and v; the sequence axis of q, k, v, out is then the storage's own. Where ``use_tma`` says so, q, k, v and out
    move through TMA descriptors if ``tma_descriptors`` allows (never with ``rows``).

    Returns ``out`` ``(B, H, Nq, Dv)`` stored like q (q's length with ``rows``), and ``lse`` ``(B, H, Nq)`` float32
    (natural log, ``-inf`` on rows with no allowed key; in mask order).
    """
    b, h = q.shape[:2]
    q_len, kv_len = (q.shape[2], k.shape[2]) if rows is None else (rows[0].numel(), rows[1].numel())
    out = empty_like_layout(q, v.shape[-1])
    lse = torch.empty(b, h, q_len, device=q.device, dtype=torch.float32)
    grid = lambda meta: (cdiv(q_len, block_q) * meta["Q_SUB"], b * h)
    descs = None
    if rows is None and use_tma(q):
        descs = tma_descriptors(q, k, v, out, block_q, block_k)
    kernel = _block_sparse_fwd_kernel if descs is None else _block_sparse_fwd_tma_kernel
    launch(
        kernel,
        grid,
        q,
        k,
        v,
        out,
        *(descs or (None,) * 4),
        lse,
        indptr,
        indices,
        split,
        *((split, split) if rows is None else rows),
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        *csr_strides(indptr),
        h,
        q_len,
        kv_len,
        block_q,
        block_k,
        scale * LOG2E,
        *predicate_args(query_table, key_table, split),
        radius2,
        GATHER=rows is not None,
        TMA=descs is not None,
        **launch_constexprs(q, v, mask_kind),
    )
    return out, lse
