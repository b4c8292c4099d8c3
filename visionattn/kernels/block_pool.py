"""Block means of SLA's critical-block selection: ``Q̄`` and the mean-centred ``K̄`` read in place, with no tensor of
q's or k's size written (``K − 1μᵀ`` is never materialised).

For ``x`` ``(B, H, N, D)`` and blocks of ``block`` rows, ``x̄_j = (1 / |J_j|) Σ_{n ∈ J_j} x_n`` with ``J_j`` the rows of
block ``j`` (a short last block is averaged over its own rows). The keys are centred first, element by element as
``visionattn.layout.topk_ratio_block_mask`` materialises them: ``μ = fl(Σ_n k_n / N)`` and ``fl(k_n − μ)``, with
``fl`` the rounding to k's dtype. Sums accumulate in fp32; means multiply by the fp32 reciprocal of the row count (as
PyTorch's CUDA mean and its division by a Python number do) and are stored in the input dtype.

Two passes over k, one over q:

1. ``_block_pool_fwd_kernel_key_sum`` (grid ``(chunks, B·H)``): fp32 sums of k over each chunk of rows, per channel,
   into ``(B·H, chunks, BLOCK_D)`` partials (at most 32 KB per ``(b, h)``).
2. ``_block_pool_fwd_kernel`` (grid ``(programs, B·H)``, each program a run of consecutive blocks), launched for q and
   for k (``CENTRED``): for k each program first reduces the partials of its ``(b, h)`` to ``μ``.

Both reductions run in a fixed order (a fixed tile shape, no atomics, no autotuning), so the pooled values, and with
them the selected blocks, do not change from run to run. Layout: any strides (``(B, N, H, D)`` storage is read in
place); outputs ``(B, H, M, D)`` contiguous.
"""

import torch
import triton
import triton.language as tl

from ._config import is_interpreter
from ._launch import launch
from .block_sparse import cdiv, next_block

__all__ = ["block_pool_fwd"]

#: Rows per tile load, and warps. Memory-bound: what counts is the bytes in flight per SM. A 32 x 128 tile with 8 warps
#: compiles to 40-64 registers (offline, sm_90, bf16, D = 128: 8 CTAs of 8 KB loads per SM), where 64 x 128 with 4
#: warps takes 190 in the centring pass (2 CTAs per SM). 8 rows under the interpreter, so tiny tests walk several tiles.
_BLOCK_ROWS = 8 if is_interpreter() else 32
_NUM_WARPS = 8
#: Rows one program reduces (pass 1: a chunk of k; pass 2: a run of whole blocks), about 256 KB of bf16 at D = 128:
#: at B2 H16 N32760, 1,024 programs per pass. Smaller under the interpreter, so tiny tests launch several programs.
_PROGRAM_ROWS = 32 if is_interpreter() else 1024
#: Most chunks of pass 1: each pass-2 program of k re-reads its ``(b, h)``'s partials (32 KB at D = 128) from L2.
_MAX_CHUNKS = 64


# ---------------------------------------------------------------------------------------------- forward
@triton.jit
def _load_rows(base, o_n, end, o_d, m_d, stride_n, stride_d):
    """Rows ``o_n`` (those below ``end``) of a ``(N, D)`` operand at ``base``, ``[BLOCK_ROWS, BLOCK_D]`` in fp32, zero
    outside the rows and the head dim."""
    p = base + o_n.to(tl.int64)[:, None] * stride_n + o_d[None, :] * stride_d
    return tl.load(p, mask=(o_n < end)[:, None] & m_d[None, :], other=0.0).to(tl.float32)


@triton.jit
def _block_pool_fwd_kernel_key_sum(
    k_ptr,
    partial_ptr,
    stride_k_b,
    stride_k_h,
    stride_k_n,
    stride_k_d,
    num_heads,
    length,
    chunk_rows,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
):
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // num_heads).to(tl.int64)
    i_h = (i_bh % num_heads).to(tl.int64)
    o_r = tl.arange(0, BLOCK_ROWS)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    k_base = k_ptr + i_b * stride_k_b + i_h * stride_k_h
    start = i_c * chunk_rows
    end = tl.minimum(start + chunk_rows, length)
    b_acc = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)
    for r in range(start, end, BLOCK_ROWS):
        b_acc += _load_rows(k_base, r + o_r, end, o_d, m_d, stride_k_n, stride_k_d)
    # every chunk writes all BLOCK_D channels (zeros past the head dim and for an empty chunk): pass 2 loads unmasked
    p_partial = partial_ptr + (i_bh.to(tl.int64) * NUM_CHUNKS + i_c) * BLOCK_D + o_d
    tl.store(p_partial, tl.sum(b_acc, axis=0))


@triton.jit
def _block_pool_fwd_kernel(
    x_ptr,
    partial_ptr,
    out_ptr,
    stride_x_b,
    stride_x_h,
    stride_x_n,
    stride_x_d,
    num_heads,
    length,
    block,
    num_blocks,
    blocks_per_program,
    inv_length,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
    CENTRED: tl.constexpr,
):
    i_p = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // num_heads).to(tl.int64)
    i_h = (i_bh % num_heads).to(tl.int64)
    o_r = tl.arange(0, BLOCK_ROWS)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    x_base = x_ptr + i_b * stride_x_b + i_h * stride_x_h
    b_mu = tl.zeros([BLOCK_D], dtype=tl.float32)
    if CENTRED:
        # [NUM_CHUNKS, BLOCK_D]
        b_part = tl.load(
            partial_ptr
            + i_bh.to(tl.int64) * NUM_CHUNKS * BLOCK_D
            + tl.arange(0, NUM_CHUNKS)[:, None] * BLOCK_D
            + o_d[None, :]
        )
        b_mu = (tl.sum(b_part, axis=0) * inv_length).to(x_ptr.dtype.element_ty).to(tl.float32)
    first = i_p * blocks_per_program
    for j in range(first, tl.minimum(first + blocks_per_program, num_blocks)):
        start = j * block
        end = tl.minimum(start + block, length)
        b_acc = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)
        for r in range(start, end, BLOCK_ROWS):
            o_n = r + o_r
            m_r = o_n < end
            b_x = _load_rows(x_base, o_n, end, o_d, m_d, stride_x_n, stride_x_d)
            if CENTRED:
                # k − μ rounded to k's dtype, as the materialised centred keys hold it (padding rows stay 0)
                b_x = tl.where(m_r[:, None], (b_x - b_mu[None, :]).to(x_ptr.dtype.element_ty).to(tl.float32), 0.0)
            b_acc += b_x
        b_mean = tl.sum(b_acc, axis=0) * tl.math.div_rn(1.0, (end - start).to(tl.float32))
        p_out = out_ptr + (i_bh.to(tl.int64) * num_blocks + j) * HEAD_DIM + o_d
        tl.store(p_out, b_mean.to(out_ptr.dtype.element_ty), mask=m_d)


# ---------------------------------------------------------------------------------------------- launchers
def _pool(x: torch.Tensor, block: int, partials: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, H, ceil(N / block), D)`` block means of ``x`` in its dtype, of ``x − μ`` given pass 1's ``partials``
    (of this ``x``)."""
    b, h, n, d = x.shape
    num_blocks = cdiv(n, block)
    out = torch.empty(b, h, num_blocks, d, device=x.device, dtype=x.dtype)
    per_program = max(1, _PROGRAM_ROWS // block)
    launch(
        _block_pool_fwd_kernel,
        (cdiv(num_blocks, per_program), b * h),
        x,
        out if partials is None else partials,
        out,
        *x.stride(),
        h,
        n,
        block,
        num_blocks,
        per_program,
        0.0 if partials is None else 1.0 / n,
        HEAD_DIM=d,
        BLOCK_D=next_block(d),
        BLOCK_ROWS=_BLOCK_ROWS,
        NUM_CHUNKS=1 if partials is None else partials.shape[1],
        CENTRED=partials is not None,
        num_warps=_NUM_WARPS,
    )
    return out


def block_pool_fwd(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q̄ (B, H, Mq, D), K̄ (B, H, Mk, D))``: block means of q and of the mean-centred k, in their dtypes.

    Pass 1 (grid ``(chunks, B·H)``, a power of two of at most ``_MAX_CHUNKS`` chunks of about ``_PROGRAM_ROWS`` rows)
    sums k; pass 2 (grid ``(ceil(M / blocks per program), B·H)``) pools q and then the centred k.
    """
    b, h, n, d = k.shape
    chunks = min(_MAX_CHUNKS, 1 << (cdiv(n, _PROGRAM_ROWS) - 1).bit_length())
    block_d = next_block(d)
    partials = torch.empty(b * h, chunks, block_d, device=k.device, dtype=torch.float32)
    launch(
        _block_pool_fwd_kernel_key_sum,
        (chunks, b * h),
        k,
        partials,
        *k.stride(),
        h,
        n,
        cdiv(n, chunks),
        HEAD_DIM=d,
        BLOCK_D=block_d,
        BLOCK_ROWS=_BLOCK_ROWS,
        NUM_CHUNKS=chunks,
        num_warps=_NUM_WARPS,
    )
    return _pool(q, block_q), _pool(k, block_k, partials)
