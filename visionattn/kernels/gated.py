"""Chunked gated linear attention (GLA), causal or bidirectional (ViG): forward kernels and launcher.

Per head and direction, with state S (Dk x Dv) and log gates g (Dk per token), token order = the direction's scan
order: ``S_t = diag(exp(g_t)) S_{t-1} + k_tᵀ v_t``, ``o_t = q_t S_t``. The backward direction is the same scan
over the tokens in reverse, so every kernel handles it by reading the rows of a chunk in reverse order.

Chunked algorithm (both directions in each launch):

1. ``_gated_kernel_state``: one program per (Dv block, batch·head, pass) walks the chunks of ``BT`` tokens in
   scan order and stores the state entering each chunk (fp32, ``[B·H, passes, NT, Dk, Dv]``). A pass is a
   direction, and in backward also the gradient scan of a direction (the adjoint recurrence, run against scan
   order with q and dO in place of k and v).
2. ``_gated_fwd_kernel_output``: one program per (chunk, batch·head) runs both directions over the chunk in
   sub-blocks of ``BC`` tokens with the state in registers: ``o = (q ⊙ exp(g_cum)) S + A v`` and
   ``S <- diag(exp(g_tot)) S + (k ⊙ exp(g_tot - g_cum))ᵀ v``. The intra-block scores ``A_ij = Σ_d q_id k_jd
   exp(g_cum,id - g_cum,jd)`` (``j <= i``) are two matmuls whose row and column factors are taken relative to
   reference tokens inside the sub-block (``_gated_intra_factors``), so with clamped gates no factor overflows
   however strong the gates are. The second direction adds its half of the output to the first one's (same
   program, after a barrier).

Inside the kernels gates are kept in base 2 (``log2(e)`` times the log gate, scaled where a gate tile is loaded), so
every ``exp`` above is one ``exp2`` with no multiply. With ``GATE_NORMALIZER = c`` the gate tensors hold ViG's gate
logits ``x`` and the log gates ``logsigmoid(x) / c`` are computed on load (``_gated_logit_gate``: one ``exp2`` and one
``lg2.approx`` per element, constants for ``1 / c``).

Layout: q, k ``(B, H, N, Dk)``, v ``(B, H, N, Dv)``, gates ``(B, H, N, Dk)``, any strides with a unit last stride.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._config import autotune_configs, autotune_kwargs, is_interpreter
from ._constants import LOG2E
from .block_sparse import cdiv, empty_like_layout, leading_strides, unit_last_stride

__all__ = ["GATED_SUB_BLOCK", "gated_fwd", "gated_states"]

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
]
_STATE_DEFAULT = triton.Config({"BV": 16}, num_warps=4, num_stages=1)
_OUTPUT_CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w in (2, 4, 8) for s in (1, 2)]
_OUTPUT_DEFAULT = triton.Config({}, num_warps=4, num_stages=1)


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


# ---------------------------------------------------------------------------------------------------- state scan
@triton.autotune(
    configs=autotune_configs(_STATE_CONFIGS, _STATE_DEFAULT),
    key=["DK", "DV", "BT", "NUM_DIR", "NUM_PASS"],
    prune_configs_by={"early_config_prune": _prune_state_configs},
    **autotune_kwargs(),
)
@triton.jit(do_not_specialize=["N", "NT"])
def _gated_kernel_state(
    k,
    v,
    q,
    do,
    g_fwd,
    g_bwd,
    states,
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
    i_v, i_bh, i_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
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
    p_state = states + ((i_bh * NUM_PASS + i_p) * NT).to(tl.int64) * (DK * DV) + o_k[:, None] * DV + o_v[None, :]
    # [DK, BV]
    b_h = tl.zeros([DK, BV], dtype=tl.float32)
    for i in range(NT):
        i_c = i + reverse * (NT - 1 - 2 * i)
        tl.store(p_state + i_c * (DK * DV), b_h, mask=m_v[None, :])
        o_n = _gated_rows(i_c, 0, o_t, BT, BT, reverse)
        m_n = (o_n < N)[:, None]
        # [BT, DK]
        b_x = tl.load(_gated_tile(x, stride_x_n, o_n, o_k), m_n, 0.0).to(tl.float32) * x_scale
        b_g = _gated_load_gate(_gated_tile(g, stride_g_n, o_n, o_k), m_n, GATE_NORMALIZER)
        # [BT, BV]
        b_y = tl.load(_gated_tile(y, stride_y_n, o_n, o_v), m_n & m_v[None, :], 0.0).to(tl.float32)
        # decay from each token to the chunk end: exclusive suffix for the state, inclusive for the gradient state
        b_w = tl.cumsum(b_g, axis=0, reverse=True) - tl.where(is_grad, 0.0, b_g)
        b_h = b_h * tl.exp2(tl.sum(b_g, axis=0))[:, None] + _gated_dot(tl.trans(b_x * tl.exp2(b_w)), b_y, IEEE)


# ------------------------------------------------------------------------------------------------ forward output
@triton.autotune(
    configs=autotune_configs(_OUTPUT_CONFIGS, _OUTPUT_DEFAULT),
    key=["DK", "DV", "BT", "NUM_DIR"],
    **autotune_kwargs(),
)
@triton.jit(do_not_specialize=["N", "NT"])
def _gated_fwd_kernel_output(
    q,
    k,
    v,
    g_fwd,
    g_bwd,
    states,
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
        p_state = states + ((i_bh * NUM_DIR + i_dir) * NT + i_c).to(tl.int64) * (DK * DV)
        # [DK, DV]
        b_s = tl.load(p_state + o_k[:, None] * DV + o_v[None, :])
        for i_s in range(BT // BC):
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


# ------------------------------------------------------------------------------------------------------ launchers
def _exact_dots(dtype: torch.dtype) -> bool:
    """float32 inputs get exact ("ieee") matmuls unless torch allows TF32 (``torch.set_float32_matmul_precision``)."""
    return dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"


def _one_dtype(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``b`` in one dtype: the state kernel reads one of them per pass through one selected pointer. Mixed
    dtypes (rare: the kernels read any float dtype) are promoted, an exact copy."""
    if a.dtype == b.dtype:
        return a, b
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def gated_states(
    q, k, v, log_gate_fwd, log_gate_bwd, do, scale: float, chunk: int, gate_normalizer: float
) -> torch.Tensor:
    """Chunk-entry states ``[B·H, passes, NT, Dk, Dv]`` (fp32) of every direction, plus the gradient scans if ``do``.

    Grid ``(Dv blocks, B·H, passes)``; passes are the directions, then (with ``do``) their gradient scans.
    """
    batch, heads, length, dk = k.shape
    dv = v.shape[-1]
    num_dir = 1 if log_gate_bwd is None else 2
    num_pass = num_dir * (1 if do is None else 2)
    num_chunks = cdiv(length, chunk)
    states = torch.empty(batch * heads, num_pass, num_chunks, dk, dv, device=k.device, dtype=torch.float32)
    g_fwd, g_bwd = _one_dtype(log_gate_fwd, log_gate_fwd if log_gate_bwd is None else log_gate_bwd)
    if do is None:
        q, do = k, v
    else:
        (k, q), (v, do) = _one_dtype(k, q), _one_dtype(v, do)

    def grid(meta):
        return cdiv(dv, meta["BV"]), batch * heads, num_pass

    _gated_kernel_state[grid](
        k,
        v,
        q,
        do,
        g_fwd,
        g_bwd,
        states,
        *leading_strides(k),
        *leading_strides(v),
        *leading_strides(q),
        *leading_strides(do),
        *leading_strides(g_fwd),
        *leading_strides(g_bwd),
        scale,
        length,
        num_chunks,
        H=heads,
        DK=dk,
        DV=dv,
        BT=chunk,
        NUM_DIR=num_dir,
        NUM_PASS=num_pass,
        GATE_NORMALIZER=gate_normalizer,
        IEEE=_exact_dots(q.dtype),
    )
    return states


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

    Two launches: the chunk-entry states, then one program per (chunk, batch·head) for the output.
    """
    q, k, v, log_gate_fwd = map(unit_last_stride, (q, k, v, log_gate_fwd))
    log_gate_bwd = None if log_gate_bwd is None else unit_last_stride(log_gate_bwd)
    batch, heads, length, dk = q.shape
    dv = v.shape[-1]
    num_dir = 1 if log_gate_bwd is None else 2
    out = empty_like_layout(v, dv)
    if out.numel() == 0:
        return out
    states = gated_states(q, k, v, log_gate_fwd, log_gate_bwd, None, scale, chunk, gate_normalizer)
    g_bwd = log_gate_fwd if log_gate_bwd is None else log_gate_bwd
    num_chunks = cdiv(length, chunk)
    _gated_fwd_kernel_output[(num_chunks, batch * heads)](
        q,
        k,
        v,
        log_gate_fwd,
        g_bwd,
        states,
        out,
        *leading_strides(q),
        *leading_strides(k),
        *leading_strides(v),
        *leading_strides(log_gate_fwd),
        *leading_strides(g_bwd),
        *leading_strides(out),
        scale / num_dir,
        length,
        num_chunks,
        H=heads,
        DK=dk,
        DV=dv,
        BT=chunk,
        BC=GATED_SUB_BLOCK,
        NUM_DIR=num_dir,
        GATE_NORMALIZER=gate_normalizer,
        IEEE=_exact_dots(q.dtype),
    )
    return out
