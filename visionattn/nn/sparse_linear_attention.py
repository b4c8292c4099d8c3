"""SLA's attention module: block-sparse softmax plus a projected linear-attention branch, on ``(B, H, N, D)``.

Zhang et al., "SLA: Beyond Sparsity in Diffusion Transformers via Fine-Tunable Sparse-Linear Attention",
arXiv 2509.24006; reference code thu-ml/SLA (Apache-2.0), ``sparse_linear_attention/core.py``
(``SparseLinearAttention``): the same constructor knobs (``topk``, ``feature_map``, ``BLKQ``/``BLKK`` here
``block_q``/``block_k``) and the same learnable part, a zero-initialised ``proj_l`` (here ``proj``) shared by the
heads. Differences: the input dtype is kept (the reference casts to bf16/fp16 inside), ``proj`` follows the module's
dtype, and the paper's negligible blocks are available as ``skip_ratio``.
"""

import torch
from torch import nn

from ..ops import sparse_linear_attention
from ..ops._checks import _check_choice, _check_per_axis, _check_tensor
from ..ops.sparse_linear import _FEATURE_MAPS, _check_ratio

__all__ = ["SparseLinearAttention"]


class SparseLinearAttention(nn.Module):
    """Sparse-linear attention (SLA): ``o = o_sparse + proj(o_linear)`` with a zero-initialised ``proj``.

    ``o_sparse`` is softmax attention over each query block's ``topk`` fraction of highest-scored key blocks and
    ``o_linear`` linear attention over the remaining blocks (see :func:`visionattn.ops.sparse_linear_attention`).
    A freshly initialised module therefore equals block-sparse attention over the same blocks; fine-tuning ``proj``
    (with the model) brings in the linear branch. ``forward(q, k, v)`` takes ``(B, H, N, D)`` tensors (any strides,
    so a ``(B, N, H, D)`` tensor's ``transpose(1, 2)`` is read in place) and returns ``(B, H, N, D)``.
    """

    def __init__(
        self,
        head_dim: int,
        topk: float,
        feature_map: str = "softmax",
        block_q: int = 64,
        block_k: int = 64,
        skip_ratio: float = 0.0,
        scale: float | None = None,
        backend: str | None = None,
        device=None,
        dtype=None,
    ):
        """
        Args:
            head_dim: per-head channels ``D`` (q, k and v share it).
            topk: fraction of key blocks attended with softmax, in ``[0, 1]`` (SLA's ``topk``; 0.05-0.2 in the
                paper and TurboDiffusion).
            feature_map: ``φ`` of the linear branch: ``"softmax"`` over the head dim, ``"elu1"`` or ``"relu"``.
            block_q: tokens per query block, a positive int (SLA's ``BLKQ``; 64 or 128).
            block_k: tokens per key block, a positive int (SLA's ``BLKK``; 64).
            skip_ratio: fraction of key blocks neither attended nor linearised (the paper's negligible blocks).
            scale: softmax scale; ``None`` means ``head_dim ** -0.5``.
            backend: op backend (``None`` picks Triton on CUDA, the reference on CPU).
            device: parameter device.
            dtype: parameter dtype.
        """
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim must be a positive int; got {head_dim=}.")
        self.head_dim = head_dim
        self.topk = _check_ratio("topk", topk)
        self.feature_map = _check_choice("feature_map", feature_map, _FEATURE_MAPS)
        (self.block_q,) = _check_per_axis("block_q", 1, block_q)
        (self.block_k,) = _check_per_axis("block_k", 1, block_k)
        self.skip_ratio = _check_ratio("skip_ratio", skip_ratio)
        self.scale = scale
        self.backend = backend
        self.proj = nn.Linear(head_dim, head_dim, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero ``proj`` (weight and bias), as SLA does, so the module starts as pure block-sparse attention."""
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        return_sparsity: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, float]:
        """Attend ``q`` ``(B, H, Nq, D)`` to ``k``, ``v`` ``(B, H, Nk, D)``.

        Args:
            q: queries.
            k: keys.
            v: values.
            return_sparsity: also return the realised density (fraction of critical blocks).

        Returns:
            ``(B, H, Nq, D)`` in q's dtype, and with ``return_sparsity`` the density.
        """
        for name, t in (("q", q), ("k", k), ("v", v)):
            _check_tensor(name, t, ndim=4)
            if t.shape[-1] != self.head_dim:
                raise ValueError(
                    f"{name}.shape[-1] must be the module's head_dim={self.head_dim}; "
                    f"got {name}.shape={tuple(t.shape)}. Build the module with head_dim={t.shape[-1]}."
                )
        return sparse_linear_attention(
            q,
            k,
            v,
            self.proj.weight,
            self.proj.bias,
            topk_ratio=self.topk,
            skip_ratio=self.skip_ratio,
            feature_map=self.feature_map,
            block_q=self.block_q,
            block_k=self.block_k,
            scale=self.scale,
            return_sparsity=return_sparsity,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, topk={self.topk}, feature_map={self.feature_map!r}, "
            f"block=({self.block_q}, {self.block_k}), skip_ratio={self.skip_ratio}"
        )
