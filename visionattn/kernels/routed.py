"""Routed attention over small regions (BiFormer's token-to-token step): each query region attends to the tokens of
its top-k routed key regions, read in place from raster-order maps.

Regions are the ``S x S`` cells (``RH x RW`` tokens, ``R = RH * RW``) of a ``(Y, X) = (S RH, S RW)`` map. A program
owns ``G`` query regions of one (batch, head): their ``G * R_PAD`` rows (``R_PAD`` the power of two holding ``R``)
are stacked into one tile of >= 16 rows, and each step loads ``KB`` routed regions of every owner (``G * KB * R_PAD``
key rows gathered by pointer: region id -> token rows). Scores outside the owner's diagonal block are masked, so one
``tl.dot`` serves several tiny regions. Each query row sees all its keys in its own program: the forward is one
online softmax, dQ needs no reduction across programs, and dK/dV run key-major over the transposed routing
(``routed_key_major``: per key region, the query regions that routed to it, computed on the device), without
atomics. No host syncs, no permutation copies.
"""

import torch
import triton
import triton.language as tl

from ._config import autotune
from ._constants import LN2, LOG2E, NEG_INF
from ._launch import launch

__all__ = ["next_pow2", "routed_attention_bwd", "routed_attention_fwd", "routed_key_major"]

_NEG_INF = tl.constexpr(NEG_INF)
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(LN2)

# ROWS / COLS: target tile rows (stacked regions) and key columns per step; the tiles follow from R_PAD (heuristics).
_CONFIGS = [
    triton.Config({"ROWS": r, "COLS": c}, num_warps=w, num_stages=s)
    for r, c, w, s in [
        (16, 64, 4, 2),
        (32, 64, 4, 2),
        (64, 64, 4, 2),
        (16, 128, 4, 2),
        (32, 128, 4, 2),
        (64, 128, 4, 2),
        (16, 256, 4, 2),
        (16, 64, 2, 2),
        (64, 64, 8, 2),
        (64, 128, 8, 2),
        (128, 128, 8, 2),
    ]
]
# Under the interpreter: small tiles, so tests walk several key steps and stack several regions per program.
_DEFAULT_CONFIG = triton.Config({"ROWS": 16, "COLS": 32}, num_warps=4, num_stages=1)
_KEY = ["R_PAD", "TOPK", "HEAD_DIM", "HEAD_DIM_V", "REGIONS"]


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


#: ``G`` query (or key) regions stacked per program and ``KB`` routed regions per step, from the config's targets.
_TILES = {
    "G": lambda a: max(1, a["ROWS"] // a["R_PAD"]),
    "KB": lambda a: min(max(1, a["COLS"] // (a["G"] * a["R_PAD"])), next_pow2(a["TOPK"])),
}


def _prune(configs, nargs, **kwargs):
    """Keep one config per resulting tile shape ``(G, KB)``, warps and stages."""
    args = {**nargs, **kwargs}
    kept, seen = [], set()
    for config in configs:
        tiles = {**args, **config.kwargs}
        for name, heuristic in _TILES.items():  # in order, as triton.heuristics applies them
            tiles[name] = heuristic(tiles)
        variant = (tiles["G"], tiles["KB"], config.num_warps, config.num_stages)
        if variant not in seen:
            seen.add(variant)
            kept.append(config)
    return kept or configs[:1]


def _grid(regions: int, batch_heads: int):
    return lambda meta: (-(-regions // meta["G"]), batch_heads)


@triton.jit
def _token_offsets(region, t, S, RH, RW, stride_y, stride_x):
    """Memory offset of token ``t`` (row-major inside its region) of ``region`` (row-major); with strides
    ``(S * RW, 1)`` its raster index."""
    y = (region // S) * RH + t // RW
    x = (region % S) * RW + t % RW
    return y * stride_y + x * stride_x


@triton.jit
def _routed_rows(i_g, S, RH, RW, R, REGIONS, stride_y, stride_x, G: tl.constexpr, R_PAD: tl.constexpr):
    """The program's stacked rows: owner slot, region, memory offset, raster index and validity of each."""
    o_m = tl.arange(0, G * R_PAD)
    g_m = o_m // R_PAD
    region = i_g * G + g_m
    t_m = o_m % R_PAD
    off = _token_offsets(region, t_m, S, RH, RW, stride_y, stride_x)
    raster = _token_offsets(region, t_m, S, RH, RW, S * RW, 1)
    return g_m, region, off, raster, (t_m < R) & (region < REGIONS)


@triton.jit
def _routed_cols(step, i_g, R, REGIONS, G: tl.constexpr, KB: tl.constexpr, R_PAD: tl.constexpr):
    """Key (or query) columns of one step: owner slot, owner region, routing slot, token in region, validity."""
    o_n = tl.arange(0, G * KB * R_PAD)
    g_n = o_n // (KB * R_PAD)
    slot = step + (o_n // R_PAD) % KB
    t_n = o_n % R_PAD
    owner = i_g * G + g_n
    return g_n, owner, slot, t_n, (t_n < R) & (owner < REGIONS)


@triton.jit
def _load_rows(ptr, off, valid, o_d, D: tl.constexpr):
    return tl.load(ptr + off[:, None] + o_d[None, :], mask=valid[:, None] & (o_d < D)[None, :], other=0.0)


@triton.jit
def _routed_kv(
    step, i_g, K, V, IDX, stride_idx_r, stride_k_y, stride_k_x, stride_v_y, stride_v_x,
    S, RH, RW, R, REGIONS, g_m, o_d, o_dv,
    TOPK: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    G: tl.constexpr, KB: tl.constexpr, R_PAD: tl.constexpr,
):  # fmt: skip
    """One step of a query-major walk (``K``, ``V``, ``IDX`` at the program's batch and head): the rows of ``KB``
    routed regions per owner gathered by pointer, ``[G * KB * R_PAD, BLOCK_D]`` and ``[G * KB * R_PAD, BLOCK_DV]``,
    and the allowed scores (the owner's own diagonal block, valid tokens)."""
    g_n, owner, slot, t_n, m_n = _routed_cols(step, i_g, R, REGIONS, G, KB, R_PAD)
    m_n = m_n & (slot < TOPK)
    region = tl.load(IDX + owner * stride_idx_r + slot, mask=m_n, other=0).to(tl.int32)
    k_off = _token_offsets(region, t_n, S, RH, RW, stride_k_y, stride_k_x)
    v_off = _token_offsets(region, t_n, S, RH, RW, stride_v_y, stride_v_x)
    b_k = _load_rows(K, k_off, m_n, o_d, HEAD_DIM)
    b_v = _load_rows(V, v_off, m_n, o_dv, HEAD_DIM_V)
    return b_k, b_v, (g_m[:, None] == g_n[None, :]) & m_n[None, :]


@autotune(_CONFIGS, _DEFAULT_CONFIG, _KEY, _prune)
@triton.heuristics(_TILES)
@triton.jit
def _routed_attn_fwd_kernel(
    Q, K, V, O, LSE, IDX,
    stride_q_b, stride_q_h, stride_q_y, stride_q_x,
    stride_k_b, stride_k_h, stride_k_y, stride_k_x,
    stride_v_b, stride_v_h, stride_v_y, stride_v_x,
    stride_o_b, stride_o_h, stride_o_y, stride_o_x,
    stride_idx_b, stride_idx_r,
    num_heads, S, RH, RW, R, REGIONS, num_tokens, scale_log2,
    TOPK: tl.constexpr, R_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROWS: tl.constexpr, COLS: tl.constexpr, G: tl.constexpr, KB: tl.constexpr,
):  # fmt: skip
    i_g, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: batch offsets of large maps
    i_b, i_h = i_bh // num_heads, i_bh % num_heads
    o_d, o_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    g_m, _, q_off, q_raster, m_m = _routed_rows(i_g, S, RH, RW, R, REGIONS, stride_q_y, stride_q_x, G, R_PAD)
    # [G * R_PAD, BLOCK_D]
    b_q = _load_rows(Q + i_b * stride_q_b + i_h * stride_q_h, q_off, m_m, o_d, HEAD_DIM)
    m_i = tl.full([G * R_PAD], _NEG_INF, tl.float32)
    l_i = tl.zeros([G * R_PAD], tl.float32)
    acc = tl.zeros([G * R_PAD, BLOCK_DV], tl.float32)
    for step in range(0, TOPK, KB):
        b_k, b_v, allowed = _routed_kv(
            step, i_g, K + i_b * stride_k_b + i_h * stride_k_h, V + i_b * stride_v_b + i_h * stride_v_h,
            IDX + i_b * stride_idx_b, stride_idx_r, stride_k_y, stride_k_x, stride_v_y, stride_v_x,
            S, RH, RW, R, REGIONS, g_m, o_d, o_dv, TOPK, HEAD_DIM, HEAD_DIM_V, G, KB, R_PAD,
        )  # fmt: skip
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * scale_log2
        b_s = tl.where(allowed, b_s, _NEG_INF)
        m_new = tl.maximum(m_i, tl.max(b_s, 1))
        alpha = tl.exp2(m_i - m_new)
        b_p = tl.where(allowed, tl.exp2(b_s - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(b_p, 1)
        acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    _, _, o_off, _, _ = _routed_rows(i_g, S, RH, RW, R, REGIONS, stride_o_y, stride_o_x, G, R_PAD)
    p_o = O + i_b * stride_o_b + i_h * stride_o_h + o_off[:, None] + o_dv[None, :]
    tl.store(p_o, (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=m_m[:, None] & (o_dv < HEAD_DIM_V)[None, :])
    tl.store(LSE + i_bh * num_tokens + q_raster, (m_i + tl.log2(l_safe)) * _LN2, mask=m_m)


@autotune(_CONFIGS, _DEFAULT_CONFIG, _KEY, _prune)
@triton.heuristics(_TILES)
@triton.jit
def _routed_attn_bwd_kernel_dq(
    Q, K, V, O, DO, LSE, DELTA, DQ, IDX,
    stride_q_b, stride_q_h, stride_q_y, stride_q_x,
    stride_k_b, stride_k_h, stride_k_y, stride_k_x,
    stride_v_b, stride_v_h, stride_v_y, stride_v_x,
    stride_o_b, stride_o_h, stride_o_y, stride_o_x,
    stride_do_b, stride_do_h, stride_do_y, stride_do_x,
    stride_dq_b, stride_dq_h, stride_dq_y, stride_dq_x,
    stride_idx_b, stride_idx_r,
    num_heads, S, RH, RW, R, REGIONS, num_tokens, scale_log2, scale,
    TOPK: tl.constexpr, R_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROWS: tl.constexpr, COLS: tl.constexpr, G: tl.constexpr, KB: tl.constexpr,
):  # fmt: skip
    i_g, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: batch offsets of large maps
    i_b, i_h = i_bh // num_heads, i_bh % num_heads
    o_d, o_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    g_m, _, q_off, raster, m_m = _routed_rows(i_g, S, RH, RW, R, REGIONS, stride_q_y, stride_q_x, G, R_PAD)
    _, _, o_off, _, _ = _routed_rows(i_g, S, RH, RW, R, REGIONS, stride_o_y, stride_o_x, G, R_PAD)
    _, _, do_off, _, _ = _routed_rows(i_g, S, RH, RW, R, REGIONS, stride_do_y, stride_do_x, G, R_PAD)
    # [G * R_PAD, BLOCK_D], [G * R_PAD, BLOCK_DV] x 2
    b_q = _load_rows(Q + i_b * stride_q_b + i_h * stride_q_h, q_off, m_m, o_d, HEAD_DIM)
    b_do = _load_rows(DO + i_b * stride_do_b + i_h * stride_do_h, do_off, m_m, o_dv, HEAD_DIM_V)
    b_o = _load_rows(O + i_b * stride_o_b + i_h * stride_o_h, o_off, m_m, o_dv, HEAD_DIM_V)
    # D_i = rowsum(dO ∘ O), saved for the key-major pass
    b_delta = tl.sum(b_do.to(tl.float32) * b_o.to(tl.float32), 1)
    tl.store(DELTA + i_bh * num_tokens + raster, b_delta, mask=m_m)
    b_lse2 = tl.load(LSE + i_bh * num_tokens + raster, mask=m_m, other=0.0) * _LOG2E
    b_dq = tl.zeros([G * R_PAD, BLOCK_D], tl.float32)
    for step in range(0, TOPK, KB):
        b_k, b_v, allowed = _routed_kv(
            step, i_g, K + i_b * stride_k_b + i_h * stride_k_h, V + i_b * stride_v_b + i_h * stride_v_h,
            IDX + i_b * stride_idx_b, stride_idx_r, stride_k_y, stride_k_x, stride_v_y, stride_v_x,
            S, RH, RW, R, REGIONS, g_m, o_d, o_dv, TOPK, HEAD_DIM, HEAD_DIM_V, G, KB, R_PAD,
        )  # fmt: skip
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * scale_log2
        b_p = tl.where(allowed, tl.exp2(b_s - b_lse2[:, None]), 0.0)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=DOT_PRECISION)
    _, _, dq_off, _, _ = _routed_rows(i_g, S, RH, RW, R, REGIONS, stride_dq_y, stride_dq_x, G, R_PAD)
    p_dq = DQ + i_b * stride_dq_b + i_h * stride_dq_h + dq_off[:, None] + o_d[None, :]
    tl.store(p_dq, (b_dq * scale).to(DQ.dtype.element_ty), mask=m_m[:, None] & (o_d < HEAD_DIM)[None, :])


@autotune(_CONFIGS, _DEFAULT_CONFIG, _KEY, _prune)
@triton.heuristics(_TILES)
@triton.jit
def _routed_attn_bwd_kernel_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, QIDX, QCNT,
    stride_q_b, stride_q_h, stride_q_y, stride_q_x,
    stride_k_b, stride_k_h, stride_k_y, stride_k_x,
    stride_v_b, stride_v_h, stride_v_y, stride_v_x,
    stride_do_b, stride_do_h, stride_do_y, stride_do_x,
    stride_dk_b, stride_dk_h, stride_dk_y, stride_dk_x,
    stride_dv_b, stride_dv_h, stride_dv_y, stride_dv_x,
    stride_qidx_b, stride_qidx_r,
    num_heads, S, RH, RW, R, REGIONS, num_tokens, scale_log2, scale,
    TOPK: tl.constexpr, R_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROWS: tl.constexpr, COLS: tl.constexpr, G: tl.constexpr, KB: tl.constexpr,
):  # fmt: skip
    # rows: the tokens of G key regions; columns: the tokens of the query regions that routed to each of them
    i_g, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: batch offsets of large maps
    i_b, i_h = i_bh // num_heads, i_bh % num_heads
    o_d, o_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    g_m, k_region, k_off, _, m_m = _routed_rows(i_g, S, RH, RW, R, REGIONS, stride_k_y, stride_k_x, G, R_PAD)
    _, _, v_off, _, _ = _routed_rows(i_g, S, RH, RW, R, REGIONS, stride_v_y, stride_v_x, G, R_PAD)
    # [G * R_PAD, BLOCK_D], [G * R_PAD, BLOCK_DV]
    b_k = _load_rows(K + i_b * stride_k_b + i_h * stride_k_h, k_off, m_m, o_d, HEAD_DIM)
    b_v = _load_rows(V + i_b * stride_v_b + i_h * stride_v_h, v_off, m_m, o_dv, HEAD_DIM_V)
    p_cnt = QCNT + i_b * REGIONS
    num_steps = tl.max(tl.load(p_cnt + k_region, mask=k_region < REGIONS, other=0))  # longest list of the G
    b_dk = tl.zeros([G * R_PAD, BLOCK_D], tl.float32)
    b_dv = tl.zeros([G * R_PAD, BLOCK_DV], tl.float32)
    for step in range(0, num_steps, KB):
        g_n, owner, slot, t_n, m_n = _routed_cols(step, i_g, R, REGIONS, G, KB, R_PAD)
        m_n = m_n & (slot < tl.load(p_cnt + owner, mask=m_n, other=0))
        region = tl.load(QIDX + i_b * stride_qidx_b + owner * stride_qidx_r + slot, mask=m_n, other=0).to(tl.int32)
        q_off = _token_offsets(region, t_n, S, RH, RW, stride_q_y, stride_q_x)
        do_off = _token_offsets(region, t_n, S, RH, RW, stride_do_y, stride_do_x)
        raster = _token_offsets(region, t_n, S, RH, RW, S * RW, 1)
        b_q = _load_rows(Q + i_b * stride_q_b + i_h * stride_q_h, q_off, m_n, o_d, HEAD_DIM)
        b_do = _load_rows(DO + i_b * stride_do_b + i_h * stride_do_h, do_off, m_n, o_dv, HEAD_DIM_V)
        b_lse2 = tl.load(LSE + i_bh * num_tokens + raster, mask=m_n, other=0.0) * _LOG2E
        b_delta = tl.load(DELTA + i_bh * num_tokens + raster, mask=m_n, other=0.0)
        allowed = (g_m[:, None] == g_n[None, :]) & m_n[None, :]
        # transposed scores [keys, queries]
        b_st = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION) * scale_log2
        b_pt = tl.where(allowed, tl.exp2(b_st - b_lse2[None, :]), 0.0)
        b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=DOT_PRECISION)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=DOT_PRECISION)
    _, _, dk_off, _, _ = _routed_rows(i_g, S, RH, RW, R, REGIONS, stride_dk_y, stride_dk_x, G, R_PAD)
    _, _, dv_off, _, _ = _routed_rows(i_g, S, RH, RW, R, REGIONS, stride_dv_y, stride_dv_x, G, R_PAD)
    p_dk = DK + i_b * stride_dk_b + i_h * stride_dk_h + dk_off[:, None] + o_d[None, :]
    p_dv = DV + i_b * stride_dv_b + i_h * stride_dv_h + dv_off[:, None] + o_dv[None, :]
    tl.store(p_dk, (b_dk * scale).to(DK.dtype.element_ty), mask=m_m[:, None] & (o_d < HEAD_DIM)[None, :])
    tl.store(p_dv, b_dv.to(DV.dtype.element_ty), mask=m_m[:, None] & (o_dv < HEAD_DIM_V)[None, :])


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _empty_heads_inner(b: int, h: int, y: int, x: int, d: int, like: torch.Tensor) -> torch.Tensor:
    """``(B, H, Y, X, d)`` stored as ``(B, Y, X, H, d)``: the raster ``(B, Y, X, H * d)`` map is a free view."""
    return torch.empty(b, y, x, h, d, device=like.device, dtype=like.dtype).permute(0, 3, 1, 2, 4)


def _geometry(q: torch.Tensor, v: torch.Tensor, regions: torch.Tensor, n_win: int) -> tuple[tuple, dict]:
    """Runtime ``(heads, S, RH, RW, R, REGIONS, tokens)`` and the constexprs of a launch."""
    _, h, y, x, d = q.shape
    rh, rw = y // n_win, x // n_win
    dv = v.shape[-1]
    constexprs = {
        "TOPK": regions.shape[-1],
        "R_PAD": next_pow2(rh * rw),
        "HEAD_DIM": d,
        "HEAD_DIM_V": dv,
        "BLOCK_D": max(16, next_pow2(d)),
        "BLOCK_DV": max(16, next_pow2(dv)),
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }
    return (h, n_win, rh, rw, rh * rw, n_win * n_win, y * x), constexprs


def _strides(*tensors: torch.Tensor) -> list[int]:
    return [s for t in tensors for s in t.stride()[:4]]


def routed_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, regions: torch.Tensor, n_win: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``: ``out`` ``(B, H, Y, X, Dv)`` stored as ``(B, Y, X, H, Dv)``, ``lse`` ``(B, H, Y * X)`` float32
    (natural log). ``q``, ``k`` ``(B, H, Y, X, D)``, ``v`` ``(B, H, Y, X, Dv)`` any strides; ``regions``
    ``(B, n_win², topk)`` integer routed key regions of each query region."""
    b, h, y, x, _ = q.shape
    q, k, v, regions = _unit_last(q), _unit_last(k), _unit_last(v), regions.contiguous()
    geometry, constexprs = _geometry(q, v, regions, n_win)
    out = _empty_heads_inner(b, h, y, x, v.shape[-1], q)
    lse = torch.empty(b, h, y * x, device=q.device, dtype=torch.float32)
    launch(
        _routed_attn_fwd_kernel,
        _grid(n_win * n_win, b * h),
        q, k, v, out, lse, regions,
        *_strides(q, k, v, out),
        *regions.stride()[:2],
        *geometry,
        scale * LOG2E,
        **constexprs,
    )  # fmt: skip
    return out, lse


def routed_key_major(regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing transposed, on the device: ``(order, counts)``, ``order`` ``(B, R, R)`` int64 listing for each key
    region first the ``counts[b, r]`` query regions that routed to it (ascending), then the others."""
    b, r, _ = regions.shape
    routed = torch.zeros(b, r, r, device=regions.device, dtype=torch.uint8)
    routed.scatter_(2, regions.long(), 1)
    key_major = routed.transpose(1, 2)
    counts = key_major.sum(-1, dtype=torch.int32)
    order = torch.sort(key_major, dim=-1, descending=True, stable=True).indices
    return order.contiguous(), counts.contiguous()


def routed_attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    regions: torch.Tensor,
    n_win: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of ``routed_attention_fwd`` (each stored as ``(B, Y, X, H, ·)``): dQ and ``D = rowsum(dO ∘ O)``
    query-major, then dK/dV key-major over ``routed_key_major``."""
    b, h, y, x, d = q.shape
    dv_dim = v.shape[-1]
    q, k, v, do, regions = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(do), regions.contiguous()
    geometry, constexprs = _geometry(q, v, regions, n_win)
    dq, dk, dv = (_empty_heads_inner(b, h, y, x, dim, q) for dim in (d, d, dv_dim))
    delta = torch.empty_like(lse)
    grid = _grid(n_win * n_win, b * h)
    launch(
        _routed_attn_bwd_kernel_dq,
        grid,
        q, k, v, out, do, lse, delta, dq, regions,
        *_strides(q, k, v, out, do, dq),
        *regions.stride()[:2],
        *geometry,
        scale * LOG2E,
        scale,
        **constexprs,
    )  # fmt: skip
    order, counts = routed_key_major(regions)
    launch(
        _routed_attn_bwd_kernel_dkdv,
        grid,
        q, k, v, do, lse, delta, dk, dv, order, counts,
        *_strides(q, k, v, do, dk, dv),
        *order.stride()[:2],
        *geometry,
        scale * LOG2E,
        scale,
        **constexprs,
    )  # fmt: skip
    return dq, dk, dv
