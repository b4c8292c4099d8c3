"""Tests shared by the MAViT and RAVLT families; each family's test file binds them to its ``family`` fixture.

Oracles: the official forward re-implemented in ``_linear_vit_reference.py`` (float64), parameter counts of the
official code, and its fvcore MACs (convolutions + matmuls; measured 2026-11-22 with fvcore 0.1.5 on qhfan/MALA
@7114e63 and qhfan/RALA @a86314f, 1x3x224x224).
"""

from dataclasses import dataclass

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import visionattn  # noqa: F401  (registers the models)
from tests._numerics import assert_close

from . import _linear_vit_reference as ref
from ._precision_checks import check_amp_train_step, check_compile_matches_eager

SIZES = ("tiny", "small", "base", "large")


def _create(family, size: str, **kwargs):
    # The tests' conftest sets TRITON_INTERPRET=1, under which the op would pick its Triton kernel on CPU (slow,
    # wrong in bf16); the CPU path users get is the reference.
    return timm.create_model(family.name(size), attn_backend="reference", **kwargs)


@dataclass(frozen=True)
class Family:
    prefix: str
    kind: str
    projections: tuple[int, ...]
    params: tuple[int, ...]  # exact counts of the official modules
    published_params_m: tuple[int, ...]
    reference_gmacs: tuple[float, ...]  # fvcore conv + matmul MACs of the official code at 224
    published_gflops: tuple[float, ...]
    hub_id: str
    files: tuple[str, ...]

    def name(self, size: str) -> str:
        return f"{self.prefix}_{size}"

    def official_shapes(self, size: str, num_classes: int = 1000) -> dict:
        projection = self.projections[SIZES.index(size)]
        return ref.official_shapes(**ref.OFFICIAL_VARIANTS[size], projection=projection, num_classes=num_classes)


#: A narrow version of the released layout (same stem, stages, attention kinds, head) for CPU-cheap model tests;
#: the released widths are checked on the meta device (parameter counts, key layout, MACs).
_NARROW = dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4), projection_dim=96)


def _create_narrow(family, **kwargs):
    return _create(family, "tiny", **_NARROW, **kwargs)


def _narrow_official_state_dict(family, rng, num_classes: int = 1000, dtype=torch.float64) -> dict:
    dims = {k: _NARROW[k] for k in ("embed_dims", "depths", "num_heads")}
    shapes = ref.official_shapes(**dims, projection=_NARROW["projection_dim"], num_classes=num_classes)
    return ref.random_official_state_dict(shapes, rng, dtype=dtype)


def _convert(family: Family, sd: dict, model) -> dict:
    module = __import__(f"visionattn.backbones.{family.prefix}", fromlist=["checkpoint_filter_fn"])
    return module.checkpoint_filter_fn(sd, model)


def test_param_counts_match_official(family):
    for size, exact, published in zip(SIZES, family.params, family.published_params_m):
        model = _create(family, size, device="meta")
        count = sum(p.numel() for p in model.parameters())
        assert count == exact, f"{family.name(size)}: {count} parameters, official code has {exact}"
        # The papers round to 1M (MAViT-T 16.45M is "16M"), so the exact official count is the check that matters.
        assert round(count / 1e6) == published


def test_macs_match_official_code(family):
    for size, macs, published in zip(SIZES, family.reference_gmacs, family.published_gflops):
        model = _create(family, size, device="meta").eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, 224, 224, device="meta"))
        gmacs = counter.get_total_flops() / 2e9
        assert abs(gmacs - macs) / macs < 0.005, f"{family.name(size)}: {gmacs:.3f} GMACs vs official {macs:.3f}"
        # The published tables are 4-10 % below what fvcore counts on the released code (docs/models.md).
        assert 0.0 < (gmacs - published) / published < 0.1


@pytest.mark.parametrize("attn_layout", ["hybrid", "linear"])
@pytest.mark.parametrize("shape", [(64, 64), (72, 56)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_official_forward(family, rng, attn_layout, shape):
    sd = _narrow_official_state_dict(family, rng, num_classes=10)
    model = _create_narrow(family, num_classes=10, attn_layout=attn_layout).double().eval()
    model.load_state_dict(_convert(family, sd, model), strict=True)
    x = torch.randn(2, 3, *shape, generator=rng, dtype=torch.float64)
    attn_types = (family.kind,) * 4 if attn_layout == "linear" else None
    expected = ref.forward(sd, x, linear_kind=family.kind, num_heads=_NARROW["num_heads"], attn_types=attn_types)
    with torch.no_grad():
        assert_close("logits", expected, model(x))


def test_converter_key_layout_all_variants(family):
    for size in SIZES:
        model = _create(family, size, device="meta")
        official = {k: torch.empty(s, device="meta") for k, s in family.official_shapes(size).items()}
        converted = _convert(family, official, model)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in converted.items()} == expected


def test_converter_unwraps_and_passes_native(family, rng):
    model = _create_narrow(family, num_classes=10)
    sd = _narrow_official_state_dict(family, rng, num_classes=10, dtype=torch.float32)
    wrapped = {"model": sd, "optimizer": {}, "epoch": 299}
    converted = _convert(family, wrapped, model)
    model.load_state_dict(converted, strict=True)
    native = model.state_dict()
    assert _convert(family, native, model) is native


def test_pretrained_loads_official_file(family, rng, tmp_path):
    sd = _narrow_official_state_dict(family, rng, dtype=torch.float32)
    path = tmp_path / "official.pth"
    torch.save({"model": sd, "epoch": 299}, path)
    model = _create_narrow(family, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(model.stages[1].downsample.reduction.weight, sd["layers.0.downsample.reduction.weight"])
    assert torch.equal(model.head.fc.weight, sd["head.weight"].flatten(1))


def test_pretrained_cfgs_point_at_official_hub(family):
    for size, file_name in zip(SIZES, family.files):
        model = _create(family, size, device="meta")
        cfg = model.pretrained_cfg
        assert (cfg["hf_hub_id"], cfg["hf_hub_filename"]) == (family.hub_id, file_name)
        params = dict(model.named_parameters())
        assert cfg["first_conv"] + ".weight" in params and cfg["classifier"] + ".weight" in params
        assert cfg["input_size"] == (3, 224, 224) and cfg["pool_size"] == (7, 7)
        assert cfg["license"] == "unknown" and cfg["paper_ids"] and cfg["origin_url"].startswith("https://github.com/")


def test_timm_head_api(family, rng):
    model = _create_narrow(family, num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64, generator=rng)
    projection = _NARROW["projection_dim"]
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, projection, 2, 2)
        assert model.forward_head(features, pre_logits=True).shape == (2, projection)
        assert model(x).shape == (2, 7)
        assert model.get_classifier().out_features == 7
        model.reset_classifier(0)
        assert model(x).shape == (2, projection)
        model.reset_classifier(0, "")
        assert model(x).shape == (2, projection, 2, 2)
    assert model.no_weight_decay() == set()
    assert set(model.group_matcher()) == {"stem", "blocks"}
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]


def test_grad_checkpointing_keeps_output_and_gradients(family, rng):
    model = _create_narrow(family, num_classes=5).double().train()
    x = torch.randn(2, 3, 64, 48, generator=rng, dtype=torch.float64)
    torch.manual_seed(0)
    out = model(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    torch.manual_seed(0)
    out_ckpt = model(x)
    out_ckpt.square().sum().backward()
    assert_close("out", out, out_ckpt)
    for name, p in model.named_parameters():
        assert_close(name, grads[name], p.grad)


def test_features_only_and_intermediates(family, rng):
    x = torch.randn(1, 3, 96, 64, generator=rng)
    torch.manual_seed(0)
    features = _create_narrow(family, features_only=True, out_indices=(1, 3)).eval()
    torch.manual_seed(0)
    model = _create_narrow(family).eval()
    with torch.no_grad():
        outs = features(x)
        assert [tuple(o.shape) for o in outs] == [(1, 32, 12, 8), (1, 64, 3, 2)]
        assert features.feature_info.channels() == [32, 64]
        final, intermediates = model.forward_intermediates(x)
        assert_close("final", model.forward_features(x), final)
        assert [i.shape[1] for i in intermediates] == [16, 32, 48, 64]
        assert_close("stage1", intermediates[1], outs[0])
        assert len(model.forward_intermediates(x, indices=2, intermediates_only=True)) == 2
    # the stem moves activations to channels_last memory so the blocks' (B, N, C) token views need no copies
    assert all(i.is_contiguous(memory_format=torch.channels_last) for i in intermediates)
    assert model.prune_intermediate_layers(indices=(0, 2)) == [0, 2]
    assert len(model.stages) == 3 and model.num_classes == 0


@pytest.mark.parametrize("shape", [(224, 224), (97, 61), (33, 40)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_any_resolution_channels_last_and_amp(family, rng, shape):
    model = _create_narrow(family).eval()
    x = torch.randn(1, 3, *shape, generator=rng)
    with torch.no_grad():
        out = model(x)
        assert torch.isfinite(out).all()
        out_cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        assert_close("channels_last", out, out_cl, tol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf16 = model(x)
        assert torch.isfinite(out_bf16).all()
        assert_close("bf16 autocast", out, out_bf16.float(), tol=0.1)


def test_attn_layout_and_errors(family):
    linear = _create(family, "tiny", attn_layout="linear", device="meta")
    assert linear.attn_types == (family.kind,) * 4
    assert _create(family, "tiny", device="meta").attn_types == (family.kind,) * 2 + ("softmax",) * 2
    with pytest.raises(ValueError, match="attn_layout"):
        _create(family, "tiny", attn_layout="pure", device="meta")
    with pytest.raises(ValueError, match="attn_types"):
        _create(family, "tiny", attn_types=("mala", "nope", "softmax", "softmax"), device="meta")
    with pytest.raises(ValueError, match="embed_dims"):
        _create(family, "tiny", embed_dims=(64, 128), device="meta")
    with pytest.raises(ValueError, match="attn_layout='linear'"):
        _create(family, "tiny", attn_types=("softmax",) * 4, attn_layout="linear", device="meta")


@pytest.mark.gpu
def test_gpu_triton_bf16_and_compile_match_reference(family):
    torch.manual_seed(0)
    reference = timm.create_model(family.name("tiny"), attn_backend="reference").cuda().eval()
    model = timm.create_model(family.name("tiny")).cuda().eval()
    model.load_state_dict(reference.state_dict())
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.no_grad():
        expected = reference(x)
        # fp32 convolutions may run in TF32 on the GPU (cuDNN default), in both models alike.
        assert_close("fp32 triton", expected, model(x), tol=5e-3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            eager = model(x)
            compiled = torch.compile(model)(x)
        assert_close("bf16 autocast", expected, eager.float(), tol=5e-2)
        assert_close("compiled", eager.float(), compiled.float(), tol=2e-2)
        linear = timm.create_model(family.name("tiny"), attn_layout="linear").cuda().eval().to(torch.bfloat16)
        assert torch.isfinite(linear(torch.randn(2, 3, 1024, 1024, device="cuda", dtype=torch.bfloat16))).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_amp_train_step_matches_fp32(family, dtype):
    """fp16 and bf16 autocast forward + backward of the tiny model at 224, batch 2 (Triton kernels): finite, close
    to the fp32 step (``AMP_OUT_TOL``/``AMP_GRAD_TOL``)."""
    torch.manual_seed(0)
    model = timm.create_model(family.name("tiny"), drop_path_rate=0.0).cuda().train()
    check_amp_train_step(model, torch.randn(2, 3, 224, 224, device="cuda"), dtype)


@pytest.mark.gpu
def test_gpu_compile_matches_eager_gradients(family):
    """fp32 forward + backward of the tiny model, compiled vs eager: logits within 1e-3, every parameter gradient
    within 1e-2 (inductor reorders reductions; cuDNN convolutions may run in TF32 in both)."""
    torch.manual_seed(0)
    model = timm.create_model(family.name("tiny"), drop_path_rate=0.0).cuda().train()
    check_compile_matches_eager(model, torch.randn(2, 3, 224, 224, device="cuda"), out_tol=1e-3, grad_tol=1e-2)
