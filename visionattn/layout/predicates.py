"""Exact token-level attention predicates on grid coordinates, shared by mask builders, references and kernels.

Each predicate is a frozen dataclass called as ``pred(q_idx, kv_idx) -> bool`` on broadcastable int64 positions
of its ``TokenLayout``. Global (extra) tokens attend to everything and are attended by everything; padding slots
are never attended. The Triton kernels evaluate the same rules on partial blocks from ``KernelTables``, per-position
halves of the rule built here (``kernel_tables``), so the rule is defined once, here.
"""

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .grid import TokenLayout

__all__ = ["CircularWindow", "KernelTables", "NeighborhoodWindow", "PackedWindowTables"]


def _neighborhood_bounds(
    q: torch.Tensor, length: int, kernel_size: int, stride: int, dilation: int, causal: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NATTEN/GNA window of queries ``q`` along one axis (NATTEN's ``get_na_flex_mask``): ``(group, lo, hi)``.

    With dilation ``d`` the axis splits into ``d`` interleaved groups (``q % d``) of length ``ceil((length - g) / d)``;
    a key ``k`` is in the window iff ``k % d == group`` and ``lo <= k // d <= hi``. Inside a group, a stride group of
    queries shares its leader's window, which is shifted inward at the borders so it always holds ``kernel_size``
    keys (causal: keys ``<= q`` within ``kernel_size`` of the leader, the last query of the stride group).
    """
    group = q % dilation
    qg = q // dilation
    group_len = (length - group + dilation - 1) // dilation
    left = kernel_size // 2
    right = kernel_size // 2 + (kernel_size % 2) - 1
    if causal:
        leader = torch.minimum((qg // stride) * stride + stride - 1, group_len - 1)
        return group, leader - kernel_size + 1, qg
    leader = torch.minimum((qg // stride) * stride + stride // 2, group_len - 1)
    center = torch.maximum(torch.minimum(leader, group_len - 1 - right), torch.full_like(leader, left))
    return group, center - left, center + right


def _neighborhood_axis(
    q: torch.Tensor,
    k: torch.Tensor,
    length: int,
    kernel_size: int,
    stride: int,
    dilation: int,
    causal: bool,
) -> torch.Tensor:
    """Whether key ``k`` is in query ``q``'s window along one axis (``_neighborhood_bounds``)."""
    group, lo, hi = _neighborhood_bounds(q, length, kernel_size, stride, dilation, causal)
    kg = k // dilation
    return (k % dilation == group) & (kg >= lo) & (kg <= hi)


@dataclass(frozen=True)
class _PositionTables:
    """Per-position lookups of a layout, ``(N,)`` each, on one device.

    ``is_global``: the slot belongs to an extra-token segment; ``key_ok``: the slot holds a real token;
    ``coords``: one grid coordinate tensor per axis (meaningless for global slots).
    """

    is_global: torch.Tensor
    key_ok: torch.Tensor
    coords: tuple[torch.Tensor, ...]


@functools.lru_cache(maxsize=64)
def _position_tables(layout: TokenLayout, device: torch.device) -> _PositionTables:
    idx = torch.arange(layout.num_tokens)
    kind, coords, valid = layout.token_coords(idx)
    return _PositionTables(
        is_global=(kind != 1).to(device),
        key_ok=valid.to(device),
        coords=tuple(coords[:, axis].contiguous().to(device) for axis in range(layout.grid.ndim)),
    )


#: ``KernelTables`` encoding: a global query's window spans every grid code; a padding or global key's code lies
#: beyond every window, including that span (global keys are admitted by their flag instead).
GLOBAL_SPAN = 1 << 29
NO_KEY_CODE = 1 << 30
#: ``KernelTables.key`` flag bits.
KEY_VALID, KEY_GLOBAL = 1, 2


class KernelTables(NamedTuple):
    """Per-position halves of a grid predicate, as the Triton kernels evaluate it on partial blocks.

    ``query`` ``(7, N)`` int32: window start ``lo`` per axis (T, Y, X), window width ``span`` per axis, and
    ``is_global``; ``key`` ``(4, N)`` int32: ``code`` per axis and flags (``KEY_VALID``, ``KEY_GLOBAL``). Axes
    are the grid's, padded in front with size-1 axes. A neighborhood admits key ``j`` for query ``i`` iff ``j`` is
    global or ``0 <= code_j - lo_i <= span_i`` on every axis (one unsigned compare per axis; the dilation group
    is folded into the codes); a circular window iff ``j`` is valid and ``i`` or ``j`` is global or
    ``sum (code_j - lo_i)^2 < r^2``.
    """

    query: torch.Tensor
    key: torch.Tensor


class PackedWindowTables(NamedTuple):
    """A neighborhood's ``KernelTables`` with its grid axes packed into one int32 word per position (SWAR), as the
    kernels evaluate a neighborhood when every axis fits (``NeighborhoodWindow.packed_kernel_tables``).

    Axis ``a`` is a field of ``w_a`` bits with a guard bit above it; ``G`` has the guard bits set. ``query``
    ``(3, N)`` int32: ``lo`` word, ``hi`` word + 2G (mod 2^32), and ``G`` in every entry; ``key`` ``(2, N)`` int32:
    ``code`` word + G, and the ``KEY_*`` flags. Key ``j`` is in query ``i``'s window iff

        ((key_j - lo_i) & (hi2_i - key_j) & G) == G      (or key ``j`` is global)

    because field ``a`` of the first difference is ``2^w_a + code_a - lo_a`` (guard set iff ``code_a >= lo_a``) and
    of the second ``2^w_a + hi_a - code_a`` (guard set iff ``code_a <= hi_a``), neither borrowing from the next
    field. Four integer instructions per score for any number of axes, against three per axis unpacked. Padding and
    global keys carry the all-ones code ``2^w_a - 1``, above every window end; a global query's window is
    ``[0, 2^w_a - 2]``, every valid code.
    """

    query: torch.Tensor
    key: torch.Tensor


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in ``[0, 2^32)`` as int32 with the same bits."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


class _GridPredicate:
    """Shared evaluation of grid predicates: global tokens attend/are attended by all, padding never attended."""

    layout: TokenLayout

    def __call__(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        q_idx, kv_idx = torch.broadcast_tensors(q_idx, kv_idx)
        n = self.layout.num_tokens
        tables = _position_tables(self.layout, q_idx.device)
        inside = (kv_idx >= 0) & (kv_idx < n)
        return inside & self.evaluate(tables, q_idx.clamp(0, n - 1), kv_idx.clamp(0, n - 1))

    def evaluate(self, tables: _PositionTables, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        """The predicate on in-range positions from precomputed ``tables``: indexing and pointwise ops only, so it
        also serves as a FlexAttention ``mask_mod`` body (``layout.flex``)."""
        allowed = self._grid_rule([c[q_idx] for c in tables.coords], [c[kv_idx] for c in tables.coords])
        return tables.key_ok[kv_idx] & (tables.is_global[q_idx] | tables.is_global[kv_idx] | allowed)

    def _grid_rule(self, q_coords: list[torch.Tensor], k_coords: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def kernel_tables(self, device) -> KernelTables:
        """The ``KernelTables`` of this predicate on ``device`` (a few elementwise ops over the layout's positions)."""
        kind, coords, valid = self.layout.token_coords(torch.arange(self.layout.num_tokens, device=device))
        is_global, ndim = kind != 1, self.layout.grid.ndim
        lo, span, code = [], [], []
        for axis in range(-3, 0):  # grid axes padded in front to (T, Y, X); padding axes are all-zero codes
            c = coords[:, ndim + axis] if ndim + axis >= 0 else torch.zeros_like(kind)
            axis_lo, axis_span, axis_code = self._axis_tables(ndim + axis, c)
            lo.append(torch.where(is_global, 0, axis_lo))
            span.append(torch.where(is_global, GLOBAL_SPAN, axis_span))
            code.append(torch.where(valid & ~is_global, axis_code, NO_KEY_CODE))
        flags = valid.int() * KEY_VALID + (valid & is_global).int() * KEY_GLOBAL
        query = torch.stack([*lo, *span, is_global.int()]).to(torch.int32)
        return KernelTables(query=query, key=torch.stack([*code, flags]).to(torch.int32))

    def _axis_tables(self, axis: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(lo, span, code)`` of grid coordinates ``c`` on grid axis ``axis`` (negative: a padding axis)."""
        zero = torch.zeros_like(c)
        return (zero, zero, zero) if axis < 0 else (c, zero, c)


@dataclass(frozen=True)
class NeighborhoodWindow(_GridPredicate):
    """Neighborhood attention (NATTEN/GNA semantics) on ``layout``'s grid, per-axis canonical tuples.

    Args:
        layout: token layout the positions refer to.
        kernel_size: window size per axis (``kernel_size * dilation <= grid size``).
        stride: queries per stride group per axis (``1 <= stride <= kernel_size``).
        dilation: dilation per axis.
        causal: causal flag per axis.
    """

    layout: TokenLayout
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    causal: tuple[bool, ...]

    def packed_kernel_tables(self, device) -> PackedWindowTables | None:
        """The ``PackedWindowTables`` of this window on ``device``, or None when its fields need more than 32 bits
        (``w_a + 1`` bits per grid axis, ``w_a`` from ``_code_bound``; no host sync)."""
        widths = [self._code_bound(axis).bit_length() for axis in range(self.layout.grid.ndim)]
        if sum(w + 1 for w in widths) > 32:
            return None
        tables = self.kernel_tables(device)
        query, key = tables.query.long(), tables.key.long()
        lo_word, hi_word, key_word, guard, offset = 0, 0, 0, 0, 0
        for axis, width in zip(range(3 - len(widths), 3), widths):
            top = (1 << width) - 1  # the no-key code, above every window end
            # windows are never empty: 0 <= hi, and a causal lo < 0 admits what lo = 0 admits
            lo_word = lo_word + (query[axis].clamp(min=0) << offset)
            hi_word = hi_word + ((query[axis] + query[3 + axis]).clamp(max=top - 1) << offset)
            key_word = key_word + ((key[axis].clamp(max=top) + (1 << width)) << offset)
            guard += 1 << (offset + width)
            offset += width + 1
        words = [lo_word, (hi_word + 2 * guard) % (1 << 32), torch.full_like(lo_word, guard)]
        return PackedWindowTables(
            query=_to_int32(torch.stack(words)), key=torch.stack([_to_int32(key_word), key[3].int()])
        )

    def _code_bound(self, axis: int) -> int:
        """A bound ``B`` with every key code and window end of ``axis`` in ``[0, B)`` (``_axis_tables``: a code is
        ``group * (length + kernel + 1) + c // dilation`` with ``group < dilation``)."""
        length, kernel, dilation = self.layout.grid.shape[axis], self.kernel_size[axis], self.dilation[axis]
        return dilation * (length + kernel + 1)

    def _grid_rule(self, q_coords: list[torch.Tensor], k_coords: list[torch.Tensor]) -> torch.Tensor:
        allowed = None
        for axis, length in enumerate(self.layout.grid.shape):
            axis_allowed = _neighborhood_axis(
                q_coords[axis],
                k_coords[axis],
                length,
                self.kernel_size[axis],
                self.stride[axis],
                self.dilation[axis],
                self.causal[axis],
            )
            allowed = axis_allowed if allowed is None else allowed & axis_allowed
        return allowed

    def _axis_tables(self, axis: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Window ``[lo, lo + span]`` and key code ``group * G + c // dilation`` with ``G = length + kernel + 1``,
        so keys of another dilation group fall outside every window of the group (``lo >= -kernel``)."""
        if axis < 0:
            return super()._axis_tables(axis, c)
        length, kernel, dilation = self.layout.grid.shape[axis], self.kernel_size[axis], self.dilation[axis]
        group, lo, hi = _neighborhood_bounds(c, length, kernel, self.stride[axis], dilation, self.causal[axis])
        stride = length + kernel + 1
        return group * stride + lo, hi - lo, (c % dilation) * stride + c // dilation


@dataclass(frozen=True)
class CircularWindow(_GridPredicate):
    """CLEAR's circular window: image query attends image key iff ``sum_axis (q - k)^2 < radius^2`` (strict).

    Args:
        layout: token layout the positions refer to.
        radius: window radius ``r`` in grid units (CLEAR releases r in {8, 16, 32}).
    """

    layout: TokenLayout
    radius: float

    def _grid_rule(self, q_coords: list[torch.Tensor], k_coords: list[torch.Tensor]) -> torch.Tensor:
        dist2 = sum((q - k) ** 2 for q, k in zip(q_coords, k_coords))
        return dist2 < self.radius**2
