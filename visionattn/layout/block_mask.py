"""``BlockMask``: which key blocks each query block attends to, in CSR form, plus an exact token-level predicate.

Shape legend: ``B`` batch, ``H`` heads (either may be 1 and broadcast), ``Mq``/``Mk`` query/key blocks,
``Nq``/``Nk`` query/key tokens in the sequence layout the mask refers to.

A query block ``m`` of ``(b, h)`` visits key blocks ``indices[indptr[b, h, m] : indptr[b, h, m + 1]]`` (sorted);
``partial[i]`` marks blocks whose tokens are only partly allowed, where the exact ``token_mask`` predicate applies.
Blocks not flagged partial are fully allowed except for key positions past ``kv_len``. Offsets in ``indptr`` are
global into the flat ``indices``, rows laid out ``b``-major then ``h`` then ``m`` (torch's FlexAttention keeps the same
information as padded ``kv_indices``; CSR keeps memory proportional to the kept blocks).

A query row with no allowed key yields output 0 and log-sum-exp ``-inf`` in every backend.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ._utils import _shape_constants

__all__ = ["BlockMask"]

#: ``token_mask(q_idx, kv_idx) -> bool`` on broadcastable int64 layout positions.
_TokenPredicate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(eq=False)
class BlockMask:
    """Block-sparse attention pattern (CSR per batch x head x query block) with an exact token-level predicate.

    Args:
        indptr: ``(B, H, Mq + 1)`` int32 row offsets into ``indices``.
        indices: ``(nnz,)`` int32 key-block ids, sorted within each row.
        partial: ``(nnz,)`` bool, True where the block needs ``token_mask``.
        q_len: query tokens ``Nq``.
        kv_len: key tokens ``Nk``.
        block_q: tokens per query block (any positive int; kernels round up to a power of two and mask).
        block_k: tokens per key block.
        token_mask: exact predicate on layout positions, required when any block is partial.

    Build one with a builder (``neighborhood_block_mask``, ``radial_block_mask``, ...) or ``from_block_matrix``.
    """

    indptr: torch.Tensor
    indices: torch.Tensor
    partial: torch.Tensor
    q_len: int
    kv_len: int
    block_q: int
    block_k: int
    token_mask: _TokenPredicate | None = None
    _transposed: "BlockMask | None" = field(default=None, repr=False)
    #: Set only by trusted builders whose ``partial`` is all False by construction: skips the device sync of the check.
    _no_partial: bool = field(default=False, repr=False)
    #: Set only by builders whose rows each keep the same number of blocks, ``indices.numel() / indptr[..., 1:].numel()``
    #: (``indptr`` is that count times the row number): consumers may then view ``indices`` as ``(rows, count)``.
    _uniform_rows: bool = field(default=False, repr=False)

    def __post_init__(self):
        if self.indptr.ndim != 3 or self.indptr.shape[-1] != self.num_q_blocks + 1:
            raise ValueError(
                f"indptr must be (B, H, Mq + 1) with Mq={self.num_q_blocks}; got indptr.shape={tuple(self.indptr.shape)}."
            )
        if self.indices.shape != self.partial.shape or self.indices.ndim != 1:
            raise ValueError(
                "indices and partial must be 1-D of equal length; "
                f"got indices.shape={tuple(self.indices.shape)}, partial.shape={tuple(self.partial.shape)}."
            )
        if self.token_mask is None and not self._no_partial and bool(self.partial.any()):
            raise ValueError("token_mask must be given when any block is partial.")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_block_matrix(
        cls,
        keep: torch.Tensor,
        *,
        q_len: int,
        kv_len: int,
        block_q: int,
        block_k: int,
        partial: torch.Tensor | None = None,
        token_mask: _TokenPredicate | None = None,
    ) -> "BlockMask":
        """Compress a dense block matrix ``keep`` ``(B, H, Mq, Mk)`` bool (and ``partial``, same shape) to CSR."""
        if keep.ndim != 4 or keep.dtype != torch.bool:
            raise ValueError(f"keep must be a (B, H, Mq, Mk) bool tensor; got {keep.shape=}, {keep.dtype=}.")
        expected = (_ceil_div(q_len, block_q), _ceil_div(kv_len, block_k))
        if tuple(keep.shape[2:]) != expected:
            raise ValueError(f"keep must have (Mq, Mk)={expected} blocks; got keep.shape={tuple(keep.shape)}.")
        if partial is None:
            partial = torch.zeros_like(keep)
        partial = partial.expand_as(keep) & keep
        counts = keep.sum(-1, dtype=torch.int32)
        indptr = torch.zeros(*keep.shape[:2], keep.shape[2] + 1, dtype=torch.int32, device=keep.device)
        flat_counts = counts.flatten()
        ends = torch.cumsum(flat_counts, 0, dtype=torch.int64).view(counts.shape)
        indptr[..., 1:] = ends.to(torch.int32)
        indptr[..., 0] = (ends - counts)[..., 0].to(torch.int32)
        nz = keep.nonzero(as_tuple=True)  # row-major: sorted by (b, h, m, n)
        indices = nz[3].to(torch.int32)
        return cls(
            indptr=indptr,
            indices=indices,
            partial=partial[nz],
            q_len=q_len,
            kv_len=kv_len,
            block_q=block_q,
            block_k=block_k,
            token_mask=token_mask,
        )

    @classmethod
    def _from_row_topk(cls, cols: torch.Tensor, *, q_len: int, kv_len: int, block_q: int, block_k: int) -> "BlockMask":
        """CSR of ``cols`` ``(B, H, Mq, K)``: the ``K`` distinct key blocks each query block keeps (any order).

        Equals ``from_block_matrix`` of the matching block matrix, built with static shapes: no ``nonzero`` and
        no partial check, so no host sync (and traceable by ``torch.compile(fullgraph=True)``).
        """
        b, h, mq, count = cols.shape
        device = cols.device

        def offsets() -> tuple[torch.Tensor, torch.Tensor]:
            rows = torch.arange(b * h, dtype=torch.int32, device=device).view(b, h, 1) * mq
            indptr = (rows + torch.arange(mq + 1, dtype=torch.int32, device=device)) * count
            return indptr, torch.zeros(b * h * mq * count, dtype=torch.bool, device=device)

        # indptr and partial depend only on the shape: made once per shape and device (5 small kernels per call)
        indptr, partial = _shape_constants(("row_topk", b, h, mq, count), device, offsets)
        indices = cols.sort(-1).values.flatten().to(torch.int32)
        return cls(indptr, indices, partial, q_len, kv_len, block_q, block_k, _no_partial=True, _uniform_rows=True)

    # ------------------------------------------------------------------ shape
    @property
    def num_q_blocks(self) -> int:
        return _ceil_div(self.q_len, self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return _ceil_div(self.kv_len, self.block_k)

    @property
    def batch_heads(self) -> tuple[int, int]:
        return tuple(self.indptr.shape[:2])

    @property
    def device(self) -> torch.device:
        return self.indptr.device

    @property
    def row_counts(self) -> torch.Tensor:
        """Kept key blocks per query block, ``(B, H, Mq)`` int32."""
        return self.indptr[..., 1:] - self.indptr[..., :-1]

    # ------------------------------------------------------------------ views
    def to_block_matrix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense ``(keep, partial)`` block matrices, ``(B, H, Mq, Mk)`` bool each."""
        b, h = self.batch_heads
        mq, mk = self.num_q_blocks, self.num_kv_blocks
        counts = self.row_counts.flatten().long()
        rows = torch.repeat_interleave(torch.arange(b * h * mq, device=self.device), counts)
        keep = torch.zeros(b * h * mq, mk, dtype=torch.bool, device=self.device)
        partial = torch.zeros_like(keep)
        cols = self.indices.long()
        keep[rows, cols] = True
        partial[rows, cols] = self.partial
        return keep.view(b, h, mq, mk), partial.view(b, h, mq, mk)

    def to_dense(self) -> torch.Tensor:
        """Token-level mask ``(B, H, Nq, Nk)`` bool: the exact pattern every backend computes."""
        keep, partial = self.to_block_matrix()
        expand = lambda m: m.repeat_interleave(self.block_q, 2).repeat_interleave(self.block_k, 3)[
            ..., : self.q_len, : self.kv_len
        ]
        keep_t, partial_t = expand(keep), expand(partial)
        if self.token_mask is None or not bool(partial.any()):
            return keep_t
        q_idx = torch.arange(self.q_len, device=self.device)[:, None]
        kv_idx = torch.arange(self.kv_len, device=self.device)[None, :]
        exact = self.token_mask(q_idx, kv_idx).expand(self.q_len, self.kv_len)
        return keep_t & (~partial_t | exact)

    def density(self) -> float:
        """Fraction of (query block, key block) pairs kept, averaged over batch and heads."""
        b, h = self.batch_heads
        return self.indices.numel() / (b * h * self.num_q_blocks * self.num_kv_blocks)

    def entry_areas(self) -> torch.Tensor:
        """Token pairs of each CSR entry's block, ``(nnz,)`` int64 on the mask's device: (rows of its query block) x
        (keys of its key block), the short last blocks counting their real tokens. Static shapes: no host sync."""
        device = self.indptr.device
        rows = (self.q_len - torch.arange(self.num_q_blocks, device=device) * self.block_q).clamp(max=self.block_q)
        cols = (self.kv_len - torch.arange(self.num_kv_blocks, device=device) * self.block_k).clamp(max=self.block_k)
        return rows[self._entry_q_blocks()] * cols[self.indices.long()]

    def _entry_q_blocks(self) -> torch.Tensor:
        """Query block of each CSR entry, ``(nnz,)`` int64."""
        counts = self.row_counts.flatten().long()
        rows = torch.arange(counts.numel(), device=self.device) % self.num_q_blocks
        return torch.repeat_interleave(rows, counts, output_size=self.indices.numel())

    def token_density(self, chunk_pairs: int = 1 << 24) -> float:
        """Fraction of (query, key) token pairs allowed, averaged over batch and heads: the areas of the full kept
        blocks plus, for partial blocks, ``token_mask`` evaluated on each block's pairs in chunks of about
        ``chunk_pairs`` (never the ``Nq x Nk`` mask)."""
        areas = self.entry_areas()
        total = int(areas[~self.partial].sum())
        partial = torch.nonzero(self.partial).flatten()
        if self.token_mask is not None and partial.numel():
            per_chunk = max(1, chunk_pairs // (self.block_q * self.block_k))
            q_off = torch.arange(self.block_q, device=self.device)[:, None]
            k_off = torch.arange(self.block_k, device=self.device)[None, :]
            q_blocks, k_blocks = self._entry_q_blocks()[partial], self.indices.long()[partial]
            for lo in range(0, partial.numel(), per_chunk):
                q_idx = q_blocks[lo : lo + per_chunk, None, None] * self.block_q + q_off
                kv_idx = k_blocks[lo : lo + per_chunk, None, None] * self.block_k + k_off
                inside = (q_idx < self.q_len) & (kv_idx < self.kv_len)
                allowed = self.token_mask(q_idx.clamp(max=self.q_len - 1), kv_idx.clamp(max=self.kv_len - 1))
                total += int((allowed & inside).sum())
        b, h = self.batch_heads
        return total / (b * h * self.q_len * self.kv_len)

    def transpose(self) -> "BlockMask":
        """The mask seen from the keys (``Mk`` rows of query blocks), as the dK/dV backward pass walks it; cached."""
        if self._transposed is None:
            keep, partial = self.to_block_matrix()
            swap = lambda q_idx, kv_idx: self.token_mask(kv_idx, q_idx)
            self._transposed = BlockMask.from_block_matrix(
                keep.transpose(-1, -2).contiguous(),
                partial=partial.transpose(-1, -2).contiguous(),
                q_len=self.kv_len,
                kv_len=self.q_len,
                block_q=self.block_k,
                block_k=self.block_q,
                token_mask=swap if self.token_mask is not None else None,
            )
        return self._transposed

    def to_flex(self):
        """The same pattern as a FlexAttention ``BlockMask`` (see ``visionattn.layout.flex.to_flex_block_mask``)."""
        # Imported on use: FlexAttention pulls in torch._dynamo, which would add seconds to `import visionattn`.
        from .flex import to_flex_block_mask

        return to_flex_block_mask(self)

    def to(self, device) -> "BlockMask":
        return BlockMask(
            indptr=self.indptr.to(device),
            indices=self.indices.to(device),
            partial=self.partial.to(device),
            q_len=self.q_len,
            kv_len=self.kv_len,
            block_q=self.block_q,
            block_k=self.block_k,
            token_mask=self.token_mask,
        )

    def __getitem__(self, index) -> "BlockMask":
        """Select batch/head entries, e.g. ``mask[0]`` or ``mask[:, 2:4]`` (dims are kept)."""
        if not isinstance(index, tuple):
            index = (index,)
        index = tuple(slice(i, i + 1) if isinstance(i, int) else i for i in index)
        keep, partial = self.to_block_matrix()
        return BlockMask.from_block_matrix(
            keep[index],
            partial=partial[index],
            q_len=self.q_len,
            kv_len=self.kv_len,
            block_q=self.block_q,
            block_k=self.block_k,
            token_mask=self.token_mask,
        )

    def __repr__(self) -> str:
        b, h = self.batch_heads
        return (
            f"BlockMask(batch_heads=({b}, {h}), q_len={self.q_len}, kv_len={self.kv_len}, "
            f"block=({self.block_q}, {self.block_k}), blocks=({self.num_q_blocks}, {self.num_kv_blocks}), "
            f"density={self.density():.4f}, partial_blocks={int(self.partial.sum())})"
        )
