"""ViG-H (vig_h_tiny/small/base): parameter counts, official-checkpoint conversion, the official forward, timm API."""

import pytest
import timm
import torch

import visionattn  # noqa: F401  (registers the models)
from tests._numerics import assert_close
from visionattn.backbones.vig_h import checkpoint_filter_fn

from . import _vig_reference as ref
from ._precision_checks import check_amp_train_step, check_compile_matches_eager
from .test_vig import conv_linear_gmacs

#: name -> (dims, depths, heads, README params in M, size in bytes of the fp32 .pth on hustvl/ViG).
VARIANTS = {
    "vig_h_tiny": ((96, 192, 384, 768), (2, 2, 5, 2), (3, 6, 12, 24), 29, 114478849),
    "vig_h_small": ((96, 192, 384, 768), (2, 2, 17, 2), (3, 6, 12, 24), 50, 200356929),
    "vig_h_base": ((128, 256, 512, 1024), (2, 2, 17, 2), (4, 8, 16, 32), 89, 355767681),
}
# A one-block-per-stage model keeps the float64 oracle (a token loop) fast.
TINY_ARCH = dict(dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2))
TINY = dict(TINY_ARCH, backend="reference")


def _model(**kwargs):
    return timm.create_model("vig_h_tiny", **{**TINY, **kwargs})


@pytest.mark.parametrize("name", list(VARIANTS))
def test_vig_h_param_count_matches_official(name):
    dims, depths, heads, readme_m, hub_bytes = VARIANTS[name]
    model = timm.create_model(name, device="meta")
    count = sum(p.numel() for p in model.parameters())
    official = sum(torch.Size(s).numel() for s in ref.vig_h_shapes(dims, depths, heads).values())
    assert count == official
    assert round(count / 1e6) == readme_m
    # The README rounds to 1M; the fp32 checkpoint size is 4 bytes per parameter plus < 0.3 % pickle overhead.
    assert 0 <= hub_bytes / 4 - count < 0.005 * count


#: docs/models.md's table (GMACs at 224, convolutions and linears); the paper's FLOPs table was not available.
DOCS_GMACS = {"vig_h_tiny": 4.41, "vig_h_small": 8.61, "vig_h_base": 15.36}


@pytest.mark.parametrize("name", list(DOCS_GMACS))
def test_vig_h_macs_match_docs_table(monkeypatch, name):
    gmacs = conv_linear_gmacs(monkeypatch, name)
    assert abs(gmacs - DOCS_GMACS[name]) < 0.01, f"{name}: {gmacs:.3f} GMACs, docs/models.md says {DOCS_GMACS[name]}"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_vig_h_checkpoint_filter_loads_official_layout_strict(name):
    dims, depths, heads, *_ = VARIANTS[name]
    model = timm.create_model(name, device="meta")
    official = {k: torch.empty(s, device="meta") for k, s in ref.vig_h_shapes(dims, depths, heads).items()}
    model.load_state_dict(checkpoint_filter_fn(official, model), strict=True, assign=True)


def test_vig_h_checkpoint_filter_matches_official_forward(rng):
    arch = (TINY_ARCH["dims"], TINY_ARCH["depths"], TINY_ARCH["num_heads"])
    sd = ref.random_state_dict(ref.vig_h_shapes(*arch), rng)
    model = _model().double().eval()
    model.load_state_dict(checkpoint_filter_fn({"model": sd}, model))
    for shape in ((32, 32), (40, 24)):
        x = torch.randn(2, 3, *shape, generator=rng, dtype=torch.float64)
        assert_close(f"logits {shape}", ref.vig_h_forward(sd, x, arch[1], arch[2]), model(x))
    assert checkpoint_filter_fn(model.state_dict(), model).keys() == model.state_dict().keys()


def test_vig_h_pretrained_file_loads_through_timm(tmp_path, rng):
    sd = ref.random_state_dict(ref.vig_h_shapes(*TINY_ARCH.values()), rng, dtype=torch.float32)
    path = tmp_path / "vig_h_t_82p8acc.pth"
    torch.save(sd, path)
    model = _model(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(model.stages[2].downsample.conv.weight, sd["layers.1.downsample.1.weight"])
    assert torch.equal(
        model.stages[3].blocks[0].attn.forget_gate[0].weight, sd["layers.3.blocks.0.op.gk_proj.0.weight"]
    )


def test_vig_h_forward_shapes_any_resolution(rng):
    model = _model().eval()
    for shape, grid in (((32, 32), (1, 1)), ((40, 72), (2, 3)), ((50, 34), (2, 2))):
        x = torch.randn(1, 3, *shape, generator=rng)
        assert model.forward_features(x).shape == (1, *grid, 64)
        assert model(x).shape == (1, 1000)


def test_vig_h_timm_api(rng):
    model = _model(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32, generator=rng)
    feats = model.forward_features(x)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 64)
    final, inter = model.forward_intermediates(x)
    assert_close("final", feats, final)
    assert [t.shape for t in inter] == [(2, 16, 8, 8), (2, 32, 4, 4), (2, 48, 2, 2), (2, 64, 1, 1)]
    assert model.get_classifier().out_features == 10
    assert model.group_matcher()["stem"] == r"^stem"
    model.set_grad_checkpointing(True)
    assert_close("grad ckpt", feats, model.train().forward_features(x))
    model.reset_classifier(0, "")
    assert model.eval()(x).shape == (2, 1, 1, 64)
    assert model.prune_intermediate_layers([0, 1]) == [0, 1]
    assert len(model.stages) == 2
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NLC")
    with pytest.raises(ValueError, match="depths"):
        timm.create_model("vig_h_tiny", depths=(2, 2), device="meta")


def test_vig_h_features_only(rng):
    model = timm.create_model("vig_h_tiny", features_only=True, **TINY)
    feats = model(torch.randn(1, 3, 32, 48, generator=rng))
    assert [f.shape for f in feats] == [(1, 16, 8, 12), (1, 32, 4, 6), (1, 48, 2, 3), (1, 64, 1, 2)]
    assert model.feature_info.reduction() == [4, 8, 16, 32]


def test_vig_h_channels_last_autocast_and_backward(rng):
    model = _model(num_classes=5, drop_path_rate=0.1)
    x = torch.randn(2, 3, 32, 32, generator=rng)
    expected = model.eval()(x)
    assert_close("channels_last", expected, model(x.to(memory_format=torch.channels_last)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(x)).all()
    model.train()(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(VARIANTS))
def test_vig_h_gpu_bf16_matches_reference_backend(name):
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
def test_vig_h_gpu_torch_compile_fullgraph():
    """Compiled vs eager: fp32 forward + backward (logits within 1e-3, every parameter gradient within 1e-2) and
    the bf16 autocast forward."""
    torch.manual_seed(0)
    model = timm.create_model("vig_h_tiny", drop_path_rate=0.0).cuda().train()
    x = torch.randn(2, 3, 256, 192, device="cuda")
    check_compile_matches_eager(model, x, out_tol=1e-3, grad_tol=1e-2, fullgraph=True)
    model.eval()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert_close("compiled", model(x).float(), compiled(x).float(), tol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_vig_h_gpu_amp_train_step_matches_fp32(dtype):
    """fp16 and bf16 autocast forward + backward of vig_h_tiny at 224, batch 2: finite, close to fp32."""
    torch.manual_seed(0)
    model = timm.create_model("vig_h_tiny", drop_path_rate=0.0).cuda().train()
    check_amp_train_step(model, torch.randn(2, 3, 224, 224, device="cuda"), dtype)
