"""``SparseLinearAttention``: a fresh module is block-sparse attention, a trained ``proj`` brings in the linear branch."""

import pytest
import torch

from tests._numerics import assert_close
from visionattn.layout import topk_ratio_block_mask
from visionattn.nn import SparseLinearAttention
from visionattn.ops import block_sparse_attention, sparse_linear_attention


def _qkv(rng, n=64, d=16):
    return tuple(torch.randn(2, 3, n, d, generator=rng, dtype=torch.float64) for _ in range(3))


def test_sparse_linear_module_fresh_is_block_sparse_attention(rng):
    q, k, v = _qkv(rng)
    module = SparseLinearAttention(16, topk=0.25, block_q=16, block_k=16, dtype=torch.float64)
    mask = topk_ratio_block_mask(q, k, 16, 16, 0.25)
    assert_close("out", block_sparse_attention(q, k, v, mask, backend="reference"), module(q, k, v))


def test_sparse_linear_module_random_proj_adds_the_linear_branch(rng):
    q, k, v = _qkv(rng)
    module = SparseLinearAttention(16, topk=0.25, feature_map="elu1", block_q=16, block_k=16, dtype=torch.float64)
    fresh = module(q, k, v)
    torch.nn.init.normal_(module.proj.weight, generator=rng)
    torch.nn.init.normal_(module.proj.bias, generator=rng)
    out = module(q, k, v)
    assert (out - fresh).abs().max() > 1e-2
    expected = sparse_linear_attention(q, k, v, module.proj.weight, module.proj.bias, topk_ratio=0.25,
                                       feature_map="elu1", block_q=16, block_k=16)  # fmt: skip
    assert_close("out", expected, out)
    out.sum().backward()
    assert module.proj.weight.grad.abs().sum() > 0 and module.proj.bias.grad.abs().sum() > 0
    module.reset_parameters()
    assert_close("out", fresh, module(q, k, v))


def test_sparse_linear_module_reads_bnhd_views_and_reports_density(rng):
    q, k, v = _qkv(rng)
    module = SparseLinearAttention(16, topk=0.5, block_q=16, block_k=32, dtype=torch.float64)
    views = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    out, density = module(*views, return_sparsity=True)
    assert density == 0.5
    assert_close("out", module(q, k, v), out)


def test_sparse_linear_module_state_dict_and_meta_init():
    module = SparseLinearAttention(64, topk=0.1, device="meta")
    assert sorted(module.state_dict()) == ["proj.bias", "proj.weight"]
    module = module.to_empty(device="cpu")
    module.reset_parameters()
    assert not module.proj.weight.any() and not module.proj.bias.any()
    assert "topk=0.1" in repr(module)


def test_sparse_linear_module_rejects_bad_arguments():
    with pytest.raises(ValueError, match="head_dim"):
        SparseLinearAttention(0, topk=0.1)
    with pytest.raises(ValueError, match="topk"):
        SparseLinearAttention(64, topk=2.0)
    with pytest.raises(ValueError, match="skip_ratio"):
        SparseLinearAttention(64, topk=0.1, skip_ratio=-1.0)
    with pytest.raises(ValueError, match="feature_map"):
        SparseLinearAttention(64, topk=0.1, feature_map="elu")
    with pytest.raises(ValueError, match="block_q"):
        SparseLinearAttention(64, topk=0.1, block_q=0)
    with pytest.raises(TypeError, match="block_q"):
        SparseLinearAttention(64, topk=0.1, block_q=64.0)
    with pytest.raises(ValueError, match="block_k"):
        SparseLinearAttention(64, topk=0.1, block_k=-64)


def test_sparse_linear_module_rejects_inputs_of_another_head_dim(rng):
    q, k, v = _qkv(rng, d=16)
    module = SparseLinearAttention(32, topk=0.25, block_q=16, block_k=16, dtype=torch.float64)
    with pytest.raises(ValueError, match="head_dim"):
        module(q, k, v)
    module = SparseLinearAttention(16, topk=0.25, block_q=16, block_k=16, dtype=torch.float64)
    with pytest.raises(ValueError, match="head_dim"):
        module(q, k, torch.cat([v, v], dim=-1))
    with pytest.raises(TypeError, match="q"):
        module(q.numpy(), k, v)
