"""Non-causal linear attention (issue 4): our Triton kernels per variant against naive PyTorch, its compiled form,
dense SDPA, fla's causal ``chunk_linear_attn`` when installed, and an HBM copy of the same byte count.

Non-causal linear attention is memory-bound, so every row carries ``bytes``: the minimum HBM traffic (q, k, v read
and o written forward; q, k, v, do read and dq, dk, dv written backward). The ``hbm-copy`` row copies a buffer of
the forward byte count (half read, half written): ours' GB/s over its GB/s is the fraction of copy bandwidth.

    python tools/bench.py attention --cases linear --mode both --dtype bf16 --out docs/benchmarks/linear_h100

Rows ``ours-plain-s7``, ``ours-mala-s7``, ``ours-rala-s7`` run the same op with session 7's kernel settings
(``_S7_SETTINGS``), for same-run A/B against ``ours-plain``, ``ours-mala``, ``ours-rala``.
"""

import contextlib
import importlib

import torch
import torch.nn.functional as F

from tools.bench_cases._common import BenchCase, random_qkv, timed
from visionattn.ops import linear_attention

__all__ = ["cases"]

#: (label, B, H, N, D): the issue's shapes; MAViT stage 1 at 224 px and at 1024 px.
SHAPES = [
    ("B8 H8 N16384 d64", 8, 8, 16384, 64),
    ("B1 H12 N32760 d128", 1, 12, 32760, 128),
    ("MAViT-s1-224 B64 H4 N3136 d32", 64, 4, 3136, 32),
    ("MAViT-s1-1024 B8 H2 N65536 d64", 8, 2, 65536, 64),
]
CPU_SHAPES = [("tiny B1 H2 N64 d16", 1, 2, 64, 16)]


def _rope(n: int, d: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    angle = (1.0 / 10000 ** torch.linspace(0, 1, d // 2, device=device)).repeat_interleave(2)
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None] * angle
    return torch.cos(pos), torch.sin(pos)


def naive_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The usual PyTorch formulation (LinFusion/RALA style): elu+1, ``φ(q)(φ(k)ᵀv/N) / (φ(q)·mean φ(k) + eps)``."""
    q, k = F.elu(q) + 1, F.elu(k) + 1
    kv = torch.einsum("bhnd,bhne->bhde", k, v) / k.shape[2]
    z = torch.einsum("bhnd,bhd->bhn", q, k.mean(dim=2)).unsqueeze(-1)
    return (q @ kv) / (z + eps)


def _variants() -> dict:
    """Our rows: the plain kernel and each variant the issue asks to keep within 1.3x of it (``rope=True``: the
    row's ``(N, D)`` RoPE tables; ``"pairs"``: the same tables as ``(N, D/2)``)."""
    return {
        "ours-plain": dict(normalize="divisive"),
        "ours-mala": dict(normalize="additive"),
        "ours-rala": dict(normalize="divisive", key_weight="rala"),
        "ours-rope": dict(normalize="divisive", rope=True),
        "ours-mala-rope": dict(normalize="additive", rope=True),
        "ours-rala-rope": dict(normalize="divisive", key_weight="rala", rope=True),
        "ours-mala-rope-pairs": dict(normalize="additive", rope="pairs"),
        "ours-rala-rope-pairs": dict(normalize="divisive", key_weight="rala", rope="pairs"),
    }


#: ``visionattn.kernels`` settings of session 7's forward, for same-run A/B rows ``<variant>-s7``: the state
#: pass unsplit (one 128 x 128 program per chunk at D = Dv = 128), the query mean at 4 programs per SM.
_S7_SETTINGS = {("linear", "STATE_TILE_ELEMS"): 0, ("linear_query_mean", "QUERY_MEAN_PROGRAMS_PER_SM"): 4}
_S7_ROWS = ("ours-plain", "ours-mala", "ours-rala")


@contextlib.contextmanager
def _kernel_settings(values: dict):
    """Set ``{(module, name): value}`` attributes of ``visionattn.kernels.<module>`` for one call (the autotuners
    key on what they change)."""
    modules = {key: importlib.import_module(f"visionattn.kernels.{key[0]}") for key in values}
    saved = {key: getattr(modules[key], key[1]) for key in values}
    for key, value in values.items():
        setattr(modules[key], key[1], value)
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(modules[key], key[1], value)


def _with_rope(kwargs: dict, rope) -> dict:
    """``rope="pairs"``: the same rotation as ``(N, D/2)`` tables, one angle per channel pair (views, no copy)."""
    if not kwargs.get("rope"):
        return kwargs
    return {**kwargs, "rope": tuple(t[:, ::2] for t in rope) if kwargs["rope"] == "pairs" else rope}


def _old_path(fn, q, k, v, rope):
    with _kernel_settings(_S7_SETTINGS):
        return fn(q, k, v, rope)


def _fla():
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except ImportError:
        return None
    # fla is causal and takes (B, T, H, D); the transposes are views
    return lambda q, k, v: chunk_linear_attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), normalize=True)[0]


def _row(fn, shape_args: tuple, mode: str, args):
    """``BenchCase.make`` of one row: fresh q, k, v and ``timed(fn(q, k, v, rope))``."""
    b, h, n, d = shape_args

    def make():
        inputs = random_qkv(b, h, n, d, device=args.device, dtype=args.dtype, requires_grad=mode != "fwd")
        rope = _rope(n, d, args.device)
        return timed(lambda q, k, v: fn(q, k, v, rope), inputs, mode)

    return make


def _copy_row(num_bytes: int, device):
    """``BenchCase.make`` of the HBM-copy row: a buffer of ``num_bytes`` copied into another."""

    def make():
        src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)

    return make


def cases(args) -> list[BenchCase]:
    on_gpu = args.device == "cuda"
    compiled = torch.compile(naive_linear_attention) if on_gpu else naive_linear_attention
    fla = _fla()
    # on CPU the kernels would run in the (slow) interpreter: time the reference there, the kernels on CUDA
    backend = "triton" if on_gpu else "reference"
    peers = {
        "naive": naive_linear_attention,
        "compiled": compiled,
        "sdpa-dense": F.scaled_dot_product_attention,
    }
    if fla is not None:
        peers["fla-causal-chunk"] = fla
    impls = {impl: lambda q, k, v, rope, fn=fn: fn(q, k, v) for impl, fn in peers.items()}
    for impl, kwargs in _variants().items():
        impls[impl] = lambda q, k, v, rope, kw=kwargs: linear_attention(
            q, k, v, **_with_rope(kw, rope), backend=backend
        )
    for impl in _S7_ROWS:
        impls[f"{impl}-s7"] = lambda q, k, v, rope, fn=impls[impl]: _old_path(fn, q, k, v, rope)
    rows = []
    for label, b, h, n, d in SHAPES if on_gpu else CPU_SHAPES:
        elt = torch.finfo(args.dtype).bits // 8
        fwd_bytes = elt * b * h * n * 4 * d
        mode_bytes = {"fwd": fwd_bytes, "fwd+bwd": fwd_bytes + elt * b * h * n * 7 * d}
        mode_flops = {"fwd": 4.0 * b * h * n * d * d, "fwd+bwd": 12.0 * b * h * n * d * d}
        for mode in ("fwd", "fwd+bwd"):
            common = dict(group=label, mode=mode, bytes=mode_bytes[mode], flops=mode_flops[mode])
            for impl, fn in impls.items():
                make = _row(fn, (b, h, n, d), mode, args)
                rows.append(BenchCase(impl=impl, make=make, baseline=impl == "naive", **common))
            if mode == "fwd":
                rows.append(BenchCase(impl="hbm-copy", make=_copy_row(fwd_bytes // 2, args.device), **common))
    return rows
