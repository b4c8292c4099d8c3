"""linear_attention without a gradient: one node whose apply kernel merges the state pass's chunk partials itself
(up to ``FOLD_MAX_CHUNKS`` chunks; no merge launch), against float64 and against the merged state of the autograd
path (``linear_attention_state`` + ``linear_attention_apply``, which always runs the merge kernel)."""

import pytest
import torch

from tests._numerics import assert_close
from tests.kernels.test_linear import _config_for, _inputs, _pin_config
from visionattn.kernels import linear as fwd
from visionattn.ops import (
    linear_attention,
    linear_attention_apply,
    linear_attention_query_mean,
    linear_attention_reference,
    linear_attention_state,
)

#: (feature_map, normalize, key_weight, rope): rope True for (N, D) tables, "pairs" for (N, D/2); with q̃, k̃.
PLAIN = ("elu1", "divisive", None, False)
RALA_ROPE_PAIRS = ("softmax", "divisive", "rala", "pairs")
OTHERS = [
    ("elu1", "additive", None, False),
    ("elu1", "divisive", "rala", False),
    ("relu", "additive", "tensor", False),
    ("elu1", "additive", None, "pairs"),
    ("elu1", "additive", "rala", True),
]


def _variant_id(v):
    return "{}-{}-{}-{}".format(v[0], v[1], v[2], {False: "plain", True: "rope", "pairs": "rope-pairs"}[v[3]])


def _make(rng, variant, device, **shape):
    inputs, kwargs = _inputs(rng, (*variant[:3], bool(variant[3])), device=device, **shape)
    if variant[3] == "pairs":
        kwargs["rope"] = tuple(t[:, ::2].contiguous() for t in kwargs["rope"])
    return inputs, kwargs


def _merged_path(inputs, kwargs):
    """The same output through the public state and apply passes: the merge kernel, then the apply kernel."""
    t = {n: x.detach() for n, x in inputs.items()}
    q_norm, rope, feature_map = t.get("q_norm"), kwargs.get("rope"), kwargs["feature_map"]
    rala = kwargs.get("key_weight") == "rala"
    qn = t["q"] if q_norm is None else q_norm
    qm = linear_attention_query_mean(qn, feature_map=feature_map, backend="triton") if rala else None
    key_args = dict(k_norm=t.get("k_norm"), key_weight=t.get("key_weight", kwargs.get("key_weight")), query_mean=qm)
    state = linear_attention_state(t["k"], t["v"], feature_map=feature_map, rope=rope, backend="triton", **key_args)
    query_args = dict(normalize=kwargs["normalize"], q_norm=q_norm, rope=rope, backend="triton")
    return linear_attention_apply(t["q"], state, feature_map=feature_map, **query_args)


def _check_infer(monkeypatch, rng, variant, device, dtype, n, d=16, dv=16, b=1, h=2):
    inputs, kwargs = _make(rng, variant, device, b=b, h=h, nq=n, nk=n, d=d, dv=dv, dtype=dtype)
    merges = []
    real_merge = fwd.merge_state_partials
    monkeypatch.setattr(fwd, "merge_state_partials", lambda *a: merges.append(a) or real_merge(*a))
    with torch.no_grad():  # the inputs require grad: no_grad alone selects the inference node
        out = linear_attention(**inputs, **kwargs, backend="triton")
    chunks = fwd.chunking(n, b * h, torch.device(device))[1]
    assert len(merges) == (chunks > fwd.FOLD_MAX_CHUNKS), f"{chunks} chunks: merge launched {len(merges)} times"
    ref64 = {name: t.detach().double() for name, t in inputs.items()}
    rope64 = {"rope": tuple(t.double() for t in kwargs["rope"])} if "rope" in kwargs else {}
    assert out.dtype == dtype
    assert_close("out", linear_attention_reference(**ref64, **{**kwargs, **rope64}), out, dtype=dtype)
    merged = _merged_path(inputs, kwargs)
    if torch.device(device).type == "cpu" and chunks <= 2:
        # two partials add in one order whatever the grouping: the interpreter's folded state is the merged one
        assert torch.equal(merged, out)
    else:
        assert_close("out vs merged", merged, out, tol=1e-6 if dtype == torch.float32 else 1e-3)


#: (N, D, Dv): on CPU (row tile 16) 1, 2, 3 (padded D tile), 4 key chunks folded, 5 through the merge kernel, and 3
#: with a 64x64 state (one chunk per load: ``BLOCK_C`` 1; it is 4 for 16x16 and 2 for 32x16).
SHAPES = [(16, 16, 16), (20, 16, 16), (37, 24, 16), (64, 16, 16), (80, 16, 16), (37, 64, 64)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-D{}-Dv{}".format(*s))
@pytest.mark.parametrize("variant", [PLAIN, RALA_ROPE_PAIRS], ids=_variant_id)
def test_linear_attention_infer_folds_the_merge(monkeypatch, kernel_device, poison_empty, rng, variant, shape):
    _check_infer(monkeypatch, rng, variant, kernel_device, torch.float32, *shape)


@pytest.mark.parametrize("variant", OTHERS, ids=_variant_id)
def test_linear_attention_infer_variants(monkeypatch, kernel_device, poison_empty, rng, variant):
    _check_infer(monkeypatch, rng, variant, kernel_device, torch.float32, 37)


@pytest.mark.parametrize("variant", [OTHERS[1], OTHERS[3]], ids=_variant_id)
def test_linear_attention_infer_fp16(monkeypatch, kernel_device, rng, variant):
    _check_infer(monkeypatch, rng, variant, kernel_device, torch.float16, 20)


def test_linear_attention_infer_is_one_node(kernel_device, rng):
    """Without a gradient the whole op is one custom op: compiled (fullgraph) equals eager, and its FLOPs are the
    state's and the apply's."""
    from torch.utils.flop_counter import FlopCounterMode

    inputs, kwargs = _make(rng, RALA_ROPE_PAIRS, kernel_device)
    backend = "inductor" if kernel_device.type == "cuda" else "aot_eager"
    fn = torch.compile(lambda **t: linear_attention(**t, **kwargs, backend="triton"), fullgraph=True, backend=backend)
    with torch.no_grad():
        eager = linear_attention(**inputs, **kwargs, backend="triton")
        assert_close("compiled", eager, fn(**inputs), tol=1e-6)
        with FlopCounterMode(display=False) as counter:
            linear_attention(**inputs, **kwargs, backend="triton")
    assert counter.get_total_flops() == 2 * (2 * 1 * 2 * 20 * 16 * 16)
    assert set(counter.get_flop_counts()["Global"]) == {torch.ops.visionattn.linear_attention_infer}


# ------------------------------------------------------------------------------------------------ GPU, real sizes
#: (B, H, N, D): MAViT stage 1 at 224 px (2 key chunks on an H100), half its batch (4 chunks), and more chunks than
#: FOLD_MAX_CHUNKS (the merge kernel runs).
GPU_CASES = [(64, 4, 3136, 32), (32, 4, 3136, 32), (8, 8, 4096, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "B{}-H{}-N{}-D{}".format(*c))
@pytest.mark.parametrize("variant", [PLAIN, ("elu1", "additive", None, "pairs"), RALA_ROPE_PAIRS], ids=_variant_id)
def test_linear_attention_infer_gpu(monkeypatch, rng, variant, case):
    b, h, n, d = case
    _pin_config(monkeypatch, _config_for(d))
    _check_infer(monkeypatch, rng, variant, "cuda", torch.bfloat16, n, d, d, b, h)
