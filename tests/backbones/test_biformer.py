"""BiFormer: sizes, FLOPs, official-checkpoint conversion, equality with the gather-based reference attention and
the timm API at odd input sizes."""

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import visionattn  # noqa: F401  (registers the models)
from tests._numerics import assert_close
from tests.nn.test_routing_attention import GatherBiLevelRoutingAttention
from visionattn.backbones.biformer import checkpoint_filter_fn
from visionattn.nn import BiLevelRoutingAttention

from ._precision_checks import check_amp_train_step, check_compile_matches_eager

# published params (M) and fvcore GMACs at 224 (rayleizhu/BiFormer README)
PUBLISHED = {"biformer_tiny": (13.1, 2.2), "biformer_small": (25.5, 4.5), "biformer_base": (56.8, 9.8)}
#: a shallower biformer_tiny for the CPU tests of behaviour (every stage kept, one block each; the Triton
#: interpreter path of the routing attention is covered by tests/nn/test_routing_attention.py)
SHALLOW = dict(depths=(1, 1, 1, 1), backend="reference")


def _routing_macs(module, args, out, totals):
    """MACs of one routed attention as fvcore counts the reference: QKᵀ and PV over the gathered top-k regions
    (``2 · N · topk · region · C``) plus the region-to-region routing product (``S⁴ · C``)."""
    x, grid = args
    s = module.n_win
    height, width = (-(-d // s) * s for d in grid.shape)
    region = (height // s) * (width // s)
    channels = x.shape[-1]
    keys = min(module.topk, s * s) * region
    totals.append(x.shape[0] * (2 * height * width * keys * channels + s**4 * channels))


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_biformer_params_and_flops_match_published(name):
    params_m, gmacs = PUBLISHED[name]
    model = timm.create_model(name, device="meta").eval()
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - params_m) <= 0.005 * params_m, f"{name}: {count:.3f}M vs {params_m}M"
    # on meta the routed attention is shape-only (no values to route), so its MACs are added analytically
    routed = []
    for m in model.modules():
        if isinstance(m, BiLevelRoutingAttention):
            m.register_forward_hook(lambda mod, args, out: _routing_macs(mod, args, out, routed))
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, 224, 224, device="meta"))
    measured = counter.get_total_flops() / 2e9 + sum(routed) / 1e9
    assert abs(measured - gmacs) <= 0.03 * gmacs, f"{name}: {measured:.3f} GMACs vs {gmacs}"


#: the released variants' (embed_dim, depth) of ``models/biformer.py`` (the rest is shared: mlp ratio 3, n_win 7,
#: topks 1/4/16/-2, qk_dims = embed_dim, LePE 5x5, 3x3 depthwise pos_embed, no layer scale)
OFFICIAL_VARIANTS = {
    "biformer_tiny": ((64, 128, 256, 512), (2, 2, 8, 2)),
    "biformer_small": ((64, 128, 256, 512), (4, 4, 18, 4)),
    "biformer_base": ((96, 192, 384, 768), (4, 4, 18, 4)),
}


def _official_layout(name: str = "biformer_tiny") -> dict:
    """Key layout of ``models/biformer.py`` (``bra_legacy`` attention in stages 1-3, ``AttentionLePE`` in stage 4;
    stem conv(3, C/2) BN GELU conv(C/2, C) BN; BN final norm)."""
    dims, depths = OFFICIAL_VARIANTS[name]
    bn = lambda p, c: {f"{p}.weight": (c,), f"{p}.bias": (c,), f"{p}.running_mean": (c,), f"{p}.running_var": (c,)}
    half = dims[0] // 2
    d = {"downsample_layers.0.0.weight": (half, 3, 3, 3), "downsample_layers.0.0.bias": (half,)}
    d.update(bn("downsample_layers.0.1", half))
    d.update({"downsample_layers.0.3.weight": (dims[0], half, 3, 3), "downsample_layers.0.3.bias": (dims[0],)})
    d.update(bn("downsample_layers.0.4", dims[0]))
    d.update(bn("norm", dims[-1]))
    d.update({"head.weight": (1000, dims[-1]), "head.bias": (1000,)})
    for i, (c, depth) in enumerate(zip(dims, depths)):
        if i:
            d.update({f"downsample_layers.{i}.0.weight": (c, dims[i - 1], 3, 3), f"downsample_layers.{i}.0.bias": (c,)})
            d.update(bn(f"downsample_layers.{i}.1", c))
        for j in range(depth):
            p = f"stages.{i}.{j}."
            d.update({f"{p}pos_embed.weight": (c, 1, 3, 3), f"{p}pos_embed.bias": (c,)})
            for n in ("norm1", "norm2"):
                d.update({f"{p}{n}.weight": (c,), f"{p}{n}.bias": (c,)})
            d.update({f"{p}mlp.0.weight": (3 * c, c), f"{p}mlp.0.bias": (3 * c,)})
            d.update({f"{p}mlp.3.weight": (c, 3 * c), f"{p}mlp.3.bias": (c,)})
            d.update({f"{p}attn.lepe.weight": (c, 1, 5, 5), f"{p}attn.lepe.bias": (c,)})
            if i < 3:  # BiLevelRoutingAttention: QKVLinear wrapper and output linear 'wo'
                d.update({f"{p}attn.qkv.qkv.weight": (3 * c, c), f"{p}attn.qkv.qkv.bias": (3 * c,)})
                d.update({f"{p}attn.wo.weight": (c, c), f"{p}attn.wo.bias": (c,)})
            else:  # AttentionLePE: qkv without bias, 'proj'
                d.update(
                    {f"{p}attn.qkv.weight": (3 * c, c), f"{p}attn.proj.weight": (c, c), f"{p}attn.proj.bias": (c,)}
                )
    return d


@pytest.mark.parametrize("name", list(OFFICIAL_VARIANTS))
def test_biformer_converter_key_layout_all_variants(name):
    model = timm.create_model(name, device="meta")
    official = {k: torch.empty(s, device="meta") for k, s in _official_layout(name).items()}
    official.update({k.replace("running_mean", "num_batches_tracked"): torch.empty((), device="meta", dtype=torch.long)
                     for k in list(official) if k.endswith("running_mean")})  # fmt: skip
    converted = checkpoint_filter_fn({"model": official}, model)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in model.state_dict().items()
    }
    model.load_state_dict(converted, strict=True, assign=True)


def test_biformer_checkpoint_filter_loads_official_layout_strict(tmp_path, rng):
    state = {k: torch.randn(s, generator=rng) for k, s in _official_layout().items()}
    state.update({k.replace("running_mean", "num_batches_tracked"): torch.tensor(5) for k in list(state)
                  if k.endswith("running_mean")})  # fmt: skip
    path = tmp_path / "biformer_tiny_in1k.pth"
    torch.save({"model": state, "epoch": 299}, path)
    model = timm.create_model("biformer_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    ours = model.state_dict()
    assert torch.equal(ours["stem.3.weight"], state["downsample_layers.0.3.weight"])
    assert torch.equal(ours["stages.2.downsample.0.weight"], state["downsample_layers.2.0.weight"])
    assert torch.equal(ours["stages.1.blocks.1.attn.qkv.weight"], state["stages.1.1.attn.qkv.qkv.weight"])
    assert torch.equal(ours["stages.0.blocks.0.attn.proj.bias"], state["stages.0.0.attn.wo.bias"])
    assert torch.equal(ours["stages.3.blocks.1.mlp.fc2.weight"], state["stages.3.1.mlp.3.weight"])
    model.load_state_dict(checkpoint_filter_fn(ours, model), strict=True)  # native passes through


@pytest.mark.parametrize("n_win", [7, 8, 16])  # ImageNet, and the reference's segmentation / detection configs
def test_biformer_equals_gather_reference_model(rng, n_win):
    torch.manual_seed(0)
    model = timm.create_model("biformer_tiny", num_classes=7, n_win=n_win, **SHALLOW).double().eval()
    # 20x16 in stage 1: padded to 21x21 (n_win 7), 24x24 (8) or 32x32 (16); stage 3's 5x4 map to 7x7 / 8x8 / 16x16
    x = torch.randn(1, 3, 80, 64, generator=rng, dtype=torch.float64)
    ours = model(x)
    for m in model.modules():
        if isinstance(m, BiLevelRoutingAttention):
            m.__class__ = GatherBiLevelRoutingAttention
    assert_close("logits", model(x), ours)


def test_biformer_any_resolution_channels_last_amp_and_grad_checkpointing(rng):
    torch.manual_seed(0)
    model = timm.create_model("biformer_tiny", num_classes=5, **SHALLOW)
    x = torch.randn(2, 3, 64, 96, generator=rng)
    ref = model(x)
    ref.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    assert_close("grad-ckpt out", ref, out)
    for n, p in model.named_parameters():
        assert_close(f"d{n}", grads[n], p.grad, tol=1e-4)
    model.eval()
    out = model(x)
    last = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    assert_close("channels_last", out, last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x)
    assert torch.isfinite(low).all()
    assert_close("bf16", out, low.float(), tol=0.1)
    final, inter = model.forward_intermediates(x)
    assert_close("final", model.forward_features(x), final)
    assert [t.shape[-2:] for t in inter] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    # maps stay channels_last from the stem on (the blocks' token views need no copies), also at batch 1
    single = model.forward_intermediates(x[:1], intermediates_only=True)
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in inter + single)
    features = timm.create_model("biformer_tiny", features_only=True, out_indices=(1, 3), n_win=8, **SHALLOW).eval()
    assert [f.shape[1] for f in features(x)] == [128, 512]


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(PUBLISHED))
def test_biformer_gpu_triton_matches_reference_and_trains_in_bf16(name):
    torch.manual_seed(0)
    model = timm.create_model(name).cuda().eval()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.no_grad():
        out = model(x)
        for m in model.modules():
            if isinstance(m, BiLevelRoutingAttention):
                m.backend = "reference"
        ref = model(x)
        for m in model.modules():
            if isinstance(m, BiLevelRoutingAttention):
                m.backend = None
    assert_close("logits fp32", ref, out, tol=2e-3)
    model.train()
    for size in (224, 320, 1024):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(torch.randn(2, 3, size, size, device="cuda")).float().logsumexp(-1).mean()
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        model.zero_grad()


@pytest.mark.gpu
def test_biformer_gpu_torch_compile_matches_eager():
    """fp32 forward + backward, compiled vs eager: logits within 1e-3, every parameter gradient within 1e-2.

    1e-3 as for the Agent models: inductor reorders the fp32 reductions around the attention (norms, the region
    pooling of the routing), which moved the logits by 2.3e-4 on the H100 with the routed-attention path."""
    torch.manual_seed(0)
    model = timm.create_model("biformer_tiny", drop_path_rate=0.0).cuda().train()
    check_compile_matches_eager(model, torch.randn(2, 3, 224, 224, device="cuda"), out_tol=1e-3, grad_tol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_biformer_gpu_amp_train_step_matches_fp32(dtype):
    """fp16 and bf16 autocast forward + backward of biformer_tiny at 224, batch 2: finite, close to fp32."""
    torch.manual_seed(0)
    model = timm.create_model("biformer_tiny", drop_path_rate=0.0).cuda().train()
    check_amp_train_step(model, torch.randn(2, 3, 224, 224, device="cuda"), dtype)
