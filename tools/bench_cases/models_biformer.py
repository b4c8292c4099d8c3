"""BiFormer and Agent-Attention models (issue 8) against the reference's attention and timm's Swin/DeiT.

Inference rows run bf16 weights under ``torch.no_grad``; training rows run one forward + backward of the
cross-entropy loss with fp32 weights under bf16 autocast. ``items`` is the batch, so the report gives images/s.
Targets (issue 8, H100 bf16): biformer_tiny >= 2x the images/s of the reference's gather-based routing attention
with lower peak memory (224 px batch 256 and 1024 px batch 8, inference and training); agent_swin_tiny >=
swin_tiny's images/s at 224 px; agent_pvt_small >= 3x deit_small's images/s at 1024 px.

The "gather reference" row is the same biformer_tiny (same weights) with every ``BiLevelRoutingAttention`` computed
the reference's way (``ops/bra_legacy.py``: top-k-fold ``torch.gather`` of K/V, dense per-region softmax), by
``GatherBiLevelRoutingAttention`` of ``tests/nn/test_routing_attention.py``. Before timing, the relative error of
its logits against ours is printed (routing near-ties may pick other regions in bf16).

    python tools/bench.py models --cases models_biformer --mode both --dtype bf16 --out docs/benchmarks/models_biformer_h100
"""

import copy

import timm
import torch
import torch.nn.functional as F

import visionattn  # noqa: F401  (registers the models)
from tests.nn.test_routing_attention import GatherBiLevelRoutingAttention
from tools.bench_cases._common import BenchCase
from visionattn.nn import BiLevelRoutingAttention

__all__ = ["cases"]

#: (group, mode, img, batch, ours, [(impl, timm name, is_baseline)]); "gather" = biformer_tiny, reference attention
_GPU_ROWS = [
    ("infer 224px biformer_tiny", "fwd", 224, 256, "biformer_tiny", [("gather", None, True)]),
    ("train 224px biformer_tiny", "fwd+bwd", 224, 256, "biformer_tiny", [("gather", None, True)]),
    ("infer 1024px biformer_tiny", "fwd", 1024, 8, "biformer_tiny", [("gather", None, True)]),
    ("train 1024px biformer_tiny", "fwd+bwd", 1024, 8, "biformer_tiny", [("gather", None, True)]),
    ("infer 224px agent_swin_tiny", "fwd", 224, 256, "agent_swin_tiny", [("swin_tiny", "swin_tiny_patch4_window7_224", True)]),
    ("train 224px agent_swin_tiny", "fwd+bwd", 224, 256, "agent_swin_tiny", [("swin_tiny", "swin_tiny_patch4_window7_224", True)]),
    ("infer 1024px agent_pvt_small", "fwd", 1024, 8, "agent_pvt_small", [("deit_small", "deit_small_patch16_224", True)]),
    ("train 1024px agent_pvt_small", "fwd+bwd", 1024, 8, "agent_pvt_small", [("deit_small", "deit_small_patch16_224", True)]),
]  # fmt: skip
_CPU_ROWS = [
    ("infer 64px biformer_tiny", "fwd", 64, 2, "biformer_tiny", [("gather", None, True)]),
    ("train 64px biformer_tiny", "fwd+bwd", 64, 2, "biformer_tiny", [("gather", None, True)]),
    ("infer 64px agent_pvt_tiny", "fwd", 64, 2, "agent_pvt_tiny", [("deit_tiny", "deit_tiny_patch16_224", True)]),
]


def _with_gather_attention(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` (same weights) whose routing attention is computed the reference's way."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, BiLevelRoutingAttention):
            m.__class__ = GatherBiLevelRoutingAttention
    return model


def _timed(model, images, labels, mode: str):
    if mode == "fwd":

        def run():
            with torch.no_grad():
                return model(images)

        return run

    def step():
        with torch.autocast(images.device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images).float(), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def _report_agreement(ours, reference, images, label: str):
    def check():
        with torch.no_grad(), torch.autocast(images.device.type, dtype=torch.bfloat16):
            a, b = ours(images[:2]).float(), reference(images[:2]).float()
        print(f"[models_biformer] {label}: gather-reference logits rel. error {float((a - b).norm() / b.norm()):.2e}")

    return check


def _build(name: str, img: int, mode: str, args):
    kwargs = {"img_size": img} if name.startswith(("deit", "swin")) else {}
    if name.startswith("biformer") and args.device != "cuda":
        kwargs["backend"] = "reference"  # bench.py sets TRITON_INTERPRET=1 on CPU: keep the interpreter out
    model = timm.create_model(name, **kwargs).to(args.device)
    return model.eval().to(args.dtype) if mode == "fwd" else model.train()


def cases(args) -> list[BenchCase]:
    rows = []
    for group, mode, img, batch, ours_name, peers in _GPU_ROWS if args.device == "cuda" else _CPU_ROWS:
        if args.mode not in ("both", mode):
            continue
        dtype = args.dtype if mode == "fwd" else torch.float32
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(batch, 3, img, img, generator=gen).to(args.device, dtype)
        labels = torch.randint(0, 1000, (batch,), generator=gen).to(args.device)
        common = dict(group=f"{group} B{batch}", mode=mode, items=batch)
        ours = _build(ours_name, img, mode, args)
        rows.append(BenchCase(impl=f"{ours_name} (ours)", fn=_timed(ours, images, labels, mode), **common))
        for impl, name, baseline in peers:
            if name is None:
                peer = _with_gather_attention(ours)
                setup = _report_agreement(ours, peer, images, group)
                label = f"{ours_name} gather reference"
            else:
                peer, setup, label = _build(name, img, mode, args), None, f"{impl} (timm)"
            fn = _timed(peer, images, labels, mode)
            rows.append(BenchCase(impl=label, fn=fn, baseline=baseline, setup=setup, **common))
    return rows
