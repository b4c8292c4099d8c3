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

import contextlib
import copy
import functools

import timm
import torch

import visionattn  # noqa: F401  (registers the models)
import visionattn.nn.agent_attention as agent_attention_module
import visionattn.nn.routing_attention as routing_attention
from tests.nn.test_routing_attention import GatherBiLevelRoutingAttention
from tools.bench_cases._common import BenchCase, image_batch, model_step
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


@contextlib.contextmanager
def _attention_free():
    """Skip the routing and the token attention of every ``BiLevelRoutingAttention`` (its output is ``V``) for the
    duration: what is left is the model's time outside the routing attention, the upper bound on the speedup that
    any implementation of that attention can give."""
    cls = BiLevelRoutingAttention
    saved = routing_attention.block_sparse_attention, routing_attention.routed_attention, cls._routing_mask, cls._route
    routing_attention.block_sparse_attention = lambda q, k, v, mask, **_: v
    routing_attention.routed_attention = lambda q, k, v, regions, **_: v
    cls._routing_mask = cls._route = lambda *_: None
    try:
        yield
    finally:
        routing_attention.block_sparse_attention, routing_attention.routed_attention = saved[:2]
        cls._routing_mask, cls._route = saved[2:]


@contextlib.contextmanager
def _previous_path():
    """Every region size through ``block_sparse_attention`` (the path before ``routed_attention``)."""
    limit, BiLevelRoutingAttention.routed_max_region = BiLevelRoutingAttention.routed_max_region, 0
    try:
        yield
    finally:
        BiLevelRoutingAttention.routed_max_region = limit


@contextlib.contextmanager
def _agent_attention_free():
    """Skip the two softmax attentions of every ``AgentAttention`` (the op returns q) for the duration: what is left
    (projections, agent pooling, biases, the depthwise conv on v, the rest of the model) bounds what any agent
    attention kernel can give."""
    attend = agent_attention_module.agent_attention
    agent_attention_module.agent_attention = lambda q, *_, **__: q
    try:
        yield
    finally:
        agent_attention_module.agent_attention = attend


def _report_agreement(ours, reference, images, label: str) -> None:
    with torch.no_grad(), torch.autocast(images.device.type, dtype=torch.bfloat16):
        a, b = ours(images[:2]).float(), reference(images[:2]).float()
    print(f"[models_biformer] {label}: gather-reference logits rel. error {float((a - b).norm() / b.norm()):.2e}")


def _build(name: str, img: int, mode: str, args):
    kwargs = {"img_size": img} if name.startswith(("deit", "swin")) else {}
    if name.startswith("biformer") and args.device != "cuda":
        kwargs["backend"] = "reference"  # bench.py sets TRITON_INTERPRET=1 on CPU: keep the interpreter out
    model = timm.create_model(name, **kwargs).to(args.device)
    return model.eval().to(args.dtype) if mode == "fwd" else model.train()


def _row(name: str, img: int, batch: int, mode: str, args, gather_of: str | None = None, context=None):
    """``BenchCase.make`` of one row: model ``name`` and a batch, built when timed. ``gather_of``: the row times a
    gather-attention copy of ``name`` (same weights), after printing its agreement with ours; ``context``: entered
    around every step (``_attention_free``, ``_previous_path``)."""

    def make():
        dtype = args.dtype if mode == "fwd" else torch.float32
        images, labels = image_batch(batch, img, device=args.device, dtype=dtype)
        model = _build(name, img, mode, args)
        if gather_of is not None:
            ours, model = model, _with_gather_attention(model)
            _report_agreement(ours, model, images, gather_of)
        return model_step(model, images, labels, mode, context or contextlib.nullcontext)

    return make


def cases(args) -> list[BenchCase]:
    rows = []
    for group, mode, img, batch, ours_name, peers in _GPU_ROWS if args.device == "cuda" else _CPU_ROWS:
        common = dict(group=f"{group} B{batch}", mode=mode, items=batch)
        row = functools.partial(_row, img=img, batch=batch, mode=mode, args=args)
        rows.append(BenchCase(impl=f"{ours_name} (ours)", make=row(ours_name), **common))
        if ours_name.startswith("biformer"):
            make = row(ours_name, context=_previous_path)
            rows.append(BenchCase(impl=f"{ours_name} ours (previous path)", make=make, **common))
            make = row(ours_name, context=_attention_free)
            rows.append(BenchCase(impl=f"{ours_name} attention-free (bound)", make=make, **common))
        if ours_name.startswith("agent"):
            make = row(ours_name, context=_agent_attention_free)
            rows.append(BenchCase(impl=f"{ours_name} attention-free (bound)", make=make, **common))
        for impl, name, baseline in peers:
            if name is None:
                label, make = f"{ours_name} gather reference", row(ours_name, gather_of=group)
            else:
                label, make = f"{impl} (timm)", row(name)
            rows.append(BenchCase(impl=label, make=make, baseline=baseline, **common))
    return rows
