"""Sparse-linear attention (SLA): the per-key-block states and their masked sums.

Layout as in ``sparse_linear.py``. ``_sparse_linear_fwd_kernel_state`` (grid ``(Mk, B·H)``) reduces each logical key
block ``j`` to ``h_j = φ(K_j)ᵀV_j`` ``(D, Dv)`` (fp32 accumulation, stored as ``state_dtype``) and ``z_j = Σ φ(K_j)``
``(D,)`` (fp32). ``masked_block_sums`` then forms every query block's marginal state ``H_b = Σ_j M_bj h_j`` (and the key side's
``A_j = Σ_b M_bj dS_b``) as one batched matmul with the 0/1 marginal block matrix ``M`` ``(Mq, Mk)`` per head: on
tensor cores, reading each block state once, instead of SLA-1's "total minus the selected blocks" loop, which
re-reads one ``D x Dv`` state per (query block, critical block) pair inside the fused kernel (about 7 GB at the
benchmark shape B2 H16 N32760 d128, 5 % critical) and has no cancellation error.
"""

import torch
import triton
import triton.language as tl

from ._config import autotune_configs, autotune_kwargs, is_interpreter
from ._launch import launch
from .block_sparse import cdiv, next_block
from .linear import _phi

__all__ = [
    "dv_chunk",
    "marginal_block_matrix",
    "marginal_weights",
    "masked_block_sums",
    "sparse_linear_state",
    "state_dtype",
]

# Row tiles of the per-block streaming kernels (one program per logical block: the forward's states here, the
# backward's query-side and key-side kernels in sparse_linear_bwd.py). The first (the only one with
# VISIONATTN_AUTOTUNE=0) has no spills at D = Dv = 128 in all three (ptxas for sm_90a; 56 bytes of stack in the
# query-side kernel); 64 rows x 4 warps is left out (0.8-4.4 KB of spills there).
_STATE_CONFIGS = [triton.Config({"BLOCK_ROWS": r}, num_warps=w) for r, w in [(32, 8), (64, 8), (32, 4), (16, 8)]]
_STATE_DEFAULT = triton.Config({"BLOCK_ROWS": 16}, num_warps=4, num_stages=1)
_STATE_KEY = ["block", "HEAD_DIM", "HEAD_DIM_V", "FEATURE"]


# ---------------------------------------------------------------------------------------------- shared helpers
@triton.jit
def _sla_dot(a, b, STATE_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``a @ b`` of the linear branch's fp32 tiles: bf16 operands (fp32 accumulation) for bf16 inputs, as SLA-1 casts
    its states to the input dtype, which halves their registers and shared memory; else ``DOT_PRECISION``."""
    if STATE_BF16:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        out = tl.dot(a, b, input_precision=DOT_PRECISION)
    return out


# ---------------------------------------------------------------------------------------------- forward
@triton.autotune(
    configs=autotune_configs(_STATE_CONFIGS, _STATE_DEFAULT),
    key=_STATE_KEY,
    **autotune_kwargs(),
)
@triton.jit
def _sparse_linear_fwd_kernel_state(
    k_ptr,
    v_ptr,
    h_ptr,
    z_ptr,
    stride_k_b,
    stride_k_h,
    stride_k_n,
    stride_k_d,
    stride_v_b,
    stride_v_h,
    stride_v_n,
    stride_v_d,
    num_heads,
    length,
    block,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    FEATURE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // num_heads).to(tl.int64)
    i_h = (i_bh % num_heads).to(tl.int64)
    o_r = tl.arange(0, BLOCK_ROWS)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_d = o_d < HEAD_DIM
    m_dv = o_dv < HEAD_DIM_V
    m_dd = m_d[:, None] & m_dv[None, :]
    k_base = k_ptr + i_b * stride_k_b + i_h * stride_k_h
    v_base = v_ptr + i_b * stride_v_b + i_h * stride_v_h
    start = i_n * block
    end = tl.minimum(start + block, length)
    b_h = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    b_z = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r in range(start, end, BLOCK_ROWS):
        m_r = (r + o_r) < end
        # [BLOCK_ROWS, BLOCK_D]
        b_k = tl.load(
            k_base + (r + o_r)[:, None] * stride_k_n + o_d[None, :] * stride_k_d,
            mask=m_r[:, None] & m_d[None, :],
            other=0.0,
        )
        b_phi = tl.where(m_r[:, None], _phi(b_k.to(tl.float32), m_d, FEATURE), 0.0)
        # [BLOCK_ROWS, BLOCK_DV], in v's dtype: the dot takes 16-bit operands like SLA-1's c_k
        b_v = tl.load(
            v_base + (r + o_r)[:, None] * stride_v_n + o_dv[None, :] * stride_v_d,
            mask=m_r[:, None] & m_dv[None, :],
            other=0.0,
        )
        b_h += tl.dot(tl.trans(b_phi.to(b_v.dtype)), b_v, input_precision=DOT_PRECISION)
        b_z += tl.sum(b_phi, axis=0)
    i_state = i_bh.to(tl.int64) * tl.num_programs(0) + i_n
    p_h = h_ptr + i_state * (HEAD_DIM * HEAD_DIM_V) + o_d[:, None] * HEAD_DIM_V + o_dv[None, :]
    tl.store(p_h, b_h.to(h_ptr.dtype.element_ty), mask=m_dd)
    tl.store(z_ptr + i_state * HEAD_DIM + o_d, b_z.to(z_ptr.dtype.element_ty), mask=m_d)


# ---------------------------------------------------------------------------------------------- launchers
def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage of the per-block and marginal states: bf16 for bf16 inputs (as SLA-1 stores them in the input dtype;
    the fused kernels' dots take bf16 operands there anyway), which halves their bytes and runs the masked sums on
    bf16 tensor cores; fp32 otherwise (fp16's range is too narrow for the backward's ``dS_b``, and fp32 inputs are
    the exact test path). Accumulation is always fp32, and the normaliser sums ``z`` are fp32 throughout."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def dv_chunk(dv: int) -> int:
    """Value columns of the marginal state a fused kernel holds at once: 64 (a 128 x 64 fp32 slice of a 128-wide
    state, half the registers), 16 under the interpreter so small CPU tests walk several chunks."""
    return min(next_block(dv), 16 if is_interpreter() else 64)


def _csr_complement(
    indptr: torch.Tensor, indices: torch.Tensor, cols: int, dtype: torch.dtype, uniform_rows: bool
) -> torch.Tensor:
    """``(Bm, Hm, M, cols)`` in ``dtype``: 0 at the blocks of the CSR set ``(indptr (Bm, Hm, M + 1), indices)``, 1
    elsewhere; static shapes, no host sync. ``uniform_rows``: every row keeps ``indices.numel() / (Bm·Hm·M)`` blocks
    (``BlockMask._uniform_rows``), so ``indices`` is a ``(rows, count)`` matrix and the row of an entry need not be
    expanded from ``indptr``."""
    bm, hm, rows = indptr.shape[0], indptr.shape[1], indptr.shape[2] - 1
    if uniform_rows:
        total = bm * hm * rows
        dense = torch.ones(total, cols, dtype=dtype, device=indptr.device)
        dense.scatter_(1, indices.view(total, indices.numel() // max(total, 1)).long(), 0)
        return dense.view(bm, hm, rows, cols)
    counts = (indptr[..., 1:] - indptr[..., :-1]).flatten().long()
    row_of_entry = torch.repeat_interleave(
        torch.arange(bm * hm * rows, device=indptr.device), counts, output_size=indices.numel()
    )
    dense = torch.ones(bm * hm * rows * cols, dtype=dtype, device=indptr.device)
    # scatter_ with a scalar: an index assignment of a Python number would synchronise the host
    dense.scatter_(0, row_of_entry * cols + indices.long(), 0)
    return dense.view(bm, hm, rows, cols)


def marginal_block_matrix(
    indptr: torch.Tensor,
    indices: torch.Tensor,
    neg_indptr: torch.Tensor,
    neg_indices: torch.Tensor,
    num_kv_blocks: int,
    dtype: torch.dtype,
    uniform_rows: bool = False,
) -> torch.Tensor:
    """``M`` ``(B', H', Mq, Mk)`` in ``dtype``: 1 where key block ``j`` is marginal for query block ``b`` (neither
    critical nor negligible), else 0. ``B'``/``H'`` broadcast like the two CSRs' leading dims. ``uniform_rows``:
    each of the two CSRs keeps the same number of blocks in every row (``BlockMask._uniform_rows``)."""
    marginal = _csr_complement(indptr, indices, num_kv_blocks, dtype, uniform_rows)
    if neg_indices.numel():
        marginal = marginal * _csr_complement(neg_indptr, neg_indices, num_kv_blocks, dtype, uniform_rows)
    return marginal


def marginal_weights(
    marginal: torch.Tensor, batch: int, heads: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 0/1 block matrix ``marginal`` ``(B', H', R, C)`` broadcast to ``(batch·heads, R, C)``, in ``dtype`` (the
    states' weights) and in fp32 (the sums'): the left operands of ``masked_block_sums``."""
    weights = marginal.expand(batch, heads, -1, marginal.shape[-1]).reshape(batch * heads, -1, marginal.shape[-1])
    return weights.to(dtype), weights.to(torch.float32)


def masked_block_sums(
    weights: tuple[torch.Tensor, torch.Tensor], states: torch.Tensor, sums: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ_j M_ij S_j, Σ_j M_ij z_j)`` for every row ``i`` of a 0/1 block matrix ``M`` given as ``weights``
    (``marginal_weights``: ``(B·H, R, C)`` in ``states``' dtype and in fp32) over per-block states ``states``
    ``(B·H, C, D, Dv)`` and fp32 ``sums`` ``(B·H, C, D)``: one batched matmul each (fp32 accumulation). Returns
    ``(B·H, R, D, Dv)`` in ``states``' dtype and ``(B·H, R, D)`` fp32."""
    bh, cols, d, dv = states.shape
    total = torch.bmm(weights[0], states.reshape(bh, cols, d * dv)).view(bh, -1, d, dv)
    return total, torch.bmm(weights[1], sums)


def sparse_linear_state(
    k: torch.Tensor, v: torch.Tensor, block_k: int, feature: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid ``(Mk, B * H)``: each key block reduced to ``h_j = φ(K_j)ᵀV_j``, ``z_j = Σ φ(K_j)`` (fp32 accumulation).

    Returns ``h (B·H, Mk, D, Dv)`` in ``state_dtype(k.dtype)`` and ``z (B·H, Mk, D)`` fp32.
    """
    b, h, n, d = k.shape
    dv = v.shape[-1]
    blocks = cdiv(n, block_k)
    h_blocks = torch.empty(b * h, blocks, d, dv, device=k.device, dtype=state_dtype(k.dtype))
    z_blocks = torch.empty(b * h, blocks, d, device=k.device, dtype=torch.float32)
    launch(
        _sparse_linear_fwd_kernel_state,
        (blocks, b * h),
        k,
        v,
        h_blocks,
        z_blocks,
        *k.stride(),
        *v.stride(),
        h,
        n,
        block_k,
        BLOCK_D=next_block(d),
        BLOCK_DV=next_block(dv),
        HEAD_DIM=d,
        HEAD_DIM_V=dv,
        FEATURE=feature,
        DOT_PRECISION="ieee" if k.dtype == torch.float32 else "tf32",
    )
    return h_blocks, z_blocks
