"""Sparse-linear attention kernels (fused forward, dQ/dK/dV, and proj through autograd) against the float64 reference.

On CPU these run under the Triton interpreter at tiny sizes (fp32 with ieee dots, fp16); on the H100 the ``gpu``
tests run real sizes in bf16/fp16.
"""

import pytest
import torch
import triton

from tests._numerics import TOLERANCES, assert_close
from visionattn.layout import topk_ratio_block_mask
from visionattn.nn import SparseLinearAttention
from visionattn.ops import block_sparse_attention, sparse_linear_attention, sparse_linear_attention_reference
from visionattn.ops.sparse_linear import _select_blocks


def _check(device, dtype, gen, *, n, d, dv, block_q, block_k, topk_ratio, skip_ratio=0.0, feature_map="softmax",
           batch=1, heads=2, bnhd=False, tol=None):  # fmt: skip
    """Output and the gradients of q, k, v, proj weight and bias of the Triton backend vs the float64 reference."""

    def make(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    def qkv(dim):
        x = make(batch, n, heads, dim).transpose(1, 2) if bnhd else make(batch, heads, n, dim)
        return x.requires_grad_(True)

    q, k, v = qkv(d), qkv(d), qkv(dv)
    w = (make(dv, dv) / dv**0.5).requires_grad_(True)
    b = make(dv).requires_grad_(True)
    kw = dict(topk_ratio=topk_ratio, skip_ratio=skip_ratio, feature_map=feature_map, block_q=block_q, block_k=block_k)
    out = sparse_linear_attention(q, k, v, w, b, backend="triton", **kw)
    if bnhd:
        assert out.transpose(1, 2).is_contiguous()
    inputs = (q, k, v, w, b)
    ref_in = [t.detach().double().requires_grad_(True) for t in inputs]
    # the oracle gets the block sets selected from the kernel's own q, k (pooled scores are rounded to the input
    # dtype, as SLA's get_block_map does, so float64 copies would break near-ties differently)
    blocks = _select_blocks(q, k, topk_ratio, skip_ratio, block_q, block_k)
    ref = sparse_linear_attention_reference(*ref_in[:3], *blocks, *ref_in[3:], feature_map=feature_map)
    tol = tol or TOLERANCES[dtype]
    assert_close("out", ref, out, tol=tol)
    do = make(*out.shape)
    got = torch.autograd.grad(out, inputs, do)
    expected = torch.autograd.grad(ref, ref_in, do.double())
    for name, r, g in zip(("dq", "dk", "dv", "dproj_weight", "dproj_bias"), expected, got):
        assert_close(name, r, g, tol=tol)


@pytest.mark.parametrize(
    "feature_map, n, d, dv, block_q, block_k, topk_ratio, skip_ratio, bnhd",
    [
        ("softmax", 80, 16, 16, 32, 16, 0.4, 0.0, False),
        ("elu1", 72, 16, 32, 16, 32, 0.34, 0.34, True),
        ("relu", 48, 16, 16, 16, 16, 0.0, 0.0, False),
        ("softmax", 50, 16, 16, 12, 10, 1.0, 0.0, False),
    ],
    ids=lambda x: str(x),
)
def test_sparse_linear_kernel_matches_reference_fp32(kernel_device, rng, poison_empty, feature_map, n, d, dv, block_q,
                                                     block_k, topk_ratio, skip_ratio, bnhd):  # fmt: skip
    _check(kernel_device, torch.float32, rng, n=n, d=d, dv=dv, block_q=block_q, block_k=block_k,
           topk_ratio=topk_ratio, skip_ratio=skip_ratio, feature_map=feature_map, bnhd=bnhd)  # fmt: skip


def test_sparse_linear_kernel_matches_reference_fp16(kernel_device, rng, poison_empty):
    _check(kernel_device, torch.float16, rng, n=64, d=16, dv=16, block_q=32, block_k=16, topk_ratio=0.5)


def test_sparse_linear_kernel_traces_with_compile_and_counts_flops(kernel_device, rng):
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v = (torch.randn(1, 2, 32, 16, generator=rng).to(kernel_device).requires_grad_(True) for _ in range(3))
    mask = topk_ratio_block_mask(q, k, 16, 16, 0.5)
    fn = lambda q, k, v: sparse_linear_attention(q, k, v, block_mask=mask, backend="triton")
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
    assert_close("out", fn(q, k, v), out)
    with FlopCounterMode(display=False) as counter:
        out.sum().backward()
    pairs = 2 * 2 * 16 * 16  # one critical 16 x 16 block per query block, 2 query blocks, 2 heads
    linear = 2 * 2 * (32 + 32) * 16 * 16  # per-block states and φ(q)S over all keys and queries
    assert counter.get_total_flops() == 2 * pairs * (3 * 16 + 2 * 16) + 3 * linear


@pytest.mark.gpu
def test_sparse_linear_kernel_gpu_compile_fullgraph(rng):
    q, k, v = (torch.randn(2, 4, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    w = torch.randn(64, 64, device="cuda", requires_grad=True)
    mask = topk_ratio_block_mask(q, k, 128, 64, 0.1)
    fn = lambda q, k, v, w: sparse_linear_attention(q, k, v, w, block_mask=mask)
    out = torch.compile(fn, fullgraph=True)(q, k, v, w)
    out.float().square().sum().backward()
    assert_close("out", fn(*(t.detach() for t in (q, k, v, w))), out, tol=TOLERANCES[torch.bfloat16])
    assert w.grad is not None and q.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "n, d, block_q, block_k, topk_ratio, skip_ratio, feature_map",
    [
        (4000, 128, 128, 64, 0.1, 0.0, "softmax"),
        (4096, 64, 64, 64, 0.05, 0.0, "softmax"),
        (3000, 128, 64, 64, 0.2, 0.1, "elu1"),
        (2048, 64, 128, 128, 0.1, 0.0, "relu"),
    ],
    ids=lambda x: str(x),
)
def test_sparse_linear_kernel_real_sizes(rng, dtype, n, d, block_q, block_k, topk_ratio, skip_ratio, feature_map):
    _check(torch.device("cuda"), dtype, rng, n=n, d=d, dv=d, block_q=block_q, block_k=block_k,
           topk_ratio=topk_ratio, skip_ratio=skip_ratio, feature_map=feature_map, heads=3, bnhd=d == 128)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("config", range(6))
def test_sparse_linear_kernel_gpu_every_config(monkeypatch, rng, config):
    """Each autotune config of the five kernels on its own (autotune would hide a broken one)."""
    from visionattn.kernels import sparse_linear, sparse_linear_bwd, sparse_linear_state

    kernels = [
        (sparse_linear_state._sparse_linear_fwd_kernel_state, sparse_linear_state._STATE_CONFIGS),
        (sparse_linear_state._sparse_linear_bwd_kernel_state, sparse_linear_state._STATE_CONFIGS),
        (sparse_linear._sparse_linear_fwd_kernel, sparse_linear._FWD_CONFIGS),
        (sparse_linear_bwd._sparse_linear_bwd_kernel_dq, sparse_linear_bwd._BWD_CONFIGS),
        (sparse_linear_bwd._sparse_linear_bwd_kernel_dkdv, sparse_linear_bwd._BWD_CONFIGS),
    ]
    for kernel, configs in kernels:
        monkeypatch.setattr(kernel, "configs", [configs[config % len(configs)]])
        monkeypatch.setattr(kernel, "cache", {})
    shapes = [(torch.bfloat16, 1500, 64, 64, 128, 64, 0.2, 0.1), (torch.bfloat16, 1500, 128, 128, 64, 64, 0.2, 0.1),
              (torch.float16, 1500, 128, 128, 128, 64, 0.2, 0.0), (torch.float16, 700, 32, 16, 100, 48, 0.3, 0.0)]  # fmt: skip
    ran = 0
    for dtype, n, d, dv, block_q, block_k, topk_ratio, skip_ratio in shapes:
        try:
            _check(torch.device("cuda"), dtype, rng, n=n, d=d, dv=dv, block_q=block_q, block_k=block_k,
                   topk_ratio=topk_ratio, skip_ratio=skip_ratio)  # fmt: skip
            ran += 1
        except triton.runtime.errors.OutOfResources:
            # a config too large for this shape's shared memory: the autotuner skips it, so it never runs
            assert config > 0, "the first config (the one VISIONATTN_AUTOTUNE=0 pins) must fit every shape"
    assert ran >= 2


@pytest.mark.gpu
def test_sparse_linear_kernel_backward_is_deterministic(rng):
    q, k, v = (torch.randn(1, 4, 8192, 128, generator=rng).cuda().bfloat16().requires_grad_(True) for _ in range(3))
    w = torch.randn(128, 128, generator=rng).cuda()
    grads = []
    for _ in range(2):
        out = sparse_linear_attention(q, k, v, w, topk_ratio=0.1, block_q=128, block_k=64, backend="triton")
        grads.append(torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    for name, a, b in zip(("dq", "dk", "dv"), *grads):
        assert torch.equal(a, b), name


@pytest.mark.gpu
def test_sparse_linear_fresh_module_is_block_sparse_attention(rng):
    q, k, v = (torch.randn(2, 4, 4096, 64, generator=rng).cuda().bfloat16() for _ in range(3))
    module = SparseLinearAttention(64, topk=0.1, block_q=128, block_k=64, device="cuda")
    mask = topk_ratio_block_mask(q, k, 128, 64, 0.1)
    assert_close("out", block_sparse_attention(q, k, v, mask, backend="triton"), module(q, k, v), tol=1e-3)
