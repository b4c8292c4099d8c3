"""Block-sparse softmax attention: each query block attends only to the key blocks a ``BlockMask`` keeps.

Shape legend: ``B`` batch, ``H`` heads, ``Nq``/``Nk`` query/key tokens (in the sequence layout the mask refers
to, e.g. a tile-order ``TokenLayout``), ``D`` query/key head dim, ``Dv`` value head dim.
"""

import torch

from ..layout.block_mask import BlockMask
from ._checks import _check_attention_inputs, _check_scale
from ._registry import _BackendRegistry

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


_REGISTRY.register("reference")(block_sparse_attention_reference)


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
