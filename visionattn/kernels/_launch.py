"""Launching an autotuned Triton kernel without re-running the autotuner's and heuristics' per-call Python.

``kernel[grid](*args, **kwargs)`` on a ``triton.autotune(triton.heuristics(triton.jit(...)))`` kernel spends host
time in two Python layers before the JIT function binds and launches: ``Autotuner.run`` builds dicts of all
arguments and a key with ``str(dtype)`` of every tensor argument (testing each name against the argument list), and
``Heuristics.run`` builds a dict of all arguments once per heuristic. Measured on CPU (Triton 3.9, the JIT function
stubbed, a tuned key): 8 µs per call for SLA's state kernel (22 arguments), 44 µs for its fused forward kernel (68
arguments, 6 heuristics); both layers are the same in Triton 3.5-3.9.

:func:`launch` goes through them once per call signature (every non-tensor argument's value and every tensor
argument's dtype), records the config the autotuner chose and the heuristics' values, and afterwards calls the JIT
function directly with them: the launch Triton would make, without the layers.
"""

import torch
from triton.runtime.autotuner import Autotuner, Heuristics

__all__ = ["launch"]

#: ``(kernel, signature) -> (JIT function, config and heuristic keyword arguments)``; cleared when full.
_RESOLVED: dict = {}
_MAX_RESOLVED = 1024


#: Argument types that are their own key (most of a launch's arguments: strides, sizes, flags), tested by ``type``
#: first because ``isinstance(a, torch.Tensor)`` on every argument was half of a replayed launch's host time.
_PLAIN = frozenset({int, float, bool, str, type(None)})


def _signature(args: tuple, kwargs: dict) -> tuple:
    key = tuple([a if type(a) in _PLAIN else a.dtype if isinstance(a, torch.Tensor) else a for a in args])
    return key, tuple(kwargs.items())


def _resolve(kernel, args: tuple, kwargs: dict):
    """``(jit_fn, extra)`` of the call the autotuner / heuristics chain ``kernel`` just made with ``args``/``kwargs``,
    or None where the chosen config has a pre-hook (it must run every call)."""
    extra, layer = {}, kernel
    if isinstance(layer, Autotuner):
        config = layer.best_config
        if config.pre_hook is not None:
            return None
        extra.update(config.all_kwargs())
        layer = layer.fn
    while isinstance(layer, Heuristics):
        named = {**dict(zip(layer.arg_names, args)), **kwargs, **extra}
        for name, heuristic in layer.values.items():  # in order, each sees the previous ones (Heuristics.run)
            named[name] = extra[name] = heuristic(named)
        layer = layer.fn
    return layer, extra


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``; the autotuner's key and every heuristic must depend only on non-tensor
    arguments and tensor dtypes (true of this package's kernels). A config with a pre-hook, and a kernel without
    autotuner or heuristics, go through ``kernel[grid]`` every call.

    The first call of a signature runs ``kernel[grid]`` as usual (autotuning on a new key); later ones call the JIT
    function with the recorded config and heuristic values. Calls with an unhashable argument (TMA descriptors) go
    through ``kernel[grid]`` every time. Outside eager use nothing changes: the launchers run
    inside custom ops, which ``torch.compile`` does not trace.
    """
    if not isinstance(kernel, (Autotuner, Heuristics)):
        kernel[grid](*args, **kwargs)
        return
    key = kernel, _signature(args, kwargs)
    try:
        resolved = _RESOLVED.get(key)
    except TypeError:  # an unhashable argument (a TMA TensorDescriptor): no signature, the autotuner every call
        kernel[grid](*args, **kwargs)
        return
    if resolved is not None:
        fn, extra = resolved
        fn.run(*args, grid=grid, warmup=False, **kwargs, **extra)
        return
    kernel[grid](*args, **kwargs)
    resolved = _resolve(kernel, args, kwargs)
    if resolved is not None:
        if len(_RESOLVED) >= _MAX_RESOLVED:
            _RESOLVED.clear()
        _RESOLVED[key] = resolved
