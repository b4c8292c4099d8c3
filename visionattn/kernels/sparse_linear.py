"""Sparse-linear attention (SLA), forward: block-sparse softmax over the critical key blocks and linear attention
over the marginal ones, in one kernel per query tile.

Layout: q ``(B, H, Nq, D)``, k ``(B, H, Nk, D)``, v ``(B, H, Nk, Dv)`` with arbitrary strides; two CSR block sets
per (batch, head, query block) in ``BlockMask`` form (``indptr (Bm, Hm, Mq + 1)``, ``indices (nnz,)``): the
critical blocks (softmax) and the negligible blocks (skipped). Every other key block is marginal.

Pass 1 (``sparse_linear_state.py``) reduces each logical key block ``j`` to ``h_j = φ(K_j)ᵀV_j`` ``(D, Dv)`` and
``z_j = Σ φ(K_j)`` ``(D,)``, then forms every query block's marginal state ``H_b = Σ_{j marginal} h_j`` (and
``z_b``) as one batched matmul with the 0/1 marginal block matrix (``masked_block_sums``). Pass 2
(``_sparse_linear_fwd_kernel``, grid ``(Mq · Q_SUB, B·H)``) runs the block-sparse flash loop of ``block_sparse.py``
over the critical blocks, then applies ``φ(q)`` to its block's ``H_b``, ``z_b``. The backward lives in
``sparse_linear_bwd.py``.
"""

import torch
import triton
import triton.language as tl

from ._config import autotune_configs, autotune_kwargs
from ._constants import LN2, LOG2E, NEG_INF
from ._launch import launch
from .block_sparse import (
    TILE_HEURISTICS,
    _block_sparse_fwd_inner,
    _bsa_load,
    _bsa_program_tile,
    _Dims,
    _Operand,
    _Walk,
    cdiv,
    csr_strides,
    empty_like_layout,
    launch_constexprs,
    prune_configs,
)
from .linear import _phi
from .mask_predicates import MASK_NONE, _Predicate, predicate_args
from .sparse_linear_state import (
    _sla_dot,
    dv_chunk,
    marginal_block_matrix,
    marginal_weights,
    masked_block_sums,
    sparse_linear_state,
    state_dtype,
)

__all__ = ["sparse_linear_fwd"]

_NEG_INF = tl.constexpr(NEG_INF)
_NEG_INF_LSE = tl.constexpr(float("-inf"))
_LN2 = tl.constexpr(LN2)

# The linear epilogue holds a D x 64 slice of the fp32 state next to the query tile: 8 warps only (ptxas for sm_90a
# at D = 128: 4 warps spill 0.2-3.5 KB per thread, 8 warps at most 36 bytes). The first config (the only one with
# VISIONATTN_AUTOTUNE=0) fits shared memory at D = 128 with fp32 states (fp16 inputs); 3 stages there do not.
_FWD_CONFIGS = [
    triton.Config({"TILE_M": m, "TILE_N": n}, num_warps=8, num_stages=s)
    for m, n, s in [(128, 64, 2), (128, 64, 3), (128, 128, 2), (64, 64, 3), (64, 128, 2)]
]
# Under the interpreter: 16-row tiles, so tests with 32-token blocks also exercise the sub-tile walk.
_DEFAULT_CONFIG = triton.Config({"TILE_M": 16, "TILE_N": 16}, num_warps=4, num_stages=2)
_AUTOTUNE_KEY = ["block_q", "block_k", "HEAD_DIM", "HEAD_DIM_V", "FEATURE"]


@triton.jit
def _sla_state_slice(s_ptr, row, col0, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
                     COLS: tl.constexpr):  # fmt: skip
    """``S[row, :, col0:col0 + COLS]`` ``[BLOCK_D, COLS]`` of a precomputed marginal state ``S`` ``(R, D, Dv)``
    (``masked_block_sums``), in its storage dtype; callers walk Dv in chunks to bound the registers a state takes."""
    o_d = tl.arange(0, BLOCK_D)
    o_dv = col0 + tl.arange(0, COLS)
    p_s = s_ptr + row.to(tl.int64) * (HEAD_DIM * HEAD_DIM_V) + o_d[:, None] * HEAD_DIM_V + o_dv[None, :]
    return tl.load(p_s, mask=(o_d < HEAD_DIM)[:, None] & (o_dv < HEAD_DIM_V)[None, :], other=0.0)


@triton.jit
def _sla_proj_chunk(b_ol, w_ptr, stride_w_out, stride_w_in, o_c, o_dv, HEAD_DIM_V: tl.constexpr,
                    HAS_WEIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """``o_l[:, c] Wᵀ[c, :]`` ``[BLOCK_M, BLOCK_DV]`` fp32: one ``DV_CHUNK``-column slice ``b_ol`` of the linear
    branch through ``Proj`` (weight ``W (Dv, Dv)``, in W's dtype as ``F.linear`` runs it); without a weight the
    slice itself, placed at its columns by a 0/1 selection matrix (an exact product)."""
    m_c = o_c < HEAD_DIM_V
    if HAS_WEIGHT:
        # [DV_CHUNK, BLOCK_DV]: Wᵀ[c, j] = W[j, c]
        p_w = w_ptr + o_dv[None, :] * stride_w_out + o_c[:, None] * stride_w_in
        b_w = tl.load(p_w, mask=m_c[:, None] & (o_dv < HEAD_DIM_V)[None, :], other=0.0)
    else:
        b_w = tl.where(o_c[:, None] == o_dv[None, :], 1.0, 0.0).to(b_ol.dtype)
    return tl.dot(b_ol.to(b_w.dtype), b_w, input_precision=DOT_PRECISION)


# ---------------------------------------------------------------------------------------------- forward
@triton.autotune(
    configs=autotune_configs(_FWD_CONFIGS, _DEFAULT_CONFIG),
    key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": prune_configs},
    **autotune_kwargs(),
)
@triton.heuristics(TILE_HEURISTICS)
@triton.jit
def _sparse_linear_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    os_ptr,
    ol_ptr,
    lse_ptr,
    rden_ptr,
    hm_ptr,
    zm_ptr,
    indptr_ptr,
    indices_ptr,
    neg_indptr_ptr,
    neg_indices_ptr,
    w_ptr,
    bias_ptr,
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
    stride_neg_b,
    stride_neg_h,
    stride_w_out,
    stride_w_in,
    num_heads,
    q_len,
    kv_len,
    block_q,
    block_k,
    num_kv_blocks,
    qk_scale,
    eps,
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
    COMBINE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
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
    p_q = q_ptr + i_b * stride_q_b + i_h * stride_q_h
    p_q += (start_m + o_m)[:, None] * stride_q_n + o_d[None, :] * stride_q_d
    # [BLOCK_M, BLOCK_D]
    b_q = _bsa_load(p_q, m_m, m_d, EVEN_M, HEAD_DIM == BLOCK_D)
    row = indptr_ptr + i_b * stride_indptr_b + i_h * stride_indptr_h + i_m
    crit_start = tl.load(row)
    crit_end = tl.load(row + 1)
    # -- sparse part: online softmax over the critical blocks
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], _NEG_INF, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _block_sparse_fwd_inner(
        acc,
        m_i,
        l_i,
        b_q,
        start_m + o_m,
        _Operand(k_ptr + i_b * stride_k_b + i_h * stride_k_h, stride_k_n, stride_k_d, k_ptr, False),
        _Operand(v_ptr + i_b * stride_v_b + i_h * stride_v_h, stride_v_n, stride_v_d, v_ptr, False),
        qk_scale,
        _Walk(indices_ptr, crit_start, crit_end, crit_end, block_k, kv_len, BLOCK_N, K_SUB, EVEN_N),
        _Predicate(qtab_ptr, ktab_ptr, tab_len, 0.0, MASK_KIND),
        _Dims(HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, DOT_PRECISION),
        False,  # TMA: the pointer path
        False,  # LAZY_RESCALE
    )
    empty = l_i == 0.0
    o_row = (start_m + o_m)[:, None] * stride_o_n + o_dv[None, :] * stride_o_d
    m_dv = o_dv < HEAD_DIM_V
    m_o = m_m[:, None] & m_dv[None, :]
    # [BLOCK_M, BLOCK_DV]: o_s; with COMBINE the output accumulator, which the linear chunks add into
    b_os = acc / tl.where(empty, 1.0, l_i)[:, None]
    p_row = i_bh.to(tl.int64) * q_len + start_m + o_m
    if not COMBINE:
        tl.store(os_ptr + i_b * stride_o_b + i_h * stride_o_h + o_row, b_os.to(os_ptr.dtype.element_ty), mask=m_o)
        b_lse = tl.where(empty, _NEG_INF_LSE, (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * _LN2)
        tl.store(lse_ptr + p_row, b_lse, mask=m_m)
    # -- linear part: the query block's marginal state (masked_block_sums), applied to φ(q); 0 without marginal blocks
    neg_row = neg_indptr_ptr + i_b * stride_neg_b + i_h * stride_neg_h + i_m
    num_marginal = num_kv_blocks - (crit_end - crit_start) - (tl.load(neg_row + 1) - tl.load(neg_row))
    i_state = i_bh.to(tl.int64) * (tl.num_programs(0) // Q_SUB) + i_m
    b_z = tl.load(zm_ptr + i_state * HEAD_DIM + o_d, mask=m_d, other=0.0)
    # re-read the query tile (an L2 hit) rather than keep it live in registers across the flash loop
    b_q = _bsa_load(p_q, m_m, m_d, EVEN_M, HEAD_DIM == BLOCK_D)
    b_phq = _phi(b_q.to(tl.float32), m_d, FEATURE)
    b_rden = tl.where(num_marginal > 0, 1.0 / (tl.sum(b_phq * b_z[None, :], axis=1) + eps), 0.0)
    # the dots take the state's dtype (bf16 for bf16 inputs): cast once, which also halves the tile's registers
    b_phq = b_phq.to(hm_ptr.dtype.element_ty)
    for c in tl.static_range(0, BLOCK_DV, DV_CHUNK):
        # [BLOCK_D, DV_CHUNK]
        b_s = _sla_state_slice(hm_ptr, i_state, c, HEAD_DIM, HEAD_DIM_V, BLOCK_D, DV_CHUNK)
        # [BLOCK_M, DV_CHUNK], rounded to the output dtype as the unfused o_linear is
        b_ol = (_sla_dot(b_phq, b_s, STATE_BF16, DOT_PRECISION) * b_rden[:, None]).to(os_ptr.dtype.element_ty)
        o_c = c + tl.arange(0, DV_CHUNK)
        if COMBINE:
            b_os += _sla_proj_chunk(b_ol, w_ptr, stride_w_out, stride_w_in, o_c, o_dv, HEAD_DIM_V, HAS_WEIGHT,
                                    DOT_PRECISION)  # fmt: skip
        else:
            p_ol = ol_ptr + i_b * stride_o_b + i_h * stride_o_h + (start_m + o_m)[:, None] * stride_o_n
            p_ol += o_c[None, :] * stride_o_d
            tl.store(p_ol, b_ol, mask=m_m[:, None] & (o_c < HEAD_DIM_V)[None, :])
    if COMBINE:
        if HAS_BIAS:
            b_os += tl.load(bias_ptr + o_dv, mask=m_dv, other=0.0).to(tl.float32)[None, :]
        tl.store(os_ptr + i_b * stride_o_b + i_h * stride_o_h + o_row, b_os.to(os_ptr.dtype.element_ty), mask=m_o)
    else:
        tl.store(rden_ptr + p_row, b_rden, mask=m_m)


# ---------------------------------------------------------------------------------------------- launchers
def sparse_linear_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
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
    eps: float,
    proj: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
    uniform_rows: bool = False,
    weights: tuple[torch.Tensor, torch.Tensor] | None = None,
    states: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | torch.Tensor:
    """The per-key-block states, their masked sums per query block, then grid ``(Mq * Q_SUB, B * H)`` of fused
    query tiles.

    Without ``proj`` (the forward that the backward needs) returns ``o_sparse``, ``o_linear`` ``(B, H, Nq, Dv)``
    stored like q, and fp32 ``(B, H, Nq)`` rows: ``lse`` (natural log, ``-inf`` without critical blocks) and
    ``rden = 1 / (φ(q)·z + eps)`` (0 without marginal blocks). With ``proj = (weight (Dv, Dv) or None, bias (Dv,)
    or None)`` (inference, fp16/bf16/fp32) returns only ``out = o_s + Proj(o_l)`` ``(B, H, Nq, Dv)``, formed in the
    kernel's epilogue, so neither branch nor the row statistics reach memory. ``uniform_rows``: both CSRs keep the
    same number of blocks in every row (``BlockMask._uniform_rows``; fewer small kernels for the marginal matrix).
    ``weights``: the marginal block matrix of the two CSRs as ``marginal_weights`` makes it, when the caller has it
    (cached per mask: no small kernels at all); else built here. ``states``: ``sparse_linear_state(k, v, block_k,
    feature)`` when the caller launched it already; else launched here first.
    """
    b, h, q_len, _ = q.shape
    # the state pass first: the GPU starts on it while the host builds the rest
    h_blocks, z_blocks = states or sparse_linear_state(k, v, block_k, feature)
    proj_weight, proj_bias = proj or (None, None)
    if proj is None:
        rows = lambda: torch.empty(b, h, q_len, device=q.device, dtype=torch.float32)
        outputs = empty_like_layout(q, v.shape[-1]), empty_like_layout(q, v.shape[-1]), rows(), rows()
    else:
        outputs = (empty_like_layout(q, v.shape[-1]),) * 4
    num_kv_blocks = h_blocks.shape[1]
    if weights is None:
        marginal = marginal_block_matrix(
            indptr, indices, neg_indptr, neg_indices, num_kv_blocks, h_blocks.dtype, uniform_rows
        )
        weights = marginal_weights(marginal, b, h, h_blocks.dtype)
    h_marginal, z_marginal = masked_block_sums(weights, h_blocks, z_blocks)
    del h_blocks
    grid = lambda meta: (cdiv(q_len, block_q) * meta["Q_SUB"], b * h)
    launch(
        _sparse_linear_fwd_kernel,
        grid,
        q,
        k,
        v,
        *outputs,
        h_marginal,
        z_marginal,
        indptr,
        indices,
        neg_indptr,
        neg_indices,
        q if proj_weight is None else proj_weight,
        q if proj_bias is None else proj_bias,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *outputs[0].stride(),
        *csr_strides(indptr),
        *csr_strides(neg_indptr),
        *(proj_weight.stride() if proj_weight is not None else (0, 0)),
        h,
        q_len,
        k.shape[2],
        block_q,
        block_k,
        num_kv_blocks,
        scale * LOG2E,
        eps,
        *predicate_args(None, None, partial),
        FEATURE=feature,
        STATE_BF16=state_dtype(q.dtype) == torch.bfloat16,
        DV_CHUNK=dv_chunk(v.shape[-1]),
        COMBINE=proj is not None,
        HAS_WEIGHT=proj_weight is not None,
        HAS_BIAS=proj_bias is not None,
        **launch_constexprs(q, v, MASK_NONE),
    )
    return outputs if proj is None else outputs[0]
