"""Triton linear attention (interpreter on CPU, native on GPU) against the float64 reference: output and gradients."""

import pytest
import torch

from tests._numerics import assert_close
from tests.ops.test_linear import rope_tables
from visionattn.kernels import _launch
from visionattn.ops import (
    linear_attention,
    linear_attention_apply,
    linear_attention_query_mean,
    linear_attention_reference,
    linear_attention_state,
    merge_linear_attention_states,
)

#: (feature_map, normalize, key_weight, decoupled rope) — every flag of the kernels, forward and backward.
VARIANTS = [
    ("elu1", "divisive", None, False),
    ("relu", "additive", "tensor", False),
    ("softmax", None, "rala", False),
    ("identity", None, "tensor", False),
    ("elu1", "additive", "rala", True),
    ("elu1", "divisive", "rala", True),
    ("softmax", "divisive", "tensor", True),
    ("relu", None, "rala", True),
]


def _variant_id(v):
    return "{}-{}-{}-{}".format(v[0], v[1], v[2], "rope" if v[3] else "plain")


def _inputs(
    gen, variant, *, b=1, h=2, nq=20, nk=20, d=16, dv=16, dtype=torch.float32, device="cpu", magnitude=1.0, bnhd=False
):
    """Inputs and kwargs for one variant; ``bnhd`` makes q, k, v strided (B, N, H, D) views."""
    feature_map, normalize, key_weight, decoupled = variant

    def make(n, dim):
        shape = (b, n, h, dim) if bnhd else (b, h, n, dim)
        t = (magnitude * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype)
        return (t.transpose(1, 2) if bnhd else t).requires_grad_()

    inputs = {"q": make(nq, d), "k": make(nk, d), "v": make(nk, dv)}
    kwargs = {"feature_map": feature_map, "normalize": normalize}
    if decoupled:
        inputs["q_norm"], inputs["k_norm"] = make(nq, d), make(nk, d)
        kwargs["rope"] = tuple(t.to(device=device, dtype=torch.float32) for t in rope_tables(nq, d))
    if key_weight == "tensor":
        inputs["key_weight"] = (
            (torch.rand(b, h, nk, generator=gen) + 0.5).to(device=device, dtype=dtype).requires_grad_()
        )
    elif key_weight is not None:
        kwargs["key_weight"] = key_weight
    return inputs, kwargs


def _check_against_reference(gen, inputs, kwargs, dtype, tol=None, run=None):
    out = linear_attention(**inputs, **kwargs, backend="triton") if run is None else run(**inputs)
    ref64 = {n: t.detach().double().requires_grad_() for n, t in inputs.items()}
    kw64 = dict(kwargs)
    if "rope" in kw64:
        kw64["rope"] = tuple(t.double() for t in kw64["rope"])
    ref = linear_attention_reference(**ref64, **kw64)
    assert out.dtype == inputs["q"].dtype
    assert_close("out", ref, out, dtype=dtype, tol=tol)
    do = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(ref.device)
    grads = torch.autograd.grad(out, list(inputs.values()), do.to(dtype=out.dtype))
    ref_grads = torch.autograd.grad(ref, list(ref64.values()), do)
    for name, g, r in zip(inputs, grads, ref_grads):
        assert_close(f"d{name}", r, g, dtype=dtype, tol=tol)


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_linear_attention_kernel_matches_reference_fp32(kernel_device, poison_empty, rng, variant):
    inputs, kwargs = _inputs(rng, variant, device=kernel_device)
    _check_against_reference(rng, inputs, kwargs, torch.float32)


@pytest.mark.parametrize(
    "shape",
    [dict(nq=23, nk=37, d=24, dv=16), dict(nq=17, nk=17, d=16, dv=32, bnhd=True)],
    ids=["cross-odd-dims", "bnhd-strided"],
)
def test_linear_attention_kernel_handles_shapes_and_strides(kernel_device, poison_empty, rng, shape):
    variant = ("elu1", "additive", "rala", shape.get("bnhd", False))
    inputs, kwargs = _inputs(rng, variant, device=kernel_device, **shape)
    if shape.get("bnhd"):
        out = linear_attention(**inputs, **kwargs, backend="triton")
        assert out.transpose(1, 2).is_contiguous(), "a (B, N, H, D) q gets a (B, N, H, Dv) output"
    _check_against_reference(rng, inputs, kwargs, torch.float32)


@pytest.mark.parametrize("variant", [("elu1", "additive", None, False), ("softmax", "divisive", "rala", True)])
def test_linear_attention_kernel_takes_pair_rope_tables(kernel_device, poison_empty, rng, variant):
    """(N, D/2) tables (one angle per channel pair; the kernels read them as one interleaved table) vs float64, and
    equal to the same rotation given as (N, D) tables."""
    inputs, kwargs = _inputs(rng, variant, device=kernel_device)
    full = tuple(t.to(device=kernel_device, dtype=torch.float32) for t in rope_tables(20, 16))
    kwargs["rope"] = tuple(t[:, ::2].contiguous() for t in full)
    _check_against_reference(rng, inputs, kwargs, torch.float32)
    out = linear_attention(**inputs, **kwargs, backend="triton")
    ref = linear_attention(**inputs, **{**kwargs, "rope": full}, backend="triton")
    assert_close("out", ref, out, dtype=torch.float32)


@pytest.mark.parametrize("variant", [VARIANTS[1], VARIANTS[4]], ids=_variant_id)
def test_linear_attention_kernel_matches_reference_fp16(kernel_device, rng, variant):
    inputs, kwargs = _inputs(rng, variant, device=kernel_device, dtype=torch.float16)
    _check_against_reference(rng, inputs, kwargs, torch.float16)


@pytest.mark.parametrize("normalize, magnitude", [("divisive", 300.0), ("additive", 20.0)])
def test_linear_attention_kernel_fp16_large_magnitude_is_finite(kernel_device, rng, normalize, magnitude):
    # naive fp16 sums Σ_j φ(k_j) v_jᵀ reach ~1e7 here; the kernel accumulates and normalises in fp32
    inputs, kwargs = _inputs(
        rng,
        ("elu1", normalize, None, False),
        device=kernel_device,
        dtype=torch.float16,
        nq=64,
        nk=64,
        magnitude=magnitude,
    )
    _check_against_reference(rng, inputs, kwargs, torch.float16)


def test_linear_attention_kernel_state_split_merges_exactly(kernel_device, rng):
    inputs, kwargs = _inputs(rng, ("elu1", "additive", "rala", True), device=kernel_device)
    q, k, v, qn, kn = (inputs[n].detach() for n in ("q", "k", "v", "q_norm", "k_norm"))
    cos, sin = kwargs["rope"]
    qm = linear_attention_query_mean(qn, backend="triton")
    shards = [
        linear_attention_state(
            k[:, :, s],
            v[:, :, s],
            k_norm=kn[:, :, s],
            key_weight="rala",
            query_mean=qm,
            rope=(cos[s], sin[s]),
            backend="triton",
        )
        for s in (slice(0, 7), slice(7, 20))
    ]
    out = linear_attention_apply(
        q, merge_linear_attention_states(shards), normalize="additive", q_norm=qn, rope=(cos, sin), backend="triton"
    )
    assert_close("out", linear_attention_reference(q, k, v, **kwargs, q_norm=qn, k_norm=kn), out)


def _pin_state_split(monkeypatch, split: int, block_n: int = 16, warps: int = 4, stages: int = 1):
    """Run the forward state pass with one config on ``split`` Dv tiles (``STATE_TILE_ELEMS`` lets it split)."""
    import triton

    from visionattn.kernels import linear as fwd

    monkeypatch.setattr(fwd, "STATE_TILE_ELEMS", 16 * 16)
    kernel = fwd._linear_fwd_kernel_state
    config = triton.Config({"BLOCK_N": block_n, "DV_SPLIT": split}, num_warps=warps, num_stages=stages)
    monkeypatch.setattr(kernel, "configs", [config])
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(_launch, "_RESOLVED", {})  # launch() would replay the previous pin's config


@pytest.mark.parametrize(
    "variant, dv", [(VARIANTS[1], 32), (VARIANTS[4], 48), (VARIANTS[6], 32)], ids=["mala-weights", "rala-rope", "soft"]
)
def test_linear_attention_kernel_splits_the_state_over_dv(monkeypatch, kernel_device, poison_empty, rng, variant, dv):
    """The state pass on two Dv tiles (``DV_SPLIT``; on the GPU an autotune choice at D = Dv = 128), here 16 columns
    each, or 32 of a padded Dv = 48: with autograd and without vs float64, and the state vs the unsplit pass's (the
    first tile alone writes z and RALA's (m, l))."""
    _pin_state_split(monkeypatch, 2)
    inputs, kwargs = _inputs(rng, variant, device=kernel_device, dv=dv)
    _check_against_reference(rng, inputs, kwargs, torch.float32)
    with torch.no_grad():
        out = linear_attention(**inputs, **kwargs, backend="triton")
    ref64 = {n: t.detach().double() for n, t in inputs.items()}
    rope64 = {"rope": tuple(t.double() for t in kwargs["rope"])} if "rope" in kwargs else {}
    assert_close("out (inference)", linear_attention_reference(**ref64, **{**kwargs, **rope64}), out)
    key_args = dict(k_norm=inputs.get("k_norm"), key_weight=inputs.get("key_weight"), rope=kwargs.get("rope"))
    key_args = {n: t.detach() if isinstance(t, torch.Tensor) else t for n, t in key_args.items()}
    if kwargs.get("key_weight") == "rala":
        qn = inputs.get("q_norm", inputs["q"]).detach()
        key_args.update(key_weight="rala", query_mean=linear_attention_query_mean(qn, backend="triton"))
    k, v = inputs["k"].detach(), inputs["v"].detach()
    split = linear_attention_state(k, v, feature_map=kwargs["feature_map"], backend="triton", **key_args)
    _pin_state_split(monkeypatch, 1)
    whole = linear_attention_state(k, v, feature_map=kwargs["feature_map"], backend="triton", **key_args)
    for name, a, b in zip(("kv", "k_sum", "v_mean", "lse"), whole, split):
        assert_close(name, a, b, tol=1e-6)


@pytest.mark.parametrize("ones_dot", [False, True], ids=["row-tiles", "ones-dot"])
@pytest.mark.parametrize("feature_map", ["elu1", "softmax"])
def test_linear_attention_query_mean_kernel_configs(monkeypatch, kernel_device, rng, ones_dot, feature_map):
    """Both forms of the query-mean kernel (fp32 row-tile sums with a masked tail, the ones-matrix dot) vs float64:
    chunks of two whole tiles and of a tail alone, a padded head dim."""
    import triton

    from visionattn.kernels import linear_query_mean as fwd

    kernel = fwd._linear_fwd_kernel_query_mean
    config = triton.Config({"BLOCK_N": 16, "ONES_DOT": ones_dot}, num_warps=4, num_stages=1)
    monkeypatch.setattr(kernel, "configs", [config])
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(_launch, "_RESOLVED", {})  # launch() would replay the previous pin's config
    monkeypatch.setattr(fwd, "chunking", lambda n, bh, device, per_sm=0: (32, 2))
    q = torch.randn(2, 3, 37, 24, generator=rng).to(kernel_device)
    phi = {"elu1": lambda x: torch.nn.functional.elu(x) + 1, "softmax": lambda x: x.softmax(-1)}[feature_map]
    out = fwd.linear_query_mean_fwd(q, feature_map)
    assert_close("query mean", phi(q.double()).mean(dim=2), out)


def test_linear_attention_kernel_traces_with_fullgraph(kernel_device, rng):
    """Compiled forward and the gradients of q, k, v, q_norm, k_norm (all three custom ops) vs float64."""
    inputs, kwargs = _inputs(rng, ("elu1", "divisive", "rala", True), device=kernel_device)
    backend = "inductor" if kernel_device.type == "cuda" else "aot_eager"
    fn = torch.compile(lambda **t: linear_attention(**t, **kwargs, backend="triton"), fullgraph=True, backend=backend)
    _check_against_reference(rng, inputs, kwargs, torch.float32, run=fn)


@pytest.mark.parametrize("key_weight", [None, "rala"])
def test_linear_attention_kernel_reports_flops(kernel_device, rng, key_weight):
    """Under FlopCounterMode every op goes through the dispatcher (which also checks that returns do not alias);
    RALA's one-node op counts the same state and apply products."""
    from torch.utils.flop_counter import FlopCounterMode

    variant = ("elu1", "divisive", key_weight, False)
    inputs, kwargs = _inputs(rng, variant, device=kernel_device, nq=20, nk=20, d=16, dv=16)
    with FlopCounterMode(display=False) as counter:
        out = linear_attention(**inputs, **kwargs, backend="triton")
        out.sum().backward()
    # state and apply: 2·B·H·N·D·Dv each forward, twice that backward
    assert counter.get_total_flops() == 6 * (2 * 1 * 2 * 20 * 16 * 16)


def test_linear_attention_triton_rejects_unsupported_inputs(kernel_device):
    q = torch.randn(1, 1, 8, 8, device=kernel_device)
    with pytest.raises(NotImplementedError, match="head dim"):
        linear_attention(q, q, q, backend="triton")
    q = torch.randn(1, 1, 8, 16, device=kernel_device, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="dtype"):
        linear_attention(q, q, q, backend="triton")


# ------------------------------------------------------------------------------------------------ GPU, real sizes
def _chunked_kernels():
    from visionattn.kernels import linear as fwd
    from visionattn.kernels import linear_bwd as bwd

    return [
        fwd._linear_fwd_kernel_state,
        fwd._linear_fwd_kernel_apply,
        bwd._linear_bwd_kernel_apply,
        bwd._linear_bwd_kernel_state,
    ]


def _pin_config(monkeypatch, config):
    """Run the chunked kernels with one config: autotuning compiles every config per flag set, which would make
    the flag x shape x dtype tests take many minutes of compilation; every config is swept separately below."""
    import triton

    from visionattn.kernels import linear as fwd

    for kernel in _chunked_kernels():
        pinned = config
        if kernel is fwd._linear_fwd_kernel_state:  # its configs also choose the Dv tiles: one
            kwargs = {**config.kwargs, "DV_SPLIT": 1}
            pinned = triton.Config(kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        monkeypatch.setattr(kernel, "configs", [pinned])
        monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(_launch, "_RESOLVED", {})


def _config_for(d):
    from visionattn.kernels import linear_configs as cfg

    family = cfg._BIG_STATE_CONFIGS if d > 64 else cfg._SMALL_STATE_CONFIGS
    return next(c for c in cfg._REDUCE_CONFIGS if (c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) == family[0])


#: (B, H, N, D, dtype): the main head dims with every variant, odd N; D=32 and 96 (a padded tile) with a few.
GPU_CASES = [(1, 4, 4099, 64, torch.bfloat16), (1, 2, 2048, 128, torch.float16)]
GPU_EXTRA = [(4, 4, 3136, 32, torch.bfloat16, VARIANTS[0]), (1, 2, 1000, 96, torch.float16, VARIANTS[4])]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "B{}-H{}-N{}-D{}-{}".format(*c))
@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_linear_attention_kernel_matches_reference_gpu(monkeypatch, rng, variant, case):
    b, h, n, d, dtype = case
    _pin_config(monkeypatch, _config_for(d))
    inputs, kwargs = _inputs(rng, variant, b=b, h=h, nq=n, nk=n, d=d, dv=d, dtype=dtype, device="cuda", bnhd=True)
    _check_against_reference(rng, inputs, kwargs, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_EXTRA, ids=lambda c: "B{}-H{}-N{}-D{}-{}".format(*c[:5]))
def test_linear_attention_kernel_other_head_dims_gpu(monkeypatch, rng, case):
    b, h, n, d, dtype, variant = case
    _pin_config(monkeypatch, _config_for(d))
    inputs, kwargs = _inputs(rng, variant, b=b, h=h, nq=n, nk=n, d=d, dv=d, dtype=dtype, device="cuda")
    _check_against_reference(rng, inputs, kwargs, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "B{}-H{}-N{}-D{}-{}".format(*c))
def test_linear_attention_kernel_pair_rope_tables_gpu(monkeypatch, rng, case):
    """(N, D/2) tables at real sizes: vs float64, and equal to the (N, D) tables of the same rotation (both are
    rounded to the same 16-bit values)."""
    b, h, n, d, dtype = case
    _pin_config(monkeypatch, _config_for(d))
    variant = ("elu1", "additive", "rala", True)
    inputs, kwargs = _inputs(rng, variant, b=b, h=h, nq=n, nk=n, d=d, dv=d, dtype=dtype, device="cuda")
    full = kwargs["rope"]
    kwargs["rope"] = tuple(t[:, ::2] for t in full)
    _check_against_reference(rng, inputs, kwargs, dtype)
    out = linear_attention(**inputs, **kwargs, backend="triton")
    assert_close("out", linear_attention(**inputs, **{**kwargs, "rope": full}, backend="triton"), out, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("normalize, magnitude", [("divisive", 300.0), ("additive", 20.0)])
def test_linear_attention_kernel_fp16_large_magnitude_gpu(monkeypatch, rng, normalize, magnitude):
    # no RALA key weights here: their softmax logits reach ~1e6 at this magnitude, where one fp32 rounding of a
    # logit already moves a weight by percents (ill-conditioned in any fp32 implementation, not an overflow test)
    _pin_config(monkeypatch, _config_for(64))
    inputs, kwargs = _inputs(
        rng,
        ("elu1", normalize, None, True),
        b=2,
        h=4,
        nq=4096,
        nk=4096,
        d=64,
        dv=64,
        dtype=torch.float16,
        device="cuda",
        magnitude=magnitude,
    )
    _check_against_reference(rng, inputs, kwargs, torch.float16)


@pytest.mark.gpu
def test_linear_attention_kernel_is_deterministic_gpu(rng):
    inputs, kwargs = _inputs(
        rng,
        ("elu1", "additive", "rala", True),
        b=2,
        h=4,
        nq=8192,
        nk=8192,
        d=64,
        dv=64,
        dtype=torch.bfloat16,
        device="cuda",
    )
    outs = []
    for _ in range(2):
        out = linear_attention(**inputs, **kwargs, backend="triton")
        outs.append((out, *torch.autograd.grad(out, list(inputs.values()), torch.ones_like(out))))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("config_index", range(9))
def test_linear_attention_kernel_every_config_gpu(monkeypatch, rng, d, config_index):
    """Each autotune config of the chunked kernels, forced one at a time (autotune alone would test only winners)."""
    import triton

    from visionattn.kernels import linear as fwd
    from visionattn.kernels import linear_configs as cfg

    assert len(cfg._APPLY_CONFIGS) == 9, "every config is one case here"
    config = cfg._APPLY_CONFIGS[config_index]
    if config_index < len(cfg._WIDE_STATE_CONFIGS):  # and one of the forward state pass's 128 x 128 configs
        n, w, s, split = cfg._WIDE_STATE_CONFIGS[config_index]
        monkeypatch.setattr(fwd, "STATE_TILE_ELEMS", 64 * 128)
        state_config = triton.Config({"BLOCK_N": n, "DV_SPLIT": split}, num_warps=w, num_stages=s)
        monkeypatch.setattr(fwd._linear_fwd_kernel_state, "configs", [state_config])
        monkeypatch.setattr(fwd._linear_fwd_kernel_state, "cache", {})
        monkeypatch.setattr(_launch, "_RESOLVED", {})
    _pin_config(monkeypatch, config)
    inputs, kwargs = _inputs(
        rng,
        ("softmax", "additive", "rala", True),
        b=2,
        h=2,
        nq=1000,
        nk=1000,
        d=d,
        dv=d,
        dtype=torch.bfloat16,
        device="cuda",
    )
    try:
        _check_against_reference(rng, inputs, kwargs, torch.bfloat16)
    except triton.runtime.errors.OutOfResources as exc:
        pytest.skip(f"{config} does not fit at D={d} (autotune skips it too): {exc}")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [VARIANTS[0], ("elu1", "additive", "rala", True)], ids=_variant_id)
def test_linear_attention_kernel_split_state_real_size_gpu(monkeypatch, rng, variant):
    """B1 H12 N32760 d128, the state pass on two 128 x 64 Dv tiles per chunk: with and without autograd vs float64,
    and vs the unsplit 16-warp pass."""
    shape = dict(b=1, h=12, nq=32760, nk=32760, d=128, dv=128)
    inputs, kwargs = _inputs(rng, variant, **shape, dtype=torch.bfloat16, device="cuda")
    _pin_state_split(monkeypatch, 2, block_n=32, warps=8, stages=3)
    _check_against_reference(rng, inputs, kwargs, torch.bfloat16)
    with torch.no_grad():
        split = linear_attention(**inputs, **kwargs, backend="triton")
        _pin_state_split(monkeypatch, 1, block_n=64, warps=16, stages=3)
        whole = linear_attention(**inputs, **kwargs, backend="triton")
    assert_close("split vs unsplit (16 warps)", whole, split, dtype=torch.bfloat16)


@pytest.mark.gpu
def test_linear_attention_kernel_compiles_with_inductor_gpu(rng):
    inputs, kwargs = _inputs(
        rng,
        ("elu1", "additive", "rala", True),
        b=2,
        h=4,
        nq=4096,
        nk=4096,
        d=64,
        dv=64,
        dtype=torch.bfloat16,
        device="cuda",
        bnhd=True,
    )
    fn = torch.compile(lambda **t: linear_attention(**t, **kwargs, backend="triton"), fullgraph=True)
    _check_against_reference(rng, inputs, kwargs, torch.bfloat16, run=fn)
