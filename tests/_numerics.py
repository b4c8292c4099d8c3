"""One tolerance table and one comparison helper for every numerical test (relative error, fla style)."""

import torch

#: Max relative error ``||out - ref|| / ||ref||`` by the dtype of the computation under test.
TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
}


def relative_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref64, out64 = ref.detach().double(), out.detach().double().to(ref.device)
    denom = ref64.norm().clamp_min(1e-30)
    return float((out64 - ref64).norm() / denom)


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, dtype: torch.dtype | None = None, tol=None):
    """Assert ``out`` matches ``ref`` within the table tolerance for ``dtype`` (default ``out.dtype``).

    Reports relative error and max-abs difference; fails on any non-finite value in ``out``.
    """
    if ref.shape != out.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        raise AssertionError(f"{name}: output has {int((~torch.isfinite(out)).sum())} non-finite values")
    tol = TOLERANCES[dtype or out.dtype] if tol is None else tol
    err = relative_error(ref, out)
    max_abs = float((out.detach().double().to(ref.device) - ref.detach().double()).abs().max()) if ref.numel() else 0.0
    if not err <= tol:
        raise AssertionError(f"{name}: relative error {err:.3e} > {tol:.1e} (max abs diff {max_abs:.3e})")
