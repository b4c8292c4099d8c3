"""Chunked gated linear attention (GLA), backward kernel and launcher; the forward and shared helpers are in gated.py.

Per direction, in scan order, with scaled queries q̃ = q · scale / directions, G the cumulative log gate, the state
S_t (token t included) and its adjoint, the gradient state dH_s = Σ_{t>=s} (q̃_t ⊙ exp(G_t - G_s))ᵀ dO_t:

    dq̃_t = S_t dO_t,        dk_s = dH_s v_s,        dv_s = dH_sᵀ k_s
    dG_t = q̃_t ⊙ dq̃_t - k_t ⊙ dk_t,        d log_gate_r = Σ_{t >= r} dG_t        (GLA's reversed cumsum)

``gated_states`` stores the chunk-entry states of all 2 x directions passes (state and gradient
state); one program of ``_gated_bwd_kernel`` per (chunk, batch·head) then walks the chunk's sub-blocks forwards
(dq̃, running S) and backwards (dk, dv, gate gradient, running dH). The gate gradient of a chunk starts from the
sum of dG over everything after it, ``Σ_e S_end ⊙ dH_end``, so no pass over the whole sequence is needed.
"""

import torch
import triton
import triton.language as tl

from ._config import autotune_configs, autotune_kwargs
from ._launch import launch
from .block_sparse import cdiv, empty_like_layout, leading_strides, unit_last_stride
from .gated import (
    GATED_SUB_BLOCK,
    _gated_clamp_gate,
    _gated_clamped,
    _gated_dot,
    _gated_entry_state,
    _gated_intra_apply,
    _gated_intra_factors,
    _gated_intra_masks,
    _gated_intra_scores,
    _gated_load_gate,
    _gated_log_gate,
    _gated_log_gate_slope,
    _gated_logit_gate,
    _gated_ptrs,
    _gated_rows,
    _gated_softplus2,
    _gated_sub_block_gates,
    _gated_sub_blocks,
    _scan_constexprs,
    gated_states,
)

__all__ = ["gated_bwd"]

_BWD_CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w in (2, 4, 8) for s in (1, 2)]
_BWD_DEFAULT = triton.Config({}, num_warps=4, num_stages=1)


@triton.autotune(
    configs=autotune_configs(_BWD_CONFIGS, _BWD_DEFAULT),
    key=["DK", "DV", "BT", "NUM_DIR", "NSEG"],
    **autotune_kwargs(),
)
@triton.jit(do_not_specialize=["N", "NT", "SEG"])
def _gated_bwd_kernel(
    q,
    k,
    v,
    g_fwd,
    g_bwd,
    do,
    states,
    decays,
    dq,
    dk,
    dv,
    dg_fwd,
    dg_bwd,
    stride_q_b,
    stride_q_h,
    stride_q_n,
    stride_k_b,
    stride_k_h,
    stride_k_n,
    stride_v_b,
    stride_v_h,
    stride_v_n,
    stride_gf_b,
    stride_gf_h,
    stride_gf_n,
    stride_gb_b,
    stride_gb_h,
    stride_gb_n,
    stride_do_b,
    stride_do_h,
    stride_do_n,
    stride_dq_b,
    stride_dq_h,
    stride_dq_n,
    stride_dk_b,
    stride_dk_h,
    stride_dk_n,
    stride_dv_b,
    stride_dv_h,
    stride_dv_n,
    stride_dgf_b,
    stride_dgf_h,
    stride_dgf_n,
    stride_dgb_b,
    stride_dgb_h,
    stride_dgb_n,
    scale,
    N,
    NT,
    SEG,
    NSEG,
    H,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    NUM_DIR: tl.constexpr,
    GATE_NORMALIZER: tl.constexpr,
    IEEE: tl.constexpr,
):
    NS: tl.constexpr = BT // BC
    tl.static_assert(BC == 16)
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    o_i = tl.arange(0, BC)
    o_k = tl.arange(0, DK)
    o_v = tl.arange(0, DV)
    o_s = tl.arange(0, NS)
    m_same, m_cross = _gated_intra_masks(o_i, BC)
    for i_dir in tl.static_range(NUM_DIR):
        # [DK, DV]: the state entering the chunk, and the gradient state from beyond its end (its scan runs the
        # other way)
        i_scan = i_bh * 2 * NUM_DIR + i_dir
        b_s = _gated_entry_state(states, decays, i_scan, i_c, NT, SEG, NSEG, i_dir, DK, DV)
        b_dh = _gated_entry_state(states, decays, i_scan + NUM_DIR, i_c, NT, SEG, NSEG, 1 - i_dir, DK, DV)
        # -- scan order: dq̃ of every sub-block (kept for the gate gradient), running state
        # [NS, BC, DK]
        b_dq_all = tl.zeros([NS, BC, DK], dtype=tl.float32)
        i_lo, i_hi = _gated_sub_blocks(i_c, N, i_dir, BT, BC)
        for i_s in range(i_lo, i_hi):
            o_n = _gated_rows(i_c, i_s, o_i, BT, BC, i_dir)
            m_n = (o_n < N)[:, None]
            # [BC, DK]
            b_k = tl.load(_gated_ptrs(k, i_b, i_h, stride_k_b, stride_k_h, stride_k_n, o_n, o_k), m_n, 0.0)
            b_k = b_k.to(tl.float32)
            if i_dir == 0:
                p_g = _gated_ptrs(g_fwd, i_b, i_h, stride_gf_b, stride_gf_h, stride_gf_n, o_n, o_k)
            else:
                p_g = _gated_ptrs(g_bwd, i_b, i_h, stride_gb_b, stride_gb_h, stride_gb_n, o_n, o_k)
            b_g = _gated_load_gate(p_g, m_n, GATE_NORMALIZER)
            b_gc, b_gs, b_gt = _gated_sub_block_gates(b_g)
            # [BC, DV]
            b_v = tl.load(_gated_ptrs(v, i_b, i_h, stride_v_b, stride_v_h, stride_v_n, o_n, o_v), m_n, 0.0)
            b_v = b_v.to(tl.float32)
            b_do = tl.load(_gated_ptrs(do, i_b, i_h, stride_do_b, stride_do_h, stride_do_n, o_n, o_v), m_n, 0.0)
            b_do = b_do.to(tl.float32)
            # [BC, BC]: dO_i · v_j
            b_dov = _gated_dot(b_do, tl.trans(b_v), IEEE)
            b_rs, b_cs, b_rc, b_cc = _gated_intra_factors(b_gc, o_i, BC)
            b_dq = tl.exp2(b_gc) * _gated_dot(b_do, tl.trans(b_s), IEEE)
            b_dq += _gated_intra_apply(
                tl.where(m_same, b_dov, 0.0), tl.where(m_cross, b_dov, 0.0), b_k, b_rs, b_cs, b_rc, b_cc, IEEE
            )
            b_dq_all = tl.where(o_s[:, None, None] == i_s, b_dq[None, :, :], b_dq_all)
            b_s = b_s * tl.exp2(b_gt)[:, None] + _gated_dot(tl.trans(b_k * tl.exp2(b_gs)), b_v, IEEE)
        # b_s is now the state at the chunk's end: Σ_e S ⊙ dH is the gate gradient of everything beyond the chunk
        # [DK]
        b_carry = tl.sum(b_s * b_dh, axis=1)
        # -- against scan order: dk, dv, gate gradient, running gradient state
        for i_r in range(NS - i_hi, NS - i_lo):
            i_s = NS - 1 - i_r
            o_n = _gated_rows(i_c, i_s, o_i, BT, BC, i_dir)
            m_n = (o_n < N)[:, None]
            # [BC, DK]
            b_q = tl.load(_gated_ptrs(q, i_b, i_h, stride_q_b, stride_q_h, stride_q_n, o_n, o_k), m_n, 0.0)
            b_q = b_q.to(tl.float32) * scale
            b_k = tl.load(_gated_ptrs(k, i_b, i_h, stride_k_b, stride_k_h, stride_k_n, o_n, o_k), m_n, 0.0)
            b_k = b_k.to(tl.float32)
            if i_dir == 0:
                p_g = _gated_ptrs(g_fwd, i_b, i_h, stride_gf_b, stride_gf_h, stride_gf_n, o_n, o_k)
                p_dg = _gated_ptrs(dg_fwd, i_b, i_h, stride_dgf_b, stride_dgf_h, stride_dgf_n, o_n, o_k)
            else:
                p_g = _gated_ptrs(g_bwd, i_b, i_h, stride_gb_b, stride_gb_h, stride_gb_n, o_n, o_k)
                p_dg = _gated_ptrs(dg_bwd, i_b, i_h, stride_dgb_b, stride_dgb_h, stride_dgb_n, o_n, o_k)
            b_graw = tl.load(p_g, mask=m_n, other=0.0).to(tl.float32)
            if GATE_NORMALIZER == 0:
                b_glog = _gated_log_gate(b_graw, m_n, GATE_NORMALIZER)
            else:
                # gate logits: log2(1 + exp(-|x|)) serves the log gate and its slope
                b_sp = _gated_softplus2(b_graw)
                b_glog = _gated_logit_gate(b_graw, b_sp, m_n, GATE_NORMALIZER)
            b_gc, b_gs, b_gt = _gated_sub_block_gates(_gated_clamp_gate(b_glog, GATE_NORMALIZER))
            # [BC, DV]
            b_v = tl.load(_gated_ptrs(v, i_b, i_h, stride_v_b, stride_v_h, stride_v_n, o_n, o_v), m_n, 0.0)
            b_v = b_v.to(tl.float32)
            b_do = tl.load(_gated_ptrs(do, i_b, i_h, stride_do_b, stride_do_h, stride_do_n, o_n, o_v), m_n, 0.0)
            b_do = b_do.to(tl.float32)
            # [BC, BC]: scores A_ij (j <= i) and dO_i · v_j
            b_rs, b_cs, b_rc, b_cc = _gated_intra_factors(b_gc, o_i, BC)
            b_a = _gated_intra_scores(b_q, b_k, b_rs, b_cs, b_rc, b_cc, m_same, m_cross, IEEE)
            b_dov = _gated_dot(b_do, tl.trans(b_v), IEEE)
            # [BC, DK]
            b_dk = tl.exp2(b_gs) * _gated_dot(b_v, tl.trans(b_dh), IEEE)
            b_dk += _gated_intra_apply(
                tl.trans(tl.where(m_same, b_dov, 0.0)),
                tl.trans(tl.where(m_cross, b_dov, 0.0)),
                b_q,
                b_cs,
                b_rs,
                b_cc,
                b_rc,
                IEEE,
            )
            # [BC, DV]
            b_dv = _gated_dot(tl.trans(b_a), b_do, IEEE) + _gated_dot(b_k * tl.exp2(b_gs), b_dh, IEEE)
            # [BC, DK]
            b_dq = tl.sum(tl.where(o_s[:, None, None] == i_s, b_dq_all, 0.0), axis=0)
            b_dg = b_q * b_dq - b_k * b_dk
            b_dga = tl.cumsum(b_dg, axis=0, reverse=True) + b_carry[None, :]
            b_carry += tl.sum(b_dg, axis=0)
            # a clamped gate is a constant of the computation
            b_dga = tl.where(_gated_clamped(b_glog, GATE_NORMALIZER), 0.0, b_dga)
            if GATE_NORMALIZER != 0:
                # through logsigmoid(x) / normalizer: d/dx = sigmoid(-x) / normalizer
                b_dga *= _gated_log_gate_slope(b_graw, b_sp, GATE_NORMALIZER)
            tl.store(p_dg, b_dga.to(p_dg.dtype.element_ty), mask=m_n)
            b_dh = b_dh * tl.exp2(b_gt)[:, None] + _gated_dot(tl.trans(b_q * tl.exp2(b_gc)), b_do, IEEE)
            # dq, dk, dv of both directions add up; the second direction reads the first one's partial sums
            b_dq *= scale
            p_dq = _gated_ptrs(dq, i_b, i_h, stride_dq_b, stride_dq_h, stride_dq_n, o_n, o_k)
            p_dk = _gated_ptrs(dk, i_b, i_h, stride_dk_b, stride_dk_h, stride_dk_n, o_n, o_k)
            p_dv = _gated_ptrs(dv, i_b, i_h, stride_dv_b, stride_dv_h, stride_dv_n, o_n, o_v)
            if i_dir == 1:
                b_dq += tl.load(p_dq, mask=m_n, other=0.0).to(tl.float32)
                b_dk += tl.load(p_dk, mask=m_n, other=0.0).to(tl.float32)
                b_dv += tl.load(p_dv, mask=m_n, other=0.0).to(tl.float32)
            tl.store(p_dq, b_dq.to(dq.dtype.element_ty), mask=m_n)
            tl.store(p_dk, b_dk.to(dk.dtype.element_ty), mask=m_n)
            tl.store(p_dv, b_dv.to(dv.dtype.element_ty), mask=m_n)
        if NUM_DIR == 2 and i_dir == 0:
            tl.debug_barrier()


def gated_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gate_fwd: torch.Tensor,
    log_gate_bwd: torch.Tensor | None,
    scale: float,
    chunk: int,
    gate_normalizer: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients ``(dq, dk, dv, d log_gate_fwd, d log_gate_bwd or None)`` of ``gated_fwd`` for output gradient ``do``
    (the gate gradients are with respect to the gate tensors as given: logits when ``gate_normalizer`` is set).

    Two launches (three with a segmented state scan): chunk-entry states and gradient states of every direction
    (``gated_states``), then one program per (chunk, batch·head) for all gradients of its tokens.
    """
    q, k, v, do, log_gate_fwd = map(unit_last_stride, (q, k, v, do, log_gate_fwd))
    log_gate_bwd = None if log_gate_bwd is None else unit_last_stride(log_gate_bwd)
    batch, heads, length, dk_dim = q.shape
    dv_dim = v.shape[-1]
    num_dir = 1 if log_gate_bwd is None else 2
    scale = scale / num_dir
    dq, dk = empty_like_layout(q, dk_dim), empty_like_layout(k, dk_dim)
    dv = empty_like_layout(v, dv_dim)
    dg_fwd = empty_like_layout(log_gate_fwd, dk_dim)
    dg_bwd = None if log_gate_bwd is None else empty_like_layout(log_gate_bwd, dk_dim)
    if dv.numel() == 0:
        return dq, dk, dv, dg_fwd, dg_bwd
    states, decays, segment, segments = gated_states(
        q, k, v, log_gate_fwd, log_gate_bwd, do, scale, chunk, gate_normalizer
    )
    g_bwd = log_gate_fwd if log_gate_bwd is None else log_gate_bwd
    dg_bwd_arg = dg_fwd if dg_bwd is None else dg_bwd
    num_chunks = cdiv(length, chunk)
    launch(
        _gated_bwd_kernel,
        (num_chunks, batch * heads),
        q,
        k,
        v,
        log_gate_fwd,
        g_bwd,
        do,
        states,
        decays,
        dq,
        dk,
        dv,
        dg_fwd,
        dg_bwd_arg,
        *leading_strides(q, k, v, log_gate_fwd, g_bwd, do, dq, dk, dv, dg_fwd, dg_bwd_arg),
        scale,
        length,
        num_chunks,
        segment,
        segments,
        BC=GATED_SUB_BLOCK,
        **_scan_constexprs(q, v, chunk, num_dir, gate_normalizer),
    )
    return dq, dk, dv, dg_fwd, dg_bwd
