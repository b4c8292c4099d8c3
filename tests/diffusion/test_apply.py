"""apply()/remove() on every supported diffusers model: stock parity at full density, self-attention only,
bit-identical restore, schedule and step counting, resolution and batch changes, clear errors."""

import pytest
import torch

from tests._numerics import assert_close
from tests.diffusion._backends import record_backends
from tests.diffusion._brute import circle_allowed, masked_softmax, radial_allowed
from tests.diffusion._tiny import GPU_HEAD_DIM, TINY_MODELS
from visionattn.diffusion import apply, remove
from visionattn.diffusion._processor import _MethodAttnProcessor

#: Options under which each method computes exactly dense softmax attention on the tiny models.
_FULL_DENSITY = {
    "local": dict(kernel_size=64, backend="reference"),
    "sparse_linear": dict(topk=1.0, backend="reference"),
    "circle": dict(window="circle", radius=1e3, backend="reference"),
}


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("method", ["local", "sparse_linear"])
@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_apply_matches_stock_and_remove_restores(name, method):
    tiny = TINY_MODELS[name]
    model, inputs = tiny.build(), tiny.inputs(batch=2)
    stock_out = _run(model, inputs)
    before = dict(model.attn_processors)

    handle = apply(model, method, **_FULL_DENSITY[method])
    after = model.attn_processors
    changed = {key for key in before if after[key] is not before[key]}
    assert changed and all(isinstance(after[key], _MethodAttnProcessor) for key in changed)
    assert all(".attn1." in key or key.endswith(".attn.processor") or ".attn2." in key for key in changed)
    cross = {key for key in before if key.endswith("attn2.processor") and name != "sd3"}
    assert not (changed & cross), "cross-attention processors must stay stock"
    assert_close(f"{name} {method} at full density", stock_out, _run(model, inputs))
    assert handle.density() == 1.0

    remove(handle)
    assert all(model.attn_processors[key] is before[key] for key in before)
    assert torch.equal(_run(model, inputs), stock_out)
    assert not any("processor" in key for key in model.state_dict())


@pytest.mark.parametrize("name", ["flux", "hunyuan_video"])
def test_circle_window_matches_stock_at_full_radius(name):
    tiny = TINY_MODELS[name]
    model, inputs = tiny.build(), tiny.inputs(batch=1)
    stock_out = _run(model, inputs)
    handle = apply(model, "local", **_FULL_DENSITY["circle"])
    assert_close(f"{name} circle at full radius", stock_out, _run(model, inputs))
    remove(handle)


@pytest.mark.parametrize("name", ["wan", "hunyuan_video", "cogvideox"])
def test_radial_matches_stock_at_full_density(name):
    tiny = TINY_MODELS[name]
    model, inputs = tiny.build(), tiny.inputs(batch=1)
    stock_out = _run(model, inputs)
    # every tiny grid fits in one 128-token block, where the radial mask is dense
    handle = apply(model, "radial", dense_layers=0, dense_steps=0, backend="reference")
    assert_close(f"{name} radial at full density", stock_out, _run(model, inputs))
    assert handle.density() == 1.0
    remove(handle)


class _BruteForce(torch.nn.Module):
    """Stands in for a layer's method: float64 masked softmax over the brute-force pattern of the grid."""

    def __init__(self, allowed_fn):
        super().__init__()
        self.allowed_fn = allowed_fn

    def forward(self, q, k, v, grid, state):
        allowed = self.allowed_fn(grid).to(q.device)
        return masked_softmax(q.double(), k.double(), v.double(), allowed).to(q.dtype), None


@pytest.mark.parametrize(
    "name, method, options, allowed_fn",
    [
        ("flux", "local", dict(window="circle", radius=2.5, tile=(2, 2)), lambda g: circle_allowed(g, 2.5)),
        ("sd3", "local", dict(window="circle", radius=2.0, tile=(2, 4)), lambda g: circle_allowed(g, 2.0)),
        ("cogvideox", "radial", dict(block_size=8, decay_factor=0.5), lambda g: radial_allowed(g, 8, 0.5, False)),
        ("hunyuan_video", "radial", dict(block_size=8), lambda g: radial_allowed(g, 8, 1.0, False)),
        ("wan", "radial", dict(block_size=16, decay_factor=0.3), lambda g: radial_allowed(g, 16, 0.3, True)),
    ],
    ids=["flux-circle", "sd3-circle", "cogvideox-radial", "hunyuan-radial", "wan-radial"],
)
def test_sparse_model_output_equals_brute_force_masked_attention(name, method, options, allowed_fn):
    tiny = TINY_MODELS[name]
    model, inputs = tiny.build(), tiny.inputs(batch=2, scale=2)
    handle = apply(model, method, dense_layers=0, dense_steps=0, backend="reference", **options)
    sparse_out = _run(model, inputs)
    assert handle.density() < 1.0
    for processor in handle.processors:
        processor.method = _BruteForce(allowed_fn)
    assert_close(f"{name} {method} vs brute force", _run(model, inputs), sparse_out)
    remove(handle)


def test_apply_follows_resolution_and_batch_changes():
    tiny = TINY_MODELS["wan"]
    model = tiny.build()
    stock = [_run(model, tiny.inputs(batch=b, scale=s)) for b, s in ((1, 1), (3, 2))]
    handle = apply(model, "local", **_FULL_DENSITY["local"])
    for (b, s), ref in zip(((1, 1), (3, 2)), stock):
        assert_close(f"wan B{b} scale{s}", ref, _run(model, tiny.inputs(batch=b, scale=s)))
    assert handle.state.grid == (3, 8, 6)
    remove(handle)


def test_hunyuan_text_padding_matches_stock():
    tiny = TINY_MODELS["hunyuan_video"]
    model, inputs = tiny.build(), tiny.inputs(batch=2)
    inputs["encoder_attention_mask"][0, 9:] = 0
    inputs["encoder_attention_mask"][1, 5:] = 0
    stock_out = _run(model, inputs)
    handle = apply(model, "local", **_FULL_DENSITY["local"])
    assert_close("hunyuan padded prompt", stock_out, _run(model, inputs))
    remove(handle)


def test_dense_schedule_counts_steps_per_timestep():
    tiny = TINY_MODELS["wan"]
    model, inputs = tiny.build(), tiny.inputs(batch=1)
    stock_out = _run(model, inputs)
    handle = apply(model, "local", kernel_size=1, dense_steps=2, backend="reference")
    state = handle.state
    steps = []
    for t in (900, 900, 700, 500, 950):  # cond/uncond at 900, then two steps, then a new generation
        out = _run(model, dict(inputs, timestep=torch.tensor([t])))
        steps.append(state.step)
        if t == 900:
            assert torch.allclose(out, stock_out, atol=1e-6), "steps before dense_steps must run dense attention"
    assert steps == [0, 0, 1, 2, 0]
    remove(handle)


def test_dense_layers_keep_first_layers_dense():
    tiny = TINY_MODELS["wan"]
    model, inputs = tiny.build(), tiny.inputs(batch=1)
    handle = apply(model, "local", kernel_size=1, dense_layers=1, backend="reference")
    _run(model, inputs)
    # layer 0 runs dense (1.0); layer 1 keeps 1 of the 3 * 4 * 6 keys of each query
    assert handle.density() == pytest.approx((1.0 + 1 / 72) / 2)
    handle.reset()
    assert handle.density() is None
    remove(handle)


def test_apply_to_pipeline_like_object():
    tiny = TINY_MODELS["pixart"]

    class _Pipe:
        transformer = tiny.build()

    handle = apply(_Pipe(), "local", kernel_size=3, backend="reference")
    assert len(handle.processors) == 1
    remove(handle)


def test_apply_rejects_radial_on_image_models():
    model = TINY_MODELS["flux"].build()
    with pytest.raises(ValueError, match="local"):
        apply(model, "radial")
    assert not any(isinstance(p, _MethodAttnProcessor) for p in model.attn_processors.values())


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(method="sparse"), ValueError, "method"),
        (dict(method="local", kernel_size=3, bogus=1), TypeError, "bogus"),
        (dict(method="local"), ValueError, "kernel_size"),
        (dict(method="local", kernel_size=(3, 3, 3)), ValueError, "kernel_size"),
        (dict(method="local", window="square"), ValueError, "window"),
        (dict(method="local", window="circle"), ValueError, "radius"),
        (dict(method="local", kernel_size=3, dense_steps=-1), ValueError, "dense_steps"),
        (dict(method="local", kernel_size=3, dense_layers=1.5), ValueError, "dense_layers"),
        (dict(method="agent", agent_ratio=1.0), ValueError, "agent_ratio"),
        (dict(method="agent", early_steps=-1), ValueError, "early_steps"),
        (dict(method="agent", early_sx=0), ValueError, "early_sx"),
        (dict(method="radial", block_size=0), ValueError, "block_size"),
        (dict(method="local", kernel_size=3, stride=5), ValueError, "stride"),
        (dict(method="local", kernel_size=(3, 2), stride=(1, 3)), ValueError, "stride"),
        (dict(method="local", kernel_size=3, radius=2.0), ValueError, "radius"),
        (dict(method="local", window="circle", radius=2.0, kernel_size=3), ValueError, "kernel_size"),
        (dict(method="local", window="circle", radius=2.0, stride=2), ValueError, "stride"),
        (dict(method="local", window="circle", radius=2.0, dilation=2), ValueError, "dilation"),
        (dict(method="local", window="circle", radius=float("nan")), ValueError, "radius"),
        (dict(method="local", window="circle", radius="2"), TypeError, "radius"),
        (dict(method="local", kernel_size=3, tile=(1, 2, 3)), ValueError, "tile"),
        (dict(method="local", kernel_size=3, backend="cuda"), ValueError, "backend"),
        (dict(method="radial", sink="yes"), TypeError, "sink"),
        (dict(method="radial", decay_factor=float("inf")), ValueError, "decay_factor"),
        (dict(method="radial", backend="nope"), ValueError, "backend"),
        (dict(method="sparse_linear", block_q=0), ValueError, "block_q"),
        (dict(method="sparse_linear", block_k=1.5), TypeError, "block_k"),
        (dict(method="sparse_linear", topk=2.0), ValueError, "topk"),
        (dict(method="sparse_linear", skip_ratio=-0.1), ValueError, "skip_ratio"),
        (dict(method="sparse_linear", feature_map="exp"), ValueError, "feature_map"),
        (dict(method="sparse_linear", backend="nope"), ValueError, "backend"),
        (dict(method="linear", eps=-1.0), ValueError, "eps"),
        (dict(method="linear", mid_dim=0), ValueError, "mid_dim"),
        (dict(method="linear", backend="cuda"), ValueError, "backend"),
        (dict(method="agent", k_scale2="a"), TypeError, "k_scale2"),
        (dict(method="agent", k_shortcut=float("nan")), ValueError, "k_shortcut"),
        (dict(method="agent", sx=1.5), TypeError, "sx"),
        (dict(method="agent", backend="triton"), ValueError, "backend"),
    ],
)
def test_apply_rejects_bad_arguments(kwargs, exc, match):
    """Every bad option raises at apply() (not at the first forward), naming the argument; nothing stays patched."""
    model = TINY_MODELS["pixart" if kwargs["method"] != "radial" else "wan"].build()
    with pytest.raises(exc, match=match):
        apply(model, **kwargs)
    assert not any(isinstance(p, _MethodAttnProcessor) for p in model.attn_processors.values())


def test_apply_rejects_unsupported_models_and_double_apply():
    with pytest.raises(TypeError, match="pipe_or_model"):
        apply(object(), "local", kernel_size=3)
    with pytest.raises(ValueError, match="model must be one of"):
        apply(torch.nn.Linear(2, 2), "local", kernel_size=3)
    model = TINY_MODELS["pixart"].build()
    handle = apply(model, "local", kernel_size=3)
    with pytest.raises(ValueError, match="remove"):
        apply(model, "local", kernel_size=3)
    remove(handle)


def test_processor_needs_the_hooked_model_call():
    model = TINY_MODELS["pixart"].build()
    handle = apply(model, "local", kernel_size=3, backend="reference")
    attn = model.transformer_blocks[0].attn1
    with pytest.raises(RuntimeError, match="grid"):
        attn(torch.randn(1, 16, attn.to_q.in_features))
    remove(handle)


def _cuda(inputs: dict, dtype) -> dict:
    """Inputs on CUDA: float activations in ``dtype``, timesteps (1-D) and RoPE tables (CogVideoX's tuple) as given."""
    cast = lambda t: t.to("cuda", dtype) if t.is_floating_point() and t.ndim > 1 else t.to("cuda")
    move = lambda v: cast(v) if isinstance(v, torch.Tensor) else v
    return {k: tuple(t.to("cuda") for t in v) if isinstance(v, tuple) else move(v) for k, v in inputs.items()}


#: Every method and main option set; radial only on the video models.
_GPU_METHODS = [
    ("local", dict(kernel_size=3)),
    ("local", dict(kernel_size=5, stride=2, dilation=1)),
    ("local", dict(window="circle", radius=2.5)),
    ("radial", dict(block_size=16, decay_factor=0.3)),
    ("sparse_linear", dict(topk=0.5, block_q=16, block_k=16)),
    ("linear", {}),
    ("agent", dict(agent_ratio=0.9)),
]


def _randomize_method_tensors(handle) -> None:
    """Seeded random method tensors (SLA's proj, LinFusion's projections start at zero), equal for every apply()."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for value in handle.method_state_dict().values():
            value.copy_(0.1 * torch.randn(value.shape, generator=gen))


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(TINY_MODELS))
@pytest.mark.parametrize(
    "method, options", _GPU_METHODS, ids=["na3", "na5s2", "circle", "radial", "sla", "linear", "agent"]
)
def test_triton_backends_match_reference_in_models(name, method, options, monkeypatch):
    """The GPU variants of the tiny models (head dim 32) run the Triton kernels (SDPA for agent) under
    ``backend=None``; the recorded backend selection proves it, so this never compares the reference to itself."""
    tiny = TINY_MODELS[name]
    if method == "radial" and not tiny.is_video:
        pytest.skip("radial needs a video model")
    model = tiny.build(head_dim=GPU_HEAD_DIM).to("cuda", torch.bfloat16)
    inputs = _cuda(tiny.inputs(batch=2, scale=4, head_dim=GPU_HEAD_DIM), torch.bfloat16)
    calls = record_backends(monkeypatch)
    outs = {}
    for backend in ("reference", None):
        calls.clear()
        handle = apply(model, method, dense_layers=0, dense_steps=0, backend=backend, **options)
        _randomize_method_tensors(handle)
        outs[backend] = _run(model, inputs).float()
        remove(handle)
        chosen = {b for _, b in calls}
        assert calls, f"{name} {method}: no visionattn op ran"
        assert method == "linear" or 0 < handle.density() < 1, f"{name} {method}: density {handle.density()}"
        if backend == "reference":
            assert chosen == {"reference"}, calls
        else:
            assert "reference" not in chosen, f"{name} {method}: backend=None fell back to the reference: {calls}"
    assert_close(f"{name} {method} triton vs reference", outs["reference"], outs[None], tol=2e-2)


def test_pipeline_experts_share_one_step_count():
    """Wan 2.2 hands the late steps to ``transformer_2``: its first call is the next step, not step 0."""
    tiny = TINY_MODELS["wan"]

    class _Pipe:
        transformer, transformer_2 = tiny.build(), tiny.build(seed=1)

    pipe, inputs = _Pipe(), tiny.inputs(batch=1)
    handle = apply(pipe, "local", kernel_size=3, backend="reference")
    assert len(handle.processors) == 4
    for model, t in ((pipe.transformer, 900), (pipe.transformer, 800), (pipe.transformer_2, 700)):
        _run(model, dict(inputs, timestep=torch.tensor([t])))
    assert handle.state.step == 2
    remove(handle)


def _stock_processors(model) -> bool:
    return not any(isinstance(p, _MethodAttnProcessor) for p in model.attn_processors.values())


def test_apply_is_atomic_across_denoisers():
    """A pipeline whose second denoiser cannot take the method leaves the first one unpatched, hooks included."""
    video, image = TINY_MODELS["wan"], TINY_MODELS["unet"]

    class _Pipe:
        transformer, unet = video.build(), image.build()

    pipe = _Pipe()
    with pytest.raises(ValueError, match="needs a video model"):
        apply(pipe, "radial")  # fits the Wan transformer, not the UNet
    assert _stock_processors(pipe.transformer) and not pipe.transformer._forward_pre_hooks

    pipe.unet = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="model must be one of"):
        apply(pipe, "local", kernel_size=3)
    assert _stock_processors(pipe.transformer) and not pipe.transformer._forward_pre_hooks


def test_apply_on_a_patched_second_denoiser_keeps_the_other_handle():
    tiny = TINY_MODELS["wan"]

    class _Pipe:
        transformer, transformer_2 = tiny.build(), tiny.build(seed=1)

    pipe = _Pipe()
    first = apply(pipe.transformer_2, "local", kernel_size=3)
    with pytest.raises(ValueError, match="remove"):
        apply(pipe, "local", kernel_size=3)
    assert _stock_processors(pipe.transformer) and not pipe.transformer._forward_pre_hooks
    assert len(first.processors) == 2 and all(m.processor is p for (m, _), p in zip(first._originals, first.processors))
    remove(first)
    assert _stock_processors(pipe.transformer_2)
