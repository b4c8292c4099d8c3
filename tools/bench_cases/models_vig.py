"""ViG / ViG-H models (issue 9) against timm's DeiT, Swin and ConvNeXt, and against the ViG-training-way attention.

Inference rows run bf16 weights under ``torch.no_grad``; training rows run one forward + backward of the
cross-entropy loss with fp32 weights under bf16 autocast. ``items`` is the batch, so the report gives images/s.
Targets (issue 9, H100 bf16): vig_tiny at 1024 px >= 5x deit_tiny's images/s with >= 80 % less peak memory;
vig_small at 224 px >= 2x deit_base.

The "reference path" rows run the same model with its attention computed the way ViG trains: the causal op on the
batch-concatenated ``[x; flip(x)]`` (``o = (o_f + flip(o_b)) / 2``, vig.py training branch), through our causal
kernel and, when fla is installed, through fla's ``chunk_gla`` (ViG's own kernel family).

    python tools/bench.py models --cases models_vig --mode both --dtype bf16 --out docs/benchmarks/models_vig_h100
"""

import contextlib
import functools

import timm
import torch

import visionattn  # noqa: F401  (registers the models)
import visionattn.nn.gated_attention2d as gated_attention2d
from tools.bench_cases._common import BenchCase, image_batch, model_step
from tools.bench_cases.gated import _fla_bidirectional
from visionattn.ops import gated_linear_attention
from visionattn.ops.gated import _log_gates  # the log gates of the PyTorch backends

__all__ = ["cases"]

#: (group, mode, img, batch, [(impl, timm name, is_baseline)], reference paths for the ViG model of the row)
_GPU_ROWS = [
    (
        "infer 1024px vig_tiny vs deit_tiny",
        "fwd",
        1024,
        128,
        [("deit_tiny", "deit_tiny_patch16_224", True)],
        "vig_tiny",
    ),
    (
        "infer 224px vig_small vs deit_base",
        "fwd",
        224,
        512,
        [("deit_base", "deit_base_patch16_224", True)],
        "vig_small",
    ),
    (
        "infer 224px vig_h_tiny vs swin_tiny/convnext_tiny",
        "fwd",
        224,
        256,
        [("swin_tiny", "swin_tiny_patch4_window7_224", True), ("convnext_tiny", "convnext_tiny", False)],
        "vig_h_tiny",
    ),
    ("train 224px vig_tiny", "fwd+bwd", 224, 256, [("deit_tiny", "deit_tiny_patch16_224", False)], "vig_tiny"),
    ("train 224px vig_small", "fwd+bwd", 224, 256, [("deit_small", "deit_small_patch16_224", False)], "vig_small"),
    ("train 1024px vig_tiny", "fwd+bwd", 1024, 16, [("deit_tiny", "deit_tiny_patch16_224", False)], "vig_tiny"),
    (
        "train 224px vig_h_tiny",
        "fwd+bwd",
        224,
        128,
        [("swin_tiny", "swin_tiny_patch4_window7_224", False)],
        "vig_h_tiny",
    ),
]
#: Groups that also time ``torch.compile``d models (ours and the peers alike).
_COMPILED_GROUPS = ("infer 1024px vig_tiny vs deit_tiny", "infer 224px vig_small vs deit_base")
_CPU_ROWS = [
    ("infer 64px vig_tiny vs deit_tiny", "fwd", 64, 2, [("deit_tiny", "deit_tiny_patch16_224", True)], "vig_tiny"),
    ("train 64px vig_h_tiny", "fwd+bwd", 64, 2, [("convnext_atto", "convnext_atto", False)], "vig_h_tiny"),
]


def _concat_flip_path(causal):
    """The bidirectional op computed ViG's training way from a causal GLA ``causal(q, k, v, log_gate)``."""

    def run(q, k, v, gate_fwd, gate_bwd, *, scale=None, gate_normalizer=None, backend=None):
        cat = lambda x, y: torch.cat([x, y.flip(2)])
        log_gates = cat(_log_gates(gate_fwd, gate_normalizer), _log_gates(gate_bwd, gate_normalizer))
        o_fwd, o_bwd = causal(cat(q, q), cat(k, k), cat(v, v), log_gates, backend).chunk(2)
        return (o_fwd + o_bwd.flip(2)) / 2

    return run


def _reference_paths(on_gpu: bool) -> dict:
    """Name -> bidirectional GLA computed ViG's training way (and the attention-free bound); the last one is the
    training groups' baseline."""
    ours = lambda q, k, v, a, backend: gated_linear_attention(q, k, v, a, backend=backend)
    # output = v: the model's time outside the attention op, the bound on what any GLA kernel can give
    paths = {"attention-free (bound)": lambda q, k, v, *_, **__: v}
    paths["ref: our causal op on [x; flip(x)]"] = _concat_flip_path(ours)
    fla = _fla_bidirectional() if on_gpu else None
    if fla is not None:

        def fla_path(q, k, v, a, b, *, scale=None, gate_normalizer=None, backend=None):
            return fla(q, k, v, _log_gates(a, gate_normalizer), _log_gates(b, gate_normalizer))

        paths["ref: fla chunk_gla on [x; flip(x)]"] = fla_path
    return paths


@contextlib.contextmanager
def _attention_computed_by(fn):
    """Route GatedLinearAttention2d's op call to ``fn`` (the module looks the op up in its globals at call time)."""
    original = gated_attention2d.gated_linear_attention
    gated_attention2d.gated_linear_attention = fn
    try:
        yield
    finally:
        gated_attention2d.gated_linear_attention = original


def _build(name: str, img: int, mode: str, args, **kwargs):
    if name.startswith("deit"):
        kwargs["img_size"] = img
    model = timm.create_model(name, **kwargs).to(args.device)
    if mode == "fwd":
        return model.eval().to(args.dtype)
    return model.train()


def _row(name: str, img: int, batch: int, mode: str, args, attention=None, compiled=False, **kwargs):
    """``BenchCase.make`` of one row: model ``name`` (``torch.compile``d if asked) and a batch, built when timed;
    ``attention``: the bidirectional GLA computation its attention is routed to."""

    def make():
        dtype = args.dtype if mode == "fwd" else torch.float32
        images, labels = image_batch(batch, img, device=args.device, dtype=dtype)
        model = _build(name, img, mode, args, **kwargs)
        context = (lambda: _attention_computed_by(attention)) if attention is not None else contextlib.nullcontext
        return model_step(torch.compile(model) if compiled else model, images, labels, mode, context)

    return make


def cases(args) -> list[BenchCase]:
    on_gpu = args.device == "cuda"
    # On CPU the Triton interpreter would be picked for fp32; the reference recurrence is the CPU path.
    vig_kwargs = {} if on_gpu else {"backend": "reference"}
    references = _reference_paths(on_gpu)
    train_baseline = list(references)[-1]
    # fla's rows run after every other row: its autotuning takes minutes (the backward more than 5 on the H100),
    # which would otherwise stop a time-limited run before the rest were measured (rows join their group's table)
    rows, fla_rows = [], []
    for group, mode, img, batch, peers, vig_name in _GPU_ROWS if on_gpu else _CPU_ROWS:
        common = dict(group=f"{group} B{batch}", mode=mode, items=batch)
        compiled = on_gpu and group in _COMPILED_GROUPS
        row = functools.partial(_row, img=img, batch=batch, mode=mode, args=args)
        rows.append(BenchCase(impl=f"{vig_name} (ours)", make=row(vig_name, **vig_kwargs), **common))
        if compiled:
            make = row(vig_name, compiled=True, **vig_kwargs)
            rows.append(BenchCase(impl=f"{vig_name} (ours, torch.compile)", make=make, **common))
        for impl, fn in references.items():
            baseline = mode == "fwd+bwd" and impl == train_baseline
            make = row(vig_name, attention=fn, **vig_kwargs)
            (fla_rows if "fla" in impl else rows).append(
                BenchCase(impl=f"{vig_name} {impl}", make=make, baseline=baseline, **common)
            )
        for impl, name, baseline in peers:
            rows.append(BenchCase(impl=f"{impl} (timm)", make=row(name), baseline=baseline, **common))
            if compiled:
                rows.append(BenchCase(impl=f"{impl} (timm, torch.compile)", make=row(name, compiled=True), **common))
    return rows + fla_rows
