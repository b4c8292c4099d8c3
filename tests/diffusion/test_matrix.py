"""Every method and main option set on every supported model (CPU reference backends): finite output of the stock
shape, an exact density in (0, 1) for the sparse methods, and remove() restoring bit-identical outputs."""

import functools

import pytest
import torch

from tests.diffusion._tiny import TINY_MODELS
from visionattn.diffusion import apply, remove

_CASES = {
    "na3": ("local", dict(kernel_size=3)),
    "na3-stride2": ("local", dict(kernel_size=3, stride=2)),
    "circle": ("local", dict(window="circle", radius=1.5)),
    "radial": ("radial", dict(block_size=8, dense_layers=0, dense_steps=0)),
    "sla": ("sparse_linear", dict(topk=0.5, block_q=8, block_k=8)),
    "linear": ("linear", {}),
    "agent": ("agent", dict(agent_ratio=0.9)),
}


@functools.cache
def _stock(name: str):
    """The model (shared by the cases of one worker: remove() restores it), its inputs and its stock output."""
    tiny = TINY_MODELS[name]
    model, inputs = tiny.build(), tiny.inputs(batch=1)
    return model, inputs, _run(model, inputs)


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("case", sorted(_CASES))
@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_every_method_runs_on_every_model(name, case):
    model, inputs, stock = _stock(name)
    method, options = _CASES[case]
    if method == "radial" and not TINY_MODELS[name].is_video:
        with pytest.raises(ValueError, match="needs a video model.*method='local'"):
            apply(model, method, **options)
        return
    handle = apply(model, method, backend="reference", **options)
    try:
        out = _run(model, inputs)
    finally:
        remove(handle)
    assert out.shape == stock.shape and torch.isfinite(out).all()
    assert not torch.equal(out, stock), "the method must change the output"
    density = handle.density()
    if method == "linear":
        assert density is None
    else:
        assert 0 < density < 1, density
    assert torch.equal(_run(model, inputs), stock)


def _expected_grid(name: str, config, inputs: dict) -> tuple[int, ...]:
    """The latent token grid after patchify, from the model config and the input layout of each model class."""
    if name == "unet":  # sample (B, C, H, W), no patchify
        return tuple(inputs["sample"].shape[-2:])
    if name == "flux":  # packed latents: one image id (0, row, col) per token
        return tuple(len(inputs["img_ids"][:, axis].unique()) for axis in (1, 2))
    if name in ("sd3", "pixart"):  # (B, C, H, W) / patch_size
        return tuple(s // config.patch_size for s in inputs["hidden_states"].shape[-2:])
    if name == "wan":  # (B, C, F, H, W) / (pt, ph, pw)
        return tuple(s // p for s, p in zip(inputs["hidden_states"].shape[2:], config.patch_size))
    if name == "hunyuan_video":  # (B, C, F, H, W) / (patch_size_t, patch_size, patch_size)
        frames, height, width = inputs["hidden_states"].shape[2:]
        return frames // config.patch_size_t, height // config.patch_size, width // config.patch_size
    if name == "cogvideox":  # (B, F, C, H, W); frames unpatched without patch_size_t
        _, frames, _, height, width = inputs["hidden_states"].shape
        return frames, height // config.patch_size, width // config.patch_size
    assert name == "ltx_video"  # latent sizes passed as arguments
    return (
        inputs["num_frames"] // config.patch_size_t,
        inputs["height"] // config.patch_size,
        inputs["width"] // config.patch_size,
    )


#: Text tokens inside the self-attention sequence: (position, count from the tiny inputs' encoder_hidden_states).
_TEXT = {"flux": ("before", 8), "sd3": ("after", 8), "hunyuan_video": ("after", 12), "cogvideox": ("before", 8)}


class _Recorder(torch.nn.Module):
    """Stands in for a layer's method: records the grid it is given and keeps dense attention."""

    def __init__(self, calls: list, module_name: str):
        super().__init__()
        self.calls, self.module_name = calls, module_name

    def forward(self, q, k, v, grid, state):
        self.calls.append((self.module_name, grid, q.shape[2]))
        return None, None


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_grid_and_text_position_per_model(name):
    tiny = TINY_MODELS[name]
    model, inputs = tiny.build(), tiny.inputs(batch=1, scale=2)
    handle = apply(model, "local", kernel_size=3, backend="reference")
    calls = []
    names = {module: key for key, module in model.named_modules()}
    for (module, _), processor in zip(handle._originals, handle.processors):
        processor.method = _Recorder(calls, names[module])
    _run(model, inputs)
    layers = len(handle.processors)
    remove(handle)

    grid = _expected_grid(name, model.config, inputs)
    assert handle.state.grid == grid
    assert len(calls) == layers
    position, count = _TEXT.get(name, (None, 0))
    for module_name, token_grid, length in calls:
        # UNet: the mid block sees the grid after one stride-2 downsampling (rounding up); SD3.5's attn2 has no text
        want = tuple(-(-s // 2) for s in grid) if "mid_block" in module_name else grid
        text = 0 if module_name.endswith("attn2") else count
        assert token_grid.shape == want, module_name
        assert (token_grid.extra_before, token_grid.extra_after) == ((text, 0) if position == "before" else (0, text))
        assert token_grid.num_tokens == length
