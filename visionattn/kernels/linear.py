"""Non-causal linear attention, forward: a split-N key/value reduction, a fixed-order merge, a per-query apply.

Layout: q ``(B, H, Nq, D)``, k ``(B, H, Nk, D)``, v ``(B, H, Nk, Dv)``, optional ``q_norm``/``k_norm`` shaped like q/k,
key weights ``(B, H, Nk)``, RoPE tables ``cos``/``sin`` ``(N, D)``; any strides (``(B, N, H, D)`` storage is read in
place). Head dims sit in power-of-two tiles (>= 16), masked. Pass 1 (``_linear_fwd_kernel_state``, grid
``(chunks·DV_SPLIT, B·H)``, ``DV_SPLIT`` Dv tiles per chunk as the autotuner picks) reduces a chunk of keys to fp32
partials ``Σ u_j R_jφ(k_j) v_jᵀ``, ``Σ u_j φ(k̃_j)`` and, with ``V_SUM``, ``Σ v_j``; for RALA ``u_j = exp(s_j − m)``
with the chunk's running max ``m`` rescaled online (flash style) and ``l = Σ u_j``.
Pass 1b (``linear_merge.py``) sums the partials in a fixed order (deterministic, no atomics), rescaled by
``exp(m_c − max m)``, into the mean-normalised ``S̄, z̄, v̄`` and ``lse``. Pass 2
(``_linear_fwd_kernel_apply``, grid ``(chunks, B·H)``) maps chunks of query rows through the state; without a
backward to save the state for, and with at most ``FOLD_MAX_CHUNKS`` key chunks, it merges the partials itself
(``FOLD``) and pass 1b is not launched. RALA's ``q̄`` comes from ``linear_query_mean.py`` first.
Backward kernels: ``linear_bwd.py`` (sharing the helpers here).
"""

import functools
import os

import torch
import triton
import triton.language as tl

from ._config import autotune_configs, autotune_kwargs, is_interpreter
from ._constants import NEG_INF
from ._launch import launch
from .block_sparse import cdiv, empty_like_layout, next_block
from .linear_configs import (
    _APPLY_CONFIGS,
    _REDUCE_DEFAULT,
    _STATE_CONFIGS,
    _STATE_DEFAULT,
    _prune_apply_configs,
    _prune_state_configs,
)
from .linear_merge import merge_state_partials, merged_state

__all__ = [
    "FEATURE_CODES",
    "FOLD_MAX_CHUNKS",
    "NORMALIZE_CODES",
    "chunking",
    "dot_precision",
    "linear_apply_fwd",
    "linear_state_fwd",
    "numerator_scale",
    "rope_strides",
    "strides4",
]

#: ``FEATURE`` constexpr: elu(x)+1, relu, identity, softmax over the head dim.
FEATURE_CODES = {"elu1": 0, "relu": 1, "identity": 2, "softmax": 3}
#: ``NORMALIZE`` constexpr: φ(q)S̄/(φ(q̃)z̄ + eps), MALA's additive form, the plain sum.
NORMALIZE_CODES = {"divisive": 0, "additive": 1, None: 2}
#: ``WEIGHT`` constexpr: no key weights, a (B, H, Nk) tensor, RALA's softmax weights.
_WEIGHT_NONE, _WEIGHT_TENSOR, _WEIGHT_RALA = 0, 1, 2
_NEG_INF = tl.constexpr(NEG_INF)
#: ``_exp`` as ``ex2.approx.ftz.f32`` on the GPU: ``tl.exp`` lowers to ``ex2.approx.f32``, whose denormal results cost a
#: compare and two multiplies per element (offline sm_90 SASS); with ``ftz`` results below 2^-126 (arguments below
#: about -87.3) are 0. The interpreter runs ``tl.exp``. ``VISIONATTN_LINEAR_FAST_EXP=0`` keeps ``tl.exp`` on the GPU.
_FAST_EXP = tl.constexpr(not is_interpreter() and os.environ.get("VISIONATTN_LINEAR_FAST_EXP", "1") != "0")
_LOG2E = tl.constexpr(1.4426950408889634)

# Row tiles of the chunked kernels; head-dim tiles are fixed by D and Dv. Chunks are multiples of the largest tile.
_ROW_TILES = (32, 64, 128)
#: Aim for this many programs per streaming multiprocessor, so short or few-head inputs still fill the GPU.
_PROGRAMS_PER_SM = 4
#: The apply kernel's programs per multiprocessor (``VISIONATTN_LINEAR_APPLY_PER_SM``): with 2 or 3 resident programs
#: per SM (d128: 127 regs capped, or (32, 8, 4)), 8 leaves a smaller last wave than 4; 4 is session 7's value.
APPLY_PROGRAMS_PER_SM = int(os.environ.get("VISIONATTN_LINEAR_APPLY_PER_SM", "4"))
#: Up to this many key chunks, the apply kernel merges the state pass's partials itself (``linear_apply_fwd``): every
#: apply program of a (batch, head) re-reads all of its partials from L2, instead of one merge kernel launch.
FOLD_MAX_CHUNKS = 4
#: Above this many fp32 state elements the state pass may split Dv in two (``_WIDE_STATE_CONFIGS``, the autotuner
#: decides) and is chunked for twice the programs (D = Dv = 128 at B1 H12 N32760: 22 chunks instead of 43, half
#: the partials for the merge). ``VISIONATTN_LINEAR_STATE_SPLIT`` sets it; 0: never split, session 7's chunking.
STATE_TILE_ELEMS = int(os.environ.get("VISIONATTN_LINEAR_STATE_SPLIT", str(64 * 128)))
#: Register budget of that merge in fp32 elements: ``BLOCK_C = _FOLD_LOAD // (D·Dv)`` chunks (1 to FOLD_MAX_CHUNKS)
#: per load, whatever the chunk count (one compiled variant per head dims).
_FOLD_LOAD = 2048


# ------------------------------------------------------------------------------------------------ shared helpers
@triton.jit
def _exp(x):
    """exp(x) in fp32, denormal results flushed to 0 on the GPU (``_FAST_EXP``)."""
    if _FAST_EXP:
        y = tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=r,r", [x * _LOG2E], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        y = tl.exp(x)
    return y


@triton.jit
def _phi(x, m_d, FEATURE: tl.constexpr):
    """φ(x) in fp32 for a [ROWS, BLOCK_D] tile; zero on padded head-dim columns."""
    if FEATURE == 0:
        # x + 1 for x > 0 (exp(0) = 1 exactly), exp(x) otherwise: no compare and select per element
        y = tl.maximum(x, 0.0) + _exp(tl.minimum(x, 0.0))
    elif FEATURE == 1:
        y = tl.maximum(x, 0.0)
    elif FEATURE == 2:
        y = x
    else:
        xs = tl.where(m_d[None, :], x, _NEG_INF)
        e = _exp(xs - tl.max(xs, axis=1)[:, None])
        y = e / tl.sum(e, axis=1)[:, None]
    return tl.where(m_d[None, :], y, 0.0)


@triton.jit
def _phi_bwd(x, phi, g, FEATURE: tl.constexpr):
    """Vector-Jacobian product of φ: the gradient on x given the gradient g on φ(x)."""
    if FEATURE == 0:
        dx = tl.where(x > 0, g, g * phi)
    elif FEATURE == 1:
        dx = tl.where(x > 0, g, 0.0)
    elif FEATURE == 2:
        dx = g
    else:
        dx = phi * (g - tl.sum(g * phi, axis=1)[:, None])
    return dx


@triton.jit
def _rotate_every_two(x, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """(x0, x1, x2, x3, …) -> (−x1, x0, −x3, x2, …): the pair swap of MALA/RALA's ``theta_shift``."""
    x_even, x_odd = tl.split(tl.reshape(x, [ROWS, BLOCK_D // 2, 2]))
    return tl.reshape(tl.join(-x_odd, x_even), [ROWS, BLOCK_D])


@triton.jit
def _load_rows(p, m_n, m_d):
    return tl.load(p, mask=m_n[:, None] & m_d[None, :], other=0.0).to(tl.float32)


@triton.jit
def _features(
    p_x,
    p_xn,
    p_cos,
    p_sin,
    m_n,
    m_d,
    FEATURE: tl.constexpr,
    HAS_NORM: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    ROPE_PAIRS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Load one row tile and return (x, φ(x), x̃, φ(x̃), R·φ(x), cos, sin); unused entries alias φ(x).

    With ``ROPE_PAIRS`` the table at ``p_cos`` is ``(cos θ_0, sin θ_0, cos θ_1, sin θ_1, …)``, one angle per channel
    pair (half the bytes of two full tables); split and re-interleaved in registers."""
    # [ROWS, BLOCK_D]
    b_x = _load_rows(p_x, m_n, m_d)
    b_phi = _phi(b_x, m_d, FEATURE)
    if HAS_NORM:
        b_xn = _load_rows(p_xn, m_n, m_d)
        b_phin = _phi(b_xn, m_d, FEATURE)
    else:
        b_xn = b_x
        b_phin = b_phi
    if HAS_ROPE:
        if ROPE_PAIRS:
            b_cos, b_sin = tl.split(tl.reshape(_load_rows(p_cos, m_n, m_d), [ROWS, BLOCK_D // 2, 2]))
            b_cos = tl.reshape(tl.join(b_cos, b_cos), [ROWS, BLOCK_D])
            b_sin = tl.reshape(tl.join(b_sin, b_sin), [ROWS, BLOCK_D])
        else:
            b_cos = _load_rows(p_cos, m_n, m_d)
            b_sin = _load_rows(p_sin, m_n, m_d)
        b_phir = b_phi * b_cos + _rotate_every_two(b_phi, ROWS, BLOCK_D) * b_sin
    else:
        b_cos = b_phi
        b_sin = b_phi
        b_phir = b_phi
    return b_x, b_phi, b_xn, b_phin, b_phir, b_cos, b_sin


# ------------------------------------------------------------------------------------------------ forward kernels
@triton.autotune(
    configs=autotune_configs(_STATE_CONFIGS, _STATE_DEFAULT),
    key=["D", "DV", "MAX_DV_SPLIT", "FEATURE", "WEIGHT", "HAS_K_NORM", "HAS_ROPE", "ROPE_PAIRS", "V_SUM"],
    prune_configs_by={"early_config_prune": _prune_state_configs},
    **autotune_kwargs(),
)
@triton.jit
def _linear_fwd_kernel_state(
    k_ptr,
    v_ptr,
    kn_ptr,
    w_ptr,
    qm_ptr,
    cos_ptr,
    sin_ptr,
    kv_part_ptr,
    ks_part_ptr,
    vs_part_ptr,
    ml_part_ptr,
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
    V_SUM: tl.constexpr,
    QM_CHUNKS: tl.constexpr,
    BLOCK_QC: tl.constexpr,
    MAX_DV_SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DV_SPLIT: tl.constexpr,
):
    # program (i_c·DV_TILES + i_e, i_bh): Dv tile i_e (BLOCK_E columns) of chunk i_c. The Dv tiles of one chunk are
    # adjacent in launch order, so they run together and all but the first read the chunk's k rows from L2
    BLOCK_E: tl.constexpr = BLOCK_DV // DV_SPLIT
    DV_TILES: tl.constexpr = (DV + BLOCK_E - 1) // BLOCK_E
    i_c, i_e, i_bh = tl.program_id(0) // DV_TILES, tl.program_id(0) % DV_TILES, tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_d = tl.arange(0, BLOCK_D)
    o_e = i_e * BLOCK_E + tl.arange(0, BLOCK_E)
    m_d = o_d < D
    m_e = o_e < DV
    b_kv = tl.zeros([BLOCK_D, BLOCK_E], dtype=tl.float32)
    # row-tile shaped sums, reduced over rows once after the loop: a reduction across the warps in the loop would
    # cost shared-memory round trips and barriers every iteration
    b_ks = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_vs = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    b_l = tl.zeros([BLOCK_N], dtype=tl.float32)
    b_m = tl.max(tl.full([BLOCK_N], _NEG_INF, tl.float32), axis=0)
    if WEIGHT == 2:
        # q̄, or the sum of its QM_CHUNKS chunk partials (chunks, B·H, D) in one load
        o_qc = tl.arange(0, BLOCK_QC)
        p_qm = qm_ptr + (o_qc[:, None] * tl.num_programs(1) + i_bh) * D + o_d[None, :]
        b_qm = tl.sum(tl.load(p_qm, mask=(o_qc[:, None] < QM_CHUNKS) & m_d[None, :], other=0.0), axis=0)
    start = i_c * chunk_len
    end = tl.minimum(start + chunk_len, N)
    for n0 in range(start, end, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < end
        p_k = k_ptr + i_b * stride_k_b + i_h * stride_k_h + o_n[:, None] * stride_k_n + o_d[None, :] * stride_k_d
        p_kn = kn_ptr + i_b * stride_kn_b + i_h * stride_kn_h + o_n[:, None] * stride_kn_n + o_d[None, :] * stride_kn_d
        p_cos = cos_ptr + o_n[:, None] * stride_cos_n + o_d[None, :] * stride_cos_d
        p_sin = sin_ptr + o_n[:, None] * stride_cos_n + o_d[None, :] * stride_cos_d
        _, _, _, b_phin, b_phir, _, _ = _features(
            p_k, p_kn, p_cos, p_sin, m_n, m_d, FEATURE, HAS_K_NORM, HAS_ROPE, ROPE_PAIRS, BLOCK_N, BLOCK_D
        )
        p_v = v_ptr + i_b * stride_v_b + i_h * stride_v_h + o_n[:, None] * stride_v_n + o_e[None, :] * stride_v_d
        # [BLOCK_N, BLOCK_E], in v's dtype: the dot takes 16-bit operands (half the registers and shared memory)
        b_v = tl.load(p_v, mask=m_n[:, None] & m_e[None, :], other=0.0)
        if WEIGHT == 2:
            b_s = tl.where(m_n, scale * tl.sum(b_phin * b_qm[None, :], axis=1), _NEG_INF)
            b_m_new = tl.maximum(b_m, tl.max(b_s, axis=0))
            # rescale only when the running max grows (a few tiles per chunk): a factor exp(0) = 1 changes nothing
            if b_m_new > b_m:
                b_alpha = _exp(b_m - b_m_new)
                b_kv *= b_alpha
                b_ks *= b_alpha
                b_l *= b_alpha
                b_m = b_m_new
            b_u = _exp(b_s - b_m)
            b_l += b_u
        elif WEIGHT == 1:
            p_w = w_ptr + i_b * stride_w_b + i_h * stride_w_h + o_n * stride_w_n
            b_u = tl.load(p_w, mask=m_n, other=0.0).to(tl.float32)
        else:
            b_u = tl.where(m_n, 1.0, 0.0)
        b_uk = (b_phir * b_u[:, None]).to(b_v.dtype)
        b_kv += tl.dot(tl.trans(b_uk), b_v, input_precision=DOT_PRECISION)
        b_ks += b_phin * b_u[:, None]
        if V_SUM:
            b_vs += b_v.to(tl.float32)
    i_part = i_c * tl.num_programs(1) + i_bh
    p_kv = kv_part_ptr + i_part * D * DV + o_d[:, None] * DV + o_e[None, :]
    tl.store(p_kv, b_kv, mask=m_d[:, None] & m_e[None, :])
    tl.store(vs_part_ptr + i_part * DV + o_e, tl.sum(b_vs, axis=0), mask=m_e)
    # every Dv tile computes the same z and (m, l) (the same loads, the same order); the first one stores them
    if i_e == 0:
        tl.store(ks_part_ptr + i_part * D + o_d, tl.sum(b_ks, axis=0), mask=m_d)
        tl.store(ml_part_ptr + i_part * 2, b_m)
        tl.store(ml_part_ptr + i_part * 2 + 1, tl.sum(b_l, axis=0))


@triton.autotune(
    configs=autotune_configs(_APPLY_CONFIGS, _REDUCE_DEFAULT),
    key=["D", "DV", "FEATURE", "NORMALIZE", "HAS_Q_NORM", "HAS_ROPE", "ROPE_PAIRS", "FOLD", "RALA"],
    prune_configs_by={"early_config_prune": _prune_apply_configs},
    **autotune_kwargs(),
)
@triton.jit
def _linear_fwd_kernel_apply(
    q_ptr,
    qn_ptr,
    cos_ptr,
    sin_ptr,
    kv_ptr,
    ks_ptr,
    vm_ptr,
    ml_ptr,
    o_ptr,
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
    stride_o_b,
    stride_o_h,
    stride_o_n,
    stride_o_d,
    H,
    N,
    NK,
    state_chunks,
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
    FOLD: tl.constexpr,
    RALA: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # one program walks a chunk of query rows, so the D x Dv state is read from L2 once per chunk, not per tile
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_d = tl.arange(0, BLOCK_D)
    o_e = tl.arange(0, BLOCK_DV)
    m_d = o_d < D
    m_e = o_e < DV
    if FOLD:
        # kv/ks/vm/ml_ptr hold the state pass's chunk partials: merged here (one program per query chunk repeats it)
        b_kv, b_ks, b_vm = merged_state(
            kv_ptr, ks_ptr, vm_ptr, ml_ptr, i_bh, tl.num_programs(1), NK, state_chunks, D, DV, BLOCK_D, BLOCK_DV,
            RALA, BLOCK_C,
        )  # fmt: skip
    else:
        # [BLOCK_D, BLOCK_DV]
        p_kv = kv_ptr + i_bh * D * DV + o_d[:, None] * DV + o_e[None, :]
        b_kv = tl.load(p_kv, mask=m_d[:, None] & m_e[None, :], other=0.0)
        b_ks = tl.load(ks_ptr + i_bh * D + o_d, mask=m_d, other=0.0)
        b_vm = tl.load(vm_ptr + i_bh * DV + o_e, mask=m_e, other=0.0)
    # a 16-bit dot operand for 16-bit inputs (fp32 sums), as in the backward: an fp32 128 x 128 state would fill the
    # shared memory that deep query-tile pipelines need
    b_kv = b_kv.to(q_ptr.dtype.element_ty)
    start = i_c * chunk_len
    end = tl.minimum(start + chunk_len, N)
    for n0 in range(start, end, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < end
        p_q = q_ptr + i_b * stride_q_b + i_h * stride_q_h + o_n[:, None] * stride_q_n + o_d[None, :] * stride_q_d
        p_qn = qn_ptr + i_b * stride_qn_b + i_h * stride_qn_h + o_n[:, None] * stride_qn_n + o_d[None, :] * stride_qn_d
        p_cos = cos_ptr + o_n[:, None] * stride_cos_n + o_d[None, :] * stride_cos_d
        p_sin = sin_ptr + o_n[:, None] * stride_cos_n + o_d[None, :] * stride_cos_d
        _, _, _, b_phin, b_phir, _, _ = _features(
            p_q, p_qn, p_cos, p_sin, m_n, m_d, FEATURE, HAS_Q_NORM, HAS_ROPE, ROPE_PAIRS, BLOCK_N, BLOCK_D
        )
        b_num = tl.dot(b_phir.to(b_kv.dtype), b_kv, input_precision=DOT_PRECISION)
        # per-row factors times the [BLOCK_N, BLOCK_DV] numerator: one multiply per element (num_scale is 1 for the
        # divisive form), no division per element
        if NORMALIZE == 0:
            b_t = tl.sum(b_phin * b_ks[None, :], axis=1)
            b_o = b_num * (1.0 / (b_t + eps))[:, None]
        elif NORMALIZE == 1:
            b_z = scale * tl.sum(b_phin * b_ks[None, :], axis=1)
            b_o = b_num * (num_scale * (1.0 + 1.0 / (b_z + eps)))[:, None] - b_z[:, None] * b_vm[None, :]
        else:
            b_o = num_scale * b_num
        p_o = o_ptr + i_b * stride_o_b + i_h * stride_o_h + o_n[:, None] * stride_o_n + o_e[None, :] * stride_o_d
        tl.store(p_o, b_o.to(o_ptr.dtype.element_ty), mask=m_n[:, None] & m_e[None, :])


# ------------------------------------------------------------------------------------------------ host launchers
def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products; fp16/bf16 values are exact in tf32 (10-bit mantissa) and fp32 sums."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def state_dv_splits(d: int, dv: int) -> int:
    """``MAX_DV_SPLIT`` of the state pass, the most Dv tiles the autotuner may pick: 2 when the fp32 accumulator
    ``BLOCK_D x BLOCK_DV`` exceeds ``STATE_TILE_ELEMS``, else 1; 0 when ``STATE_TILE_ELEMS`` is 0 (session 7's
    configs only, without the 16-warp ones)."""
    if not STATE_TILE_ELEMS:
        return 0
    return 2 if next_block(d) * next_block(dv) > STATE_TILE_ELEMS else 1


def state_chunking(n: int, bh: int, d: int, dv: int, device: torch.device) -> tuple[int, int, int]:
    """(chunk length, number of chunks, ``MAX_DV_SPLIT``) of the state pass: ``chunking`` over ``B·H·tiles``
    programs (split or not: the chunk count cannot depend on the config the autotuner picks)."""
    splits = state_dv_splits(d, dv)
    return *chunking(n, bh * max(splits, 1), device), splits


@functools.lru_cache(maxsize=1024)
def chunking(n: int, bh: int, device: torch.device, per_sm: int = _PROGRAMS_PER_SM) -> tuple[int, int]:
    """(chunk length, number of chunks) of a split-N pass: about ``per_sm`` programs per multiprocessor, whole row
    tiles.

    Cached: every launch of a split-N pass asks, with a handful of distinct shapes per model."""
    tile = _REDUCE_DEFAULT.kwargs["BLOCK_N"] if is_interpreter() else max(_ROW_TILES)
    if device.type == "cuda":
        programs = per_sm * _multiprocessors(device.index if device.index is not None else 0)
        chunks = max(1, min(cdiv(n, tile), programs // max(bh, 1)))
    else:
        chunks = cdiv(n, tile)
    chunk_len = cdiv(cdiv(n, chunks), tile) * tile
    return chunk_len, cdiv(n, chunk_len)


def numerator_scale(normalize: str | None, scale: float, length: int) -> float:
    """``c`` in ``num_i = c·(R_iφ(q_i))ᵀS̄``: the mean-normalised state times 1, MALA's scale, or Nk for the plain sum."""
    return {"divisive": 1.0, "additive": scale, None: float(length)}[normalize]


def strides4(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def rope_strides(cos: torch.Tensor | None) -> tuple[int, int]:
    return tuple(cos.stride()) if cos is not None else (0, 0)


def linear_state_fwd(
    k: torch.Tensor,
    v: torch.Tensor,
    k_norm: torch.Tensor | None,
    key_weight: torch.Tensor | None,
    query_mean: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    feature_map: str,
    scale: float,
    with_v_mean: bool = True,
    merge: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean-normalised state ``(S̄ (B,H,D,Dv), z̄ (B,H,D), v̄ (B,H,Dv), lse (B,H))``, fp32; ``v̄`` is zero unless
    ``with_v_mean`` (only MALA's additive normalisation reads it).

    RALA weights are used when ``query_mean`` is given, ``(B, H, D)`` or the unreduced ``(chunks, B, H, D)`` of
    ``linear_query_mean_fwd``. Grid ``(chunks·DV_SPLIT, B·H)``, then the merge of
    ``linear_merge.py``; without ``merge``, the chunk partials ``(chunks, B·H, D, Dv)``, ``(chunks, B·H, D)``, ``(chunks, B·H, Dv)``,
    ``(chunks, B·H, 2)`` instead (for ``linear_apply_fwd(partials=...)``).
    """
    b, h, n, d = k.shape
    dv = v.shape[-1]
    chunk_len, chunks, splits = state_chunking(n, b * h, d, dv, k.device)
    f32 = dict(device=k.device, dtype=torch.float32)
    kv_part = torch.empty(chunks, b * h, d, dv, **f32)
    ks_part = torch.empty(chunks, b * h, d, **f32)
    vs_part = torch.empty(chunks, b * h, dv, **f32)
    ml_part = torch.empty(chunks, b * h, 2, **f32)
    rala = query_mean is not None
    weight = _WEIGHT_RALA if rala else _WEIGHT_TENSOR if key_weight is not None else _WEIGHT_NONE
    qm = query_mean.float().contiguous() if rala else kv_part
    qm_chunks = query_mean.shape[0] if rala and query_mean.ndim == 4 else 1
    tiles = dict(D=d, DV=dv, BLOCK_D=next_block(d), BLOCK_DV=next_block(dv), MAX_DV_SPLIT=splits)
    grid = lambda meta: (chunks * cdiv(dv, next_block(dv) // meta["DV_SPLIT"]), b * h)
    launch(
        _linear_fwd_kernel_state,
        grid,
        k,
        v,
        k if k_norm is None else k_norm,
        k if key_weight is None else key_weight,
        qm,
        k if cos is None else cos,
        k if sin is None else sin,
        kv_part,
        ks_part,
        vs_part,
        ml_part,
        *k.stride(),
        *v.stride(),
        *strides4(k_norm),
        *(key_weight.stride() if key_weight is not None else (0, 0, 0)),
        *rope_strides(cos),
        h,
        n,
        chunk_len,
        scale,
        **tiles,
        FEATURE=FEATURE_CODES[feature_map],
        WEIGHT=weight,
        HAS_K_NORM=k_norm is not None,
        HAS_ROPE=cos is not None,
        ROPE_PAIRS=cos is not None and sin is None,
        DOT_PRECISION=dot_precision(k.dtype),
        V_SUM=with_v_mean,
        QM_CHUNKS=qm_chunks,
        BLOCK_QC=max(2, triton.next_power_of_2(qm_chunks)),
    )
    if not merge:
        return kv_part, ks_part, vs_part, ml_part
    merged = merge_state_partials(kv_part, ks_part, vs_part, ml_part, n, rala)
    return tuple(t.view(b, h, *t.shape[1:]) for t in merged)


def linear_apply_fwd(
    q: torch.Tensor,
    q_norm: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    kv: torch.Tensor,
    k_sum: torch.Tensor,
    v_mean: torch.Tensor,
    feature_map: str,
    normalize: str | None,
    scale: float,
    eps: float,
    length: int,
    partials: tuple[torch.Tensor, bool] | None = None,
) -> torch.Tensor:
    """``o (B, H, Nq, Dv)`` in q's dtype. Grid ``(chunks, B·H)``: one chunk of query rows per program.

    With ``partials=(ml, rala)``, ``kv, k_sum, v_mean, ml`` are the unmerged output of ``linear_state_fwd``
    (``merge=False``): up to ``FOLD_MAX_CHUNKS`` chunks each program merges them itself (``merged_state``; the
    merge kernel's sums up to their grouping), else the merge kernel runs first."""
    b, h, n, d = q.shape
    dv = kv.shape[-1]
    if partials is not None and kv.shape[0] > FOLD_MAX_CHUNKS:
        kv, k_sum, v_mean, _ = merge_state_partials(kv, k_sum, v_mean, partials[0], length, partials[1])
        partials = None
    o = empty_like_layout(q, dv)
    chunk_len, chunks = chunking(n, b * h, q.device, APPLY_PROGRAMS_PER_SM)
    fold = partials is not None
    fold_load = max(1, min(FOLD_MAX_CHUNKS, _FOLD_LOAD // (next_block(d) * next_block(dv))))
    launch(
        _linear_fwd_kernel_apply,
        (chunks, b * h),
        q, q if q_norm is None else q_norm, q if cos is None else cos, q if sin is None else sin,
        kv, k_sum, v_mean, partials[0] if fold else kv, o,
        *q.stride(), *strides4(q_norm), *rope_strides(cos), *o.stride(),
        h, n, length, kv.shape[0] if fold else 1, chunk_len, numerator_scale(normalize, scale, length), scale, eps,
        D=d, DV=dv, BLOCK_D=next_block(d), BLOCK_DV=next_block(dv), FEATURE=FEATURE_CODES[feature_map],
        NORMALIZE=NORMALIZE_CODES[normalize], HAS_Q_NORM=q_norm is not None, HAS_ROPE=cos is not None,
        ROPE_PAIRS=cos is not None and sin is None, DOT_PRECISION=dot_precision(q.dtype),
        FOLD=fold, RALA=fold and partials[1], BLOCK_C=fold_load if fold else 1,
    )  # fmt: skip
    return o
