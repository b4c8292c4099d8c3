"""Longest-processing-time-first scheduling of the block-sparse kernels: which CSR row each program walks.

The forward, dQ and dK/dV kernels launch one program per (row, batch x head) on a grid ``(M * SUB, B * H)``; a
program's work is its row's kept blocks. The GPU hands programs to free SMs in launch order, so with rows of very
different lengths (random or routed masks, neighborhood masks with global tokens or clamped borders) the last wave
waits for whichever long rows happen to come last. Greedy list scheduling in descending length (LPT) bounds that
tail: the programs issued last are the shortest.

Which order (the trade-off, documented in ``docs/kernels.md``): consecutive programs should stay on a few heads, so
that the K/V blocks they share stay in L2. A global sort by count would run rows of every head at once (FLUX-2048:
24 heads x 8.6 MB of bf16 K/V against the H100's 50 MB L2); sorting only within each head leaves the tail as it was
when a head has fewer rows than a wave (132 query blocks on 132 SMs). So heads are cut into groups of
``order_group`` consecutive heads (at least ``GROUP_ROWS`` rows: about two waves on an H100, and at 128-token
blocks, d128, bf16 about 34 MB of K/V), walked group after group, and inside a group all rows run longest first
(ties: head, then row, as launched). A simulation of greedy scheduling on the FLUX-2048 random mask (B1 H24, 132
rows of 11.5 +- 3.1 blocks) puts the tail at 3.9 % / 8.2 % over the bound unordered (132 / 264 concurrent
programs), 2.5 % / 6.9 % sorted per head, 0.5 % / 1.5 % in groups of four heads.

Two forms, picked from the mask's batch/heads ``(Bm, Hm)``:

- ``ORDER_TABLE`` (per-head masks): ``order`` shaped like ``indptr`` ``(Bm, Hm, M + 1)`` int32; entry ``[b, h, s]``
  is ``h' * M + m``: the program of mask head ``h``'s slot ``s`` walks row ``m`` of head ``h'`` (a head of ``h``'s
  group; with ``Hm == 1`` always ``h`` itself). Per mask batch ``b`` the entries are a permutation of its rows.
- ``ORDER_SHARED`` (one mask for every batch and head, ``Bm == Hm == 1``): ``order[0, 0, :M]`` lists the rows
  longest first, and the ``order_group`` consecutive (batch, head) programs of a group take each row in turn.

Masks whose rows all keep the same number of blocks (dense masks, strided neighborhoods, top-k masks) have no order
(``ROW_ORDER = ORDER_NONE``: no extra load), nor has any mask while ``ROW_ORDER_ENV`` is ``0``.
"""

import os

import torch
import triton
import triton.language as tl

__all__ = [
    "GROUP_ROWS",
    "ORDER_NONE",
    "ORDER_SHARED",
    "ORDER_TABLE",
    "ROW_ORDER_ENV",
    "longest_rows_first",
    "order_args",
    "order_group",
]

#: Switch of the row order, read per launch: ``0`` launches every kernel in CSR row order (A/B); unset or any other
#: value uses the mask's order where it has one.
ROW_ORDER_ENV = "VISIONATTN_BSA_ROW_ORDER"
#: Rows per head group of the order (see the module docstring).
GROUP_ROWS = 512
ORDER_NONE, ORDER_TABLE, ORDER_SHARED = 0, 1, 2
_TABLE = tl.constexpr(ORDER_TABLE)
_SHARED = tl.constexpr(ORDER_SHARED)


def order_group(rows: int, heads: int) -> int:
    """Heads per group: enough for ``GROUP_ROWS`` rows of ``rows`` each, at most ``heads``."""
    return max(1, min(heads, -(-GROUP_ROWS // max(rows, 1))))


def longest_rows_first(indptr: torch.Tensor) -> torch.Tensor | None:
    """The launch order of the CSR ``indptr`` ``(Bm, Hm, M + 1)`` (rows stored consecutively): int32 shaped like
    ``indptr`` (the last column unused) in the ``ORDER_TABLE`` form, which for ``Bm == Hm == 1`` is also the
    ``ORDER_SHARED`` form; None where every row keeps the same number of blocks. One host sync (the evenness test);
    None while the current CUDA stream captures a graph, where a sync is not allowed, and for a non-contiguous
    ``indptr`` (the kernels index the order with the CSR's strides)."""
    capturing = indptr.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if capturing or not indptr.is_contiguous():
        return None
    counts = (indptr[..., 1:] - indptr[..., :-1]).long()
    if counts.numel() == 0 or bool(counts.amin() == counts.amax()):
        return None
    bm, hm, rows = counts.shape
    longest = counts.amax()
    group = torch.arange(hm, device=indptr.device) // order_group(rows, hm)
    # one key per row: its head group, then the count descending; the stable sort keeps (head, row) order on ties
    key = group[:, None] * (longest + 1) + (longest - counts)
    order = torch.zeros_like(indptr)
    order[..., :rows] = torch.argsort(key.flatten(1), dim=1, stable=True).view(bm, hm, rows).to(torch.int32)
    return order


def order_args(order: torch.Tensor | None, indptr: torch.Tensor, batch_heads: int) -> tuple:
    """``(order, order_group, ROW_ORDER)`` kernel arguments of the order ``order`` of the CSR ``indptr`` for
    ``batch_heads`` programs per row; ``indptr`` stands in for a missing order (unread)."""
    if order is None or os.environ.get(ROW_ORDER_ENV) == "0":
        return indptr, 1, ORDER_NONE
    if indptr.shape[0] * indptr.shape[1] == 1:
        return order, order_group(indptr.shape[-1] - 1, batch_heads), ORDER_SHARED
    return order, 1, ORDER_TABLE


@triton.jit
def _bsa_program(pid, i_bh, num_heads, num_rows, stride_b, stride_h, order_ptr, group, ROW_ORDER: tl.constexpr,
                 SUB: tl.constexpr):  # fmt: skip
    """Program ``(pid, i_bh)`` of a grid ``(num_rows * SUB, B * H)`` under the order ``ROW_ORDER``: the ``(batch x
    head, program tile)`` it runs, the tile ``row * SUB + sub`` as the unordered program ``pid`` would (
    ``_bsa_program_tile``); ``stride_b``/``stride_h``: the CSR's, 0 on broadcast axes."""
    if ROW_ORDER == _TABLE:
        i_b, i_h = i_bh // num_heads, i_bh % num_heads
        entry = tl.load(order_ptr + i_b.to(tl.int64) * stride_b + i_h.to(tl.int64) * stride_h + pid // SUB)
        i_bh = i_b * num_heads + tl.where(stride_h != 0, entry // num_rows, i_h)
        pid = (entry % num_rows) * SUB + pid % SUB
    elif ROW_ORDER == _SHARED:
        first = (i_bh // group) * group
        size = tl.minimum(group, tl.num_programs(1) - first)
        slot = (i_bh - first) * num_rows + pid // SUB
        row = tl.load(order_ptr + slot // size)
        i_bh = first + slot % size
        pid = row * SUB + pid % SUB
    return i_bh, pid
