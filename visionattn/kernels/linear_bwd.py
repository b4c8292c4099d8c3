"""Non-causal linear attention, backward of the three forward passes in ``linear.py`` (same layouts and flags).

With ``S̄, z̄, v̄`` the mean-normalised state, ``t_i = φ(q̃_i)·z̄`` and ``num_i = c·(R_iφ(q_i))ᵀS̄`` (``c`` = 1, scale or
Nk for divisive, additive, plain), the apply backward (``_linear_bwd_kernel_apply``, grid ``(chunks, B·H)``) writes
``dq`` (and ``dq̃``) per token and fp32 chunk partials of ``dS̄ = c Σ_i R_iφ(q_i) dnum_iᵀ``, ``dz̄ = Σ_i dt_i φ(q̃_i)``,
``dv̄ = −Σ_i z_i do_i``, summed in chunk order. The state backward (``_linear_bwd_kernel_state``) maps them to
``dk``, ``dv``, ``dk̃`` and the weight gradient ``g_j = (R_jφ(k_j))ᵀ dS̄ v_j + φ(k̃_j)·dz̄``: a tensor weight gets
``g_j / Nk``; RALA's softmax gets ``ds_j = α_j (g_j − ⟨S̄, dS̄⟩ − z̄·dz̄)`` (the softmax's ``Σ_l α_l g_l`` is a
state inner product, so no extra pass is needed), which flows into ``k̃_j`` and into chunk partials of ``dq̄``.
``_linear_bwd_kernel_query_mean`` maps ``dq̄`` to every query, into its own tensor or added in place into the apply
backward's ``dq`` (``dq̃``) when one autograd node owns both.
"""

import torch
import triton
import triton.language as tl

from ._config import autotune_configs, autotune_kwargs
from ._launch import launch
from .block_sparse import cdiv, next_block
from .linear import (
    FEATURE_CODES,
    NORMALIZE_CODES,
    _features,
    _load_rows,
    _phi,
    _phi_bwd,
    _rotate_every_two,
    chunking,
    dot_precision,
    numerator_scale,
    rope_strides,
    strides4,
)
from .linear_configs import _BLOCK_CONFIGS, _BLOCK_DEFAULT, _REDUCE_CONFIGS, _REDUCE_DEFAULT, _prune_reduce_configs

__all__ = ["linear_apply_bwd", "linear_query_mean_bwd", "linear_state_bwd"]


@triton.jit
def _rope_bwd(g, b_cos, b_sin, HAS_ROPE: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rᵀg = g·cos − rotate_every_two(g·sin): the pair swap P is antisymmetric, Pᵀ = −P."""
    if HAS_ROPE:
        g = g * b_cos - _rotate_every_two(g * b_sin, ROWS, BLOCK_D)
    return g


@triton.jit
def _operand(x, BF16_STATE: tl.constexpr):
    """A ``tl.dot`` operand: fp32 (tf32/ieee), or bf16 (see ``bf16_state``)."""
    if BF16_STATE:
        x = x.to(tl.bfloat16)
    return x


@triton.jit
def _store_rows(p, x, m_n, m_d):
    tl.store(p, x.to(p.dtype.element_ty), mask=m_n[:, None] & m_d[None, :])


@triton.autotune(
    configs=autotune_configs(_BLOCK_CONFIGS, _BLOCK_DEFAULT),
    key=["D", "FEATURE", "ACCUMULATE"],
    # with ACCUMULATE the kernel adds into dq: every config the autotuner times must start from the same dq
    restore_value=["dq_ptr"],
    **autotune_kwargs(),
)
@triton.jit
def _linear_bwd_kernel_query_mean(
    q_ptr,
    dqm_ptr,
    dq_ptr,
    stride_q_b,
    stride_q_h,
    stride_q_n,
    stride_q_d,
    stride_dq_b,
    stride_dq_h,
    stride_dq_n,
    stride_dq_d,
    H,
    N,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FEATURE: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_n = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_n = o_n < N
    m_d = o_d < D
    p_q = q_ptr + i_b * stride_q_b + i_h * stride_q_h + o_n[:, None] * stride_q_n + o_d[None, :] * stride_q_d
    # [BLOCK_M, BLOCK_D]
    b_q = _load_rows(p_q, m_n, m_d)
    b_g = tl.load(dqm_ptr + i_bh * D + o_d, mask=m_d, other=0.0) / N
    b_dq = _phi_bwd(b_q, _phi(b_q, m_d, FEATURE), b_g[None, :] + b_q * 0.0, FEATURE)
    p_dq = dq_ptr + i_b * stride_dq_b + i_h * stride_dq_h + o_n[:, None] * stride_dq_n + o_d[None, :] * stride_dq_d
    if ACCUMULATE:
        b_dq += _load_rows(p_dq, m_n, m_d)
    _store_rows(p_dq, b_dq, m_n, m_d)


@triton.autotune(
    configs=autotune_configs(_REDUCE_CONFIGS, _REDUCE_DEFAULT),
    key=["D", "DV", "FEATURE", "NORMALIZE", "HAS_Q_NORM", "HAS_ROPE", "ROPE_PAIRS"],
    prune_configs_by={"early_config_prune": _prune_reduce_configs},
    **autotune_kwargs(),
)
@triton.jit
def _linear_bwd_kernel_apply(
    q_ptr,
    qn_ptr,
    cos_ptr,
    sin_ptr,
    do_ptr,
    kv_ptr,
    ks_ptr,
    vm_ptr,
    dq_ptr,
    dqn_ptr,
    dkv_part_ptr,
    dks_part_ptr,
    dvm_part_ptr,
    stride_q_b,
    stride_q_h,
    stride_q_n,
    stride_q_d,
    stride_qn_b,
    stride_qn_h,
    stride_qn_n,
    stride_qn_d,
    stride_cos_n,
    stride_cos_d,
    stride_do_b,
    stride_do_h,
    stride_do_n,
    stride_do_d,
    stride_dq_b,
    stride_dq_h,
    stride_dq_n,
    stride_dq_d,
    stride_dqn_b,
    stride_dqn_h,
    stride_dqn_n,
    stride_dqn_d,
    H,
    N,
    chunk_len,
    num_scale,
    scale,
    eps,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    FEATURE: tl.constexpr,
    NORMALIZE: tl.constexpr,
    HAS_Q_NORM: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    ROPE_PAIRS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BF16_STATE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_d = tl.arange(0, BLOCK_D)
    o_e = tl.arange(0, BLOCK_DV)
    m_d = o_d < D
    m_e = o_e < DV
    # [BLOCK_D, BLOCK_DV]
    b_kv = tl.load(
        kv_ptr + i_bh * D * DV + o_d[:, None] * DV + o_e[None, :], mask=m_d[:, None] & m_e[None, :], other=0.0
    )
    b_kv = _operand(b_kv, BF16_STATE)
    b_ks = tl.load(ks_ptr + i_bh * D + o_d, mask=m_d, other=0.0)
    b_vm = tl.load(vm_ptr + i_bh * DV + o_e, mask=m_e, other=0.0)
    b_dkv = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    # row-tile shaped sums, reduced over rows once after the loop (see linear._linear_fwd_kernel_state)
    b_dks = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dvm = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    start = i_c * chunk_len
    end = tl.minimum(start + chunk_len, N)
    for n0 in range(start, end, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < end
        p_q = q_ptr + i_b * stride_q_b + i_h * stride_q_h + o_n[:, None] * stride_q_n + o_d[None, :] * stride_q_d
        p_qn = qn_ptr + i_b * stride_qn_b + i_h * stride_qn_h + o_n[:, None] * stride_qn_n + o_d[None, :] * stride_qn_d
        p_cos = cos_ptr + o_n[:, None] * stride_cos_n + o_d[None, :] * stride_cos_d
        p_sin = sin_ptr + o_n[:, None] * stride_cos_n + o_d[None, :] * stride_cos_d
        b_q, b_phi, b_qn, b_phin, b_phir, b_cos, b_sin = _features(
            p_q, p_qn, p_cos, p_sin, m_n, m_d, FEATURE, HAS_Q_NORM, HAS_ROPE, ROPE_PAIRS, BLOCK_N, BLOCK_D
        )
        p_do = do_ptr + i_b * stride_do_b + i_h * stride_do_h + o_n[:, None] * stride_do_n + o_e[None, :] * stride_do_d
        # [BLOCK_N, BLOCK_DV]
        b_do = _load_rows(p_do, m_n, m_e)
        b_num = num_scale * tl.dot(_operand(b_phir, BF16_STATE), b_kv, input_precision=DOT_PRECISION)
        if NORMALIZE == 0:
            b_den = tl.sum(b_phin * b_ks[None, :], axis=1) + eps
            b_dnum = b_do / b_den[:, None]
            b_dt = -tl.sum(b_do * b_num, axis=1) / (b_den * b_den)
        elif NORMALIZE == 1:
            b_z = scale * tl.sum(b_phin * b_ks[None, :], axis=1)
            b_dnum = b_do * (1.0 + 1.0 / (b_z + eps))[:, None]
            # one row reduction (two would each need their own layout conversion)
            b_r = 1.0 / ((b_z + eps) * (b_z + eps))
            b_dz = -tl.sum(b_do * (b_num * b_r[:, None] + b_vm[None, :]), axis=1)
            b_dt = scale * b_dz
            b_dvm -= b_z[:, None] * b_do
        else:
            b_dnum = b_do
            b_dt = tl.sum(b_do * 0.0, axis=1)
        b_dnum_op = _operand(b_dnum, BF16_STATE)
        b_dkv += num_scale * tl.dot(tl.trans(_operand(b_phir, BF16_STATE)), b_dnum_op, input_precision=DOT_PRECISION)
        b_dks += b_dt[:, None] * b_phin
        b_dphir = num_scale * tl.dot(b_dnum_op, tl.trans(b_kv), input_precision=DOT_PRECISION)
        b_dphi = _rope_bwd(b_dphir, b_cos, b_sin, HAS_ROPE, BLOCK_N, BLOCK_D)
        b_dphin = b_dt[:, None] * b_ks[None, :]
        p_dq = dq_ptr + i_b * stride_dq_b + i_h * stride_dq_h + o_n[:, None] * stride_dq_n + o_d[None, :] * stride_dq_d
        if HAS_Q_NORM:
            _store_rows(p_dq, _phi_bwd(b_q, b_phi, b_dphi, FEATURE), m_n, m_d)
            p_dqn = (
                dqn_ptr
                + i_b * stride_dqn_b
                + i_h * stride_dqn_h
                + o_n[:, None] * stride_dqn_n
                + o_d[None, :] * stride_dqn_d
            )
            _store_rows(p_dqn, _phi_bwd(b_qn, b_phin, b_dphin, FEATURE), m_n, m_d)
        else:
            _store_rows(p_dq, _phi_bwd(b_q, b_phi, b_dphi + b_dphin, FEATURE), m_n, m_d)
    i_part = i_c * tl.num_programs(1) + i_bh
    p_dkv = dkv_part_ptr + i_part * D * DV + o_d[:, None] * DV + o_e[None, :]
    tl.store(p_dkv, b_dkv, mask=m_d[:, None] & m_e[None, :])
    tl.store(dks_part_ptr + i_part * D + o_d, tl.sum(b_dks, axis=0), mask=m_d)
    tl.store(dvm_part_ptr + i_part * DV + o_e, tl.sum(b_dvm, axis=0), mask=m_e)


@triton.autotune(
    configs=autotune_configs(_REDUCE_CONFIGS, _REDUCE_DEFAULT),
    key=["D", "DV", "FEATURE", "WEIGHT", "HAS_K_NORM", "HAS_ROPE", "ROPE_PAIRS"],
    prune_configs_by={"early_config_prune": _prune_reduce_configs},
    **autotune_kwargs(),
)
@triton.jit
def _linear_bwd_kernel_state(
    k_ptr,
    v_ptr,
    kn_ptr,
    w_ptr,
    qm_ptr,
    cos_ptr,
    sin_ptr,
    kv_ptr,
    ks_ptr,
    lse_ptr,
    dkv_ptr,
    dks_ptr,
    dvm_ptr,
    dk_ptr,
    dv_ptr,
    dkn_ptr,
    dw_ptr,
    dqm_part_ptr,
    stride_k_b,
    stride_k_h,
    stride_k_n,
    stride_k_d,
    stride_v_b,
    stride_v_h,
    stride_v_n,
    stride_v_d,
    stride_kn_b,
    stride_kn_h,
    stride_kn_n,
    stride_kn_d,
    stride_w_b,
    stride_w_h,
    stride_w_n,
    stride_cos_n,
    stride_cos_d,
    stride_dk_b,
    stride_dk_h,
    stride_dk_n,
    stride_dk_d,
    stride_dv_b,
    stride_dv_h,
    stride_dv_n,
    stride_dv_d,
    stride_dkn_b,
    stride_dkn_h,
    stride_dkn_n,
    stride_dkn_d,
    stride_dw_b,
    stride_dw_h,
    stride_dw_n,
    H,
    N,
    chunk_len,
    scale,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    FEATURE: tl.constexpr,
    WEIGHT: tl.constexpr,
    HAS_K_NORM: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    ROPE_PAIRS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BF16_STATE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_d = tl.arange(0, BLOCK_D)
    o_e = tl.arange(0, BLOCK_DV)
    m_d = o_d < D
    m_e = o_e < DV
    m_de = m_d[:, None] & m_e[None, :]
    # [BLOCK_D, BLOCK_DV]
    b_dkv = tl.load(dkv_ptr + i_bh * D * DV + o_d[:, None] * DV + o_e[None, :], mask=m_de, other=0.0)
    b_dks = tl.load(dks_ptr + i_bh * D + o_d, mask=m_d, other=0.0)
    b_dvm = tl.load(dvm_ptr + i_bh * DV + o_e, mask=m_e, other=0.0)
    if WEIGHT == 2:
        # the softmax's Σ_l α_l g_l = ⟨S̄, dS̄⟩ + z̄·dz̄, from the fp32 state and its fp32 gradient
        b_kv = tl.load(kv_ptr + i_bh * D * DV + o_d[:, None] * DV + o_e[None, :], mask=m_de, other=0.0)
        b_ks = tl.load(ks_ptr + i_bh * D + o_d, mask=m_d, other=0.0)
        b_c0 = tl.sum(tl.sum(b_kv * b_dkv, axis=1), axis=0) + tl.sum(b_ks * b_dks, axis=0)
    b_dkv = _operand(b_dkv, BF16_STATE)
    if WEIGHT == 2:
        b_qm = tl.load(qm_ptr + i_bh * D + o_d, mask=m_d, other=0.0)
        b_lse = tl.load(lse_ptr + i_bh)
    b_dqm = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    start = i_c * chunk_len
    end = tl.minimum(start + chunk_len, N)
    for n0 in range(start, end, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < end
        p_k = k_ptr + i_b * stride_k_b + i_h * stride_k_h + o_n[:, None] * stride_k_n + o_d[None, :] * stride_k_d
        p_kn = kn_ptr + i_b * stride_kn_b + i_h * stride_kn_h + o_n[:, None] * stride_kn_n + o_d[None, :] * stride_kn_d
        p_cos = cos_ptr + o_n[:, None] * stride_cos_n + o_d[None, :] * stride_cos_d
        p_sin = sin_ptr + o_n[:, None] * stride_cos_n + o_d[None, :] * stride_cos_d
        b_k, b_phi, b_kn, b_phin, b_phir, b_cos, b_sin = _features(
            p_k, p_kn, p_cos, p_sin, m_n, m_d, FEATURE, HAS_K_NORM, HAS_ROPE, ROPE_PAIRS, BLOCK_N, BLOCK_D
        )
        p_v = v_ptr + i_b * stride_v_b + i_h * stride_v_h + o_n[:, None] * stride_v_n + o_e[None, :] * stride_v_d
        # [BLOCK_N, BLOCK_DV]
        b_v = _load_rows(p_v, m_n, m_e)
        if WEIGHT == 2:
            b_alpha = tl.exp(scale * tl.sum(b_phin * b_qm[None, :], axis=1) - b_lse)
            b_w = b_alpha * N
        elif WEIGHT == 1:
            p_w = w_ptr + i_b * stride_w_b + i_h * stride_w_h + o_n * stride_w_n
            b_w = tl.load(p_w, mask=m_n, other=0.0).to(tl.float32)
        else:
            b_w = tl.where(m_n, 1.0, 0.0)
        # [BLOCK_N, BLOCK_D]: dS̄ v_j, the gradient on R_jφ(k_j) before its weight
        b_sv = tl.dot(_operand(b_v, BF16_STATE), tl.trans(b_dkv), input_precision=DOT_PRECISION)
        b_wn = b_w / N
        b_dv = b_wn[:, None] * tl.dot(_operand(b_phir, BF16_STATE), b_dkv, input_precision=DOT_PRECISION)
        b_dv += b_dvm[None, :] / N
        p_dv = dv_ptr + i_b * stride_dv_b + i_h * stride_dv_h + o_n[:, None] * stride_dv_n + o_e[None, :] * stride_dv_d
        _store_rows(p_dv, b_dv, m_n, m_e)
        b_dphi = _rope_bwd(b_wn[:, None] * b_sv, b_cos, b_sin, HAS_ROPE, BLOCK_N, BLOCK_D)
        b_dphin = b_wn[:, None] * b_dks[None, :]
        if WEIGHT != 0:
            b_g = tl.sum(b_phir * b_sv + b_phin * b_dks[None, :], axis=1)
        if WEIGHT == 1:
            tl.store(dw_ptr + i_b * stride_dw_b + i_h * stride_dw_h + o_n * stride_dw_n, b_g / N, mask=m_n)
        if WEIGHT == 2:
            b_ds = tl.where(m_n, b_alpha * (b_g - b_c0), 0.0)
            b_dphin += (scale * b_ds)[:, None] * b_qm[None, :]
            b_dqm += (scale * b_ds)[:, None] * b_phin
        p_dk = dk_ptr + i_b * stride_dk_b + i_h * stride_dk_h + o_n[:, None] * stride_dk_n + o_d[None, :] * stride_dk_d
        if HAS_K_NORM:
            _store_rows(p_dk, _phi_bwd(b_k, b_phi, b_dphi, FEATURE), m_n, m_d)
            p_dkn = (
                dkn_ptr
                + i_b * stride_dkn_b
                + i_h * stride_dkn_h
                + o_n[:, None] * stride_dkn_n
                + o_d[None, :] * stride_dkn_d
            )
            _store_rows(p_dkn, _phi_bwd(b_kn, b_phin, b_dphin, FEATURE), m_n, m_d)
        else:
            _store_rows(p_dk, _phi_bwd(b_k, b_phi, b_dphi + b_dphin, FEATURE), m_n, m_d)
    if WEIGHT == 2:
        tl.store(dqm_part_ptr + (i_c * tl.num_programs(1) + i_bh) * D + o_d, tl.sum(b_dqm, axis=0), mask=m_d)


# ------------------------------------------------------------------------------------------------ host launchers
def bf16_state(dtype: torch.dtype, d: int, dv: int) -> bool:
    """bf16 dot operands (fp32 range): always for bf16 inputs, whose values and gradients are bf16-rounded anyway
    (half the registers and shared memory of fp32 operands: fewer spills, and larger row tiles fit), and for fp16
    inputs where the 128x128 fp32 state operands (and their transposes) would overflow shared memory.

    fp32 inputs keep fp32 operands (and need the smaller tiles).
    """
    big = next_block(d) * next_block(dv) > 64 * 128
    return dtype == torch.bfloat16 or (dtype == torch.float16 and big)


def linear_query_mean_bwd(
    q: torch.Tensor, d_mean: torch.Tensor, feature_map: str, dq: torch.Tensor | None = None
) -> torch.Tensor:
    """``dq_i = J_φ(q_i)ᵀ d_mean / Nq``, or with ``dq`` (shaped like q) ``dq_i += …`` in place (one read of dq
    instead of a second gradient tensor and autograd's sum of the two). Grid ``(cdiv(Nq, BLOCK_M), B·H)``."""
    b, h, n, d = q.shape
    accumulate = dq is not None
    dq = torch.empty_like(q) if dq is None else dq
    grid = lambda meta: (cdiv(n, meta["BLOCK_M"]), b * h)
    launch(
        _linear_bwd_kernel_query_mean,
        grid,
        q,
        d_mean.float().contiguous(),
        dq,
        *q.stride(),
        *dq.stride(),
        h,
        n,
        D=d,
        BLOCK_D=next_block(d),
        FEATURE=FEATURE_CODES[feature_map],
        ACCUMULATE=accumulate,
    )
    return dq


def linear_apply_bwd(
    q: torch.Tensor,
    q_norm: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    kv: torch.Tensor,
    k_sum: torch.Tensor,
    v_mean: torch.Tensor,
    do: torch.Tensor,
    feature_map: str,
    normalize: str | None,
    scale: float,
    eps: float,
    length: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dq_norm or None, dS̄, dz̄, dv̄)``; state gradients fp32. Grid ``(chunks, B·H)``."""
    b, h, n, d = q.shape
    dv = kv.shape[-1]
    chunk_len, chunks = chunking(n, b * h, q.device)
    f32 = dict(device=q.device, dtype=torch.float32)
    dq = torch.empty_like(q)
    dqn = torch.empty_like(q_norm) if q_norm is not None else None
    dkv_part = torch.empty(chunks, b, h, d, dv, **f32)
    dks_part = torch.empty(chunks, b, h, d, **f32)
    dvm_part = torch.empty(chunks, b, h, dv, **f32)
    launch(
        _linear_bwd_kernel_apply,
        (chunks, b * h),
        q,
        q if q_norm is None else q_norm,
        q if cos is None else cos,
        q if sin is None else sin,
        do,
        kv.contiguous(),
        k_sum.contiguous(),
        v_mean.contiguous(),
        dq,
        dq if dqn is None else dqn,
        dkv_part,
        dks_part,
        dvm_part,
        *q.stride(),
        *strides4(q_norm),
        *rope_strides(cos),
        *do.stride(),
        *dq.stride(),
        *strides4(dqn),
        h,
        n,
        chunk_len,
        numerator_scale(normalize, scale, length),
        scale,
        eps,
        D=d,
        DV=dv,
        BLOCK_D=next_block(d),
        BLOCK_DV=next_block(dv),
        FEATURE=FEATURE_CODES[feature_map],
        NORMALIZE=NORMALIZE_CODES[normalize],
        HAS_Q_NORM=q_norm is not None,
        HAS_ROPE=cos is not None,
        ROPE_PAIRS=cos is not None and sin is None,
        DOT_PRECISION=dot_precision(q.dtype),
        BF16_STATE=bf16_state(q.dtype, d, dv),
    )
    return dq, dqn, dkv_part.sum(dim=0), dks_part.sum(dim=0), dvm_part.sum(dim=0)


def linear_state_bwd(
    k: torch.Tensor,
    v: torch.Tensor,
    k_norm: torch.Tensor | None,
    key_weight: torch.Tensor | None,
    query_mean: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    kv: torch.Tensor,
    k_sum: torch.Tensor,
    lse: torch.Tensor,
    d_kv: torch.Tensor,
    d_k_sum: torch.Tensor,
    d_v_mean: torch.Tensor,
    feature_map: str,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dk, dv, dk_norm, dkey_weight, dquery_mean)`` (None where the input is absent). Grid ``(chunks, B·H)``."""
    b, h, n, d = k.shape
    dvd = v.shape[-1]
    chunk_len, chunks = chunking(n, b * h, k.device)
    rala = query_mean is not None
    weight = 2 if rala else 1 if key_weight is not None else 0
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dkn = torch.empty_like(k_norm) if k_norm is not None else None
    dw = torch.empty_like(key_weight) if key_weight is not None else None
    dqm_part = torch.empty(chunks, b, h, d, device=k.device, dtype=torch.float32) if rala else None
    f32 = lambda t: t.float().contiguous()
    launch(
        _linear_bwd_kernel_state,
        (chunks, b * h),
        k,
        v,
        k if k_norm is None else k_norm,
        k if key_weight is None else key_weight,
        f32(query_mean) if rala else k,
        k if cos is None else cos,
        k if sin is None else sin,
        f32(kv) if rala else k,
        f32(k_sum) if rala else k,
        f32(lse),
        f32(d_kv),
        f32(d_k_sum),
        f32(d_v_mean),
        dk,
        dv,
        dk if dkn is None else dkn,
        dk if dw is None else dw,
        dk if dqm_part is None else dqm_part,
        *k.stride(),
        *v.stride(),
        *strides4(k_norm),
        *(key_weight.stride() if key_weight is not None else (0, 0, 0)),
        *rope_strides(cos),
        *dk.stride(),
        *dv.stride(),
        *strides4(dkn),
        *(dw.stride() if dw is not None else (0, 0, 0)),
        h,
        n,
        chunk_len,
        scale,
        D=d,
        DV=dvd,
        BLOCK_D=next_block(d),
        BLOCK_DV=next_block(dvd),
        FEATURE=FEATURE_CODES[feature_map],
        WEIGHT=weight,
        HAS_K_NORM=k_norm is not None,
        HAS_ROPE=cos is not None,
        ROPE_PAIRS=cos is not None and sin is None,
        DOT_PRECISION=dot_precision(k.dtype),
        BF16_STATE=bf16_state(k.dtype, d, dvd),
    )
    return dk, dv, dkn, dw, dqm_part.sum(dim=0) if rala else None
