"""``KernelTables``: the per-position encoding the Triton kernels evaluate on partial blocks must reproduce the
predicate exactly, for every (query, key) pair of small layouts (decoded here as its docstring states the rule)."""

import pytest
import torch

from tests.layout.test_circular import CASES as CIRCULAR_CASES
from tests.layout.test_neighborhood import CASES as NEIGHBORHOOD_CASES
from visionattn.layout import TokenGrid, TokenLayout
from visionattn.layout.neighborhood import _check_neighborhood_args
from visionattn.layout.predicates import KEY_GLOBAL, KEY_VALID, CircularWindow, NeighborhoodWindow, PackedWindowTables


def _decode(tables, radius2: float | None) -> torch.Tensor:
    """``(N, N)`` allowed pairs from the tables: the rule of ``KernelTables`` written with int64/float64 math."""
    query, key = tables.query.long(), tables.key.long()
    lo, span, q_global = query[:3, :, None], query[3:6, :, None], query[6][:, None] != 0
    code, flags = key[:3, None, :], key[3][None, :]
    k_valid, k_global = (flags & KEY_VALID) != 0, (flags & KEY_GLOBAL) != 0
    diff = code - lo
    if radius2 is None:
        return ((diff >= 0) & (diff <= span)).all(0) | k_global
    return k_valid & (q_global | k_global | ((diff.double() ** 2).sum(0) < radius2))


def _valid_keys(layout: TokenLayout) -> torch.Tensor:
    return layout.token_coords(torch.arange(layout.num_tokens))[2]


def _assert_decodes_to_predicate(pred, allowed: torch.Tensor) -> None:
    """``allowed`` ``(N, N)``, decoded from tables, is ``pred`` on every real query row (padding rows are never
    stored) and every key."""
    idx = torch.arange(pred.layout.num_tokens)
    rows = _valid_keys(pred.layout)
    assert torch.equal(allowed[rows], pred(idx[:, None], idx[None, :])[rows])


def _assert_tables_match(pred, radius2):
    tables = pred.kernel_tables("cpu")
    n = pred.layout.num_tokens
    assert tables.query.shape == (7, n) and tables.key.shape == (4, n)
    assert tables.query.dtype == tables.key.dtype == torch.int32
    _assert_decodes_to_predicate(pred, _decode(tables, radius2))


def _decode_packed(tables: PackedWindowTables) -> torch.Tensor:
    """``(N, N)`` allowed pairs from packed tables: the rule of ``PackedWindowTables`` in int64 math mod 2^32."""
    word = lambda x: x.long() & 0xFFFFFFFF
    lo, hi2, guard = word(tables.query[0])[:, None], word(tables.query[1])[:, None], word(tables.query[2])[:, None]
    key, flags = word(tables.key[0])[None, :], tables.key[1][None, :]
    inside = (((key - lo) & (hi2 - key) & 0xFFFFFFFF) & guard) == guard
    return inside | ((flags & KEY_GLOBAL) != 0)


@pytest.mark.parametrize("packed", [False, True], ids=["per-axis", "packed"])
@pytest.mark.parametrize(
    "shape,before,after,tile,block,kernel,stride,dilation,causal",
    NEIGHBORHOOD_CASES,
    ids=[f"grid{c[0]}-tile{c[3]}-k{c[5]}-s{c[6]}-d{c[7]}-c{c[8]}" for c in NEIGHBORHOOD_CASES],
)
def test_neighborhood_kernel_tables_reproduce_predicate(
    shape, before, after, tile, block, kernel, stride, dilation, causal, packed
):
    grid = TokenGrid(shape, extra_before=before, extra_after=after)
    layout = TokenLayout(grid, tile=tile)
    pred = NeighborhoodWindow(layout, *_check_neighborhood_args(grid, kernel, stride, dilation, causal))
    if not packed:
        _assert_tables_match(pred, None)
        return
    tables = pred.packed_kernel_tables("cpu")
    n = layout.num_tokens
    assert tables.query.shape == (3, n) and tables.key.shape == (2, n)
    assert tables.query.dtype == tables.key.dtype == torch.int32
    _assert_decodes_to_predicate(pred, _decode_packed(tables))


@pytest.mark.parametrize("bound,fits", [(2**15 - 1, True), (2**15, False)])
def test_neighborhood_packed_tables_fill_32_bits_and_give_up_beyond(bound, fits):
    """Two axes of ``bit_length(bound)`` bits plus guards: 15 + 1 + 15 + 1 = 32 puts the last guard on the sign bit
    and still decodes exactly; one bit more and the per-axis tables are used instead (None)."""
    grid = TokenGrid((6, 7), extra_before=2, extra_after=1)
    pred = NeighborhoodWindow(TokenLayout(grid, tile=(2, 4)), (3, 5), (1, 2), (1, 1), (True, False))
    object.__setattr__(pred, "_code_bound", lambda axis: bound)  # wide fields on a grid small enough to decode
    tables = pred.packed_kernel_tables("cpu")
    assert (tables is not None) == fits
    if fits:
        assert int(tables.query[2, 0]) < 0  # the guard word has bit 31 set
        _assert_decodes_to_predicate(pred, _decode_packed(tables))


@pytest.mark.parametrize("shape,before,after,tile,block,radius", CIRCULAR_CASES)
def test_circular_kernel_tables_reproduce_predicate(shape, before, after, tile, block, radius):
    layout = TokenLayout(TokenGrid(shape, extra_before=before, extra_after=after), tile=tile)
    _assert_tables_match(CircularWindow(layout, radius), float(radius) ** 2)
