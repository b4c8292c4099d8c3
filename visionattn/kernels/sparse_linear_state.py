"""Sparse-linear attention (SLA): the per-block state reductions of the forward and the backward.

Layout as in ``sparse_linear.py``. ``_sparse_linear_fwd_kernel_state`` (grid ``(ceil(Mk / c), B·H)``) reduces each
logical key block ``j`` to ``h_j = φ(K_j)ᵀV_j`` ``(D, Dv)`` and ``z_j = Σ φ(K_j)`` ``(D,)`` (fp32 accumulation,
stored as ``state_dtype``) and each run of ``c`` blocks to an fp32 partial total; the host sums the few partials
(deterministic ``torch.sum``). ``_sparse_linear_bwd_kernel_state`` (grid ``(ceil(Mq / c), B·H)``) is the backward's
mirror image per query block: ``delta``, ``dden``, ``dS_b = φ(Q_b)ᵀ dn``, ``dz_b = φ(Q_b)ᵀ dden`` and partial totals.
"""

import torch
import triton
import triton.language as tl

from ._config import autotune_configs, autotune_kwargs, is_interpreter
from .block_sparse import cdiv, next_block
from .linear import _phi

__all__ = ["blocks_per_program", "dv_chunk", "sparse_linear_state", "state_dtype"]

# Row tiles of the per-block state reductions (one program walks a run of logical blocks).
_STATE_CONFIGS = [triton.Config({"BLOCK_ROWS": r}, num_warps=w) for r in (32, 64) for w in (4, 8)]
_STATE_DEFAULT = triton.Config({"BLOCK_ROWS": 16}, num_warps=4, num_stages=1)
_STATE_KEY = ["block", "HEAD_DIM", "HEAD_DIM_V", "FEATURE"]
#: Bounds of ``blocks_per_program``: at most 16 blocks per program, at least ~4 programs per H100 SM.
_MAX_BLOCKS_PER_PROGRAM, _MIN_STATE_PROGRAMS = 16, 4 * 132


# ---------------------------------------------------------------------------------------------- shared helpers
@triton.jit
def _sla_dot(a, b, STATE_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``a @ b`` of the linear branch's fp32 tiles: bf16 operands (fp32 accumulation) for bf16 inputs, as SLA-1 casts
    its states to the input dtype, which halves their registers and shared memory; else ``DOT_PRECISION``."""
    if STATE_BF16:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        out = tl.dot(a, b, input_precision=DOT_PRECISION)
    return out


# ---------------------------------------------------------------------------------------------- forward
@triton.autotune(
    configs=autotune_configs(_STATE_CONFIGS, _STATE_DEFAULT),
    key=_STATE_KEY,
    **autotune_kwargs(),
)
@triton.jit
def _sparse_linear_fwd_kernel_state(
    k_ptr,
    v_ptr,
    h_ptr,
    z_ptr,
    h_part_ptr,
    z_part_ptr,
    stride_k_b,
    stride_k_h,
    stride_k_n,
    stride_k_d,
    stride_v_b,
    stride_v_h,
    stride_v_n,
    stride_v_d,
    num_heads,
    length,
    block,
    num_blocks,
    blocks_per_program,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    FEATURE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // num_heads).to(tl.int64)
    i_h = (i_bh % num_heads).to(tl.int64)
    o_r = tl.arange(0, BLOCK_ROWS)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_d = o_d < HEAD_DIM
    m_dv = o_dv < HEAD_DIM_V
    m_dd = m_d[:, None] & m_dv[None, :]
    k_base = k_ptr + i_b * stride_k_b + i_h * stride_k_h
    v_base = v_ptr + i_b * stride_v_b + i_h * stride_v_h
    b_h_part = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    b_z_part = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = i_c * blocks_per_program
    for i_n in range(first, tl.minimum(first + blocks_per_program, num_blocks)):
        start = i_n * block
        end = tl.minimum(start + block, length)
        b_h = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
        b_z = tl.zeros([BLOCK_D], dtype=tl.float32)
        for r in range(start, end, BLOCK_ROWS):
            m_r = (r + o_r) < end
            # [BLOCK_ROWS, BLOCK_D]
            b_k = tl.load(
                k_base + (r + o_r)[:, None] * stride_k_n + o_d[None, :] * stride_k_d,
                mask=m_r[:, None] & m_d[None, :],
                other=0.0,
            )
            b_phi = tl.where(m_r[:, None], _phi(b_k.to(tl.float32), m_d, FEATURE), 0.0)
            # [BLOCK_ROWS, BLOCK_DV], in v's dtype: the dot takes 16-bit operands like SLA-1's c_k
            b_v = tl.load(
                v_base + (r + o_r)[:, None] * stride_v_n + o_dv[None, :] * stride_v_d,
                mask=m_r[:, None] & m_dv[None, :],
                other=0.0,
            )
            b_h += tl.dot(tl.trans(b_phi.to(b_v.dtype)), b_v, input_precision=DOT_PRECISION)
            b_z += tl.sum(b_phi, axis=0)
        b_hs = b_h.to(h_ptr.dtype.element_ty)
        b_zs = b_z.to(z_ptr.dtype.element_ty)
        i_state = i_bh.to(tl.int64) * num_blocks + i_n
        p_h = h_ptr + i_state * (HEAD_DIM * HEAD_DIM_V) + o_d[:, None] * HEAD_DIM_V + o_dv[None, :]
        tl.store(p_h, b_hs, mask=m_dd)
        tl.store(z_ptr + i_state * HEAD_DIM + o_d, b_zs, mask=m_d)
        # the partial totals add the stored (rounded) states, so total minus selected is exact up to fp32 rounding
        b_h_part += b_hs.to(tl.float32)
        b_z_part += b_zs.to(tl.float32)
    i_part = i_bh.to(tl.int64) * tl.num_programs(0) + i_c
    p_hp = h_part_ptr + i_part * (HEAD_DIM * HEAD_DIM_V) + o_d[:, None] * HEAD_DIM_V + o_dv[None, :]
    tl.store(p_hp, b_h_part, mask=m_dd)
    tl.store(z_part_ptr + i_part * HEAD_DIM + o_d, b_z_part, mask=m_d)


# ---------------------------------------------------------------------------------------------- backward
@triton.autotune(
    configs=autotune_configs(_STATE_CONFIGS, _STATE_DEFAULT),
    key=_STATE_KEY,
    **autotune_kwargs(),
)
@triton.jit
def _sparse_linear_bwd_kernel_state(
    q_ptr,
    os_ptr,
    ol_ptr,
    dos_ptr,
    dol_ptr,
    rden_ptr,
    delta_ptr,
    dden_ptr,
    ds_ptr,
    dz_ptr,
    ds_part_ptr,
    dz_part_ptr,
    stride_q_b,
    stride_q_h,
    stride_q_n,
    stride_q_d,
    stride_o_b,
    stride_o_h,
    stride_o_n,
    stride_o_d,
    stride_dos_b,
    stride_dos_h,
    stride_dos_n,
    stride_dos_d,
    stride_dol_b,
    stride_dol_h,
    stride_dol_n,
    stride_dol_d,
    num_heads,
    length,
    block,
    num_blocks,
    blocks_per_program,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    FEATURE: tl.constexpr,
    STATE_BF16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // num_heads).to(tl.int64)
    i_h = (i_bh % num_heads).to(tl.int64)
    o_r = tl.arange(0, BLOCK_ROWS)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_d = o_d < HEAD_DIM
    m_dv = o_dv < HEAD_DIM_V
    m_dd = m_d[:, None] & m_dv[None, :]
    b_ds_part = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    b_dz_part = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = i_c * blocks_per_program
    for i_m in range(first, tl.minimum(first + blocks_per_program, num_blocks)):
        start = i_m * block
        end = tl.minimum(start + block, length)
        b_ds = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
        b_dz = tl.zeros([BLOCK_D], dtype=tl.float32)
        for r in range(start, end, BLOCK_ROWS):
            rows = r + o_r
            m_r = rows < end
            m_rv = m_r[:, None] & m_dv[None, :]
            p_q = q_ptr + i_b * stride_q_b + i_h * stride_q_h + rows[:, None] * stride_q_n + o_d[None, :] * stride_q_d
            # [BLOCK_ROWS, BLOCK_D]
            b_q = tl.load(p_q, mask=m_r[:, None] & m_d[None, :], other=0.0).to(tl.float32)
            b_phq = tl.where(m_r[:, None], _phi(b_q, m_d, FEATURE), 0.0)
            p_o = i_b * stride_o_b + i_h * stride_o_h + rows[:, None] * stride_o_n + o_dv[None, :] * stride_o_d
            p_dos = (
                i_b * stride_dos_b + i_h * stride_dos_h + rows[:, None] * stride_dos_n + o_dv[None, :] * stride_dos_d
            )
            p_dol = (
                i_b * stride_dol_b + i_h * stride_dol_h + rows[:, None] * stride_dol_n + o_dv[None, :] * stride_dol_d
            )
            # [BLOCK_ROWS, BLOCK_DV]
            b_os = tl.load(os_ptr + p_o, mask=m_rv, other=0.0).to(tl.float32)
            b_dos = tl.load(dos_ptr + p_dos, mask=m_rv, other=0.0).to(tl.float32)
            b_ol = tl.load(ol_ptr + p_o, mask=m_rv, other=0.0).to(tl.float32)
            b_dol = tl.load(dol_ptr + p_dol, mask=m_rv, other=0.0).to(tl.float32)
            p_row = i_bh.to(tl.int64) * length + rows
            b_rden = tl.load(rden_ptr + p_row, mask=m_r, other=0.0)
            b_dden = -tl.sum(b_ol * b_dol, axis=1) * b_rden
            tl.store(delta_ptr + p_row, tl.sum(b_os * b_dos, axis=1), mask=m_r)
            tl.store(dden_ptr + p_row, b_dden, mask=m_r)
            b_ds += _sla_dot(tl.trans(b_phq), b_dol * b_rden[:, None], STATE_BF16, DOT_PRECISION)
            b_dz += tl.sum(b_phq * b_dden[:, None], axis=0)
        i_state = i_bh.to(tl.int64) * num_blocks + i_m
        p_ds = ds_ptr + i_state * (HEAD_DIM * HEAD_DIM_V) + o_d[:, None] * HEAD_DIM_V + o_dv[None, :]
        b_dss = b_ds.to(ds_ptr.dtype.element_ty)
        b_dzs = b_dz.to(dz_ptr.dtype.element_ty)
        tl.store(p_ds, b_dss, mask=m_dd)
        tl.store(dz_ptr + i_state * HEAD_DIM + o_d, b_dzs, mask=m_d)
        b_ds_part += b_dss.to(tl.float32)
        b_dz_part += b_dzs.to(tl.float32)
    i_part = i_bh.to(tl.int64) * tl.num_programs(0) + i_c
    p_dsp = ds_part_ptr + i_part * (HEAD_DIM * HEAD_DIM_V) + o_d[:, None] * HEAD_DIM_V + o_dv[None, :]
    tl.store(p_dsp, b_ds_part, mask=m_dd)
    tl.store(dz_part_ptr + i_part * HEAD_DIM + o_d, b_dz_part, mask=m_d)


# ---------------------------------------------------------------------------------------------- launchers
def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage of the per-block states: bf16 for bf16 inputs (as SLA-1 stores them in the input dtype), which halves
    the bytes the fused kernels re-read per selected block; fp32 otherwise (fp16's range is too narrow for the
    backward's ``dS_b``, and fp32 inputs are the exact test path). Running sums are always fp32."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def dv_chunk(dv: int) -> int:
    """Value columns of the marginal state a fused kernel holds at once: 64 (a 128 x 64 fp32 slice of a 128-wide
    state, half the registers), 16 under the interpreter so small CPU tests walk several chunks."""
    return min(next_block(dv), 16 if is_interpreter() else 64)


def blocks_per_program(num_blocks: int, batch_heads: int) -> int:
    """Logical blocks one state-reduction program walks: few enough partial totals that summing them is cheap
    (the per-block states of a whole call are ~1 GB at the SLA benchmark shape), enough programs to fill the GPU."""
    if is_interpreter():
        return 2
    return max(1, min(_MAX_BLOCKS_PER_PROGRAM, num_blocks * batch_heads // _MIN_STATE_PROGRAMS))


def sparse_linear_state(
    k: torch.Tensor, v: torch.Tensor, block_k: int, feature: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grid ``(ceil(Mk / c), B * H)``: ``c`` consecutive key blocks per program, each reduced to
    ``h_j = φ(K_j)ᵀV_j``, ``z_j = Σ φ(K_j)`` (fp32 accumulation), plus the program's fp32 partial totals.

    Returns ``h (B·H, Mk, D, Dv)``, ``z (B·H, Mk, D)`` in ``state_dtype(k.dtype)`` and their fp32 sums over blocks
    ``(B·H, D, Dv)``, ``(B·H, D)`` (partials summed in chunk order: deterministic).
    """
    b, h, n, d = k.shape
    dv = v.shape[-1]
    blocks = cdiv(n, block_k)
    chunk = blocks_per_program(blocks, b * h)
    chunks = cdiv(blocks, chunk)
    h_blocks = torch.empty(b * h, blocks, d, dv, device=k.device, dtype=state_dtype(k.dtype))
    z_blocks = torch.empty(b * h, blocks, d, device=k.device, dtype=state_dtype(k.dtype))
    h_part = torch.empty(b * h, chunks, d, dv, device=k.device, dtype=torch.float32)
    z_part = torch.empty(b * h, chunks, d, device=k.device, dtype=torch.float32)
    _sparse_linear_fwd_kernel_state[(chunks, b * h)](
        k,
        v,
        h_blocks,
        z_blocks,
        h_part,
        z_part,
        *k.stride(),
        *v.stride(),
        h,
        n,
        block_k,
        blocks,
        chunk,
        BLOCK_D=next_block(d),
        BLOCK_DV=next_block(dv),
        HEAD_DIM=d,
        HEAD_DIM_V=dv,
        FEATURE=feature,
        DOT_PRECISION="ieee" if k.dtype == torch.float32 else "tf32",
    )
    return h_blocks, z_blocks, h_part.sum(1), z_part.sum(1)
