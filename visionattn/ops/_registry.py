"""Backend registry of the public ops: a name maps to a callable and the constraints it needs.

An explicit ``backend=`` runs that backend's constraints with ``raise_error=True``, so unsupported input fails
loudly with an error naming the argument; ``backend=None`` takes the first registered backend whose
constraints pass and otherwise the reference. The mathematical function never changes with the backend.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..kernels._config import is_interpreter

__all__ = []

#: ``constraint(args, raise_error) -> bool``: ``args`` is the op's keyword dict after validation.
_Constraint = Callable[[dict, bool], bool]


@dataclass
class _Backend:
    fn: Callable
    constraints: list[_Constraint] = field(default_factory=list)


class _BackendRegistry:
    """Backends of one op, tried in registration order; ``"reference"`` is always the fallback."""

    def __init__(self, op_name: str):
        self.op_name = op_name
        self._backends: dict[str, _Backend] = {}

    def register(self, name: str, constraints: list[_Constraint] | tuple = ()):
        def decorator(fn):
            self._backends[name] = _Backend(fn, list(constraints))
            return fn

        return decorator

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._backends)

    def select(self, backend: str | None, args: dict) -> Callable:
        """The callable that runs ``args``; raises when an explicitly named backend cannot."""
        if backend is not None:
            if backend not in self._backends:
                raise ValueError(f"backend must be one of {self.names} for {self.op_name}; got {backend=}.")
            chosen = self._backends[backend]
            for check in chosen.constraints:
                check(args, True)
            return chosen.fn
        for name, candidate in self._backends.items():
            if name != "reference" and all(check(args, False) for check in candidate.constraints):
                return candidate.fn
        return self._backends["reference"].fn


def _fail(raise_error: bool, exc: type[Exception], message: str) -> bool:
    if raise_error:
        raise exc(message)
    return False


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _requires_triton_device(*names: str) -> _Constraint:
    """Tensors ``names`` are on CUDA, or on CPU with ``TRITON_INTERPRET=1`` and ``backend="triton"`` named.

    Automatic selection (``raise_error=False``) never picks the interpreter: it is a test vehicle, orders of
    magnitude slower than the reference on CPU.
    """

    def check(args: dict, raise_error: bool) -> bool:
        if not _triton_available():
            return _fail(raise_error, RuntimeError, "the triton backend needs Triton: pip install triton")
        interpreted_ok = raise_error and is_interpreter()
        for name in names:
            t = args[name]
            if t is None:
                continue
            if t.device.type != "cuda" and not (t.device.type == "cpu" and interpreted_ok):
                return _fail(
                    raise_error,
                    NotImplementedError,
                    f"{name} must be a CUDA tensor for backend='triton' (or CPU with TRITON_INTERPRET=1); "
                    f"got {name}.device={t.device}. Use backend='reference' on CPU.",
                )
        return True

    return check


def _eager_only(args: dict, raise_error: bool) -> bool:
    """Automatic selection only: not while ``torch.compile`` traces the call.

    For the memory-bound glue kernels (row norms, ViG's gated norm, SwiGLU): inductor fuses their PyTorch form with
    the neighbouring element-wise work, while a custom op would stop that fusion; in isolation its fused form was as
    fast or faster in 12 of 14 H100 benchmark rows (docs/benchmarks/gated_norm_h100.md, swiglu_h100.md). An
    explicitly named ``backend="triton"`` still runs under compile.
    """
    return raise_error or not torch.compiler.is_compiling()


def _requires_dtype(name: str, dtypes: tuple[torch.dtype, ...]) -> _Constraint:
    def check(args: dict, raise_error: bool) -> bool:
        dtype = args[name].dtype
        if dtype not in dtypes:
            return _fail(
                raise_error,
                NotImplementedError,
                f"{name}.dtype must be one of {dtypes} for backend='triton'; got {name}.dtype={dtype}. "
                "Use backend='reference' for other dtypes.",
            )
        return True

    return check


def _requires_head_dim_range(name: str, lo: int, hi: int) -> _Constraint:
    """Head dim of ``args[name]`` in ``[lo, hi]`` (kernels pad it to a power-of-two tile and mask the rest)."""

    def check(args: dict, raise_error: bool) -> bool:
        d = args[name].shape[-1]
        if not lo <= d <= hi:
            return _fail(
                raise_error,
                NotImplementedError,
                f"{name}.shape[-1] (head dim) must be in [{lo}, {hi}] for backend='triton'; got {d}. "
                "Use backend='reference'.",
            )
        return True

    return check


def _requires_head_dim(name: str, allowed: tuple[int, ...]) -> _Constraint:
    def check(args: dict, raise_error: bool) -> bool:
        d = args[name].shape[-1]
        if d not in allowed:
            return _fail(
                raise_error,
                NotImplementedError,
                f"{name}.shape[-1] (head dim) must be one of {allowed} for backend='triton'; got {d}.",
            )
        return True

    return check
