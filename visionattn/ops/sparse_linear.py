"""Sparse-linear attention (SLA): softmax attention on the critical key blocks, linear attention on the marginal ones.

Shape legend: ``B`` batch, ``H`` heads, ``Nq``/``Nk`` query/key tokens, ``D`` query/key head dim, ``Dv`` value head
dim, ``Mq``/``Mk`` query/key blocks of ``block_q``/``block_k`` tokens.

Zhang et al., "SLA: Beyond Sparsity in Diffusion Transformers via Fine-Tunable Sparse-Linear Attention",
arXiv 2509.24006; semantics of the fused SLA-1 code (thu-ml/SLA, branch ``SLA-1``, Apache-2.0): per query block the
``topk_ratio`` fraction of key blocks with the highest pooled score is critical, every other block is marginal (the
paper's optional negligible class, ``skip_ratio``, is off by default as in the code).
"""

import weakref

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from ..kernels._config import is_interpreter
from ..layout._utils import _memoized, _shape_constants
from ..layout.block_mask import BlockMask
from ..layout.routing import _topk_ratio_select
from ._checks import _check_attention_inputs, _check_choice, _check_int, _check_scale, _check_tensor
from ._eager import custom_op
from ._registry import (
    _BackendRegistry,
    _fail,
    _requires_dtype,
    _requires_head_dim_range,
    _requires_triton_device,
    _triton_available,
)
from .block_sparse import _check_block_mask, _mask_launch_args, block_sparse_attention_reference
from .linear import _check_eps, _feature_map

__all__ = ["sparse_linear_attention", "sparse_linear_attention_reference"]

_FEATURE_MAPS = ("softmax", "elu1", "relu")
_REGISTRY = _BackendRegistry("sparse_linear_attention")
#: Default guard of the linear branch's normaliser (SLA-1 uses none, SLA's main branch 1e-5); keeps relu finite.
_DEFAULT_EPS = 1e-6


# ---------------------------------------------------------------------------------------------- block selection
def _check_ratio(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a float in [0, 1]; got {name}={value!r}.")
    return float(value)


def _empty_csr(rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indptr, indices)`` of a block set keeping no block in any of ``rows`` rows, broadcast over batch and
    heads (the negligible set without ``skip_ratio``: ``Mq`` rows); made once per ``rows`` and device."""
    make = lambda: (
        torch.zeros(1, 1, rows + 1, dtype=torch.int32, device=device),
        torch.zeros(0, dtype=torch.int32, device=device),
    )
    return _shape_constants(("sla_empty_csr", rows), device, make)


#: ``critical mask -> {(B, H, dtype): marginal weights}`` for calls without a negligible set; see _marginal_weights.
_MARGINAL_WEIGHTS: "weakref.WeakKeyDictionary[BlockMask, dict]" = weakref.WeakKeyDictionary()


def _marginal_weights(critical: BlockMask, negligible: BlockMask | None, neg_csr, batch: int, heads: int, dtype,
                      uniform_rows: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The marginal block matrix of the kernels (``marginal_weights``: ``(B·H, Mq, Mk)`` in the state dtype and in
    fp32) for q of ``(batch, heads)`` and ``dtype``. Without a negligible set it depends on the critical mask alone,
    so a mask used a second time (a ``block_mask`` kept over diffusion steps; not ``topk_ratio``'s per-call masks)
    stores it for later calls (``layout._utils._memoized``: not under ``torch.compile``, a dispatch mode, or on a
    miss while a CUDA graph captures): four small kernels fewer per call, ``6·B·H·Mq·Mk`` bytes kept while the mask
    lives."""
    from ..kernels.sparse_linear_state import marginal_block_matrix, marginal_weights, state_dtype

    dtype = state_dtype(dtype)

    def make():
        csrs = critical.indptr, critical.indices, *neg_csr
        marginal = marginal_block_matrix(*csrs, critical.num_kv_blocks, dtype, uniform_rows)
        return marginal_weights(marginal, batch, heads, dtype)

    if negligible is not None or torch.compiler.is_compiling():
        return make()
    store = _MARGINAL_WEIGHTS.get(critical)
    if store is None:  # the mask's first call: only marked as seen
        _MARGINAL_WEIGHTS[critical] = {}
        return make()
    return _memoized(store, (batch, heads, dtype), critical.device, make)


#: Largest head dim of the selection's pooling kernel (one ``[rows, D]`` tile per load).
_POOL_MAX_HEAD_DIM = 128


@custom_op("visionattn::sparse_linear_block_means")
def _block_means_op(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q̄, K̄)`` of ``topk_ratio_block_mask`` from the kernel: q and k read in place, ``K − 1μᵀ`` never stored."""
    from ..kernels.block_pool import block_pool_fwd

    return block_pool_fwd(q, k, block_q, block_k)


@_block_means_op.register_fake
def _(q, k, block_q, block_k):
    means = lambda t, block: t.new_empty(*t.shape[:2], -(-t.shape[2] // block), t.shape[3])
    return means(q, block_q), means(k, block_k)


def _pooled_blocks(q, k, block_q: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The selection's block means from the kernel where Triton runs (CUDA, or CPU under the interpreter: the tests)
    on its dtypes and head dims; else None, and the layout pools in PyTorch (the same values up to the order of the
    fp32 sums)."""
    on_triton = q.device.type == "cuda" or (q.device.type == "cpu" and is_interpreter())
    if not (_triton_available() and on_triton and q.dtype in _TRITON_DTYPES and q.shape[-1] <= _POOL_MAX_HEAD_DIM):
        return None
    return _block_means_op(q.detach(), k.detach(), block_q, block_k)


def _select_blocks(q, k, topk_ratio: float, skip_ratio: float, block_q: int, block_k: int):
    """``(critical, negligible)`` BlockMasks: top ``int(topk_ratio·Mk)`` and bottom ``int(skip_ratio·Mk)`` blocks
    of each query block's pooled scores (the bottom count is capped so that the two sets never overlap);
    ``negligible`` is None for ``skip_ratio == 0``. Every query block keeps the same number of blocks, so both CSRs
    have static shapes: no host sync. The arguments are checked by the caller (as ``sparse_linear_attention`` does)."""
    pooled = _pooled_blocks(q, k, block_q, block_k)
    if skip_ratio == 0:
        return _topk_ratio_select(q, k, block_q, block_k, topk_ratio, pooled=pooled), None
    critical, scores = _topk_ratio_select(q, k, block_q, block_k, topk_ratio, return_scores=True, pooled=pooled)
    num_k = scores.shape[-1]
    kept = min(num_k, int(topk_ratio * num_k))
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(-1, critical.indices.view(*scores.shape[:-1], kept).long(), True)
    count = min(int(skip_ratio * num_k), num_k - kept)
    lowest = scores.masked_fill(keep, float("inf")).topk(count, dim=-1, largest=False).indices
    negligible = BlockMask._from_row_topk(lowest, q_len=q.shape[2], kv_len=k.shape[2], block_q=block_q, block_k=block_k)
    return critical, negligible


# ---------------------------------------------------------------------------------------------- reference
def _reference_branches(q, k, v, critical: BlockMask, negligible: BlockMask | None, *, feature_map: str, scale, eps):
    """``(o_sparse, o_linear)`` from the dense equations (fp16/bf16 compute in fp32)."""
    compute = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
    o_sparse = block_sparse_attention_reference(q, k, v, critical, scale=scale)
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    marginal = ~critical.to_dense().to(q.device)
    if negligible is not None:
        marginal = marginal & ~negligible.to_dense().to(q.device)
    kernel = torch.einsum("bhqd,bhkd->bhqk", _feature_map(qc, feature_map), _feature_map(kc, feature_map))
    kernel = kernel * marginal
    has_marginal = marginal.any(-1, keepdim=True)
    denom = torch.where(has_marginal, kernel.sum(-1, keepdim=True) + eps, torch.ones_like(kernel[..., :1]))
    o_linear = torch.where(has_marginal, (kernel @ vc) / denom, torch.zeros_like(vc[:, :, :1]))
    return o_sparse, o_linear.to(q.dtype)


def _combine(o_sparse, o_linear, proj_weight, proj_bias) -> torch.Tensor:
    """``o_sparse + proj(o_linear)``; a missing weight is the identity, the projection runs in the weight's dtype."""
    if proj_weight is not None:
        o_linear = F.linear(o_linear.to(proj_weight.dtype), proj_weight, proj_bias)
    elif proj_bias is not None:
        o_linear = o_linear + proj_bias
    return o_sparse + o_linear.to(o_sparse.dtype)


def sparse_linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    critical: BlockMask,
    negligible: BlockMask | None = None,
    proj_weight: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    *,
    feature_map: str = "softmax",
    scale: float | None = None,
    eps: float = _DEFAULT_EPS,
) -> torch.Tensor:
    """SLA from its equations on explicit block sets (any float dtype; the oracle of the tests).

    The dense form of the linear branch: ``o_l,i = Σ_j m_ij φ(q_i)·φ(k_j) v_j / (Σ_j m_ij φ(q_i)·φ(k_j) + eps)``
    with ``m_ij = 1`` iff key ``j`` lies in a marginal block of query ``i``'s block; ``o_l,i = 0`` without one.
    """
    scale = _check_scale(scale, q.shape[-1])
    branches = _reference_branches(q, k, v, critical, negligible, feature_map=feature_map, scale=scale, eps=eps)
    return _combine(*branches, proj_weight, proj_bias)


# ---------------------------------------------------------------------------------------------- triton backend
#: Head dims of the Triton backend: any in [16, 128] (padded to a power-of-two tile in-kernel, masked).
_TRITON_HEAD_DIMS = (16, 128)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Largest logical block the kernels tile.
_MAX_BLOCK = 128


def _triton_supports_blocks(args: dict, raise_error: bool) -> bool:
    mask = args["critical"]
    if max(mask.block_q, mask.block_k) > _MAX_BLOCK:
        return _fail(
            raise_error,
            NotImplementedError,
            f"block_q and block_k must be at most {_MAX_BLOCK} for backend='triton'; "
            f"got block_q={mask.block_q}, block_k={mask.block_k}.",
        )
    return True


@custom_op("visionattn::sparse_linear_state")
def _sla_state_op(k: torch.Tensor, v: torch.Tensor, block_k: int, feature: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's per-key-block states ``h_j = φ(K_j)ᵀV_j``, ``z_j = Σ φ(K_j)`` (``sparse_linear_state``): its
    own op so that the inference path launches it before the rest of its host work."""
    from ..kernels.sparse_linear_state import sparse_linear_state

    return sparse_linear_state(k, v, block_k, feature)


@_sla_state_op.register_fake
def _(k, v, block_k, feature):
    from ..kernels.sparse_linear_state import state_dtype

    rows, blocks = k.shape[0] * k.shape[1], -(-k.shape[2] // block_k)
    states = k.new_empty(rows, blocks, k.shape[3], v.shape[3], dtype=state_dtype(k.dtype))
    return states, k.new_empty(rows, blocks, k.shape[3], dtype=torch.float32)


@custom_op("visionattn::sparse_linear_attention_fwd")
def _sla_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    partial: torch.Tensor,
    neg_indptr: torch.Tensor,
    neg_indices: torch.Tensor,
    scale: float,
    block_q: int,
    block_k: int,
    feature: int,
    eps: float,
    uniform_rows: bool,
    indptr_t: torch.Tensor,
    indices_t: torch.Tensor,
    marginal: torch.Tensor,
    marginal_z: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``uniform_rows``: both CSRs keep the same number of blocks in every row (``BlockMask._uniform_rows``);
    ``indptr_t``, ``indices_t``: the key-major critical CSR of the dK/dV pass, only saved for the backward;
    ``marginal``, ``marginal_z``: the marginal block matrix of the two CSRs (``_marginal_weights``)."""
    from ..kernels.sparse_linear import sparse_linear_fwd

    return sparse_linear_fwd(
        q, k, v, indptr, indices, partial, neg_indptr, neg_indices, scale=scale, block_q=block_q, block_k=block_k,
        feature=feature, eps=eps, uniform_rows=uniform_rows, weights=(marginal, marginal_z),
    )  # fmt: skip


@_sla_fwd_op.register_fake
def _(q, k, v, *args):
    from ..kernels.block_sparse import empty_like_layout

    rows = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    return empty_like_layout(q, v.shape[-1]), empty_like_layout(q, v.shape[-1]), rows, torch.empty_like(rows)


@custom_op("visionattn::sparse_linear_attention_infer")
def _sla_infer_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    partial: torch.Tensor,
    neg_indptr: torch.Tensor,
    neg_indices: torch.Tensor,
    proj_weight: torch.Tensor | None,
    proj_bias: torch.Tensor | None,
    scale: float,
    block_q: int,
    block_k: int,
    feature: int,
    eps: float,
    uniform_rows: bool,
    marginal: torch.Tensor,
    marginal_z: torch.Tensor,
    states: torch.Tensor,
    sums: torch.Tensor,
) -> torch.Tensor:
    """The forward without autograd: ``o_s + Proj(o_l)`` from the kernel's epilogue (no branch outputs, no rows);
    ``states``, ``sums``: the per-key-block states of ``_sla_state_op``, launched before this op."""
    from ..kernels.sparse_linear import sparse_linear_fwd

    csrs = indptr, indices, partial, neg_indptr, neg_indices
    consts = dict(scale=scale, block_q=block_q, block_k=block_k, feature=feature, eps=eps, uniform_rows=uniform_rows)
    weights, blocks = (marginal, marginal_z), (states, sums)
    return sparse_linear_fwd(q, k, v, *csrs, proj=(proj_weight, proj_bias), weights=weights, states=blocks, **consts)


@_sla_infer_op.register_fake
def _(q, k, v, *args):
    from ..kernels.block_sparse import empty_like_layout

    return empty_like_layout(q, v.shape[-1])


@custom_op("visionattn::sparse_linear_attention_bwd")
def _sla_bwd_op(
    do_sparse: torch.Tensor,
    do_linear: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o_sparse: torch.Tensor,
    o_linear: torch.Tensor,
    lse: torch.Tensor,
    rden: torch.Tensor,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    neg_indptr: torch.Tensor,
    neg_indices: torch.Tensor,
    scale: float,
    block_q: int,
    block_k: int,
    feature: int,
    uniform_rows: bool,
    indptr_t: torch.Tensor,
    indices_t: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.sparse_linear_bwd import sparse_linear_bwd

    return sparse_linear_bwd(
        do_sparse, do_linear, q, k, v, o_sparse, o_linear, lse, rden, indptr, indices, neg_indptr, neg_indices,
        scale=scale, block_q=block_q, block_k=block_k, feature=feature, key_major=(indptr_t, indices_t),
        uniform_rows=uniform_rows,
    )  # fmt: skip


@_sla_bwd_op.register_fake
def _(do_sparse, do_linear, q, k, v, *args):
    from ..kernels.block_sparse import empty_like_layout

    return tuple(empty_like_layout(t, t.shape[-1]) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, indptr, indices, partial, neg_indptr, neg_indices, scale, block_q, block_k, feature, eps, *rest = inputs
    uniform_rows, *key_major = rest[:3]
    o_sparse, o_linear, lse, rden = output
    ctx.save_for_backward(q, k, v, o_sparse, o_linear, lse, rden, indptr, indices, neg_indptr, neg_indices, *key_major)
    ctx.scale, ctx.block_q, ctx.block_k, ctx.feature, ctx.uniform_rows = scale, block_q, block_k, feature, uniform_rows


def _backward(ctx, do_sparse, do_linear, _dlse, _drden):
    q, k, v, o_sparse, o_linear, lse, rden, *csrs = ctx.saved_tensors
    do_sparse = torch.zeros_like(o_sparse) if do_sparse is None else do_sparse
    do_linear = torch.zeros_like(o_linear) if do_linear is None else do_linear
    dq, dk, dv = _sla_bwd_op(
        do_sparse, do_linear, q, k, v, o_sparse, o_linear, lse, rden, *csrs[:4],
        ctx.scale, ctx.block_q, ctx.block_k, ctx.feature, ctx.uniform_rows, *csrs[4:],
    )  # fmt: skip
    # q, k, v, the 5 row CSR tensors, scale, block_q, block_k, feature, eps, uniform_rows, the 2 key-major CSR
    # tensors, the 2 marginal weight tensors
    return dq, dk, dv, *[None] * 15


_sla_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _linear_flops(q_shape, k_shape, v_shape, block_q: int, block_k: int, *, backward: bool) -> int:
    """The linear branch's matmuls on ``D x Dv`` states, in units of ``2·B·H·D·Dv``: forward ``Nk`` (per-block
    states ``φ(K_j)ᵀV_j``) + ``Nq`` (``φ(q)S``) + ``Mq·Mk`` (the masked sums of the states); backward ``Nk`` (states
    recomputed) + ``2·Nq`` (``dS``, ``dφ(q)``) + ``2·Nk`` (``dV``, ``dφ(k)``) + ``2·Mq·Mk`` (two masked sums)."""
    b, h, nq, d = q_shape
    nk = k_shape[2]
    blocks = -(-nq // block_q) * -(-nk // block_k)
    rows = 3 * nk + 2 * nq + 2 * blocks if backward else nk + nq + blocks
    return 2 * b * h * d * v_shape[-1] * rows


def _critical_pairs(q_shape, indptr_shape, indices_shape, block_q: int, block_k: int) -> int:
    broadcast = (q_shape[0] * q_shape[1]) // (indptr_shape[0] * indptr_shape[1])
    return indices_shape[0] * broadcast * block_q * block_k


@register_flop_formula(torch.ops.visionattn.sparse_linear_attention_fwd)
def _fwd_flops(q_shape, k_shape, v_shape, indptr_shape, indices_shape, partial_shape, neg_indptr_shape,
               neg_indices_shape, scale, block_q, block_k, *_, **__):  # fmt: skip
    """QKᵀ and PV over the critical blocks plus the linear branch."""
    pairs = _critical_pairs(q_shape, indptr_shape, indices_shape, block_q, block_k)
    return 2 * pairs * (q_shape[-1] + v_shape[-1]) + _linear_flops(
        q_shape, k_shape, v_shape, block_q, block_k, backward=False
    )


def _state_flops_of(k_shape, v_shape) -> int:
    """The per-block states ``φ(K_j)ᵀV_j``: ``2·B·H·Nk·D·Dv``."""
    return 2 * k_shape[0] * k_shape[1] * k_shape[2] * k_shape[3] * v_shape[-1]


@register_flop_formula(torch.ops.visionattn.sparse_linear_state)
def _state_flops(k_shape, v_shape, *_, **__):
    return _state_flops_of(k_shape, v_shape)


@register_flop_formula(torch.ops.visionattn.sparse_linear_attention_infer)
def _infer_flops(q_shape, k_shape, v_shape, indptr_shape, indices_shape, partial_shape, neg_indptr_shape,
                 neg_indices_shape, proj_weight_shape, proj_bias_shape, scale, block_q, block_k, *_, **__):  # fmt: skip
    """The forward's matmuls but the per-block states (``_sla_state_op`` counts them) plus ``Proj``
    (``2·B·H·Nq·Dv²`` with a weight)."""
    proj = 2 * q_shape[0] * q_shape[1] * q_shape[2] * v_shape[-1] ** 2 if proj_weight_shape is not None else 0
    return proj - _state_flops_of(k_shape, v_shape) + _fwd_flops(q_shape, k_shape, v_shape, indptr_shape,
        indices_shape, partial_shape, neg_indptr_shape, neg_indices_shape, scale, block_q, block_k)  # fmt: skip


@register_flop_formula(torch.ops.visionattn.sparse_linear_attention_bwd)
def _bwd_flops(do_s_shape, do_l_shape, q_shape, k_shape, v_shape, o_s_shape, o_l_shape, lse_shape, rden_shape,
               indptr_shape, indices_shape, neg_indptr_shape, neg_indices_shape, scale, block_q, block_k, *_,
               **__):  # fmt: skip
    """Five block-sparse matmuls over the critical blocks plus the linear branch's backward matmuls."""
    pairs = _critical_pairs(q_shape, indptr_shape, indices_shape, block_q, block_k)
    return 2 * pairs * (3 * q_shape[-1] + 2 * v_shape[-1]) + _linear_flops(
        q_shape, k_shape, v_shape, block_q, block_k, backward=True
    )


@_REGISTRY.register(
    "triton",
    constraints=[
        _requires_triton_device("q", "k", "v"),
        _requires_dtype("q", _TRITON_DTYPES),
        _requires_head_dim_range("q", *_TRITON_HEAD_DIMS),
        _requires_head_dim_range("v", *_TRITON_HEAD_DIMS),
        _triton_supports_blocks,
    ],
)
def _sparse_linear_triton(
    q, k, v, critical: BlockMask, negligible: BlockMask | None, *, feature_map: str, scale, eps, proj_weight, proj_bias
):
    from ..kernels.linear import FEATURE_CODES

    feature = FEATURE_CODES[feature_map]
    proj = [t for t in (proj_weight, proj_bias) if t is not None]
    grad = torch.is_grad_enabled()
    qkv_grad = grad and (q.requires_grad or k.requires_grad or v.requires_grad)
    differentiable = qkv_grad or grad and any(t.requires_grad for t in proj)
    # nothing to differentiate: Proj and the sum run in the kernel's epilogue
    infer = not differentiable and all(t.dtype in _TRITON_DTYPES for t in proj)
    # the state pass first: the GPU starts on it while the host prepares the CSRs and the marginal matrix
    states = _sla_state_op(k, v, critical.block_k, feature) if infer else None
    csr = critical.indptr, critical.indices, critical.partial
    if negligible is None:
        neg_csr = _empty_csr(critical.num_q_blocks, q.device)
    else:
        neg_csr = negligible.indptr, negligible.indices
    # the empty negligible set has uniform rows (none)
    uniform_rows = critical._uniform_rows and (negligible is None or negligible._uniform_rows)
    consts = critical.block_q, critical.block_k, feature, eps, uniform_rows
    weights = _marginal_weights(critical, negligible, neg_csr, *q.shape[:2], q.dtype, uniform_rows)
    if infer:
        return _sla_infer_op(q, k, v, *csr, *neg_csr, proj_weight, proj_bias, scale, *consts, *weights, *states)
    # The key-major critical CSR of the dK/dV pass is built here, so that the backward only launches kernels; cached
    # per mask (a block_mask reused across calls is transposed once). Without a gradient the rows stand in, unread.
    key_major = _mask_launch_args(critical, True)[2][:2] if qkv_grad else csr[:2]
    o_sparse, o_linear, _, _ = _sla_fwd_op(q, k, v, *csr, *neg_csr, scale, *consts, *key_major, *weights)
    return _combine(o_sparse, o_linear, proj_weight, proj_bias)


_REGISTRY.register("reference")(sparse_linear_attention_reference)


# ---------------------------------------------------------------------------------------------- public op
def _check_proj(proj_weight, proj_bias, v: torch.Tensor) -> None:
    dv = v.shape[-1]
    for name, t, shape in (("proj_weight", proj_weight, (dv, dv)), ("proj_bias", proj_bias, (dv,))):
        if t is None:
            continue
        _check_tensor(name, t, ndim=len(shape))
        if tuple(t.shape) != shape or t.device != v.device:
            raise ValueError(
                f"{name} must have shape {shape} (Dv = v.shape[-1]) on v's device; "
                f"got {name}.shape={tuple(t.shape)} on {t.device}."
            )


def _check_critical_mask(block_mask, q, k, skip_ratio: float) -> None:
    _check_block_mask(block_mask, q, k)
    if skip_ratio:
        raise ValueError(f"skip_ratio must be 0 when block_mask is given (it needs pooled scores); got {skip_ratio=}.")
    # a mask without token predicate has no partial block (BlockMask enforces it): no device sync on that path
    if block_mask.token_mask is not None and bool(block_mask.partial.any()):
        raise ValueError(
            "block_mask must have no partial blocks (the linear branch works on whole blocks); "
            f"got {int(block_mask.partial.sum())} partial blocks."
        )


def sparse_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_weight: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    *,
    topk_ratio: float | None = None,
    skip_ratio: float = 0.0,
    block_mask: BlockMask | None = None,
    feature_map: str = "softmax",
    block_q: int = 64,
    block_k: int = 64,
    scale: float | None = None,
    eps: float = _DEFAULT_EPS,
    return_sparsity: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, float]:
    r"""Sparse-linear attention: softmax on the critical key blocks, linear attention on the marginal ones.

    .. math:: O_i = \operatorname{softmax}\big(s\, q_i K_{\mathcal{C}(i)}^\top\big) V_{\mathcal{C}(i)}
        + \operatorname{Proj}\Big(\frac{\phi(q_i)^\top \sum_{j \in \mathcal{M}(i)} \phi(K_j)^\top V_j}
        {\phi(q_i)^\top \sum_{j \in \mathcal{M}(i)} \phi(K_j)^\top \mathbf{1} + \epsilon}\Big)

    (Zhang et al., arXiv 2509.24006, Sec. 4, Fig. 4) with :math:`\mathcal{C}(i)` the critical key blocks of query
    ``i``'s block: the ``min(Mk, int(topk_ratio·Mk))`` blocks of highest pooled score ``mean(Q_b)·mean(K_j − k̄)``
    (``visionattn.layout.topk_ratio_block_mask``, as SLA's ``get_block_map``); :math:`\mathcal{N}(i)` the
    ``int(skip_ratio·Mk)`` lowest-scored blocks (negligible: neither branch); :math:`\mathcal{M}(i)` every other
    block (marginal). The linear branch is 0 for a query block without marginal blocks, so at ``topk_ratio=1``
    the output is dense softmax attention plus ``proj_bias`` (SLA-1 does the same).

    Args:
        q: queries ``(B, H, Nq, D)``; any strides.
        k: keys ``(B, H, Nk, D)``.
        v: values ``(B, H, Nk, Dv)``.
        proj_weight: ``Proj`` weight ``(Dv, Dv)``, shared by all heads (SLA's zero-initialised ``proj_l``);
            ``None`` is the identity.
        proj_bias: ``Proj`` bias ``(Dv,)`` or ``None``.
        topk_ratio: fraction of key blocks each query block attends with softmax (SLA's ``topk``).
        skip_ratio: fraction of key blocks skipped by both branches (the paper's negligible class; SLA's code: 0).
        block_mask: explicit critical blocks instead of ``topk_ratio`` (no partial blocks; e.g. a mask reused
            across diffusion steps); exactly one of ``topk_ratio`` and ``block_mask`` is given.
        feature_map: ``φ``: ``"softmax"`` over the head dim (SLA's default), ``"elu1"`` (SLA's ``"elu"``) or
            ``"relu"``.
        block_q: tokens per query block (ignored with ``block_mask``).
        block_k: tokens per key block (ignored with ``block_mask``).
        scale: softmax scale ``s``; ``None`` means ``D ** -0.5``.
        eps: ``ε`` of the normaliser (SLA-1: 0; SLA's main branch 1e-5).
        return_sparsity: also return the realised density (fraction of kept critical blocks, SLA's
            ``real_topk / Mk``).

    Other Parameters:
        backend: ``"triton"`` (CUDA, or CPU with ``TRITON_INTERPRET=1``) or ``"reference"``; ``None`` picks the
            first that supports the input.

    Returns:
        ``out`` ``(B, H, Nq, Dv)`` in q's dtype, and with ``return_sparsity`` also the density (a float).

    Raises:
        TypeError: tensors of the wrong type or dtype, ``block_mask`` not a ``BlockMask``, or a block size not an
            int.
        ValueError: shapes disagree, ratios outside ``[0, 1]``, a block size below 1, both or neither of
            ``topk_ratio`` and ``block_mask``, or an unknown ``feature_map``.
        NotImplementedError: the named backend cannot run this input.

    Example:
        >>> q = k = v = torch.randn(1, 2, 256, 16)
        >>> out, density = sparse_linear_attention(q, k, v, topk_ratio=0.5, return_sparsity=True)
        >>> out.shape, density
        (torch.Size([1, 2, 256, 16]), 0.5)
    """
    _check_attention_inputs(q, k, v)
    _check_proj(proj_weight, proj_bias, v)
    feature_map = _check_choice("feature_map", feature_map, _FEATURE_MAPS)
    scale = _check_scale(scale, q.shape[-1])
    eps = _check_eps(eps)
    skip_ratio = _check_ratio("skip_ratio", skip_ratio)
    if (topk_ratio is None) == (block_mask is None):
        raise ValueError(
            f"exactly one of topk_ratio and block_mask must be given; got topk_ratio={topk_ratio!r}, "
            f"block_mask={'None' if block_mask is None else 'a BlockMask'}."
        )
    if block_mask is None:
        topk_ratio = _check_ratio("topk_ratio", topk_ratio)
        block_q, block_k = _check_int("block_q", block_q), _check_int("block_k", block_k)
        critical, negligible = _select_blocks(q, k, topk_ratio, skip_ratio, block_q, block_k)
    else:
        _check_critical_mask(block_mask, q, k, skip_ratio)
        critical, negligible = block_mask, None
    args = {"q": q, "k": k, "v": v, "critical": critical}
    fn = _REGISTRY.select(backend, args)
    out = fn(
        q, k, v, critical, negligible, feature_map=feature_map, scale=scale, eps=eps, proj_weight=proj_weight,
        proj_bias=proj_bias,
    )  # fmt: skip
    return (out, critical.density()) if return_sparsity else out
