"""Argument parsing for the public ops: each check returns a canonical value or raises naming the argument.

Tensor checks return ``bool`` and take ``raise_error=`` so backend selection can probe them.
Messages follow "``<arg>`` must be <allowed>; got <arg>=<value>. <remedy>."
"""

from collections.abc import Sequence

import torch

# The per-axis parsers live in layout (the layer above ops) so mask builders can use them too.
from ..layout._utils import _check_float, _check_int, _check_per_axis, _check_per_axis_bool  # noqa: F401

__all__ = []

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_choice(name: str, value, choices: Sequence):
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}; got {name}={value!r}.")
    return value


def _check_tensor(
    name: str,
    t,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] = _FLOAT_DTYPES,
    raise_error: bool = True,
) -> bool:
    """``t`` is a tensor of rank ``ndim`` with a dtype in ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        if raise_error:
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t)=}.")
        return False
    if ndim is not None and t.ndim != ndim:
        if raise_error:
            raise ValueError(f"{name} must have {ndim} dims; got {name}.shape={tuple(t.shape)}.")
        return False
    if t.dtype not in dtypes:
        if raise_error:
            raise TypeError(f"{name}.dtype must be one of {tuple(dtypes)}; got {name}.dtype={t.dtype}.")
        return False
    return True


def _check_attention_inputs(q, k, v, *, same_head_dim_v: bool = False, raise_error: bool = True) -> bool:
    """q ``(B, H, Nq, D)``, k ``(B, H, Nk, D)``, v ``(B, H, Nk, Dv)``: one dtype, one device, matching B/H/N/D."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not _check_tensor(name, t, ndim=4, raise_error=raise_error):
            return False
    problems = []
    if not (q.dtype == k.dtype == v.dtype):
        problems.append((TypeError, f"q, k and v must share one dtype; got {q.dtype=}, {k.dtype=}, {v.dtype=}."))
    elif not (q.device == k.device == v.device):
        problems.append((ValueError, f"q, k and v must be on one device; got {q.device=}, {k.device=}, {v.device=}."))
    elif q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        problems.append(
            (
                ValueError,
                "q, k and v must share batch and head dims (B, H, N, D layout); "
                f"got q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}.",
            )
        )
    elif k.shape[2] != v.shape[2]:
        problems.append(
            (
                ValueError,
                f"k and v must have the same length N; got k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}.",
            )
        )
    elif q.shape[3] != k.shape[3]:
        problems.append(
            (
                ValueError,
                f"q and k must have the same head dim; got q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}.",
            )
        )
    elif same_head_dim_v and v.shape[3] != q.shape[3]:
        problems.append(
            (ValueError, f"v must have the head dim of q; got q.shape={tuple(q.shape)}, v.shape={tuple(v.shape)}.")
        )
    if problems:
        if raise_error:
            exc, message = problems[0]
            raise exc(message)
        return False
    return True


def _check_scale(scale, head_dim: int) -> float:
    """``None`` means ``head_dim ** -0.5``; otherwise a positive finite float."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None; got {type(scale)=}, {scale=}.")
    if not (scale > 0 and scale != float("inf")):
        raise ValueError(f"scale must be a positive finite float; got {scale=}.")
    return float(scale)
