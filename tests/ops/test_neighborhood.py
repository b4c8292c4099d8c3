import pytest
import torch

from tests._numerics import assert_close
from tests.layout._brute_force import neighborhood_raster_mask
from visionattn.layout import TokenGrid
from visionattn.layout.neighborhood import _check_neighborhood_args
from visionattn.ops import default_neighborhood_tile, neighborhood_attention, neighborhood_attention_reference
from visionattn.ops.neighborhood import _PLANS

# (shape, extra_before, extra_after, kernel_size, stride, dilation, causal, tile, num_extra_kv)
CASES = [
    ((37,), 2, 3, 6, 2, 3, True, None, 0),
    ((37,), 0, 0, 5, 1, 1, False, 8, 4),
    ((7, 9), 3, 0, (3, 4), (1, 2), (2, 1), False, (4, 4), 5),
    ((7, 9), 0, 2, 3, 1, 1, (True, False), None, 0),
    ((5, 6, 7), 2, 3, (2, 3, 5), (2, 1, 3), 1, (True, False, False), (2, 4, 4), 3),
    ((4, 6, 7), 0, 0, 3, 1, (1, 2, 2), False, None, 0),
]


def _dense_brute_force(q, k, v, grid, canonical, scale, extra_kv):
    allowed = neighborhood_raster_mask(grid, *canonical)
    if extra_kv is not None:
        k, v = torch.cat([k, extra_kv[0]], 2), torch.cat([v, extra_kv[1]], 2)
        allowed = torch.cat([allowed, allowed.new_ones(allowed.shape[0], extra_kv[0].shape[2])], 1)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize(
    "shape,before,after,kernel,stride,dilation,causal,tile,num_extra",
    CASES,
    ids=[f"grid{c[0]}-k{c[3]}-s{c[4]}-d{c[5]}-c{c[6]}-tile{c[7]}-E{c[8]}" for c in CASES],
)
def test_neighborhood_attention_matches_reference(
    rng, shape, before, after, kernel, stride, dilation, causal, tile, num_extra
):
    grid = TokenGrid(shape, extra_before=before, extra_after=after)
    b, h, d, dv = 2, 2, 8, 6
    make = lambda *s: torch.randn(*s, generator=rng, dtype=torch.float64).requires_grad_()
    q, k, v = make(b, h, grid.num_tokens, d), make(b, h, grid.num_tokens, d), make(b, h, grid.num_tokens, dv)
    extra_kv = (make(b, h, num_extra, d), make(b, h, num_extra, dv)) if num_extra else None
    tensors = [q, k, v] + (list(extra_kv) if extra_kv else [])
    args = (grid, kernel, stride, dilation, causal)

    ref = neighborhood_attention_reference(q, k, v, *args, scale=0.3, extra_kv=extra_kv)
    canonical = _check_neighborhood_args(grid, kernel, stride, dilation, causal)
    assert_close("reference vs brute force", _dense_brute_force(q, k, v, grid, canonical, 0.3, extra_kv), ref)
    out = neighborhood_attention(q, k, v, *args, scale=0.3, extra_kv=extra_kv, tile=tile, backend="reference")
    assert_close("out", ref, out)

    grad = torch.randn(ref.shape, generator=rng, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, tensors, grad)
    out_grads = torch.autograd.grad(out, tensors, grad)
    for name, r, o in zip(["dq", "dk", "dv", "dk_extra", "dv_extra"], ref_grads, out_grads):
        assert_close(name, r, o)


def test_neighborhood_attention_default_scale_and_cache(rng):
    grid = TokenGrid((6, 10))
    q, k, v = (torch.randn(1, 1, 60, 4, generator=rng, dtype=torch.float64) for _ in range(3))
    first = neighborhood_attention(q, k, v, grid, 3, backend="reference")
    again = neighborhood_attention(q, k, v, grid, 3, backend="reference")
    assert_close("out", neighborhood_attention_reference(q, k, v, grid, 3, scale=0.5), first)
    assert torch.equal(first, again)


def test_default_neighborhood_tile():
    assert default_neighborhood_tile((4096,)) == (128,)
    assert default_neighborhood_tile((20,)) == (32,)
    assert default_neighborhood_tile((64, 64)) == (8, 16)
    assert default_neighborhood_tile((30, 48, 80)) == (2, 8, 8)
    assert default_neighborhood_tile((1, 6, 7)) == (1, 8, 8)


def test_neighborhood_attention_rejects_bad_inputs():
    grid = TokenGrid((6, 10))
    q = torch.randn(1, 2, 60, 8)
    with pytest.raises(TypeError, match="grid"):
        neighborhood_attention(q, q, q, (6, 10), 3)
    with pytest.raises(ValueError, match="grid.num_tokens"):
        neighborhood_attention(q, q, q, TokenGrid((6, 9)), 3)
    with pytest.raises(ValueError, match="kernel_size"):
        neighborhood_attention(q, q, q, grid, (7, 3))
    with pytest.raises(ValueError, match="stride"):
        neighborhood_attention(q, q, q, grid, 3, stride=4)
    with pytest.raises(ValueError, match="tile"):
        neighborhood_attention(q, q, q, grid, 3, tile=(4, 4, 4))
    with pytest.raises(TypeError, match="extra_kv"):
        neighborhood_attention(q, q, q, grid, 3, extra_kv=q)
    with pytest.raises(ValueError, match="extra_kv"):
        neighborhood_attention(q, q, q, grid, 3, extra_kv=(q[..., :5, :], q[..., :5, :4]))
    with pytest.raises(ValueError, match="scale"):
        neighborhood_attention(q, q, q, grid, 3, scale=-1.0)


def test_neighborhood_attention_named_backend_rejects_inputs_naming_them(kernel_device):
    """A named backend that cannot run q, k, v fails naming them (not the tile permutation's ``x``)."""
    grid = TokenGrid((6, 10))
    q = torch.randn(1, 2, 60, 16, device=kernel_device, requires_grad=True)
    with pytest.raises(NotImplementedError, match="q.dtype"):
        neighborhood_attention(q.double(), q.double(), q.double(), grid, 3, backend="triton")
    with pytest.raises(NotImplementedError, match="v.shape"):
        neighborhood_attention(q, q, q[..., :8], grid, 3, backend="triton")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-fullgraph"])
def test_neighborhood_attention_triton_matches_reference(kernel_device, rng, compiled):
    # tiny under the interpreter: global tokens, dilation, stride, per-axis causal and extra keys in one case;
    # compiled: fullgraph from a cold plan cache (the plan is built while tracing)
    grid = TokenGrid((6, 7), extra_before=2)
    make = lambda n: torch.randn(1, 1, n, 16, generator=rng).to(kernel_device).requires_grad_()
    q, k, v, k_extra, v_extra = make(grid.num_tokens), make(grid.num_tokens), make(grid.num_tokens), make(3), make(3)
    args = (grid, (3, 4), (1, 2), (2, 1), (False, True))
    run = lambda q, k, v, ke, ve: neighborhood_attention(
        q, k, v, *args, extra_kv=(ke, ve), tile=(4, 4), backend="triton"
    )
    if compiled:
        _PLANS.clear()
        torch._dynamo.reset()
        run = torch.compile(run, fullgraph=True, backend="inductor" if kernel_device.type == "cuda" else "aot_eager")
    out = run(q, k, v, k_extra, v_extra)
    ref = neighborhood_attention_reference(q, k, v, *args, extra_kv=(k_extra, v_extra))
    assert_close("out", ref, out)
    grad = torch.randn(ref.shape, generator=rng).to(kernel_device)
    tensors = [q, k, v, k_extra, v_extra]
    for name, r, o in zip(
        ["dq", "dk", "dv", "dk_extra", "dv_extra"],
        torch.autograd.grad(ref, tensors, grad),
        torch.autograd.grad(out, tensors, grad),
    ):
        assert_close(name, r, o)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-fullgraph"])
def test_neighborhood_attention_blocked_windows_run_without_predicate(kernel_device, rng, compiled):
    # windows that are whole tiles (GNA's "perfectly block-sparse" case): the plan's mask has no predicate, in
    # eager mode and when the plan is rebuilt from graph constants under torch.compile
    grid = TokenGrid((8, 8))
    q, k, v = (torch.randn(1, 2, 64, 16, generator=rng).to(kernel_device) for _ in range(3))
    run = lambda q, k, v: neighborhood_attention(q, k, v, grid, 4, stride=4, tile=(4, 4), backend="triton")
    _PLANS.clear()
    if compiled:
        torch._dynamo.reset()
        run = torch.compile(run, fullgraph=True, backend="inductor" if kernel_device.type == "cuda" else "aot_eager")
    out = run(q, k, v)
    assert all(plan.mask.token_mask is None for plan in _PLANS.values()) and _PLANS
    assert_close("out", neighborhood_attention_reference(q, k, v, grid, 4, stride=4), out)


def test_neighborhood_attention_permutes_through_gather_tokens(monkeypatch, kernel_device, rng):
    """With a gradient the op permutes q, k, v into tile order and the output back with ``gather_tokens`` (four
    calls, inverse-map backward); (B, N, H, D) storage stays so, padding slots (a 5 x 7 grid in 4 x 4 tiles) and
    extra keys, against float64 forward and gradients."""
    from visionattn.ops import neighborhood as module

    calls = []
    real = module.gather_tokens
    monkeypatch.setattr(module, "gather_tokens", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    grid = TokenGrid((5, 7), extra_after=2)
    make = lambda n: torch.randn(1, n, 2, 16, generator=rng).to(kernel_device).transpose(1, 2).requires_grad_()
    q, k, v, k_extra, v_extra = make(grid.num_tokens), make(grid.num_tokens), make(grid.num_tokens), make(3), make(3)
    tensors = [q, k, v, k_extra, v_extra]
    args = (grid, (3, 5), 1, 1, False)
    out = neighborhood_attention(q, k, v, *args, extra_kv=(k_extra, v_extra), tile=(4, 4), backend="triton")
    assert len(calls) == 4 and out.transpose(1, 2).is_contiguous()
    inputs64 = [t.detach().double().requires_grad_() for t in tensors]
    ref = neighborhood_attention_reference(*inputs64[:3], *args, extra_kv=tuple(inputs64[3:]))
    assert_close("out", ref, out, dtype=torch.float32)
    grad = torch.randn(ref.shape, generator=rng, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, inputs64, grad)
    grads = torch.autograd.grad(out, tensors, grad.float().to(kernel_device))
    for name, r, o in zip(["dq", "dk", "dv", "dk_extra", "dv_extra"], ref_grads, grads):
        assert_close(name, r, o, dtype=torch.float32)


def _count_gathered(monkeypatch) -> list:
    """Record each call of the gathered (no-permutation) inference path of ``neighborhood_attention``."""
    from visionattn.ops import neighborhood as module

    calls = []
    real = module.block_sparse_attention_gathered
    monkeypatch.setattr(module, "block_sparse_attention_gathered", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


@pytest.mark.parametrize(
    "shape,before,after,kernel,stride,dilation,causal,tile,num_extra",
    CASES,
    ids=[f"grid{c[0]}-k{c[3]}-s{c[4]}-d{c[5]}-c{c[6]}-tile{c[7]}-E{c[8]}" for c in CASES],
)
def test_neighborhood_attention_triton_inference_reads_raster_order_in_place(
    monkeypatch, kernel_device, rng, shape, before, after, kernel, stride, dilation, causal, tile, num_extra
):
    """Without a gradient the kernel gathers q, k, v rows and scatters the output through the plan's row maps (no
    permuted copies); (B, N, H, D) storage, extra keys, padding slots and global tokens against float64."""
    calls = _count_gathered(monkeypatch)
    grid = TokenGrid(shape, extra_before=before, extra_after=after)
    make = lambda n, d: torch.randn(1, n, 2, d, generator=rng).to(kernel_device).transpose(1, 2)
    q, k, v = make(grid.num_tokens, 16), make(grid.num_tokens, 16), make(grid.num_tokens, 24)
    extra_kv = (make(num_extra, 16), make(num_extra, 24)) if num_extra else None
    args = (grid, kernel, stride, dilation, causal)
    with torch.no_grad():
        out = neighborhood_attention(q, k, v, *args, extra_kv=extra_kv, tile=tile, backend="triton")
    assert calls == [1] and out.transpose(1, 2).is_contiguous()
    as64 = lambda t: t.double() if t is not None else None
    ref_extra = tuple(map(as64, extra_kv)) if extra_kv else None
    ref = neighborhood_attention_reference(*map(as64, (q, k, v)), *args, scale=16**-0.5, extra_kv=ref_extra)
    assert_close("out", ref, out, dtype=torch.float32)


def test_neighborhood_attention_triton_inference_counts_the_kept_blocks_flops(kernel_device, rng):
    """FlopCounterMode sees the gathered inference op with the forward's count of the same mask."""
    from torch.utils.flop_counter import FlopCounterMode

    grid = TokenGrid((6, 7), extra_before=2)
    q, k, v = (torch.randn(1, 2, grid.num_tokens, 16, generator=rng).to(kernel_device) for _ in range(3))
    counts = []
    for grad in (False, True):
        with torch.set_grad_enabled(grad), FlopCounterMode(display=False) as counter:
            neighborhood_attention(q, k, v.requires_grad_(grad), grid, 3, tile=(4, 4), backend="triton")
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


def test_neighborhood_attention_triton_inference_compiles_fullgraph(monkeypatch, kernel_device, rng):
    calls = _count_gathered(monkeypatch)
    grid = TokenGrid((5, 6, 7), extra_after=3)
    q, k, v = (torch.randn(1, 2, grid.num_tokens, 16, generator=rng).to(kernel_device) for _ in range(3))
    args = (grid, (2, 3, 5), (2, 1, 3), 1, (True, False, False))
    run = lambda q, k, v: neighborhood_attention(q, k, v, *args, tile=(2, 4, 4), backend="triton")
    _PLANS.clear()
    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, backend="inductor" if kernel_device.type == "cuda" else "aot_eager")
    with torch.no_grad():
        out = compiled(q, k, v)
        eager = run(q, k, v)
    assert len(calls) == 2
    assert_close("compiled vs eager", eager, out, dtype=torch.float32)
    assert_close("out", neighborhood_attention_reference(q.double(), k.double(), v.double(), *args), out)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "shape,kernel,stride,dilation,causal,num_extra",
    [
        ((64, 64), 13, 1, 1, False, 0),
        ((64, 64), (16, 16), (8, 8), 1, False, 77),
        ((8, 24, 40), (5, 9, 9), (1, 2, 2), (1, 2, 1), (True, False, False), 64),
        ((4096,), 512, 128, 2, False, 0),
    ],
    ids=["2d-k13", "2d-stride-extra", "3d-causal-dilated-extra", "1d-stride-dilated"],
)
def test_neighborhood_attention_triton_matches_reference_gpu(shape, kernel, stride, dilation, causal, num_extra, dtype):
    grid = TokenGrid(shape)
    gen = torch.Generator(device="cuda").manual_seed(0)
    make = lambda n, d: torch.randn(2, 4, n, d, device="cuda", generator=gen).to(dtype).requires_grad_()
    q, k, v = make(grid.num_tokens, 64), make(grid.num_tokens, 64), make(grid.num_tokens, 64)
    extra_kv = (make(num_extra, 64), make(num_extra, 64)) if num_extra else None
    tensors = [q, k, v] + (list(extra_kv) if extra_kv else [])
    args = (grid, kernel, stride, dilation, causal)
    out = neighborhood_attention(q, k, v, *args, extra_kv=extra_kv, backend="triton")
    grad = torch.randn(out.shape, device="cuda", generator=gen).to(dtype)
    grads = torch.autograd.grad(out, tensors, grad)
    ref_inputs = [t.detach().float().requires_grad_() for t in tensors]
    ref_extra = tuple(ref_inputs[3:]) if extra_kv else None
    ref = neighborhood_attention_reference(*ref_inputs[:3], *args, extra_kv=ref_extra)
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad.float())
    assert_close("out", ref, out, dtype=dtype)
    for name, r, o in zip(["dq", "dk", "dv", "dk_extra", "dv_extra"], ref_grads, grads):
        assert_close(name, r, o, dtype=dtype)
    with torch.no_grad():  # the gathered inference path (raster order read and written in place)
        inferred = neighborhood_attention(q, k, v, *args, extra_kv=extra_kv, backend="triton")
    assert_close("out without grad", ref, inferred, dtype=dtype)
