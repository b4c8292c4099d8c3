"""Agent models' pretrained cfgs: timm's default-cfg contract for Agent-DeiT (token output) and the cfg tags of
the higher-resolution releases (Agent-DeiT-S 448, Agent-PVT-M 256, Agent-Swin-S 288, Agent-Swin-B 384).

timm's ``test_model_default_cfgs`` checks ``forward_features`` against ``pool_size`` as a spatial map, which a
ViT's ``(B, 1 + N, C)`` tokens are not; timm checks its own ViTs/DeiTs with ``test_model_default_cfgs_non_std``,
selected by timm's name list (``deit*``, not ``agent_deit*``). :func:`test_agent_deit_default_cfg_contract`
checks the properties of both tests here, with the spatial check stated for tokens (``1 + grid`` tokens).
"""

import fnmatch
import inspect

import pytest
import timm
import torch
from timm.models._manipulate import group_parameters

import visionattn  # noqa: F401  (registers the models)
from visionattn.backbones.agent_swin import AgentSwinBlock

from ._agent_official import layout as official_layout
from .test_agent import _filter_fn

DEIT_NAMES = timm.list_models("agent_deit_*", include_tags=True)

#: tag -> (published params in M, Agent-Attention README; shallow kwargs for a real forward at the tag's size)
HIGH_RES = {
    "agent_deit_small.in1k_448": (23.1, dict(depth=2, agent_depth=2)),
    "agent_pvt_medium.in1k_256": (36.1, dict(depths=(1, 1, 1, 1))),
    "agent_swin_small.in1k_288": (50, dict(depths=(1, 1, 2, 2), agent_blocks=(1, 1, 0, 0))),
    "agent_swin_base.in1k_384": (88, dict(depths=(1, 1, 3, 1), agent_blocks=(1, 1, 1, 0))),
}


def _create(name: str, **kwargs):
    return timm.create_model(name, pretrained=False, device="meta", dtype=torch.float32, **kwargs).eval()


def _meta_input(cfg: dict) -> torch.Tensor:
    return torch.empty(1, *cfg["input_size"], device="meta")


@pytest.mark.parametrize("name", DEIT_NAMES)
def test_agent_deit_default_cfg_contract(name):
    """What timm's ``test_model_default_cfgs`` (and ``_non_std``) check, on the meta device, at the cfg's size."""
    model = _create(name)
    cfg, state = model.default_cfg, model.state_dict()
    with pytest.raises(TypeError):
        _create(name, not_a_model_arg=1)
    assert inspect.signature(model.reset_classifier).parameters["global_pool"].default is None
    param_names = [n for n, _ in model.named_parameters()]
    assert len(set(group_parameters(model, model.group_matcher(coarse=False), reverse=True).values())) > 1
    for pattern in model.no_weight_decay():  # optional tokens (dist/reg) may be listed while absent
        assert any(fnmatch.fnmatch(n, pattern) for n in param_names) or getattr(model, pattern, None) is None
    assert model.num_classes == cfg["num_classes"] and model.num_features > 0 and model.head_hidden_size > 0
    assert model.in_chans == cfg["input_size"][0]
    # the spatial checks, for tokens: forward_features is (B, 1 + grid, C) with grid = input / patch
    x = _meta_input(cfg)
    tokens = 1 + (cfg["input_size"][1] // 16) * (cfg["input_size"][2] // 16)
    features = model.forward_features(x)
    pre_logits = model.forward_head(features, pre_logits=True)
    assert features.shape == (1, tokens, model.num_features)
    assert pre_logits.shape == (1, model.head_hidden_size)
    assert model.to(torch.bfloat16)(x.to(torch.bfloat16)).dtype == torch.bfloat16  # no stale fp32 caches
    model.to(torch.float32)
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == pre_logits.shape
    model.reset_classifier(0, "")
    assert model(x).shape == (1, tokens, model.num_features)
    assert _create(name, num_classes=0)(x).shape == pre_logits.shape
    assert _create(name, num_classes=0, global_pool="")(x).shape == (1, tokens, model.num_features)
    assert cfg["classifier"] + ".weight" in state and cfg["first_conv"] + ".weight" in state
    # reset_classifier keeps the parent's device, dtype and train/eval mode
    model.to(device="meta", dtype=torch.float64)
    model.reset_classifier(0)
    model.reset_classifier(2)
    assert all(p.dtype == torch.float64 and p.is_meta for p in model.get_classifier().parameters())
    assert all(not m.training for m in model.modules())
    # create_model(device=...) places everything; frozen weights stay frozen through reset and set_input_size
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    frozen = _create(name).requires_grad_(False)
    frozen.reset_classifier(0)
    frozen.reset_classifier(0, "")
    frozen.set_input_size(img_size=tuple(2 * s for s in cfg["input_size"][-2:]))
    assert not [n for n, p in frozen.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("tag", list(HIGH_RES))
def test_agent_high_resolution_cfg_builds_the_released_model(tag, rng):
    """A tag creates the model at its resolution (timm passes ``img_size`` from the cfg): position embeddings,
    agent biases and Swin windows sized as the official fine-tuned checkpoint, whose layout loads strictly."""
    name = tag.split(".")[0]
    published, shallow = HIGH_RES[tag]
    model = _create(tag)
    cfg = model.pretrained_cfg
    size = cfg["input_size"][-1]
    assert cfg["tag"] == tag.split(".")[1] and cfg["input_size"] == (3, size, size)
    assert model.default_cfg["notes"][0].startswith("official weights: https://cloud.tsinghua.edu.cn/f/")
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - published) <= max(0.005 * published, 0.5 if isinstance(published, int) else 0.05)
    state = model.state_dict()
    if name.startswith("agent_deit"):
        grid = size // 16
        assert state["pos_embed"].shape == (1, 1 + grid * grid, 384)
        assert state["blocks.0.attn.ah_bias"].shape[-1] == grid  # (heads, agents, grid)
    elif name.startswith("agent_pvt"):
        assert [state[f"stages.{i}.pos_embed"].shape[1] for i in range(4)] == [(size // 4 >> i) ** 2 for i in range(4)]
        assert state["stages.0.blocks.0.attn.ah_bias"].shape[-1] == size // 4
    else:
        window = max(7, size // 32)  # the reference's B-block window: max(7, WINDOW_SIZE // 8), 9 at 288, 12 at 384
        assert state["layers.3.blocks.1.attn.relative_position_bias_table"].shape[0] == (2 * window - 1) ** 2
        assert state["layers.0.blocks.0.attn.ah_bias"].shape[-1] == size // 4
    official = {k: torch.empty(s, device="meta") for k, s in official_layout(name, img_size=size).items()}
    model.load_state_dict(_filter_fn(model)({"model": official}, model), strict=True, assign=True)
    out = model.forward_features(_meta_input(cfg))
    if cfg["pool_size"]:
        assert (out.shape[1:3] if model.output_fmt == "NHWC" else out.shape[-2:]) == cfg["pool_size"]
    # random weights at the tag's resolution, real tensors: a shallow copy of the released layout
    torch.manual_seed(0)
    small = timm.create_model(tag, num_classes=10, **shallow).eval()
    if name.startswith("agent_swin"):
        assert any(isinstance(b, AgentSwinBlock) for b in small.modules())
    with torch.no_grad():
        logits = small(torch.randn(1, 3, size, size, generator=rng))
    assert logits.shape == (1, 10) and torch.isfinite(logits).all()
