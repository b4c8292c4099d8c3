"""Agent-DeiT / Agent-PVT / Agent-Swin: sizes, FLOPs, official-checkpoint conversion and the timm API at odd inputs."""

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import visionattn  # noqa: F401  (registers the models)
from tests._numerics import assert_close

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
def _agent_attn(prefix, c, h, n, size, cls=False):
    d = {
        f"{prefix}dwc.weight": (c, 1, 3, 3),
        f"{prefix}dwc.bias": (c,),
        f"{prefix}an_bias": (h, n, 7, 7),
        f"{prefix}na_bias": (h, n, 7, 7),
        f"{prefix}ah_bias": (1, h, n, size, 1),
        f"{prefix}aw_bias": (1, h, n, 1, size),
        f"{prefix}ha_bias": (1, h, size, 1, n),
        f"{prefix}wa_bias": (1, h, 1, size, n),
        f"{prefix}proj.weight": (c, c),
        f"{prefix}proj.bias": (c,),
    }
    if cls:
        d.update({f"{prefix}ac_bias": (1, h, n, 1), f"{prefix}ca_bias": (1, h, 1, n)})
    return d


def _block_common(prefix, c, ratio):
    return {
        f"{prefix}norm1.weight": (c,),
        f"{prefix}norm1.bias": (c,),
        f"{prefix}norm2.weight": (c,),
        f"{prefix}norm2.bias": (c,),
        f"{prefix}mlp.fc1.weight": (ratio * c, c),
        f"{prefix}mlp.fc1.bias": (ratio * c,),
        f"{prefix}mlp.fc2.weight": (c, ratio * c),
        f"{prefix}mlp.fc2.bias": (c,),
    }


def _official_deit_tiny():
    """Key layout of ``agent_deit.py`` VisionTransformer(embed_dim=192, depth=12, heads=3, agent_num=49)."""
    c, h = 192, 3
    d = {"cls_token": (1, 1, c), "pos_embed": (1, 197, c), "patch_embed.proj.weight": (c, 3, 16, 16)}
    d.update({"patch_embed.proj.bias": (c,), "norm.weight": (c,), "norm.bias": (c,)})
    d.update({"head.weight": (1000, c), "head.bias": (1000,)})
    for i in range(12):
        d.update(_block_common(f"blocks.{i}.", c, 4))
        d.update({f"blocks.{i}.attn.qkv.weight": (3 * c, c), f"blocks.{i}.attn.qkv.bias": (3 * c,)})
        d.update(_agent_attn(f"blocks.{i}.attn.", c, h, 49, 14, cls=True))
    return d


def _official_pvt_tiny():
    """Key layout of ``agent_pvt.py`` agent_pvt_tiny (no final norm; q and kv projections)."""
    dims, heads, ratios, agents = (64, 128, 320, 512), (1, 2, 5, 8), (8, 8, 4, 4), (9, 16, 49, 49)
    d, cin = {"head.weight": (1000, 512), "head.bias": (1000,)}, 3
    for i in range(4):
        c, p, size = dims[i], 4 if i == 0 else 2, 56 >> i
        s = i + 1
        d.update({f"patch_embed{s}.proj.weight": (c, cin, p, p), f"patch_embed{s}.proj.bias": (c,)})
        d.update({f"patch_embed{s}.norm.weight": (c,), f"patch_embed{s}.norm.bias": (c,)})
        d[f"pos_embed{s}"] = (1, size * size, c)
        for j in range(2):
            pre = f"block{s}.{j}."
            d.update(_block_common(pre, c, ratios[i]))
            d.update({f"{pre}attn.q.weight": (c, c), f"{pre}attn.q.bias": (c,)})
            d.update({f"{pre}attn.kv.weight": (2 * c, c), f"{pre}attn.kv.bias": (2 * c,)})
            d.update(_agent_attn(f"{pre}attn.", c, heads[i], agents[i], size))
        cin = c
    return d


def _official_swin_tiny():
    """Key layout of ``agent_swin.py`` AgentSwinTransformer with ``cfgs/agent_swin_t.yaml`` (AAAB, ws 56)."""
    heads, agents = (3, 6, 12, 24), (9, 16, 49, 49)
    d = {"patch_embed.proj.weight": (96, 3, 4, 4), "patch_embed.proj.bias": (96,)}
    d.update({"patch_embed.norm.weight": (96,), "patch_embed.norm.bias": (96,)})
    d.update({"norm.weight": (768,), "norm.bias": (768,), "head.weight": (1000, 768), "head.bias": (1000,)})
    for i, depth in enumerate((2, 2, 6, 2)):
        c, size = 96 << i, 56 >> i
        for j in range(depth):
            pre = f"layers.{i}.blocks.{j}."
            d.update(_block_common(pre, c, 4))
            d.update({f"{pre}attn.qkv.weight": (3 * c, c), f"{pre}attn.qkv.bias": (3 * c,)})
            if i < 3:
                d.update(_agent_attn(f"{pre}attn.", c, heads[i], agents[i], size))
            else:  # B-type: Swin window attention (7x7 window = the whole 7x7 map, so no shift mask)
                d.update({f"{pre}attn.proj.weight": (c, c), f"{pre}attn.proj.bias": (c,)})
                d[f"{pre}attn.relative_position_bias_table"] = (169, heads[i])
                d[f"{pre}attn.relative_position_index"] = (49, 49)
        if i < 3:
            d.update({f"layers.{i}.downsample.reduction.weight": (2 * c, 4 * c)})
            d.update({f"layers.{i}.downsample.norm.weight": (4 * c,), f"layers.{i}.downsample.norm.bias": (4 * c,)})
    return d


OFFICIAL = {
    "agent_deit_tiny": _official_deit_tiny,
    "agent_pvt_tiny": _official_pvt_tiny,
    "agent_swin_tiny": _official_swin_tiny,
}


@pytest.mark.parametrize("name", TINY)
def test_agent_checkpoint_filter_loads_official_layout_strict(name, tmp_path, rng):
    shapes = OFFICIAL[name]()
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
    module = type(model).__module__
    native = __import__(module, fromlist=["checkpoint_filter_fn"]).checkpoint_filter_fn(ours, model)
    model.load_state_dict(native, strict=True)


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
