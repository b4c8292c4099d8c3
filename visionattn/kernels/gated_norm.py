"""ViG's locality injection in one pass: two per-head RMSNorms, the sigmoid gate mix and an optional SiLU.

Per row (one token's head, Dv channels) with ``s = σ(g)`` and ``RMSNorm(x; w) = x · rstd ⊙ w``,
``rstd = rsqrt(mean(x²) + eps)`` (ViG, Liao et al., AAAI 2025, arXiv 2405.18425, Eq. 8):

    m = s ⊙ RMSNorm(o; w_o) + (1 − s) ⊙ RMSNorm(l; w_l),        y = SiLU(m) or m

Backward, with ``x̂ = x · rstd`` and ``n = x̂ ⊙ w`` for each of o and l:

    dm = dy · SiLU'(m) (or dy),   dn_o = dm ⊙ s,   dn_l = dm ⊙ (1 − s),   dg = dm ⊙ (n_o − n_l) ⊙ s (1 − s)
    dx = rstd · (dx̂ − x̂ · mean(dx̂ ⊙ x̂)) with dx̂ = dn ⊙ w,        dw = Σ_rows dn ⊙ x̂

One program normalises ``BLOCK_R`` rows at once (a ``[BLOCK_R, Dv]`` tile per tensor, fp32 statistics), so short
rows (Dv = 16-64) still fill the machine. The backward runs a fixed number of programs that loop over row blocks and
each store their partial weight gradients; the launcher sums the partials in a fixed order (deterministic).

Layout: o, l, g and dy are ``(B, N, H, Dv)`` with any strides and a unit last stride; every output is contiguous.

The same row machinery gives a plain RMSNorm ``y = RMSNorm(x; w)`` over the last dim of any ``(..., C)`` tensor
(ViG's pre-norms, C = 192-768), backward ``dx`` as above with ``dn = dy`` and ``dw = Σ_rows dy ⊙ x̂``; and, through
the ``CENTER`` constexpr, LayerNorm (Ba et al., 2016, Eq. 4) ``y = x̂ ⊙ w + b`` with ``x̂ = (x − μ) · rstd``,
``μ = mean(x)``, ``rstd = rsqrt(mean((x − μ)²) + eps)`` (MAViT/RAVLT and Agent blocks, C = 64-512), backward

    dx = rstd · (dx̂ − mean(dx̂) − x̂ · mean(dx̂ ⊙ x̂)) with dx̂ = dy ⊙ w,   dw = Σ_rows dy ⊙ x̂,   db = Σ_rows dy
"""

import functools

import torch
import triton
import triton.language as tl

from ._config import autotune, is_interpreter
from ._launch import launch
from .block_sparse import cdiv, leading_strides, next_block, unit_last_stride

__all__ = ["gated_norm_bwd", "gated_norm_fwd", "layer_norm_bwd", "layer_norm_fwd", "rms_norm_bwd", "rms_norm_fwd"]

#: Largest tile (elements per tensor): the backward at 8192 already needs 8 warps not to spill (ptxas, sm_90).
_MAX_TILE = 8192
#: Backward programs per streaming multiprocessor: enough resident warps to hide load latency, few partials to sum.
_BWD_PROGRAMS_PER_SM = 8
#: Backward programs under the interpreter: few, so tiny tests still loop over several row blocks per program.
_INTERPRETER_BWD_PROGRAMS = 2


def _configs(rows: int, warps: int) -> list:
    """Rows per program x warps, ``(rows, warps)`` first: the config used when autotuning is off. Memory-bound: what
    matters is the bytes in flight per SM, i.e. rows per program times the programs that fit in the registers."""
    pairs = [(r, w) for r in (16, 32, 64, 128, 256, 512) for w in (4, 8) if (r, w) != (rows, warps)]
    return [triton.Config({"BLOCK_R": r}, num_warps=w) for r, w in [(rows, warps), *pairs]]


# first entries: by the sm_90 register counts at Dv = 64 (bf16), the largest tiles that keep 4 programs per SM
_FWD_CONFIGS = _configs(64, 4)
_BWD_CONFIGS = _configs(32, 4)
_DEFAULT = triton.Config({"BLOCK_R": 16}, num_warps=4)


def _prune_configs(configs, nargs, **kwargs):
    """Rows per program capped so that one tile stays within ``_MAX_TILE`` elements (duplicates dropped)."""
    cap = _MAX_TILE // {**nargs, **kwargs}["BLOCK_D"]
    kept = {}
    for c in configs:
        rows = min(c.kwargs["BLOCK_R"], cap)
        kept.setdefault((rows, c.num_warps), triton.Config({"BLOCK_R": rows}, num_warps=c.num_warps))
    return list(kept.values())


# ------------------------------------------------------------------------------------------------------- helpers
@triton.jit
def _channels(DV: tl.constexpr, BLOCK_D: tl.constexpr):
    """Channel offsets ``[BLOCK_D]`` of a row tile and their mask (``< DV``)."""
    o_d = tl.arange(0, BLOCK_D)
    return o_d, o_d < DV


@triton.jit
def _channel_load(base, o_d, m_d):
    """``[BLOCK_D]`` fp32 per-channel vector (a norm weight or bias), 0 beyond ``DV``."""
    return tl.load(base + o_d, mask=m_d, other=0.0).to(tl.float32)


@triton.jit
def _row_block(i_blk, num_rows, m_d, BLOCK_R: tl.constexpr):
    """Rows of row block ``i_blk`` (int64, so the offsets built from them do not overflow) and the
    ``[BLOCK_R, BLOCK_D]`` mask of their tile."""
    o_r = i_blk * BLOCK_R + tl.arange(0, BLOCK_R)
    return o_r.to(tl.int64), (o_r < num_rows)[:, None] & m_d[None, :]


@triton.jit
def _store_tile(p, b_x, mask):
    """Store the fp32 tile ``b_x`` at the pointers ``p``, in their dtype."""
    tl.store(p, b_x.to(p.dtype.element_ty), mask=mask)


@triton.jit
def _gated_norm_rows(i_blk, num_rows, tokens, heads, BLOCK_R: tl.constexpr):
    """Row indices of row block ``i_blk``, their mask and their (batch, token, head) coordinates, as int64 so the
    offsets built from them do not overflow (the divisions stay int32: 64-bit division is emulated on GPUs)."""
    o_r = i_blk * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < num_rows
    i_t = o_r // heads
    i_b, i_n, i_h = i_t // tokens, i_t % tokens, o_r % heads
    return o_r.to(tl.int64), m_r, i_b.to(tl.int64), i_n.to(tl.int64), i_h.to(tl.int64)


@triton.jit
def _gated_norm_load(base, i_b, i_n, i_h, stride_b, stride_n, stride_h, o_d, mask):
    """``[BLOCK_R, BLOCK_D]`` fp32 tile of the rows (i_b, i_n, i_h) of a unit-last-stride (B, N, H, Dv) tensor."""
    p_x = base + (i_b * stride_b + i_n * stride_n + i_h * stride_h)[:, None] + o_d[None, :]
    return tl.load(p_x, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _gated_norm_rms(b_x, eps, DV: tl.constexpr):
    """``x̂ = x · rstd`` and ``rstd = rsqrt(mean(x²) + eps)`` per row (masked lanes hold 0 and add nothing)."""
    b_rstd = tl.rsqrt(tl.sum(b_x * b_x, axis=1) / DV + eps)
    return b_x * b_rstd[:, None], b_rstd


@triton.jit
def _gated_norm_rms_bwd(b_dn, b_xhat, b_rstd, b_w, DV: tl.constexpr):
    """``dx`` of ``n = x̂ ⊙ w`` given ``dn``: ``rstd · (dx̂ − x̂ · mean(dx̂ ⊙ x̂))`` with ``dx̂ = dn ⊙ w``."""
    b_dxhat = b_dn * b_w[None, :]
    b_proj = tl.sum(b_dxhat * b_xhat, axis=1) / DV
    return b_rstd[:, None] * (b_dxhat - b_xhat * b_proj[:, None])


# ------------------------------------------------------------------------------------------------------- forward
@autotune(_FWD_CONFIGS, _DEFAULT, ["DV", "ACT"], _prune_configs)
@triton.jit
def _gated_norm_fwd_kernel(
    o_ptr,
    l_ptr,
    g_ptr,
    w_o_ptr,
    w_l_ptr,
    y_ptr,
    num_rows,
    tokens,
    heads,
    stride_o_b,
    stride_o_n,
    stride_o_h,
    stride_l_b,
    stride_l_n,
    stride_l_h,
    stride_g_b,
    stride_g_n,
    stride_g_h,
    eps,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    o_r, m_r, i_b, i_n, i_h = _gated_norm_rows(tl.program_id(0), num_rows, tokens, heads, BLOCK_R)
    o_d, m_d = _channels(DV, BLOCK_D)
    mask = m_r[:, None] & m_d[None, :]
    # [BLOCK_D]
    b_w_o = _channel_load(w_o_ptr, o_d, m_d)
    b_w_l = _channel_load(w_l_ptr, o_d, m_d)
    # [BLOCK_R, BLOCK_D]
    b_o = _gated_norm_load(o_ptr, i_b, i_n, i_h, stride_o_b, stride_o_n, stride_o_h, o_d, mask)
    b_l = _gated_norm_load(l_ptr, i_b, i_n, i_h, stride_l_b, stride_l_n, stride_l_h, o_d, mask)
    b_s = tl.sigmoid(_gated_norm_load(g_ptr, i_b, i_n, i_h, stride_g_b, stride_g_n, stride_g_h, o_d, mask))
    b_ohat, _ = _gated_norm_rms(b_o, eps, DV)
    b_lhat, _ = _gated_norm_rms(b_l, eps, DV)
    b_y = b_s * (b_ohat * b_w_o[None, :]) + (1.0 - b_s) * (b_lhat * b_w_l[None, :])
    if ACT:
        b_y = b_y * tl.sigmoid(b_y)
    _store_tile(y_ptr + o_r[:, None] * DV + o_d[None, :], b_y, mask)


# ------------------------------------------------------------------------------------------------------ backward
@autotune(_BWD_CONFIGS, _DEFAULT, ["DV", "ACT"], _prune_configs)
@triton.jit
def _gated_norm_bwd_kernel(
    dy_ptr,
    o_ptr,
    l_ptr,
    g_ptr,
    w_o_ptr,
    w_l_ptr,
    do_ptr,
    dl_ptr,
    dg_ptr,
    dw_o_ptr,
    dw_l_ptr,
    num_rows,
    tokens,
    heads,
    stride_dy_b,
    stride_dy_n,
    stride_dy_h,
    stride_o_b,
    stride_o_n,
    stride_o_h,
    stride_l_b,
    stride_l_n,
    stride_l_h,
    stride_g_b,
    stride_g_n,
    stride_g_h,
    eps,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    i_p, n_p = tl.program_id(0), tl.num_programs(0)
    o_d, m_d = _channels(DV, BLOCK_D)
    # [BLOCK_D]
    b_w_o = _channel_load(w_o_ptr, o_d, m_d)
    b_w_l = _channel_load(w_l_ptr, o_d, m_d)
    b_dw_o = tl.zeros([BLOCK_D], dtype=tl.float32)
    b_dw_l = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i_blk in range(i_p, tl.cdiv(num_rows, BLOCK_R), n_p):
        o_r, m_r, i_b, i_n, i_h = _gated_norm_rows(i_blk, num_rows, tokens, heads, BLOCK_R)
        mask = m_r[:, None] & m_d[None, :]
        # [BLOCK_R, BLOCK_D]
        b_dm = _gated_norm_load(dy_ptr, i_b, i_n, i_h, stride_dy_b, stride_dy_n, stride_dy_h, o_d, mask)
        b_o = _gated_norm_load(o_ptr, i_b, i_n, i_h, stride_o_b, stride_o_n, stride_o_h, o_d, mask)
        b_l = _gated_norm_load(l_ptr, i_b, i_n, i_h, stride_l_b, stride_l_n, stride_l_h, o_d, mask)
        b_s = tl.sigmoid(_gated_norm_load(g_ptr, i_b, i_n, i_h, stride_g_b, stride_g_n, stride_g_h, o_d, mask))
        b_ohat, b_rstd_o = _gated_norm_rms(b_o, eps, DV)
        b_lhat, b_rstd_l = _gated_norm_rms(b_l, eps, DV)
        b_n_o = b_ohat * b_w_o[None, :]
        b_n_l = b_lhat * b_w_l[None, :]
        if ACT:
            b_m = b_s * b_n_o + (1.0 - b_s) * b_n_l
            b_sig_m = tl.sigmoid(b_m)
            b_dm = b_dm * b_sig_m * (1.0 + b_m * (1.0 - b_sig_m))
        b_dn_o = b_dm * b_s
        b_dn_l = b_dm - b_dn_o
        b_dg = b_dm * (b_n_o - b_n_l) * b_s * (1.0 - b_s)
        b_dw_o += tl.sum(b_dn_o * b_ohat, axis=0)
        b_dw_l += tl.sum(b_dn_l * b_lhat, axis=0)
        b_do = _gated_norm_rms_bwd(b_dn_o, b_ohat, b_rstd_o, b_w_o, DV)
        b_dl = _gated_norm_rms_bwd(b_dn_l, b_lhat, b_rstd_l, b_w_l, DV)
        o_out = o_r[:, None] * DV + o_d[None, :]
        _store_tile(do_ptr + o_out, b_do, mask)
        _store_tile(dl_ptr + o_out, b_dl, mask)
        _store_tile(dg_ptr + o_out, b_dg, mask)
    tl.store(dw_o_ptr + i_p * DV + o_d, b_dw_o, mask=m_d)
    tl.store(dw_l_ptr + i_p * DV + o_d, b_dw_l, mask=m_d)


# ------------------------------------------------------------------------------- plain RMSNorm and LayerNorm
@triton.jit
def _row_tile(base, o_r, stride_r, o_d, mask):
    """``[BLOCK_R, BLOCK_D]`` fp32 tile of rows ``o_r`` (int64) of a ``(rows, C)`` unit-last-stride tensor."""
    return tl.load(base + o_r[:, None] * stride_r + o_d[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _row_norm_stats(b_x, mask, eps, DV: tl.constexpr, CENTER: tl.constexpr):
    """``x̂`` and ``rstd`` per row: of ``x`` (RMSNorm) or, with ``CENTER``, of ``x − mean(x)`` (LayerNorm); the
    centred padding lanes are zeroed so they add nothing to the statistics."""
    if CENTER:
        b_x = tl.where(mask, b_x - (tl.sum(b_x, axis=1) / DV)[:, None], 0.0)
    return _gated_norm_rms(b_x, eps, DV)


@triton.jit
def _row_norm_dx(b_dy, b_xhat, b_rstd, b_w, DV: tl.constexpr, CENTER: tl.constexpr):
    """``dx`` of ``y = x̂ ⊙ w (+ b)``; with ``CENTER`` the mean's gradient adds ``− rstd · mean(dx̂)``."""
    b_dx = _gated_norm_rms_bwd(b_dy, b_xhat, b_rstd, b_w, DV)
    if CENTER:
        b_dx -= (b_rstd * tl.sum(b_dy * b_w[None, :], axis=1) / DV)[:, None]
    return b_dx


@autotune(_FWD_CONFIGS, _DEFAULT, ["DV", "CENTER", "HAS_BIAS"], _prune_configs)
@triton.jit
def _row_norm_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    num_rows,
    stride_x_r,
    eps,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CENTER: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    o_d, m_d = _channels(DV, BLOCK_D)
    o_r, mask = _row_block(tl.program_id(0), num_rows, m_d, BLOCK_R)
    # [BLOCK_D]
    b_w = _channel_load(w_ptr, o_d, m_d)
    # [BLOCK_R, BLOCK_D]
    b_xhat, _ = _row_norm_stats(_row_tile(x_ptr, o_r, stride_x_r, o_d, mask), mask, eps, DV, CENTER)
    b_y = b_xhat * b_w[None, :]
    if HAS_BIAS:
        b_y += _channel_load(b_ptr, o_d, m_d)[None, :]
    _store_tile(y_ptr + o_r[:, None] * DV + o_d[None, :], b_y, mask)


@autotune(_BWD_CONFIGS, _DEFAULT, ["DV", "CENTER"], _prune_configs)
@triton.jit
def _row_norm_bwd_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    dx_ptr,
    dw_ptr,
    db_ptr,
    num_rows,
    stride_dy_r,
    stride_x_r,
    eps,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CENTER: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    i_p, n_p = tl.program_id(0), tl.num_programs(0)
    o_d, m_d = _channels(DV, BLOCK_D)
    # [BLOCK_D]
    b_w = _channel_load(w_ptr, o_d, m_d)
    b_dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    b_db = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i_blk in range(i_p, tl.cdiv(num_rows, BLOCK_R), n_p):
        o_r, mask = _row_block(i_blk, num_rows, m_d, BLOCK_R)
        # [BLOCK_R, BLOCK_D]
        b_dy = _row_tile(dy_ptr, o_r, stride_dy_r, o_d, mask)
        b_xhat, b_rstd = _row_norm_stats(_row_tile(x_ptr, o_r, stride_x_r, o_d, mask), mask, eps, DV, CENTER)
        b_dw += tl.sum(b_dy * b_xhat, axis=0)
        if CENTER:
            b_db += tl.sum(b_dy, axis=0)
        b_dx = _row_norm_dx(b_dy, b_xhat, b_rstd, b_w, DV, CENTER)
        _store_tile(dx_ptr + o_r[:, None] * DV + o_d[None, :], b_dx, mask)
    tl.store(dw_ptr + i_p * DV + o_d, b_dw, mask=m_d)
    if CENTER:
        tl.store(db_ptr + i_p * DV + o_d, b_db, mask=m_d)


# ------------------------------------------------------------------------------------------------------ launchers
def gated_norm_fwd(
    o: torch.Tensor,
    local: torch.Tensor,
    gate: torch.Tensor,
    weight_o: torch.Tensor,
    weight_local: torch.Tensor,
    eps: float,
    act: bool,
) -> torch.Tensor:
    """``y`` of the module docstring, contiguous ``(B, N, H, Dv)`` in the dtype of ``o``.

    Grid: one program per ``BLOCK_R`` rows of the ``B·N·H`` rows (raster order of the output).
    """
    o, local, gate, weight_o, weight_local = map(unit_last_stride, (o, local, gate, weight_o, weight_local))
    batch, tokens, heads, dv = o.shape
    y = torch.empty(o.shape, device=o.device, dtype=o.dtype)
    num_rows = batch * tokens * heads
    if y.numel() == 0:
        return y
    grid = lambda meta: (cdiv(num_rows, meta["BLOCK_R"]),)
    launch(
        _gated_norm_fwd_kernel,
        grid,
        o,
        local,
        gate,
        weight_o,
        weight_local,
        y,
        num_rows,
        tokens,
        heads,
        *leading_strides(o, local, gate),
        eps,
        DV=dv,
        BLOCK_D=next_block(dv),
        ACT=act,
    )
    return y


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _bwd_programs(device: torch.device, num_rows: int) -> int:
    """Backward grid size, independent of the tuned ``BLOCK_R`` so the partial-gradient buffer is fixed in advance."""
    if is_interpreter() or device.type != "cuda":
        cap = _INTERPRETER_BWD_PROGRAMS
    else:
        cap = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        cap *= _BWD_PROGRAMS_PER_SM
    return max(1, min(cap, cdiv(num_rows, 16)))


def gated_norm_bwd(
    dy: torch.Tensor,
    o: torch.Tensor,
    local: torch.Tensor,
    gate: torch.Tensor,
    weight_o: torch.Tensor,
    weight_local: torch.Tensor,
    eps: float,
    act: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``o``, ``local``, ``gate`` (contiguous, in their dtype) and of both weights (in theirs).

    Grid: a fixed number of programs, each looping over row blocks ``pid, pid + P, ...`` and storing its partial
    weight gradients (fp32, ``[P, Dv]``), summed here.
    """
    dy, o, local, gate, weight_o, weight_local = map(unit_last_stride, (dy, o, local, gate, weight_o, weight_local))
    batch, tokens, heads, dv = o.shape
    num_rows = batch * tokens * heads
    grads = [torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (o, local, gate)]
    programs = _bwd_programs(o.device, num_rows)
    partials = _partials(2, programs, dv, num_rows, o.device)
    if num_rows:
        launch(
            _gated_norm_bwd_kernel,
            (programs,),
            dy,
            o,
            local,
            gate,
            weight_o,
            weight_local,
            *grads,
            partials[0],
            partials[1],
            num_rows,
            tokens,
            heads,
            *leading_strides(dy, o, local, gate),
            eps,
            DV=dv,
            BLOCK_D=next_block(dv),
            ACT=act,
        )
    # one sum per weight: each gradient gets its own storage (op outputs must not alias one another)
    dw_o, dw_l = (p.sum(0).to(w.dtype) for p, w in zip(partials, (weight_o, weight_local)))
    return (*grads, dw_o, dw_l)


def _partials(count: int, programs: int, dim: int, num_rows: int, device: torch.device) -> torch.Tensor:
    """``[count, programs, dim]`` fp32 partial weight gradients: each program stores its row, so zeros are needed
    only where no program runs."""
    return (torch.empty if num_rows else torch.zeros)(count, programs, dim, device=device, dtype=torch.float32)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``(..., C)`` as ``(rows, C)`` with a unit last stride (a view where the layout allows)."""
    return unit_last_stride(x.reshape(-1, x.shape[-1]))


def _row_norm_fwd(x, weight, bias, eps: float, center: bool) -> torch.Tensor:
    """``y`` of RMSNorm or (``center``) LayerNorm over the last dim, contiguous, in the dtype of ``x``.

    Grid: one program per ``BLOCK_R`` rows.
    """
    rows, weight = _rows(x), unit_last_stride(weight)
    bias = weight if bias is None else unit_last_stride(bias)  # a pointer the kernel never reads without HAS_BIAS
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    num_rows, dim = rows.shape
    if y.numel():
        grid = lambda meta: (cdiv(num_rows, meta["BLOCK_R"]),)
        launch(
            _row_norm_fwd_kernel,
            grid,
            rows,
            weight,
            bias,
            y,
            num_rows,
            rows.stride(0),
            eps,
            DV=dim,
            BLOCK_D=next_block(dim),
            CENTER=center,
            HAS_BIAS=bias is not weight,
        )
    return y


def _row_norm_bwd(dy, x, weight, eps: float, center: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of ``x`` (contiguous, its dtype), ``weight`` and, with ``center``, the bias ``Σ_rows dy`` (the
    weight's dtype; None without ``center``); grid and partials as ``gated_norm_bwd``."""
    dy_rows, rows, weight = _rows(dy), _rows(x), unit_last_stride(weight)
    num_rows, dim = rows.shape
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    programs = _bwd_programs(x.device, num_rows)
    partials = _partials(2 if center else 1, programs, dim, num_rows, x.device)
    if num_rows:
        launch(
            _row_norm_bwd_kernel,
            (programs,),
            dy_rows,
            rows,
            weight,
            dx,
            partials[0],
            partials[-1],  # written only with CENTER
            num_rows,
            dy_rows.stride(0),
            rows.stride(0),
            eps,
            DV=dim,
            BLOCK_D=next_block(dim),
            CENTER=center,
        )
    dw, *db = (p.sum(0).to(weight.dtype) for p in partials)
    return dx, dw, db[0] if center else None


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``RMSNorm(x; w)`` over the last dim, contiguous, in the dtype of ``x``."""
    return _row_norm_fwd(x, weight, None, eps, False)


def rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``x`` (contiguous, its dtype) and ``weight`` (its dtype)."""
    dx, dw, _ = _row_norm_bwd(dy, x, weight, eps, False)
    return dx, dw


def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``LayerNorm(x; w, b)`` over the last dim (no bias when ``bias`` is None), contiguous, in the dtype of ``x``."""
    return _row_norm_fwd(x, weight, bias, eps, True)


def layer_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``x`` (contiguous, its dtype), ``weight`` and the bias (the weight's dtype; ``Σ_rows dy``, which
    needs no bias, so it is returned whether or not the forward had one)."""
    return _row_norm_bwd(dy, x, weight, eps, True)
