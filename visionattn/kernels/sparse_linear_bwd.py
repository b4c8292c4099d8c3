"""Sparse-linear attention (SLA), backward: the block-sparse backward for the softmax branch plus two streaming
kernels that add the linear branch's gradients.

With ``n_i = φ(q_i)ᵀS_b``, ``den_i = φ(q_i)·z_b + eps``, ``o_l,i = n_i / den_i`` (``S_b, z_b`` the marginal state of
query block ``b``) and the upstream gradient ``dO_l``, the linear branch needs per query row
``dn_i = dO_l,i / den_i`` and ``dden_i = −(dO_l,i·o_l,i) / den_i``, and gives

    dφ(q_i) = S_b dn_i + z_b dden_i,     dS_b = Σ_{i∈b} φ(q_i) dn_iᵀ,     dz_b = Σ_{i∈b} φ(q_i) dden_i,
    dφ(k_j) = A_j v_j + a_j,  dv_j += A_jᵀ φ(k_j),   A_j = Σ_{b: j marginal for b} dS_b  (a_j likewise from dz_b).

Launches: the block-sparse backward of ``block_sparse_bwd.py`` on ``(dO_s, O_s)`` (the same kernels and tuned
configs as ``block_sparse_attention``: the softmax branch is exactly block-sparse attention); the forward's marginal
states ``S_b, z_b`` (recomputed, not stored: ``masked_block_sums``); one program per query block adding ``dφ(q)``
through ``φ`` to dQ and emitting ``dS_b, dz_b``; their masked sums ``A_j, a_j`` per key block; one program per key
block adding the key-side terms to dK and dV. Deterministic: every output tile has one owner program and the sums
are matmuls.
"""

import torch
import triton
import triton.language as tl

from ._config import autotune_configs, autotune_kwargs
from ._launch import launch
from .block_sparse import cdiv, next_block
from .block_sparse_bwd import block_sparse_bwd
from .linear import _phi, _phi_bwd
from .mask_predicates import MASK_NONE
from .sparse_linear import _sla_state_slice
from .sparse_linear_state import (
    _STATE_CONFIGS,
    _STATE_DEFAULT,
    _STATE_KEY,
    _sla_dot,
    marginal_block_matrix,
    marginal_weights,
    masked_block_sums,
    sparse_linear_state,
    state_dtype,
)

__all__ = ["sparse_linear_bwd"]


@triton.jit
def _sla_block_state(s_ptr, z_ptr, i_state, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DV: tl.constexpr):  # fmt: skip
    """Row ``i_state`` of a masked-sum state pair: ``S`` ``[BLOCK_D, BLOCK_DV]`` in its storage dtype, ``z``
    ``[BLOCK_D]`` fp32."""
    o_d = tl.arange(0, BLOCK_D)
    b_z = tl.load(z_ptr + i_state * HEAD_DIM + o_d, mask=o_d < HEAD_DIM, other=0.0)
    return _sla_state_slice(s_ptr, i_state, 0, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV), b_z


@triton.jit
def _sla_rows(base, stride_n, stride_d, rows, m_r, o_c, m_c):
    """Pointers and mask of a ``[ROWS, COLS]`` tile of a ``(N, C)`` operand at ``base``."""
    return base + rows[:, None] * stride_n + o_c[None, :] * stride_d, m_r[:, None] & m_c[None, :]


@triton.autotune(
    configs=autotune_configs(_STATE_CONFIGS, _STATE_DEFAULT),
    key=_STATE_KEY,
    **autotune_kwargs(),
)
@triton.jit
def _sparse_linear_bwd_kernel_query(
    q_ptr,
    ol_ptr,
    dol_ptr,
    rden_ptr,
    hm_ptr,
    zm_ptr,
    dq_ptr,
    ds_ptr,
    dz_ptr,
    stride_q_b,
    stride_q_h,
    stride_q_n,
    stride_q_d,
    stride_o_b,
    stride_o_h,
    stride_o_n,
    stride_o_d,
    stride_dol_b,
    stride_dol_h,
    stride_dol_n,
    stride_dol_d,
    stride_dq_b,
    stride_dq_h,
    stride_dq_n,
    stride_dq_d,
    num_heads,
    length,
    block,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    FEATURE: tl.constexpr,
    STATE_BF16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    """Grid ``(Mq, B·H)``: query block ``b``'s rows add ``φ'(q)ᵀ(dn S_bᵀ + dden z_b)`` to dQ (which holds the
    softmax branch's gradient), and the block's ``dS_b = Σ φ(q) dnᵀ``, ``dz_b = Σ φ(q) dden`` are stored."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // num_heads).to(tl.int64)
    i_h = (i_bh % num_heads).to(tl.int64)
    o_r = tl.arange(0, BLOCK_ROWS)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_d = o_d < HEAD_DIM
    m_dv = o_dv < HEAD_DIM_V
    i_state = i_bh.to(tl.int64) * tl.num_programs(0) + i_m
    # [BLOCK_D, BLOCK_DV], [BLOCK_D]: the block's marginal state from the forward
    b_s, b_z = _sla_block_state(hm_ptr, zm_ptr, i_state, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)
    b_ds = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    b_dz = tl.zeros([BLOCK_D], dtype=tl.float32)
    start = i_m * block
    end = tl.minimum(start + block, length)
    for r in range(start, end, BLOCK_ROWS):
        rows = r + o_r
        m_r = rows < end
        p_q, m_q = _sla_rows(q_ptr + i_b * stride_q_b + i_h * stride_q_h, stride_q_n, stride_q_d, rows, m_r, o_d, m_d)
        p_ol, m_o = _sla_rows(
            ol_ptr + i_b * stride_o_b + i_h * stride_o_h, stride_o_n, stride_o_d, rows, m_r, o_dv, m_dv
        )
        p_dol, _ = _sla_rows(
            dol_ptr + i_b * stride_dol_b + i_h * stride_dol_h, stride_dol_n, stride_dol_d, rows, m_r, o_dv, m_dv
        )
        p_dq, _ = _sla_rows(
            dq_ptr + i_b * stride_dq_b + i_h * stride_dq_h, stride_dq_n, stride_dq_d, rows, m_r, o_d, m_d
        )
        # [BLOCK_ROWS, BLOCK_D]
        b_q = tl.load(p_q, mask=m_q, other=0.0).to(tl.float32)
        b_phq = tl.where(m_r[:, None], _phi(b_q, m_d, FEATURE), 0.0)
        # [BLOCK_ROWS, BLOCK_DV]
        b_ol = tl.load(p_ol, mask=m_o, other=0.0).to(tl.float32)
        b_dol = tl.load(p_dol, mask=m_o, other=0.0).to(tl.float32)
        p_row = i_bh.to(tl.int64) * length + rows
        b_rden = tl.load(rden_ptr + p_row, mask=m_r, other=0.0)
        b_dden = -tl.sum(b_ol * b_dol, axis=1) * b_rden
        b_dn = b_dol * b_rden[:, None]
        b_ds += _sla_dot(tl.trans(b_phq), b_dn, STATE_BF16, DOT_PRECISION)
        b_dz += tl.sum(b_phq * b_dden[:, None], axis=0)
        # dφ(q) = dn Sᵀ + dden z, through φ, added to the softmax branch's dQ
        b_dphq = _sla_dot(b_dn, tl.trans(b_s), STATE_BF16, DOT_PRECISION) + b_dden[:, None] * b_z[None, :]
        b_dq = tl.load(p_dq, mask=m_q, other=0.0).to(tl.float32) + _phi_bwd(b_q, b_phq, b_dphq, FEATURE)
        tl.store(p_dq, b_dq.to(dq_ptr.dtype.element_ty), mask=m_q)
    p_ds = ds_ptr + i_state * (HEAD_DIM * HEAD_DIM_V) + o_d[:, None] * HEAD_DIM_V + o_dv[None, :]
    tl.store(p_ds, b_ds.to(ds_ptr.dtype.element_ty), mask=m_d[:, None] & m_dv[None, :])
    tl.store(dz_ptr + i_state * HEAD_DIM + o_d, b_dz, mask=m_d)


@triton.autotune(
    configs=autotune_configs(_STATE_CONFIGS, _STATE_DEFAULT),
    key=_STATE_KEY,
    **autotune_kwargs(),
)
@triton.jit
def _sparse_linear_bwd_kernel_key(
    k_ptr,
    v_ptr,
    a_ptr,
    az_ptr,
    dk_ptr,
    dv_ptr,
    stride_k_b,
    stride_k_h,
    stride_k_n,
    stride_k_d,
    stride_v_b,
    stride_v_h,
    stride_v_n,
    stride_v_d,
    stride_dk_b,
    stride_dk_h,
    stride_dk_n,
    stride_dk_d,
    stride_dv_b,
    stride_dv_h,
    stride_dv_n,
    stride_dv_d,
    num_heads,
    length,
    block,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    FEATURE: tl.constexpr,
    STATE_BF16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    """Grid ``(Mk, B·H)``: key block ``j``'s rows add ``φ(k) A_j`` to dV and ``φ'(k)ᵀ(v A_jᵀ + a_j)`` to dK (which
    hold the softmax branch's gradients)."""
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // num_heads).to(tl.int64)
    i_h = (i_bh % num_heads).to(tl.int64)
    o_r = tl.arange(0, BLOCK_ROWS)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_d = o_d < HEAD_DIM
    m_dv = o_dv < HEAD_DIM_V
    i_state = i_bh.to(tl.int64) * tl.num_programs(0) + i_n
    # [BLOCK_D, BLOCK_DV], [BLOCK_D]: Σ dS_b over the query blocks for which this key block is marginal
    b_a, b_az = _sla_block_state(a_ptr, az_ptr, i_state, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)
    start = i_n * block
    end = tl.minimum(start + block, length)
    for r in range(start, end, BLOCK_ROWS):
        rows = r + o_r
        m_r = rows < end
        p_k, m_k = _sla_rows(k_ptr + i_b * stride_k_b + i_h * stride_k_h, stride_k_n, stride_k_d, rows, m_r, o_d, m_d)
        p_v, m_v = _sla_rows(v_ptr + i_b * stride_v_b + i_h * stride_v_h, stride_v_n, stride_v_d, rows, m_r, o_dv, m_dv)
        p_dk, _ = _sla_rows(
            dk_ptr + i_b * stride_dk_b + i_h * stride_dk_h, stride_dk_n, stride_dk_d, rows, m_r, o_d, m_d
        )
        p_dv, _ = _sla_rows(
            dv_ptr + i_b * stride_dv_b + i_h * stride_dv_h, stride_dv_n, stride_dv_d, rows, m_r, o_dv, m_dv
        )
        # [BLOCK_ROWS, BLOCK_D], [BLOCK_ROWS, BLOCK_DV]
        b_k = tl.load(p_k, mask=m_k, other=0.0).to(tl.float32)
        b_phk = _phi(b_k, m_d, FEATURE)
        b_v = tl.load(p_v, mask=m_v, other=0.0).to(tl.float32)
        b_dv = tl.load(p_dv, mask=m_v, other=0.0).to(tl.float32) + _sla_dot(b_phk, b_a, STATE_BF16, DOT_PRECISION)
        tl.store(p_dv, b_dv.to(dv_ptr.dtype.element_ty), mask=m_v)
        b_dphk = _sla_dot(b_v, tl.trans(b_a), STATE_BF16, DOT_PRECISION) + b_az[None, :]
        b_dk = tl.load(p_dk, mask=m_k, other=0.0).to(tl.float32) + _phi_bwd(b_k, b_phk, b_dphk, FEATURE)
        tl.store(p_dk, b_dk.to(dk_ptr.dtype.element_ty), mask=m_k)


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
    neg_indptr: torch.Tensor,
    neg_indices: torch.Tensor,
    *,
    scale: float,
    block_q: int,
    block_k: int,
    feature: int,
    key_major: tuple[torch.Tensor, torch.Tensor],
    uniform_rows: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block-sparse backward over the critical CSR (rows ``indptr, indices``; dK/dV over ``key_major = (indptr_t,
    indices_t)``, ``transpose_csr`` built by the caller; SLA masks have no partial blocks), then the linear branch
    added by one program per query block and one per key block. ``uniform_rows`` as in ``sparse_linear_fwd``.

    Returns ``dq``, ``dk``, ``dv`` stored like ``q``, ``k``, ``v``.
    """
    b, h, q_len, d = q.shape
    kv_len, dv_dim = k.shape[2], v.shape[-1]
    mq, mk = cdiv(q_len, block_q), cdiv(kv_len, block_k)
    indptr_t, indices_t = key_major
    # the softmax branch: without a token predicate every block is full and indptr stands in for the unread split
    dq, dk, dv = block_sparse_bwd(
        do_sparse, None, q, k, v, o_sparse, lse, indptr, indices, indptr,
        scale=scale, block_q=block_q, block_k=block_k, mask_kind=MASK_NONE, query_table=None, key_table=None,
        radius2=0.0, key_major=(indptr_t, indices_t, indptr_t),
    )  # fmt: skip
    marginal = marginal_block_matrix(indptr, indices, neg_indptr, neg_indices, mk, state_dtype(q.dtype), uniform_rows)
    h_blocks, z_blocks = sparse_linear_state(k, v, block_k, feature)
    h_marginal, z_marginal = masked_block_sums(marginal_weights(marginal, b, h, h_blocks.dtype), h_blocks, z_blocks)
    del h_blocks
    ds_blocks = torch.empty(b * h, mq, d, dv_dim, device=q.device, dtype=state_dtype(q.dtype))
    dz_blocks = torch.empty(b * h, mq, d, device=q.device, dtype=torch.float32)
    constexprs = dict(
        BLOCK_D=next_block(d),
        BLOCK_DV=next_block(dv_dim),
        HEAD_DIM=d,
        HEAD_DIM_V=dv_dim,
        FEATURE=feature,
        STATE_BF16=state_dtype(q.dtype) == torch.bfloat16,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    launch(
        _sparse_linear_bwd_kernel_query,
        (mq, b * h),
        q,
        o_linear,
        do_linear,
        rden,
        h_marginal,
        z_marginal,
        dq,
        ds_blocks,
        dz_blocks,
        *q.stride(),
        *o_linear.stride(),
        *do_linear.stride(),
        *dq.stride(),
        h,
        q_len,
        block_q,
        **constexprs,
    )
    del h_marginal
    key_weights = marginal_weights(marginal.transpose(-1, -2), b, h, ds_blocks.dtype)
    a_marginal, az_marginal = masked_block_sums(key_weights, ds_blocks, dz_blocks)
    del ds_blocks
    launch(
        _sparse_linear_bwd_kernel_key,
        (mk, b * h),
        k,
        v,
        a_marginal,
        az_marginal,
        dk,
        dv,
        *k.stride(),
        *v.stride(),
        *dk.stride(),
        *dv.stride(),
        h,
        kv_len,
        block_k,
        **constexprs,
    )
    return dq, dk, dv
