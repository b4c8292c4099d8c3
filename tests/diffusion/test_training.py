"""Trainable methods inside diffusers models: fine-tuning, safetensors round trips, torch.compile."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests._numerics import assert_close
from tests.diffusion._backends import record_backends
from tests.diffusion._tiny import GPU_HEAD_DIM, TINY_MODELS
from visionattn.diffusion import apply, remove

_TRAINABLE = {
    "linear": dict(backend="reference"),
    "sparse_linear": dict(topk=0.5, block_q=8, block_k=8, backend="reference"),
}
_OUTPUT_LAYERS = ("fc2.weight", "proj.weight")


def _output(model, inputs):
    return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("method", sorted(_TRAINABLE))
def test_finetune_decreases_loss_and_trains_method_weights(method):
    tiny = TINY_MODELS["flux"]
    model, inputs = tiny.build(), tiny.inputs(batch=2)
    target = torch.randn(inputs["hidden_states"].shape, generator=torch.Generator().manual_seed(1))
    handle = apply(model, method, **_TRAINABLE[method])
    model.train()
    method_params = {n: p for n, p in model.named_parameters() if ".processor.method." in n}
    assert method_params, "the method's weights must be model parameters"
    initial = {n: p.detach().clone() for n, p in method_params.items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(_output(model, inputs), target)
        loss.backward()
        # zero-initialised output layers (LinFusion's fc2, SLA's proj) get gradients from the first step on
        assert all(p.grad.abs().sum() > 0 for n, p in method_params.items() if n.endswith(_OUTPUT_LAYERS))
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses
    assert all(not torch.equal(p, initial[n]) for n, p in method_params.items())
    remove(handle)


@pytest.mark.parametrize("method", sorted(_TRAINABLE))
def test_method_weights_round_trip_through_safetensors(method, tmp_path):
    tiny = TINY_MODELS["flux"]
    inputs = tiny.inputs(batch=1)
    trained = tiny.build()
    apply(trained, method, **_TRAINABLE[method])
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if ".processor.method." in name:
                param.normal_()
    path = tmp_path / "transformer.safetensors"
    save_file(trained.state_dict(), str(path))

    fresh = tiny.build(seed=1)
    apply(fresh, method, **_TRAINABLE[method])
    fresh.load_state_dict(load_file(str(path)), strict=True)
    with torch.no_grad():
        assert torch.equal(_output(fresh, inputs), _output(trained, inputs))


_COMPILABLE = {
    "radial": dict(block_size=16, dense_steps=0),
    # 7-token blocks leave a short last key block: the exact density is then a tensor traced in the graph
    "sparse_linear": dict(topk=0.5, block_q=7, block_k=7),
}


@pytest.mark.parametrize(
    "method, regional",
    [("radial", False), ("radial", True), ("sparse_linear", True)],
    ids=["radial-whole-model", "radial-regional-fullgraph", "sla-regional-fullgraph"],
)
def test_compiled_transformer_matches_eager(method, regional):
    """dynamo through the processors: masks are built eagerly (outside the graph, on the first call) and handed to
    the op; diffusers' regional compilation of the repeated blocks then traces each block as one graph. The
    density statistics of the compiled call equal the eager ones.

    CPU CI uses the ``eager`` backend (no C++ toolchain, tracing only); the GPU test compiles with inductor.
    """
    tiny = TINY_MODELS["wan"]
    model, inputs = tiny.build(), tiny.inputs(batch=1)
    handle = apply(model, method, backend="reference", **_COMPILABLE[method])
    torch._dynamo.reset()
    with torch.no_grad():
        eager = _output(model, inputs)
        density = handle.density()
        handle.reset()
        if regional:
            model.compile_repeated_blocks(fullgraph=True, backend="eager")
            compiled = model
        else:
            compiled = torch.compile(model, backend="eager")
        assert_close(f"compiled {method}", eager, _output(compiled, inputs))
    assert handle.density() == density


@pytest.mark.gpu
@pytest.mark.parametrize(
    "method, options",
    [
        ("local", dict(kernel_size=(3, 5, 5))),
        ("local", dict(window="circle", radius=2.5)),
        ("radial", dict(block_size=16, decay_factor=0.3, dense_layers=0, dense_steps=0)),
        ("sparse_linear", dict(topk=0.5, block_q=16, block_k=16)),
        ("linear", {}),
    ],
    ids=["na", "circle", "radial", "sla", "linear"],
)
def test_compiled_transformer_matches_eager_on_gpu(method, options, monkeypatch):
    """Inductor with the Triton kernels in the graph: the GPU variant of the tiny Wan (head dim 32) selects them (the
    eager call records the selection, which tracing repeats for the same inputs), and diffusers' regional compilation
    with ``fullgraph=True`` traces every block as one graph (any graph break fails)."""
    tiny = TINY_MODELS["wan"]
    model = tiny.build(head_dim=GPU_HEAD_DIM).cuda()
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in tiny.inputs(2, 4, 0, GPU_HEAD_DIM).items()}
    apply(model, method, **options)
    calls = record_backends(monkeypatch)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = _output(model, inputs)
        monkeypatch.undo()  # trace the library's own backend selection
        assert calls and "reference" not in {backend for _, backend in calls}, calls
        model.compile_repeated_blocks(fullgraph=True)
        assert_close(f"compiled {method}", eager, _output(model, inputs), tol=1e-3)


def test_method_state_dict_round_trip_across_pipeline_experts(tmp_path):
    """``handle.method_state_dict()`` holds only the method tensors, prefixed per expert of a two-denoiser pipeline;
    ``load_method_state_dict`` restores them into a fresh pipeline and checks the keys strictly."""
    tiny = TINY_MODELS["wan"]
    options = _TRAINABLE["linear"]

    def pipeline(seed):
        class _Pipe:
            transformer, transformer_2 = tiny.build(seed), tiny.build(seed + 1)

        return _Pipe()

    trained = pipeline(0)
    handle = apply(trained, "linear", **options)
    with torch.no_grad():
        for value in handle.method_state_dict().values():
            value.normal_()
    state = handle.method_state_dict()
    assert state and all(k.startswith(("transformer.", "transformer_2.")) and ".processor.method." in k for k in state)
    path = tmp_path / "method.safetensors"
    save_file(state, str(path))

    fresh = pipeline(0)
    loaded = apply(fresh, "linear", **options)
    loaded.load_method_state_dict(load_file(str(path)))
    inputs = tiny.inputs(batch=1)
    with torch.no_grad():
        for name in ("transformer", "transformer_2"):
            want, got = (_output(getattr(p, name), inputs) for p in (trained, fresh))
            assert torch.equal(got, want), name

    partial = dict(state)
    extra = partial.pop(next(iter(partial)))
    with pytest.raises(ValueError, match="1 keys .* missing and no keys unexpected"):
        loaded.load_method_state_dict(partial)
    with pytest.raises(ValueError, match="unexpected"):
        loaded.load_method_state_dict(dict(state, bogus=extra))
    key = next(iter(state))
    with pytest.raises(ValueError, match="shape"):
        loaded.load_method_state_dict(dict(state, **{key: torch.zeros(1)}))
