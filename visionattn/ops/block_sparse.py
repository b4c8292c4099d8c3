"""Block-sparse softmax attention: each query block attends only to the key blocks a ``BlockMask`` keeps.

Shape legend: ``B`` batch, ``H`` heads, ``Nq``/``Nk`` query/key tokens (in the sequence layout the mask refers
to, e.g. a tile-order ``TokenLayout``), ``D`` query/key head dim, ``Dv`` value head dim.
"""

import weakref

import torch
from torch.utils.flop_counter import register_flop_formula

from ..layout.block_mask import BlockMask
from ..layout.predicates import CircularWindow, NeighborhoodWindow
from ._checks import _check_attention_inputs, _check_scale
from ._eager import custom_op
from ._registry import _BackendRegistry, _fail, _requires_dtype, _requires_head_dim_range, _requires_triton_device

__all__ = ["block_sparse_attention", "block_sparse_attention_reference"]

_REGISTRY = _BackendRegistry("block_sparse_attention")


def _check_block_mask(block_mask, q: torch.Tensor, k: torch.Tensor) -> None:
    """``block_mask`` is a ``BlockMask`` on q's device whose lengths and batch/heads fit ``q`` and ``k``."""
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a visionattn.layout.BlockMask; got {type(block_mask)=}.")
    if block_mask.q_len != q.shape[2] or block_mask.kv_len != k.shape[2]:
        raise ValueError(
            "block_mask must have q_len == q.shape[2] and kv_len == k.shape[2]; "
            f"got block_mask.q_len={block_mask.q_len}, block_mask.kv_len={block_mask.kv_len}, "
            f"q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}. Build the mask for the sequence layout of q and k."
        )
    for axis, name in enumerate(("B", "H")):
        size = block_mask.batch_heads[axis]
        if size not in (1, q.shape[axis]):
            raise ValueError(
                f"block_mask {name} must be 1 (broadcast) or q.shape[{axis}]={q.shape[axis]}; "
                f"got block_mask.batch_heads={block_mask.batch_heads}."
            )
    if block_mask.device != q.device:
        raise ValueError(
            f"block_mask must be on q's device; got block_mask.device={block_mask.device}, q.device={q.device}. "
            "Use block_mask.to(q.device)."
        )


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    *,
    scale: float,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Masked dense softmax over ``block_mask.to_dense()`` (any float dtype; fp16/bf16 compute in fp32).

    Rows with no allowed key give output 0 and log-sum-exp ``-inf``, with zero (never NaN) gradients.
    """
    compute = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    allowed = block_mask.to_dense().to(q.device)
    scores = torch.einsum("bhqd,bhkd->bhqk", qc, kc) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(-1, keepdim=True)
    nonempty = denom > 0
    safe_denom = torch.where(nonempty, denom, torch.ones_like(denom))
    out = torch.einsum("bhqk,bhkd->bhqd", weights / safe_denom, vc).to(q.dtype)
    if not return_lse:
        return out
    lse = torch.where(nonempty, torch.log(safe_denom) + row_max, torch.full_like(denom, float("-inf")))
    return out, lse.squeeze(-1)


# ---------------------------------------------------------------------------------------------- triton backend
#: Head dims of the Triton backend: any in [16, 128] (padded to a power-of-two tile in-kernel, masked).
_TRITON_HEAD_DIMS = (16, 128)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _predicate_args(token_mask, device) -> tuple[int, torch.Tensor | None, torch.Tensor | None, float]:
    """``(MASK_KIND, query_table, key_table, radius2)`` the kernels evaluate for ``token_mask``: a neighborhood's
    ``PackedWindowTables`` where its axes fit one word, else its ``KernelTables``."""
    from ..kernels.mask_predicates import (
        MASK_CIRCULAR,
        MASK_NEIGHBORHOOD,
        MASK_NONE,
        MASK_PACKED_NEIGHBORHOOD,
        pack_mask_kind,
    )

    if token_mask is None:
        return MASK_NONE, None, None, 0.0
    grid = token_mask.layout.grid
    if isinstance(token_mask, CircularWindow):
        tables = token_mask.kernel_tables(device)
        return pack_mask_kind(MASK_CIRCULAR, grid), tables.query, tables.key, float(token_mask.radius) ** 2
    tables = token_mask.packed_kernel_tables(device)
    if tables is not None:
        return pack_mask_kind(MASK_PACKED_NEIGHBORHOOD, grid), tables.query, tables.key, 0.0
    tables = token_mask.kernel_tables(device)
    return pack_mask_kind(MASK_NEIGHBORHOOD, grid), tables.query, tables.key, 0.0


#: Per ``BlockMask`` (masks are immutable): its predicate arguments, row CSR and, once a gradient was needed, its
#: key-major CSR.
_MASK_ARGS: "weakref.WeakKeyDictionary[BlockMask, list]" = weakref.WeakKeyDictionary()


def _walk_csr(block_mask: BlockMask, transposed: bool) -> tuple:
    """``(indptr, indices, split)`` the kernels walk, for the rows (forward, dQ) or ``transposed`` (dK/dV,
    ``transpose_csr``): full blocks first (``full_blocks_first``); without a predicate every block is full and
    ``indptr`` stands in for the unread ``split``."""
    from ..kernels.block_sparse_bwd import full_blocks_first, transpose_csr

    csr = (block_mask.indptr, block_mask.indices, block_mask.partial)
    if transposed:
        csr = transpose_csr(*csr, block_mask.num_kv_blocks)
    if block_mask.token_mask is None:
        return csr[0], csr[1], csr[0]
    return (csr[0], *full_blocks_first(*csr))


def _mask_launch_args(block_mask: BlockMask, needs_grad: bool) -> tuple[tuple, tuple, tuple]:
    """``(predicate, rows, key_major)`` of ``block_mask`` (``_predicate_args``, ``_walk_csr`` of the rows and, when
    a gradient is needed, of the transpose; otherwise the rows stand in, nothing reads them). Each is computed once
    per mask in eager mode (about twenty small device ops); under ``torch.compile`` recomputed in the graph instead
    of being cached on a Python object."""
    if torch.compiler.is_compiling():
        rows = _walk_csr(block_mask, transposed=False)
        key_major = _walk_csr(block_mask, transposed=True) if needs_grad else rows
        return _predicate_args(block_mask.token_mask, block_mask.device), rows, key_major
    entry = _MASK_ARGS.get(block_mask)
    if entry is None:
        predicate = _predicate_args(block_mask.token_mask, block_mask.device)
        entry = _MASK_ARGS[block_mask] = [predicate, _walk_csr(block_mask, transposed=False), None]
    if needs_grad and entry[2] is None:
        entry[2] = _walk_csr(block_mask, transposed=True)
    return entry[0], entry[1], entry[2] if needs_grad else entry[1]


def _triton_supports_mask(args: dict, raise_error: bool) -> bool:
    mask = args["block_mask"]
    if mask.token_mask is not None and type(mask.token_mask) not in (NeighborhoodWindow, CircularWindow):
        return _fail(
            raise_error,
            NotImplementedError,
            "block_mask.token_mask must be None, a NeighborhoodWindow or a CircularWindow for backend='triton' "
            f"(the kernels evaluate those in-kernel); got {type(mask.token_mask).__name__}. Use backend='reference'.",
        )
    return True


@custom_op("visionattn::block_sparse_attention_fwd")
def _block_sparse_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    split: torch.Tensor,
    scale: float,
    block_q: int,
    block_k: int,
    mask_kind: int,
    query_table: torch.Tensor | None,
    key_table: torch.Tensor | None,
    radius2: float,
    indptr_t: torch.Tensor,
    indices_t: torch.Tensor,
    split_t: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``indptr``/``indices``/``split``: the row CSR walked with full blocks first, ``indptr_t``/``indices_t``/
    ``split_t`` the key-major one of the dK/dV pass (``_launch_csrs``), only saved for the backward."""
    from ..kernels.block_sparse import block_sparse_fwd

    return block_sparse_fwd(
        q,
        k,
        v,
        indptr,
        indices,
        split,
        scale=scale,
        block_q=block_q,
        block_k=block_k,
        mask_kind=mask_kind,
        query_table=query_table,
        key_table=key_table,
        radius2=radius2,
    )


@_block_sparse_fwd_op.register_fake
def _(q, k, v, indptr, indices, split, scale, block_q, block_k, mask_kind, query_table, key_table, radius2, *key_major):
    from ..kernels.block_sparse import empty_like_layout

    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    return empty_like_layout(q, v.shape[-1]), lse


@custom_op("visionattn::block_sparse_attention_bwd")
def _block_sparse_bwd_op(
    do: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    split: torch.Tensor,
    scale: float,
    block_q: int,
    block_k: int,
    mask_kind: int,
    query_table: torch.Tensor | None,
    key_table: torch.Tensor | None,
    radius2: float,
    indptr_t: torch.Tensor,
    indices_t: torch.Tensor,
    split_t: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.block_sparse_bwd import block_sparse_bwd

    return block_sparse_bwd(
        do,
        dlse,
        q,
        k,
        v,
        out,
        lse,
        indptr,
        indices,
        split,
        scale=scale,
        block_q=block_q,
        block_k=block_k,
        mask_kind=mask_kind,
        query_table=query_table,
        key_table=key_table,
        radius2=radius2,
        key_major=(indptr_t, indices_t, split_t),
    )


@_block_sparse_bwd_op.register_fake
def _(do, dlse, q, k, v, *args):
    from ..kernels.block_sparse import empty_like_layout

    return tuple(empty_like_layout(t, t.shape[-1]) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    (
        q,
        k,
        v,
        indptr,
        indices,
        split,
        scale,
        block_q,
        block_k,
        mask_kind,
        query_table,
        key_table,
        radius2,
        *key_major,
    ) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, indptr, indices, split, query_table, key_table, *key_major)
    ctx.scale, ctx.block_q, ctx.block_k = scale, block_q, block_k
    ctx.mask_kind, ctx.radius2 = mask_kind, radius2


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, indptr, indices, split, query_table, key_table, *key_major = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout
    dq, dk, dv = _block_sparse_bwd_op(
        dout,
        dlse,
        q,
        k,
        v,
        out,
        lse,
        indptr,
        indices,
        split,
        ctx.scale,
        ctx.block_q,
        ctx.block_k,
        ctx.mask_kind,
        query_table,
        key_table,
        ctx.radius2,
        *key_major,
    )
    # q, k, v, indptr, indices, split, scale, block_q, block_k, mask_kind, query_table, key_table, radius2, *key_major
    return dq, dk, dv, *(None,) * 13


_block_sparse_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _kept_pairs(q_shape, indptr_shape, indices_shape, block_q: int, block_k: int) -> int:
    """Token pairs in kept blocks, over all batch x heads (a broadcast mask counts once per head)."""
    broadcast = (q_shape[0] * q_shape[1]) // (indptr_shape[0] * indptr_shape[1])
    return indices_shape[0] * broadcast * block_q * block_k


@register_flop_formula(torch.ops.visionattn.block_sparse_attention_fwd)
def _fwd_flops(q_shape, k_shape, v_shape, indptr_shape, indices_shape, split_shape, scale, block_q, block_k, *_, **__):
    """QK^T and PV over the kept blocks: 2 * pairs * (D + Dv)."""
    return 2 * _kept_pairs(q_shape, indptr_shape, indices_shape, block_q, block_k) * (q_shape[-1] + v_shape[-1])


@register_flop_formula(torch.ops.visionattn.block_sparse_attention_bwd)
def _bwd_flops(do_shape, dlse_shape, q_shape, k_shape, v_shape, out_shape_, lse_shape, indptr_shape, indices_shape,
               split_shape, scale, block_q, block_k, *_, **__):  # fmt: skip
    """QK^T, dP = dO V^T, dV, dQ, dK over the kept blocks: 2 * pairs * (3 D + 2 Dv) (recompute not counted)."""
    pairs = _kept_pairs(q_shape, indptr_shape, indices_shape, block_q, block_k)
    return 2 * pairs * (3 * q_shape[-1] + 2 * v_shape[-1])


@_REGISTRY.register(
    "triton",
    constraints=[
        _requires_triton_device("q", "k", "v"),
        _requires_dtype("q", _TRITON_DTYPES),
        _requires_head_dim_range("q", *_TRITON_HEAD_DIMS),
        _requires_head_dim_range("v", *_TRITON_HEAD_DIMS),
        _triton_supports_mask,
    ],
)
def _block_sparse_attention_triton(q, k, v, block_mask: BlockMask, *, scale: float, return_lse: bool = False):
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    predicate, rows, key_major = _mask_launch_args(block_mask, needs_grad)
    out, lse = _block_sparse_fwd_op(
        q,
        k,
        v,
        *rows,
        scale,
        block_mask.block_q,
        block_mask.block_k,
        *predicate,
        *key_major,
    )
    return (out, lse) if return_lse else out


_REGISTRY.register("reference")(block_sparse_attention_reference)


@custom_op("visionattn::block_sparse_attention_gathered")
def _block_sparse_gathered_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_rows: torch.Tensor,
    kv_rows: torch.Tensor,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    split: torch.Tensor,
    scale: float,
    block_q: int,
    block_k: int,
    mask_kind: int,
    query_table: torch.Tensor | None,
    key_table: torch.Tensor | None,
    radius2: float,
) -> torch.Tensor:
    """The forward over a permuted sequence that q, k, v and the output store in their own order (``rows`` of
    ``block_sparse_fwd``); no autograd (``block_sparse_attention_gathered``)."""
    from ..kernels.block_sparse import block_sparse_fwd

    out, _ = block_sparse_fwd(
        q,
        k,
        v,
        indptr,
        indices,
        split,
        scale=scale,
        block_q=block_q,
        block_k=block_k,
        mask_kind=mask_kind,
        query_table=query_table,
        key_table=key_table,
        radius2=radius2,
        rows=(q_rows, kv_rows),
    )
    return out


@_block_sparse_gathered_op.register_fake
def _(q, k, v, *args):
    from ..kernels.block_sparse import empty_like_layout

    return empty_like_layout(q, v.shape[-1])


@register_flop_formula(torch.ops.visionattn.block_sparse_attention_gathered)
def _gathered_flops(q_shape, k_shape, v_shape, q_rows_shape, kv_rows_shape, indptr_shape, indices_shape, split_shape,
                    scale, block_q, block_k, *_, **__):  # fmt: skip
    """As ``_fwd_flops``, over the kept blocks of the permuted sequence."""
    return _fwd_flops(q_shape, k_shape, v_shape, indptr_shape, indices_shape, split_shape, scale, block_q, block_k)


def triton_gathered_attention_available(q, k, v, block_mask: BlockMask, backend: str | None) -> bool:
    """Whether ``block_sparse_attention_gathered`` can serve this call: no gradient is needed and ``backend`` selects
    the Triton backend for these inputs (so the result is the one ``block_sparse_attention`` would give)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    args = {"q": q, "k": k, "v": v, "block_mask": block_mask}
    return _REGISTRY.select(backend, args) is _block_sparse_attention_triton


def block_sparse_attention_gathered(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_rows: torch.Tensor,
    kv_rows: torch.Tensor,
    block_mask: BlockMask,
    *,
    scale: float,
) -> torch.Tensor:
    """``block_sparse_attention`` of the permuted inputs ``q[:, :, q_rows]``, ``k[:, :, kv_rows]``,
    ``v[:, :, kv_rows]`` under ``block_mask``, scattered back to q's order, without forming the permuted copies.

    For the ops that walk a tile order (``neighborhood_attention``); inference only (check
    ``triton_gathered_attention_available`` first). ``q_rows`` ``(block_mask.q_len,)`` int32: the row of q of each
    slot, -1 for padding slots (computed, not written), every row of q some slot's; ``kv_rows``
    ``(block_mask.kv_len,)`` int32 rows of k and v (a padding slot may name any row: the mask never admits it).
    Returns ``(B, H, Nq, Dv)`` in q's order, stored like q.
    """
    predicate, rows, _ = _mask_launch_args(block_mask, needs_grad=False)
    return _block_sparse_gathered_op(
        q, k, v, q_rows, kv_rows, *rows, scale, block_mask.block_q, block_mask.block_k, *predicate
    )


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Softmax attention restricted to the token pairs ``block_mask`` allows.

    .. math:: O_i = \sum_{j \in \mathcal{A}(i)} \frac{\exp(s\, q_i \cdot k_j)}{\sum_{j' \in \mathcal{A}(i)}
        \exp(s\, q_i \cdot k_{j'})} v_j

    where :math:`\mathcal{A}(i)` is the set of keys the mask allows query :math:`i` (kept blocks, refined by the
    exact token predicate on partial blocks) and :math:`s` the scale (block-sparse FlashAttention, Dao et al.
    2022, arXiv 2205.14135, Sec. 3.3). A query with no allowed key gets :math:`O_i = 0` and LSE :math:`-\infty`.

    Args:
        q: queries ``(B, H, Nq, D)``; any strides (a ``(B, N, H, D)`` tensor transposed to ``(B, H, N, D)`` is
            read without a copy).
        k: keys ``(B, H, Nk, D)``.
        v: values ``(B, H, Nk, Dv)``.
        block_mask: a ``BlockMask`` with ``q_len == Nq``, ``kv_len == Nk``, batch/heads 1 (broadcast) or ``B``/``H``.
        scale: score scale ``s``; ``None`` means ``D ** -0.5``.
        return_lse: also return the natural-log log-sum-exp of the scaled scores per query.

    Other Parameters:
        backend: ``"triton"`` (CUDA, or CPU with ``TRITON_INTERPRET=1``) or ``"reference"``; ``None`` picks the
            first that supports the input.

    Returns:
        ``out`` ``(B, H, Nq, Dv)`` in q's dtype, and with ``return_lse`` also ``lse`` ``(B, H, Nq)`` float32
        (float64 for float64 input).

    Raises:
        TypeError: ``q``/``k``/``v`` are not float tensors of one dtype, or ``block_mask`` is not a ``BlockMask``.
        ValueError: shapes disagree with each other or with ``block_mask``.
        NotImplementedError: the named backend cannot run this input.

    Example:
        >>> from visionattn.layout import BlockMask
        >>> keep = torch.ones(1, 1, 2, 2, dtype=torch.bool)
        >>> mask = BlockMask.from_block_matrix(keep, q_len=32, kv_len=32, block_q=16, block_k=16)
        >>> q = k = v = torch.randn(1, 2, 32, 16)
        >>> block_sparse_attention(q, k, v, mask, backend="reference").shape
        torch.Size([1, 2, 32, 16])
    """
    _check_attention_inputs(q, k, v)
    _check_block_mask(block_mask, q, k)
    scale = _check_scale(scale, q.shape[-1])
    args = {"q": q, "k": k, "v": v, "block_mask": block_mask}
    fn = _REGISTRY.select(backend, args)
    return fn(q, k, v, block_mask, scale=scale, return_lse=return_lse)
