"""Chunked gated linear attention (GLA), causal or bidirectional (ViG): shared kernel helpers and the state scan.

Per head and direction, with state S (Dk x Dv) and log gates g (Dk per token), token order = the direction's scan
order: ``S_t = diag(exp(g_t)) S_{t-1} + k_tᵀ v_t``, ``o_t = q_t S_t``. The backward direction is the same scan
over the tokens in reverse, so every kernel handles it by reading the rows of a chunk in reverse order.

Chunked algorithm (both directions in each launch): the chunk-entry states of every scan (``gated_states``, here),
then one program per (chunk, batch·head) for the output (``gated_fwd.py``) or all gradients (``gated_bwd.py``).

``_gated_kernel_state``: one program per (segment, Dv block; batch·head; pass) walks the chunks of ``BT`` tokens of
its segment in scan order from a zero state and stores the state entering each chunk (fp32). A pass is a direction,
and in backward also the gradient scan of a direction (the adjoint recurrence, run against scan order with q and dO
in place of k and v). A scan is one segment unless it has too few programs to fill the GPU (``scan_segments``):
then each segment also stores its end state and its total log2 decay, ``_gated_kernel_carry`` turns those into the
exact state entering each segment (one step per segment), and the chunk kernels add that carry, decayed by the
stored log2 decay from the segment start, to the chunk's stored state (``_gated_entry_state``). The decays are sums
of the clamped gates, so this is the sequential scan regrouped: exact up to fp32 rounding, finite for any gates.

Inside the kernels gates are kept in base 2 (``log2(e)`` times the log gate, scaled where a gate tile is loaded), so
every ``exp`` is one ``exp2`` with no multiply. With ``GATE_NORMALIZER = c`` the gate tensors hold ViG's gate
logits ``x`` and the log gates ``logsigmoid(x) / c`` are computed on load (``_gated_logit_gate``: one ``exp2`` and one
``lg2.approx`` per element, constants for ``1 / c``).

Layout: q, k ``(B, H, N, Dk)``, v ``(B, H, N, Dv)``, gates ``(B, H, N, Dk)``, any strides with a unit last stride.
"""

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._config import autotune_configs, autotune_kwargs, is_interpreter
from ._constants import LOG2E
from ._launch import launch
from .block_sparse import cdiv, leading_strides

__all__ = ["GATED_SUB_BLOCK", "gated_states", "scan_segments"]

#: Tokens per sub-block inside a chunk (the factor bounds of ``_gated_intra_factors`` are derived for 16).
GATED_SUB_BLOCK = 16
#: Log gates are clamped here on load. exp(-16) ~ 1.1e-7 is at the level of float32 rounding, so results move by
#: ~1e-7 relative at most, while every exponent inside a sub-block stays within 4 gates of its reference: factors
#: lie in [exp(-64), exp(64)], far from float32 overflow, and gates of -1e4 or -inf stay finite.
_LOG_GATE_MIN = -16.0
_LOG2E = tl.constexpr(LOG2E)
#: The kernels keep gates in base 2 (``log2 gate = log gate · log2(e)``), so that each exponential is one ``exp2``
#: with no multiply; this is the clamp in those units.
_LOG2_GATE_MIN = tl.constexpr(_LOG_GATE_MIN * LOG2E)
#: ``log2`` of gate logits through the hardware approximation (``lg2.approx``, absolute error ~2^-22 on the
#: ``[1, 2]`` it gets here) rather than ``tl.log2``'s libdevice polynomial; the interpreter has no libdevice.
_FAST_LOG2 = tl.constexpr(not is_interpreter())

# the state scan streams chunks through one program, so pipelined loads (2-3 stages) are what it tunes
_STATE_CONFIGS = [
    triton.Config({"BV": bv}, num_warps=w, num_stages=s) for bv in (16, 32, 64) for w in (2, 4) for s in (2, 3)
] + [
    # whole-Dv blocks at 3 programs per SM: ptxas takes 221 registers for the segmented scan at Dk 32, Dv 64 (2 per
    # SM) and fits 168 without spills (sm_90, Triton 3.6; the unsegmented scan uses 168 anyway)
    triton.Config({"BV": 64}, num_warps=4, num_stages=s, maxnreg=168)
    for s in (2, 3)
]
_STATE_DEFAULT = triton.Config({"BV": 16}, num_warps=4, num_stages=1)
#: The carry pass is one load and FMA per segment (a dozen at most at the shapes it runs for): a fixed config, no
#: tuning (sm_90: 57 registers, 136 instructions at Dk 32, Dv 64).
_CARRY_CONFIG = {"num_warps": 4, "num_stages": 1}
#: Segmented state scans aim at this many programs per SM (before Dv blocks): a few per SM keep the scan's
#: per-chunk latency overlapped while the carry chain (one step per segment) stays short.
_SCAN_PROGRAMS_PER_SM = 4


def _prune_state_configs(configs, nargs, **kwargs):
    """A Dv block wider than Dv only masks lanes off."""
    dv = {**nargs, **kwargs}["DV"]
    return [c for c in configs if c.kwargs["BV"] <= dv] or configs[:1]


# ------------------------------------------------------------------------------------------------------- helpers
@triton.jit
def _gated_head(base, i_b, i_h, stride_b, stride_h):
    """Pointer to the start of one (batch, head) of a tensor."""
    return base + i_b * stride_b + i_h * stride_h


@triton.jit
def _gated_tile(head, stride_n, o_n, o_d):
    """Pointers to the tile rows ``o_n``, columns ``o_d`` of one (batch, head) ``head`` with a unit last stride."""
    return head + o_n[:, None] * stride_n + o_d[None, :]


@triton.jit
def _gated_ptrs(base, i_b, i_h, stride_b, stride_h, stride_n, o_n, o_d):
    """Pointers to the tile rows ``o_n``, columns ``o_d`` of one (batch, head) of a unit-last-stride tensor."""
    return _gated_tile(_gated_head(base, i_b, i_h, stride_b, stride_h), stride_n, o_n, o_d)


@triton.jit
def _gated_rows(i_c, i_s, o_i, BT: tl.constexpr, BC: tl.constexpr, reverse):
    """Token positions of sub-block ``i_s`` of chunk ``i_c`` in scan order (``reverse`` = 1 for the backward scan)."""
    local = i_s * BC + o_i
    return i_c * BT + local + reverse * (BT - 1 - 2 * local)


@triton.jit
def _gated_sub_blocks(i_c, N, reverse, BT: tl.constexpr, BC: tl.constexpr):
    """Scan-order range ``[lo, hi)`` of the sub-blocks of chunk ``i_c`` that hold a token ``< N``. The others (in
    the last chunk only) are all masked: zero keys and values and no decay, so skipping them changes nothing."""
    NS: tl.constexpr = BT // BC
    count = tl.minimum((N - i_c * BT + BC - 1) // BC, NS)
    lo = reverse * (NS - count)
    return lo, lo + count


@triton.jit
def _gated_dot(a, b, IEEE: tl.constexpr):
    """fp32 operands, exact ("ieee") or TF32 (fp16/bf16 inputs are exact in TF32; computed operands round to 10 bits)."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="tf32")


@triton.jit
def _gated_clamp_gate(b_g, GATE_NORMALIZER: tl.constexpr):
    """Base-2 log gates clamped to ``[-16, 0] · log2(e)``: below, ``exp(-16)`` is float32 rounding; above, a gate
    would not decay (invalid input, see ``ops.gated_linear_attention``): it acts as 0. Gates from logits are
    ``<= 0`` by construction (up to ``lg2.approx``'s ~1e-8), so they are only clamped from below."""
    b_g = tl.maximum(b_g, _LOG2_GATE_MIN)
    if GATE_NORMALIZER == 0:
        b_g = tl.minimum(b_g, 0.0)
    return b_g


@triton.jit
def _gated_clamped(b_g, GATE_NORMALIZER: tl.constexpr):
    """Where ``_gated_clamp_gate`` changes the base-2 log gates ``b_g``: there they are constants (gradient 0)."""
    if GATE_NORMALIZER == 0:
        m_c = (b_g < _LOG2_GATE_MIN) | (b_g > 0.0)
    else:
        m_c = b_g < _LOG2_GATE_MIN
    return m_c


@triton.jit
def _gated_softplus2(b_raw):
    """``log2(1 + exp(-|x|))`` of gate logits ``x`` (fp32): one ``exp2`` and one ``log2`` (``_FAST_LOG2``)."""
    b_arg = 1.0 + tl.exp2(tl.abs(b_raw) * -_LOG2E)
    if _FAST_LOG2:
        b_log = libdevice.fast_log2f(b_arg)
    else:
        b_log = tl.log2(b_arg)
    return b_log


@triton.jit
def _gated_logit_gate(b_raw, b_sp, mask, GATE_NORMALIZER: tl.constexpr):
    """ViG's log gates ``logsigmoid(x) / c`` (``c = GATE_NORMALIZER``) of gate logits ``x`` (fp32) in base 2, from
    ``b_sp = _gated_softplus2(x)``: ``log2(e) · logsigmoid(x) / c = min(x, 0) · log2(e) / c - b_sp / c`` (two
    constants); 0 outside ``mask``, so masked rows never decay."""
    LOG2E_C: tl.constexpr = _LOG2E / GATE_NORMALIZER
    INV_C: tl.constexpr = 1.0 / GATE_NORMALIZER
    return tl.where(mask, tl.minimum(b_raw, 0.0) * LOG2E_C - b_sp * INV_C, 0.0)


@triton.jit
def _gated_log_gate_slope(b_raw, b_sp, GATE_NORMALIZER: tl.constexpr):
    """``d/dx logsigmoid(x) / c = sigmoid(-x) / c = exp(logsigmoid(-x)) / c`` of gate logits ``x``, with
    ``log2(e) · logsigmoid(-x) = -max(x, 0) · log2(e) - b_sp`` (``b_sp = _gated_softplus2(x)``, shared with the
    forward): one ``exp2``, no division, never overflows (0 for ``x -> inf``, ``1 / c`` for ``x -> -inf``)."""
    INV_C: tl.constexpr = 1.0 / GATE_NORMALIZER
    return tl.exp2(tl.maximum(b_raw, 0.0) * -_LOG2E - b_sp) * INV_C


@triton.jit
def _gated_log_gate(b_raw, mask, GATE_NORMALIZER: tl.constexpr):
    """Base-2 log gates from the loaded gate tile ``b_raw`` (fp32): ``log2(e) · b_raw`` for ``GATE_NORMALIZER = 0``
    (log gates; masked rows load 0), else ``_gated_logit_gate`` (computed in fp32 here, so that callers need not
    materialise fp32 log gates)."""
    if GATE_NORMALIZER == 0:
        b_g = b_raw * _LOG2E
    else:
        b_g = _gated_logit_gate(b_raw, _gated_softplus2(b_raw), mask, GATE_NORMALIZER)
    return b_g


@triton.jit
def _gated_load_gate(p_g, mask, GATE_NORMALIZER: tl.constexpr):
    """Clamped base-2 log gates ``[rows, Dk]`` (fp32) of the gate tile at ``p_g`` (``_gated_log_gate``)."""
    b_raw = tl.load(p_g, mask=mask, other=0.0).to(tl.float32)
    return _gated_clamp_gate(_gated_log_gate(b_raw, mask, GATE_NORMALIZER), GATE_NORMALIZER)


@triton.jit
def _gated_sub_block_gates(b_g):
    """Inclusive prefix sums, exclusive suffix sums and the total of the gates ``[BC, Dk]`` along scan order."""
    b_gc = tl.cumsum(b_g, axis=0)
    b_gs = tl.cumsum(b_g, axis=0, reverse=True) - b_g
    return b_gc, b_gs, tl.sum(b_g, axis=0)


@triton.jit
def _gated_intra_masks(o_i, BC: tl.constexpr):
    """Token pairs ``j <= i`` of a sub-block: those within one half, and those across the halves (``j < BC/2 <= i``)."""
    HALF: tl.constexpr = BC // 2
    row, col = o_i[:, None], o_i[None, :]
    return (row >= col) & (row // HALF == col // HALF), (row >= HALF) & (col < HALF)


@triton.jit
def _gated_intra_factors(b_gc, o_i, BC: tl.constexpr):
    """Row and column factors with ``exp(g_cum,i - g_cum,j) = f_row,i · f_col,j`` for the pairs of each mask.

    Pairs within a half use the half's middle token as reference, pairs across the halves the last token of the first
    half, so ``A = (q ⊙ f_row)(k ⊙ f_col)ᵀ`` is a matmul with no exponent beyond 4 clamped gates (``|.| <= 64``, i.e. ``<= 92.3`` in base 2).
    Factors of rows or columns a mask does not use are clamped to <= 1 rather than overflowing.
    """
    HALF: tl.constexpr = BC // 2
    row = o_i[:, None]
    g_lo = tl.sum(tl.where(row == HALF // 2 - 1, b_gc, 0.0), axis=0)
    g_mid = tl.sum(tl.where(row == HALF - 1, b_gc, 0.0), axis=0)
    g_hi = tl.sum(tl.where(row == HALF + HALF // 2 - 1, b_gc, 0.0), axis=0)
    b_ref = tl.where(row < HALF, g_lo[None, :], g_hi[None, :])
    b_row_same, b_col_same = tl.exp2(b_gc - b_ref), tl.exp2(b_ref - b_gc)
    b_row_cross = tl.exp2(tl.minimum(b_gc - g_mid[None, :], 0.0))
    b_col_cross = tl.exp2(tl.minimum(g_mid[None, :] - b_gc, 0.0))
    return b_row_same, b_col_same, b_row_cross, b_col_cross


@triton.jit
def _gated_intra_scores(b_q, b_k, b_row_same, b_col_same, b_row_cross, b_col_cross, m_same, m_cross, IEEE):
    """``A_ij = Σ_d q_id k_jd exp(g_cum,id - g_cum,jd)`` for ``j <= i``, else 0: ``[BC, BC]``."""
    b_same = _gated_dot(b_q * b_row_same, tl.trans(b_k * b_col_same), IEEE)
    b_cross = _gated_dot(b_q * b_row_cross, tl.trans(b_k * b_col_cross), IEEE)
    return tl.where(m_same, b_same, tl.where(m_cross, b_cross, 0.0))


@triton.jit
def _gated_intra_apply(b_p_same, b_p_cross, b_x, b_out_same, b_in_same, b_out_cross, b_in_cross, IEEE):
    """``Σ_j P_ij exp(±(g_cum,i - g_cum,j)) x_j`` from the masked pair weights ``P`` of each factorisation."""
    b_y = b_out_same * _gated_dot(b_p_same, b_x * b_in_same, IEEE)
    return b_y + b_out_cross * _gated_dot(b_p_cross, b_x * b_in_cross, IEEE)


@triton.jit
def _gated_slots(NT, NSEG):
    """State slots per scan: one per chunk, plus one per segment (its carry) when the scan is segmented."""
    if NSEG > 1:
        slots = NT + NSEG
    else:
        slots = NT
    return slots


@triton.jit
def _gated_entry_state(states, decays, i_scan, i_c, NT, SEG, NSEG, reverse, DK: tl.constexpr, DV: tl.constexpr):
    """The state ``[DK, DV]`` (fp32) entering chunk ``i_c`` of scan ``i_scan`` (row of ``gated_states``): the stored
    one, plus for a segmented scan the segment's carry decayed to the chunk, ``S + diag(exp2(d)) C``."""
    o_k = tl.arange(0, DK)
    o_state = o_k[:, None] * DV + tl.arange(0, DV)[None, :]
    row = (i_scan * _gated_slots(NT, NSEG)).to(tl.int64)
    b_s = tl.load(states + (row + i_c) * (DK * DV) + o_state)
    if NSEG > 1:
        i_seg = (i_c + reverse * (NT - 1 - 2 * i_c)) // SEG
        b_c = tl.load(states + (row + NT + i_seg) * (DK * DV) + o_state)
        b_s += tl.exp2(tl.load(decays + (row + i_c) * DK + o_k))[:, None] * b_c
    return b_s


# ---------------------------------------------------------------------------------------------------- state scan
@triton.autotune(
    configs=autotune_configs(_STATE_CONFIGS, _STATE_DEFAULT),
    key=["DK", "DV", "BT", "NUM_DIR", "NUM_PASS", "NSEG"],
    prune_configs_by={"early_config_prune": _prune_state_configs},
    **autotune_kwargs(),
)
@triton.jit(do_not_specialize=["N", "NT", "SEG"])
def _gated_kernel_state(
    k,
    v,
    q,
    do,
    g_fwd,
    g_bwd,
    states,
    decays,
    stride_k_b,
    stride_k_h,
    stride_k_n,
    stride_v_b,
    stride_v_h,
    stride_v_n,
    stride_q_b,
    stride_q_h,
    stride_q_n,
    stride_do_b,
    stride_do_h,
    stride_do_n,
    stride_gf_b,
    stride_gf_h,
    stride_gf_n,
    stride_gb_b,
    stride_gb_h,
    stride_gb_n,
    scale,
    N,
    NT,
    SEG,
    NSEG,
    H,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BT: tl.constexpr,
    BV: tl.constexpr,
    NUM_DIR: tl.constexpr,
    NUM_PASS: tl.constexpr,
    GATE_NORMALIZER: tl.constexpr,
    IEEE: tl.constexpr,
):
    NV: tl.constexpr = (DV + BV - 1) // BV
    i_sv, i_bh, i_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_seg, i_v = i_sv // NV, i_sv % NV
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    i_dir = i_p % NUM_DIR
    is_grad = i_p >= NUM_DIR
    # the gradient scan of a direction runs against that direction's order: scan backwards in time iff one holds
    reverse = (i_dir + i_p // NUM_DIR) % 2
    # the pass's inputs, selected once as scalars (one load and one gate transform per tile, not two masked ones):
    # keys and values for the state, scaled queries and output gradients for the gradient state
    x_q, x_k = _gated_head(q, i_b, i_h, stride_q_b, stride_q_h), _gated_head(k, i_b, i_h, stride_k_b, stride_k_h)
    y_do, y_v = _gated_head(do, i_b, i_h, stride_do_b, stride_do_h), _gated_head(v, i_b, i_h, stride_v_b, stride_v_h)
    g_f, g_b = (
        _gated_head(g_fwd, i_b, i_h, stride_gf_b, stride_gf_h),
        _gated_head(g_bwd, i_b, i_h, stride_gb_b, stride_gb_h),
    )
    x, y, g = tl.where(is_grad, x_q, x_k), tl.where(is_grad, y_do, y_v), tl.where(i_dir == 0, g_f, g_b)
    stride_x_n = tl.where(is_grad, stride_q_n, stride_k_n)
    stride_y_n = tl.where(is_grad, stride_do_n, stride_v_n)
    stride_g_n = tl.where(i_dir == 0, stride_gf_n, stride_gb_n)
    x_scale = tl.where(is_grad, scale, 1.0)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, DK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    row = ((i_bh * NUM_PASS + i_p) * _gated_slots(NT, NSEG)).to(tl.int64)
    p_state = states + row * (DK * DV) + o_k[:, None] * DV + o_v[None, :]
    # the segment's log2 decay so far (one Dv block stores it)
    p_decay, m_decay = decays + row * DK + o_k, o_k < tl.where(i_v == 0, DK, 0)
    # [DK, BV], [DK]
    b_h = tl.zeros([DK, BV], dtype=tl.float32)
    b_d = tl.zeros([DK], dtype=tl.float32)
    for i in range(i_seg * SEG, tl.minimum(i_seg * SEG + SEG, NT)):
        i_c = i + reverse * (NT - 1 - 2 * i)
        tl.store(p_state + i_c * (DK * DV), b_h, mask=m_v[None, :])
        if NSEG > 1:
            tl.store(p_decay + i_c * DK, b_d, mask=m_decay)
        o_n = _gated_rows(i_c, 0, o_t, BT, BT, reverse)
        m_n = (o_n < N)[:, None]
        # [BT, DK]
        b_x = tl.load(_gated_tile(x, stride_x_n, o_n, o_k), m_n, 0.0).to(tl.float32) * x_scale
        b_g = _gated_load_gate(_gated_tile(g, stride_g_n, o_n, o_k), m_n, GATE_NORMALIZER)
        # [BT, BV]
        b_y = tl.load(_gated_tile(y, stride_y_n, o_n, o_v), m_n & m_v[None, :], 0.0).to(tl.float32)
        # decay from each token to the chunk end: exclusive suffix for the state, inclusive for the gradient state
        b_w = tl.cumsum(b_g, axis=0, reverse=True) - tl.where(is_grad, 0.0, b_g)
        b_gt = tl.sum(b_g, axis=0)
        b_h = b_h * tl.exp2(b_gt)[:, None] + _gated_dot(tl.trans(b_x * tl.exp2(b_w)), b_y, IEEE)
        b_d += b_gt
    if NSEG > 1:
        # the segment's end state and total decay, for _gated_kernel_carry
        tl.store(p_state + (NT + i_seg) * (DK * DV), b_h, mask=m_v[None, :])
        tl.store(p_decay + (NT + i_seg) * DK, b_d, mask=m_decay)


@triton.jit(do_not_specialize=["NT"])
def _gated_kernel_carry(states, decays, NT, NSEG, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr):
    """Second level of a segmented scan, in place: the end state ``e_s`` and total log2 decay ``d_s`` of each
    segment (slots ``NT + s``) become the exact state entering each segment, ``c_0 = 0``,
    ``c_{s+1} = e_s + diag(exp2(d_s)) c_s``. One program per (Dv block, scan)."""
    i_v, i_scan = tl.program_id(0), tl.program_id(1)
    o_k, o_v = tl.arange(0, DK), i_v * BV + tl.arange(0, BV)
    m_v = (o_v < DV)[None, :]
    row = (i_scan * (NT + NSEG) + NT).to(tl.int64)
    p_state = states + row * (DK * DV) + o_k[:, None] * DV + o_v[None, :]
    p_decay = decays + row * DK + o_k
    # [DK, BV]
    b_c = tl.zeros([DK, BV], dtype=tl.float32)
    for i_seg in range(NSEG):
        b_e = tl.load(p_state + i_seg * (DK * DV), mask=m_v, other=0.0)
        b_d = tl.load(p_decay + i_seg * DK)
        tl.store(p_state + i_seg * (DK * DV), b_c, mask=m_v)
        b_c = b_e + tl.exp2(b_d)[:, None] * b_c


# ------------------------------------------------------------------------------------------------------ launchers
def _exact_dots(dtype: torch.dtype) -> bool:
    """float32 inputs get exact ("ieee") matmuls unless torch allows TF32 (``torch.set_float32_matmul_precision``)."""
    return dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"


def _scan_constexprs(q, v, chunk: int, num_dir: int, gate_normalizer: float) -> dict:
    """Compile-time arguments every gated kernel takes: heads, head dims, chunk, directions, gate form, dot
    precision (``q`` ``(B, H, N, Dk)``, ``v`` ``(B, H, N, Dv)``)."""
    return {
        "H": q.shape[1],
        "DK": q.shape[-1],
        "DV": v.shape[-1],
        "BT": chunk,
        "NUM_DIR": num_dir,
        "GATE_NORMALIZER": gate_normalizer,
        "IEEE": _exact_dots(q.dtype),
    }


def _one_dtype(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``b`` in one dtype: the state kernel reads one of them per pass through one selected pointer. Mixed
    dtypes (rare: the kernels read any float dtype) are promoted, an exact copy."""
    if a.dtype == b.dtype:
        return a, b
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter runs one program at a time)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def scan_segments(num_chunks: int, scans: int, device: torch.device) -> tuple[int, int]:
    """``(chunks per segment, segments)`` of a state scan with ``scans`` independent scans of ``num_chunks`` chunks.

    Each scan is a chain of ``num_chunks`` dependent steps, so with fewer scans than the GPU holds programs it is
    latency-bound (ViG-T at 1024 px: 24 heads x 2 directions walking 64 chunks on 132 SMs). It is then split into
    segments scanned in parallel from a zero state, enough for ``_SCAN_PROGRAMS_PER_SM`` programs per SM (before
    the Dv blocks), and ``_gated_kernel_carry`` passes the states across segments; with enough scans (ViG-S,
    ViG-H), one segment.
    """
    wanted = -(-_SCAN_PROGRAMS_PER_SM * _sm_count(device) // scans)
    segment = cdiv(num_chunks, max(1, min(num_chunks, wanted)))
    return segment, cdiv(num_chunks, segment)


def gated_states(
    q, k, v, log_gate_fwd, log_gate_bwd, do, scale: float, chunk: int, gate_normalizer: float
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Chunk-entry states of every direction, plus the gradient scans if ``do``: ``(states, decays, segment,
    segments)`` for ``_gated_entry_state``.

    ``states [B·H, passes, slots, Dk, Dv]`` (fp32) holds, per scan and chunk, the state entering the chunk from the
    start of its segment of ``segment`` chunks (``scan_segments``); with ``segments > 1``, slots ``NT + s`` hold the
    state entering segment ``s`` and ``decays [B·H, passes, slots, Dk]`` the log2 decay from each chunk's segment
    start to the chunk. Passes are the directions, then (with ``do``) their gradient scans.
    """
    batch, heads, length, dk = k.shape
    dv = v.shape[-1]
    num_dir = 1 if log_gate_bwd is None else 2
    num_pass = num_dir * (1 if do is None else 2)
    num_chunks = cdiv(length, chunk)
    segment, segments = scan_segments(num_chunks, batch * heads * num_pass, k.device)
    slots = num_chunks + (segments if segments > 1 else 0)
    states = torch.empty(batch * heads, num_pass, slots, dk, dv, device=k.device, dtype=torch.float32)
    # the decays exist for segmented scans only (the kernels never touch them otherwise)
    decays = (
        torch.empty(batch * heads, num_pass, slots, dk, device=k.device, dtype=torch.float32)
        if segments > 1
        else states
    )
    g_fwd, g_bwd = _one_dtype(log_gate_fwd, log_gate_fwd if log_gate_bwd is None else log_gate_bwd)
    if do is None:
        q, do = k, v
    else:
        (k, q), (v, do) = _one_dtype(k, q), _one_dtype(v, do)

    def grid(meta):
        return cdiv(dv, meta["BV"]) * segments, batch * heads, num_pass

    launch(
        _gated_kernel_state,
        grid,
        k,
        v,
        q,
        do,
        g_fwd,
        g_bwd,
        states,
        decays,
        *leading_strides(k, v, q, do, g_fwd, g_bwd),
        scale,
        length,
        num_chunks,
        segment,
        segments,
        NUM_PASS=num_pass,
        **_scan_constexprs(k, v, chunk, num_dir, gate_normalizer),
    )
    if segments > 1:
        _gated_kernel_carry[(1, batch * heads * num_pass)](
            states, decays, num_chunks, segments, DK=dk, DV=dv, BV=dv, **_CARRY_CONFIG
        )
    return states, decays, segment, segments
