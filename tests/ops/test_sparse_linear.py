"""``sparse_linear_attention``: the reference against a per-block brute-force formula, its limits (topk 1 = dense,
topk 0 = linear attention), the explicit-mask path and argument errors. Kernels: tests/kernels/test_sparse_linear.py.
"""

import pytest
import torch
import torch.nn.functional as F

from tests._numerics import assert_close
from visionattn.layout import BlockMask, topk_ratio_block_mask
from visionattn.ops import block_sparse_attention, linear_attention, sparse_linear_attention
from visionattn.ops.sparse_linear import _select_blocks

_PHI = {"softmax": lambda x: x.softmax(-1), "elu1": lambda x: F.elu(x) + 1, "relu": F.relu}


def _brute_force(q, k, v, w, b, *, topk_ratio, skip_ratio, feature_map, block_q, block_k, eps):
    """Per query block: classify key blocks from pooled scores, softmax over the critical keys, and the linear
    branch from explicit per-block sums Σ φ(K_j)ᵀV_j, Σ φ(K_j) over the marginal blocks."""
    batch, heads, nq, d = q.shape
    nk = k.shape[2]
    phi = _PHI[feature_map]
    q_blocks = [slice(s, min(s + block_q, nq)) for s in range(0, nq, block_q)]
    k_blocks = [slice(s, min(s + block_k, nk)) for s in range(0, nk, block_k)]
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype)
    n_crit = min(len(k_blocks), int(topk_ratio * len(k_blocks)))
    n_skip = min(int(skip_ratio * len(k_blocks)), len(k_blocks) - n_crit)
    for bi in range(batch):
        for hi in range(heads):
            kc = k[bi, hi] - k[bi, hi].mean(0)
            pooled_k = torch.stack([kc[s].mean(0) for s in k_blocks])
            for qs in q_blocks:
                order = (q[bi, hi, qs].mean(0) @ pooled_k.T).argsort(descending=True).tolist()
                critical = order[:n_crit]
                marginal = order[n_crit : len(order) - n_skip]
                o = torch.zeros(qs.stop - qs.start, v.shape[-1], dtype=q.dtype)
                if critical:
                    keys = torch.cat([torch.arange(nk)[k_blocks[j]] for j in critical])
                    p = (q[bi, hi, qs] @ k[bi, hi, keys].T * d**-0.5).softmax(-1)
                    o = p @ v[bi, hi, keys]
                lin = torch.zeros_like(o)
                if marginal:
                    h = sum(phi(k[bi, hi, k_blocks[j]]).T @ v[bi, hi, k_blocks[j]] for j in marginal)
                    z = sum(phi(k[bi, hi, k_blocks[j]]).sum(0) for j in marginal)
                    fq = phi(q[bi, hi, qs])
                    lin = (fq @ h) / (fq @ z + eps)[:, None]
                out[bi, hi, qs] = o + lin @ w.T + b
    return out


@pytest.mark.parametrize("feature_map", ["softmax", "elu1", "relu"])
@pytest.mark.parametrize(
    "nq, nk, block_q, block_k, dv, topk_ratio, skip_ratio",
    [(40, 56, 16, 8, 8, 0.3, 0.0), (33, 47, 8, 16, 12, 0.5, 0.25), (24, 24, 8, 8, 8, 0.0, 0.4)],
    ids=lambda x: str(x),
)
def test_sparse_linear_reference_matches_block_sums(rng, feature_map, nq, nk, block_q, block_k, dv, topk_ratio,
                                                    skip_ratio):  # fmt: skip
    q = torch.randn(1, 2, nq, 8, generator=rng, dtype=torch.float64)
    k = torch.randn(1, 2, nk, 8, generator=rng, dtype=torch.float64)
    v = torch.randn(1, 2, nk, dv, generator=rng, dtype=torch.float64)
    w = torch.randn(dv, dv, generator=rng, dtype=torch.float64)
    b = torch.randn(dv, generator=rng, dtype=torch.float64)
    kw = dict(topk_ratio=topk_ratio, skip_ratio=skip_ratio, feature_map=feature_map, block_q=block_q, block_k=block_k)
    out = sparse_linear_attention(q, k, v, w, b, eps=1e-6, backend="reference", **kw)
    assert_close("out", _brute_force(q, k, v, w, b, eps=1e-6, **kw), out)


def test_sparse_linear_topk_one_is_dense_attention_plus_bias(rng):
    q, k, v = (torch.randn(2, 2, 50, 16, generator=rng, dtype=torch.float64) for _ in range(3))
    w = torch.randn(16, 16, generator=rng, dtype=torch.float64)
    b = torch.randn(16, generator=rng, dtype=torch.float64)
    out = sparse_linear_attention(q, k, v, w, b, topk_ratio=1.0, block_q=16, block_k=16, backend="reference")
    assert_close("out", F.scaled_dot_product_attention(q, k, v) + b, out)


def test_sparse_linear_topk_zero_is_linear_attention(rng):
    q, k, v = (torch.randn(1, 3, 40, 16, generator=rng, dtype=torch.float64) for _ in range(3))
    out = sparse_linear_attention(q, k, v, topk_ratio=0.0, feature_map="elu1", eps=0.0, backend="reference")
    ref = linear_attention(q, k, v, feature_map="elu1", normalize="divisive", eps=0.0, backend="reference")
    assert_close("out", ref, out)


def test_sparse_linear_skipping_every_other_block_is_block_sparse(rng):
    """topk + skip covering all blocks leaves no marginal block: the output is block-sparse attention + bias."""
    q, k, v = (torch.randn(1, 2, 64, 16, generator=rng, dtype=torch.float64) for _ in range(3))
    b = torch.randn(16, generator=rng, dtype=torch.float64)
    out = sparse_linear_attention(q, k, v, None, b, topk_ratio=0.25, skip_ratio=0.75, block_q=16, block_k=16,
                                  backend="reference")  # fmt: skip
    mask = topk_ratio_block_mask(q, k, 16, 16, 0.25)
    assert_close("out", block_sparse_attention(q, k, v, mask, backend="reference") + b, out)


def test_sparse_linear_block_mask_matches_topk_and_reports_density(rng):
    q, k, v = (torch.randn(1, 2, 64, 16, generator=rng, dtype=torch.float64) for _ in range(3))
    mask = topk_ratio_block_mask(q, k, 16, 16, 0.5)
    ref, density = sparse_linear_attention(q, k, v, topk_ratio=0.5, block_q=16, block_k=16, return_sparsity=True,
                                           backend="reference")  # fmt: skip
    out = sparse_linear_attention(q, k, v, block_mask=mask, backend="reference")
    assert_close("out", ref, out)
    assert density == mask.density() == 0.5


def test_sparse_linear_proj_none_is_identity(rng):
    q, k, v = (torch.randn(1, 1, 32, 8, generator=rng, dtype=torch.float64) for _ in range(3))
    kw = dict(topk_ratio=0.5, block_q=8, block_k=8, backend="reference")
    out = sparse_linear_attention(q, k, v, **kw)
    assert_close("out", sparse_linear_attention(q, k, v, torch.eye(8, dtype=torch.float64), **kw), out)


def _nonzero_masks(q, k, topk_ratio, skip_ratio, block_q, block_k):
    """The selection as it was built before the static-shape CSRs: scattered block matrices, ``nonzero``."""
    _, scores = topk_ratio_block_mask(q, k, block_q, block_k, topk_ratio, return_scores=True)
    mk = scores.shape[-1]
    n_crit = min(mk, int(topk_ratio * mk))
    n_skip = min(int(skip_ratio * mk), mk - n_crit)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(n_crit, dim=-1).indices, True)
    lowest = scores.masked_fill(keep, float("inf")).topk(n_skip, dim=-1, largest=False).indices
    skip = torch.zeros_like(keep).scatter_(-1, lowest, True)
    kw = dict(q_len=q.shape[2], kv_len=k.shape[2], block_q=block_q, block_k=block_k)
    return BlockMask.from_block_matrix(keep, **kw), BlockMask.from_block_matrix(skip, **kw)


@pytest.mark.parametrize(
    "nq, nk, block_q, block_k, topk_ratio, skip_ratio",
    [(64, 80, 16, 16, 0.4, 0.0), (50, 70, 16, 8, 0.3, 0.5), (24, 40, 8, 8, 0.0, 0.2), (32, 32, 8, 8, 1.0, 0.3)],
    ids=lambda x: str(x),
)
def test_sparse_linear_selection_csr_equals_nonzero_construction(rng, nq, nk, block_q, block_k, topk_ratio,
                                                                 skip_ratio):  # fmt: skip
    """The static-shape CSRs (no ``nonzero``, no partial check: no host sync) are the CSRs of the block matrices."""
    q = torch.randn(2, nq, 3, 16, generator=rng, dtype=torch.float16).transpose(1, 2)
    k = torch.randn(2, 3, nk, 16, generator=rng, dtype=torch.float16)
    critical, negligible = _select_blocks(q, k, topk_ratio, skip_ratio, block_q, block_k)
    expected = _nonzero_masks(q, k, topk_ratio, skip_ratio, block_q, block_k)
    assert (negligible is None) == (skip_ratio == 0)
    for got, ref in zip((critical, negligible), expected[: 2 if skip_ratio else 1]):
        for name in ("indptr", "indices", "partial"):
            a, b = getattr(got, name), getattr(ref, name)
            assert a.dtype == b.dtype and torch.equal(a, b), name


def test_sparse_linear_topk_traces_with_compile_fullgraph(kernel_device, rng):
    """Selection included: a ``nonzero`` or a ``bool(partial.any())`` check would break the graph."""
    q, k, v = (torch.randn(1, 2, 48, 16, generator=rng).to(kernel_device) for _ in range(3))
    fn = lambda q, k, v: sparse_linear_attention(q, k, v, topk_ratio=0.4, skip_ratio=0.3, block_q=16, block_k=16)
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
    assert_close("out", fn(q, k, v), out)


def test_sparse_linear_transposes_a_reused_mask_once(kernel_device, rng, monkeypatch):
    """The key-major CSRs of the backward are built in the forward, once per ``block_mask`` (none for the empty
    negligible set): the backward only launches kernels."""
    from visionattn.kernels import block_sparse_bwd

    calls = []
    transpose = block_sparse_bwd.transpose_csr
    monkeypatch.setattr(block_sparse_bwd, "transpose_csr", lambda *args: calls.append(1) or transpose(*args))
    q, k, v = (torch.randn(1, 2, 32, 16, generator=rng).to(kernel_device).requires_grad_(True) for _ in range(3))
    mask = topk_ratio_block_mask(q, k, 16, 16, 0.5)
    for _ in range(2):
        sparse_linear_attention(q, k, v, block_mask=mask, backend="triton").sum().backward()
    assert len(calls) == 1


def test_sparse_linear_keeps_the_marginal_matrix_of_a_reused_mask(kernel_device, rng, monkeypatch):
    """Without a negligible set the marginal block matrix depends on the mask alone: a ``block_mask`` used again
    stores it on its second call (the first only marks the mask as seen) and later calls, with or without autograd,
    reuse it with identical outputs; a new mask (another ``BlockMask`` of the same CSR, or each ``topk_ratio`` call's)
    builds its own (the backward's own build is not counted: its module binds the builder at import)."""
    from visionattn.kernels import sparse_linear_bwd, sparse_linear_state  # noqa: F401

    calls = []
    build = sparse_linear_state.marginal_block_matrix
    monkeypatch.setattr(sparse_linear_state, "marginal_block_matrix", lambda *args: calls.append(1) or build(*args))
    q, k, v = (torch.randn(1, 2, 32, 16, generator=rng).to(kernel_device) for _ in range(3))
    mask = topk_ratio_block_mask(q, k, 16, 16, 0.5)
    run = lambda m, *t: sparse_linear_attention(*(t or (q, k, v)), block_mask=m, backend="triton")
    outputs = [run(mask) for _ in range(3)]
    run(mask, q.requires_grad_(True), k, v).sum().backward()
    assert len(calls) == 2 and all(torch.equal(out, outputs[0]) for out in outputs)
    copy = BlockMask(mask.indptr, mask.indices, mask.partial, 32, 32, 16, 16, _uniform_rows=mask._uniform_rows)
    assert torch.equal(run(copy, q.detach(), k, v), outputs[0]) and len(calls) == 3
    for _ in range(2):
        sparse_linear_attention(q.detach(), k, v, topk_ratio=0.5, block_q=16, block_k=16, backend="triton")
    assert len(calls) == 5


@pytest.mark.gpu
def test_sparse_linear_topk_does_not_sync_the_host():
    """Selection, forward and backward on CUDA with sync debugging set to raise (after one warm-up call: the
    autotuner synchronizes while it benchmarks)."""
    q, k, v = (torch.randn(1, 4, 1024, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    step = lambda: torch.autograd.grad(
        sparse_linear_attention(q, k, v, topk_ratio=0.2, skip_ratio=0.2).sum(), (q, k, v)
    )
    step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_sparse_linear_topk_captured_in_a_cuda_graph_before_its_shape_constants_exist():
    """A CUDA graph captured while the selection's shape constants are not cached yet: nothing is cached during the
    capture (it would record their filling kernels without running them), and replay and later eager calls agree."""
    from visionattn.layout import _utils

    q, k, v = (torch.randn(1, 4, 1000, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    fn = lambda: sparse_linear_attention(q, k, v, topk_ratio=0.2, skip_ratio=0.2, block_q=64, block_k=32)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        expected = fn()  # the autotuner's warm-up
    torch.cuda.current_stream().wait_stream(side)
    _utils._SHAPE_CONSTANTS.clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    assert not _utils._SHAPE_CONSTANTS
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)
    assert torch.equal(fn(), expected) and _utils._SHAPE_CONSTANTS


def test_sparse_linear_rejects_bad_arguments(rng):
    q = torch.randn(1, 2, 32, 8, generator=rng)
    with pytest.raises(ValueError, match="topk_ratio"):
        sparse_linear_attention(q, q, q, topk_ratio=1.5)
    with pytest.raises(ValueError, match="topk_ratio and block_mask"):
        sparse_linear_attention(q, q, q)
    with pytest.raises(ValueError, match="skip_ratio"):
        sparse_linear_attention(q, q, q, topk_ratio=0.5, skip_ratio=-0.1)
    with pytest.raises(ValueError, match="feature_map"):
        sparse_linear_attention(q, q, q, topk_ratio=0.5, feature_map="hedgehog")
    with pytest.raises(ValueError, match="proj_weight"):
        sparse_linear_attention(q, q, q, torch.zeros(8, 4), topk_ratio=0.5)
    with pytest.raises(ValueError, match="proj_bias"):
        sparse_linear_attention(q, q, q, None, torch.zeros(4), topk_ratio=0.5)
    with pytest.raises(ValueError, match="eps"):
        sparse_linear_attention(q, q, q, topk_ratio=0.5, eps=-1.0)
    with pytest.raises(ValueError, match="block_q"):
        sparse_linear_attention(q, q, q, topk_ratio=0.5, block_q=0)
    with pytest.raises(TypeError, match="block_k"):
        sparse_linear_attention(q, q, q, topk_ratio=0.5, block_k=16.0)
    mask = topk_ratio_block_mask(q, q, 16, 16, 0.5)
    with pytest.raises(ValueError, match="topk_ratio and block_mask"):
        sparse_linear_attention(q, q, q, topk_ratio=0.5, block_mask=mask)
    with pytest.raises(ValueError, match="skip_ratio"):
        sparse_linear_attention(q, q, q, block_mask=mask, skip_ratio=0.5)
    keep, _ = mask.to_block_matrix()
    partial = BlockMask.from_block_matrix(
        keep, partial=keep, q_len=32, kv_len=32, block_q=16, block_k=16, token_mask=lambda i, j: i >= j
    )
    with pytest.raises(ValueError, match="partial"):
        sparse_linear_attention(q, q, q, block_mask=partial)
    with pytest.raises(TypeError, match="block_mask"):
        sparse_linear_attention(q, q, q, block_mask="all")
    with pytest.raises(ValueError, match="backend"):
        sparse_linear_attention(q, q, q, topk_ratio=0.5, backend="cuda")
