"""The exact token predicates of partial blocks, as the attention kernels evaluate them in-kernel.

A ``BlockMask`` whose ``token_mask`` is a ``NeighborhoodWindow`` or ``CircularWindow`` marks the blocks where only
some (query, key) pairs are allowed; the kernels test those pairs from per-position tables of the predicate
(``visionattn.layout.predicates``), never from an N x N tensor: a neighborhood as one packed word per position
(``PackedWindowTables``, four integer instructions per score) where its axes fit 32 bits, else, like a circular
window, one axis at a time (``KernelTables``). ``MASK_KIND`` (``pack_mask_kind``) tells the kernels which.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..layout.predicates import KEY_GLOBAL, KEY_VALID
from ._config import is_interpreter

__all__ = [
    "MASK_CIRCULAR",
    "MASK_NEIGHBORHOOD",
    "MASK_NONE",
    "MASK_PACKED_NEIGHBORHOOD",
    "pack_mask_kind",
    "predicate_args",
]

#: ``MASK_KIND`` values: no token predicate, ``NeighborhoodWindow`` from ``KernelTables`` or from
#: ``PackedWindowTables``, ``CircularWindow``.
MASK_NONE, MASK_NEIGHBORHOOD, MASK_CIRCULAR, MASK_PACKED_NEIGHBORHOOD = 0, 1, 2, 3


def pack_mask_kind(kind: int, grid) -> int:
    """The ``MASK_KIND`` constexpr of a predicate on ``grid`` (a ``TokenGrid``), so the kernels compile only the
    tests it needs: ``kind | 4 * axes`` with ``axes`` bit 0/1/2 for X/Y/T (axes of size 1, including the front
    padding of 1D/2D grids to 3 axes, admit every pair and are left out); packed, ``kind | 4 * has_global_keys``
    (the packed word tests every axis at once)."""
    if kind == MASK_NONE:
        return MASK_NONE
    if kind == MASK_PACKED_NEIGHBORHOOD:
        return kind + 4 * int(grid.extra_before + grid.extra_after > 0)
    shape = (1,) * (3 - grid.ndim) + tuple(grid.shape)
    axes = sum(bit for bit, size in zip((4, 2, 1), shape) if size > 1)
    return kind + 4 * axes


#: Score of a masked (query, key) pair: exp2(-inf - m) = 0 for any finite running max m.
_MASKED = tl.constexpr(float("-inf"))
_NEIGHBORHOOD = tl.constexpr(MASK_NEIGHBORHOOD)
_PACKED = tl.constexpr(MASK_PACKED_NEIGHBORHOOD)
_KEY_VALID = tl.constexpr(KEY_VALID)
_KEY_GLOBAL = tl.constexpr(KEY_GLOBAL)


class _Predicate(NamedTuple):
    """The token predicate: the query- and key-side ``KernelTables`` rows (``tab_len`` positions each), a circular
    window's squared radius, and the packed ``MASK_KIND`` (``MASK_NONE``: nothing is read)."""

    qtab_ptr: tl.tensor
    ktab_ptr: tl.tensor
    tab_len: tl.tensor
    radius2: tl.tensor
    MASK_KIND: tl.constexpr


def predicate_args(
    query_table: torch.Tensor | None, key_table: torch.Tensor | None, stand_in: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(qtab_ptr, ktab_ptr, tab_len)`` kernel arguments of a predicate's ``KernelTables``; without a predicate
    (``MASK_NONE``, never read) the device tensor ``stand_in`` takes both table pointers."""
    if query_table is None or key_table is None:
        return stand_in, stand_in, 1
    return query_table, key_table, query_table.shape[1]


# ---------------------------------------------------------------------------------------------- predicate helpers
@triton.jit
def _bsa_axis(q_pos, k_pos, pred, AXIS: tl.constexpr):
    """Grid axis ``AXIS`` (0/1/2 = T/Y/X) of the predicate from the ``KernelTables`` rows: neighborhood, whether
    ``0 <= code - lo <= span`` (one unsigned compare); circular, the squared distance (fp32: padding codes are
    ``2^30``)."""
    lo = tl.load(pred.qtab_ptr + AXIS * pred.tab_len + q_pos)
    code = tl.load(pred.ktab_ptr + AXIS * pred.tab_len + k_pos)
    if pred.MASK_KIND % 4 == _NEIGHBORHOOD:
        span = tl.load(pred.qtab_ptr + (3 + AXIS) * pred.tab_len + q_pos)
        out = (code - lo).to(tl.uint32, bitcast=True) <= span.to(tl.uint32, bitcast=True)
    else:
        d = (code - lo).to(tl.float32)
        out = d * d
    return out


#: The packed-window rule in PTX, one block per score: ``$0 = $1`` (the score) if ``(($2 - $3) & ($4 - $2) & $5) ==
#: $5`` (key, lo, hi2, G), else -inf; the second form also admits ``$6 != 0`` (a global key).
_PACKED_WINDOW_PTX = (
    "{ .reg .b32 u, v; .reg .pred p; sub.s32 u, $2, $3; sub.s32 v, $4, $2; and.b32 u, u, v; and.b32 u, u, $5; "
    "setp.eq.b32 p, u, $5; %s selp.f32 $0, $1, 0fFF800000, p; }"
)
_PACKED_WINDOW_ASM = tl.constexpr(_PACKED_WINDOW_PTX % "")
_PACKED_WINDOW_OR_GLOBAL_ASM = tl.constexpr(_PACKED_WINDOW_PTX % "setp.ne.or.b32 p, $6, 0, p;")
#: Whether kernels may use inline PTX (the interpreter cannot run it).
_PTX = tl.constexpr(not is_interpreter())


@triton.jit
def _bsa_packed_window_scores(b_s, q_pos, k_pos, pred):
    """Scores ``b_s`` with the pairs outside a neighborhood from ``PackedWindowTables`` set to -inf: every axis in
    one word, ``((key - lo) & (hi2 - key) & G) == G``, or a global key (``MASK_KIND`` bit 2: the grid has global
    tokens). On the GPU the rule is inline PTX: written in Triton, LLVM vectorises the compare into ``<64 x i1>``
    masks and packs them into 16-bit words, 8 instructions per score where the rule needs 5 (sm_90 SASS)."""
    lo = tl.load(pred.qtab_ptr + q_pos)
    hi2 = tl.load(pred.qtab_ptr + pred.tab_len + q_pos)
    guard = tl.load(pred.qtab_ptr + 2 * pred.tab_len)
    key = tl.load(pred.ktab_ptr + k_pos)
    if pred.MASK_KIND // 4 == 1:
        key_global = tl.load(pred.ktab_ptr + pred.tab_len + k_pos) & _KEY_GLOBAL
        if _PTX:
            out = tl.inline_asm_elementwise(
                _PACKED_WINDOW_OR_GLOBAL_ASM,
                "=f,f,r,r,r,r,r",
                [b_s, key, lo, hi2, guard, key_global],
                dtype=tl.float32,
                is_pure=True,
                pack=1,
            )
        else:
            ok = (((key - lo) & (hi2 - key) & guard) == guard) | (key_global != 0)
            out = tl.where(ok, b_s, _MASKED)
    else:
        if _PTX:
            out = tl.inline_asm_elementwise(
                _PACKED_WINDOW_ASM, "=f,f,r,r,r,r", [b_s, key, lo, hi2, guard], dtype=tl.float32, is_pure=True, pack=1
            )
        else:
            out = tl.where(((key - lo) & (hi2 - key) & guard) == guard, b_s, _MASKED)
    return out


@triton.jit
def _bsa_allowed(q_pos, k_pos, pred):
    """A neighborhood or circular window from ``KernelTables`` on a score tile, one axis at a time (``MASK_KIND``
    bits 3/4: the Y/T axes exist), for query positions ``q_pos`` and key positions ``k_pos`` (a ``[n, 1]`` and a
    ``[1, n]`` tensor, either way round)."""
    local = _bsa_axis(q_pos, k_pos, pred, 2)
    if pred.MASK_KIND % 4 == _NEIGHBORHOOD:
        if (pred.MASK_KIND // 8) % 2 == 1:
            local = local & _bsa_axis(q_pos, k_pos, pred, 1)
        if (pred.MASK_KIND // 16) % 2 == 1:
            local = local & _bsa_axis(q_pos, k_pos, pred, 0)
    else:
        if (pred.MASK_KIND // 8) % 2 == 1:
            local = local + _bsa_axis(q_pos, k_pos, pred, 1)
        if (pred.MASK_KIND // 16) % 2 == 1:
            local = local + _bsa_axis(q_pos, k_pos, pred, 0)
    key_flags = tl.load(pred.ktab_ptr + 3 * pred.tab_len + k_pos)
    key_global = (key_flags & _KEY_GLOBAL) != 0
    if pred.MASK_KIND % 4 == _NEIGHBORHOOD:
        out = local | key_global
    else:
        query_global = tl.load(pred.qtab_ptr + 6 * pred.tab_len + q_pos) != 0
        out = ((key_flags & _KEY_VALID) != 0) & (query_global | key_global | (local < pred.radius2))
    return out
