"""Plain ViG (vig_tiny/small/base): parameter counts, official-checkpoint conversion, the official forward, timm API."""

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import visionattn  # noqa: F401  (registers the models)
from tests._numerics import assert_close
from visionattn.backbones.vig import checkpoint_filter_fn

from . import _vig_reference as ref
from ._precision_checks import check_amp_train_step, check_compile_matches_eager

#: name -> (embed_dim, heads, conv_act/out_act, README params in M, size in bytes of the fp32 .pth on hustvl/ViG).
VARIANTS = {
    "vig_tiny": (192, 3, True, 6, 23405405),
    "vig_small": (384, 6, False, 23, 90527645),
    "vig_base": (768, 12, False, 89, 356155805),
}
# A two-block ViG-T-like model keeps the float64 oracle (a token loop) fast.
TINY = dict(embed_dim=32, depth=2, num_heads=2, backend="reference")


def _model(name="vig_tiny", **kwargs):
    return timm.create_model(name, **{**TINY, **kwargs})


@pytest.mark.parametrize("name", list(VARIANTS))
def test_vig_param_count_matches_official(name):
    dim, heads, _, readme_m, hub_bytes = VARIANTS[name]
    model = timm.create_model(name, device="meta")
    count = sum(p.numel() for p in model.parameters())
    official = sum(torch.Size(s).numel() for s in ref.vig_shapes(dim, heads).values())
    assert count == official
    assert round(count / 1e6) == readme_m
    # The README rounds to 1M; the fp32 checkpoint size is 4 bytes per parameter plus < 0.3 % pickle overhead.
    assert 0 <= hub_bytes / 4 - count < 0.005 * count


def conv_linear_gmacs(monkeypatch, name: str, size: int = 224, **kwargs) -> float:
    """GMACs of convolutions and linears at ``size`` (meta device): the GLA recurrence is stubbed out, as fvcore
    cannot see the reference code's GLA Triton kernel either (docs/models.md, column "conv + linear")."""
    monkeypatch.setattr(
        "visionattn.nn.gated_attention2d.gated_linear_attention",
        lambda q, k, v, a, b=None, *, scale=None, gate_normalizer=None, backend=None: v.new_empty(v.shape),
    )
    model = timm.create_model(name, device="meta", **kwargs).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, size, size, device="meta"))
    return counter.get_total_flops() / 2e9


def _swiglu_down_proj_gmacs(name: str, size: int = 224) -> float:
    """MACs of plain ViG's SwiGLU down-projections, which the reference runs through fla's fused ``swiglu_linear``
    (invisible to fvcore)."""
    tokens = (size // 16) ** 2
    return sum(tokens * block.mlp.fc2.weight.numel() for block in timm.create_model(name, device="meta").blocks) / 1e9


def test_vig_small_flops_match_abstract(monkeypatch):
    """ViG-S uses "20 % of the FLOPs" of DeiT-B (abstract), counted as the reference code's fvcore counts."""
    vig = conv_linear_gmacs(monkeypatch, "vig_small") - _swiglu_down_proj_gmacs("vig_small")
    deit = conv_linear_gmacs(monkeypatch, "deit_base_patch16_224")
    assert abs(vig / deit - 0.20) < 0.03 * 0.20


def test_vig_tiny_1024_flops_match_abstract(monkeypatch):
    """At 1024x1024 ViG-T "uses 5.2x fewer FLOPs" than DeiT-T (abstract; fvcore convention as above)."""
    vig = conv_linear_gmacs(monkeypatch, "vig_tiny", 1024) - _swiglu_down_proj_gmacs("vig_tiny", 1024)
    deit = conv_linear_gmacs(monkeypatch, "deit_tiny_patch16_224", 1024, img_size=1024)
    assert abs(deit / vig - 5.2) < 0.05 * 5.2


#: docs/models.md's table (GMACs at 224, convolutions and linears); the paper's FLOPs table was not available.
DOCS_GMACS = {"vig_tiny": 1.11, "vig_small": 4.37, "vig_base": 17.32}


@pytest.mark.parametrize("name", list(DOCS_GMACS))
def test_vig_macs_match_docs_table(monkeypatch, name):
    gmacs = conv_linear_gmacs(monkeypatch, name)
    assert abs(gmacs - DOCS_GMACS[name]) < 0.01, f"{name}: {gmacs:.3f} GMACs, docs/models.md says {DOCS_GMACS[name]}"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_vig_checkpoint_filter_loads_official_layout_strict(name):
    dim, heads, *_ = VARIANTS[name]
    model = timm.create_model(name, device="meta")
    official = {k: torch.empty(s, device="meta") for k, s in ref.vig_shapes(dim, heads).items()}
    model.load_state_dict(checkpoint_filter_fn(official, model), strict=True, assign=True)


def test_vig_checkpoint_filter_matches_official_forward(rng):
    sd = ref.random_state_dict(ref.vig_shapes(32, 2, depth=2), rng)
    model = _model(conv_act=True, out_act=True).double().eval()
    model.load_state_dict(checkpoint_filter_fn({"model": {f"module.{k}": v for k, v in sd.items()}}, model))
    for shape in ((64, 64), (48, 80)):
        x = torch.randn(2, 3, *shape, generator=rng, dtype=torch.float64)
        assert_close(f"logits {shape}", ref.vig_forward(sd, x, 2, True, True), model(x))
    assert checkpoint_filter_fn(model.state_dict(), model) is not None  # native checkpoints pass through
    assert checkpoint_filter_fn(model.state_dict(), model).keys() == model.state_dict().keys()


def test_vig_pretrained_file_loads_through_timm(tmp_path, rng):
    sd = ref.random_state_dict(ref.vig_shapes(32, 2, depth=2), rng, dtype=torch.float32)
    path = tmp_path / "vig_t_77p2acc.pth"
    torch.save(sd, path)
    model = _model(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), img_size=256)
    assert torch.equal(model.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv_proj.weight"])
    expected_pos = F.interpolate(sd["pos_embed"].reshape(1, 14, 14, 32).permute(0, 3, 1, 2), (16, 16), mode="bicubic")
    assert_close("pos_embed", expected_pos.flatten(2).transpose(1, 2), model.pos_embed)


def test_vig_forward_shapes_any_resolution(rng):
    model = _model().eval()
    for shape, grid in (((64, 64), (4, 4)), ((80, 48), (5, 3)), ((72, 100), (5, 6))):
        x = torch.randn(1, 3, *shape, generator=rng)
        assert model.forward_features(x).shape == (1, *grid, 32)
        assert model(x).shape == (1, 1000)


def test_vig_timm_api(rng):
    model = _model(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64, generator=rng)
    feats = model.forward_features(x)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.head_hidden_size)
    final, inter = model.forward_intermediates(x, indices=2)
    assert_close("final", feats, final)
    assert [t.shape for t in inter] == [(2, 32, 4, 4)] * 2
    assert model.no_weight_decay() == {"pos_embed"}
    assert model.get_classifier().out_features == 10
    model.set_grad_checkpointing(True)
    assert_close("grad ckpt", feats, model.train().forward_features(x))
    model.reset_classifier(0, "")
    assert model.eval()(x).shape == (2, 4, 4, 32)
    assert model.prune_intermediate_layers(1) == [1]
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NLC")


def test_vig_features_only(rng):
    model = timm.create_model("vig_tiny", features_only=True, out_indices=(0, 1), **TINY)
    feats = model(torch.randn(1, 3, 64, 64, generator=rng))
    assert [f.shape for f in feats] == [(1, 32, 4, 4)] * 2
    assert model.feature_info.reduction() == [16, 16]


def test_vig_channels_last_and_autocast(rng):
    model = _model().eval()
    x = torch.randn(2, 3, 64, 64, generator=rng)
    expected = model(x)
    assert_close("channels_last", expected, model(x.to(memory_format=torch.channels_last)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert torch.isfinite(out).all()
    assert_close("bf16 autocast", expected, out.float(), tol=0.05)


def test_vig_backward_reaches_every_parameter(rng):
    model = _model(num_classes=5, drop_path_rate=0.1)
    model(torch.randn(2, 3, 64, 64, generator=rng)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(VARIANTS))
def test_vig_gpu_bf16_matches_reference_backend(name):
    torch.manual_seed(0)
    model = timm.create_model(name).cuda().eval()
    reference = timm.create_model(name, backend="reference").cuda().eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.no_grad():
        expected = reference(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
    assert_close("logits", expected, out.float(), tol=0.05)


@pytest.mark.gpu
def test_vig_gpu_training_step_matches_reference_backend():
    """fp32 forward + backward through the Triton kernels vs the reference recurrence, vig_tiny at 224."""
    torch.manual_seed(0)
    model = timm.create_model("vig_tiny", drop_path_rate=0.0).cuda()
    reference = timm.create_model("vig_tiny", backend="reference").cuda()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 224, 224, device="cuda")
    for m in (model, reference):
        m(x).logsumexp(-1).sum().backward()
    for name in ("blocks.0.attn.qkv.weight", "blocks.5.attn.forget_gate.1.bias", "stem.conv1.weight", "pos_embed"):
        expected, grad = reference.get_parameter(name).grad, model.get_parameter(name).grad
        assert_close(f"d{name}", expected, grad, tol=1e-2)


@pytest.mark.gpu
def test_vig_gpu_torch_compile_fullgraph():
    """Compiled vs eager: fp32 forward + backward (logits within 1e-3, every parameter gradient within 1e-2) and
    the bf16 autocast forward."""
    torch.manual_seed(0)
    model = timm.create_model("vig_tiny", drop_path_rate=0.0).cuda().train()
    x = torch.randn(2, 3, 256, 192, device="cuda")
    check_compile_matches_eager(model, x, out_tol=1e-3, grad_tol=1e-2, fullgraph=True)
    model.eval()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert_close("compiled", model(x).float(), compiled(x).float(), tol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_vig_gpu_amp_train_step_matches_fp32(dtype):
    """fp16 and bf16 autocast forward + backward of vig_tiny at 224, batch 2: finite, close to fp32."""
    torch.manual_seed(0)
    model = timm.create_model("vig_tiny", drop_path_rate=0.0).cuda().train()
    check_amp_train_step(model, torch.randn(2, 3, 224, 224, device="cuda"), dtype)
