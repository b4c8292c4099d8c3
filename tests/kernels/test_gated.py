"""Triton gated linear attention (interpreter on CPU, native on GPU) against the float64 recurrence: output and
every gradient, causal and bidirectional, odd lengths, strided inputs, strong gates, torch.compile."""

import pytest
import torch
import torch.nn.functional as F

from tests._numerics import assert_close
from visionattn.ops import gated_linear_attention, gated_linear_attention_reference

_GRAD_NAMES = ("dq", "dk", "dv", "dlog_gate_fwd", "dlog_gate_bwd")


@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
    """float32 kernel results are compared at 1e-5, so TF32 must be off even if another test turned it on."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


def _inputs(batch, heads, length, dk, dv, *, bidirectional=True, bnhd=False, strong=False, weak=False, seed=0):
    """float64 CPU leaves (q, k, v, log_gate_fwd, log_gate_bwd or None); ``bnhd`` makes (B, N, H, D) views.

    The gates are ViG's logsigmoid(x) / 16 with a wider spread (/ 4), so decay varies strongly along the sequence;
    ``weak`` divides them by 50 (states carry over hundreds of tokens); ``strong`` sets some to -1e4 (forward) and
    -inf (backward).
    """
    gen = torch.Generator().manual_seed(seed)

    def make(dim, transform=lambda t: t):
        shape = (batch, length, heads, dim) if bnhd else (batch, heads, length, dim)
        t = transform(torch.randn(*shape, generator=gen, dtype=torch.float64))
        return t.transpose(1, 2) if bnhd else t

    def gate(t):
        return F.logsigmoid(2 * t) / (200 if weak else 4)

    q, k, v = make(dk), make(dk), make(dv)
    a = make(dk, gate)
    b = make(dk, gate) if bidirectional else None
    if strong:
        a[..., ::3, :] = -1e4
        if b is not None:
            b[..., 1::4, :] = float("-inf")
    return q, k, v, a, b


def _to(inputs, device, dtype):
    """Leaves requiring grad on ``device`` in ``dtype``, keeping the (B, N, H, D) storage of token-major views."""

    def move(t):
        if t.stride(1) < t.stride(2):
            return t.transpose(1, 2).to(device=device, dtype=dtype).transpose(1, 2).detach().requires_grad_()
        return t.to(device=device, dtype=dtype).detach().requires_grad_()

    return [None if t is None else move(t) for t in inputs]


def _forward_backward(fn, inputs, grad_out):
    out = fn(*inputs)
    leaves = [t for t in inputs if t is not None]
    return out, torch.autograd.grad(out, leaves, grad_out.to(out.dtype))


def _check_against_reference(low, dtype, scale=None, run=None, gate_normalizer=None):
    """Kernel (or ``run(*low)``) vs float64 recurrence on the same (rounded) inputs ``low``: output, every gradient.

    With ``gate_normalizer = c`` the gates in ``low`` are logits ``x``, the reference's log gates ``logsigmoid(x) / c``.
    """
    master = [None if t is None else t.detach().double().requires_grad_() for t in low]
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(*low[2].shape, generator=gen, dtype=torch.float64).to(low[2].device)

    def reference(q, k, v, a, b):
        if gate_normalizer is not None:
            a, b = (None if x is None else F.logsigmoid(x) / gate_normalizer for x in (a, b))
        return gated_linear_attention_reference(q, k, v, a, b, scale=scale)

    ref, ref_grads = _forward_backward(reference, master, grad_out)
    run = run or (lambda *x: gated_linear_attention(*x, scale=scale, gate_normalizer=gate_normalizer, backend="triton"))
    out, grads = _forward_backward(run, low, grad_out)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close("o", ref, out, dtype)
    for name, g_ref, g_out in zip(_GRAD_NAMES, ref_grads, grads):
        assert g_out.shape == g_ref.shape
        assert_close(name, g_ref, g_out, dtype)


# ---------------------------------------------------------------------------------------------- CPU (interpreter)
@pytest.mark.parametrize(
    ("batch", "heads", "length", "dk", "dv", "bidirectional", "dtype"),
    [
        (1, 2, 17, 16, 16, False, torch.float32),
        (1, 2, 70, 16, 32, True, torch.float32),
        (1, 2, 40, 16, 16, True, torch.float16),
        (1, 1, 40, 16, 32, False, torch.float16),
    ],
    ids=lambda x: str(x).replace("torch.", ""),
)
def test_gated_kernel_matches_reference(
    batch, heads, length, dk, dv, bidirectional, dtype, kernel_device, poison_empty
):
    inputs = _inputs(batch, heads, length, dk, dv, bidirectional=bidirectional)
    _check_against_reference(_to(inputs, kernel_device, dtype), dtype, scale=0.3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gated_kernel_half_inputs_float32_gates(dtype, kernel_device, poison_empty):
    """nn.GatedAttention2d's call: half q, k, v with float32 gates; gate gradients come back in float32.

    The kernels convert every load to float32 before any matmul, so bf16 runs under the interpreter too.
    """
    q, k, v, a, b = _inputs(1, 1, 40, 16, 32)
    low = _to((q, k, v), kernel_device, dtype) + _to((a, b), kernel_device, torch.float32)
    _check_against_reference(low, dtype)


def test_gated_kernel_mixed_gate_dtypes(kernel_device, poison_empty):
    """Forward and backward gates of different dtypes (the state kernel reads both through one pointer)."""
    q, k, v, a, b = _inputs(1, 1, 40, 16, 16)
    q, k, v, b = _to((q, k, v, b), kernel_device, torch.float16)
    (a,) = _to((a,), kernel_device, torch.float32)
    _check_against_reference((q, k, v, a, b), torch.float16)


def test_gated_kernel_strided_inputs(kernel_device, poison_empty):
    """(B, N, H, D) views of q, k, v and gates that are halves of one projection (ViG's gk.chunk(2, -1))."""
    q, k, v, _, _ = _to(_inputs(1, 2, 23, 16, 16, bnhd=True), kernel_device, torch.float32)
    gk = F.logsigmoid(torch.randn(1, 23, 2, 32, device=kernel_device)) / 16
    a, b = (t.transpose(1, 2).detach().requires_grad_() for t in gk.chunk(2, dim=-1))
    assert q.stride(1) < q.stride(2) and a.stride(-1) == 1 and not a.is_contiguous()
    _check_against_reference((q, k, v, a, b), torch.float32)


def test_gated_kernel_strong_gates_stay_finite(kernel_device, poison_empty):
    inputs = _inputs(1, 1, 40, 16, 16, strong=True)
    _check_against_reference(_to(inputs, kernel_device, torch.float32), torch.float32)


def test_gated_kernel_gates_at_the_clamp(kernel_device):
    """Every gate at the clamp (-16) and large q, k: the intra-sub-block factors reach their bound exp(64).

    The gate gradients are only checked for finiteness: their reference is ~exp(-16) of the other gradients, below
    float32 resolution of the q·dq - k·dk identity they come from.
    """
    q, k, v, a, b = _inputs(1, 1, 33, 16, 16)
    q, k = q.detach() * 1e3, k.detach() * 1e3
    a, b = torch.full_like(a, -15.9), torch.full_like(b, -15.9)
    low = _to((q, k, v, a, b), kernel_device, torch.float32)
    master = [t.detach().double().requires_grad_() for t in low]
    grad_out = torch.randn(v.shape, dtype=torch.float64).to(kernel_device)
    ref, ref_grads = _forward_backward(gated_linear_attention_reference, master, grad_out)
    out, grads = _forward_backward(lambda *x: gated_linear_attention(*x, backend="triton"), low, grad_out)
    assert_close("o", ref, out)
    for name, g_ref, g_out in zip(_GRAD_NAMES[:3], ref_grads, grads):
        assert_close(name, g_ref, g_out)
    assert all(torch.isfinite(g).all() for g in grads[3:])


@pytest.mark.parametrize(
    ("bidirectional", "dtype"), [(False, torch.float32), (True, torch.float32), (True, torch.float16)], ids=str
)
def test_gated_kernel_gate_logits(bidirectional, dtype, kernel_device, poison_empty):
    """``gate_normalizer``: gate logits in, ``logsigmoid(x) / c`` computed in-kernel. Output and the gradients of
    q, k, v and the logits vs the float64 recurrence on float64 ``logsigmoid(x) / c``, with logits from -300 (a
    log gate of -75: clamped in-kernel to -16, a constant, where the true gradient is ~exp(-75)) to +30 (no decay)."""
    q, k, v, _, _ = _inputs(1, 2, 40, 16, 16)
    gen = torch.Generator().manual_seed(3)
    logits = [3 * torch.randn(1, 2, 40, 16, generator=gen, dtype=torch.float64) for _ in range(2)]
    logits[0][..., 5, :], logits[1][..., 9, :] = -300.0, -300.0
    logits[0][..., 7, ::2], logits[1][..., 2, 1::2] = 30.0, 30.0
    if not bidirectional:
        logits[1] = None
    low = _to((q, k, v), kernel_device, dtype) + _to(logits, kernel_device, torch.float32)
    leaves = [t for t in low if t is not None]
    master = [None if t is None else t.detach().double().requires_grad_() for t in low]
    grad_out = torch.randn(v.shape, generator=gen, dtype=torch.float64).to(kernel_device)
    to_log = lambda x: None if x is None else F.logsigmoid(x) / 4.0
    ref, ref_grads = _forward_backward(
        lambda q, k, v, x, y: gated_linear_attention_reference(q, k, v, to_log(x), to_log(y), scale=0.3),
        master,
        grad_out,
    )
    out, grads = _forward_backward(
        lambda *t: gated_linear_attention(*t, scale=0.3, gate_normalizer=4.0, backend="triton"), low, grad_out
    )
    assert len(grads) == len(leaves) and out.dtype == dtype
    assert_close("o", ref, out, dtype)
    for name, g_ref, g_out in zip(_GRAD_NAMES, ref_grads, grads):
        assert g_out.dtype == torch.float32 if name.startswith("dlog") else g_out.dtype == dtype
        assert_close(name, g_ref, g_out, dtype)


def test_gated_gate_logits_agree_across_backends(kernel_device):
    """The torch and reference backends apply the same ``logsigmoid(x) / c`` before their recurrences."""
    q, k, v, _, _ = _inputs(1, 1, 20, 16, 16)
    x, y = (torch.randn(1, 1, 20, 16, dtype=torch.float64) * 2 for _ in range(2))
    expected = gated_linear_attention_reference(q, k, v, F.logsigmoid(x) / 16, F.logsigmoid(y) / 16)
    out = gated_linear_attention(q, k, v, x, y, gate_normalizer=16, backend="reference")
    assert_close("reference", expected, out, tol=1e-12)
    out = gated_linear_attention(*(t.float() for t in (q, k, v, x, y)), gate_normalizer=16, backend="torch")
    assert_close("torch", expected, out)
    with pytest.raises(ValueError, match="gate_normalizer"):
        gated_linear_attention(q, k, v, x, y, gate_normalizer=0.0)


def test_gated_kernel_positive_gates_act_as_zero(kernel_device):
    """Positive log gates (invalid: no decay) are clamped to 0 in-kernel: output and gradients equal the recurrence
    on ``min(gate, 0)``, and a clamped gate gets gradient 0."""
    q, k, v, a, b = _inputs(1, 2, 37, 16, 16)
    a, b = a.detach().clone(), b.detach().clone()
    a[..., ::2, ::3] = 0.05
    b[..., 1::3, 1::2] = 0.3
    low = _to((q, k, v, a, b), kernel_device, torch.float32)
    clamped = [t.detach().double().requires_grad_() for t in (*low[:3], low[3].clamp(max=0), low[4].clamp(max=0))]
    grad_out = torch.randn(v.shape, dtype=torch.float64).to(kernel_device)
    ref, ref_grads = _forward_backward(gated_linear_attention_reference, clamped, grad_out)
    out, grads = _forward_backward(lambda *x: gated_linear_attention(*x, backend="triton"), low, grad_out)
    assert_close("o", ref, out)
    for name, g_ref, g_out, gate in zip(_GRAD_NAMES, ref_grads, grads, (None, None, None, a, b)):
        expected = g_ref if gate is None else torch.where(gate.to(g_ref.device) > 0, 0.0, g_ref)
        assert_close(name, expected, g_out)


@pytest.mark.parametrize("chunk", [16, 64, 128])
def test_gated_kernel_chunk_sizes(chunk, kernel_device):
    """The op's chunk size is a tuning choice: one sub-block per chunk up to eight give the same result."""
    if chunk == 128 and kernel_device.type != "cuda":
        pytest.skip("128-token chunks are slow under the interpreter; 16 and 64 cover one and several sub-blocks")
    low = _to(_inputs(1, 1, 150 if chunk == 128 else 40, 16, 16), kernel_device, torch.float32)
    master = [t.detach().double().requires_grad_() for t in low]
    grad_out = torch.randn(low[2].shape, dtype=torch.float64).to(kernel_device)
    ref, ref_grads = _forward_backward(lambda *x: gated_linear_attention_reference(*x, scale=0.5), master, grad_out)
    op = torch.ops.visionattn.gated_linear_attention_fwd
    out, grads = _forward_backward(lambda *x: op(*x, 0.5, chunk, 0.0), low, grad_out)
    assert_close("o", ref, out)
    for name, g_ref, g_out in zip(_GRAD_NAMES, ref_grads, grads):
        assert_close(name, g_ref, g_out)


def _fixed_segments(monkeypatch, segment):
    """Every state scan split into segments of ``segment`` chunks (the GPU chooses by occupancy, ``scan_segments``)."""
    from visionattn.kernels import gated

    monkeypatch.setattr(gated, "scan_segments", lambda chunks, scans, device: (segment, -(-chunks // segment)))


@pytest.mark.parametrize(
    ("segment", "length", "bidirectional", "strong"),
    [(1, 70, True, False), (2, 97, True, True), (2, 70, False, False), (3, 97, True, False)],
    ids=str,
)
def test_gated_kernel_segmented_scan(segment, length, bidirectional, strong, kernel_device, monkeypatch):
    """The two-level state scan (segments from a zero state, then the carry across segments) against the float64
    recurrence: output and every gradient (the backward's gradient scans are segmented too), odd lengths, a last
    segment shorter than the others, gates of -1e4 and -inf; weak gates, so that the carried states matter."""
    _fixed_segments(monkeypatch, segment)
    inputs = _inputs(1, 2, length, 16, 32, bidirectional=bidirectional, strong=strong, weak=True)
    _check_against_reference(_to(inputs, kernel_device, torch.float32), torch.float32, scale=0.3)


def test_gated_kernel_segmented_gate_logits(kernel_device, monkeypatch):
    """Segmented scans with gate logits (the decays are sums of the in-kernel log gates) in half precision."""
    _fixed_segments(monkeypatch, 1)
    q, k, v, a, b = _inputs(1, 1, 70, 16, 16)
    logits = [3 * torch.randn(t.shape, generator=torch.Generator().manual_seed(7), dtype=t.dtype) + 4 for t in (a, b)]
    low = _to((q, k, v), kernel_device, torch.float16) + _to(logits, kernel_device, torch.float32)
    _check_against_reference(low, torch.float16, gate_normalizer=16.0)


def test_gated_scan_segments_fill_the_gpu(monkeypatch):
    """On an H100 (132 SMs) the issue's ViG-T scans (B8 H3, 64 chunks) are split, ViG-S and ViG-H are not."""
    from visionattn.kernels import gated

    monkeypatch.setattr(gated, "_sm_count", lambda device: 132)
    device = torch.device("cuda")
    assert gated.scan_segments(64, 8 * 3 * 2, device) == (6, 11)  # forward: 528 programs
    assert gated.scan_segments(64, 8 * 3 * 4, device) == (11, 6)  # backward: state and gradient scans
    assert gated.scan_segments(49, 128 * 3 * 2, device) == (49, 1)  # ViG-H stage 1
    assert gated.scan_segments(4, 256 * 6 * 2, device) == (4, 1)  # ViG-S
    assert gated.scan_segments(1, 1, device) == (1, 1)


def test_gated_kernel_compiles_fullgraph(kernel_device):
    """Compiled output and the gradients of q, k, v and both gates vs the float64 recurrence."""
    inputs = _to(_inputs(1, 1, 9, 16, 16), kernel_device, torch.float32)
    backend = "inductor" if kernel_device.type == "cuda" else "aot_eager"
    fn = lambda *x: gated_linear_attention(*x, scale=0.3, backend="triton")
    _check_against_reference(inputs, torch.float32, scale=0.3, run=torch.compile(fn, fullgraph=True, backend=backend))


def test_gated_kernel_empty_sequence(kernel_device):
    inputs = _to([t[:, :, :0] for t in _inputs(1, 2, 4, 16, 32)], kernel_device, torch.float32)
    out, grads = _forward_backward(
        lambda *x: gated_linear_attention(*x, backend="triton"), inputs, torch.zeros(1, 2, 0, 32, device=kernel_device)
    )
    assert out.shape == (1, 2, 0, 32) and [g.shape for g in grads] == [t.shape for t in inputs]


def test_gated_kernel_opcheck(kernel_device):
    q, k, v, a, b = (t.float().to(kernel_device) for t in _inputs(1, 1, 9, 16, 16))
    torch.library.opcheck(torch.ops.visionattn.gated_linear_attention_fwd, (q, k, v, a, b, 0.25, 16, 0.0))
    torch.library.opcheck(torch.ops.visionattn.gated_linear_attention_fwd, (q, k, v, a, b, 0.25, 16, 16.0))


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_gated_kernel_reports_flops(bidirectional, kernel_device):
    from torch.utils.flop_counter import FlopCounterMode

    inputs = _to(_inputs(1, 2, 9, 16, 32, bidirectional=bidirectional), kernel_device, torch.float32)
    with FlopCounterMode(display=False) as counter:
        out = gated_linear_attention(*inputs, backend="triton")
        out.sum().backward()
    per_direction = 2 * 9 * 16 * 32
    assert counter.get_total_flops() == (4 + 8) * per_direction * (2 if bidirectional else 1)


def test_gated_kernel_rejects_unsupported_input(kernel_device):
    q, k, v, a, b = (t.float().to(kernel_device) for t in _inputs(1, 1, 5, 8, 16))
    with pytest.raises(NotImplementedError, match="head dim"):
        gated_linear_attention(q, k, v, a, b, backend="triton")
    q, k, v, a, b = (t.to(kernel_device) for t in _inputs(1, 1, 5, 16, 16))
    with pytest.raises(NotImplementedError, match="q.dtype"):
        gated_linear_attention(q, k, v, a, b, backend="triton")
    q, k, v = (t.float() for t in (q, k, v))
    with pytest.raises(NotImplementedError, match="log_gate_bwd"):
        gated_linear_attention(q, k, v, a.float(), b, backend="triton")


# ----------------------------------------------------------------------------------------------- GPU, real sizes
#: (label, B, H, N, Dk, Dv): the issue's shapes (ViG-S 224, ViG-T 1024, ViG-H stage 1 at 224).
GPU_SHAPES = [
    ("vig_s_224", 256, 6, 196, 32, 64),
    ("vig_t_1024", 8, 3, 4096, 32, 64),
    ("vig_h_stage1_224", 128, 3, 3136, 16, 32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
@pytest.mark.parametrize(("label", "batch", "heads", "length", "dk", "dv"), GPU_SHAPES, ids=[s[0] for s in GPU_SHAPES])
def test_gated_kernel_real_sizes_bf16(label, batch, heads, length, dk, dv, bidirectional):
    inputs = _inputs(batch, heads, length, dk, dv, bidirectional=bidirectional)
    _check_against_reference(_to(inputs, torch.device("cuda"), torch.bfloat16), torch.bfloat16)


def _gate_logits(inputs, seed=5):
    """``inputs`` with its gates replaced by ViG-like gate logits (spread 4: log gates from ~-1 to ~0 at c = 16)."""
    gen = torch.Generator().manual_seed(seed)
    logit = lambda t: None if t is None else 4 * torch.randn(t.shape, generator=gen, dtype=t.dtype)
    return (*inputs[:3], logit(inputs[3]), logit(inputs[4]))


@pytest.mark.gpu
@pytest.mark.parametrize(("label", "batch", "heads", "length", "dk", "dv"), GPU_SHAPES, ids=[s[0] for s in GPU_SHAPES])
def test_gated_kernel_gate_logits_real_sizes_bf16(label, batch, heads, length, dk, dv):
    """ViG's call: bf16 q, k, v and bf16 gate logits, ``gate_normalizer=16`` (logsigmoid in-kernel)."""
    inputs = _gate_logits(_inputs(batch, heads, length, dk, dv))
    _check_against_reference(_to(inputs, torch.device("cuda"), torch.bfloat16), torch.bfloat16, gate_normalizer=16.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dv", [16, 32, 64])
@pytest.mark.parametrize("dk", [16, 32, 64])
def test_gated_kernel_head_dims(dk, dv, dtype):
    inputs = _inputs(3, 2, 333, dk, dv, bnhd=dk == dv)
    _check_against_reference(_to(inputs, torch.device("cuda"), dtype), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel_name", ["state", "output", "bwd"])
def test_gated_kernel_every_config(kernel_name, monkeypatch):
    """Each autotune config of each kernel gives the right answer (autotune may pick any of them), for log gates and
    for gate logits."""
    from visionattn.kernels import _launch, gated, gated_bwd, gated_fwd

    kernel = {
        "state": gated._gated_kernel_state,
        "output": gated_fwd._gated_fwd_kernel_output,
        "bwd": gated_bwd._gated_bwd_kernel,
    }[kernel_name]
    inputs = _inputs(2, 3, 200, 32, 64)
    for config in list(kernel.configs):
        monkeypatch.setattr(kernel, "configs", [config])
        monkeypatch.setattr(kernel, "cache", {})
        # launch() would otherwise replay the config it recorded for the previous one
        monkeypatch.setattr(_launch, "_RESOLVED", {})
        _check_against_reference(_to(inputs, torch.device("cuda"), torch.bfloat16), torch.bfloat16)
        low = _to(_gate_logits(inputs), torch.device("cuda"), torch.bfloat16)
        _check_against_reference(low, torch.bfloat16, gate_normalizer=16.0)


@pytest.mark.gpu
def test_gated_kernel_deterministic():
    inputs = _to(_inputs(16, 6, 196, 32, 64), torch.device("cuda"), torch.bfloat16)
    grad_out = torch.randn(16, 6, 196, 64, device="cuda", dtype=torch.bfloat16)
    runs = [_forward_backward(lambda *x: gated_linear_attention(*x, backend="triton"), inputs, grad_out) for _ in "ab"]
    (out_a, grads_a), (out_b, grads_b) = runs
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(x, y) for x, y in zip(grads_a, grads_b))
