"""The block means of SLA's selection (``visionattn/kernels/block_pool.py``): against a float64 brute force and the
layout's PyTorch pooling, and the blocks ``sparse_linear_attention`` selects with them."""

import pytest
import torch

from tests._numerics import TOLERANCES, assert_close
from visionattn.kernels.block_pool import block_pool_fwd
from visionattn.layout import topk_ratio_block_mask
from visionattn.layout.routing import _centred_block_means
from visionattn.ops import sparse_linear as sla


def _brute_force(q, k, block_q, block_k):
    """Float64 block means, each block over its own rows; the keys centred element by element with ``μ`` and
    ``k − μ`` rounded to k's dtype (the reference materialises both in that dtype)."""
    dtype = k.dtype
    mu = k.double().mean(-2, keepdim=True).to(dtype)
    centred = (k.double() - mu.double()).to(dtype).double()

    def means(x, block):
        return torch.stack([x[..., s : s + block, :].mean(-2) for s in range(0, x.shape[-2], block)], dim=-2)

    return means(q.double(), block_q), means(centred, block_k)


def _assert_within_one_ulp(name, ref, out):
    """``|out − ref|`` at most one unit in the last place of ``out``'s dtype at the larger magnitude. Magnitudes
    under 1e-3 of the tensor's RMS count as that much: there the order of the fp32 sums, not the final rounding,
    decides the last bits (it differs between the kernel and PyTorch's reductions)."""
    finfo = torch.finfo(out.dtype)
    ref64, out64 = ref.double(), out.double().to(ref.device)
    floor = max(1e-3 * float(ref64.pow(2).mean().sqrt()), finfo.tiny)
    ulp = finfo.eps * torch.exp2(torch.floor(torch.log2(torch.maximum(ref64.abs(), out64.abs()).clamp_min(floor))))
    excess = (out64 - ref64).abs() / ulp
    assert out.dtype == ref.dtype and float(excess.max()) <= 1, f"{name}: {float(excess.max()):.2f} ulp"


def _inputs(gen, dtype, device, *, batch, heads, nq, nk, d, bnhd, offset=0.5):
    """q, k ``(B, H, N, D)``; with ``bnhd`` views of ``(B, N, H, D)`` storage. Keys get a common offset, so the
    centring moves them (random keys have a mean near 0)."""
    make = lambda n: torch.randn(batch, n, heads, d, generator=gen).transpose(1, 2)
    q, k = make(nq), make(nk) + offset
    if not bnhd:
        q, k = q.contiguous(), k.contiguous()
    return q.to(device, dtype), k.to(device, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(
    "batch, heads, nq, nk, d, block_q, block_k, bnhd",
    [
        (1, 2, 40, 56, 16, 16, 8, False),
        (2, 3, 37, 45, 24, 12, 10, True),  # N not a multiple of the block, D not a power of two, (B, N, H, D)
        (1, 2, 70, 73, 40, 32, 40, True),  # blocks longer than a row tile, a short last key block
        (1, 2, 9, 130, 8, 16, 64, False),  # one short query block; key chunks of pass 1 past the end of k
    ],
    ids=lambda x: str(x),
)
def test_block_pool_matches_brute_force(kernel_device, rng, poison_empty, dtype, batch, heads, nq, nk, d, block_q,
                                        block_k, bnhd):  # fmt: skip
    q, k = _inputs(rng, dtype, kernel_device, batch=batch, heads=heads, nq=nq, nk=nk, d=d, bnhd=bnhd)
    assert (q.stride(1) < q.stride(2)) == bnhd
    pooled_q, pooled_k = block_pool_fwd(q, k, block_q, block_k)
    ref_q, ref_k = _brute_force(q.cpu(), k.cpu(), block_q, block_k)
    for name, ref, out in (("pooled_q", ref_q, pooled_q), ("pooled_k", ref_k, pooled_k)):
        assert out.dtype == dtype and out.is_contiguous()
        assert_close(name, ref, out.cpu())
    torch_q, torch_k = _centred_block_means(q, k, block_q, block_k)
    if dtype == torch.float32:
        assert_close("pooled_q vs torch", torch_q, pooled_q)
        assert_close("pooled_k vs torch", torch_k, pooled_k)
    else:
        _assert_within_one_ulp("pooled_q vs torch", torch_q, pooled_q)
        _assert_within_one_ulp("pooled_k vs torch", torch_k, pooled_k)


def _separated_inputs(gen, device, dtype, *, nq, nk, d, block_q, block_k):
    """q, k ``(1, 2, N, D)`` whose pooled scores are well separated: key block ``j``'s mean is ``c_j e_0`` with
    distinct ``c_j`` (unit gaps), query block ``i``'s is ``±(1 + i) e_0``, plus noise 100x below the gaps."""
    mq, mk = -(-nq // block_q), -(-nk // block_k)
    levels = torch.randperm(mk, generator=gen).double()
    signs = torch.where(torch.rand(mq, generator=gen) < 0.5, -1.0, 1.0) * torch.arange(1, mq + 1)
    q = 1e-2 * torch.randn(1, 2, nq, d, generator=gen, dtype=torch.float64)
    k = 1e-2 * torch.randn(1, 2, nk, d, generator=gen, dtype=torch.float64) + 3.0
    q[..., 0] += signs.repeat_interleave(block_q)[:nq]
    k[..., 0] += levels.repeat_interleave(block_k)[:nk]
    return q.to(device, dtype), k.to(device, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("skip_ratio", [0.0, 0.3])
def test_sla_selection_with_the_kernel_equals_the_torch_path(kernel_device, rng, monkeypatch, dtype, skip_ratio):
    q, k = _separated_inputs(rng, kernel_device, dtype, nq=45, nk=70, d=24, block_q=16, block_k=8)
    calls = []
    monkeypatch.setattr(sla, "_block_means_op", lambda *args: calls.append(1) or block_pool_fwd(*args))
    critical, negligible = sla._select_blocks(q, k, 0.4, skip_ratio, 16, 8)
    assert calls, "the selection did not pool with the kernel"
    monkeypatch.setattr(sla, "_pooled_blocks", lambda *args: None)
    expected = sla._select_blocks(q, k, 0.4, skip_ratio, 16, 8)
    assert torch.equal(critical.to_dense(), topk_ratio_block_mask(q, k, 16, 8, 0.4).to_dense())
    for got, ref in zip((critical, negligible), expected):
        if ref is None:
            assert got is None
            continue
        for part in ("indptr", "indices", "partial"):
            assert torch.equal(getattr(got, part), getattr(ref, part)), part


def test_sla_selection_pools_in_torch_without_triton(monkeypatch, rng):
    """float64 (a dtype the kernel does not take) and CPU without the interpreter take the layout's pooling."""
    q = torch.randn(1, 2, 32, 8, generator=rng, dtype=torch.float64)
    assert sla._pooled_blocks(q, q, 8, 8) is None
    monkeypatch.setattr(sla, "is_interpreter", lambda: False)
    assert sla._pooled_blocks(q.float(), q.float(), 8, 8) is None


@pytest.mark.gpu
@pytest.mark.parametrize("bnhd", [False, True], ids=["bhnd", "bnhd"])
def test_block_pool_gpu_real_size_matches_torch_path(rng, bnhd):
    """SLA's benchmark shape (B2 H16 N32760 d128 bf16, blocks 128 x 64): within one bf16 ulp of PyTorch's pooling."""
    q, k = _inputs(rng, torch.bfloat16, "cuda", batch=2, heads=16, nq=32760, nk=32760, d=128, bnhd=bnhd)
    pooled_q, pooled_k = block_pool_fwd(q, k, 128, 64)
    torch_q, torch_k = _centred_block_means(q, k, 128, 64)
    _assert_within_one_ulp("pooled_q", torch_q, pooled_q)
    _assert_within_one_ulp("pooled_k", torch_k, pooled_k)
    ref_q, ref_k = _brute_force(q[:1, :2], k[:1, :2], 128, 64)
    assert_close("pooled_q vs float64", ref_q, pooled_q[:1, :2], tol=TOLERANCES[torch.bfloat16])
    assert_close("pooled_k vs float64", ref_k, pooled_k[:1, :2], tol=TOLERANCES[torch.bfloat16])
