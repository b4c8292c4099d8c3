"""Non-causal linear attention, pass 1b: the fixed-order merge of the key reduction's per-chunk partials.

``_linear_fwd_kernel_state`` (``linear.py``) writes fp32 partials per (chunk, batch·head): ``kv (D, Dv)``,
``ks (D)``, ``vs (Dv)`` and, for RALA, the chunk's score max and sum ``(m_c, l_c)``. The merge (grid
``(B·H, cdiv(D·Dv, BLOCK_K))``) rescales chunk ``c`` by ``exp(m_c − max m)`` (RALA; 1 otherwise) and sums over
chunks, ``BLOCK_C`` chunks per load so that a program waits on a few dependent loads rather than one per chunk,
then divides by ``L = Σ_c exp(m_c − max m)·l_c`` (RALA) or ``N``: ``S̄, z̄``; ``v̄ = Σ vs / N``; ``lse = log L``.
Summation order is fixed by the tile shapes (no atomics): results are bitwise reproducible. ``merged_state`` is the
same merge for one (batch, head) inside another kernel: the forward apply kernel folds it in when the chunks are few
(``linear.py``), so that the merge needs no launch of its own.
"""

import torch
import triton
import triton.language as tl

from ._constants import NEG_INF
from ._launch import launch
from .block_sparse import cdiv, next_block

__all__ = ["merge_state_partials", "merged_state"]

_NEG_INF = tl.constexpr(NEG_INF)
#: Chunks per load and flattened state elements per program.
_MERGE_CHUNKS, _MERGE_SLICE = 16, 256


@triton.jit
def _merge_chunks(part_ptr, ml_part_ptr, o_k, m_k, row_len, i_bh, BH, num_chunks, b_max, SCALED, BLOCK_C):
    """``Σ_c coef_c · part[c, i_bh, o_k]`` with ``coef_c = exp(m_c − b_max)`` when SCALED, else 1."""
    b_acc = tl.zeros(o_k.shape, dtype=tl.float32)
    for c0 in range(0, num_chunks, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        m_c = o_c < num_chunks
        i_part = o_c * BH + i_bh
        b_coef = tl.where(m_c, 1.0, 0.0)
        if SCALED:
            b_coef = tl.where(m_c, tl.exp(tl.load(ml_part_ptr + i_part * 2, mask=m_c, other=0.0) - b_max), 0.0)
        b_x = tl.load(part_ptr + i_part[:, None] * row_len + o_k[None, :], mask=m_c[:, None] & m_k[None, :], other=0.0)
        b_acc += tl.sum(b_coef[:, None] * b_x, axis=0)
    return b_acc


@triton.jit
def _merge_norm(ml_part_ptr, i_bh, BH, N, num_chunks, RALA: tl.constexpr, BLOCK_C: tl.constexpr):
    """``(max_c m_c, L)``: the chunks' common score offset and the weight mass the state is divided by,
    ``L = Σ_c exp(m_c − max m)·l_c`` (RALA) or ``N``."""
    o_c = tl.arange(0, BLOCK_C)
    b_max = tl.max(tl.full([BLOCK_C], _NEG_INF, tl.float32), axis=0)
    if RALA:
        for c0 in range(0, num_chunks, BLOCK_C):
            p_m = ml_part_ptr + ((c0 + o_c) * BH + i_bh) * 2
            b_max = tl.maximum(b_max, tl.max(tl.load(p_m, mask=c0 + o_c < num_chunks, other=_NEG_INF), axis=0))
        b_norm = b_max * 0.0
        for c0 in range(0, num_chunks, BLOCK_C):
            m_c = c0 + o_c < num_chunks
            p_m = ml_part_ptr + ((c0 + o_c) * BH + i_bh) * 2
            b_m = tl.load(p_m, mask=m_c, other=_NEG_INF)
            b_norm += tl.sum(tl.where(m_c, tl.exp(b_m - b_max) * tl.load(p_m + 1, mask=m_c, other=0.0), 0.0), axis=0)
    else:
        b_norm = b_max * 0.0 + N
    return b_max, b_norm


@triton.jit
def _merge_vectors(
    ks_part_ptr, vs_part_ptr, ml_part_ptr, i_bh, BH, N, num_chunks, b_max, b_norm, D, DV, BLOCK_D, BLOCK_DV, RALA,
    BLOCK_C,
):  # fmt: skip
    """``z̄ [BLOCK_D]`` and ``v̄ [BLOCK_DV]`` of one (batch, head); zero on padded columns."""
    o_d = tl.arange(0, BLOCK_D)
    o_e = tl.arange(0, BLOCK_DV)
    b_ks = _merge_chunks(ks_part_ptr, ml_part_ptr, o_d, o_d < D, D, i_bh, BH, num_chunks, b_max, RALA, BLOCK_C)
    b_vs = _merge_chunks(vs_part_ptr, ml_part_ptr, o_e, o_e < DV, DV, i_bh, BH, num_chunks, b_max, False, BLOCK_C)
    return b_ks / b_norm, b_vs / N


@triton.jit
def merged_state(
    kv_part_ptr, ks_part_ptr, vs_part_ptr, ml_part_ptr, i_bh, BH, N, num_chunks, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, RALA: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """One (batch, head)'s ``S̄ [BLOCK_D, BLOCK_DV], z̄ [BLOCK_D], v̄ [BLOCK_DV]`` from the partials, by the merge
    kernel's rule (zero on padded rows and columns): for a kernel that reads the partials instead of a merged state.
    ``BLOCK_C`` chunks per load; the grouping of the fp32 sums, hence their last bit, follows it."""
    b_max, b_norm = _merge_norm(ml_part_ptr, i_bh, BH, N, num_chunks, RALA, BLOCK_C)
    # the flattened (D, Dv) layout of the partials, tile element (r, e) at r·Dv + e
    o_k = tl.arange(0, BLOCK_D * BLOCK_DV)
    o_r, o_e = o_k // BLOCK_DV, o_k % BLOCK_DV
    m_k = (o_r < D) & (o_e < DV)
    o_k = o_r * DV + o_e
    b_kv = _merge_chunks(kv_part_ptr, ml_part_ptr, o_k, m_k, D * DV, i_bh, BH, num_chunks, b_max, RALA, BLOCK_C)
    b_ks, b_vm = _merge_vectors(
        ks_part_ptr, vs_part_ptr, ml_part_ptr, i_bh, BH, N, num_chunks, b_max, b_norm, D, DV, BLOCK_D, BLOCK_DV, RALA,
        BLOCK_C,
    )  # fmt: skip
    return tl.reshape(b_kv / b_norm, [BLOCK_D, BLOCK_DV]), b_ks, b_vm


@triton.jit
def _linear_fwd_kernel_state_merge(
    kv_part_ptr,
    ks_part_ptr,
    vs_part_ptr,
    ml_part_ptr,
    kv_ptr,
    ks_ptr,
    vm_ptr,
    lse_ptr,
    BH,
    N,
    num_chunks,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    RALA: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # program (i_bh, i_k) merges elements [i_k·BLOCK_K, (i_k+1)·BLOCK_K) of the flattened state; i_k = 0 also z̄, v̄, lse
    i_bh, i_k = tl.program_id(0), tl.program_id(1)
    b_max, b_norm = _merge_norm(ml_part_ptr, i_bh, BH, N, num_chunks, RALA, BLOCK_C)
    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_k = o_k < D * DV
    b_kv = _merge_chunks(kv_part_ptr, ml_part_ptr, o_k, m_k, D * DV, i_bh, BH, num_chunks, b_max, RALA, BLOCK_C)
    tl.store(kv_ptr + i_bh * D * DV + o_k, b_kv / b_norm, mask=m_k)
    if i_k == 0:
        o_d = tl.arange(0, BLOCK_D)
        o_e = tl.arange(0, BLOCK_DV)
        b_ks, b_vm = _merge_vectors(
            ks_part_ptr, vs_part_ptr, ml_part_ptr, i_bh, BH, N, num_chunks, b_max, b_norm, D, DV, BLOCK_D, BLOCK_DV,
            RALA, BLOCK_C,
        )  # fmt: skip
        tl.store(ks_ptr + i_bh * D + o_d, b_ks, mask=o_d < D)
        tl.store(vm_ptr + i_bh * DV + o_e, b_vm, mask=o_e < DV)
        b_lse = tl.log(b_norm)
        if RALA:
            b_lse += b_max
        tl.store(lse_ptr + i_bh, b_lse)


def merge_state_partials(
    kv_part: torch.Tensor, ks_part: torch.Tensor, vs_part: torch.Tensor, ml_part: torch.Tensor, n: int, rala: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partials ``(chunks, B·H, D, Dv)``, ``(chunks, B·H, D)``, ``(chunks, B·H, Dv)``, ``(chunks, B·H, 2)`` (fp32,
    contiguous) to ``(S̄ (B·H, D, Dv), z̄ (B·H, D), v̄ (B·H, Dv), lse (B·H,))``, fp32; ``n`` is the key count."""
    chunks, bh, d, dv = kv_part.shape
    f32 = dict(device=kv_part.device, dtype=torch.float32)
    kv, ks, vm, lse = (torch.empty(bh, *shape, **f32) for shape in ((d, dv), (d,), (dv,), ()))
    block_k = min(_MERGE_SLICE, next_block(d * dv))
    launch(
        _linear_fwd_kernel_state_merge,
        (bh, cdiv(d * dv, block_k)),
        kv_part, ks_part, vs_part, ml_part, kv, ks, vm, lse, bh, n, chunks,
        D=d, DV=dv, BLOCK_D=next_block(d), BLOCK_DV=next_block(dv), RALA=rala, BLOCK_C=_MERGE_CHUNKS, BLOCK_K=block_k,
    )  # fmt: skip
    return kv, ks, vm, lse
