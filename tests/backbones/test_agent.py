"""Agent-DeiT / Agent-PVT / Agent-Swin: sizes, FLOPs, official-checkpoint conversion and the timm API at odd inputs."""

import importlib

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import visionattn  # noqa: F401  (registers the models)
from tests._numerics import assert_close
from visionattn.nn import AgentAttention

from ._agent_official import layout as official_layout
from ._precision_checks import check_amp_train_step, check_compile_matches_eager

# published params (M) and fvcore GMACs at 224 (LeapLabTHU/Agent-Attention agent_transformer/README.md);
# the Swin parameter counts are published rounded to whole millions
PUBLISHED = {
    "agent_deit_tiny": (6.0, 1.2),
    "agent_deit_small": (22.7, 4.4),
    "agent_deit_base": (87.2, 17.6),
    "agent_pvt_tiny": (11.6, 2.0),
    "agent_pvt_small": (20.6, 4.0),
    "agent_pvt_medium": (35.9, 7.0),
    "agent_pvt_large": (48.7, 10.4),
    "agent_swin_tiny": (29, 4.5),
    "agent_swin_small": (50, 8.7),
    "agent_swin_base": (88, 15.4),
}
NAMES = list(PUBLISHED)
TINY = ["agent_deit_tiny", "agent_pvt_tiny", "agent_swin_tiny"]
#: shallower tiny models for the CPU tests of behaviour (every block type kept: Swin keeps a shifted window block)
SHALLOW = {
    "agent_deit_tiny": dict(depth=2, agent_depth=1),
    "agent_pvt_tiny": dict(depths=(1, 1, 1, 1)),
    "agent_swin_tiny": dict(depths=(1, 1, 2, 2), agent_blocks=(1, 1, 1, 0)),
}


@pytest.mark.parametrize("name", NAMES)
def test_agent_params_and_flops_match_published(name):
    params_m, gmacs = PUBLISHED[name]
    model = timm.create_model(name, device="meta").eval()
    count = sum(p.numel() for p in model.parameters()) / 1e6
    rounding = 0.5 if isinstance(params_m, int) else 0.0
    assert abs(count - params_m) <= max(0.005 * params_m, rounding), f"{name}: {count:.3f}M vs {params_m}M"
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, 224, 224, device="meta"))
    measured = counter.get_total_flops() / 2e9  # multiply-accumulates, as fvcore reports
    assert abs(measured - gmacs) <= 0.03 * gmacs, f"{name}: {measured:.3f} GMACs vs {gmacs}"


# ----------------------------------------------------------------------------- official checkpoint layouts
def _filter_fn(model):
    return importlib.import_module(type(model).__module__).checkpoint_filter_fn


@pytest.mark.parametrize("name", NAMES)
def test_agent_converter_key_layout_all_variants(name):
    """Every released variant: the official layout (deit_base's 4 agent blocks, swin_small/base's shifted B-blocks
    with their ``attn_mask`` buffers and AAMB2 mix, PVT's q/kv) converts onto the model exactly (strict)."""
    model = timm.create_model(name, device="meta")
    official = {k: torch.empty(s, device="meta") for k, s in official_layout(name).items()}
    converted = _filter_fn(model)({"model": official}, model)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in model.state_dict().items()
    }
    model.load_state_dict(converted, strict=True, assign=True)


@pytest.mark.parametrize("name", TINY)
def test_agent_checkpoint_filter_loads_official_layout_strict(name, tmp_path, rng):
    shapes = official_layout(name)
    state = {
        k: torch.randint(0, 49, s) if k.endswith("index") else torch.randn(s, generator=rng) for k, s in shapes.items()
    }
    path = tmp_path / "official.pth"
    torch.save({"model": state, "epoch": 299}, path)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    ours = model.state_dict()
    if name == "agent_pvt_tiny":
        q, kv = state["block2.1.attn.q.weight"], state["block2.1.attn.kv.weight"]
        assert torch.equal(ours["stages.1.blocks.1.attn.qkv.weight"], torch.cat([q, kv]))
        assert torch.equal(ours["stages.3.pos_embed"], state["pos_embed4"])
    elif name == "agent_swin_tiny":
        assert torch.equal(ours["layers.1.downsample.reduction.weight"], state["layers.0.downsample.reduction.weight"])
        assert torch.equal(ours["head.fc.weight"], state["head.weight"])
    else:
        assert torch.equal(ours["blocks.5.attn.ca_bias"], state["blocks.5.attn.ca_bias"][0])
        assert torch.equal(ours["blocks.5.attn.ha_bias"], state["blocks.5.attn.ha_bias"][0, :, :, 0])
    # a converted (native) state dict passes through unchanged
    model.load_state_dict(_filter_fn(model)(ours, model), strict=True)


@pytest.mark.parametrize("name", TINY)
def test_agent_any_resolution_channels_last_and_amp(name, rng):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **SHALLOW[name]).eval()
    for size in [(64, 64), (80, 112)]:
        x = torch.randn(2, 3, *size, generator=rng)
        out = model(x)
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        last = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        assert_close("channels_last", out, last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
        assert torch.isfinite(low).all()
        assert_close("bf16", out, low.float(), tol=0.1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", TINY)
def test_agent_amp_train_step_matches_fp32_cpu(name, dtype):
    """The GPU AMP check (``check_amp_train_step``) on CPU autocast, shallow models at 64 px."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **SHALLOW[name]).train()
    check_amp_train_step(model, torch.randn(2, 3, 64, 64), dtype)


#: run-time agents per axis that differ from the stored ``sqrt(agent_num)``: per stage as in the reference's
#: dense-prediction configs (``downstream_agent_shape`` 9-12-14-7), one shape for Agent-DeiT
DENSE_AGENT_SHAPES = {
    "agent_deit_tiny": dict(agent_shape=(9, 9)),
    "agent_pvt_tiny": dict(agent_shapes=((9, 9), (12, 12), (14, 14), (7, 7))),
    "agent_swin_tiny": dict(agent_shapes=((9, 9), (12, 12), (14, 14), (7, 7))),
}


@pytest.mark.parametrize("name", TINY)
def test_agent_models_run_with_other_agent_counts(name, rng):
    """The released biases (stored for 3x3/4x4/7x7 agents at 224) resampled to the dense configs' agent counts at a
    non-square input: every agent block attends with the requested agents, logits finite."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **SHALLOW[name], **DENSE_AGENT_SHAPES[name]).eval()
    x = torch.randn(1, 3, 96, 128, generator=rng)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    attns = [m for m in model.modules() if isinstance(m, AgentAttention)]
    expected = DENSE_AGENT_SHAPES[name].get("agent_shapes") or [DENSE_AGENT_SHAPES[name]["agent_shape"]]
    assert {a.agent_shape for a in attns} <= set(expected) and attns
    for attn in attns:
        bias_agent, bias_query = attn.agent_biases((6, 8))
        agents = attn.agent_shape[0] * attn.agent_shape[1]
        prefix = attn.num_prefix_tokens
        assert bias_agent.shape == (1, attn.num_heads, agents, prefix + 48)
        assert bias_query.shape == (1, attn.num_heads, prefix + 48, agents)


def test_agent_deit_pads_sizes_the_patch_does_not_divide(rng):
    """100x76 is zero-padded to 112x80 (a 7x5 grid, timm's ``dynamic_img_pad``): equal to padding by hand."""
    torch.manual_seed(0)
    model = timm.create_model("agent_deit_tiny", num_classes=5, **SHALLOW["agent_deit_tiny"]).eval()
    x = torch.randn(2, 3, 100, 76, generator=rng)
    padded = F.pad(x, (0, 4, 0, 12))
    with torch.no_grad():
        assert_close("forward_features", model.forward_features(padded), model.forward_features(x))
        assert model.forward_features(x).shape == (2, 1 + 7 * 5, 192)
        assert_close("logits", model(padded), model(x))
        final, inter = model.forward_intermediates(x, indices=2)
        assert [t.shape for t in inter] == [(2, 192, 7, 5)] * 2
        assert_close("intermediates", model.forward_intermediates(padded, indices=2)[1][0], inter[0])
        assert_close("final", model.forward_features(x), final)
        features = timm.create_model(
            "agent_deit_tiny", features_only=True, out_indices=(0, 1), **SHALLOW["agent_deit_tiny"]
        )
        assert [f.shape for f in features.eval()(x)] == [(2, 192, 7, 5)] * 2
    strict = timm.create_model("agent_deit_tiny", dynamic_img_pad=False, **SHALLOW["agent_deit_tiny"]).eval()
    with pytest.raises(AssertionError, match="patch size"):
        strict(x)


@pytest.mark.parametrize("name", TINY)
def test_agent_grad_checkpointing_and_intermediates(name, rng):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, drop_path_rate=0.0, **SHALLOW[name])
    x = torch.randn(2, 3, 64, 64, generator=rng)
    ref = model(x)
    ref.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    assert_close("out", ref, out)
    for n, p in model.named_parameters():
        assert_close(f"d{n}", grads[n], p.grad, tol=1e-4)
    model.eval()
    final, inter = model.forward_intermediates(x, indices=2)
    assert_close("final", model.forward_features(x), final)
    assert len(inter) == 2 and all(t.ndim == 4 for t in inter)
    features = timm.create_model(name, features_only=True, out_indices=2, **SHALLOW[name]).eval()
    assert [f.shape[1] for f in features(x)] == features.feature_info.channels()


@pytest.mark.gpu
@pytest.mark.parametrize("name", NAMES)
def test_agent_gpu_bf16_train_step_any_size_and_compile(name):
    torch.manual_seed(0)
    model = timm.create_model(name).cuda().train()
    for size in ((224, 224), (256, 320), (512, 512)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(torch.randn(2, 3, *size, device="cuda")).float().logsumexp(-1).mean()
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        model.zero_grad()
    model.eval()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.no_grad():
        # fp32, but inductor fuses and reorders reductions (and may pick another SDPA kernel): ~2e-4 apart
        assert_close("compiled", model(x), torch.compile(model)(x), tol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", TINY)
def test_agent_gpu_amp_train_step_matches_fp32(name, dtype):
    """fp16 and bf16 autocast forward + backward at 224, batch 2: finite, close to fp32 (AMP_*_TOL)."""
    torch.manual_seed(0)
    model = timm.create_model(name, drop_path_rate=0.0).cuda().train()
    check_amp_train_step(model, torch.randn(2, 3, 224, 224, device="cuda"), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("name", TINY)
def test_agent_gpu_compile_matches_eager_gradients(name):
    """fp32 forward + backward, compiled vs eager: logits within 1e-3, every parameter gradient within 1e-2."""
    torch.manual_seed(0)
    model = timm.create_model(name, drop_path_rate=0.0).cuda().train()
    check_compile_matches_eager(model, torch.randn(2, 3, 224, 224, device="cuda"), out_tol=1e-3, grad_tol=1e-2)
