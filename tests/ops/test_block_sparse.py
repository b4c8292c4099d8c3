import pytest
import torch

from tests._numerics import assert_close
from visionattn.layout import BlockMask, NeighborhoodWindow, TokenGrid, TokenLayout
from visionattn.ops import block_sparse_attention, block_sparse_attention_reference


def _brute_force(q, k, v, allowed, scale):
    """Per-row loop softmax over the explicitly allowed keys (independent of the reference's masking trick)."""
    b_size, h_size, nq, _ = q.shape
    out_rows, lse_rows = [], []
    for b in range(b_size):
        for h in range(h_size):
            rows = allowed[b % allowed.shape[0], h % allowed.shape[1]]
            for i in range(nq):
                keys = rows[i].nonzero().squeeze(-1)
                if keys.numel() == 0:
                    out_rows.append(torch.zeros_like(v[b, h, 0]))
                    lse_rows.append(torch.tensor(float("-inf"), dtype=q.dtype))
                    continue
                logits = (k[b, h, keys] @ q[b, h, i]) * scale
                out_rows.append(torch.softmax(logits, 0) @ v[b, h, keys])
                lse_rows.append(torch.logsumexp(logits, 0))
    out = torch.stack(out_rows).view(b_size, h_size, nq, -1)
    return out, torch.stack(lse_rows).view(b_size, h_size, nq)


def _random_mask(gen, b, h, q_len, kv_len, bq, bk, p=0.5, partial_pred=None):
    mq, mk = -(-q_len // bq), -(-kv_len // bk)
    keep = torch.rand(b, h, mq, mk, generator=gen) < p
    keep[0, 0, 0] = False  # an empty row
    partial = (torch.rand(b, h, mq, mk, generator=gen) < 0.5) if partial_pred is not None else None
    return BlockMask.from_block_matrix(
        keep, q_len=q_len, kv_len=kv_len, block_q=bq, block_k=bk, partial=partial, token_mask=partial_pred
    )


def _inputs(gen, b, h, nq, nk, d, dv, dtype=torch.float64):
    make = lambda n, dim: torch.randn(b, h, n, dim, generator=gen, dtype=dtype).requires_grad_(True)
    return make(nq, d), make(nk, d), make(nk, dv)


@pytest.mark.parametrize(
    "b,h,mask_bh,nq,nk,bq,bk,partial",
    [
        (2, 3, (2, 3), 40, 40, 8, 8, False),
        (2, 3, (1, 3), 37, 29, 8, 5, False),
        (1, 2, (1, 1), 52, 52, 4, 4, True),
    ],
    ids=lambda x: str(x),
)
def test_block_sparse_attention_reference_matches_brute_force(rng, b, h, mask_bh, nq, nk, bq, bk, partial):
    pred = None
    if partial:
        layout = TokenLayout(TokenGrid((6, 7), extra_before=3), tile=(2, 2))
        assert layout.num_tokens == nq
        pred = NeighborhoodWindow(layout, (3, 3), (1, 1), (1, 1), (False, False))
    mask = _random_mask(rng, *mask_bh, nq, nk, bq, bk, partial_pred=pred)
    q, k, v = _inputs(rng, b, h, nq, nk, 6, 5)
    scale = 0.37
    out, lse = block_sparse_attention_reference(q, k, v, mask, scale=scale, return_lse=True)
    ref_out, ref_lse = _brute_force(q, k, v, mask.to_dense(), scale)
    assert_close("out", ref_out, out)
    finite = torch.isfinite(ref_lse)
    assert (~finite).any() and torch.equal(torch.isfinite(lse), finite)
    assert_close("lse", ref_lse[finite], lse[finite])
    do, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * do).sum() + (lse.where(finite, 0) * dlse).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref_out * do).sum() + (ref_lse.where(finite, 0) * dlse).sum(), (q, k, v))
    for name, ref, got in zip(("dq", "dk", "dv"), ref_grads, grads):
        assert_close(name, ref, got)


def test_block_sparse_attention_empty_rows_have_finite_gradients(rng):
    keep = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    keep[0, 0, 1, 0] = True
    mask = BlockMask.from_block_matrix(keep, q_len=8, kv_len=8, block_q=4, block_k=4)
    q, k, v = _inputs(rng, 1, 1, 8, 8, 4, 4)
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, backend="reference")
    assert torch.equal(out[0, 0, :4], torch.zeros(4, 4, dtype=q.dtype)) and torch.isinf(lse[0, 0, :4]).all()
    (out.sum() + lse[..., 4:].sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[0, 0, :4], torch.zeros(4, 4, dtype=q.dtype))


def test_block_sparse_attention_default_scale_and_dtype(rng):
    mask = _random_mask(rng, 1, 1, 16, 16, 8, 8, p=1.0)
    q, k, v = _inputs(rng, 1, 2, 16, 16, 9, 9)
    out = block_sparse_attention(q, k, v, mask, backend="reference")
    assert_close("out", block_sparse_attention_reference(q, k, v, mask, scale=9**-0.5), out)
    half = block_sparse_attention(q.half(), k.half(), v.half(), mask, backend="reference")
    assert half.dtype == torch.float16


def test_block_sparse_attention_rejects_bad_arguments(rng):
    mask = _random_mask(rng, 1, 1, 16, 16, 8, 8)
    q, k, v = _inputs(rng, 2, 2, 16, 16, 4, 4)
    with pytest.raises(TypeError, match="block_mask"):
        block_sparse_attention(q, k, v, mask.to_dense())
    with pytest.raises(ValueError, match="block_mask"):
        block_sparse_attention(q[:, :, :8], k, v, mask)
    with pytest.raises(ValueError, match="block_mask"):
        block_sparse_attention(q, k[:, :, :8], v[:, :, :8], mask)
    with pytest.raises(ValueError, match="block_mask B"):
        block_sparse_attention(q, k, v, _random_mask(rng, 3, 1, 16, 16, 8, 8))
    with pytest.raises(ValueError, match="block_mask H"):
        block_sparse_attention(q, k, v, _random_mask(rng, 1, 3, 16, 16, 8, 8))
    with pytest.raises(ValueError, match="v"):
        block_sparse_attention(q, k, v[:, :, :8], mask)
    with pytest.raises(TypeError, match="q"):
        block_sparse_attention(q.float(), k, v, mask)
    with pytest.raises(ValueError, match="scale"):
        block_sparse_attention(q, k, v, mask, scale=-1.0)
    with pytest.raises(ValueError, match="backend"):
        block_sparse_attention(q, k, v, mask, backend="nope")


def test_block_sparse_attention_triton_rejects_unsupported_input(rng):
    pytest.importorskip("triton")
    from visionattn.kernels._config import is_interpreter

    if not (is_interpreter() or torch.cuda.is_available()):
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mask = _random_mask(rng, 1, 1, 32, 32, 16, 16).to(device)
    q, k, v = (t.detach().to(device) for t in _inputs(rng, 1, 1, 32, 32, 16, 16, dtype=torch.float32))
    with pytest.raises(NotImplementedError, match="q.dtype"):
        block_sparse_attention(q.double(), k.double(), v.double(), mask, backend="triton")
    with pytest.raises(NotImplementedError, match="head dim"):
        block_sparse_attention(q[..., :8], k[..., :8], v, mask, backend="triton")
    with pytest.raises(NotImplementedError, match="head dim"):
        block_sparse_attention(q, k, v[..., :12], mask, backend="triton")
    custom = BlockMask.from_block_matrix(
        torch.ones(1, 1, 2, 2, dtype=torch.bool), partial=torch.ones(1, 1, 2, 2, dtype=torch.bool),
        q_len=32, kv_len=32, block_q=16, block_k=16, token_mask=lambda qi, ki: qi >= ki,
    ).to(device)  # fmt: skip
    with pytest.raises(NotImplementedError, match="token_mask"):
        block_sparse_attention(q, k, v, custom, backend="triton")
