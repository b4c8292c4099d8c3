"""Non-causal linear attention, RALA's query mean ``q̄ = (1/Nq) Σ_i φ(q̃_i)``: the pass before the state pass.

Grid ``(chunks, B·H)``; each program sums a chunk of rows and writes its partial (already divided by Nq), the
partials are summed in chunk order (deterministic, no atomics). Two forms, chosen by autotuning (``ONES_DOT``):
fp32 row-tile sums reduced once after the loop, whole tiles without a row mask and a masked tail (offline sm_90,
elu+1, D = 64, 8 warps: 357 instructions per 128-row tile and warp, 485 in the other form; with 40-64 registers
several programs share a multiprocessor and hide the latency of the unpipelined loads); or a product with a ones
matrix, whose loads are software-pipelined through shared memory (session 7's form).
"""

import os

import torch
import triton
import triton.language as tl

from ._config import autotune_configs, autotune_kwargs
from ._launch import launch
from .block_sparse import next_block
from .linear import FEATURE_CODES, _load_rows, _phi, chunking, dot_precision

__all__ = ["QUERY_MEAN_PROGRAMS_PER_SM", "linear_query_mean_fwd"]

#: (BLOCK_N, num_warps, num_stages, ONES_DOT): fp32 row-tile sums first, then the ones-matrix dot of session 7.
_QUERY_MEAN_CONFIGS = [
    triton.Config({"BLOCK_N": n, "ONES_DOT": dot}, num_warps=w, num_stages=s)
    for n, w, s, dot in (
        (64, 4, 3, False),
        (128, 8, 3, False),
        (64, 8, 3, False),
        (64, 4, 3, True),
        (128, 4, 3, True),
        (128, 8, 3, True),
    )
]
_QUERY_MEAN_DEFAULT = triton.Config({"BLOCK_N": 16, "ONES_DOT": False}, num_warps=4, num_stages=1)
#: The query mean's programs per multiprocessor: its row-tile configs take 40-64 registers (offline sm_90), so 4-6
#: programs of 8 warps fit on one multiprocessor and more programs hide the latency of its unpipelined loads. The
#: partials (chunks, B, H, D) are summed in chunk order. ``VISIONATTN_LINEAR_QM_PER_SM`` sets it (4: session 7).
QUERY_MEAN_PROGRAMS_PER_SM = int(os.environ.get("VISIONATTN_LINEAR_QM_PER_SM", "8"))


@triton.autotune(
    configs=autotune_configs(_QUERY_MEAN_CONFIGS, _QUERY_MEAN_DEFAULT),
    key=["D", "FEATURE", "chunk_len"],
    **autotune_kwargs(),
)
@triton.jit
def _linear_fwd_kernel_query_mean(
    q_ptr,
    part_ptr,
    stride_q_b,
    stride_q_h,
    stride_q_n,
    stride_q_d,
    H,
    N,
    chunk_len,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FEATURE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONES_DOT: tl.constexpr,
):
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    p_q = q_ptr + i_b * stride_q_b + i_h * stride_q_h + o_d[None, :] * stride_q_d
    start = i_c * chunk_len
    end = tl.minimum(start + chunk_len, N)
    if ONES_DOT:
        # the row sum as a product with a ones matrix (16 identical rows, the smallest dot tile): the tensor cores
        # reduce and a load that feeds a dot is software-pipelined through shared memory (num_stages). The
        # operands take q's dtype (φ(q) rounded to it, as the state pass's dot operands are; sums stay fp32).
        b_ones = tl.full([16, BLOCK_N], 1.0, dtype=q_ptr.dtype.element_ty)
        b_acc = tl.zeros([16, BLOCK_D], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            o_n = n0 + tl.arange(0, BLOCK_N)
            m_n = o_n < end
            # [BLOCK_N, BLOCK_D]
            b_phi = _phi(_load_rows(p_q + o_n[:, None] * stride_q_n, m_n, m_d), m_d, FEATURE)
            b_phi = tl.where(m_n[:, None], b_phi, 0.0).to(q_ptr.dtype.element_ty)
            b_acc = tl.dot(b_ones, b_phi, b_acc, input_precision=DOT_PRECISION)
        b_sum = tl.sum(tl.where(tl.arange(0, 16)[:, None] == 0, b_acc, 0.0), axis=0)
    else:
        # fp32 row-tile sums, reduced over rows once after the loop; whole tiles without a row mask, then the tail
        b_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        full_end = start + (end - start) // BLOCK_N * BLOCK_N
        for n0 in range(start, full_end, BLOCK_N):
            o_n = n0 + tl.arange(0, BLOCK_N)
            b_q = tl.load(p_q + o_n[:, None] * stride_q_n, mask=m_d[None, :], other=0.0).to(tl.float32)
            b_acc += _phi(b_q, m_d, FEATURE)
        if full_end < end:
            o_n = full_end + tl.arange(0, BLOCK_N)
            m_n = o_n < end
            b_phi = _phi(_load_rows(p_q + o_n[:, None] * stride_q_n, m_n, m_d), m_d, FEATURE)
            b_acc += tl.where(m_n[:, None], b_phi, 0.0)
        b_sum = tl.sum(b_acc, axis=0)
    tl.store(part_ptr + (i_c * tl.num_programs(1) + i_bh) * D + o_d, b_sum / N, mask=m_d)


def linear_query_mean_fwd(q: torch.Tensor, feature_map: str, reduce: bool = True) -> torch.Tensor:
    """``(1/Nq) Σ_i φ(q_i)``, ``(B, H, D)`` fp32; without ``reduce`` its chunk partials ``(chunks, B, H, D)``, which
    ``linear_state_fwd`` sums itself (one launch fewer)."""
    b, h, n, d = q.shape
    chunk_len, chunks = chunking(n, b * h, q.device, QUERY_MEAN_PROGRAMS_PER_SM)
    part = torch.empty(chunks, b, h, d, device=q.device, dtype=torch.float32)
    launch(
        _linear_fwd_kernel_query_mean,
        (chunks, b * h),
        q,
        part,
        *q.stride(),
        h,
        n,
        chunk_len,
        D=d,
        BLOCK_D=next_block(d),
        FEATURE=FEATURE_CODES[feature_map],
        DOT_PRECISION=dot_precision(q.dtype),
    )
    return part.sum(dim=0) if reduce else part
