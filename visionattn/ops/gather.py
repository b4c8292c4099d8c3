"""Token gather with an exact, gather-only backward: the tile-order permutations of the block-sparse ops.

Shape legend: ``N = x.shape[dim]`` tokens in, ``M = index.shape[0]`` slots out; the other axes of ``x`` (batch,
heads, head dim ``D`` last) pass through.
"""

import torch

from ._checks import _check_tensor
from ._eager import custom_op
from ._registry import _BackendRegistry, _requires_dtype, _requires_head_dim_range, _requires_triton_device

__all__ = ["gather_tokens", "gather_tokens_reference", "inverse_token_index"]

_REGISTRY = _BackendRegistry("gather_tokens")
_INDEX_DTYPES = (torch.int32, torch.int64)
#: Dtypes and head dims of the Triton backend (a row copy: any dtype works; these are the tested ones).
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_HEAD_DIMS = (16, 256)


def inverse_token_index(index: torch.Tensor, length: int) -> torch.Tensor:
    """The inverse map of a partial permutation: ``(length,)`` in ``index``'s dtype and device, entry ``t`` the slot
    ``r`` with ``index[r] == t``, or -1 where no slot holds token ``t``.

    Raises ``ValueError`` unless ``index`` (1-D, integer) names each token of ``[0, length)`` at most once (negative
    entries: empty slots). Synchronises with the device; build it once per configuration, not per call.
    """
    _check_tensor("index", index, ndim=1, dtypes=_INDEX_DTYPES)
    valid = index >= 0
    tokens = index[valid]
    if tokens.numel() and (int(tokens.max()) >= length or torch.unique(tokens).numel() != tokens.numel()):
        raise ValueError(
            f"index must name each token of [0, {length}) at most once (negative: an empty slot); "
            f"got index of {index.shape[0]} slots with max {int(tokens.max())} and "
            f"{tokens.numel() - torch.unique(tokens).numel()} repeated tokens."
        )
    inverse = torch.full((length,), -1, dtype=index.dtype, device=index.device)
    inverse[tokens.long()] = torch.nonzero(valid).squeeze(-1).to(index.dtype)
    return inverse


def _check_gather_args(x, index, inverse_index, dim) -> int:
    """``dim`` normalised to ``[0, x.ndim - 1)`` after checking the tensors against each other."""
    _check_tensor("x", x)
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dims (tokens, head dim); got x.shape={tuple(x.shape)}.")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.ndim <= dim < x.ndim or dim % x.ndim == x.ndim - 1:
        raise ValueError(f"dim must be an int axis of x other than the last; got {dim=}, x.shape={tuple(x.shape)}.")
    dim %= x.ndim
    for name, t in (("index", index), ("inverse_index", inverse_index)):
        _check_tensor(name, t, ndim=1, dtypes=_INDEX_DTYPES)
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device; got {name}.device={t.device}, x.device={x.device}.")
    if inverse_index.shape[0] != x.shape[dim]:
        raise ValueError(
            f"inverse_index must have x.shape[dim]={x.shape[dim]} entries (one per token); "
            f"got inverse_index.shape={tuple(inverse_index.shape)}."
        )
    return dim


def _check_index_ranges(x: torch.Tensor, index: torch.Tensor, inverse_index: torch.Tensor, dim: int) -> None:
    """``index`` entries ``< N`` and ``inverse_index`` entries ``< M`` (one host sync): a larger entry would make the
    forward or the backward read outside its tensor."""
    for name, t, bound in (("index", index, x.shape[dim]), ("inverse_index", inverse_index, index.shape[0])):
        if t.numel() and int(t.max()) >= bound:
            raise ValueError(f"{name} entries must be < {bound}; got max {int(t.max())}.")


def gather_tokens_reference(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``index_select`` along ``dim`` with zero rows where ``index < 0`` (autograd: ``index_add``; any index)."""
    shape = [1] * x.ndim
    shape[dim] = -1
    picked = x.index_select(dim, index.clamp_min(0))
    return torch.where((index >= 0).view(shape), picked, picked.new_zeros(()))


# ---------------------------------------------------------------------------------------------- triton backend
@custom_op("visionattn::gather_tokens")
def _gather_tokens_op(x: torch.Tensor, index: torch.Tensor, inverse_index: torch.Tensor, dim: int) -> torch.Tensor:
    from ..kernels.block_sparse import unit_last_stride
    from ..kernels.row_gather import gather_rows

    return gather_rows(unit_last_stride(x), index, dim)


@_gather_tokens_op.register_fake
def _(x, index, inverse_index, dim):
    from ..kernels.row_gather import empty_gathered

    return empty_gathered(x, index.shape[0], dim)


def _setup_context(ctx, inputs, output):
    _, index, inverse_index, dim = inputs
    ctx.save_for_backward(index, inverse_index)
    ctx.dim = dim


def _backward(ctx, grad):
    index, inverse_index = ctx.saved_tensors
    # the adjoint of a gather by a partial permutation is the gather by its inverse (inverse_token_index)
    return _gather_tokens_op(grad, inverse_index, index, ctx.dim), None, None, None


_gather_tokens_op.register_autograd(_backward, setup_context=_setup_context)


@_REGISTRY.register(
    "triton",
    constraints=[
        _requires_triton_device("x"),
        _requires_dtype("x", _TRITON_DTYPES),
        _requires_head_dim_range("x", *_TRITON_HEAD_DIMS),
    ],
)
def _gather_tokens_triton(x, index, inverse_index, dim):
    return _gather_tokens_op(x, index, inverse_index, dim)


@_REGISTRY.register("reference")
def _gather_tokens_torch(x, index, inverse_index, dim):
    return gather_tokens_reference(x, index, dim)


def gather_tokens(
    x: torch.Tensor,
    index: torch.Tensor,
    inverse_index: torch.Tensor,
    dim: int = -2,
    *,
    backend: str | None = None,
    check_index: bool = True,
) -> torch.Tensor:
    r"""Gather tokens along ``dim`` by a partial permutation, e.g. raster order into a tile order and back.

    .. math:: y_r = \begin{cases} x_{\pi(r)} & \pi(r) \ge 0 \\ 0 & \text{otherwise} \end{cases}, \qquad
        \frac{\partial L}{\partial x_t} = \begin{cases} \frac{\partial L}{\partial y_{\pi^{-1}(t)}} & \pi^{-1}(t)
        \ge 0 \\ 0 & \text{otherwise} \end{cases}

    with :math:`\pi` = ``index`` and :math:`\pi^{-1}` = ``inverse_index``. The backward is the same gather with the
    two maps swapped, hence exact when ``index`` names each token at most once and ``inverse_index`` is its inverse
    (``inverse_token_index(index, N)``: ``index[inverse_index[t]] == t`` wherever ``inverse_index[t] >= 0``, and
    ``inverse_index[t] == -1`` for a token no slot holds). That pairing is not checked per call: build both once with
    ``inverse_token_index``. A token named by two slots would get only one slot's gradient.

    Args:
        x: ``(..., N, ..., D)`` float tensor, ``N`` at ``dim``, head dim last (any strides: a ``(B, N, H, D)``
            tensor viewed as ``(B, H, N, D)`` is read in place).
        index: ``(M,)`` int32/int64, the token of each slot, negative for an empty (zero) slot; entries
            ``< N``.
        inverse_index: ``(N,)`` int32/int64, the slot of each token, -1 for a token no slot holds.
        dim: the token axis of ``x``, not the last.

    Other Parameters:
        backend: ``"triton"`` (a row-tile copy kernel, fp16/bf16/fp32, head dim 16..256; CUDA, or CPU with
            ``TRITON_INTERPRET=1``) or ``"reference"`` (``index_select``); ``None`` picks the first that supports
            the input.
        check_index: check that the entries of both maps stay inside the tensors they index (one host
            synchronisation; skipped under ``torch.compile``); ``False`` for maps known valid, e.g. built once
            with ``inverse_token_index`` as ``neighborhood_attention`` does.

    Returns:
        ``x.shape`` with ``M`` at ``dim``, stored in ``x``'s axis order (Triton) or contiguous (reference).

    Raises:
        TypeError: ``x`` not a float tensor, or an index not an int32/int64 tensor.
        ValueError: ``dim`` out of range or the last axis, a 1-D index expected, ``inverse_index`` not ``N`` long,
            an index on another device, or (``check_index``) an entry of ``index`` ``>= N`` or of
            ``inverse_index`` ``>= M``.
        NotImplementedError: the named backend cannot run this input.

    Example:
        >>> index = torch.tensor([2, 0, -1, 1])
        >>> inverse = inverse_token_index(index, 3)
        >>> gather_tokens(torch.arange(6.0).view(3, 2), index, inverse, dim=0, backend="reference")
        tensor([[4., 5.],
                [0., 1.],
                [0., 0.],
                [2., 3.]])
    """
    dim = _check_gather_args(x, index, inverse_index, dim)
    if check_index and not torch.compiler.is_compiling():
        _check_index_ranges(x, index, inverse_index, dim)
    fn = _REGISTRY.select(backend, {"x": x})
    return fn(x, index, inverse_index, dim)
