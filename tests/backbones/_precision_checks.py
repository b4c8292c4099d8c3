"""Precision checks shared by the backbone tests (GPU tests call them on CUDA; they also run on CPU).

- :func:`check_amp_train_step`: a forward + backward under ``torch.autocast`` (fp16 or bf16) against the same step
  in fp32: the output and every parameter gradient finite, the output and the gradients close to fp32.
- :func:`check_compile_matches_eager`: ``torch.compile`` forward and parameter gradients against eager.

Both use the loss ``sum(out * w)`` with a fixed random ``w``, so every logit carries gradient (a ``logsumexp``
loss of a random-init model is nearly flat in the logits).
"""

from contextlib import contextmanager

import torch
from torch import nn

from tests._numerics import assert_close, relative_error

#: Max relative error of the logits of a ``*_tiny`` model at 224 px against its fp32 forward, by autocast dtype
#: (the logits pass through 12-24 low-precision blocks: fp16 keeps 11 mantissa bits, bf16 8). Measured on CPU
#: with the reference ops, batch 2, all eight ``*_tiny`` models (2026-11-22): fp16 <= 2.2e-3, bf16 <= 1.6e-2.
AMP_OUT_TOL = {torch.float16: 2e-2, torch.bfloat16: 5e-2}
#: Max relative error of all parameter gradients together (one vector) against fp32, by autocast dtype.
#: Measured as above: fp16 <= 2.6e-3, bf16 <= 1.7e-2.
AMP_GRAD_TOL = {torch.float16: 2e-2, torch.bfloat16: 1e-1}


@contextmanager
def _no_tf32():
    """fp32 references in full fp32 (cuDNN convolutions default to TF32 on Ampere+)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def train_step(
    model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None = None, fn=None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward + backward of ``sum(fn(x) * w)`` (``fn`` defaults to ``model``, ``w`` a fixed-seed random tensor
    of the output's shape), under autocast to ``dtype`` unless None; returns the fp32 output and the gradients of
    the parameters that received one."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = (model if fn is None else fn)(x)
    weight = torch.randn(out.shape, generator=torch.Generator(x.device).manual_seed(0), device=x.device)
    (out.float() * weight).sum().backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach().float(), grads


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for _, g in sorted(grads.items())])


def check_amp_train_step(model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> dict[str, float]:
    """Forward + backward of ``model`` (fp32 weights) on ``x`` under autocast to ``dtype`` against fp32.

    Asserts: the output and every gradient finite; the same parameters receive gradients as in fp32; the
    output within :data:`AMP_OUT_TOL` and the gradients (all parameters as one vector) within
    :data:`AMP_GRAD_TOL` of fp32 (relative error). Returns the two errors for reporting.
    """
    with _no_tf32():
        ref_out, ref_grads = train_step(model, x)
    out, grads = train_step(model, x, dtype)
    assert torch.isfinite(out).all(), f"{dtype} output has non-finite values"
    bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
    assert not bad, f"{dtype}: non-finite gradients in {bad[:5]}"
    assert grads.keys() == ref_grads.keys(), f"{dtype}: gradients reach other parameters than in fp32"
    assert_close(f"{dtype} output", ref_out, out, tol=AMP_OUT_TOL[dtype])
    assert_close(f"{dtype} gradients", _flat(ref_grads), _flat(grads), tol=AMP_GRAD_TOL[dtype])
    return {"out": relative_error(ref_out, out), "grad": relative_error(_flat(ref_grads), _flat(grads))}


def check_compile_matches_eager(
    model: nn.Module,
    x: torch.Tensor,
    out_tol: float,
    grad_tol: float,
    dtype: torch.dtype | None = None,
    **compile_kwargs,
) -> None:
    """``torch.compile(model, **compile_kwargs)`` against eager: one forward + backward each (autocast to ``dtype``
    unless None); the outputs within ``out_tol`` and each parameter's gradient within ``grad_tol`` (relative error,
    the denominator floored at 1e-3 of the largest gradient norm: near-zero gradients compare in absolute terms)."""
    ref_out, ref_grads = train_step(model, x, dtype)
    out, grads = train_step(model, x, dtype, fn=torch.compile(model, **compile_kwargs))
    assert_close("compiled output", ref_out, out, tol=out_tol)
    assert grads.keys() == ref_grads.keys(), "compiled backward reaches other parameters than eager"
    floor = 1e-3 * max(float(g.norm()) for g in ref_grads.values())
    errors = {n: float((grads[n] - ref).norm()) / max(float(ref.norm()), floor) for n, ref in ref_grads.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= grad_tol, f"compiled d{worst}: relative error {errors[worst]:.3e} > {grad_tol:.1e}"
