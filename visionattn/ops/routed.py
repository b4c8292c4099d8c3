"""Routed region attention (BiFormer's token-to-token attention): each query region attends to the tokens of the
key regions routed to it, on a map cut into ``n_win x n_win`` regions.

Shape legend: ``B`` batch, ``H`` heads, ``Y x X`` the map (``n_win`` divides both), ``R = n_win²`` regions of
``(Y / n_win) x (X / n_win)`` tokens, ``k`` routed regions per query region, ``D`` query/key head dim, ``Dv`` value
head dim.
"""

import torch
from torch.utils.flop_counter import register_flop_formula

from ._checks import _check_int, _check_scale, _check_tensor
from ._eager import custom_op
from ._registry import _BackendRegistry, _fail, _requires_dtype, _requires_head_dim_range, _requires_triton_device

__all__ = ["routed_attention", "routed_attention_reference"]

_REGISTRY = _BackendRegistry("routed_attention")
_INDEX_DTYPES = (torch.int32, torch.int64)


def _check_inputs(q, k, v, regions, n_win) -> int:
    """Shapes, dtypes and devices of ``routed_attention``'s arguments; returns ``n_win``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, ndim=5)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype; got {q.dtype=}, {k.dtype=}, {v.dtype=}.")
    if q.shape != k.shape or q.shape[:4] != v.shape[:4]:
        raise ValueError(
            "q, k and v must be (B, H, Y, X, D), v with its own last dim; "
            f"got q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}."
        )
    n_win = _check_int("n_win", n_win, minimum=1)
    if q.shape[2] % n_win or q.shape[3] % n_win:
        raise ValueError(
            f"n_win must divide the map (Y, X) = {tuple(q.shape[2:4])}; got {n_win=}. Pad the map to a multiple."
        )
    _check_tensor("regions", regions, ndim=3, dtypes=_INDEX_DTYPES)
    if regions.shape[:2] != (q.shape[0], n_win * n_win) or not 1 <= regions.shape[2] <= n_win * n_win:
        raise ValueError(
            f"regions must be (B, n_win², k) with 1 <= k <= n_win² = {n_win * n_win}, B = {q.shape[0]}; "
            f"got regions.shape={tuple(regions.shape)}."
        )
    for name, t in (("k", k), ("v", v), ("regions", regions)):
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device; got {name}.device={t.device}, q.device={q.device}.")
    return n_win


def _check_region_ids(regions: torch.Tensor, n_win: int) -> None:
    """Every row of ``regions`` holds distinct ids in ``[0, n_win²)`` (an out-of-range id would make the kernels read
    outside the map, a repeated one would count its region twice forward and once backward). One host sync."""
    ids = regions.sort(dim=-1).values
    bad = (ids[..., 0] < 0) | (ids[..., -1] >= n_win * n_win) | (ids[..., 1:] == ids[..., :-1]).any(-1)
    if bool(bad.any()):
        row = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(
            f"regions must hold distinct region ids in [0, n_win² = {n_win * n_win}) in every row; got "
            f"regions[{row[0]}, {row[1]}] = {regions[row].tolist()}."
        )


def _region_ids(height: int, width: int, n_win: int, device) -> torch.Tensor:
    """``(Y * X,)`` region of each raster token."""
    rows = torch.arange(height, device=device) // (height // n_win)
    cols = torch.arange(width, device=device) // (width // n_win)
    return (rows[:, None] * n_win + cols[None, :]).flatten()


def routed_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, regions: torch.Tensor, *, n_win: int, scale: float
) -> torch.Tensor:
    """Dense masked softmax over the routed token pairs (any float dtype; fp16/bf16 compute in fp32)."""
    batch, heads, height, width, _ = q.shape
    compute = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
    qc, kc, vc = (t.flatten(2, 3).to(compute) for t in (q, k, v))
    routed = torch.zeros(batch, n_win**2, n_win**2, dtype=torch.bool, device=q.device)
    routed.scatter_(2, regions.long(), True)
    region = _region_ids(height, width, n_win, q.device)
    allowed = routed[:, region[:, None], region[None, :]]  # (B, N, N)
    scores = torch.einsum("bhqd,bhkd->bhqk", qc, kc) * scale
    weights = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
    out = torch.einsum("bhqk,bhkd->bhqd", weights, vc).to(q.dtype)
    return out.unflatten(2, (height, width))


# ---------------------------------------------------------------------------------------------- triton backend
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Region sizes of the Triton backend: one region's tokens are one tile of rows (padded to a power of two).
MAX_TRITON_REGION = 128


@custom_op("visionattn::routed_attention_fwd")
def _routed_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, regions: torch.Tensor, n_win: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels.routed import routed_attention_fwd

    return routed_attention_fwd(q, k, v, regions, n_win, scale)


def _empty_heads_inner(t: torch.Tensor, last: int) -> torch.Tensor:
    b, h, y, x, _ = t.shape
    return t.new_empty(b, y, x, h, last).permute(0, 3, 1, 2, 4)


@_routed_fwd_op.register_fake
def _(q, k, v, regions, n_win, scale):
    b, h, y, x, _ = q.shape
    return _empty_heads_inner(q, v.shape[-1]), q.new_empty(b, h, y * x, dtype=torch.float32)


@custom_op("visionattn::routed_attention_bwd")
def _routed_bwd_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    regions: torch.Tensor,
    n_win: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.routed import routed_attention_bwd

    return routed_attention_bwd(do, q, k, v, out, lse, regions, n_win, scale)


@_routed_bwd_op.register_fake
def _(do, q, k, v, *args):
    return _empty_heads_inner(q, q.shape[-1]), _empty_heads_inner(k, k.shape[-1]), _empty_heads_inner(v, v.shape[-1])


def _setup_context(ctx, inputs, output):
    q, k, v, regions, n_win, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], regions)
    ctx.n_win, ctx.scale = n_win, scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, regions = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout
    dq, dk, dv = _routed_bwd_op(dout, q, k, v, out, lse, regions, ctx.n_win, ctx.scale)
    return dq, dk, dv, None, None, None


_routed_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _pairs(q_shape, regions_shape) -> int:
    """Query-key token pairs: every query attends to ``k`` regions of its own size."""
    batch, heads, height, width, _ = q_shape
    region = (height * width) // regions_shape[1]
    return batch * heads * height * width * regions_shape[2] * region


@register_flop_formula(torch.ops.visionattn.routed_attention_fwd)
def _fwd_flops(q_shape, k_shape, v_shape, regions_shape, *_, **__):
    """QK^T and PV over the routed pairs: 2 * pairs * (D + Dv)."""
    return 2 * _pairs(q_shape, regions_shape) * (q_shape[-1] + v_shape[-1])


@register_flop_formula(torch.ops.visionattn.routed_attention_bwd)
def _bwd_flops(do_shape, q_shape, k_shape, v_shape, out_shape, lse_shape, regions_shape, *_, **__):
    """QK^T (twice), dP, dV, dQ, dK over the routed pairs: 2 * pairs * (4 D + 2 Dv)."""
    return 2 * _pairs(q_shape, regions_shape) * (4 * q_shape[-1] + 2 * v_shape[-1])


def _triton_supports_regions(args: dict, raise_error: bool) -> bool:
    q, n_win = args["q"], args["n_win"]
    tokens = (q.shape[2] // n_win) * (q.shape[3] // n_win)
    if tokens > MAX_TRITON_REGION:
        return _fail(
            raise_error,
            NotImplementedError,
            f"regions must hold at most {MAX_TRITON_REGION} tokens for backend='triton'; got {tokens} "
            f"((Y / n_win) x (X / n_win) for q.shape={tuple(q.shape)}, {n_win=}). Use block_sparse_attention.",
        )
    return True


@_REGISTRY.register(
    "triton",
    constraints=[
        _requires_triton_device("q", "k", "v", "regions"),
        _requires_dtype("q", _TRITON_DTYPES),
        _requires_head_dim_range("q", 1, 128),
        _requires_head_dim_range("v", 1, 128),
        _triton_supports_regions,
    ],
)
def _routed_attention_triton(q, k, v, regions, *, n_win: int, scale: float) -> torch.Tensor:
    return _routed_fwd_op(q, k, v, regions, n_win, scale)[0]


_REGISTRY.register("reference")(routed_attention_reference)


def routed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    regions: torch.Tensor,
    *,
    n_win: int,
    scale: float | None = None,
    backend: str | None = None,
    check_regions: bool = True,
) -> torch.Tensor:
    r"""Softmax attention of each query region over the tokens of its routed key regions.

    .. math:: O_i = \operatorname{softmax}_{j \in \mathcal{T}(I^r_{\rho(i)})}(s\, q_i \cdot k_j)\, v_j

    with :math:`\rho(i)` the region of token :math:`i`, :math:`I^r_\rho` its routed regions (``regions``) and
    :math:`\mathcal{T}(I)` their tokens: BiFormer's token-to-token attention over the gathered key-value pairs
    (Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention", arXiv 2303.08810, Eq. 6), read
    in place from the map instead of gathered.

    Args:
        q: queries ``(B, H, Y, X, D)`` in raster order; any strides (the ``(B, Y, X, H, D)`` view of a qkv
            projection, permuted, is read without a copy).
        k: keys ``(B, H, Y, X, D)``.
        v: values ``(B, H, Y, X, Dv)``.
        regions: ``(B, n_win², k)`` int32/int64 routed key regions of each query region (row-major region ids);
            each row must hold ``k`` distinct ids in ``[0, n_win²)`` (see ``check_regions``).
        n_win: regions per side; must divide ``Y`` and ``X``.
        scale: score scale ``s``; ``None`` means ``D ** -0.5``.

    Other Parameters:
        backend: ``"triton"`` (CUDA, or CPU with ``TRITON_INTERPRET=1``; regions of at most 128 tokens) or
            ``"reference"``; ``None`` picks the first that supports the input.
        check_regions: check the ids in ``regions`` (one host synchronisation; skipped under ``torch.compile``).
            ``False`` for ids known valid, e.g. a ``topk`` over the region scores as ``BiLevelRoutingAttention``
            builds them.

    Returns:
        ``(B, H, Y, X, Dv)`` in q's dtype (the Triton backend stores it as ``(B, Y, X, H, Dv)``).

    Raises:
        TypeError: ``q``/``k``/``v`` are not float tensors of one dtype, or ``regions`` is not an integer tensor.
        ValueError: shapes disagree, ``n_win`` does not divide the map, or a row of ``regions`` holds an id
            outside ``[0, n_win²)`` or twice.
        NotImplementedError: the named backend cannot run this input.

    Example:
        >>> q = k = v = torch.randn(1, 2, 4, 4, 16)
        >>> regions = torch.tensor([[[0], [1], [2], [3]]])  # each region attends to itself
        >>> routed_attention(q, k, v, regions, n_win=2, backend="reference").shape
        torch.Size([1, 2, 4, 4, 16])
    """
    n_win = _check_inputs(q, k, v, regions, n_win)
    if check_regions and not torch.compiler.is_compiling():
        _check_region_ids(regions, n_win)
    scale = _check_scale(scale, q.shape[-1])
    fn = _REGISTRY.select(backend, {"q": q, "k": k, "v": v, "regions": regions, "n_win": n_win})
    return fn(q, k, v, regions, n_win=n_win, scale=scale)
