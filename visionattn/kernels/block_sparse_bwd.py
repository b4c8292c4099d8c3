"""Block-sparse flash attention, backward: dQ walks the row CSR, dK/dV walk the transposed (key-major) CSR.

Deterministic (no atomics): every output tile is owned by one program. ``delta = rowsum(dO * O) - dLSE`` is
computed first, so the score gradient is ``dS = P * (dP - delta)`` (the ``-dLSE`` term makes the returned
log-sum-exp differentiable, ``d lse_i / d s_ij = P_ij``). Rows with ``lse = -inf`` (no allowed key) read as
``+inf`` so their probabilities are exactly 0.
"""

import torch
import triton
import triton.language as tl

from ._config import autotune_configs, autotune_kwargs
from ._constants import LOG2E
from ._launch import launch
from .block_sparse import (
    TILE_HEURISTICS,
    _bsa_key_tile_scores,
    _bsa_load,
    _bsa_load_step,
    _bsa_mask_scores,
    _bsa_phase_range,
    _bsa_program_tile,
    _bsa_row_bounds,
    _Dims,
    _Operand,
    _Walk,
    cdiv,
    csr_strides,
    empty_like_layout,
    launch_constexprs,
    next_block,
    prune_configs,
)
from .mask_predicates import MASK_NONE, _Predicate, predicate_args

__all__ = ["block_sparse_bwd", "full_blocks_first", "transpose_csr"]

_NONE = tl.constexpr(MASK_NONE)

_LOG2E = tl.constexpr(LOG2E)
_INF = tl.constexpr(float("inf"))

# TILE_M / TILE_N cap the query / key tiles of both kernels (dQ owns query rows, dK/dV key rows).
_BWD_CONFIGS = [
    triton.Config({"TILE_M": m, "TILE_N": n}, num_warps=w, num_stages=s)
    for m, n, w, s in [(32, 128, 8, 3), (64, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3)]
]
_BWD_DEFAULT = triton.Config({"TILE_M": 16, "TILE_N": 16}, num_warps=4, num_stages=2)
_BWD_KEY = ["block_q", "block_k", "HEAD_DIM", "HEAD_DIM_V", "MASK_KIND"]
#: Query rows per program of the delta pre-pass.
_DELTA_BLOCK = 64


@triton.jit
def _block_sparse_bwd_kernel_delta(
    o_ptr,
    do_ptr,
    dlse_ptr,
    delta_ptr,
    stride_o_b,
    stride_o_h,
    stride_o_n,
    stride_o_d,
    stride_do_b,
    stride_do_h,
    stride_do_n,
    stride_do_d,
    stride_dlse_b,
    stride_dlse_h,
    stride_dlse_n,
    num_heads,
    q_len,
    HEAD_DIM_V: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // num_heads).to(tl.int64)
    i_h = (i_bh % num_heads).to(tl.int64)
    o_m = i_m * BLOCK + tl.arange(0, BLOCK)
    o_dv = tl.arange(0, BLOCK_DV)
    m_m = o_m < q_len
    m_tile = m_m[:, None] & (o_dv < HEAD_DIM_V)[None, :]
    p_o = o_ptr + i_b * stride_o_b + i_h * stride_o_h + o_m[:, None] * stride_o_n + o_dv[None, :] * stride_o_d
    p_do = do_ptr + i_b * stride_do_b + i_h * stride_do_h + o_m[:, None] * stride_do_n + o_dv[None, :] * stride_do_d
    # [BLOCK, BLOCK_DV]
    b_o = tl.load(p_o, mask=m_tile, other=0.0).to(tl.float32)
    b_do = tl.load(p_do, mask=m_tile, other=0.0).to(tl.float32)
    b_delta = tl.sum(b_o * b_do, 1)
    if HAS_DLSE:
        p_dlse = dlse_ptr + i_b * stride_dlse_b + i_h * stride_dlse_h + o_m * stride_dlse_n
        b_delta -= tl.load(p_dlse, mask=m_m, other=0.0).to(tl.float32)
    tl.store(delta_ptr + i_bh.to(tl.int64) * q_len + o_m, b_delta, mask=m_m)


@triton.jit
def _block_sparse_bwd_dq_inner(dq, b_q, b_do, b_lse2, b_delta, q_pos, k, v, qk_scale, keys, pred, dims):
    """dQ += dS K over the sub-tiles of the key blocks of the walk ``keys``."""
    for phase in tl.static_range(1 if pred.MASK_KIND == _NONE else 2):
        lo, hi = _bsa_phase_range(phase, keys)
        for t in range(lo, hi):
            b_k, b_v, b_s = _bsa_key_tile_scores(b_q, q_pos, t, k, v, keys, pred, dims, phase == 1)
            b_p = tl.math.exp2(b_s * qk_scale - b_lse2[:, None])
            b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=dims.DOT_PRECISION)
            b_ds = b_p * (b_dp - b_delta[:, None])
            dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=dims.DOT_PRECISION)
    return dq


@triton.autotune(
    configs=autotune_configs(_BWD_CONFIGS, _BWD_DEFAULT),
    key=_BWD_KEY,
    prune_configs_by={"early_config_prune": prune_configs},
    **autotune_kwargs(),
)
@triton.heuristics(TILE_HEURISTICS)
@triton.jit
def _block_sparse_bwd_kernel_dq(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    indptr_ptr,
    indices_ptr,
    split_ptr,
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
    stride_do_b,
    stride_do_h,
    stride_do_n,
    stride_do_d,
    stride_dq_b,
    stride_dq_h,
    stride_dq_n,
    stride_dq_d,
    stride_indptr_b,
    stride_indptr_h,
    num_heads,
    q_len,
    kv_len,
    block_q,
    block_k,
    scale,
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
):
    i_bh = tl.program_id(1)
    i_b = (i_bh // num_heads).to(tl.int64)
    i_h = (i_bh % num_heads).to(tl.int64)
    i_m, start_m, m_valid = _bsa_program_tile(tl.program_id(0), block_q, q_len, Q_SUB, BLOCK_M)
    o_m = tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_m = o_m < m_valid
    rows = (start_m + o_m)[:, None]
    p_q = q_ptr + i_b * stride_q_b + i_h * stride_q_h + rows * stride_q_n + o_d[None, :] * stride_q_d
    p_do = do_ptr + i_b * stride_do_b + i_h * stride_do_h + rows * stride_do_n + o_dv[None, :] * stride_do_d
    # [BLOCK_M, BLOCK_D]
    b_q = _bsa_load(p_q, m_m, o_d < HEAD_DIM, EVEN_M, HEAD_DIM == BLOCK_D)
    # [BLOCK_M, BLOCK_DV]
    b_do = _bsa_load(p_do, m_m, o_dv < HEAD_DIM_V, EVEN_M, HEAD_DIM_V == BLOCK_DV)
    p_row = i_bh.to(tl.int64) * q_len + start_m + o_m
    b_lse = tl.load(lse_ptr + p_row, mask=m_m, other=_INF)
    b_lse2 = tl.where(b_lse == -_INF, _INF, b_lse * _LOG2E)
    b_delta = tl.load(delta_ptr + p_row, mask=m_m, other=0.0)
    row_start, row_split, row_end = _bsa_row_bounds(
        indptr_ptr, split_ptr, i_b * stride_indptr_b + i_h * stride_indptr_h + i_m, MASK_KIND
    )
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _block_sparse_bwd_dq_inner(
        dq,
        b_q,
        b_do,
        b_lse2,
        b_delta,
        start_m + o_m,
        _Operand(k_ptr + i_b * stride_k_b + i_h * stride_k_h, stride_k_n, stride_k_d, k_ptr, False),
        _Operand(v_ptr + i_b * stride_v_b + i_h * stride_v_h, stride_v_n, stride_v_d, v_ptr, False),
        scale * _LOG2E,
        _Walk(indices_ptr, row_start, row_split, row_end, block_k, kv_len, BLOCK_N, K_SUB, EVEN_N),
        _Predicate(qtab_ptr, ktab_ptr, tab_len, radius2, MASK_KIND),
        _Dims(HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, DOT_PRECISION),
    )
    p_dq = dq_ptr + i_b * stride_dq_b + i_h * stride_dq_h + rows * stride_dq_n + o_d[None, :] * stride_dq_d
    tl.store(p_dq, (dq * scale).to(dq_ptr.dtype.element_ty), mask=m_m[:, None] & (o_d < HEAD_DIM)[None, :])


@triton.jit
def _block_sparse_bwd_dkdv_inner(dk, dv, b_k, b_v, k_pos, q, do, lse_base, delta_base, qk_scale, queries, pred, dims):
    """dV += P^T dO and dK += dS^T Q over the sub-tiles of the query blocks of the walk ``queries``.

    Tiles are key-major ([BLOCK_N, BLOCK_M]); the predicate runs with the roles swapped (ROWS_ARE_Q=False).
    """
    o_m = tl.arange(0, queries.TILE)
    for phase in tl.static_range(1 if pred.MASK_KIND == _NONE else 2):
        lo, hi = _bsa_phase_range(phase, queries)
        for t in range(lo, hi):
            # [BLOCK_M, BLOCK_D], [BLOCK_M, BLOCK_DV]
            b_q, b_do, start_m, m_m, m_valid = _bsa_load_step(q, do, queries, t, dims)
            b_lse = tl.load(lse_base + start_m + o_m, mask=m_m, other=_INF)
            b_lse2 = tl.where(b_lse == -_INF, _INF, b_lse * _LOG2E)
            b_delta = tl.load(delta_base + start_m + o_m, mask=m_m, other=0.0)
            # [BLOCK_N, BLOCK_M]
            b_st = tl.dot(b_k, tl.trans(b_q), input_precision=dims.DOT_PRECISION)
            b_st = _bsa_mask_scores(b_st, k_pos, start_m + o_m, m_valid, pred, queries, phase == 1, False)
            b_pt = tl.math.exp2(b_st * qk_scale - b_lse2[None, :])
            dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=dims.DOT_PRECISION)
            b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=dims.DOT_PRECISION)
            b_dst = b_pt * (b_dpt - b_delta[None, :])
            dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=dims.DOT_PRECISION)
    return dk, dv


@triton.autotune(
    configs=autotune_configs(_BWD_CONFIGS, _BWD_DEFAULT),
    key=_BWD_KEY,
    prune_configs_by={"early_config_prune": prune_configs},
    **autotune_kwargs(),
)
@triton.heuristics(TILE_HEURISTICS)
@triton.jit
def _block_sparse_bwd_kernel_dkdv(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    indptr_ptr,
    indices_ptr,
    split_ptr,
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
    stride_do_b,
    stride_do_h,
    stride_do_n,
    stride_do_d,
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
    num_heads,
    q_len,
    kv_len,
    block_q,
    block_k,
    scale,
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
):
    i_bh = tl.program_id(1)
    i_b = (i_bh // num_heads).to(tl.int64)
    i_h = (i_bh % num_heads).to(tl.int64)
    i_n, start_n, n_valid = _bsa_program_tile(tl.program_id(0), block_k, kv_len, K_SUB, BLOCK_N)
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_n = o_n < n_valid
    rows = (start_n + o_n)[:, None]
    p_k = k_ptr + i_b * stride_k_b + i_h * stride_k_h + rows * stride_k_n + o_d[None, :] * stride_k_d
    p_v = v_ptr + i_b * stride_v_b + i_h * stride_v_h + rows * stride_v_n + o_dv[None, :] * stride_v_d
    # [BLOCK_N, BLOCK_D]
    b_k = _bsa_load(p_k, m_n, o_d < HEAD_DIM, EVEN_N, HEAD_DIM == BLOCK_D)
    # [BLOCK_N, BLOCK_DV]
    b_v = _bsa_load(p_v, m_n, o_dv < HEAD_DIM_V, EVEN_N, HEAD_DIM_V == BLOCK_DV)
    col_start, col_split, col_end = _bsa_row_bounds(
        indptr_ptr, split_ptr, i_b * stride_indptr_b + i_h * stride_indptr_h + i_n, MASK_KIND
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    dk, dv = _block_sparse_bwd_dkdv_inner(
        dk,
        dv,
        b_k,
        b_v,
        start_n + o_n,
        _Operand(q_ptr + i_b * stride_q_b + i_h * stride_q_h, stride_q_n, stride_q_d, q_ptr, False),
        _Operand(do_ptr + i_b * stride_do_b + i_h * stride_do_h, stride_do_n, stride_do_d, do_ptr, False),
        lse_ptr + i_bh.to(tl.int64) * q_len,
        delta_ptr + i_bh.to(tl.int64) * q_len,
        scale * _LOG2E,
        _Walk(indices_ptr, col_start, col_split, col_end, block_q, q_len, BLOCK_M, Q_SUB, EVEN_M),
        _Predicate(qtab_ptr, ktab_ptr, tab_len, radius2, MASK_KIND),
        _Dims(HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, DOT_PRECISION),
    )
    p_dk = dk_ptr + i_b * stride_dk_b + i_h * stride_dk_h + rows * stride_dk_n + o_d[None, :] * stride_dk_d
    p_dv = dv_ptr + i_b * stride_dv_b + i_h * stride_dv_h + rows * stride_dv_n + o_dv[None, :] * stride_dv_d
    tl.store(p_dk, (dk * scale).to(dk_ptr.dtype.element_ty), mask=m_n[:, None] & (o_d < HEAD_DIM)[None, :])
    tl.store(p_dv, dv.to(dv_ptr.dtype.element_ty), mask=m_n[:, None] & (o_dv < HEAD_DIM_V)[None, :])


# ---------------------------------------------------------------------------------------------- launchers
def full_blocks_first(
    indptr: torch.Tensor, indices: torch.Tensor, partial: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CSR reordered so that each row lists its full blocks before its partial ones (stable otherwise): the
    kernels walk ``[start, split)`` without the token predicate and ``[split, end)`` with it, instead of testing a
    flag per block. Returns ``(indices, split)``, ``split`` int32 shaped like ``indptr`` (entry ``m``: the end of row
    ``m``'s full blocks; the last entry is unused). Rows must be stored consecutively; no host sync."""
    rows, nnz = indptr[..., :-1].numel(), indices.numel()
    counts = (indptr[..., 1:] - indptr[..., :-1]).flatten().long()
    row_id = torch.repeat_interleave(torch.arange(rows, device=indptr.device), counts, output_size=nnz)
    order = torch.argsort(row_id * 2 + partial.long(), stable=True)
    partial_before = torch.cat([partial.new_zeros(1, dtype=torch.int32), partial.cumsum(0, dtype=torch.int32)])
    num_partial = partial_before[indptr[..., 1:].long()] - partial_before[indptr[..., :-1].long()]
    split = torch.cat([indptr[..., 1:] - num_partial, indptr[..., -1:]], dim=-1).to(torch.int32)
    return indices[order], split


def transpose_csr(
    indptr: torch.Tensor, indices: torch.Tensor, partial: torch.Tensor, num_kv_blocks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Key-major CSR ``(Bm, Hm, Mk + 1)`` of a row CSR whose rows are stored consecutively; no host sync.

    Entries of each key-block row come out sorted by query block, as ``BlockMask.transpose()`` orders them.
    """
    bm, hm, rows_plus_one = indptr.shape
    mq, mk, nnz = rows_plus_one - 1, num_kv_blocks, indices.numel()
    counts = (indptr[..., 1:] - indptr[..., :-1]).flatten().long()
    row_id = torch.repeat_interleave(torch.arange(bm * hm * mq, device=indptr.device), counts, output_size=nnz)
    head, q_block = row_id // mq, row_id % mq
    col_id = head * mk + indices.long()
    order = torch.argsort(col_id * mq + q_block)
    # Row starts of the key-major CSR by binary search in the sorted column ids (no atomics, no host sync).
    boundaries = torch.arange(bm * hm * mk + 1, device=indptr.device)
    starts = torch.searchsorted(col_id[order], boundaries)
    gather = torch.arange(bm * hm, device=indptr.device)[:, None] * mk + torch.arange(mk + 1, device=indptr.device)
    indptr_t = starts[gather].view(bm, hm, mk + 1).to(torch.int32)
    return indptr_t, q_block[order].to(torch.int32), partial[order]


def block_sparse_bwd(
    do: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
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
    key_major: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three launches: delta ``(Nq / 64, B * H)``; dQ per query sub-tile over the rows ``(indptr, indices,
    split)``; dK/dV per key sub-tile over ``key_major``, the same for the transposed CSR (``transpose_csr``), each
    with full blocks first (``full_blocks_first``).

    Returns ``dq``, ``dk``, ``dv`` stored like ``q``, ``k``, ``v``.
    """
    b, h, q_len, _ = q.shape
    kv_len = k.shape[2]
    delta = torch.empty(b, h, q_len, device=q.device, dtype=torch.float32)
    has_dlse = dlse is not None
    _block_sparse_bwd_kernel_delta[(cdiv(q_len, _DELTA_BLOCK), b * h)](
        out,
        do,
        dlse if has_dlse else delta,
        delta,
        *out.stride(),
        *do.stride(),
        *(dlse.stride() if has_dlse else (0, 0, 0)),
        h,
        q_len,
        HEAD_DIM_V=v.shape[-1],
        BLOCK=_DELTA_BLOCK,
        BLOCK_DV=next_block(v.shape[-1]),
        HAS_DLSE=has_dlse,
    )
    dq = empty_like_layout(q, q.shape[-1])
    dk = empty_like_layout(k, k.shape[-1])
    dv = empty_like_layout(v, v.shape[-1])
    constexprs = launch_constexprs(q, v, mask_kind)
    shared = (h, q_len, kv_len, block_q, block_k, scale, *predicate_args(query_table, key_table, split), radius2)
    grid_dq = lambda meta: (cdiv(q_len, block_q) * meta["Q_SUB"], b * h)
    launch(
        _block_sparse_bwd_kernel_dq,
        grid_dq,
        q,
        k,
        v,
        do,
        lse,
        delta,
        dq,
        indptr,
        indices,
        split,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *do.stride(),
        *dq.stride(),
        *csr_strides(indptr),
        *shared,
        **constexprs,
    )
    indptr_t, indices_t, split_t = key_major
    grid_dkdv = lambda meta: (cdiv(kv_len, block_k) * meta["K_SUB"], b * h)
    launch(
        _block_sparse_bwd_kernel_dkdv,
        grid_dkdv,
        q,
        k,
        v,
        do,
        lse,
        delta,
        dk,
        dv,
        indptr_t,
        indices_t,
        split_t,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *do.stride(),
        *dk.stride(),
        *dv.stride(),
        *csr_strides(indptr_t),
        *shared,
        **constexprs,
    )
    return dq, dk, dv
