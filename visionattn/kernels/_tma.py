"""TMA tensor descriptors over the attention kernels' ``(B, H, N, D)`` operands (Hopper and later).

A rank-4 host ``TensorDescriptor`` over the storage of a ``(B, H, N, D)`` view, in either memory layout (``(B, H, N,
D)`` or ``(B, N, H, D)``), lets a kernel copy ``[1, 1, rows, D]`` tiles with TMA: the copy engine computes the
addresses, zero-fills rows past ``N`` and columns past ``D`` of the batch and head, and stores clip there. The
interpreter emulates the same semantics, so CPU tests run the descriptor paths.
"""

import functools

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from ._config import is_interpreter

__all__ = ["bhnd_descriptor", "has_tma"]


@functools.cache
def has_tma(device: torch.device) -> bool:
    """Whether kernels on ``device`` can use TMA descriptors: sm_90 and later, or the interpreter."""
    return is_interpreter() or (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9)


def bhnd_descriptor(x: torch.Tensor) -> TensorDescriptor | None:
    """A rank-4 descriptor over ``x`` ``(B, H, N, D)``, or None where TMA cannot address it: last stride not 1, the
    base or a leading stride not a multiple of 16 bytes, or a zero stride (size-1 axes take their contiguous stride:
    never used). Its block shape is a placeholder: the kernel's config sets it (an autotune pre-hook)."""
    if x.stride(-1) != 1 or x.data_ptr() % 16:
        return None
    contiguous = (x.shape[1] * x.shape[2] * x.shape[3], x.shape[2] * x.shape[3], x.shape[3])
    strides = [st if size > 1 else c for size, st, c in zip(x.shape[:3], x.stride()[:3], contiguous)]
    if any(st <= 0 or st * x.element_size() % 16 for st in strides):
        return None
    return TensorDescriptor(x, list(x.shape), [*strides, 1], [1, 1, 16, 16])
