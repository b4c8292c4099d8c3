"""Chunked gated linear attention (GLA), forward output kernel and launcher; shared helpers and the state scan are
in gated.py.

``_gated_fwd_kernel_output``: one program per (chunk, batch·head) runs both directions over the chunk in sub-blocks
of ``BC`` tokens with the state in registers (entering state from ``_gated_entry_state``): ``o = (q ⊙ exp(g_cum)) S
+ A v`` and ``S <- diag(exp(g_tot)) S + (k ⊙ exp(g_tot - g_cum))ᵀ v``. The intra-block scores ``A_ij = Σ_d q_id k_jd
exp(g_cum,id - g_cum,jd)`` (``j <= i``) are two matmuls whose row and column factors are taken relative to reference
tokens inside the sub-block (``_gated_intra_factors``), so with clamped gates no factor overflows however strong the
gates are. The second direction adds its half of the output to the first one's (same program, after a barrier).
"""

import torch
import triton
import triton.language as tl

from ._config import autotune_configs, autotune_kwargs
from ._launch import launch
from .block_sparse import cdiv, empty_like_layout, leading_strides, unit_last_stride
from .gated import (
    GATED_SUB_BLOCK,
    _gated_dot,
    _gated_entry_state,
    _gated_intra_factors,
    _gated_intra_masks,
    _gated_intra_scores,
    _gated_load_gate,
    _gated_ptrs,
    _gated_rows,
    _gated_sub_block_gates,
    _gated_sub_blocks,
    _scan_constexprs,
    gated_states,
)

__all__ = ["gated_fwd"]

_OUTPUT_CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w in (2, 4, 8) for s in (1, 2)] + [
    # 4 programs per SM instead of 3 at Dk 32, Dv 64 (168 registers otherwise; 128 spills 8-16 bytes on sm_90 with
    # Triton 3.6); at Dk 16, Dv 32 the same as the plain 4-warp configs
    triton.Config({}, num_warps=4, num_stages=s, maxnreg=128)
    for s in (1, 2)
]
_OUTPUT_DEFAULT = triton.Config({}, num_warps=4, num_stages=1)


@triton.autotune(
    configs=autotune_configs(_OUTPUT_CONFIGS, _OUTPUT_DEFAULT),
    key=["DK", "DV", "BT", "NUM_DIR", "NSEG"],
    **autotune_kwargs(),
)
@triton.jit(do_not_specialize=["N", "NT", "SEG"])
def _gated_fwd_kernel_output(
    q,
    k,
    v,
    g_fwd,
    g_bwd,
    states,
    decays,
    o,
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
    stride_o_b,
    stride_o_h,
    stride_o_n,
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
    # the factor bounds of _gated_intra_factors hold for 16-token sub-blocks
    tl.static_assert(BC == 16)
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    o_i = tl.arange(0, BC)
    o_k = tl.arange(0, DK)
    o_v = tl.arange(0, DV)
    m_same, m_cross = _gated_intra_masks(o_i, BC)
    for i_dir in tl.static_range(NUM_DIR):
        # [DK, DV]
        b_s = _gated_entry_state(states, decays, i_bh * NUM_DIR + i_dir, i_c, NT, SEG, NSEG, i_dir, DK, DV)
        i_lo, i_hi = _gated_sub_blocks(i_c, N, i_dir, BT, BC)
        for i_s in range(i_lo, i_hi):
            o_n = _gated_rows(i_c, i_s, o_i, BT, BC, i_dir)
            m_n = (o_n < N)[:, None]
            # [BC, DK]
            b_q = tl.load(_gated_ptrs(q, i_b, i_h, stride_q_b, stride_q_h, stride_q_n, o_n, o_k), m_n, 0.0)
            b_q = b_q.to(tl.float32) * scale
            b_k = tl.load(_gated_ptrs(k, i_b, i_h, stride_k_b, stride_k_h, stride_k_n, o_n, o_k), m_n, 0.0)
            b_k = b_k.to(tl.float32)
            if i_dir == 0:
                p_g = _gated_ptrs(g_fwd, i_b, i_h, stride_gf_b, stride_gf_h, stride_gf_n, o_n, o_k)
            else:
                p_g = _gated_ptrs(g_bwd, i_b, i_h, stride_gb_b, stride_gb_h, stride_gb_n, o_n, o_k)
            b_gc, b_gs, b_gt = _gated_sub_block_gates(_gated_load_gate(p_g, m_n, GATE_NORMALIZER))
            # [BC, DV]
            b_v = tl.load(_gated_ptrs(v, i_b, i_h, stride_v_b, stride_v_h, stride_v_n, o_n, o_v), m_n, 0.0)
            b_v = b_v.to(tl.float32)
            # [BC, BC]
            b_rs, b_cs, b_rc, b_cc = _gated_intra_factors(b_gc, o_i, BC)
            b_a = _gated_intra_scores(b_q, b_k, b_rs, b_cs, b_rc, b_cc, m_same, m_cross, IEEE)
            b_o = _gated_dot(b_q * tl.exp2(b_gc), b_s, IEEE) + _gated_dot(b_a, b_v, IEEE)
            b_s = b_s * tl.exp2(b_gt)[:, None] + _gated_dot(tl.trans(b_k * tl.exp2(b_gs)), b_v, IEEE)
            p_o = _gated_ptrs(o, i_b, i_h, stride_o_b, stride_o_h, stride_o_n, o_n, o_v)
            if i_dir == 1:
                b_o += tl.load(p_o, mask=m_n, other=0.0).to(tl.float32)
            tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_n)
        if NUM_DIR == 2 and i_dir == 0:
            # the backward scan reads the forward scan's half of o written by other threads of this program
            tl.debug_barrier()


def gated_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gate_fwd: torch.Tensor,
    log_gate_bwd: torch.Tensor | None,
    scale: float,
    chunk: int,
    gate_normalizer: float,
) -> torch.Tensor:
    """GLA output ``(B, H, N, Dv)`` (causal if ``log_gate_bwd`` is None, else the mean of both scans).

    ``chunk``: tokens per chunk, a power of two >= 16 (one stored state per chunk and scan). ``gate_normalizer``: 0
    if the gate tensors are log gates, else they are logits ``x`` and the log gates ``logsigmoid(x) /
    gate_normalizer`` (computed in-kernel, ``_gated_log_gate``).

    Two launches (three with a segmented state scan): the chunk-entry states (``gated_states``), then one program
    per (chunk, batch·head) for the output.
    """
    q, k, v, log_gate_fwd = map(unit_last_stride, (q, k, v, log_gate_fwd))
    log_gate_bwd = None if log_gate_bwd is None else unit_last_stride(log_gate_bwd)
    batch, heads, length, dk = q.shape
    dv = v.shape[-1]
    num_dir = 1 if log_gate_bwd is None else 2
    out = empty_like_layout(v, dv)
    if out.numel() == 0:
        return out
    states, decays, segment, segments = gated_states(
        q, k, v, log_gate_fwd, log_gate_bwd, None, scale, chunk, gate_normalizer
    )
    g_bwd = log_gate_fwd if log_gate_bwd is None else log_gate_bwd
    num_chunks = cdiv(length, chunk)
    launch(
        _gated_fwd_kernel_output,
        (num_chunks, batch * heads),
        q,
        k,
        v,
        log_gate_fwd,
        g_bwd,
        states,
        decays,
        out,
        *leading_strides(q, k, v, log_gate_fwd, g_bwd, out),
        scale / num_dir,
        length,
        num_chunks,
        segment,
        segments,
        BC=GATED_SUB_BLOCK,
        **_scan_constexprs(q, v, chunk, num_dir, gate_normalizer),
    )
    return out
