"""Sparse-linear attention (SLA), backward: the block-sparse dQ/dK/dV loops plus the linear branch, fused.

With ``n_i = φ(q_i)ᵀS_b``, ``den_i = φ(q_i)·z_b + eps``, ``o_l,i = n_i / den_i`` (``S_b, z_b`` the marginal state of
query block ``b``) and the upstream gradient ``dO_l``, the linear branch needs per query row
``dn_i = dO_l,i / den_i`` and ``dden_i = −(dO_l,i·o_l,i) / den_i``, and gives

    dφ(q_i) = S_b dn_i + z_b dden_i,     dS_b = Σ_{i∈b} φ(q_i) dn_iᵀ,     dz_b = Σ_{i∈b} φ(q_i) dden_i,
    dφ(k_j) = A_j v_j + a_j,  dv_j += A_jᵀ φ(k_j),   A_j = Σ_{b: j marginal for b} dS_b  (a_j likewise from dz_b).

``A_j`` is formed like the forward's marginal state, from the key side: the total over query blocks minus the
query blocks for which ``j`` is critical or negligible (the transposed CSRs). Launches: the forward's per-key-block
states (recomputed, not stored), a per-query-block pre-pass (``delta = rowsum(dO_s·O_s)``, ``dden``, ``dS_b``,
``dz_b``), dQ per query tile over the critical row CSR, dK/dV per key tile over the transposed CSRs. Deterministic:
every output tile has one owner program and the block totals are ``torch.sum``.
"""

import torch
import triton
import triton.language as tl

from ._config import autotune_configs, autotune_kwargs
from ._constants import LOG2E
from .block_sparse import (
    MASK_NONE,
    TILE_HEURISTICS,
    _bsa_load,
    _bsa_program_tile,
    _Dims,
    _Operand,
    _Predicate,
    _Walk,
    cdiv,
    csr_strides,
    empty_like_layout,
    launch_constexprs,
    next_block,
    predicate_args,
    prune_configs,
)
from .block_sparse_bwd import _block_sparse_bwd_dkdv_inner, _block_sparse_bwd_dq_inner
from .linear import _phi, _phi_bwd
from .sparse_linear import _sla_marginal_state
from .sparse_linear_state import (
    _sla_dot,
    _sparse_linear_bwd_kernel_state,
    blocks_per_program,
    dv_chunk,
    sparse_linear_state,
    state_dtype,
)

__all__ = ["sparse_linear_bwd"]

_LOG2E = tl.constexpr(LOG2E)
_INF = tl.constexpr(float("inf"))

# TILE_M / TILE_N cap the query / key tiles of both kernels (dQ owns query rows, dK/dV key rows).
# 8 warps only: with the linear branch's state slice, 4-warp tiles spill (ptxas for sm_90a at D = 128). The first
# config (the only one with VISIONATTN_AUTOTUNE=0) is unpipelined: at D = 128 with fp32 states (fp16 inputs) the
# dK/dV kernel needs 238 KB of shared memory (> 227 KB) with 2 stages even at 64 x 64 tiles; the autotuner skips
# configs that do not fit.
_BWD_CONFIGS = [
    triton.Config({"TILE_M": m, "TILE_N": n}, num_warps=8, num_stages=s)
    for m, n, s in [(64, 64, 1), (64, 64, 2), (64, 128, 2), (128, 64, 2), (64, 64, 3), (128, 128, 1)]
]
_BWD_DEFAULT = triton.Config({"TILE_M": 16, "TILE_N": 16}, num_warps=4, num_stages=2)
_BWD_KEY = ["block_q", "block_k", "HEAD_DIM", "HEAD_DIM_V", "FEATURE"]


@triton.autotune(
    configs=autotune_configs(_BWD_CONFIGS, _BWD_DEFAULT),
    key=_BWD_KEY,
    prune_configs_by={"early_config_prune": prune_configs},
    **autotune_kwargs(),
)
@triton.heuristics(TILE_HEURISTICS)
@triton.jit
def _sparse_linear_bwd_kernel_dq(
    q_ptr,
    k_ptr,
    v_ptr,
    dos_ptr,
    dol_ptr,
    lse_ptr,
    delta_ptr,
    rden_ptr,
    dden_ptr,
    h_ptr,
    z_ptr,
    h_tot_ptr,
    z_tot_ptr,
    dq_ptr,
    indptr_ptr,
    indices_ptr,
    neg_indptr_ptr,
    neg_indices_ptr,
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
    stride_dos_b,
    stride_dos_h,
    stride_dos_n,
    stride_dos_d,
    stride_dol_b,
    stride_dol_h,
    stride_dol_n,
    stride_dol_d,
    stride_dq_b,
    stride_dq_h,
    stride_dq_n,
    stride_dq_d,
    stride_indptr_b,
    stride_indptr_h,
    stride_neg_b,
    stride_neg_h,
    num_heads,
    q_len,
    kv_len,
    block_q,
    block_k,
    num_kv_blocks,
    scale,
    qtab_ptr,
    ktab_ptr,
    tab_len,
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
    FEATURE: tl.constexpr,
    STATE_BF16: tl.constexpr,
    DV_CHUNK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_bh = tl.program_id(1)
    i_b = (i_bh // num_heads).to(tl.int64)
    i_h = (i_bh % num_heads).to(tl.int64)
    i_m, start_m, m_valid = _bsa_program_tile(tl.program_id(0), block_q, q_len, Q_SUB, BLOCK_M)
    o_m = tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_m = o_m < m_valid
    m_d = o_d < HEAD_DIM
    rows = (start_m + o_m)[:, None]
    p_q = q_ptr + i_b * stride_q_b + i_h * stride_q_h + rows * stride_q_n + o_d[None, :] * stride_q_d
    p_dos = dos_ptr + i_b * stride_dos_b + i_h * stride_dos_h + rows * stride_dos_n + o_dv[None, :] * stride_dos_d
    # [BLOCK_M, BLOCK_D]
    b_q = _bsa_load(p_q, m_m, m_d, EVEN_M, HEAD_DIM == BLOCK_D)
    # [BLOCK_M, BLOCK_DV]
    b_dos = _bsa_load(p_dos, m_m, o_dv < HEAD_DIM_V, EVEN_M, HEAD_DIM_V == BLOCK_DV)
    p_row = i_bh.to(tl.int64) * q_len + start_m + o_m
    b_lse = tl.load(lse_ptr + p_row, mask=m_m, other=_INF)
    b_lse2 = tl.where(b_lse == -_INF, _INF, b_lse * _LOG2E)
    b_delta = tl.load(delta_ptr + p_row, mask=m_m, other=0.0)
    row = indptr_ptr + i_b * stride_indptr_b + i_h * stride_indptr_h + i_m
    crit_start = tl.load(row)
    crit_end = tl.load(row + 1)
    # -- linear part first: its D x Dv state is dead before the loop's tiles are live
    # dφ(q) = dn Sᵀ + dden z, through φ
    neg_row = neg_indptr_ptr + i_b * stride_neg_b + i_h * stride_neg_h + i_m
    neg_start = tl.load(neg_row)
    neg_end = tl.load(neg_row + 1)
    b_rden = tl.load(rden_ptr + p_row, mask=m_m, other=0.0)
    b_dden = tl.load(dden_ptr + p_row, mask=m_m, other=0.0)
    b_dphq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for c in tl.static_range(0, BLOCK_DV, DV_CHUNK):
        # [BLOCK_D, DV_CHUNK]
        b_s, b_z, _ = _sla_marginal_state(
            h_tot_ptr + i_bh.to(tl.int64) * (HEAD_DIM * HEAD_DIM_V),
            z_tot_ptr + i_bh.to(tl.int64) * HEAD_DIM,
            h_ptr + i_bh.to(tl.int64) * num_kv_blocks * (HEAD_DIM * HEAD_DIM_V),
            z_ptr + i_bh.to(tl.int64) * num_kv_blocks * HEAD_DIM,
            indices_ptr,
            crit_start,
            crit_end,
            neg_indices_ptr,
            neg_start,
            neg_end,
            num_kv_blocks,
            c,
            HEAD_DIM,
            HEAD_DIM_V,
            BLOCK_D,
            DV_CHUNK,
        )
        o_c = c + tl.arange(0, DV_CHUNK)
        p_dol = dol_ptr + i_b * stride_dol_b + i_h * stride_dol_h + rows * stride_dol_n + o_c[None, :] * stride_dol_d
        # [BLOCK_M, DV_CHUNK]
        b_dn = tl.load(p_dol, mask=m_m[:, None] & (o_c < HEAD_DIM_V)[None, :], other=0.0).to(tl.float32)
        b_dphq += _sla_dot(b_dn * b_rden[:, None], tl.trans(b_s), STATE_BF16, DOT_PRECISION)
    b_dphq += b_dden[:, None] * b_z[None, :]
    b_qf = b_q.to(tl.float32)
    b_phq = _phi(b_qf, m_d, FEATURE)
    # the sparse loop accumulates unscaled and the sum is scaled once at the end
    dq = _phi_bwd(b_qf, b_phq, b_dphq, FEATURE) / scale
    # -- sparse part
    dq = _block_sparse_bwd_dq_inner(
        dq,
        b_q,
        b_dos,
        b_lse2,
        b_delta,
        start_m + o_m,
        _Operand(k_ptr + i_b * stride_k_b + i_h * stride_k_h, stride_k_n, stride_k_d),
        _Operand(v_ptr + i_b * stride_v_b + i_h * stride_v_h, stride_v_n, stride_v_d),
        scale * _LOG2E,
        _Walk(indices_ptr, crit_start, crit_end, crit_end, block_k, kv_len, BLOCK_N, K_SUB, EVEN_N),
        _Predicate(qtab_ptr, ktab_ptr, tab_len, 0.0, MASK_KIND),
        _Dims(HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, DOT_PRECISION),
    )
    dq = dq * scale
    p_dq = dq_ptr + i_b * stride_dq_b + i_h * stride_dq_h + rows * stride_dq_n + o_d[None, :] * stride_dq_d
    tl.store(p_dq, dq.to(dq_ptr.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])


@triton.autotune(
    configs=autotune_configs(_BWD_CONFIGS, _BWD_DEFAULT),
    key=_BWD_KEY,
    prune_configs_by={"early_config_prune": prune_configs},
    **autotune_kwargs(),
)
@triton.heuristics(TILE_HEURISTICS)
@triton.jit
def _sparse_linear_bwd_kernel_dkdv(
    q_ptr,
    k_ptr,
    v_ptr,
    dos_ptr,
    lse_ptr,
    delta_ptr,
    ds_ptr,
    dz_ptr,
    ds_tot_ptr,
    dz_tot_ptr,
    dk_ptr,
    dv_ptr,
    indptr_ptr,
    indices_ptr,
    neg_indptr_ptr,
    neg_indices_ptr,
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
    stride_dos_b,
    stride_dos_h,
    stride_dos_n,
    stride_dos_d,
    stride_dk_b,
    stride_dk_h,
    stride_dk_n,
    stride_dk_d,
    stride_dv_b,
    stride_dv_h,
    stride_dv_n,
    stride_dv_d,
    stride_indptr_b,
    stride_indptr_h,
    stride_neg_b,
    stride_neg_h,
    num_heads,
    q_len,
    kv_len,
    block_q,
    block_k,
    num_q_blocks,
    scale,
    qtab_ptr,
    ktab_ptr,
    tab_len,
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
    FEATURE: tl.constexpr,
    STATE_BF16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_bh = tl.program_id(1)
    i_b = (i_bh // num_heads).to(tl.int64)
    i_h = (i_bh % num_heads).to(tl.int64)
    i_n, start_n, n_valid = _bsa_program_tile(tl.program_id(0), block_k, kv_len, K_SUB, BLOCK_N)
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_n = o_n < n_valid
    m_d = o_d < HEAD_DIM
    m_dv = o_dv < HEAD_DIM_V
    rows = (start_n + o_n)[:, None]
    p_k = k_ptr + i_b * stride_k_b + i_h * stride_k_h + rows * stride_k_n + o_d[None, :] * stride_k_d
    p_v = v_ptr + i_b * stride_v_b + i_h * stride_v_h + rows * stride_v_n + o_dv[None, :] * stride_v_d
    # [BLOCK_N, BLOCK_D]
    b_k = _bsa_load(p_k, m_n, m_d, EVEN_N, HEAD_DIM == BLOCK_D)
    # [BLOCK_N, BLOCK_DV]
    b_v = _bsa_load(p_v, m_n, m_dv, EVEN_N, HEAD_DIM_V == BLOCK_DV)
    col = indptr_ptr + i_b * stride_indptr_b + i_h * stride_indptr_h + i_n
    crit_start = tl.load(col)
    crit_end = tl.load(col + 1)
    # -- linear part first (its D x Dv state dies before the loop):
    # A = Σ of dS_b over the query blocks for which this key block is marginal
    neg_col = neg_indptr_ptr + i_b * stride_neg_b + i_h * stride_neg_h + i_n
    b_a, b_az, has_marginal = _sla_marginal_state(
        ds_tot_ptr + i_bh.to(tl.int64) * (HEAD_DIM * HEAD_DIM_V),
        dz_tot_ptr + i_bh.to(tl.int64) * HEAD_DIM,
        ds_ptr + i_bh.to(tl.int64) * num_q_blocks * (HEAD_DIM * HEAD_DIM_V),
        dz_ptr + i_bh.to(tl.int64) * num_q_blocks * HEAD_DIM,
        indices_ptr,
        crit_start,
        crit_end,
        neg_indices_ptr,
        tl.load(neg_col),
        tl.load(neg_col + 1),
        num_q_blocks,
        0,
        HEAD_DIM,
        HEAD_DIM_V,
        BLOCK_D,
        BLOCK_DV,
    )
    b_a = tl.where(has_marginal, b_a, 0.0)
    b_az = tl.where(has_marginal, b_az, 0.0)
    b_kf = b_k.to(tl.float32)
    b_phk = _phi(b_kf, m_d, FEATURE)
    dv = _sla_dot(b_phk, b_a, STATE_BF16, DOT_PRECISION)
    b_dphk = _sla_dot(b_v.to(tl.float32), tl.trans(b_a), STATE_BF16, DOT_PRECISION) + b_az[None, :]
    # the sparse loop accumulates dk unscaled and the sum is scaled once at the end
    dk = _phi_bwd(b_kf, b_phk, b_dphk, FEATURE) / scale
    # -- sparse part over the query blocks for which this key block is critical
    dk, dv = _block_sparse_bwd_dkdv_inner(
        dk,
        dv,
        b_k,
        b_v,
        start_n + o_n,
        _Operand(q_ptr + i_b * stride_q_b + i_h * stride_q_h, stride_q_n, stride_q_d),
        _Operand(dos_ptr + i_b * stride_dos_b + i_h * stride_dos_h, stride_dos_n, stride_dos_d),
        lse_ptr + i_bh.to(tl.int64) * q_len,
        delta_ptr + i_bh.to(tl.int64) * q_len,
        scale * _LOG2E,
        _Walk(indices_ptr, crit_start, crit_end, crit_end, block_q, q_len, BLOCK_M, Q_SUB, EVEN_M),
        _Predicate(qtab_ptr, ktab_ptr, tab_len, 0.0, MASK_KIND),
        _Dims(HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, DOT_PRECISION),
    )
    dk = dk * scale
    p_dk = dk_ptr + i_b * stride_dk_b + i_h * stride_dk_h + rows * stride_dk_n + o_d[None, :] * stride_dk_d
    p_dv = dv_ptr + i_b * stride_dv_b + i_h * stride_dv_h + rows * stride_dv_n + o_dv[None, :] * stride_dv_d
    tl.store(p_dk, dk.to(dk_ptr.dtype.element_ty), mask=m_n[:, None] & m_d[None, :])
    tl.store(p_dv, dv.to(dv_ptr.dtype.element_ty), mask=m_n[:, None] & m_dv[None, :])


# ---------------------------------------------------------------------------------------------- launcher
def sparse_linear_bwd(
    do_sparse: torch.Tensor,
    do_linear: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o_sparse: torch.Tensor,
    o_linear: torch.Tensor,
    lse: torch.Tensor,
    rden: torch.Tensor,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    partial: torch.Tensor,
    neg_indptr: torch.Tensor,
    neg_indices: torch.Tensor,
    *,
    scale: float,
    block_q: int,
    block_k: int,
    feature: int,
    key_major: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four launches: key-block states, query-block pre-pass (``c`` blocks per program), dQ per query sub-tile,
    dK/dV per key sub-tile over the transposed CSRs ``key_major`` = ``(indptr_t, indices_t, neg_indptr_t,
    neg_indices_t)`` (``transpose_csr`` of the critical and negligible rows, built by the caller).

    Returns ``dq``, ``dk``, ``dv`` stored like ``q``, ``k``, ``v``.
    """
    b, h, q_len, d = q.shape
    kv_len, dv_dim = k.shape[2], v.shape[-1]
    mq, mk = cdiv(q_len, block_q), cdiv(kv_len, block_k)
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    h_blocks, z_blocks, h_tot, z_tot = sparse_linear_state(k, v, block_k, feature)
    delta = torch.empty(b, h, q_len, device=q.device, dtype=torch.float32)
    dden = torch.empty_like(delta)
    ds_blocks = torch.empty(b * h, mq, d, dv_dim, device=q.device, dtype=state_dtype(q.dtype))
    dz_blocks = torch.empty(b * h, mq, d, device=q.device, dtype=state_dtype(q.dtype))
    chunk = blocks_per_program(mq, b * h)
    chunks = cdiv(mq, chunk)
    ds_part = torch.empty(b * h, chunks, d, dv_dim, device=q.device, dtype=torch.float32)
    dz_part = torch.empty(b * h, chunks, d, device=q.device, dtype=torch.float32)
    _sparse_linear_bwd_kernel_state[(chunks, b * h)](
        q,
        o_sparse,
        o_linear,
        do_sparse,
        do_linear,
        rden,
        delta,
        dden,
        ds_blocks,
        dz_blocks,
        ds_part,
        dz_part,
        *q.stride(),
        *o_sparse.stride(),
        *do_sparse.stride(),
        *do_linear.stride(),
        h,
        q_len,
        block_q,
        mq,
        chunk,
        BLOCK_D=next_block(d),
        BLOCK_DV=next_block(dv_dim),
        HEAD_DIM=d,
        HEAD_DIM_V=dv_dim,
        FEATURE=feature,
        STATE_BF16=state_dtype(q.dtype) == torch.bfloat16,
        DOT_PRECISION=dot_precision,
    )
    ds_tot, dz_tot = ds_part.sum(1), dz_part.sum(1)
    dq = empty_like_layout(q, d)
    dk = empty_like_layout(k, d)
    dv = empty_like_layout(v, dv_dim)
    constexprs = dict(
        FEATURE=feature,
        STATE_BF16=state_dtype(q.dtype) == torch.bfloat16,
        **launch_constexprs(q, v, MASK_NONE),
    )
    dq_constexprs = dict(constexprs, DV_CHUNK=dv_chunk(dv_dim))
    no_predicate = predicate_args(None, None, partial)
    grid_dq = lambda meta: (mq * meta["Q_SUB"], b * h)
    _sparse_linear_bwd_kernel_dq[grid_dq](
        q,
        k,
        v,
        do_sparse,
        do_linear,
        lse,
        delta,
        rden,
        dden,
        h_blocks,
        z_blocks,
        h_tot,
        z_tot,
        dq,
        indptr,
        indices,
        neg_indptr,
        neg_indices,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *do_sparse.stride(),
        *do_linear.stride(),
        *dq.stride(),
        *csr_strides(indptr),
        *csr_strides(neg_indptr),
        h,
        q_len,
        kv_len,
        block_q,
        block_k,
        mk,
        scale,
        *no_predicate,
        **dq_constexprs,
    )
    indptr_t, indices_t, neg_indptr_t, neg_indices_t = key_major
    grid_dkdv = lambda meta: (mk * meta["K_SUB"], b * h)
    _sparse_linear_bwd_kernel_dkdv[grid_dkdv](
        q,
        k,
        v,
        do_sparse,
        lse,
        delta,
        ds_blocks,
        dz_blocks,
        ds_tot,
        dz_tot,
        dk,
        dv,
        indptr_t,
        indices_t,
        neg_indptr_t,
        neg_indices_t,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *do_sparse.stride(),
        *dk.stride(),
        *dv.stride(),
        *csr_strides(indptr_t),
        *csr_strides(neg_indptr_t),
        h,
        q_len,
        kv_len,
        block_q,
        block_k,
        mq,
        scale,
        *no_predicate,
        **constexprs,
    )
    return dq, dk, dv
